"""The worker: consumer loop, executors (async, thread, process), time limits, retries."""

from offload.worker.consumer import Worker

__all__ = ["Worker"]
