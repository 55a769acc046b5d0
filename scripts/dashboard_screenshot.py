"""Make docs/images/dashboard.png: the dashboard's overview at 1200x800, with a few queues, a
worker busy on a task, and tasks waiting on queues no worker consumes.

    python scripts/dashboard_screenshot.py [OUT.png]

Needs Chromium at /usr/bin/chromium and Playwright (pip install playwright); runs a gateway
and a worker on a temporary sqlite file, and stops them when done.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images" / "dashboard.png"
PASSWORD = "screenshot"
APP = "tests.apps.basic:app"


def start(args: list[str], env: dict[str, str], ready: re.Pattern[str]) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """A ``python -m offload`` process, once a line of its log matches ``ready``."""
    proc = subprocess.Popen([sys.executable, "-m", "offload", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in proc.stdout:
        found = ready.search(line)
        if found:
            # Keep reading its log, so a full pipe never blocks it.
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
            return proc, found
    raise SystemExit(f"offload {args[0]} exited before it was ready")


def main(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    from offload import Offload

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/offload.db"
        env = {**os.environ, "OFFLOAD_URL": url, "OFFLOAD_NAMESPACE": "shop", "OFFLOAD_DASHBOARD_PASSWORD": PASSWORD,
               "PYTHONPATH": os.pathsep.join((str(ROOT / "src"), str(ROOT)))}
        gateway, port = start(["gateway", APP, "--port", "0", "--dashboard"], env, re.compile(r"running on https?://[^:]+:(\d+)"))
        worker, _ = start(["worker", APP, "-q", "default,emails", "--concurrency", "4"], env, re.compile("worker ready"))
        app = Offload(url, namespace="shop")
        try:
            add = app.ref("tests.apps.basic.add")
            for i in range(12):
                add.delay(i, i).get(timeout=30)
            for i in range(5):
                add.options(queue="emails").delay(i, 1).get(timeout=30)
            for i in range(7):
                add.options(queue="reports").delay(i, 2)  # no worker consumes "reports": they wait
            for i in range(3):
                add.options(queue="thumbnails").delay(i, 3)
            busy = app.ref("tests.apps.basic.progress_steps").delay(100, 0.5)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
                context = browser.new_context(viewport={"width": 1200, "height": 800},
                                              http_credentials={"username": "admin", "password": PASSWORD})
                page = context.new_page()
                page.goto(f"http://127.0.0.1:{port.group(1)}/dashboard/#/")
                page.wait_for_selector(f'#workers-table a[href$="{busy.id}"]', timeout=30_000)
                page.wait_for_selector("#live.on", timeout=30_000)
                page.screenshot(path=str(out))
                browser.close()
            busy.cancel()
        finally:
            app.close()
            for proc in (worker, gateway):
                proc.terminate()
                proc.wait(timeout=30)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
