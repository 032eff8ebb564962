"""What a model host measures about its process: peak RSS, and NVML-reported GPU memory (pynvml if installed, else
nvidia-smi, rate-limited; whole-device figures) of the GPUs it sees."""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
from typing import Any


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


NVIDIA_SMI_EVERY_S = 10.0  # nvidia-smi is a process start: sample at most this often (pynvml: every batch)


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """This process's GPUs as NVML names them (indices or GPU-/MIG- UUIDs), from CUDA_VISIBLE_DEVICES (which
    Ray sets per actor); all unset means device 0, the one torch and CTranslate2 use by default."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return ["0"]
    ids = []
    for part in (p.strip() for p in value.split(",")):
        if not part or part.startswith("-"):
            break  # CUDA ignores a negative id and everything after it
        ids.append(part)
    return ids


_pynvml: Any = None  # the initialised module, False once it proved unusable here


def _nvml_used_mb_pynvml(ids: list[str]) -> float | None:
    global _pynvml
    if _pynvml is None:  # initialised once per process: nvmlInit is too slow to repeat every batch
        try:
            import pynvml

            pynvml.nvmlInit()
            _pynvml = pynvml
        except Exception:  # noqa: BLE001 - not installed, no driver, no GPU
            _pynvml = False
    if not _pynvml:
        return None
    try:
        total = 0
        for dev in ids:
            handle = (_pynvml.nvmlDeviceGetHandleByIndex(int(dev)) if dev.isdigit()
                      else _pynvml.nvmlDeviceGetHandleByUUID(dev))
            total += _pynvml.nvmlDeviceGetMemoryInfo(handle).used
        return total / 2**20
    except Exception:  # noqa: BLE001 - e.g. an id NVML does not know
        return None


def _nvml_used_mb_smi(ids: list[str]) -> float | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--id={','.join(ids)}"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        values = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return sum(values) if values else None  # nvidia-smi reports MiB


def gpu_used_mb(ids: list[str] | None = None, allow_smi: bool = True) -> float | None:
    """NVML-reported used memory (MiB) of this process's GPUs, or None where none can be asked.

    Whole-device figures: unlike torch's allocator peak they count every framework (CTranslate2 included), its
    caches and the CUDA context, and also other processes on the same GPU (fractional GPUs per actor)."""
    ids = visible_gpus() if ids is None else ids
    if not ids:
        return None
    used = _nvml_used_mb_pynvml(ids)
    if used is None and allow_smi:
        used = _nvml_used_mb_smi(ids)
    return used


def local_gpu_count(device: str) -> int:
    if device != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()
