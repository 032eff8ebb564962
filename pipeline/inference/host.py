"""What runs where the work is done: the model host (one per actor or model thread: loads the model, times
predict(), samples memory) and the preprocessing call (failures come back as values)."""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from ..stages.base import error_reason
from .base import Done, ItemFailure
from .gpu_stats import NVIDIA_SMI_EVERY_S, gpu_used_mb, peak_rss_mb


@dataclass
class Failed:
    """A preprocessing failure, returned as a value: the recorded reason and, for an unexpected exception, its
    traceback (logged by the driver)."""
    reason: str
    trace: str = ""

class ModelHost:
    """Owns one model: loads it, times predict(), reports busy time and memory."""

    def __init__(self, model_factory: Callable[[], Any], device: str = "cpu"):
        t0 = time.perf_counter()
        self.model = model_factory()
        self.load_s = time.perf_counter() - t0
        self.t_ready = time.perf_counter()
        self.t_last = self.t_ready
        self.busy_s = 0.0
        self.batches = 0
        self.on_gpu = device == "cuda"
        self.nvml_peak_mb: float | None = None
        self.t_smi = -float("inf")
        self._sample_gpu()

    def _sample_gpu(self, final: bool = False) -> None:
        """NVML reports current use, not a peak: sample after load and every batch (nvidia-smi: rate-limited)."""
        if not self.on_gpu:
            return
        now = time.perf_counter()
        allow_smi = final or now - self.t_smi >= NVIDIA_SMI_EVERY_S
        if allow_smi:
            self.t_smi = now
        used = gpu_used_mb(allow_smi=allow_smi)
        if used is not None:
            self.nvml_peak_mb = max(self.nvml_peak_mb or 0.0, used)

    def predict(self, *payloads: Any) -> list[Any]:
        t0 = time.perf_counter()
        try:
            outputs = list(self.model.predict(list(payloads)))
            if len(outputs) != len(payloads):
                raise RuntimeError(f"predict returned {len(outputs)} outputs for {len(payloads)} inputs")
        finally:
            self.t_last = time.perf_counter()
            self.busy_s += self.t_last - t0
            self.batches += 1
        self._sample_gpu()
        return outputs

    def stats(self) -> dict[str, float]:
        gpu_mb = 0.0
        torch = sys.modules.get("torch")   # only a model that uses torch has GPU memory worth reporting
        try:
            if torch is not None and torch.cuda.is_available():
                gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        except Exception:  # noqa: BLE001 - stats are best effort
            pass
        self._sample_gpu(final=True)
        return {"load_s": self.load_s, "busy_s": self.busy_s, "window_s": self.t_last - self.t_ready,
                "batches": self.batches, "rss_mb": peak_rss_mb(), "gpu_mb": gpu_mb, "gpu_nvml_mb": self.nvml_peak_mb,
                "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname()}

    def ready(self) -> bool:
        return True


def run_preprocess(preprocess_fn: Callable[[Any], Any], item: Any) -> tuple[Any, Any]:
    """Runs on a CPU worker -> (status, payload); status None = go to the model, else `Failed` or `Done`.

    Failures come back as values so one bad item never fails a batch. Status and payload are separate
    objects so the driver only ever fetches the small status, never the payload.
    """
    try:
        out = preprocess_fn(item)
    except ItemFailure as exc:
        return Failed(str(exc)), None
    except Exception as exc:  # noqa: BLE001 - a bad input is that item's failure
        return Failed(error_reason(exc), traceback.format_exc()), None
    return (out, None) if isinstance(out, Done) else (None, out)
