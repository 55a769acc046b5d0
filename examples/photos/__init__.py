"""The photo site: a small Django project served over ASGI that hands its slow work to offload.
Start it with ``make demo`` (see run.py)."""
