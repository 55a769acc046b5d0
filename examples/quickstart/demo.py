"""`make demo` (until the photo site): start a worker, enqueue a few hundred tasks, and show a
progress bar as their results arrive."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parents[2]
TASKS = 300


async def main() -> int:
    (ROOT / "var").mkdir(exist_ok=True)
    os.environ.setdefault("OFFLOAD_URL", f"sqlite:///{ROOT / 'var' / 'quickstart.db'}")
    from examples.quickstart.tasks import app, fingerprint

    console = Console()
    console.print(f"[bold]offload quickstart[/] on {app.url.masked}: starting a worker")
    worker = subprocess.Popen(
        [sys.executable, "-m", "offload", "worker", "examples.quickstart.tasks:app", "-c", "4", "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        results = [await fingerprint.adelay(n) for n in range(TASKS)]
        console.print(f"enqueued {TASKS} tasks")
        with Progress(TextColumn("results"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
            row = bar.add_task("results", total=TASKS)
            for r in asyncio.as_completed([r.wait(timeout=120) for r in results]):
                await r
                bar.advance(row)
        console.print(f"first result: {await results[0]}; all {TASKS} done")
    finally:
        worker.terminate()
        worker.wait(40)
        await app.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
