"""Integrations with web frameworks. Each lives in its own subpackage and imports its framework
only when used (``pip install 'offload[django]'``)."""
