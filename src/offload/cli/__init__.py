"""The ``offload`` command. It parses, loads the app, and calls the library; nothing more.

A user mistake (a bad APP, an unreachable broker, bad JSON) is one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import click

from offload.cli import ops, send, serve
from offload.cli.common import APP_HELP


@click.group(epilog=APP_HELP)
@click.version_option(package_name="offload")
def main() -> None:
    """offload: background tasks for Python web applications."""


for command in (serve.worker, serve.beat, serve.gateway, send.send, ops.status, ops.ping, ops.purge, ops.dead):
    main.add_command(command)

__all__ = ["main"]
