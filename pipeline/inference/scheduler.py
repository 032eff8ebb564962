"""The scheduler: takes items, sends them through a backend's preprocessing and model replicas in batches, with
at most `max_in_flight` items between intake and hand-over (see `pipeline.inference.runner`)."""
from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from ..stages.base import ItemResult, error_reason
from .base import Done, ItemFailure, ModelUnavailable, RunnerConfig, RunnerStats
from .gpu_stats import peak_rss_mb
from .host import Failed
from .inline_backend import InlineBackend
from .ray_backend import RayBackend

logger = logging.getLogger(__name__)


class _Queues:
    """Where each taken item is: preprocessing -> ready -> predicting -> finished (ItemResults to hand over)."""

    def __init__(self, source: Iterator[Any], n_actors: int):
        self.source = source
        self.exhausted = False
        self.preprocessing: dict[Any, tuple] = {}          # status handle -> (item, payload handle)
        self.ready: deque[tuple[Any, Any]] = deque()       # (item, payload handle) waiting for a batch
        self.predicting: dict[Any, tuple[int, list]] = {}  # handle -> (actor, [(item, payload handle)])
        self.actor_load = [0] * n_actors
        self.finished: deque[ItemResult] = deque()
        self.in_flight = 0                                  # taken from `source`, not yet handed over


class InferenceRun:
    """Iterate for ItemResults; `stats` is live during iteration and final after it."""

    def __init__(self, items: Iterable[Any], preprocess_fn: Callable[[Any], Any],
                 model_factory: Callable[[], Any], postprocess_fn: Callable[[Any, Any], ItemResult],
                 cfg: RunnerConfig, device: str = "cpu", log: Callable[[str], None] | None = None):
        if cfg.backend not in ("ray", "inline"):
            raise ValueError(f"runner.backend must be 'ray' or 'inline', not {cfg.backend!r}")
        if cfg.batch_size < 1 or cfg.max_in_flight < 1:
            raise ValueError("runner.batch_size and runner.max_in_flight must be >= 1")
        self.items, self.preprocess_fn = items, preprocess_fn
        self.model_factory, self.postprocess_fn = model_factory, postprocess_fn
        self.cfg, self.device, self.log = cfg, device, log or logger.debug
        self.stats = RunnerStats(backend=cfg.backend)

    def __iter__(self) -> Iterator[ItemResult]:
        cfg, stats = self.cfg, self.stats
        backend_cls = RayBackend if cfg.backend == "ray" else InlineBackend
        t0 = time.perf_counter()
        backend = backend_cls(cfg, self.model_factory, self.device)
        q = _Queues(iter(self.items), backend.n_actors)
        try:
            # Payload handles live only in `q` (the steps are methods, so none lingers in this frame while it is
            # suspended at `yield`): an item's payload is freed once its batch is done, and max_in_flight bounds
            # the payloads alive at once.
            while True:
                self._take(backend, q)
                self._dispatch(backend, q)
                # hand over what is done; the consumer's pace is the backpressure
                while q.finished:
                    result = q.finished.popleft()
                    q.in_flight -= 1
                    yield result
                if not q.preprocessing and not q.predicting and not q.ready and q.exhausted:
                    break
                if q.preprocessing or q.predicting:
                    self._collect(backend, q)
        finally:
            try:
                self._collect_actor_stats(backend)
            except Exception as exc:  # noqa: BLE001 - stats must not mask the real error
                self.log(f"runner: could not collect model stats: {error_reason(exc)}")
            backend.close()
            stats.wall_s = time.perf_counter() - t0
            stats.items_per_s = stats.items / stats.wall_s if stats.wall_s > 0 else 0.0
            stats.peak_rss_mb_driver = peak_rss_mb()

    def _take(self, backend: Any, q: "_Queues") -> None:
        """Intake, bounded by max_in_flight; only a small preprocessing queue runs ahead of the workers."""
        cfg, stats = self.cfg, self.stats
        while (not q.exhausted and q.in_flight < cfg.max_in_flight
               and len(q.preprocessing) < 2 * max(1, cfg.num_cpus_preprocess) + cfg.batch_size):
            try:
                item = next(q.source)
            except StopIteration:
                q.exhausted = True
                break
            status_handle, payload_handle = backend.preprocess(self.preprocess_fn, item)
            q.preprocessing[status_handle] = (item, payload_handle)
            q.in_flight += 1
            stats.items_started += 1
            stats.peak_in_flight = max(stats.peak_in_flight, q.in_flight)

    def _dispatch(self, backend: Any, q: "_Queues") -> None:
        """A full batch to any actor with < 2 queued, or a partial one to an idle actor when waiting would not
        fill it (so the accelerator never idles for want of a full batch)."""
        more_coming = bool(q.preprocessing) or not q.exhausted
        for actor in sorted(range(len(q.actor_load)), key=lambda a: q.actor_load[a]):
            if not q.ready or q.actor_load[actor] >= 2:
                continue
            if len(q.ready) < self.cfg.batch_size and q.actor_load[actor] > 0 and more_coming:
                continue
            batch = [q.ready.popleft() for _ in range(min(self.cfg.batch_size, len(q.ready)))]
            q.predicting[backend.predict(actor, [h for _, h in batch])] = (actor, batch)
            q.actor_load[actor] += 1

    def _collect(self, backend: Any, q: "_Queues") -> None:
        """Wait for at least one preprocessing task or batch to finish and route what finished."""
        for handle in backend.wait(list(q.preprocessing) + list(q.predicting), timeout=None):
            if handle in q.preprocessing:
                item, payload_handle = q.preprocessing.pop(handle)
                try:
                    status = backend.status(handle)
                except Exception as exc:  # noqa: BLE001 - e.g. the worker crashed on this input
                    status = Failed(error_reason(getattr(exc, "cause", None) or exc))
                if isinstance(status, Failed):
                    if status.trace:
                        self.log(f"{_item_id(item)}: {status.reason}\n{status.trace}")
                    q.finished.append(self._finish(ItemResult.failed(_item_id(item), status.reason)))
                elif isinstance(status, Done):
                    q.finished.append(self._finish(status.result))
                else:
                    q.ready.append((item, payload_handle))
            else:
                actor, batch = q.predicting.pop(handle)
                q.actor_load[actor] -= 1
                q.finished.extend(self._batch_results(backend, handle, batch))

    def _batch_results(self, backend: Any, handle: Any, batch: list) -> list[ItemResult]:
        try:
            outputs = backend.get(handle)
        except ModelUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its items, not the shard
            cause = getattr(exc, "cause", None) or exc
            self.log(f"runner: predict failed for {len(batch)} items: {error_reason(cause)}")
            return [self._finish(ItemResult.failed(_item_id(item), error_reason(cause))) for item, _ in batch]
        results = []
        for (item, _), output in zip(batch, outputs):
            if isinstance(output, ItemFailure):
                res = ItemResult.failed(_item_id(item), str(output))
            elif isinstance(output, Exception):
                res = ItemResult.failed(_item_id(item), error_reason(output))
            else:
                try:
                    res = self.postprocess_fn(item, output)
                except Exception as exc:  # noqa: BLE001
                    self.log(f"{_item_id(item)}: {error_reason(exc)}\n{traceback.format_exc()}")
                    res = ItemResult.failed(_item_id(item), error_reason(exc))
            results.append(self._finish(res))
        return results

    def _finish(self, res: ItemResult) -> ItemResult:
        self.stats.items += 1
        if res.status == "ok":
            self.stats.ok += 1
        elif res.status == "failed":
            self.stats.failed += 1
        return res

    def _collect_actor_stats(self, backend: Any) -> None:
        per_actor = backend.actor_stats()
        s = self.stats
        s.model_busy_s = sum(a["busy_s"] for a in per_actor)
        s.model_window_s = sum(a["window_s"] for a in per_actor)
        s.model_busy_fraction = s.model_busy_s / s.model_window_s if s.model_window_s > 0 else 0.0
        s.model_load_s = max((a["load_s"] for a in per_actor), default=0.0)
        s.batches = sum(a["batches"] for a in per_actor)
        s.peak_rss_mb_model = max((a["rss_mb"] for a in per_actor), default=0.0)
        s.peak_gpu_mem_mb = max((a["gpu_mb"] for a in per_actor), default=0.0)
        nvml = [a["gpu_nvml_mb"] for a in per_actor if a.get("gpu_nvml_mb") is not None]
        s.peak_gpu_mem_mb_nvml = max(nvml) if nvml else None
        s.model_nodes = sorted({a["node"] for a in per_actor})


def _item_id(item: Any) -> str:
    return str(getattr(item, "video_id", item))


def run_inference(items: Iterable[Any], preprocess_fn: Callable[[Any], Any], model_factory: Callable[[], Any],
                  postprocess_fn: Callable[[Any, Any], ItemResult], runner_cfg: RunnerConfig,
                  device: str = "cpu", log: Callable[[str], None] | None = None) -> InferenceRun:
    """Run items through preprocess -> batched model -> postprocess; iterate the result for ItemResults."""
    return InferenceRun(items, preprocess_fn, model_factory, postprocess_fn, runner_cfg, device, log)
