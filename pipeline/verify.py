"""Alignment verifier: `python -m pipeline verify run_dir=<dir> [dataset=true|false] [max_listed=50]`.

Checks every joined row (the ingest shards' `rows` tables, and the Deep Lake dataset when it exists):
- frames: every frame PTS inside [start - frame_tolerance_s, end + frame_tolerance_s], or the row is flagged
  "nearest_frame" (one frame, within nearest_frame_tolerance_s of the span) or "no_frames" (none);
- audio: the audio row's span equals the segment span (within span_tolerance_s, which only absorbs the last
  window's end, measured on each stage's own decode);
- keys: per frame, CLIP and scene-graph frame_idx lists equal the frames' and their PTS equal the frame PTS;
  per video, the CLIP/scene-graph frame keys equal the frames stage's and the audio segment keys equal the
  segments; keys unique; prev_text is the text of the preceding segment(s);
- counts: videos ok in every upstream ledger == videos with rows; segments per video == ASR segments (or
  windows), less those ingest dropped for want of frames (recorded in its ledger note);
- dataset: its rows are exactly the rows of the shards its metadata lists as ingested, each once (a
  listed shard whose rows table is empty has none).
Exits 1 listing violations as `video_id segment_idx: what`, 0 when clean, 2 on usage errors.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow.compute as pc

from .join import JoinParams, join_video, plan_segments
from .schema import FLAG_NEAREST, FLAG_NO_FRAMES, TABLE, flags_of

PTS_MATCH_S = 1e-6     # the same frame's PTS as carried by two stages (copied floats)
DROPPED_NOTE = "dropped_no_frames="


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
    """Problems of one joined row (plain dict with ROW_SCHEMA columns; `frames` may be replaced by n_jpeg)."""
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
    clip = row.get("clip")
    if clip is not None and len(clip) != len(clip_idx):
        out.append(f"{len(clip)} clip embeddings for {len(clip_idx)} frames")
    scenes = row.get("scene_graphs") or []
    scene_idx = [int(s["frame_idx"]) for s in scenes]
    if scene_idx != fidx:
        out.append(f"scene graph frame_idx {scene_idx[:8]} != frames' {fidx[:8]}")
    elif not _close([s["pts"] for s in scenes], fpts):
        out.append("scene graph pts != frame pts")
    if not row.get("has_audio"):
        out.append("no audio row for this span")
    else:
        a0, a1 = float(row["audio_start"]), float(row["audio_end"])
        if abs(a0 - start) > tol.span_tolerance_s or abs(a1 - end) > tol.span_tolerance_s \
                or (row.get("is_speech") and (a0 != start or a1 != end)):
            out.append(f"audio span [{a0:.3f}, {a1:.3f}) != segment span [{start:.3f}, {end:.3f})")
    return out


def check_video(video_id: str, rows: list[dict], tol: Tolerances, expected: list[int] | None = None,
                dropped: Iterable[int] = ()) -> list[Violation]:
    """Row checks plus the video-level ones: unique keys, expected segment set, prev_text."""
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
    if not dropped and tol.prev_segments > 0:
        speech = [r for r in rows if r.get("is_speech")]
        for n, r in enumerate(speech):
            want_prev = " ".join(p["text"] for p in speech[max(0, n - tol.prev_segments):n] if p["text"])
            if (r.get("prev_text") or "") != want_prev:
                out.append(Violation(video_id, int(r["segment_idx"]), "prev_text is not the preceding text"))
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


def _rows_without_images(store) -> list[dict]:
    import pyarrow.parquet as pq

    path = store.table_path(TABLE)
    schema = pq.read_schema(path)
    t = pq.read_table(path, columns=[c for c in schema.names if c != "frames"])
    n_jpeg = pq.read_table(path, columns=["frames"]).column("frames")
    t = t.append_column("n_jpeg", pc.list_value_length(n_jpeg).fill_null(0))
    return t.to_pylist()


def verify_run(run_dir: str | Path, check_dataset: bool = True) -> list[Violation]:
    from .engine import UpstreamIncomplete, UpstreamRows
    from .manifest import load_items
    from .shards import OK, ShardStore
    from .stages.ingest import IngestStage

    run_dir = Path(run_dir)
    cfg = ingest_settings(run_dir)
    tol, params = Tolerances.from_config(cfg), JoinParams.from_config(cfg)
    out: list[Violation] = []
    items = load_items(run_dir)
    shards = sorted({i.shard for i in items})
    all_keys: dict[int, set[tuple[str, int]]] = {}
    for shard in shards:
        store = ShardStore(run_dir, "ingest", shard)
        if not store.is_complete():
            out.append(Violation(f"shard-{shard:05d}", None, "ingest shard not complete"))
            continue
        try:
            up = UpstreamRows(run_dir, shard, IngestStage.upstream)
        except UpstreamIncomplete as exc:
            out.append(Violation(f"shard-{shard:05d}", None, str(exc)))
            continue
        ledger = {r["video_id"]: r for r in store.read_ledger()}
        rows_by_video: dict[str, list[dict]] = defaultdict(list)
        if store.table_path(TABLE).exists():
            for r in _rows_without_images(store):
                rows_by_video[r["video_id"]].append(r)
        all_keys[shard] = {(v, int(r["segment_idx"])) for v, rs in rows_by_video.items() for r in rs}
        shard_videos = sorted({i.video_id for i in items if i.shard == shard})
        for vid in shard_videos:
            ok_upstream = up.upstream_problem(vid) is None
            rows = rows_by_video.pop(vid, [])
            if not ok_upstream:
                if rows:
                    out.append(Violation(vid, None, f"has rows but upstream: {up.upstream_problem(vid)}"))
                continue
            inputs = up.rows_for(vid)
            expected = [s["segment_idx"] for s in plan_segments(inputs, params)]
            entry = ledger.get(vid)
            out.extend(check_keys(vid, inputs, params))
            if expected and not rows:
                why = f"ingest {entry['status']}: {entry['reason']}" if entry else "no ingest ledger row"
                out.append(Violation(vid, None, f"ok in every upstream stage but has no rows ({why[:200]})"))
                # name the rows that kept it out: the same join, checked here
                joined, dropped = join_video(vid, inputs, params, shard, {})
                out.extend(Violation(v.video_id, v.segment_idx, f"not ingested: {v.what}")
                           for v in check_video(vid, joined, tol, expected, dropped) if v.segment_idx is not None)
            else:
                dropped = dropped_of(entry["note"]) if entry and entry["status"] == OK else []
                out.extend(check_video(vid, rows, tol, expected, dropped))
        for vid in sorted(rows_by_video):
            out.append(Violation(vid, None, f"rows in shard {shard} for a video the manifest puts elsewhere"))
    if check_dataset:
        out.extend(verify_dataset(run_dir, cfg, all_keys, tol))
    return out


def verify_dataset(run_dir: Path, cfg: Any, shard_keys: dict[int, set[tuple[str, int]]],
                   tol: Tolerances) -> list[Violation]:
    """The committed dataset holds exactly the rows of the shards it lists, once each, and they are aligned."""
    import deeplake

    from .stages.ingest import dataset_url

    url = dataset_url(cfg, run_dir)
    if not deeplake.exists(url):
        return []
    ds = deeplake.open_read_only(url)
    out: list[Violation] = []
    listed = set(int(s) for s in (ds.metadata["ingested_shards"] if "ingested_shards" in ds.metadata.keys()
                                  else []))
    n = len(ds)
    cols = {c: ds[c][0:n] if n else [] for c in ("video_id", "segment_idx", "shard", "start", "end",
                                                   "frame_pts", "flags", "audio_start", "audio_end",
                                                   "is_speech")}
    keys: dict[tuple[str, int], int] = defaultdict(int)
    by_shard: dict[int, set[tuple[str, int]]] = defaultdict(set)
    for i in range(n):
        key = (str(cols["video_id"][i]), int(cols["segment_idx"][i]))
        keys[key] += 1
        by_shard[int(cols["shard"][i])].add(key)
        a0, a1 = float(cols["audio_start"][i]), float(cols["audio_end"][i])
        row = {"start": float(cols["start"][i]), "end": float(cols["end"][i]),
               "frame_pts": list(cols["frame_pts"][i]), "frame_idx": list(range(len(cols["frame_pts"][i]))),
               "n_jpeg": len(cols["frame_pts"][i]), "flags": str(cols["flags"][i]),
               "is_speech": bool(cols["is_speech"][i]),
               "has_audio": not math.isnan(a0), "audio_start": a0, "audio_end": a1}
        row["clip_frame_idx"], row["clip_pts"] = row["frame_idx"], row["frame_pts"]
        row["scene_graphs"] = [{"frame_idx": k, "pts": p} for k, p in zip(row["frame_idx"], row["frame_pts"])]
        for what in check_row(row, tol):
            out.append(Violation(key[0], key[1], f"dataset: {what}"))
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
    """`python -m pipeline verify run_dir=<dir> [dataset=true|false] [max_listed=N]`."""
    from .errors import ConfigError

    args = dict(o.split("=", 1) for o in overrides if "=" in o)
    unknown = sorted(set(args) - {"run_dir", "dataset", "max_listed"}) + [o for o in overrides if "=" not in o]
    if unknown or "run_dir" not in args:
        raise ConfigError("usage: python -m pipeline verify run_dir=<dir> [dataset=true|false] [max_listed=N]")
    run_dir = Path(args["run_dir"])
    if not (run_dir / "manifest.parquet").exists():
        raise ConfigError(f"not a run dir (no manifest.parquet): {run_dir}")
    violations = verify_run(run_dir, check_dataset=args.get("dataset", "true").lower() != "false")
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
    sys.exit(main())
