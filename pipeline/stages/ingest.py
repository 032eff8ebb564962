"""ingest: join every modality per segment, verify alignment, then write one Deep Lake 4 dataset.

Per shard (an engine stage): each video's upstream rows are joined on explicit keys (`pipeline.join`) into
table `rows` keyed (video_id, segment_idx), schema `pipeline.schema.ROW_SCHEMA`. The verifier then checks the
video's rows (`pipeline.verify`); a video with any violation fails as "misaligned: <first violations>" and
none of its rows are written.

After every shard is joined, `write_dataset(cfg)` (the stage's `finish`, one writer) appends each complete
shard's rows to ONE Deep Lake dataset at `stage.dataset_path` (default `<run_dir>/dataset`; any URL Deep Lake
supports) in batches of `append_batch_rows`, with a commit per `shards_per_commit` shards. The commit message
and `ds.metadata["ingested_shards"]` (set in the same commit) say which shards the dataset holds, so a re-run
appends only the others. Deep Lake drops uncommitted appends when a writer dies, so after a crash the dataset
holds exactly the committed shards and a re-run completes it without duplicates; readers
(`deeplake.open_read_only`) see committed rows only. A run that leaves every shard ingested is tagged.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..atomic import read_json
from ..join import JoinParams, join_video, plan_segments
from ..schema import KEY, ROW_SCHEMA, TABLE, deeplake_columns, to_deeplake_columns
from ..shards import ShardStore
from ..verify import DROPPED_NOTE, Tolerances, check_keys, check_video
from .base import ItemResult, Resources, Stage, StageConfig, WorkItem

MODEL_KEYS = ("model", "pretrained", "checkpoint", "backend", "detector")


@dataclass
class IngestConfig(StageConfig):
    name: str = "ingest"
    dataset_path: Optional[str] = None    # Deep Lake URL or path; null = <run_dir>/dataset
    window_s: float = 10.0                # windows for videos without speech (must equal stage audio.window_s)
    keep_no_speech: bool = True           # give videos without speech windows (else they have no rows)
    frame_tolerance_s: float = 0.001      # frame PTS slack at span boundaries (float rounding of rational PTS)
    nearest_frame_tolerance_s: float = 2.0  # a span without frames borrows the nearest one this close
    keep_no_frames: bool = True           # keep rows with no frame at all (flag no_frames) or drop them
    span_tolerance_s: float = 0.05        # audio window end vs segment end (each stage measures its decode)
    prev_segments: int = 1                # speech segments before this one whose text is prev_text
    shards_per_commit: int = 4            # shards per Deep Lake commit (a crash redoes at most this many)
    append_batch_rows: int = 256          # rows per ds.append call
    tag_prefix: str = "ingest"            # tag name prefix of a completed ingest run
    resources: Resources = field(default_factory=lambda: Resources(cpus=2, gpus=0, mem_gb=8))


def dataset_url(cfg: Any, run_dir: str | Path | None = None) -> str:
    path = cfg.get("dataset_path") if hasattr(cfg, "get") else getattr(cfg, "dataset_path", None)
    if path:
        return str(path) if "://" in str(path) else f"file://{Path(path).resolve()}"
    return f"file://{(Path(run_dir) / 'dataset').resolve()}"


def upstream_provenance(run_dir: Path, shard: int, stages: list[str]) -> dict[str, Any]:
    """Per upstream stage: the shard's config hash (its marker) and the model settings it ran with."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {"shard": shard}
    for stage in stages:
        marker = ShardStore(run_dir, stage, shard).marker() or {}
        entry: dict[str, Any] = {"config_hash": marker.get("config_hash", "")}
        cfg_path = run_dir / stage / "config.yaml"
        if cfg_path.exists():
            try:
                conf = OmegaConf.to_container(OmegaConf.load(cfg_path))
                stage_conf = conf.get("stage") or {}
                entry.update({k: str(stage_conf[k]) for k in MODEL_KEYS if stage_conf.get(k) is not None})
                entry["models"] = str(conf.get("models", ""))
            except Exception:  # noqa: BLE001 - provenance is informative; never fail a video on it
                pass
        out[stage] = entry
    return out


class IngestStage(Stage):
    name = "ingest"
    Config = IngestConfig
    upstream = {"download": ("videos",), "frames": ("frames", "videos"), "asr": ("segments", "videos"),
                "clip": ("clip",), "audio": ("audio",), "scenegraph": ("scenegraph",)}
    tables = {TABLE: KEY}
    schemas = {TABLE: ROW_SCHEMA}

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__(cfg, ctx)
        self.params = JoinParams.from_config(cfg)
        self.tol = Tolerances.from_config(cfg)
        self.provenance = upstream_provenance(Path(ctx.run_dir), ctx.shard, list(self.upstream))
        self.rows_out = 0
        self.refused = 0

    def process_item(self, item: WorkItem) -> ItemResult:
        rows, dropped = join_video(item.video_id, item.inputs, self.params, self.ctx.shard, self.provenance)
        expected = [s["segment_idx"] for s in plan_segments(item.inputs, self.params)]
        violations = check_keys(item.video_id, item.inputs, self.params)
        violations += check_video(item.video_id, rows, self.tol, expected, dropped)
        if violations:
            self.refused += 1
            shown = "; ".join(str(v) for v in violations[:3])
            more = f" (+{len(violations) - 3} more)" if len(violations) > 3 else ""
            return ItemResult.failed(item.video_id, f"misaligned: {shown}{more}")
        self.rows_out += len(rows)
        notes = []
        if dropped:
            notes.append(DROPPED_NOTE + ",".join(map(str, dropped)))
        if rows and not rows[0]["is_speech"]:
            notes.append("no_speech_windows")
        return ItemResult(item.video_id, rows={TABLE: rows}, note=";".join(notes))

    def shard_stats(self) -> dict[str, Any]:
        return {"rows": self.rows_out, "refused_videos": self.refused}

    @classmethod
    def finish(cls, cfg: Any) -> None:
        write_dataset(cfg)


STAGE = IngestStage


# ------------------------------------------------------------------------------------------ Deep Lake writer


def open_or_create(url: str):
    import deeplake

    if deeplake.exists(url):
        return deeplake.open(url)
    ds = deeplake.create(url)
    for name, dtype in deeplake_columns().items():
        ds.add_column(name, dtype)
    ds.metadata["ingested_shards"] = []
    ds.commit("create: empty dataset with the row schema")
    return ds


def ingested_shards(ds) -> list[int]:
    return sorted(int(s) for s in ds.metadata["ingested_shards"]) if "ingested_shards" in ds.metadata.keys() \
        else []


def write_dataset(cfg: Any, log: Callable[[str], None] = print,
                  after_append: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Append every complete, not yet ingested ingest shard to the dataset; commit per `shards_per_commit`.

    `cfg` is the run config (run_dir + stage). Returns what was done. `after_append(shard)` is a test hook.
    """
    run_dir = Path(cfg.run_dir)
    stage = cfg.stage
    url = dataset_url(stage, run_dir)
    geometry = read_json(run_dir / "geometry.json") or {}
    num_shards = int(geometry.get("num_shards", 0))
    ds = open_or_create(url)
    done = set(ingested_shards(ds))
    todo = [s for s in range(num_shards) if s not in done and ShardStore(run_dir, "ingest", s).is_complete()]
    t0, rows_written, commits = time.perf_counter(), 0, 0
    per_commit = max(1, int(stage.shards_per_commit))
    batch = max(1, int(stage.append_batch_rows))
    for g in range(0, len(todo), per_commit):
        group = todo[g:g + per_commit]
        for shard in group:
            table = ShardStore(run_dir, "ingest", shard).read_table(TABLE)
            if table is not None:
                table = table.select(list(ROW_SCHEMA.names)).cast(ROW_SCHEMA)
                for start in range(0, table.num_rows, batch):
                    ds.append(to_deeplake_columns(table.slice(start, batch)))
                rows_written += table.num_rows
            if after_append is not None:
                after_append(shard)
        done |= set(group)
        ds.metadata["ingested_shards"] = sorted(done)       # lands in the same commit as the rows
        ds.commit(f"ingest shards {json.dumps(group)}")
        commits += 1
        log(f"ingest: committed shards {group} to {url}")
    tag = None
    if num_shards and len(done) == num_shards and todo:
        tag = f"{stage.tag_prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{len(ds)}rows"
        ds.tag(tag)
        log(f"ingest: tagged {tag} ({len(ds)} rows, shards 0..{num_shards - 1})")
    seconds = time.perf_counter() - t0
    return {"dataset": url, "shards_written": todo, "rows_written": rows_written, "commits": commits,
            "tag": tag, "rows": len(ds), "seconds": seconds}
