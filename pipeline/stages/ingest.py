"""ingest: join every modality per segment, verify alignment, then write one Deep Lake 4 dataset.

Per shard (an engine stage): each video's upstream rows are joined on explicit keys (`pipeline.join`) into
table `rows` keyed (video_id, segment_idx), schema `pipeline.schema.ROW_SCHEMA`. The verifier then checks the
video's rows and its upstream keys and counts (`pipeline.verify`); a video with any violation fails as
"misaligned: <first violations>" and none of its rows are written.

After every shard is joined, `write_dataset(cfg)` (the stage's `finish`) brings ONE Deep Lake dataset at
`stage.dataset_path` (default `<run_dir>/dataset`; any URL Deep Lake supports) up to date with the complete
shards, appending in batches of `append_batch_rows` with a commit per `shards_per_commit` shards. Before a
shard's rows are appended they pass the run-level verifier (`pipeline.verify.verify_shard`, on the very rows
read for the append: every frame of each span, counts against the stage ledgers...); a shard that fails is not
committed (logged, and listed with its first violations in the result's `shards_refused`; no tag while any is),
and after the commits the dataset-level check runs over the rows just committed (`dataset_violations`; no tag
unless clean). Reports on videos ingest itself refused do not hold a shard back. In the same
commit as the rows, `ds.metadata["ingested_shards"]` lists the shards the dataset holds and
`ds.metadata["ingested_fingerprints"]` records per shard the sha256 of its `_SUCCESS` marker (rewritten by every
finalize) and of the `rows.parquet` bytes that were ingested. A re-run appends the shards not yet listed, and a
shard re-finalized since (retry_failed, upstream catch-up) whose rows digest changed has its old rows deleted
(`ds.delete`) and the new ones appended in one commit; unchanged markers cost no read of the rows. Deep Lake
drops uncommitted changes when a writer dies, so after a crash the dataset holds exactly the committed state
(old rows or new, never both) and a re-run completes it without duplicates; readers (`deeplake.open_read_only`)
see committed rows only. Writers of one run are serialised by a file lock, `<run_dir>/ingest/dataset.lock`
(metadata is re-read once it is held). Whenever every shard is complete and ingested and the current version
has no tag, it is tagged `<tag_prefix>-<time>-<n>rows` (so a crash before the tag is repaired by a re-run).

Full disks (`pipeline.dataset_health`; Deep Lake 4.7 reports no ENOSPC and leaves a head that crashes its readers):
before each commit's rows are written, the filesystem must have `free_space_margin` x their size (uncompressed,
from the Parquet metadata) + `free_space_min_mb` free, else nothing of them is written and the run stops with one
line. Every commit and tag is followed by a read of the new head in a child process: readable, its version log
is saved as the last good version; unreadable (the disk filled during the commit), the saved log is put back, so
the dataset is the last good version again, and the run stops saying so. On open an unreadable head is rolled
back the same way first; a re-run once space is freed then writes what is missing, each row once.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .. import dataset_health as health
from ..atomic import read_json
from ..join import JoinParams, join_video, plan_segments
from ..schema import KEY, ROW_SCHEMA, TABLE, deeplake_columns, to_deeplake_columns
from ..shards import MARKER, ShardStore
from ..verify import (DROPPED_NOTE, Tolerances, check_counts, check_keys, check_video, check_windows,
                      verify_dataset, verify_shard)
from .base import ItemResult, Resources, Stage, StageConfig, WorkItem

MODEL_KEYS = ("model", "pretrained", "checkpoint", "backend", "detector")
FINGERPRINTS = "ingested_fingerprints"     # dataset metadata: per shard, what of it the dataset holds


@dataclass
class IngestConfig(StageConfig):
    name: str = "ingest"
    dataset_path: Optional[str] = None    # Deep Lake URL or path; null = <run_dir>/dataset
    window_s: float = 10.0                # no-speech windows where the audio stage wrote none (else its spans)
    keep_no_speech: bool = True           # give videos without speech windows (else they have no rows)
    frame_tolerance_s: float = 0.001      # frame PTS slack at span boundaries (float rounding of rational PTS)
    nearest_frame_tolerance_s: float = 2.0  # a span without frames borrows the nearest one this close
    keep_no_frames: bool = True           # keep rows with no frame at all (flag no_frames) or drop them
    span_tolerance_s: float = 0.05        # audio window end vs segment end (each stage measures its decode)
    prev_segments: int = 1                # speech segments before this one whose text is prev_text
    shards_per_commit: int = 4            # shards per Deep Lake commit (a crash redoes at most this many)
    append_batch_rows: int = 256          # rows per ds.append call
    tag_prefix: str = "ingest"            # tag name prefix of a completed ingest run
    free_space_margin: float = 2.0        # a commit needs this many times its rows' bytes free on the dataset's disk
    free_space_min_mb: float = 64.0       # ... plus this much (version log, metadata)
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
                "clip": ("clip",), "audio": ("audio", "videos"), "scenegraph": ("scenegraph",)}
    tables = {TABLE: KEY}
    schemas = {TABLE: ROW_SCHEMA}
    upstream_arrays = frozenset({"embedding"})   # CLIP and audio embeddings reach the join as numpy vectors

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__(cfg, ctx)
        self.params = JoinParams.from_config(cfg)
        self.tol = Tolerances.from_config(cfg)
        self.provenance = upstream_provenance(Path(ctx.run_dir), ctx.shard, list(self.upstream))
        self.rows_out = 0
        self.refused = 0

    def process_item(self, item: WorkItem) -> ItemResult:
        rows, dropped = join_video(item.video_id, item.inputs, self.params, self.ctx.shard, self.provenance)
        segments = plan_segments(item.inputs, self.params)
        expected = [s["segment_idx"] for s in segments]
        violations = check_keys(item.video_id, item.inputs, self.params)
        violations += check_windows(item.video_id, item.inputs, self.params, self.tol)
        violations += check_video(item.video_id, rows, self.tol, expected, dropped, segments)
        violations += check_counts(item.video_id, item.inputs)
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


def open_or_create(url: str, log: Callable[[str], None] = print):
    import deeplake

    if deeplake.exists(url):
        ds = health.held(deeplake.open(url))
        have = {c.name for c in ds.schema.columns}
        missing = {k: v for k, v in deeplake_columns().items() if k not in have}
        if missing:     # a dataset made before these columns: its old rows read them as None
            for name, dtype in missing.items():
                ds.add_column(name, dtype)
            health.write_checked(url, lambda: ds.commit(f"schema: add columns {sorted(missing)}"),
                                 "the schema migration", log)
        return ds
    ds = health.held(deeplake.create(url))
    for name, dtype in deeplake_columns().items():
        ds.add_column(name, dtype)
    ds.metadata["ingested_shards"] = []
    ds.metadata[FINGERPRINTS] = {}
    health.write_checked(url, lambda: ds.commit("create: empty dataset with the row schema"), "creating the dataset",
                         log)
    return ds


def ingested_shards(ds) -> list[int]:
    return sorted(int(s) for s in ds.metadata["ingested_shards"]) if "ingested_shards" in ds.metadata.keys() \
        else []


def ingested_fingerprints(ds) -> dict[str, dict[str, Any]]:
    """shard (as str) -> {"marker", "rows", "num_rows"} of what the dataset holds; {} on datasets made before."""
    return {str(k): dict(v) for k, v in dict(ds.metadata[FINGERPRINTS]).items()} \
        if FINGERPRINTS in ds.metadata.keys() else {}


def marker_digest(store: ShardStore) -> str:
    """sha256 of the shard's completion marker, which every finalize rewrites (it carries the finalize time)."""
    path = store.dir / MARKER
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def rows_bytes(store: ShardStore) -> int:
    """Uncompressed bytes of the shard's rows table (Parquet metadata only: nothing is read)."""
    path = store.table_path(TABLE)
    if not path.exists():
        return 0
    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def read_rows(store: ShardStore) -> tuple[pa.Table | None, str]:
    """The shard's rows table and the sha256 of the very bytes it was parsed from."""
    path = store.table_path(TABLE)
    if not path.exists():
        return None, "absent"
    buf = pa.memory_map(str(path)).read_buffer()   # finalize replaces the file by rename: this inode stays whole
    return pq.read_table(pa.BufferReader(buf)), hashlib.sha256(buf).hexdigest()


def delete_shard_rows(ds, shard: int) -> int:
    """Delete (uncommitted) every dataset row of `shard`; returns how many."""
    n = len(ds)
    shards = ds["shard"][0:n] if n else []
    doomed = [i for i in range(n) if int(shards[i]) == shard]
    for i in reversed(doomed):          # from the end: earlier offsets stay valid
        ds.delete(i)
    return len(doomed)


@contextmanager
def writer_lock(run_dir: Path, log: Callable[[str], None]) -> Iterator[None]:
    """One dataset writer per run at a time (two would both append the shards neither had committed yet)."""
    from filelock import FileLock, Timeout

    path = run_dir / "ingest" / "dataset.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"ingest: another dataset writer holds {path}; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def current_version_tagged(ds) -> bool:
    version = ds.version
    return any(ds.tags[name].version == version for name in ds.tags.names())


def _keys(table: pa.Table | None) -> set[tuple[str, int]]:
    if table is None or not table.num_rows:
        return set()
    return set(zip(table.column("video_id").to_pylist(), table.column("segment_idx").to_pylist()))


def write_dataset(cfg: Any, log: Callable[[str], None] = print,
                  after_append: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Bring the dataset up to date with every complete ingest shard; commit per `shards_per_commit` shards.

    A shard not yet in the dataset is appended; one whose rows changed since it was ingested (re-finalized by
    retry_failed or upstream catch-up) has its old rows deleted and the new ones appended in the same commit.
    Either only once its rows pass `verify_shard`; a shard that fails keeps what the dataset had of it.
    `cfg` is the run config (run_dir + stage). Returns what was done. `after_append(shard)` is a test hook.
    """
    from ..manifest import load_items

    run_dir = Path(cfg.run_dir)
    stage = cfg.stage
    url = dataset_url(stage, run_dir)
    geometry = read_json(run_dir / "geometry.json") or {}
    num_shards = int(geometry.get("num_shards", 0))
    per_commit = max(1, int(stage.shards_per_commit))
    batch = max(1, int(stage.append_batch_rows))
    tol, params = Tolerances.from_config(stage), JoinParams.from_config(stage)
    t0, rows_written, rows_deleted, commits, verify_s = time.perf_counter(), 0, 0, 0, 0.0
    written: list[int] = []
    replaced: list[int] = []
    refused: dict[int, list[str]] = {}
    shard_keys: dict[int, set[tuple[str, int]]] = {}
    problems: list[str] = []
    with writer_lock(run_dir, log), ExitStack() as probes:
        # a head left unreadable (the disk filled during a commit) goes back to the last good version first
        health.ensure_readable(url, log, save=True)
        if not health.exists(health.local_dir(url)):        # creating it commits (and probes) at once
            probes.enter_context(health.warm_probes())
        ds = open_or_create(url, log)   # (re)read under the lock: another writer may have just committed
        done = set(ingested_shards(ds))
        prints = ingested_fingerprints(ds)
        complete = [s for s in range(num_shards) if ShardStore(run_dir, "ingest", s).is_complete()]
        # Markers are read before any rows table: a finalize racing us then leaves a stale marker digest, which
        # only makes the next run re-check the rows, never a fresh marker digest recorded over stale rows.
        markers = {s: marker_digest(ShardStore(run_dir, "ingest", s)) for s in complete}
        todo = [s for s in complete if s not in done or prints.get(str(s), {}).get("marker") != markers[s]]
        if todo:    # every commit is probed: one warm child, started now, its start-up overlapping the reads below
            probes.enter_context(health.warm_probes())
        videos: dict[int, list[str]] = {}
        if todo:
            for item in load_items(run_dir):
                videos.setdefault(item.shard, []).append(item.video_id)
        margin, min_free = float(stage.free_space_margin), float(stage.free_space_min_mb) * 2**20
        for g in range(0, len(todo), per_commit):
            group = todo[g:g + per_commit]
            need = sum(rows_bytes(ShardStore(run_dir, "ingest", s)) for s in group)
            health.check_free_space(url, int(margin * need + min_free),
                                    f"ingest shards {group} ({need / 2**10:.1f} KiB of rows x {margin:g} + "
                                    f"{min_free / 2**20:g} MiB)")
            accepted = []
            from_row = len(ds)          # the rows the commit adds; a replaced shard's delete can shift any row
            for shard in group:
                table, digest = read_rows(ShardStore(run_dir, "ingest", shard))
                num_rows = table.num_rows if table is not None else 0
                # Re-finalized with identical rows (e.g. a retry that failed again): only the marker is new.
                if shard not in done or prints.get(str(shard), {}).get("rows") != digest:
                    t1 = time.perf_counter()
                    bad = verify_shard(run_dir, shard, videos.get(shard, []), tol, params, table).blocking()
                    verify_s += time.perf_counter() - t1
                    if bad:
                        refused[shard] = [str(v) for v in bad[:5]]
                        log(f"ingest: shard {shard} NOT committed, {len(bad)} violation(s) of the run-level check: "
                            + "; ".join(refused[shard][:3]))
                        continue
                    if shard in done:
                        rows_deleted += delete_shard_rows(ds, shard)
                        replaced.append(shard)
                        from_row = 0
                    if table is not None:
                        for name in ROW_SCHEMA.names:   # rows joined before a column existed (content_id)
                            if name not in table.column_names:
                                table = table.append_column(name, pa.nulls(len(table), ROW_SCHEMA.field(name).type))
                        table = table.select(list(ROW_SCHEMA.names)).cast(ROW_SCHEMA)
                        for start in range(0, num_rows, batch):
                            ds.append(to_deeplake_columns(table.slice(start, batch)))
                        rows_written += num_rows
                    written.append(shard)
                shard_keys[shard] = _keys(table)
                prints[str(shard)] = {"marker": markers[shard], "rows": digest, "num_rows": num_rows}
                accepted.append(shard)
                if after_append is not None:
                    after_append(shard)
            if not accepted:
                continue
            done |= set(accepted)
            # Deletes, appends and metadata land in one commit: a crash leaves the old rows or the new, not both.
            ds.metadata["ingested_shards"] = sorted(done)
            ds.metadata[FINGERPRINTS] = prints
            message = f"ingest shards {json.dumps(accepted)}"
            health.write_checked(url, lambda: ds.commit(message), f"ingest: the commit of shards {accepted}", log,
                                 from_row=from_row)
            commits += 1
            log(f"ingest: committed shards {accepted} to {url}")
        tag = None
        ready = bool(num_shards) and len(complete) == num_shards and not refused and not current_version_tagged(ds)
        if commits or ready:
            t1 = time.perf_counter()
            for shard in done - set(shard_keys) - set(refused):      # unchanged since ingested: keys only
                path = ShardStore(run_dir, "ingest", shard).table_path(TABLE)
                shard_keys[shard] = _keys(pq.read_table(path, columns=["video_id", "segment_idx"])
                                          if path.exists() else None)
            problems = [str(v) for v in verify_dataset(run_dir, stage, shard_keys, tol, shards=written, ds=ds)]
            verify_s += time.perf_counter() - t1
            if problems:
                log(f"ingest: dataset check after the commit: {len(problems)} violation(s), not tagged: "
                    + "; ".join(problems[:3]))
        # Tagged whenever complete, verified and untagged, so a crash between the last commit and the tag is repaired.
        if ready and not problems:
            base = tag = f"{stage.tag_prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{len(ds)}rows"
            taken, n = set(ds.tags.names()), 1
            while tag in taken:         # a replace within the same second can give the same name
                n += 1
                tag = f"{base}-{n}"
            health.write_checked(url, lambda: ds.tag(tag), f"ingest: tagging {tag}", log, from_row=len(ds))
            log(f"ingest: tagged {tag} ({len(ds)} rows, shards 0..{num_shards - 1})")
        rows = len(ds)
    seconds = time.perf_counter() - t0
    return {"dataset": url, "shards_written": written, "shards_replaced": replaced, "rows_written": rows_written,
            "rows_deleted": rows_deleted, "commits": commits, "tag": tag, "rows": rows, "seconds": seconds,
            "shards_refused": refused, "dataset_violations": problems, "verify_seconds": verify_s}
