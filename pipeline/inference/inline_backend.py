"""The inline backend: threads for preprocessing, models in-process (each on its own single thread, like an
actor). The same scheduling as Ray for the smallest cases and for tests."""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from ..stages.base import error_reason
from .base import ModelUnavailable, RunnerConfig, model_actor_count
from .gpu_stats import local_gpu_count
from .host import ModelHost, run_preprocess


class InlineBackend:
    """Threads for preprocessing, models in-process (each on its own single thread, like an actor)."""

    def __init__(self, cfg: RunnerConfig, model_factory: Callable[[], Any], device: str):
        self.n_actors = model_actor_count(cfg, device, local_gpu_count(device))
        self.prep_pool = ThreadPoolExecutor(max(1, cfg.num_cpus_preprocess), thread_name_prefix="preprocess")
        self.model_pools = [ThreadPoolExecutor(1, thread_name_prefix=f"model{i}") for i in range(self.n_actors)]
        self.hosts = [pool.submit(ModelHost, model_factory, device) for pool in self.model_pools]

    def preprocess(self, fn: Callable, item: Any) -> tuple[Future, Future]:
        fut = self.prep_pool.submit(run_preprocess, fn, item)
        return fut, fut

    def predict(self, actor: int, payload_handles: list[Future]) -> Future:
        payloads = [h.result()[1] for h in payload_handles]
        return self.model_pools[actor].submit(self._predict, actor, payloads)

    def _predict(self, actor: int, payloads: list) -> list:
        try:
            host = self.hosts[actor].result()
        except Exception as exc:
            raise ModelUnavailable(f"model failed to load: {error_reason(exc)}") from exc
        return host.predict(*payloads)

    def status(self, handle: Future) -> Any:
        return handle.result()[0]

    def wait(self, handles: list[Future], timeout: float | None) -> list[Future]:
        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def get(self, handle: Future) -> Any:
        return handle.result()

    def actor_stats(self) -> list[dict]:
        return [h.result().stats() for h in self.hosts]

    def close(self) -> None:
        self.prep_pool.shutdown(wait=True, cancel_futures=True)
        for pool in self.model_pools:
            pool.shutdown(wait=True)
        self.hosts = []
