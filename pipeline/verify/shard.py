"""The run-level checks of ingest shards (`verify_shard`, also ingest's gate before a commit) and of a run."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import modalities
from ..join import JoinParams, join_video, plan_segments
from ..schema import TABLE
from ..stages.ingest_config import ingest_settings  # noqa: F401  (importable from here)
from .checks import (Tolerances, Violation, check_counts, check_frames, check_keys, check_video, check_windows,
                     dropped_of)

# upstream columns no check reads: left unread (the bulk of the bytes); HEAVY_COLUMNS: the built-in modalities'
HEAVY_COLUMNS = frozenset({"jpeg", "embedding"})


def heavy_columns() -> frozenset[str]:
    return modalities.heavy_upstream_columns()


# bulky row columns -> only their lengths (None: dropped), from the modalities (`Modality.bulky`); ROW_BULK:
# the built-in ones, `row_bulk()` the current ones
ROW_BULK = {"frames": "n_jpeg", "clip": "n_clip", "audio": None, "words": None}


def row_bulk() -> dict[str, str | None]:
    return modalities.bulky_columns()


def _read_parquet(path: Path, keep=lambda column: True) -> pa.Table:
    """One Parquet file, only the columns `keep` accepts (ParquetFile: a fraction of read_table's per-call cost,
    which dominates on a shard's many small upstream files)."""
    f = pq.ParquetFile(path, memory_map=True)
    return f.read(columns=[c for c in f.schema_arrow.names if keep(c)])


def _rows_without_images(source: Any) -> list[dict]:
    """A shard's rows (its ShardStore, or the rows table as read) without the bulky columns (JPEG bytes, CLIP and
    audio embeddings: as Python lists they would cost more than every check): `n_jpeg`/`n_clip` count them."""
    bulk = row_bulk()
    if isinstance(source, pa.Table):
        t = source
    else:
        t = _read_parquet(source.table_path(TABLE), lambda c: c not in bulk or bulk[c])
    for column, count in bulk.items():
        if column in t.column_names:
            if count:
                t = t.append_column(count, pc.list_value_length(t.column(column)).fill_null(0))
            t = t.drop_columns([column])
    return t.to_pylist()


@dataclass
class ShardReport:
    violations: list[Violation]
    keys: set[tuple[str, int]] | None          # the shard's row keys; None when its rows were not read
    refused: set[str]                           # videos without rows that ingest's ledger failed or skipped

    def blocking(self) -> list[Violation]:
        """What keeps the shard out of the dataset: every violation but the reports on videos ingest itself
        refused (their absence is what the ledger says; the rows that are there are what counts)."""
        return [v for v in self.violations if v.video_id not in self.refused]


def verify_shard(run_dir: Path, shard: int, videos: Iterable[str], tol: Tolerances, params: JoinParams,
                 table: pa.Table | None = None) -> ShardReport:
    """The run-level checks of one ingest shard (`videos`: the manifest's videos of the shard). `table`: its
    rows table as already read (ingest verifies the very rows it then appends), else read from the shard."""
    from ..shards import LEDGER, OK, ShardStore
    from ..upstream import UpstreamIncomplete, UpstreamRows

    where = f"shard-{shard:05d}"
    store = ShardStore(run_dir, "ingest", shard)
    if not store.is_complete():
        return ShardReport([Violation(where, None, "ingest shard not complete")], None, set())
    try:
        up = UpstreamRows(run_dir, shard, modalities.upstream(), skip_columns=heavy_columns())  # ingest's upstream
    except UpstreamIncomplete as exc:
        return ShardReport([Violation(where, None, str(exc))], None, set())
    out: list[Violation] = []
    refused: set[str] = set()
    path = store.table_path(LEDGER)
    ledger = {r["video_id"]: r for r in _read_parquet(path).to_pylist()} if path.exists() else {}
    rows_by_video: dict[str, list[dict]] = defaultdict(list)
    if table is not None or store.table_path(TABLE).exists():
        for r in _rows_without_images(table if table is not None else store):
            rows_by_video[r["video_id"]].append(r)
    keys = {(v, int(r["segment_idx"])) for v, rs in rows_by_video.items() for r in rs}
    for vid in sorted(set(videos)):
        ok_upstream = up.upstream_problem(vid) is None
        rows = rows_by_video.pop(vid, [])
        if not ok_upstream:
            if rows:
                out.append(Violation(vid, None, f"has rows but upstream: {up.upstream_problem(vid)}"))
            continue
        inputs = up.rows_for(vid)
        segments = plan_segments(inputs, params)
        expected = [s["segment_idx"] for s in segments]
        entry = ledger.get(vid)
        out.extend(check_keys(vid, inputs, params))
        out.extend(check_windows(vid, inputs, params, tol))
        out.extend(check_counts(vid, inputs))
        if expected and not rows:
            if entry and entry["status"] != OK:
                refused.add(vid)
            why = f"ingest {entry['status']}: {entry['reason']}" if entry else "no ingest ledger row"
            out.append(Violation(vid, None, f"ok in every upstream stage but has no rows ({why[:200]})"))
            # name the rows that kept it out: the same join, checked here
            joined, dropped = join_video(vid, inputs, params, shard, {})
            out.extend(Violation(v.video_id, v.segment_idx, f"not ingested: {v.what}")
                       for v in check_video(vid, joined, tol, expected, dropped, segments)
                       if v.segment_idx is not None)
        else:
            dropped = dropped_of(entry["note"]) if entry and entry["status"] == OK else []
            out.extend(check_video(vid, rows, tol, expected, dropped, segments))
            out.extend(check_frames(vid, rows, inputs, params))
    for vid in sorted(rows_by_video):
        out.append(Violation(vid, None, f"rows in shard {shard} for a video the manifest puts elsewhere"))
    return ShardReport(out, keys, refused)


def verify_run(run_dir: str | Path, check_dataset: bool = True) -> list[Violation]:
    from ..atomic import read_json
    from ..manifest import load_items

    run_dir = Path(run_dir)
    cfg = ingest_settings(run_dir)
    tol, params = Tolerances.from_config(cfg), JoinParams.from_config(cfg)
    out: list[Violation] = []
    videos: dict[int, list[str]] = defaultdict(list)
    for item in load_items(run_dir):
        videos[item.shard].append(item.video_id)
    all_keys: dict[int, set[tuple[str, int]]] = {}
    # every shard of the run: one the manifest gave no video is complete with no rows, and listed in the dataset
    geometry = read_json(run_dir / "geometry.json") or {}
    for shard in sorted(set(range(int(geometry.get("num_shards", 0)))) | set(videos)):
        report = verify_shard(run_dir, shard, videos[shard], tol, params)
        out.extend(report.violations)
        if report.keys is not None:
            all_keys[shard] = report.keys
    if check_dataset:
        from .dataset import verify_dataset

        out.extend(verify_dataset(run_dir, cfg, all_keys, tol))
    return out



# ------------------------------------------------------------------------------------ the verdict of a shard
# The run-level check of an ingest shard runs once, right after the shard's outputs are installed (the ingest
# stage's `after_finalize`), and its verdict is kept beside them, bound to what it checked: the sha256 of the
# rows table's bytes, the shard's marker (every finalize rewrites it, so a new ledger is never judged by an old
# verdict), the upstream shards' markers, the manifest's videos of the shard, the modalities and the check
# settings. The Deep Lake writer digests the rows it is about to append and uses the verdict only when all of
# these match; otherwise it runs the check itself. `python -m pipeline.verify` always re-checks from scratch.
VERDICT = "verified.json"
VERDICT_FORMAT = 1


def _binding(run_dir: Path, shard: int, videos: Iterable[str], tol: Tolerances, params: JoinParams,
             rows_digest: str) -> dict[str, Any]:
    import hashlib
    import json
    from dataclasses import asdict

    from ..shards import MARKER, ShardStore

    def marker(stage: str) -> str:
        path = ShardStore(run_dir, stage, shard).dir / MARKER
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""

    return {"format": VERDICT_FORMAT, "rows": rows_digest, "marker": marker("ingest"),
            "upstream": {stage: marker(stage) for stage in sorted(modalities.upstream())},
            "videos": hashlib.sha256("\n".join(sorted(set(videos))).encode()).hexdigest(),
            "modalities": [m.name for m in modalities.all_modalities()],
            "settings": json.dumps({"tol": asdict(tol), "params": asdict(params)}, sort_keys=True)}


def rows_digest(path: Path) -> str:
    """sha256 of a rows table's bytes ("absent" when there is none), as the writer digests what it appends."""
    import hashlib

    if not path.exists():
        return "absent"
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record_verdict(run_dir: Path, shard: int, videos: Iterable[str], tol: Tolerances,
                   params: JoinParams) -> dict[str, Any]:
    """Check a just-finalized ingest shard (`verify_shard`) and keep the verdict beside it; returns it."""
    from ..atomic import write_json
    from ..shards import ShardStore

    store = ShardStore(run_dir, "ingest", shard)
    videos = list(videos)
    digest = rows_digest(store.table_path(TABLE))       # before the check: a verdict never outlives its bytes
    binding = _binding(run_dir, shard, videos, tol, params, digest)
    report = verify_shard(run_dir, shard, videos, tol, params)
    verdict = {**binding, "blocking": [str(v) for v in report.blocking()],
               "violations": len(report.violations)}
    # a cache of a deterministic check: lost in a crash, the writer simply checks again (no fsync needed)
    write_json(store.dir / VERDICT, verdict, durable=False)
    return verdict


def trusted_verdict(run_dir: Path, shard: int, videos: Iterable[str], tol: Tolerances, params: JoinParams,
                    rows_digest: str) -> list[str] | None:
    """The blocking violations of the shard's kept verdict when it judged exactly these rows (`rows_digest`)
    under the current marker, upstream, videos, modalities and settings; None when there is no such verdict."""
    from ..atomic import read_json
    from ..shards import ShardStore

    try:
        verdict = read_json(ShardStore(run_dir, "ingest", shard).dir / VERDICT)
    except ValueError:
        return None
    if not isinstance(verdict, dict) or verdict.get("rows") != rows_digest:
        return None
    binding = _binding(run_dir, shard, videos, tol, params, rows_digest)
    if any(verdict.get(k) != v for k, v in binding.items()):
        return None
    return [str(v) for v in verdict.get("blocking", [])]
