"""One line saying what machine a measurement was taken on (benchmarks and run reports record it)."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - no torch / no driver
        return "no GPU"


def describe(with_gpu: bool = True) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    parts = [cpu_model(), f"{os.cpu_count()} cores", f"{mem:.0f} GiB RAM", f"{platform.system()} {platform.release()}"]
    if with_gpu:
        parts.append(gpu_name())
    return ", ".join(parts) + f"; load average at start {load}"
