"""The worker: its loop (consumer), the per-message pipeline and its settlement, executors
(async, thread, process), time limits, retries."""

from offload.worker.consumer import Worker

__all__ = ["Worker"]
