"""The shared inference runner: CPU preprocessing in parallel with model actors, batched, with backpressure.

Every model stage (asr, clip, audio, scenegraph) runs its shard through `run_inference`:

    run = run_inference(items, preprocess_fn, model_factory, postprocess_fn, cfg.runner, device=ctx.device)
    for result in run:          # ItemResults, in completion order, as soon as each is done
        yield result
    stats = run.stats.as_dict()  # items/s, model-busy fraction, peak memory...

- `preprocess_fn(item) -> payload` runs on CPU workers (Ray tasks; `num_cpus_preprocess` at a time). It may
  raise (the item becomes a failed result, reason from `pipeline.stages.base.error_reason` or the exception's
  own "category: detail" text if it is a `ItemFailure`) or return `Done(item_result)` to skip the model.
- `model_factory() -> model` is called once inside each model actor (it must be picklable: a module-level
  class or a functools.partial). The model has `predict(payloads: list) -> list` with one output per payload;
  an output that is an Exception instance fails just that item. Each actor owns `num_gpus_per_actor` GPUs
  when `device == "cuda"` (Ray sets CUDA_VISIBLE_DEVICES), none on CPU.
- `postprocess_fn(item, output) -> ItemResult` runs in the driver.

Backpressure: at most `max_in_flight` items are between "taken from `items`" and "yielded to the consumer"
(preprocessing, queued payloads, inside the model, waiting to be consumed), so a slow consumer stops intake
instead of growing memory: payloads alive at once (Ray object store) stay at about `max_in_flight` x payload
size (Ray itself frees released objects in batches, by default once a second, which can add what one second
of throughput holds). Each actor gets a second batch queued behind the running one, so it never waits
for the driver between batches.

GPU memory: `peak_gpu_mem_mb` is torch's allocator peak (0 for a model that allocates outside torch, e.g.
CTranslate2 in faster-whisper); on cuda `peak_gpu_mem_mb_nvml` is the peak NVML-reported use of the actors'
GPUs (pynvml if installed, else nvidia-smi; whole-device figures), absent on CPU.

Ray: connects to the cluster at `RAY_ADDRESS` if set (multi-node jobs), reuses a Ray already initialised in
this process, else starts a local one sized for this run and shuts it down afterwards. On a multi-node cluster the
replicas sit in a SPREAD placement group (one bundle each, spread over the nodes). Actors are killed at
the end either way (actors holding CPUs would starve later Ray Data work). `backend="inline"` runs the same
scheduling with threads and in-process models, for the smallest cases.

Modules: `base` (RunnerConfig, ItemFailure, Done, RunnerStats, replica count), `scheduler` (InferenceRun:
intake, batching, backpressure), `host` (the model host and the preprocessing call, where the work runs),
`inline_backend` and `ray_backend` (where that is; `ensure_ray`), `gpu_stats` (RSS and NVML memory), `testing`
(fixed-latency stand-ins for tests and benchmarks). This module is the import point stages use.
"""
from __future__ import annotations

from .base import (Done, ItemFailure, ModelUnavailable, RunnerConfig, RunnerStats,  # noqa: F401
                   model_actor_count)
from .gpu_stats import NVIDIA_SMI_EVERY_S, gpu_used_mb, peak_rss_mb, visible_gpus  # noqa: F401
from .host import ModelHost  # noqa: F401
from .ray_backend import PLACEMENT_TIMEOUT_S, ensure_ray, local_ray_cpus, start_ray_reaper  # noqa: F401
from .scheduler import InferenceRun, run_inference  # noqa: F401
from .testing import FixedLatencyModel, fixed_latency_preprocess  # noqa: F401

__all__ = ["Done", "FixedLatencyModel", "InferenceRun", "ItemFailure", "ModelHost", "ModelUnavailable",
           "NVIDIA_SMI_EVERY_S", "PLACEMENT_TIMEOUT_S", "RunnerConfig", "RunnerStats", "ensure_ray",
           "fixed_latency_preprocess", "gpu_used_mb", "local_ray_cpus", "model_actor_count", "peak_rss_mb",
           "run_inference", "start_ray_reaper", "visible_gpus"]
