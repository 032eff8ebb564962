"""Local launcher: shards in a pool of fresh processes (spawn: no forked Ray/torch/thread state)."""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from ..engine import container
from ..task import run_task
from . import LaunchResult


def launch(cfg, shards: list[int]) -> LaunchResult:
    result = LaunchResult(shards=list(shards))
    if not shards:
        return result
    workers = max(1, min(cfg.launcher.workers, len(shards)))
    plain = container(cfg)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_task, plain, s): s for s in shards}
        bar = tqdm(total=len(shards), desc=f"{cfg.stage.name} shards", unit="shard")
        items = ok = 0
        for fut in as_completed(futures):
            shard = futures[fut]
            try:
                stats = fut.result()
                items += stats.get("items", 0)
                ok += stats.get("ok", 0)
            except BrokenProcessPool as exc:
                result.failed_shards[shard] = f"worker process died: {exc}"
            except Exception as exc:  # noqa: BLE001 - reported per shard; the rest continue
                result.failed_shards[shard] = f"{type(exc).__name__}: {exc}"
            bar.set_postfix(items=items, ok=ok, failed_shards=len(result.failed_shards))
            bar.update(1)
        bar.close()
    return result
