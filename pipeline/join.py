"""Keyed join of one video's stage outputs into rows of `pipeline.schema.ROW_SCHEMA` (one per segment).

Every pairing is by explicit keys, never by list order:
- segments: the ASR segments (video_id, segment_idx); a video without speech gets, when `keep_no_speech` is on,
  the audio stage's windows as that stage wrote them (its rows' exact spans: the window count at the tail depends
  on the length of its own decode, which the ASR duration need not match), marked is_speech=False; only when the
  audio stage has no row for the video are `window_s` windows planned over the ASR duration (the audio stage's
  rule; such rows have no audio and the verifier refuses them, unless the audio stage records that the video has
  no audio stream at all: then they are visual-only rows, has_audio false, flag "no_audio_stream");
- frames -> segment by PTS: a frame belongs to a segment when start - frame_tolerance_s <= pts < end
  (a frame within the tolerance of a boundary may belong to both neighbours); a segment with no frame inside
  gets the nearest frame within `nearest_frame_tolerance_s` (flag "nearest_frame"), else none (flag
  "no_frames"; the row is kept or dropped per `keep_no_frames`);
- every other modality by its key (`pipeline.modalities`: its `attach`): CLIP and scene graphs by
  (video_id, frame_idx), audio by (video_id, segment_idx);
- prev_text: the texts of the `prev_segments` speech segments directly before this one (by segment_idx),
  never the segment's own text;
- content_id: the download stage's content identity of the video, on every row ("" when it has none).
Whether the joined modalities actually agree (spans, PTS, frame sets) is the verifier's job (`pipeline.verify`).
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from typing import Any

from . import modalities
from .schema import FLAG_NEAREST, FLAG_NO_AUDIO, FLAG_NO_AUDIO_STREAM, FLAG_NO_CLIP, FLAG_NO_FRAMES

MIN_TAIL_S = 1.0   # as in the audio stage: a shorter remainder after the last full window joins that window


@dataclass
class JoinParams:
    window_s: float = 10.0
    keep_no_speech: bool = True
    frame_tolerance_s: float = 0.001
    nearest_frame_tolerance_s: float = 2.0
    keep_no_frames: bool = True
    prev_segments: int = 1

    @classmethod
    def from_config(cls, cfg: Any) -> "JoinParams":
        return cls(**{k: type(v)(cfg[k] if isinstance(cfg, dict) else getattr(cfg, k))
                      for k, v in cls().__dict__.items()})


def min_tail(window_s: float) -> float:
    """The shortest last window: MIN_TAIL_S, or one window when windows are shorter than that."""
    return min(MIN_TAIL_S, window_s)


def windows(duration: float, window_s: float) -> list[tuple[int, float, float]]:
    """(segment_idx, start, end) windows covering [0, duration), for a video without speech (the audio stage's
    spans and the join's rows both come from here). A remainder after the last full window shorter than
    `min_tail(window_s)` (codec padding) joins that window."""
    if duration <= 0:
        return []
    n = max(1, math.ceil(duration / window_s - 1e-9))
    if n > 1 and duration - (n - 1) * window_s < min_tail(window_s) - 1e-9:   # (1e-9: a full window in floats)
        n -= 1
    return [(i, i * window_s, duration if i == n - 1 else (i + 1) * window_s) for i in range(n)]


def no_audio_stream(inputs: dict[str, dict[str, list[dict]]]) -> bool:
    """The audio stage recorded that this video has no audio stream (its `videos` table; runs made before the
    table existed have none, and every video counts as having audio)."""
    rows = inputs.get("audio", {}).get("videos", [])
    return bool(rows) and rows[0].get("has_audio") is False


def video_duration(inputs: dict[str, dict[str, list[dict]]]) -> float:
    """The decoded-audio duration (what ASR and audio windows are measured on), else the container's."""
    for stage in ("asr", "download", "frames"):
        rows = inputs.get(stage, {}).get("videos", [])
        if rows and rows[0].get("duration") is not None:
            return float(rows[0]["duration"])
    return 0.0


def plan_segments(inputs: dict[str, dict[str, list[dict]]], params: JoinParams) -> list[dict]:
    """The spans of a video's rows: its ASR segments, or windows when it has none."""
    segments = sorted(inputs.get("asr", {}).get("segments", []), key=lambda s: int(s["segment_idx"]))
    if segments:
        return [{"segment_idx": int(s["segment_idx"]), "start": float(s["start"]), "end": float(s["end"]),
                 "is_speech": True, "text": s.get("text") or "", "words": s.get("words") or []} for s in segments]
    if not params.keep_no_speech:
        return []
    audio = sorted(inputs.get("audio", {}).get("audio", []), key=lambda r: int(r["segment_idx"]))
    spans = ([(int(r["segment_idx"]), float(r["start"]), float(r["end"])) for r in audio] if audio
             else windows(video_duration(inputs), params.window_s))
    return [{"segment_idx": i, "start": a, "end": b, "is_speech": False, "text": "", "words": []}
            for i, a, b in spans]


def frames_of_span(frames: list[dict], pts: list[float], start: float, end: float,
                   params: JoinParams) -> tuple[list[dict], str | None]:
    """Frames (sorted by pts) inside [start - tol, end), or the nearest within tolerance, and the flag."""
    lo = bisect.bisect_left(pts, start - params.frame_tolerance_s)
    hi = bisect.bisect_left(pts, end)
    if hi > lo:
        return frames[lo:hi], None
    best, dist = None, math.inf
    for k in (lo - 1, lo):                       # the frames just before and just after the span
        if 0 <= k < len(frames):
            d = start - pts[k] if pts[k] < start else pts[k] - end
            if d < dist:
                best, dist = frames[k], d
    if best is not None and dist <= params.nearest_frame_tolerance_s:
        return [best], FLAG_NEAREST
    return [], FLAG_NO_FRAMES


def _embedding(value: Any):
    """An embedding cell as a float16 vector: list<halffloat>/list<float> cells, or binary holding fp16."""
    import numpy as np

    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return np.frombuffer(value, dtype=np.float16)
    return np.asarray(value, dtype=np.float16)


@dataclass
class Span:
    """What a modality's `attach` sees of one row: the video, the planned segment, the span's frames (the frames
    stage's rows, PTS order), the video's upstream rows, and its own rows (all of the video's, `rows`, and those
    keyed to this span, `keyed`: per frame a list, in the frames' order, of the frames that have one; per
    segment the row or None; per video the video's row or None)."""
    video_id: str
    segment: dict
    frames: list[dict]
    inputs: dict[str, dict[str, list[dict]]]
    params: JoinParams
    rows: list[dict]
    keyed: Any
    no_audio_stream: bool = False


def _index(mod: "modalities.Modality", rows: list[dict]) -> dict[int, dict] | None:
    column = modalities.KEY_COLUMN[mod.key]
    return None if column is None else {int(r[column]): r for r in rows}


def _keyed(mod: "modalities.Modality", index: dict[int, dict] | None, rows: list[dict], seg: dict,
           chosen: list[dict]) -> Any:
    if mod.key == modalities.FRAME:
        return [index[int(f["frame_idx"])] for f in chosen if int(f["frame_idx"]) in index]
    if mod.key == modalities.SEGMENT:
        return index.get(seg["segment_idx"])
    return rows[0] if rows else None


def attach_clip(span: Span) -> tuple[dict, list[str]]:
    """CLIP by (video_id, frame_idx): one embedding per frame of the span that has one."""
    clips = span.keyed
    models = sorted({str(r.get("model")) for r in span.rows if r.get("model")})
    return ({"clip": [_embedding(c.get("embedding")) for c in clips],
             "clip_frame_idx": [int(c["frame_idx"]) for c in clips],
             "clip_pts": [float(c["pts"]) for c in clips], "clip_model": ",".join(models)},
            [FLAG_NO_CLIP] if len(clips) < len(span.frames) else [])


def attach_audio(span: Span) -> tuple[dict, list[str]]:
    """Audio by (video_id, segment_idx): the audio stage's row of exactly this span."""
    audio = span.keyed
    flags = [] if audio is not None else [FLAG_NO_AUDIO_STREAM if span.no_audio_stream else FLAG_NO_AUDIO]
    return ({"audio": _embedding(audio.get("embedding")) if audio else [],
             "has_audio": audio is not None,
             "audio_start": float(audio["start"]) if audio else None,
             "audio_end": float(audio["end"]) if audio else None,
             "audio_labels": _audio_labels(audio), "audio_scores": _audio_scores(audio)}, flags)


def attach_scenegraph(span: Span) -> tuple[dict, list[str]]:
    """Scene graphs by (video_id, frame_idx), and their texts joined with "; "."""
    scenes = span.keyed
    return ({"scene_graphs": [{"frame_idx": int(s["frame_idx"]), "pts": float(s["pts"]),
                               "text": s.get("text") or "",
                               "graph": json.dumps({"objects": s.get("objects") or [],
                                                    "relations": s.get("relations") or []}, default=str)}
                              for s in scenes],
             "scene_text": "; ".join(s.get("text") for s in scenes if s.get("text"))}, [])


def join_video(video_id: str, inputs: dict[str, dict[str, list[dict]]], params: JoinParams,
               shard: int, provenance: dict[str, Any]) -> tuple[list[dict], list[int]]:
    """Rows of one video (sorted by segment_idx) and the segment_idx of rows dropped for want of frames.

    The spine (segments, frames, prev_text) is built here; every other modality is attached by its key with its
    own `attach` (`pipeline.modalities`)."""
    frames = sorted(inputs.get("frames", {}).get("frames", []), key=lambda f: (float(f["pts"]), int(f["frame_idx"])))
    pts = [float(f["pts"]) for f in frames]
    experts = []
    for mod in modalities.experts():
        rows = inputs.get(mod.stage, {}).get(mod.table, [])
        experts.append((mod, modalities.resolve(mod.attach), rows, _index(mod, rows)))
    clip_models = sorted({str(r.get("model")) for r in inputs.get("clip", {}).get("clip", []) if r.get("model")})
    silent = no_audio_stream(inputs)
    prov = json.dumps({**provenance, "clip_model": ",".join(clip_models)}, sort_keys=True)
    downloaded = inputs.get("download", {}).get("videos", [])
    content = str(downloaded[0].get("content_id") or "") if downloaded else ""

    segments = plan_segments(inputs, params)
    speech_texts: list[tuple[int, str]] = [(s["segment_idx"], s["text"]) for s in segments if s["is_speech"]]
    speech_pos = {idx: n for n, (idx, _) in enumerate(speech_texts)}
    rows, dropped = [], []
    for seg in segments:
        idx, start, end = seg["segment_idx"], seg["start"], seg["end"]
        flags: list[str] = []
        chosen, flag = frames_of_span(frames, pts, start, end, params)
        if flag:
            flags.append(flag)
        if flag == FLAG_NO_FRAMES and not params.keep_no_frames:
            dropped.append(idx)
            continue
        prev = ""
        if seg["is_speech"] and params.prev_segments > 0:
            n = speech_pos[idx]
            prev = " ".join(t for _, t in speech_texts[max(0, n - params.prev_segments):n] if t)
        row = {
            "video_id": video_id, "segment_idx": idx, "start": start, "end": end, "is_speech": seg["is_speech"],
            "text": seg["text"], "words": seg["words"], "prev_text": prev,
            "frame_idx": [int(f["frame_idx"]) for f in chosen], "frame_pts": [float(f["pts"]) for f in chosen],
            "frame_kind": [str(f.get("kind") or "") for f in chosen],
            "frame_shot": [int(f.get("shot") or 0) for f in chosen],
            "frames": [f.get("jpeg") or b"" for f in chosen],
        }
        for mod, attach, mod_rows, index in experts:
            span = Span(video_id, seg, chosen, inputs, params, mod_rows, _keyed(mod, index, mod_rows, seg, chosen),
                        silent)
            cols, more = attach(span)
            row.update(cols)
            flags.extend(more)
        row.update({"flags": ",".join(flags), "shard": shard, "provenance": prov, "content_id": content})
        rows.append(row)
    return rows, dropped


def _audio_labels(audio: dict | None) -> list[str]:
    if not audio:
        return []
    if audio.get("labels") is not None:
        return [str(x) for x in audio["labels"]]
    return [str(t["label"]) for t in audio.get("tags") or []]


def _audio_scores(audio: dict | None) -> list[float]:
    if not audio:
        return []
    if audio.get("scores") is not None:
        return [float(x) for x in audio["scores"]]
    return [float(t["score"]) for t in audio.get("tags") or []]
