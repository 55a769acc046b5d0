"""A slow query, run by a worker, awaited by async web servers without blocking their loop."""

from __future__ import annotations

import os
import time

from offload import Offload

app = Offload(os.environ.get("OFFLOAD_URL", "sqlite:///var/asyncweb.db"), results=os.environ.get("OFFLOAD_RESULTS") or None)


@app.task
def slow_query(customer_id: int, seconds: float = 1.0) -> dict[str, object]:
    """Stands in for a report query that takes seconds on the database."""
    time.sleep(seconds)
    return {"customer": customer_id, "orders": customer_id * 3}
