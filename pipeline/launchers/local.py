"""Local launcher: shards in a pool of fresh processes (spawn: no forked Ray/torch/thread state).

A worker that dies (native crash, OOM kill) breaks the whole pool. The shards that had started by then are
reported failed: a re-run resumes them, and the engine pins the crash on the item that was in flight. The shards
that had not started go to a fresh pool.
"""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from tqdm import tqdm

from ..engine import container
from ..task import run_task
from .base import LaunchResult, Launcher

# Pools that broke before any of their shards started (workers that cannot even start): then give up.
MAX_IDLE_REBUILDS = 2

_started = None  # in a worker: one flag per shard of this launch, set as its task begins


def _init_worker(started) -> None:
    global _started
    _started = started


def _run(task: Callable[[dict, int], dict], plain: dict, shard: int, slot: int) -> dict:
    _started[slot] = 1
    return task(plain, shard)


def launch(cfg, shards: list[int], task: Callable[[dict, int], Any] = run_task) -> LaunchResult:
    """Run `task(config, shard)` for each shard (a picklable module-level function: run_task)."""
    result = LaunchResult(shards=list(shards))
    if not shards:
        return result
    ctx = mp.get_context("spawn")
    started = ctx.Array("b", len(shards), lock=False)
    plain = container(cfg)
    bar = tqdm(total=len(shards), desc=f"{cfg.stage.name} shards", unit="shard")
    items = ok = idle_rebuilds = 0
    todo = list(range(len(shards)))  # slots into `shards`
    while todo:
        broken: list[int] = []
        workers = max(1, min(cfg.launcher.workers, len(todo)))
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(started,)) as pool:
            futures = {pool.submit(_run, task, plain, shards[i], i): i for i in todo}
            for fut in as_completed(futures):
                slot = futures[fut]
                try:
                    stats = fut.result()
                    if stats.get("leased_by"):
                        result.busy_shards[shards[slot]] = stats["leased_by"]
                    items += stats.get("items", 0)
                    ok += stats.get("ok", 0)
                except BrokenProcessPool:
                    broken.append(slot)
                    continue  # decided once the pool is down: had it started?
                except Exception as exc:  # noqa: BLE001 - reported per shard; the rest continue
                    result.failed_shards[shards[slot]] = f"{type(exc).__name__}: {exc}"
                bar.set_postfix(items=items, ok=ok, failed_shards=len(result.failed_shards))
                bar.update(1)
        todo = [i for i in broken if not started[i]]
        if broken and len(todo) == len(broken):
            idle_rebuilds += 1
        for i in broken:
            if started[i] or idle_rebuilds > MAX_IDLE_REBUILDS:
                result.failed_shards[shards[i]] = ("worker process died (native crash or killed); "
                                                   "a re-run resumes the shard")
                bar.update(1)
        if idle_rebuilds > MAX_IDLE_REBUILDS:
            todo = []
        bar.set_postfix(items=items, ok=ok, failed_shards=len(result.failed_shards))
    bar.close()
    return result


class LocalLauncher(Launcher):
    """Shards in fresh local processes; waits for them, so a stage's finish step runs in the calling process."""
    name = "local"

    def launch(self, cfg, shards: list[int]) -> LaunchResult:
        return launch(cfg, shards)


LAUNCHER = LocalLauncher()
