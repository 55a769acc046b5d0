"""The Makefile's promises that a test can check without running them: `make demo PORT=...`."""

from __future__ import annotations

import subprocess

from tests.support import ROOT


def test_make_demo_takes_a_port() -> None:
    # -n prints the commands without running them (nor the install they depend on).
    planned = subprocess.run(["make", "-n", "-o", "install", "demo", "PORT=8123", "HOST=127.0.0.2"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30, check=True)
    assert "-m examples.photos.run --host 127.0.0.2 --port 8123" in planned.stdout
