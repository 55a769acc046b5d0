// offload dashboard
