"""Stand-ins with fixed latencies: measure the runner itself (its tests and `benchmarks/inference_bench.py`)."""
from __future__ import annotations

import time
from typing import Any


class FixedLatencyModel:
    """A stand-in model that takes a fixed time per batch: measures the runner itself (tests, benchmark)."""

    def __init__(self, seconds_per_batch: float):
        self.seconds_per_batch = seconds_per_batch

    def predict(self, payloads: list) -> list:
        time.sleep(self.seconds_per_batch)
        return [len(p) if isinstance(p, (bytes, bytearray)) else p for p in payloads]


def fixed_latency_preprocess(item: Any, seconds: float = 0.0, payload_bytes: int = 0) -> Any:
    """A stand-in preprocessing step: sleeps, then returns `payload_bytes` bytes (or the item)."""
    time.sleep(seconds)
    return bytes(payload_bytes) if payload_bytes else item
