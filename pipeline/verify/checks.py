"""Alignment verifier: `python -m pipeline verify run_dir=<dir> [dataset=true|false] [max_listed=50]`.

Checks every joined row (the ingest shards' `rows` tables, and the Deep Lake dataset when it exists):
- frames: every frame PTS inside [start - frame_tolerance_s, end + frame_tolerance_s], or the row is flagged
  "nearest_frame" (one frame, within nearest_frame_tolerance_s of the span) or "no_frames" (none); and the row
  holds exactly the frames the join rule gives its planned span, rebuilt from the frames stage's table by PTS
  (missing or extra frame_idx are named);
- audio: the audio row's span equals the segment span (within span_tolerance_s, which only absorbs the last
  window's end, measured on each stage's own decode); a video without speech takes the audio stage's windows,
  which must tile [0, its duration) (contiguous from 0, equal full windows, the end within span_tolerance_s);
- keys: per frame, CLIP and scene-graph frame_idx lists equal the frames' and their PTS equal the frame PTS;
  per video, the CLIP/scene-graph frame keys equal the frames stage's and the audio segment keys equal the
  segments; keys unique; prev_text is the text of the preceding ASR segment(s), dropped rows or not;
- counts: videos ok in every upstream ledger == videos with rows; segments per video == ASR segments (or
  windows), less those ingest dropped for want of frames (recorded in its ledger note); per video, frames rows ==
  frames `videos.n_frames`, ASR segments == asr `videos.n_segments`, one CLIP and one scene-graph row per frame;
- dataset: its rows are exactly the rows of the shards its metadata lists as ingested, each once (a
  listed shard whose rows table is empty has none), and per row the stored frames, CLIP and scene-graph frame_idx
  lists are identical (as many images and CLIP embeddings as frames).
Exits 1 listing violations as `video_id segment_idx: what`, 0 when clean, 2 on usage errors.
`verify_shard` is also ingest's gate before it commits a shard to the dataset.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .join import JoinParams, min_tail, frames_of_span, join_video, no_audio_stream, plan_segments, video_duration
from .schema import FLAG_NEAREST, FLAG_NO_AUDIO_STREAM, FLAG_NO_FRAMES, TABLE, dict_value, flags_of

PTS_MATCH_S = 1e-6     # the same frame's PTS as carried by two stages (copied floats)
DROPPED_NOTE = "dropped_no_frames="
HEAVY_COLUMNS = frozenset({"jpeg", "embedding"})  # upstream columns no check reads: left unread (the bulk of the bytes)


@dataclass(frozen=True)
class Violation:
    video_id: str
    segment_idx: int | None
    what: str

    def __str__(self) -> str:
        where = self.video_id if self.segment_idx is None else f"{self.video_id} {self.segment_idx}"
        return f"{where}: {self.what}"


@dataclass
class Tolerances:
    frame_tolerance_s: float = 0.001
    nearest_frame_tolerance_s: float = 2.0
    span_tolerance_s: float = 0.05
    prev_segments: int = 1

    @classmethod
    def from_config(cls, cfg: Any) -> "Tolerances":
        get = (lambda k: cfg[k]) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
        return cls(**{k: type(v)(get(k)) for k, v in cls().__dict__.items()})


def _close(a: Iterable[float], b: Iterable[float], eps: float = PTS_MATCH_S) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= eps for x, y in zip(a, b))


def check_row(row: dict, tol: Tolerances) -> list[str]:
    """Problems of one joined row (plain dict with ROW_SCHEMA columns; `frames` and `clip` may be replaced by
    their lengths, n_jpeg and n_clip)."""
    out: list[str] = []
    start, end = float(row["start"]), float(row["end"])
    fidx = [int(x) for x in row.get("frame_idx") or []]
    fpts = [float(x) for x in row.get("frame_pts") or []]
    flags = flags_of(row)
    n_jpeg = row["n_jpeg"] if "n_jpeg" in row else len(row.get("frames") or [])
    if not (len(fpts) == len(fidx) == n_jpeg):
        out.append(f"frame columns disagree: {len(fidx)} frame_idx, {len(fpts)} pts, {n_jpeg} images")
    if not end >= start:
        out.append(f"span [{start:.3f}, {end:.3f}) is empty or reversed")
    if FLAG_NO_FRAMES in flags:
        if fidx:
            out.append("flagged no_frames but has frames")
    elif FLAG_NEAREST in flags:
        dist = min((start - p if p < start else max(0.0, p - end)) for p in fpts) if fpts else math.inf
        if len(fpts) != 1 or dist > tol.nearest_frame_tolerance_s + 1e-9:
            out.append(f"nearest frame {fpts} not within {tol.nearest_frame_tolerance_s}s of "
                       f"[{start:.3f}, {end:.3f})")
    elif not fidx:
        out.append("no frames and no flag")
    else:
        bad = [(i, p) for i, p in zip(fidx, fpts)
               if not (start - tol.frame_tolerance_s <= p <= end + tol.frame_tolerance_s)]
        if bad:
            out.append(f"frames outside [{start:.3f}, {end:.3f}): " + ", ".join(f"#{i}@{p:.3f}" for i, p in bad[:5]))
    clip_idx = [int(x) for x in row.get("clip_frame_idx") or []]
    if clip_idx != fidx:
        out.append(f"clip frame_idx {clip_idx[:8]} != frames' {fidx[:8]}")
    elif not _close(row.get("clip_pts") or [], fpts):
        out.append("clip pts != frame pts")
    n_clip = row["n_clip"] if "n_clip" in row else (None if row.get("clip") is None else len(row["clip"]))
    if n_clip is not None and n_clip != len(clip_idx):
        out.append(f"{n_clip} clip embeddings for {len(clip_idx)} frames")
    scenes = row.get("scene_graphs") or []
    scene_idx = [int(s["frame_idx"]) for s in scenes]
    if scene_idx != fidx:
        out.append(f"scene graph frame_idx {scene_idx[:8]} != frames' {fidx[:8]}")
    elif not _close([s["pts"] for s in scenes], fpts):
        out.append("scene graph pts != frame pts")
    if FLAG_NO_AUDIO_STREAM in flags:       # a video without an audio stream: visual-only rows
        if row.get("has_audio"):
            out.append("flagged no_audio_stream but has audio")
    elif not row.get("has_audio"):
        out.append("no audio row for this span")
    else:
        a0, a1 = float(row["audio_start"]), float(row["audio_end"])
        if abs(a0 - start) > tol.span_tolerance_s or abs(a1 - end) > tol.span_tolerance_s \
                or (row.get("is_speech") and (a0 != start or a1 != end)):
            out.append(f"audio span [{a0:.3f}, {a1:.3f}) != segment span [{start:.3f}, {end:.3f})")
    return out


def check_video(video_id: str, rows: list[dict], tol: Tolerances, expected: list[int] | None = None,
                dropped: Iterable[int] = (), segments: list[dict] | None = None) -> list[Violation]:
    """Row checks plus the video-level ones: unique keys, expected segment set, prev_text.

    `segments` (the planned segments, `plan_segments`) is where the expected prev_text comes from; without it,
    only from the rows themselves, which is unsound once a row was dropped (then not checked).
    """
    out: list[Violation] = []
    rows = sorted(rows, key=lambda r: int(r["segment_idx"]))
    seen: set[int] = set()
    for r in rows:
        idx = int(r["segment_idx"])
        if r["video_id"] != video_id:
            out.append(Violation(video_id, idx, f"row carries video_id {r['video_id']!r}"))
        if idx in seen:
            out.append(Violation(video_id, idx, "duplicate key"))
        seen.add(idx)
        out.extend(Violation(video_id, idx, what) for what in check_row(r, tol))
    dropped = set(dropped)
    if expected is not None:
        want = set(expected) - dropped
        for idx in sorted(want - seen):
            out.append(Violation(video_id, idx, "segment has no row"))
        for idx in sorted(seen - set(expected)):
            out.append(Violation(video_id, idx, "row for a segment the ASR/windows do not have"))
    if tol.prev_segments > 0:
        if segments is not None:
            speech = [(int(s["segment_idx"]), s["text"] or "") for s in segments if s["is_speech"]]
        elif not dropped:
            speech = [(int(r["segment_idx"]), r["text"] or "") for r in rows if r.get("is_speech")]
        else:
            speech = None
        pos = {idx: n for n, (idx, _) in enumerate(speech or [])}
        for r in rows:
            n = pos.get(int(r["segment_idx"]))
            if not r.get("is_speech") or n is None:   # rows the segments lack are named above
                continue
            want_prev = " ".join(t for _, t in speech[max(0, n - tol.prev_segments):n] if t)
            if (r.get("prev_text") or "") != want_prev:
                out.append(Violation(video_id, int(r["segment_idx"]), "prev_text is not the preceding text"))
    return out


def check_frames(video_id: str, rows: list[dict], inputs: dict[str, dict[str, list[dict]]],
                 params: JoinParams) -> list[Violation]:
    """Each row holds every frame of its span and no other: the join rule (`frames_of_span`: PTS within the
    tolerance, else the nearest frame) re-applied to the frames stage's table and the planned span."""
    out: list[Violation] = []
    frames = sorted(inputs.get("frames", {}).get("frames", []), key=lambda f: (float(f["pts"]), int(f["frame_idx"])))
    pts = [float(f["pts"]) for f in frames]
    plan = {s["segment_idx"]: s for s in plan_segments(inputs, params)}
    for r in rows:
        idx = int(r["segment_idx"])
        seg = plan.get(idx)
        if seg is None:
            continue                     # check_video names rows for segments the plan lacks
        start, end = float(r["start"]), float(r["end"])
        if (start, end) != (seg["start"], seg["end"]):
            out.append(Violation(video_id, idx, f"span [{start:.3f}, {end:.3f}) != the segment's "
                                                f"[{seg['start']:.3f}, {seg['end']:.3f})"))
        chosen, flag = frames_of_span(frames, pts, seg["start"], seg["end"], params)
        want = [int(f["frame_idx"]) for f in chosen]
        got = [int(x) for x in r.get("frame_idx") or []]
        if got != want:
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            if missing or extra:
                what = (f"frames missing {missing[:8]}, extra {extra[:8]} (the frames stage's frames of the span: "
                        f"{want[:8]})")
            else:
                what = f"frame_idx {got[:8]} != the span's {want[:8]} (duplicates or not in PTS order)"
            out.append(Violation(video_id, idx, what))
            continue
        if not _close(r.get("frame_pts") or [], [f["pts"] for f in chosen]):
            out.append(Violation(video_id, idx, "frame pts != the frames stage's"))
        have = flags_of(r) & {FLAG_NEAREST, FLAG_NO_FRAMES}
        if have != ({flag} if flag else set()):
            out.append(Violation(video_id, idx, f"frame flags {sorted(have)} != {[flag] if flag else []}"))
        if (FLAG_NO_AUDIO_STREAM in flags_of(r)) != no_audio_stream(inputs):
            out.append(Violation(video_id, idx, "flag no_audio_stream disagrees with the audio stage's videos table"))
    return out


def check_counts(video_id: str, inputs: dict[str, dict[str, list[dict]]]) -> list[Violation]:
    """Row counts against the stages' own per-video counts: frames rows == frames `videos.n_frames`, ASR
    segments == asr `videos.n_segments`, one CLIP and one scene-graph row per sampled frame (a video whose
    ledger records a failure in any of them is not checked: it has no rows)."""
    out: list[Violation] = []
    frames = inputs.get("frames", {}).get("frames", [])
    n = len(frames)
    if len({int(f["frame_idx"]) for f in frames}) != n:
        out.append(Violation(video_id, None, "frames: duplicate frame_idx"))
    n_segments = len(inputs.get("asr", {}).get("segments", []))
    for stage, table, field, have in (("frames", "frames", "n_frames", n),
                                      ("asr", "segments", "n_segments", n_segments)):
        meta = inputs.get(stage, {}).get("videos", [])
        if len(meta) != 1:
            out.append(Violation(video_id, None, f"{stage}: {len(meta)} videos rows for this video"))
        elif meta[0].get(field) is not None and int(meta[0][field]) != have:
            out.append(Violation(video_id, None, f"{stage}: {have} {table} rows, videos.{field} says "
                                                 f"{int(meta[0][field])}"))
    for stage in ("clip", "scenegraph"):
        k = len(inputs.get(stage, {}).get(stage, []))
        if k != n:
            out.append(Violation(video_id, None, f"{stage}: {k} rows for {n} sampled frames"))
    return out


def check_windows(video_id: str, inputs: dict[str, dict[str, list[dict]]], params: JoinParams,
                  tol: Tolerances) -> list[Violation]:
    """A video without speech takes the audio stage's windows as its segments: they must tile its duration."""
    if inputs.get("asr", {}).get("segments") or not params.keep_no_speech:
        return []
    audio = sorted(inputs.get("audio", {}).get("audio", []), key=lambda r: int(r["segment_idx"]))
    if not audio:
        return []          # the join plans windows itself; their missing audio rows are named by the key check
    keys = [int(a["segment_idx"]) for a in audio]
    if keys != list(range(len(keys))):
        return [Violation(video_id, None, f"audio windows keyed {keys[:8]}, not 0..{len(keys) - 1}")]
    out: list[Violation] = []
    sources = sorted({str(a["source"]) for a in audio if a.get("source") not in (None, "window")})
    if sources:
        out.append(Violation(video_id, None, f"audio rows of a video without speech are {sources}, not windows"))
    spans = [(float(a["start"]), float(a["end"])) for a in audio]
    full = spans[0][1] - spans[0][0]
    prev_end = 0.0
    for i, (a, b) in enumerate(spans):
        last = i == len(spans) - 1
        if abs(a - prev_end) > PTS_MATCH_S:
            out.append(Violation(video_id, i, f"audio window starts at {a:.3f}, not at {prev_end:.3f}"))
        elif not last and abs((b - a) - full) > PTS_MATCH_S:
            out.append(Violation(video_id, i, f"audio window is {b - a:.3f}s, window 0 is {full:.3f}s"))
        elif last and len(spans) > 1 and not (min_tail(full) - PTS_MATCH_S <= b - a < full + min_tail(full)):
            out.append(Violation(video_id, i, f"last audio window is {b - a:.3f}s (full windows {full:.3f}s)"))
        prev_end = b
    duration = video_duration(inputs)
    if duration > 0 and abs(spans[-1][1] - duration) > tol.span_tolerance_s:
        out.append(Violation(video_id, len(spans) - 1, f"audio windows end at {spans[-1][1]:.3f}, the video at "
                                                       f"{duration:.3f}"))
    return out


def check_keys(video_id: str, inputs: dict[str, dict[str, list[dict]]], params: JoinParams) -> list[Violation]:
    """Key sets per modality: CLIP and scene graphs cover exactly the frames; audio exactly the segments."""
    out: list[Violation] = []
    frames = {int(f["frame_idx"]) for f in inputs.get("frames", {}).get("frames", [])}
    for stage, table in (("clip", "clip"), ("scenegraph", "scenegraph")):
        keys = [int(r["frame_idx"]) for r in inputs.get(stage, {}).get(table, [])]
        if len(keys) != len(set(keys)):
            out.append(Violation(video_id, None, f"{stage}: duplicate frame_idx"))
        if set(keys) != frames:
            extra, missing = sorted(set(keys) - frames), sorted(frames - set(keys))
            out.append(Violation(video_id, None, f"{stage} frame_idx != frames': extra {extra[:8]}, "
                                                 f"missing {missing[:8]}"))
    segments = {s["segment_idx"] for s in plan_segments(inputs, params)}
    if no_audio_stream(inputs):     # no audio stream: the audio stage has no span rows for it
        segments = set()
    audio = [int(r["segment_idx"]) for r in inputs.get("audio", {}).get("audio", [])]
    if set(audio) != segments or len(audio) != len(set(audio)):
        extra, missing = sorted(set(audio) - segments), sorted(segments - set(audio))
        out.append(Violation(video_id, None, f"audio segment_idx != segments': extra {extra[:8]}, "
                                             f"missing {missing[:8]}"))
    return out


def dropped_of(note: str | None) -> list[int]:
    for part in (note or "").split(";"):
        if part.startswith(DROPPED_NOTE):
            return [int(x) for x in part[len(DROPPED_NOTE):].split(",") if x]
    return []


# --------------------------------------------------------------------------------------------- whole run


def ingest_settings(run_dir: Path) -> Any:
    """The ingest config a run used (`<run_dir>/ingest/config.yaml`), else the defaults."""
    from omegaconf import OmegaConf

    from .stages.ingest import IngestConfig

    base = OmegaConf.structured(IngestConfig)
    path = run_dir / "ingest" / "config.yaml"
    if path.exists():
        stage = OmegaConf.load(path).get("stage") or {}
        base = OmegaConf.merge(base, {k: v for k, v in stage.items() if k in base})
    return base


ROW_BULK = {"frames": "n_jpeg", "clip": "n_clip", "audio": None, "words": None}   # -> only their lengths, if any


def _read_parquet(path: Path, keep=lambda column: True) -> pa.Table:
    """One Parquet file, only the columns `keep` accepts (ParquetFile: a fraction of read_table's per-call cost,
    which dominates on a shard's many small upstream files)."""
    f = pq.ParquetFile(path, memory_map=True)
    return f.read(columns=[c for c in f.schema_arrow.names if keep(c)])


def _rows_without_images(source: Any) -> list[dict]:
    """A shard's rows (its ShardStore, or the rows table as read) without the bulky columns (JPEG bytes, CLIP and
    audio embeddings: as Python lists they would cost more than every check): `n_jpeg`/`n_clip` count them."""
    if isinstance(source, pa.Table):
        t = source
    else:
        t = _read_parquet(source.table_path(TABLE), lambda c: c not in ROW_BULK or ROW_BULK[c])
    for column, count in ROW_BULK.items():
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
    from .engine import UpstreamIncomplete, UpstreamRows
    from .shards import LEDGER, OK, ShardStore
    from .stages.ingest import IngestStage

    where = f"shard-{shard:05d}"
    store = ShardStore(run_dir, "ingest", shard)
    if not store.is_complete():
        return ShardReport([Violation(where, None, "ingest shard not complete")], None, set())
    try:
        up = UpstreamRows(run_dir, shard, IngestStage.upstream, skip_columns=HEAVY_COLUMNS)
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
    from .manifest import load_items

    run_dir = Path(run_dir)
    cfg = ingest_settings(run_dir)
    tol, params = Tolerances.from_config(cfg), JoinParams.from_config(cfg)
    out: list[Violation] = []
    videos: dict[int, list[str]] = defaultdict(list)
    for item in load_items(run_dir):
        videos[item.shard].append(item.video_id)
    all_keys: dict[int, set[tuple[str, int]]] = {}
    for shard in sorted(videos):
        report = verify_shard(run_dir, shard, videos[shard], tol, params)
        out.extend(report.violations)
        if report.keys is not None:
            all_keys[shard] = report.keys
    if check_dataset:
        out.extend(verify_dataset(run_dir, cfg, all_keys, tol))
    return out


def _column_names(ds) -> set[str]:
    return {c.name for c in ds.schema.columns}


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices as [a, b) runs of consecutive rows."""
    out: list[tuple[int, int]] = []
    for i in rows:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _read(ds, column: str, rows: list[int] | None, n: int) -> list:
    """Column values of `rows` (sorted; None: all n rows) as a list, read as contiguous slices (a shard's rows
    are appended together, and slices cost Deep Lake far less than lists of rows)."""
    runs = [(0, n)] if rows is None else _runs(rows)
    out: list = []
    for a, b in runs:
        if b > a:
            out.extend(ds[column][a:b])
    return out


def _image_counts(ds, rows: list[int], frame_counts: list[int]) -> list[int]:
    """Stored JPEGs per row, without decoding: encoded bytes of the rows that have frames (Deep Lake 4.7's
    get_bytes refuses an empty sequence), decoded (nothing to decode) for the rows that have none."""
    out = [0] * len(rows)
    have = [k for k, c in enumerate(frame_counts) if c]
    empty = [k for k, c in enumerate(frame_counts) if not c]
    if have:
        for k, b in zip(have, ds["frames"].get_bytes([rows[k] for k in have])):
            out[k] = len(b)
    if empty:
        for k, imgs in zip(empty, ds["frames"][[rows[k] for k in empty]]):
            out[k] = len(imgs)
    return out


def verify_dataset(run_dir: Path, cfg: Any, shard_keys: dict[int, set[tuple[str, int]]],
                   tol: Tolerances, shards: Iterable[int] | None = None, ds: Any = None) -> list[Violation]:
    """The committed dataset holds exactly the rows of the shards it lists, once each, and they are aligned.

    Keys and shard listing are checked over the whole dataset; the per-row checks over the rows of `shards`
    (None: every row), which is what ingest passes after committing them. `ds`: an open handle with nothing
    uncommitted (ingest's writer: a second handle on the dataset in the writing process is avoided).
    """
    import deeplake
    import numpy as np

    from .stages.ingest import dataset_url

    if ds is None:
        url = dataset_url(cfg, run_dir)
        if not deeplake.exists(url):
            return []
        from .dataset_health import ensure_readable, held
        from .stages.ingest import writer_lock

        with writer_lock(Path(run_dir), lambda m: print(m, file=sys.stderr)):
            # an unreadable head (a disk that filled during a commit) is rolled back to the last good version
            ensure_readable(url, lambda m: print(m, file=sys.stderr))
        ds = held(deeplake.open_read_only(url))
    out: list[Violation] = []
    listed = set(int(s) for s in (ds.metadata["ingested_shards"] if "ingested_shards" in ds.metadata.keys()
                                  else []))
    n = len(ds)
    video_ids, seg_idx, row_shard = (_read(ds, c, None, n) for c in ("video_id", "segment_idx", "shard"))
    row_keys = [(str(v), int(i)) for v, i in zip(video_ids, seg_idx)]
    keys: dict[tuple[str, int], int] = defaultdict(int)
    by_shard: dict[int, set[tuple[str, int]]] = defaultdict(set)
    for key, s in zip(row_keys, row_shard):
        keys[key] += 1
        by_shard[int(s)].add(key)
    wanted = None if shards is None else set(shards)
    rows = None if wanted is None else [i for i in range(n) if int(row_shard[i]) in wanted]
    # over every row (small int lists): rows ingested before the column existed did not keep their CLIP keys
    clip_keys = _read(ds, "clip_frame_idx", None, n) if "clip_frame_idx" in _column_names(ds) else [None] * n
    without_clip_keys = sum(k is None for k in clip_keys)
    cols = {c: _read(ds, c, rows, n) for c in ("start", "end", "frame_idx", "frame_pts", "flags", "audio_start",
                                               "audio_end", "is_speech", "clip", "scene_graphs")}
    index = list(range(n)) if rows is None else rows
    n_jpeg = _image_counts(ds, index, [len(p) for p in cols["frame_pts"]])
    for k, i in enumerate(index):
        key = row_keys[i]
        a0, a1 = float(cols["audio_start"][k]), float(cols["audio_end"][k])
        fpts = [float(x) for x in cols["frame_pts"][k]]
        clip = np.asarray(cols["clip"][k])
        clip_idx = clip_keys[i] if clip_keys[i] is not None else cols["frame_idx"][k]   # counted above
        row = {"start": float(cols["start"][k]), "end": float(cols["end"][k]),
               "frame_idx": [int(x) for x in cols["frame_idx"][k]], "frame_pts": fpts, "n_jpeg": n_jpeg[k],
               "flags": str(cols["flags"][k] or ""), "is_speech": bool(cols["is_speech"][k]),
               "has_audio": not math.isnan(a0), "audio_start": a0, "audio_end": a1,
               "clip_frame_idx": [int(x) for x in clip_idx],
               "clip_pts": fpts,        # not stored: the keys are, and the shard check compared the pts
               "n_clip": clip.shape[0] if clip.ndim == 2 and clip.size else 0,
               "scene_graphs": list((dict_value(cols["scene_graphs"][k]) or {}).get("frames") or [])}
        for what in check_row(row, tol):
            out.append(Violation(key[0], key[1], f"dataset: {what}"))
    if without_clip_keys:
        out.append(Violation("dataset", None, f"{without_clip_keys} rows have no clip_frame_idx (ingested before "
                                              f"the column existed): re-ingest to check their CLIP keys"))
    for key, count in keys.items():
        if count > 1:
            out.append(Violation(key[0], key[1], f"dataset: {count} copies"))
    # A listed shard may have no rows when its rows table is empty (e.g. every video of it failed upstream).
    unlisted = set(by_shard) - listed
    rowless = {s for s in listed - set(by_shard) if shard_keys.get(s) != set()}
    if unlisted or rowless:
        out.append(Violation("dataset", None, f"metadata lists shards {sorted(listed)}, rows come from "
                                              f"{sorted(by_shard)}"))
    for shard in sorted(listed):
        want = shard_keys.get(shard)
        if want is not None and by_shard.get(shard, set()) != want:
            missing, extra = want - by_shard.get(shard, set()), by_shard.get(shard, set()) - want
            out.append(Violation("dataset", None, f"shard {shard}: {len(missing)} rows missing, {len(extra)} "
                                                  f"extra vs its rows.parquet"))
    return out


def cli(overrides: list[str]) -> int:
    """`python -m pipeline verify run_dir=<dir> [dataset=true|false] [max_listed=N] [content=true [sample=N]
    [seed=S] [frames=N]]` (content: `pipeline.verify_content`)."""
    from .errors import ConfigError

    args = dict(o.split("=", 1) for o in overrides if "=" in o)
    unknown = sorted(set(args) - {"run_dir", "dataset", "max_listed", "content", "sample", "seed", "frames"}) + \
        [o for o in overrides if "=" not in o]
    if unknown or "run_dir" not in args or args.get("content", "false").lower() not in ("true", "false") or \
            not all(args.get(k, "0").isdigit() for k in ("sample", "seed", "frames")):
        raise ConfigError("usage: python -m pipeline verify run_dir=<dir> [dataset=true|false] [max_listed=N] "
                          "[content=true [sample=N] [seed=S] [frames=N]]")
    run_dir = Path(args["run_dir"])
    if not (run_dir / "manifest.parquet").exists():
        raise ConfigError(f"not a run dir (no manifest.parquet): {run_dir}")
    violations = verify_run(run_dir, check_dataset=args.get("dataset", "true").lower() != "false")
    if args.get("content", "false").lower() == "true":
        from .verify_content import verify_content

        violations += verify_content(run_dir, sample=int(args.get("sample", 32)), seed=int(args.get("seed", 0)),
                                     frames_per_row=int(args.get("frames", 2)))
    limit = int(args.get("max_listed", 50))
    for v in violations[:limit]:
        print(v)
    if len(violations) > limit:
        print(f"... and {len(violations) - limit} more")
    print(f"verify {run_dir}: {len(violations)} violation(s)", file=sys.stderr)
    return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    from .cli import command_main

    return command_main(cli, argv)


if __name__ == "__main__":
    from .dataset_health import exit_skipping_native_teardown

    exit_skipping_native_teardown(main())
