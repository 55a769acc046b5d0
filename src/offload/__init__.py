"""offload: background tasks for Python web applications."""
