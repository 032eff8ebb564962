"""The stage interface. A stage is one module + one yaml (`conf/stage/<name>.yaml`; for a stage of another
package, the yaml beside its module: `pipeline.config.stage_yaml`).

A stage receives the pending items of one shard (each with its upstream rows, read by key) and yields one
`ItemResult` per item, in any order. The engine (`pipeline.engine`) owns everything else: which items are
pending, flushing progress as parts, the ledger, atomic final outputs and the completion marker. A stage
never writes into the shard directory itself (media files it produces go under `ctx.media_dir`).
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import pyarrow as pa


@dataclass
class Resources:
    """What one array task of this stage asks the cluster for (ignored by the local launcher)."""
    cpus: int = 2
    gpus: int = 0           # GPUs per node on GPU partitions; a model stage's runner starts one model per GPU
    mem_gb: float = 8.0
    timeout_min: int = 240
    nodes: int = 1          # >1: a multi-node job that starts a Ray cluster over the allocation


@dataclass
class StageConfig:
    """Fields every stage config has; stages subclass this with their own knobs."""
    name: str = ""
    resources: Resources = field(default_factory=Resources)
    flush_every: int = 16   # items per part: at most this much work is redone after a kill -9
    max_item_crashes: int = 2  # worker deaths with this item alone in flight before it is recorded failed (crashed)


@dataclass
class RunContext:
    run_dir: Path
    shard: int
    models: str             # "real" or "tiny"
    cache_dir: Path
    device: str             # "cpu" or "cuda"
    log: Callable[[str], None] = logging.getLogger("pipeline.stages").info   # the engine passes its task log

    @property
    def media_dir(self) -> Path:
        return self.run_dir / "media"


@dataclass
class WorkItem:
    video_id: str
    url: str
    index: int                                   # position of the item in its shard (sorted by video id)
    inputs: dict[str, dict[str, list[dict]]] = field(default_factory=dict)   # stage -> table -> rows
    attempts: int = 0                            # attempts before this one

    def rows(self, stage: str, table: str) -> list[dict]:
        return self.inputs.get(stage, {}).get(table, [])


@dataclass
class ItemResult:
    video_id: str
    status: str = "ok"                           # ok | failed | skipped
    reason: str = ""                             # "category: detail" for failed/skipped
    rows: dict[str, list[dict]] = field(default_factory=dict)
    note: str = ""                               # e.g. "no_speech", "low_cut_fallback"
    seconds: float = 0.0

    @classmethod
    def failed(cls, video_id: str, reason: str, **kw: Any) -> "ItemResult":
        return cls(video_id, status="failed", reason=reason, **kw)


def error_reason(exc: BaseException) -> str:
    """A recorded failure reason for an unexpected per-item exception."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {msg}"[:500]


class Stage:
    name: ClassVar[str]
    Config: ClassVar[type] = StageConfig
    upstream: ClassVar[dict[str, tuple[str, ...]]] = {}   # stage -> tables this stage reads per item
    # output table -> key columns; the engine sorts and dedupes final outputs by them
    tables: ClassVar[dict[str, tuple[str, ...]]] = {}
    schemas: ClassVar[dict[str, pa.Schema]] = {}           # optional explicit Arrow schemas per table
    # "module:function" a finish job (Slurm) calls first, before this stage's modules load: work that can start
    # early (ingest: the dataset writer's probe child, whose start-up then runs beside the job's imports)
    finish_prelude: ClassVar[str | None] = None

    def __init__(self, cfg: Any, ctx: RunContext):
        self.cfg = cfg
        self.ctx = ctx

    def process(self, items: Iterable[WorkItem]) -> Iterator[ItemResult]:
        """Default: one item at a time; an exception is that item's recorded failure, never the shard's."""
        for item in items:
            t0 = time.perf_counter()
            try:
                res = self.process_item(item)
            except Exception as exc:  # noqa: BLE001 - a bad video must not kill its shard
                self.ctx.log(f"{item.video_id}: {error_reason(exc)}\n{traceback.format_exc()}")
                res = ItemResult.failed(item.video_id, error_reason(exc))
            res.seconds = res.seconds or (time.perf_counter() - t0)
            yield res

    def process_item(self, item: WorkItem) -> ItemResult:
        raise NotImplementedError

    def shard_stats(self) -> dict[str, Any]:
        """Extra per-shard stats (throughput, model-busy fraction...) merged into stats.json."""
        return {}

    def close(self) -> None:
        pass

    @classmethod
    def after_finalize(cls, cfg: Any, store: Any, video_ids: list[str]) -> None:
        """Runs once a shard's outputs are installed (its marker written), still under its lease: `cfg` the stage
        config, `store` the shard's ShardStore, `video_ids` the manifest's items of the shard."""

    @classmethod
    def finish(cls, cfg: Any) -> None:
        """Runs once after every shard of the stage is complete (e.g. ingest's single Deep Lake writer)."""
