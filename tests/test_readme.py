"""The README's "In code" example, run as written: its tasks.py in a fresh directory, its worker
command, and its calls from another process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.support import ROOT, OffloadProcess

README = (ROOT / "README.md").read_text()
IN_CODE = README[README.index("## In code") : README.index("## Documentation")]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", IN_CODE, re.S)


def test_the_in_code_example_runs_as_written(tmp_path: Path) -> None:
    tasks_py, calls = blocks("python")
    worker_line, *cli_lines = [line for block in blocks("sh") for line in block.splitlines() if line.strip()]
    (tmp_path / "tasks.py").write_text(tasks_py)
    Image.new("RGB", (2000, 1000), "teal").save(tmp_path / "IMG_0001.jpg")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT / 'src'}"
    assert worker_line.startswith("offload worker ")
    worker = OffloadProcess(worker_line.split()[1:], env, ready_line="worker ready", cwd=tmp_path)
    try:
        # Each line of the calls block, with the values its comments promise.
        script = calls.replace('r.status()                            # "queued", "started", ... "succeeded"',
                               'assert r.status() in ("queued", "started", "succeeded")')
        script = script.replace('r.get(timeout=30)                     # "IMG_0001.thumb.jpg", or raises TaskFailed',
                                'assert r.get(timeout=30) == "IMG_0001.thumb.jpg"')
        assert script != calls
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        with Image.open(tmp_path / "IMG_0001.thumb.jpg") as thumb:
            assert thumb.size == (512, 256)
        for line in cli_lines:
            assert line.startswith("offload ")
            ran = subprocess.run([sys.executable, "-m", "offload", *line.split()[1:]], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=60)
            assert ran.returncode == 0, ran.stderr
    finally:
        worker.stop()
