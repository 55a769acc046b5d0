"""``make demo``: the photo site with everything it needs, in one command.

Migrates the site's database, seeds the newsletter statistics (once), creates the demo users,
then starts the site (uvicorn, ASGI), a process-pool worker for ``images``, a thread worker
for ``default,exports`` and the periodic scheduler, and prints their output with a prefix.
Ctrl-C (SIGINT) or SIGTERM stops them all: each gets SIGTERM, and the launcher waits for them.

    python -m examples.photos.run [--host 127.0.0.1] [--port 8000] [--data-dir var/photos]

``--port 0`` picks a free port. The broker is ``sqlite://`` in the data directory unless
``OFFLOAD_URL`` says otherwise (``redis://...``, or ``amqp://...`` with ``OFFLOAD_RESULTS``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from offload.config import mask_url

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = "examples.photos.settings"
APP = "offload.contrib.django:app"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0

_print_lock = threading.Lock()


def say(name: str, line: str) -> None:
    with _print_lock:
        print(f"{name:>6} | {line}", flush=True)


class Child:
    """One process of the demo, its output relayed line by line with its name in front."""

    def __init__(self, name: str, command: Sequence[str], ready_text: str, env: dict[str, str]) -> None:
        self.name = name
        self.ready_text = ready_text
        self.ready = threading.Event()
        # A POSIX session of its own (start_new_session): a Ctrl-C in the terminal reaches the
        # launcher only, which then stops everything in order (a worker that got SIGINT twice
        # would skip its grace time).
        self.proc = subprocess.Popen(
            list(command), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._relay, name=f"relay-{name}", daemon=True)
        self._reader.start()

    def _relay(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            say(self.name, line)
            if not self.ready.is_set() and self.ready_text in line:
                self.ready.set()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def flush_output(self) -> None:
        self._reader.join(2)


def prepare(seed_rows: int) -> None:
    """Migrate, seed and create the demo users, in this process, before anything starts."""
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    from examples.photos.gallery.seed import seed
    from examples.photos.gallery.views import ensure_demo_users

    Path(settings.MEDIA_ROOT).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    call_command("migrate", verbosity=0)
    say("setup", f"database migrated in {time.perf_counter() - started:.1f} s ({settings.DATABASES['default']['NAME']})")
    took = seed(seed_rows)
    if took is None:
        say("setup", "newsletter statistics already seeded")
    else:
        say("setup", f"seeded {seed_rows:,} newsletter statistics in {took:.1f} s")
    ensure_demo_users()
    connections.close_all()


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the offload photo demo: site, workers and beat.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--data-dir", type=Path, help="database, uploads and exports (default: var/photos)")
    args = parser.parse_args(argv)

    data_dir = (args.data_dir or Path(os.environ.get("PHOTOS_DATA_DIR") or ROOT / "var" / "photos")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port(args.host)
    site_url = f"http://{args.host}:{port}"
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.update({"DJANGO_SETTINGS_MODULE": SETTINGS, "PHOTOS_DATA_DIR": str(data_dir),
                       "PHOTOS_SITE_URL": site_url, "PYTHONPATH": python_path})
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    prepare(int(os.environ.get("PHOTOS_SEED_ROWS", "500000")))

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    env = dict(os.environ)
    offload = [sys.executable, "-m", "offload"]
    children = [
        Child("web", [sys.executable, "-m", "uvicorn", "examples.photos.asgi:application", "--host", args.host,
                      "--port", str(port), "--no-access-log", "--lifespan", "off", "--timeout-graceful-shutdown", "2"],
              "Uvicorn running on", env),
        Child("images", [*offload, "worker", APP, "-q", "images", "--pool", "process", "--grace", "10"], "worker ready", env),
        Child("tasks", [*offload, "worker", APP, "-q", "default,exports", "-c", "4", "--grace", "10"], "worker ready", env),
        Child("beat", [*offload, "beat", APP], "beat ready", env),
    ]
    code = 0
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not stop.is_set() and not all(c.ready.is_set() for c in children):
            failed = [c for c in children if c.proc.poll() is not None]
            if failed or time.monotonic() > deadline:
                what = ", ".join(f"{c.name} exited with {c.proc.returncode}" for c in failed) or "timed out"
                say("demo", f"could not start: {what}")
                return 1
            stop.wait(0.1)
        if not stop.is_set():
            broker = mask_url(env["OFFLOAD_URL"]) if env.get("OFFLOAD_URL") else f"sqlite in {data_dir}"
            say("demo", f"ready on {site_url} (broker {broker}); Ctrl-C stops everything")
        while not stop.is_set():
            gone = [c for c in children if c.proc.poll() is not None]
            if gone:
                say("demo", f"{gone[0].name} exited with {gone[0].proc.returncode}: stopping the rest")
                code = 1
                break
            stop.wait(0.5)
    finally:
        say("demo", "stopping")
        for child in reversed(children):
            child.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in children:
            if child.wait(max(deadline - time.monotonic(), 0.1)) is None:
                say("demo", f"{child.name} did not stop in time: killed")
                child.kill()
                child.wait(5)
            child.flush_output()
        say("demo", "stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
