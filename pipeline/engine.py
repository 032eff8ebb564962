"""Runs one shard of one stage: the only code that writes shard state.

    pending items -> stage.process() -> parts flushed every `flush_every` items -> finalize (packed Parquet,
    ledger, stats) -> marker

Each output row is encoded once: parts are Arrow IPC files (written and fsynced as they are, read back
memory-mapped), the finalize concatenates them without copying and writes the shard's one Parquet file per table
(sorting and deduplicating only when the rows are not already in key order with unique keys).

Resumption falls out of the layout: a killed or requeued task leaves complete parts behind (a part counts once its
ledger file exists), and the next attempt skips every item a part already holds. A complete shard is skipped,
unless `retry_failed=true` and it has failed items, or an upstream stage has since completed items that were
skipped here for want of upstream output.

An item that kills the worker itself (native crash, OOM kill) must not block its shard forever: the items in flight
are kept on disk (`shards.InFlight`); the next attempt runs those suspects one at a time, first, and records an item
failed with reason `crashed` once it has died alone in flight `stage.max_item_crashes` times. A death counts only
when the task outlived its worker (`shards.Witness`): a task killed from outside as a whole (preemption, a kill of
its process group, node failure) counts against no item.

Only the holder of a shard's lease (`shards.ShardLease`) reads its parts and writes anything into it: a second
launch of the same stage waits for a shard that is running elsewhere (`on_leased_shard=wait`, then finds it
complete) or leaves it (`skip`). A shard is marked complete only when its ledger has exactly one row per item.
"""
from __future__ import annotations

import logging
import resource
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from omegaconf import DictConfig, OmegaConf

from . import arrow_memory
from .config import stage_config_hash
from .manifest import Item, load_items
from .shards import (FAILED, FAILED_MARKER, OK, SKIPPED, LeaseLost, ShardLease, ShardStore, Witness,
                     concat_tables, dedupe_sorted, describe_owner)
from .stages import get_stage
from .stages.base import ItemResult, RunContext, Stage, WorkItem
from .upstream import UpstreamIncomplete, UpstreamRows  # noqa: F401  (importable from here)

log = logging.getLogger("pipeline.engine")

MAX_ITEM_CRASHES = 2  # default of `stage.max_item_crashes`


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    if shutil.which("nvidia-smi") is None:  # don't pay for importing torch on CPU-only nodes
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_context(cfg: DictConfig, shard: int, logger: logging.Logger | None = None) -> RunContext:
    lg = logger or log
    return RunContext(run_dir=Path(cfg.run_dir), shard=shard, models=cfg.models,
                      cache_dir=Path(cfg.cache_dir).expanduser(), device=resolve_device(cfg.device),
                      log=lg.info)


def _to_table(stage_cls: type[Stage], name: str, rows: list[dict]) -> pa.Table | None:
    if not rows:
        return None
    schema = stage_cls.schemas.get(name)
    return pa.Table.from_pylist(rows, schema=schema) if schema is not None else pa.Table.from_pylist(rows)


def _ledger_row(res: ItemResult, attempts: int) -> dict:
    return {"video_id": res.video_id, "status": res.status, "reason": res.reason or "", "attempts": attempts,
            "seconds": float(res.seconds), "note": res.note or ""}


def plan_pending(cfg: DictConfig, store: ShardStore, items: list[Item],
                 upstream: dict[str, tuple[str, ...]]) -> tuple[list[Item], list[dict]]:
    """Items this attempt must process, and the ledger rows of a completed shard that stay as they are."""
    if not store.is_complete():
        return items, []
    previous = {r["video_id"]: r for r in store.read_ledger()}
    redo: set[str] = set()
    for vid, row in previous.items():
        if row["status"] == FAILED and cfg.retry_failed:
            redo.add(vid)
        elif row["status"] == SKIPPED and row["reason"].startswith("upstream_") and upstream:
            redo.add(vid)  # re-checked below: only if upstream now has it
    if redo and upstream:
        try:
            up = UpstreamRows(store.run_dir, store.shard, {s: () for s in upstream})
            redo = {v for v in redo if previous[v]["status"] == FAILED or up.upstream_problem(v) is None}
        except UpstreamIncomplete:
            redo = {v for v in redo if previous[v]["status"] == FAILED}
    redo |= {i.video_id for i in items if i.video_id not in previous}
    keep = [r for v, r in previous.items() if v not in redo]
    return [i for i in items if i.video_id in redo], keep


def run_shard(cfg: DictConfig, shard: int, logger: logging.Logger | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) one shard under its lease. Returns its stats (with `leased_by` when another live
    owner holds the shard and `on_leased_shard=skip`); raises if the shard could not complete, after recording
    why in its `_FAILED`."""
    lg = logger or log
    arrow_memory.configure()        # the shard's reads and writes of fresh memory: see pipeline.arrow_memory
    stage_cls = get_stage(cfg.stage.name)
    store = ShardStore(Path(cfg.run_dir), stage_cls.name, shard)
    lease = ShardLease(store.dir, ttl_s=float(cfg.get("lease_ttl_s", 120.0)))
    wait = cfg.get("on_leased_shard", "wait") == "wait"
    owner = lease.acquire(wait=wait, on_wait=lambda o: lg.info(
        f"{stage_cls.name} shard {shard}: leased by {describe_owner(o)}; waiting for it"))
    if owner is not None:
        lg.info(f"{stage_cls.name} shard {shard}: leased by {describe_owner(owner)}; left to it")
        return {"stage": stage_cls.name, "shard": shard, "skipped_shard": True, "leased_by": describe_owner(owner)}
    try:
        return _run_leased(cfg, stage_cls, store, lease, lg)
    except LeaseLost:
        raise
    except BaseException as exc:
        if not lease.lost:
            try:
                store.record_failure(f"{type(exc).__name__}: {exc}".strip()[:2000])
            except OSError:  # e.g. the disk that failed the shard is still full: the original error matters
                pass
        raise
    finally:
        lease.release()


def _run_leased(cfg: DictConfig, stage_cls: type[Stage], store: ShardStore, lease: ShardLease,
                lg: logging.Logger) -> dict[str, Any]:
    shard, run_dir = store.shard, store.run_dir
    if store.resume_finalize():
        lg.info(f"{stage_cls.name} shard {shard}: finished installing the outputs a killed attempt had staged")
    items = load_items(run_dir, shard)
    pending, kept_ledger = plan_pending(cfg, store, items, stage_cls.upstream)
    if store.is_complete() and not pending:
        (store.dir / FAILED_MARKER).unlink(missing_ok=True)  # left by an attempt that died after another finished
        lg.info(f"{stage_cls.name} shard {shard}: complete, nothing to do")
        return {**store.stats(), "skipped_shard": True}

    t0 = time.time()
    upstream = UpstreamRows(run_dir, shard, stage_cls.upstream,
                            array_columns=getattr(stage_cls, "upstream_arrays", frozenset()))
    redo = {i.video_id for i in pending}
    # Earlier final outputs of the items that stay as they are (retry_failed / upstream catch-up).
    kept_tables: dict[str, list[pa.Table]] = defaultdict(list)
    if store.is_complete():
        for name in stage_cls.tables:
            t = store.read_table(name)
            if t is not None and t.num_rows:
                mask = pa.compute.invert(pa.compute.is_in(t.column("video_id"), pa.array(sorted(redo), pa.string())))
                kept_tables[name].append(t.filter(mask))
    previous_attempts = {r["video_id"]: int(r["attempts"]) for r in store.read_ledger()}

    part_ledger, part_tables = store.read_parts()
    done_in_parts = {r["video_id"] for r in part_ledger}
    todo = [i for i in pending if i.video_id not in done_in_parts]
    lg.info(f"{stage_cls.name} shard {shard}: {len(items)} items, {len(pending)} pending, "
            f"{len(done_in_parts)} already in parts, {len(todo)} to process")

    buffer_results: list[tuple[ItemResult, int]] = []
    processed = 0

    def flush() -> None:
        if not buffer_results:
            return
        rows: dict[str, list[dict]] = defaultdict(list)
        for res, _ in buffer_results:
            for name, rs in res.rows.items():
                rows[name].extend(rs)
        unknown = set(rows) - set(stage_cls.tables)
        if unknown:
            raise RuntimeError(f"stage {stage_cls.name} produced undeclared tables {sorted(unknown)}")
        lease.check()
        store.write_part([_ledger_row(r, a) for r, a in buffer_results],
                         {n: _to_table(stage_cls, n, rs) for n, rs in rows.items()})
        buffer_results.clear()

    inflight = store.in_flight()  # before the stage starts: it counts the crashes of the previous attempt
    max_crashes = int(getattr(cfg.stage, "max_item_crashes", MAX_ITEM_CRASHES))
    witness = Witness(inflight.path, lease)  # counts a death of this process that the task outlives
    try:
        stage = stage_cls(cfg.stage, make_context(cfg, shard, lg))
    except BaseException:
        witness.stop()
        inflight.close()
        raise
    try:
        runnable: list[WorkItem] = []
        position = {it.video_id: n for n, it in enumerate(items)}
        for item in todo:
            attempts = previous_attempts.get(item.video_id, 0)
            problem = upstream.upstream_problem(item.video_id) if stage_cls.upstream else None
            if problem:
                buffer_results.append((ItemResult(item.video_id, status=SKIPPED, reason=problem), attempts))
                continue
            crashes = inflight.crashes.get(item.video_id, 0)
            if crashes >= max_crashes:
                lg.info(f"{item.video_id}: failed: crashed the worker {crashes} times")
                buffer_results.append((ItemResult.failed(item.video_id, (
                    f"crashed: the worker process died {crashes} times while processing this item alone "
                    "(native crash or out of memory)")), attempts + 1))
                continue
            runnable.append(WorkItem(item.video_id, item.url, position[item.video_id], attempts=attempts))

        def with_inputs(work: list[WorkItem]) -> Iterator[WorkItem]:
            for w in work:  # read upstream rows lazily: a shard of frames can be large
                w.inputs = upstream.rows_for(w.video_id)
                inflight.start(w.video_id)
                yield w

        expected = {w.video_id for w in runnable}

        def consume(work: list[WorkItem]) -> None:
            nonlocal processed
            for res in stage.process(with_inputs(work)):
                if res.video_id not in expected:
                    raise RuntimeError(f"stage {stage_cls.name} returned a result for unexpected item {res.video_id!r}")
                expected.discard(res.video_id)
                inflight.done(res.video_id)
                buffer_results.append((res, previous_attempts.get(res.video_id, 0) + 1))
                processed += 1
                if res.status == FAILED:
                    lg.info(f"{res.video_id}: failed: {res.reason}")
                if len(buffer_results) >= cfg.stage.flush_every:
                    flush()

        # Suspects of an earlier crash run alone, so that a crash is pinned on its item and on no other.
        suspects = [w for w in runnable if w.video_id in inflight.crashes]
        for w in suspects:
            consume([w])
            flush()
        consume([w for w in runnable if w.video_id not in inflight.crashes])
        if expected:
            raise RuntimeError(f"stage {stage_cls.name} returned no result for {sorted(expected)[:5]}")
        flush()
        extra = stage.shard_stats()
    except Exception:
        inflight.clear()  # the process lives on: the items in flight did not crash it
        raise
    finally:
        try:
            stage.close()
        finally:
            witness.stop()
            inflight.close()

    part_ledger, part_tables = store.read_parts()
    ledger = _one_row_per_item(kept_ledger + part_ledger, items, f"{stage_cls.name} shard {shard}")
    tables: dict[str, pa.Table] = {}
    for name, keys in stage_cls.tables.items():
        t = concat_tables(kept_tables.get(name, []) + part_tables.get(name, []))
        if t is None:
            schema = stage_cls.schemas.get(name)
            if schema is None:
                continue
            t = schema.empty_table()
        tables[name] = dedupe_sorted(t, list(keys))
    seconds = time.time() - t0
    stats = {"stage": stage_cls.name, "shard": shard, "seconds": seconds, "processed": processed,
             "items_per_s": processed / seconds if seconds > 0 else 0.0,
             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}
    lease.check()
    store.finalize(ledger, tables, stats, {"stage": stage_cls.name, "shard": shard,
                                           "config_hash": stage_config_hash(cfg)})
    stage_cls.after_finalize(cfg.stage, store, [i.video_id for i in items])
    lg.info(f"{stage_cls.name} shard {shard}: complete in {seconds:.1f}s")
    return store.stats()


def _one_row_per_item(rows: list[dict], items: list[Item], what: str) -> list[dict]:
    """The ledger of a shard: the last row per item (parts written later win), exactly one for every item of the
    shard. A shard whose rows do not cover its items is never marked complete."""
    last: dict[str, dict] = {}
    for r in rows:
        last[r["video_id"]] = r
    want = {i.video_id for i in items}
    missing, extra = sorted(want - set(last)), sorted(set(last) - want)
    if missing or extra:
        raise RuntimeError(f"{what}: ledger does not match the shard's items (missing {missing[:5]}, "
                           f"not in the shard {extra[:5]}); not marking it complete")
    return [last[v] for v in sorted(last)]


def container(cfg: DictConfig) -> dict:
    """Plain-dict form of a validated config, picklable for process pools and Slurm tasks."""
    return OmegaConf.to_container(cfg, resolve=True)
