"""The alignment checks: of one joined row, of one video's rows against its upstream rows, keys and counts.

Per-modality parts come from `pipeline.modalities` (each modality's `check_row` and `check_keys`); the spine
(spans, frames, segments, prev_text, no-speech windows) is checked here. See `pipeline.verify` for the list.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .. import modalities
from ..join import JoinParams, frames_of_span, min_tail, no_audio_stream, plan_segments, video_duration
from ..schema import FLAG_NEAREST, FLAG_NO_AUDIO_STREAM, FLAG_NO_FRAMES, flags_of

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
    """Problems of one joined row (plain dict with the row schema's columns; bulky columns such as `frames` and
    `clip` may be replaced by their lengths, n_jpeg and n_clip): every modality's own row check, in order."""
    return row_checker(tol)(row)


def row_checker(tol: Tolerances) -> Callable[[dict], list[str]]:
    """`check_row` with every modality's check looked up once (for checks of many rows)."""
    checks = [modalities.resolve(mod.check_row) for mod in modalities.all_modalities() if mod.check_row is not None]

    def check(row: dict) -> list[str]:
        return [what for c in checks for what in c(row, tol)]
    return check


def check_frame_row(row: dict, tol: Tolerances) -> list[str]:
    """The span and its frames: frame columns agree, frames inside the span or flagged."""
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
    return out


def check_clip_row(row: dict, tol: Tolerances) -> list[str]:
    """One CLIP embedding per frame, keyed and timed as the frames."""
    out: list[str] = []
    fidx = [int(x) for x in row.get("frame_idx") or []]
    fpts = [float(x) for x in row.get("frame_pts") or []]
    clip_idx = [int(x) for x in row.get("clip_frame_idx") or []]
    if clip_idx != fidx:
        out.append(f"clip frame_idx {clip_idx[:8]} != frames' {fidx[:8]}")
    elif not _close(row.get("clip_pts") or [], fpts):
        out.append("clip pts != frame pts")
    n_clip = row["n_clip"] if "n_clip" in row else (None if row.get("clip") is None else len(row["clip"]))
    if n_clip is not None and n_clip != len(clip_idx):
        out.append(f"{n_clip} clip embeddings for {len(clip_idx)} frames")
    return out


def check_scenegraph_row(row: dict, tol: Tolerances) -> list[str]:
    """One scene graph per frame, keyed and timed as the frames."""
    out: list[str] = []
    fidx = [int(x) for x in row.get("frame_idx") or []]
    fpts = [float(x) for x in row.get("frame_pts") or []]
    scenes = row.get("scene_graphs") or []
    scene_idx = [int(s["frame_idx"]) for s in scenes]
    if scene_idx != fidx:
        out.append(f"scene graph frame_idx {scene_idx[:8]} != frames' {fidx[:8]}")
    elif not _close([s["pts"] for s in scenes], fpts):
        out.append("scene graph pts != frame pts")
    return out


def check_audio_row(row: dict, tol: Tolerances) -> list[str]:
    """The audio row's span is the segment's (a video without an audio stream: visual-only rows)."""
    out: list[str] = []
    start, end = float(row["start"]), float(row["end"])
    flags = flags_of(row)
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
    check_one = row_checker(tol)
    for r in rows:
        idx = int(r["segment_idx"])
        if r["video_id"] != video_id:
            out.append(Violation(video_id, idx, f"row carries video_id {r['video_id']!r}"))
        if idx in seen:
            out.append(Violation(video_id, idx, "duplicate key"))
        seen.add(idx)
        out.extend(Violation(video_id, idx, what) for what in check_one(r))
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
    segments == asr `videos.n_segments`, one row per sampled frame of every frame-keyed modality (CLIP, scene
    graphs; `pipeline.modalities`) (a video whose
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
    for mod in _per_frame():         # one row per sampled frame
        k = len(inputs.get(mod.stage, {}).get(mod.table, []))
        if k != n:
            out.append(Violation(video_id, None, f"{mod.stage}: {k} rows for {n} sampled frames"))
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


def _per_frame() -> list["modalities.Modality"]:
    """Frame-keyed experts with one row per sampled frame."""
    return [m for m in modalities.experts() if m.key == modalities.FRAME and m.one_per_key]


def check_keys(video_id: str, inputs: dict[str, dict[str, list[dict]]], params: JoinParams) -> list[Violation]:
    """Key sets per modality (each modality's `check_keys`; frame-keyed ones by default cover exactly the
    frames): CLIP and scene graphs cover exactly the frames; audio exactly the segments."""
    out: list[Violation] = []
    frames = {int(f["frame_idx"]) for f in inputs.get("frames", {}).get("frames", [])}
    for mod in modalities.experts():
        if mod.check_keys is not None:
            out.extend(modalities.resolve(mod.check_keys)(video_id, inputs, params, mod))
        elif mod.key == modalities.FRAME and mod.one_per_key:
            out.extend(check_frame_keys(video_id, inputs, mod, frames))
    return out


def check_frame_keys(video_id: str, inputs: dict[str, dict[str, list[dict]]], mod: "modalities.Modality",
                     frames: set[int]) -> list[Violation]:
    """A frame-keyed modality has exactly one row per sampled frame."""
    out: list[Violation] = []
    keys = [int(r["frame_idx"]) for r in inputs.get(mod.stage, {}).get(mod.table, [])]
    if len(keys) != len(set(keys)):
        out.append(Violation(video_id, None, f"{mod.stage}: duplicate frame_idx"))
    if set(keys) != frames:
        extra, missing = sorted(set(keys) - frames), sorted(frames - set(keys))
        out.append(Violation(video_id, None, f"{mod.stage} frame_idx != frames': extra {extra[:8]}, "
                                             f"missing {missing[:8]}"))
    return out


def check_audio_keys(video_id: str, inputs: dict[str, dict[str, list[dict]]], params: JoinParams,
                     mod: "modalities.Modality") -> list[Violation]:
    """Audio rows cover exactly the planned segments (none for a video without an audio stream)."""
    out: list[Violation] = []
    segments = {s["segment_idx"] for s in plan_segments(inputs, params)}
    if no_audio_stream(inputs):     # no audio stream: the audio stage has no span rows for it
        segments = set()
    audio = [int(r["segment_idx"]) for r in inputs.get(mod.stage, {}).get(mod.table, [])]
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

