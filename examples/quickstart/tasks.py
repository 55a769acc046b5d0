"""A few tasks to try offload with: `offload worker examples.quickstart.tasks:app`."""

from __future__ import annotations

import hashlib
import os

from offload import Offload, current

app = Offload(os.environ.get("OFFLOAD_URL", "sqlite:///var/quickstart.db"))


@app.task
def fingerprint(n: int) -> str:
    """A little CPU work: hash a number many times."""
    digest = str(n).encode()
    for _ in range(2_000):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:12]


@app.task
def count_words(text: str) -> int:
    words = text.split()
    current.progress(1.0, f"{len(words)} words")
    return len(words)
