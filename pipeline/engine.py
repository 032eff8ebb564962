"""Runs one shard of one stage: the only code that writes shard state.

    pending items -> stage.process() -> parts flushed every `flush_every` items -> finalize (packed Parquet,
    ledger, stats) -> marker

Resumption falls out of the layout: a killed or requeued task leaves complete parts behind (a part counts once its
ledger file exists), and the next attempt skips every item a part already holds. A complete shard is skipped,
unless `retry_failed=true` and it has failed items, or an upstream stage has since completed items that were
skipped here for want of upstream output.

An item that kills the worker itself (native crash, OOM kill, time-out) must not block its shard forever: the items
in flight are kept on disk (`shards.InFlight`); the next attempt runs those suspects one at a time, first, and
records an item failed with reason `crashed` once it has died alone in flight `stage.max_item_crashes` times.
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

from .config import stage_config_hash
from .manifest import Item, load_items
from .shards import FAILED, OK, SKIPPED, ShardStore, concat_tables, dedupe_sorted
from .stages import get_stage
from .stages.base import ItemResult, RunContext, Stage, WorkItem

log = logging.getLogger("pipeline.engine")

MAX_ITEM_CRASHES = 2  # default of `stage.max_item_crashes`


class UpstreamIncomplete(RuntimeError):
    """The shard of an upstream stage has no completion marker: this shard cannot run yet."""


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


class UpstreamRows:
    """Rows of the upstream stages' outputs for one shard, grouped by video id (memory-mapped, read by key).
    `skip_columns`: columns not read at all (the verifier leaves out JPEG bytes and embeddings)."""

    def __init__(self, run_dir: Path, shard: int, upstream: dict[str, tuple[str, ...]],
                 skip_columns: frozenset[str] = frozenset()):
        self.tables: dict[tuple[str, str], pa.Table] = {}
        self.index: dict[tuple[str, str], dict[str, list[int]]] = {}
        self.status: dict[str, dict[str, dict]] = {}
        for stage, tables in upstream.items():
            store = ShardStore(run_dir, stage, shard)
            if not store.is_complete():
                raise UpstreamIncomplete(f"upstream stage {stage!r} shard {shard} is not complete "
                                         f"(no marker in {store.dir}); run stage={stage} first")
            self.status[stage] = {r["video_id"]: r for r in store.read_ledger()}
            for name in tables:
                t = store.read_table(name, skip_columns)
                if t is None:
                    continue
                groups: dict[str, list[int]] = defaultdict(list)
                for i, vid in enumerate(t.column("video_id").to_pylist()):
                    groups[vid].append(i)
                self.tables[(stage, name)] = t
                self.index[(stage, name)] = groups

    def upstream_problem(self, video_id: str) -> str | None:
        """Why this item cannot run here (upstream failed/skipped it), or None."""
        for stage, ledger in self.status.items():
            row = ledger.get(video_id)
            if row is None:
                return f"upstream_missing: {stage} has no ledger row for this item"
            if row["status"] != OK:
                return f"upstream_{row['status']}: {stage}: {row['reason']}"
        return None

    def rows_for(self, video_id: str) -> dict[str, dict[str, list[dict]]]:
        out: dict[str, dict[str, list[dict]]] = defaultdict(dict)
        for (stage, name), t in self.tables.items():
            idx = self.index[(stage, name)].get(video_id, [])
            out[stage][name] = t.take(idx).to_pylist() if idx else []
        return dict(out)


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
    """Run (or resume, or skip) one shard. Returns its stats; raises if the shard could not complete."""
    lg = logger or log
    stage_cls = get_stage(cfg.stage.name)
    run_dir = Path(cfg.run_dir)
    store = ShardStore(run_dir, stage_cls.name, shard)
    if store.resume_finalize():
        lg.info(f"{stage_cls.name} shard {shard}: finished installing the outputs a killed attempt had staged")
    items = load_items(run_dir, shard)
    pending, kept_ledger = plan_pending(cfg, store, items, stage_cls.upstream)
    if store.is_complete() and not pending:
        lg.info(f"{stage_cls.name} shard {shard}: complete, nothing to do")
        return {**store.stats(), "skipped_shard": True}

    t0 = time.time()
    upstream = UpstreamRows(run_dir, shard, stage_cls.upstream)
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
        store.write_part([_ledger_row(r, a) for r, a in buffer_results],
                         {n: _to_table(stage_cls, n, rs) for n, rs in rows.items()})
        buffer_results.clear()

    inflight = store.in_flight()  # before the stage starts: it counts the crashes of the previous attempt
    max_crashes = int(getattr(cfg.stage, "max_item_crashes", MAX_ITEM_CRASHES))
    stage = stage_cls(cfg.stage, make_context(cfg, shard, lg))
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
                    "(native crash, out of memory or time-out)")), attempts + 1))
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
        stage.close()

    part_ledger, part_tables = store.read_parts()
    ledger = kept_ledger + part_ledger
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
    store.finalize(ledger, tables, stats, {"stage": stage_cls.name, "shard": shard,
                                           "config_hash": stage_config_hash(cfg)})
    lg.info(f"{stage_cls.name} shard {shard}: complete in {seconds:.1f}s")
    return store.stats()


def container(cfg: DictConfig) -> dict:
    """Plain-dict form of a validated config, picklable for process pools and Slurm tasks."""
    return OmegaConf.to_container(cfg, resolve=True)
