"""The runner's vocabulary: its configuration, what preprocessing may return or raise, its statistics, and how
many model replicas a run gets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..stages.base import ItemResult


@dataclass
class RunnerConfig:
    batch_size: int = 8                 # items per predict() call
    num_model_actors: int = 0           # model replicas; 0 = one per `num_gpus_per_actor` GPUs of the cluster (CPU: 1)
    num_gpus_per_actor: float = 1.0     # used only when the device is cuda
    num_cpus_preprocess: int = 1        # preprocessing tasks running at once
    max_in_flight: int = 32             # items taken but not yet consumed (the memory bound)
    backend: str = "ray"                # ray | inline (threads, in-process model)


class ItemFailure(Exception):
    """A per-item failure whose message is already the recorded reason ("category: detail")."""


@dataclass
class Done:
    """Returned by a preprocess_fn to finish an item without the model (e.g. nothing to embed)."""
    result: ItemResult


@dataclass
class RunnerStats:
    items: int = 0
    ok: int = 0
    failed: int = 0
    wall_s: float = 0.0
    items_per_s: float = 0.0
    model_busy_s: float = 0.0           # summed over actors: time inside predict()
    model_window_s: float = 0.0         # summed over actors: from model loaded to last predict done
    model_busy_fraction: float = 0.0    # busy / window: the accelerator "realization"
    model_load_s: float = 0.0
    batches: int = 0
    peak_rss_mb_driver: float = 0.0
    peak_rss_mb_model: float = 0.0      # max over model actors (includes the model weights)
    peak_gpu_mem_mb: float = 0.0        # torch's allocator peak: 0 for models that do not allocate through torch
    peak_gpu_mem_mb_nvml: float | None = None  # max over actors of NVML "used" on their GPUs (cuda only)
    items_started: int = 0              # live: items taken from the input so far
    peak_in_flight: int = 0             # never above RunnerConfig.max_in_flight
    backend: str = ""
    model_nodes: list[str] = field(default_factory=list)  # the nodes the model actors ran on (Slurm names)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("items_started")
        if out["peak_gpu_mem_mb_nvml"] is None:  # no GPU was asked: CPU runs keep their stats as they were
            out.pop("peak_gpu_mem_mb_nvml")
        return {f"runner_{k}" if not k.startswith("model_") else k: v for k, v in out.items()}


class ModelUnavailable(RuntimeError):
    """The model could not be loaded or its actor died: a shard-level error, not an item's."""


def model_actor_count(cfg: RunnerConfig, device: str, cluster_gpus: float) -> int:
    """How many model actors to start: `num_model_actors`, or for 0 ("auto") one per `num_gpus_per_actor` GPUs of
    the cluster (1 on CPU). Asking for more GPUs than the cluster has is an error here, not a run that waits forever
    for actors Ray cannot place."""
    if device != "cuda":
        return max(1, cfg.num_model_actors)
    if cfg.num_gpus_per_actor <= 0:
        raise ValueError("runner.num_gpus_per_actor must be > 0 on cuda")
    n = cfg.num_model_actors if cfg.num_model_actors > 0 else int(cluster_gpus // cfg.num_gpus_per_actor + 1e-9)
    if n < 1 or n * cfg.num_gpus_per_actor > cluster_gpus + 1e-9:
        raise ValueError(f"runner.num_model_actors={cfg.num_model_actors} x num_gpus_per_actor={cfg.num_gpus_per_actor}"
                         f" needs more GPUs than the {cluster_gpus:g} this job has (0 = one actor per GPU)")
    return n
