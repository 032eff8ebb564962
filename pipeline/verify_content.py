"""Content check: `python -m pipeline verify run_dir=<dir> content=true [sample=32] [seed=0] [frames=2]`.

The alignment verifier (`pipeline.verify`) compares the numbers the stages wrote with each other; a timeline
shifted the same way in every stage (audio decoded 2 s early, frames stamped with another frame's time) passes
it. This check looks at the content itself, through paths the stages do not use:

- frames: for a sample of `sample` dataset rows (0: all), up to `frames` of each row's frames are decoded again by
  the ffmpeg CLI (timestamps kept with -copyts, the first frame at or after the stored PTS picked by timestamp
  in a filter, so edit lists, MPEG-TS offsets and pre-roll are ffmpeg's own reading of the file), resized to the
  stored size and compared with the stored JPEG on means of 8x8 blocks (JPEG and colour-conversion noise
  averages out there, a different moment of the video does not): a mean absolute difference over
  `FRAME_TOLERANCE` (0..255 levels) is a violation naming the row, the frame and the difference;
- audio: the same rows' audio spans are decoded again by the ffmpeg CLI on the container timeline (timestamps
  kept, gaps filled and the start aligned to time 0 by `aresample`'s timestamp compensation), cut and padded as
  the audio stage cuts them and embedded by the run's own audio model; a relative L2 difference from the stored
  embedding over `AUDIO_TOLERANCE` is a violation (audio that was decoded at the wrong time embeds differently);
- every row: the dataset's `text`, `prev_text`, audio embedding and `scene_text` equal what the stage tables
  give for its key (ASR segments, the audio stage's rows, the scene graphs of the row's frames).

Returns `pipeline.verify.Violation`s; `verify` prints them with its own and exits 1 when there are any.
"""
from __future__ import annotations

import io
import logging
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .verify.checks import Violation

logger = logging.getLogger(__name__)

FRAME_TOLERANCE = 3.0       # mean |stored JPEG - ffmpeg's decode| over 8x8 block means, 0..255 levels
BLOCK = 8
AUDIO_TOLERANCE = 0.02      # ||stored - recomputed|| / ||recomputed|| of the audio embedding
PRE_SEEK_S = 5.0            # the ffmpeg CLI seeks this far before a frame (to a keyframe), then decodes forward
PTS_SLACK_S = 5e-4          # "at or after the stored PTS" allows this much float rounding


def _lavfi_number(x: float) -> str:
    return f"{x:.6f}"


def ffmpeg_frame(path: str | Path, pts: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """The frame whose PTS is `pts` (container time, seconds) as HxWx3 uint8 RGB, decoded by the ffmpeg CLI; resized
    to `size` (width, height) when given. Raises RuntimeError when ffmpeg outputs no frame there."""
    from PIL import Image

    start = max(0.0, pts - PRE_SEEK_S)
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-copyts", "-seek_timestamp", "1", "-ss", _lavfi_number(start),
           "-noaccurate_seek", "-i", str(path), "-map", "0:V:0",
           "-vf", f"select='gte(t\\,{_lavfi_number(pts - PTS_SLACK_S)})'", "-frames:v", "1",
           "-f", "image2pipe", "-c:v", "png", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"ffmpeg decodes no frame at {pts:.4f} s of {path}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
    image = Image.open(io.BytesIO(proc.stdout)).convert("RGB")
    if size and image.size != tuple(size):
        image = image.resize(tuple(size), Image.BICUBIC)
    return np.asarray(image)


def ffmpeg_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """The first audio stream as mono float32 on the container timeline (sample 0 = time 0), decoded by the ffmpeg
    CLI: timestamps kept, the start padded or trimmed to 0 and gaps filled with silence by aresample."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-copyts", "-i", str(path), "-map", "0:a:0",
           "-af", f"aresample={sample_rate}:async=1:min_hard_comp=0.001:first_pts=0", "-ac", "1",
           "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg decodes no audio from {path}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def block_difference(a: np.ndarray, b: np.ndarray, block: int = BLOCK) -> float:
    """Mean absolute difference of the BLOCKxBLOCK means of two equally sized RGB images (0..255 levels)."""
    h, w = (min(a.shape[0], b.shape[0]) // block) * block, (min(a.shape[1], b.shape[1]) // block) * block
    if h == 0 or w == 0:
        return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())

    def means(x: np.ndarray) -> np.ndarray:
        return x[:h, :w].astype(np.float32).reshape(h // block, block, w // block, block, -1).mean(axis=(1, 3))

    return float(np.abs(means(a) - means(b)).mean())


# --------------------------------------------------------------------------------------------- run inputs


def _stage_config(run_dir: Path, stage: str) -> Any:
    from omegaconf import OmegaConf

    path = run_dir / stage / "config.yaml"
    return OmegaConf.load(path) if path.exists() else None


def _tables(run_dir: Path, stage: str, table: str, columns: list[str] | None = None) -> list[dict]:
    """Every shard's rows of one stage table (shards that have it)."""
    from .manifest import load_items
    from .shards import ShardStore

    rows: list[dict] = []
    for shard in sorted({i.shard for i in load_items(run_dir)}):
        t = ShardStore(run_dir, stage, shard).read_table(table)
        if t is not None:
            rows.extend((t.select(columns) if columns else t).to_pylist())
    return rows


def _open_dataset(run_dir: Path):
    from .dataset import exists, open_read_only, repair
    from .dataset.layout import dataset_url
    from .stages.ingest_config import ingest_settings

    url = dataset_url(ingest_settings(run_dir), run_dir)
    if not exists(url):
        return None
    # an unreadable head (of any shard group) is rolled back to its last good version, under its writer's lock
    repair(run_dir, url, logger.warning)
    return open_read_only(url)      # one dataset, or every shard group's as one


def _column(ds, name: str, n: int) -> list:
    return list(ds[name][0:n]) if n else []


def _text(x: Any) -> str:
    return "" if x is None else str(x)


# --------------------------------------------------------------------------------------------------- checks


def check_tables(ds, run_dir: Path, prev_segments: int) -> list[Violation]:
    """Every dataset row's text, prev_text, audio embedding and scene_text against the stage tables."""
    n = len(ds)
    vids = [str(v) for v in _column(ds, "video_id", n)]
    segs = [int(s) for s in _column(ds, "segment_idx", n)]
    texts, prevs = _column(ds, "text", n), _column(ds, "prev_text", n)
    speech = _column(ds, "is_speech", n)
    audio, scene_text, frame_idx = _column(ds, "audio", n), _column(ds, "scene_text", n), _column(ds, "frame_idx", n)

    segments: dict[str, dict[int, str]] = defaultdict(dict)
    for r in _tables(run_dir, "asr", "segments", ["video_id", "segment_idx", "text"]):
        segments[r["video_id"]][int(r["segment_idx"])] = _text(r["text"]).strip()
    embeddings = {(r["video_id"], int(r["segment_idx"])): r["embedding"]
                  for r in _tables(run_dir, "audio", "audio", ["video_id", "segment_idx", "embedding"])}
    scenes = {(r["video_id"], int(r["frame_idx"])): _text(r.get("text"))
              for r in _tables(run_dir, "scenegraph", "scenegraph", ["video_id", "frame_idx", "text"])}

    out: list[Violation] = []
    for i in range(n):
        vid, idx = vids[i], segs[i]
        by_idx = segments.get(vid, {})
        if bool(speech[i]):
            if idx not in by_idx:
                out.append(Violation(vid, idx, "speech row without an ASR segment of its key"))
                continue
            want_text = by_idx[idx]
            order = sorted(by_idx)
            pos = order.index(idx)
            want_prev = " ".join(t for t in (by_idx[k] for k in order[max(0, pos - prev_segments):pos]) if t) \
                if prev_segments > 0 else ""
        else:
            want_text = want_prev = ""
        if _text(texts[i]).strip() != want_text:
            out.append(Violation(vid, idx, f"text {_text(texts[i])[:40]!r} is not the ASR segment's "
                                           f"{want_text[:40]!r}"))
        if _text(prevs[i]).strip() != want_prev.strip():
            out.append(Violation(vid, idx, f"prev_text {_text(prevs[i])[:40]!r} is not the preceding ASR text "
                                           f"{want_prev[:40]!r}"))
        stored = np.asarray(audio[i] if audio[i] is not None else [], np.float16).reshape(-1)
        table = embeddings.get((vid, idx))
        if table is None:
            if stored.size:
                out.append(Violation(vid, idx, "audio embedding with no audio-stage row of its key"))
        elif not np.array_equal(stored, np.asarray(table, np.float16).reshape(-1)):
            out.append(Violation(vid, idx, "audio embedding differs from the audio stage's row of its key"))
        want_scene = "; ".join(t for t in (scenes.get((vid, int(f)), "") for f in (frame_idx[i] if frame_idx[i] is not None else [])) if t)
        if _text(scene_text[i]) != want_scene:
            out.append(Violation(vid, idx, f"scene_text {_text(scene_text[i])[:40]!r} is not the scene graphs of "
                                           f"its frames {want_scene[:40]!r}"))
    return out


def check_frames(ds, rows: list[int], paths: dict[str, str], frames_per_row: int,
                 log: Callable[[str], None]) -> tuple[list[Violation], list[float]]:
    """Sampled rows' stored frames against the ffmpeg CLI's decode at their PTS; also returns every difference."""
    out: list[Violation] = []
    diffs: list[float] = []
    for i in rows:
        vid, idx = str(ds["video_id"][i]), int(ds["segment_idx"][i])
        pts, images, fidx = list(ds["frame_pts"][i]), ds["frames"][i], list(ds["frame_idx"][i])
        if not len(pts):
            continue
        path = paths.get(vid)
        if path is None or not Path(path).exists():
            out.append(Violation(vid, idx, f"media file {path} not found for the content check"))
            continue
        if frames_per_row <= 0:
            break
        picks = sorted(set(np.linspace(0, len(pts) - 1, min(frames_per_row, len(pts))).round().astype(int)))
        for k in picks:
            stored = np.asarray(images[k])
            h, w = stored.shape[:2]
            try:
                ref = ffmpeg_frame(path, float(pts[k]), (w, h))
            except RuntimeError as exc:
                out.append(Violation(vid, idx, f"frame {int(fidx[k])} at {float(pts[k]):.4f}s: {exc}"))
                continue
            diff = block_difference(stored, ref)
            diffs.append(diff)
            if diff > FRAME_TOLERANCE:
                out.append(Violation(vid, idx, f"frame {int(fidx[k])} at {float(pts[k]):.4f}s differs from the "
                                               f"ffmpeg CLI's frame there (mean |diff| {diff:.1f} > "
                                               f"{FRAME_TOLERANCE})"))
    return out, diffs


def check_audio(ds, rows: list[int], paths: dict[str, str], run_dir: Path,
                log: Callable[[str], None]) -> tuple[list[Violation], list[float]]:
    """Sampled rows' audio embeddings against the run's audio model on the ffmpeg CLI's decode of the span."""
    from .stages.audio import SAMPLE_RATE, AudioTagger, Span, cut_span, padded_samples

    cfg = _stage_config(run_dir, "audio")
    if cfg is None:
        return [], []
    stage = cfg.get("stage") or {}
    rows = [i for i in rows if bool(ds["has_audio"][i]) and len(ds["audio"][i])]
    if not rows:
        return [], []
    tagger = AudioTagger(checkpoint=str(stage.get("checkpoint", "")), models=str(cfg.get("models", "real")),
                         cache_dir=str(cfg.get("cache_dir", "")), device="cpu", precision="fp32", top_k=1,
                         max_forward_seconds=float(stage.get("max_forward_seconds", 160.0)))
    min_span_s, pad_multiple_s = float(stage.get("min_span_s", 1.0)), float(stage.get("pad_multiple_s", 1.0))
    decoded: dict[str, np.ndarray] = {}
    out: list[Violation] = []
    diffs: list[float] = []
    for i in rows:
        vid, idx = str(ds["video_id"][i]), int(ds["segment_idx"][i])
        path = paths.get(vid)
        if path is None or not Path(path).exists():
            out.append(Violation(vid, idx, f"media file {path} not found for the content check"))
            continue
        if vid not in decoded:
            try:
                decoded[vid] = ffmpeg_audio(path, SAMPLE_RATE)
            except RuntimeError as exc:
                out.append(Violation(vid, idx, str(exc)))
                decoded[vid] = np.zeros(0, np.float32)
                continue
        span = Span(idx, float(ds["audio_start"][i]), float(ds["audio_end"][i]), "")
        wave = cut_span(decoded[vid], span, padded_samples(span, min_span_s, pad_multiple_s))
        emb, _ = tagger._forward(wave[None])
        ref = emb[0].astype(np.float16).astype(np.float32)
        stored = np.asarray(ds["audio"][i], np.float32)
        diff = float(np.linalg.norm(stored - ref) / max(np.linalg.norm(ref), 1e-12))
        diffs.append(diff)
        if diff > AUDIO_TOLERANCE:
            out.append(Violation(vid, idx, f"audio embedding of [{span.start:.3f}, {span.end:.3f}) differs from the "
                                           f"run's model on the ffmpeg CLI's decode of that span (relative "
                                           f"{diff:.3f} > {AUDIO_TOLERANCE})"))
    return out, diffs


def verify_content(run_dir: str | Path, sample: int = 32, seed: int = 0, frames_per_row: int = 2,
                   audio: bool = True, log: Callable[[str], None] | None = None,
                   stats: dict | None = None) -> list[Violation]:
    """Every content check over the run's dataset; `sample` rows (0: all) get the re-decode checks."""
    from .stages.ingest_config import ingest_settings

    log = log or logger.info
    run_dir = Path(run_dir)
    ds = _open_dataset(run_dir)
    if ds is None:
        return [Violation("-", None, "content check: the run has no dataset (run stage=ingest first)")]
    n = len(ds)
    settings = ingest_settings(run_dir)
    out = check_tables(ds, run_dir, int(settings.get("prev_segments", 1)))
    paths = {r["video_id"]: r.get("path") for r in _tables(run_dir, "download", "videos")}
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(n, size=min(n, sample), replace=False).tolist()) if sample and n > sample \
        else list(range(n))
    frame_v, frame_diffs = check_frames(ds, rows, paths, frames_per_row, log)
    out += frame_v
    audio_v, audio_diffs = check_audio(ds, rows, paths, run_dir, log) if audio else ([], [])
    out += audio_v
    log(f"content: {n} rows against the stage tables; {len(rows)} sampled rows: {len(frame_diffs)} frames "
        f"re-decoded (mean |diff| max {max(frame_diffs, default=0):.2f}), {len(audio_diffs)} audio spans "
        f"re-embedded (relative diff max {max(audio_diffs, default=0):.4f})")
    if stats is not None:
        stats.update(rows=n, sampled=len(rows), frame_diffs=frame_diffs, audio_diffs=audio_diffs)
    return out
