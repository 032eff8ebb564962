"""frames: cut-aware frame sampling.

Frames are taken where an editor put information. Hard cuts are PySceneDetect's ContentDetector cuts on a
downscaled stream (on brightness only by default: a fade through black makes hue and saturation jump while
brightness changes gradually, so soft transitions are not cuts and a video made only of fades is low-cut),
found in one decode by `pipeline.cuts`, which also keeps each shot's after-cut frame on the way; each
shot then gives one frame `after_cut_offset` seconds after its start (clamped inside the shot; shot 0 starts
at the first frame) and one at its midpoint. A video with fewer than `min_cuts_per_minute` cuts is flagged
low-cut: it is skipped (`drop_low_cut=true`, status "skipped", reason "low_cut: ...") or sampled uniformly at
`fallback_fps` (note "low_cut_fallback"). At most `max_frames_per_video` frames are kept: all after-cut
frames and evenly spaced midpoints when those fit, else after-cut frames of evenly spaced shots only.

Times (`pts`, `cuts`, `first_pts`) are presentation timestamps of the video stream in seconds on the container
timeline, so they line up with audio timestamps of the same file; a stream delayed by an edit list starts at
its delay, not at 0. `duration` is the span of the video stream. Only the chosen frames are converted to RGB
(the midpoints by a second, seeking decode), resized to `short_side` keeping the aspect ratio, stored as JPEG.
`workers` > 1 processes that many videos at once in a process pool.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from ..cuts import Capture, CutParams, Detection, detect
from ..video import (VideoError, VideoInfo, corrupt_on_decode_error, decode_at, encode_jpeg, iter_small_frames,
                     probe)
from .base import ItemResult, Resources, RunContext, Stage, StageConfig, WorkItem, error_reason

KINDS = ("after_cut", "midpoint", "uniform")


@dataclass
class FramesConfig(StageConfig):
    name: str = "frames"
    resources: Resources = field(default_factory=lambda: Resources(cpus=2, gpus=0, mem_gb=4.0, timeout_min=120))
    detector: str = "content"            # content (ContentDetector) | adaptive (AdaptiveDetector)
    threshold: float = 15.0              # ContentDetector threshold on the content score
    luma_only: bool = True               # score on brightness only: hue/saturation are noise near black (fades)
    adaptive_threshold: float = 3.0      # AdaptiveDetector ratio threshold
    min_content_val: float = 15.0        # AdaptiveDetector floor on the content score
    min_shot_len: float = 0.5            # seconds: no two cuts closer than this
    detect_width: int = 256              # cut detection runs on frames scaled to this width
    after_cut_offset: float = 0.5        # seconds after the shot start of the first frame of a shot
    min_cuts_per_minute: float = 1.0     # below: the video is low-cut
    drop_low_cut: bool = False           # low-cut: skip the video (true) or sample at fallback_fps (false)
    fallback_fps: float = 1.0            # uniform sampling rate of low-cut videos
    max_frames_per_video: int = 256      # cap; after-cut frames are kept before midpoints
    short_side: int = 336                # stored frames: min(H, W) (CLIP ViT-L/14-336 input size); 0 = native
    jpeg_quality: int = 90
    max_pixels: int = 3840 * 2160        # larger videos are refused (too_large)
    decode_backend: str = "pyav"         # pyav | auto (decord, PyAV fallback) | decord
    # Videos at least this tall are scanned for cuts without the decoder's loop filter (cheaper; the sampled
    # frames then all come from the seeking decode that runs beside the scan). 0: always.
    detect_skip_loop_filter_min_height: int = 720
    # Decoder threads of the cut scan (which decodes in a thread of its own while another scores): 0 = auto
    # (1 up to 1024x576 pixels, FFmpeg's frame threading above); 1 = one (the least CPU); N > 1 = frame
    # threading with N; -1 = frame threading with FFmpeg's own thread count.
    detect_decode_threads: int = 0
    workers: int = 1                     # videos processed at once by one task (a process pool when > 1)


@dataclass
class SampledFrame:
    pts: float                # seconds, absolute stream PTS
    kind: str                 # after_cut | midpoint | uniform
    shot: int                 # index of the shot (0 = before the first cut)
    image: np.ndarray         # HxWx3 uint8 RGB


@dataclass
class SampledVideo:
    path: str
    frames: list[SampledFrame]
    cuts: list[float]         # PTS (s) of the first frame of each shot after the first
    duration: float
    first_pts: float
    cuts_per_minute: float
    low_cut: bool
    fallback: bool            # sampled uniformly at fallback_fps because low-cut
    dropped: bool             # low-cut and drop_low_cut: no frames
    seconds_detect: float = 0.0
    seconds_extract: float = 0.0


def make_detector(cfg: FramesConfig):
    from scenedetect import AdaptiveDetector, ContentDetector

    if cfg.detector == "content":
        return ContentDetector(threshold=cfg.threshold, min_scene_len=float(cfg.min_shot_len),
                               luma_only=cfg.luma_only)
    if cfg.detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=float(cfg.min_shot_len),
                                min_content_val=cfg.min_content_val, luma_only=cfg.luma_only)
    raise ValueError(f"unknown detector {cfg.detector!r} (content | adaptive)")


def cut_params(cfg: FramesConfig, info: VideoInfo) -> CutParams:
    return CutParams(detector=cfg.detector, threshold=cfg.threshold, min_shot_len=float(cfg.min_shot_len),
                     adaptive_threshold=cfg.adaptive_threshold, min_content_val=cfg.min_content_val,
                     detect_width=cfg.detect_width, decode_threads=int(cfg.detect_decode_threads),
                     skip_loop_filter=info.height >= int(cfg.detect_skip_loop_filter_min_height))


def detect_cuts(info: VideoInfo, cfg: FramesConfig) -> list[float]:
    """Cut times (absolute PTS seconds, each the first frame of a new shot), as PySceneDetect finds them.

    Brightness-only scores (`luma_only`, the default) come from `pipeline.cuts` (one decode, the score
    computed on the decoder's own planes); otherwise PySceneDetect's detector is fed frames scaled to
    `detect_width`. Results are snapped onto the exact frame PTS list.
    """
    return _detect(info, cfg, capture=False).cuts


def _detect(info: VideoInfo, cfg: FramesConfig, capture: bool) -> Detection:
    if cfg.luma_only:
        keep = Capture(offset=cfg.after_cut_offset, short_side=cfg.short_side or None,
                       max_frames=max(1, cfg.max_frames_per_video)) if capture else None
        return detect(info, cut_params(cfg, info), capture=keep)
    return Detection(cuts=_detect_pyscenedetect(info, cfg), pts=np.empty(0), scores=np.empty(0),
                     bounds=np.empty(0))


def _detect_pyscenedetect(info: VideoInfo, cfg: FramesConfig) -> list[float]:
    """PySceneDetect's own detector fed our decode (hue and saturation too: `luma_only=false`)."""
    from scenedetect import FrameTimecode
    from scenedetect.common import Timecode

    detector = make_detector(cfg)
    rate = Fraction(info.avg_fps).limit_denominator(1001) if info.avg_fps > 0 else Fraction(25)
    tb = info.time_base
    found = []
    timecode = None
    for pts_s, image in iter_small_frames(info, cfg.detect_width):
        timecode = FrameTimecode(Timecode(pts=round(Fraction(pts_s) / tb), time_base=tb), fps=rate)
        found += detector.process_frame(timecode, image)
    if timecode is not None:
        found += detector.post_process(timecode)
    cuts = sorted({float(info.frame_pts[info.index_at(float(c.seconds))]) for c in found})
    return [c for c in cuts if c > info.first_pts + 1e-6]


def plan_times(info: VideoInfo, cuts: list[float], cfg: FramesConfig, uniform: bool) -> list[tuple[float, str, int]]:
    """(frame pts, kind, shot) to extract, PTS-ordered, one per distinct frame, within the cap."""
    bounds = [info.first_pts, *cuts, info.end_pts]
    shot_of = lambda t: int(np.searchsorted(cuts, t + 1e-6, side="right"))  # noqa: E731
    frame = lambda t: float(info.frame_pts[info.index_at(t)])  # noqa: E731
    cap = max(1, cfg.max_frames_per_video)
    if uniform:
        n = max(1, int(math.ceil(info.duration * cfg.fallback_fps - 1e-9)))
        times = [info.first_pts + k / cfg.fallback_fps for k in range(n)]
        if len(times) > cap:   # the cap stretches the interval evenly over the whole video
            times = [times[i] for i in np.linspace(0, len(times) - 1, cap).round().astype(int)]
        planned = {}
        for t in times:
            planned.setdefault(frame(t), ("uniform", shot_of(frame(t))))
        return sorted((t, k, s) for t, (k, s) in planned.items())
    after, mid = {}, {}
    for shot, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        # A shot shorter than the offset gives its own last frame (pts < end), not the next shot's first.
        last_in_shot = float(info.frame_pts[info.index_before(end)])
        after.setdefault(min(frame(start + cfg.after_cut_offset), last_in_shot), shot)
        t_mid = frame((start + end) / 2)
        if t_mid not in after:
            mid.setdefault(t_mid, shot)
    picked = [(t, "after_cut", s) for t, s in after.items()]
    mids = [(t, "midpoint", s) for t, s in mid.items() if t not in after]
    if len(picked) > cap:      # after-cut frames first; evenly thin them when even those exceed the cap
        picked = [picked[i] for i in np.linspace(0, len(picked) - 1, cap).round().astype(int)]
        mids = []
    elif len(picked) + len(mids) > cap:
        room = cap - len(picked)
        mids = [mids[i] for i in np.linspace(0, len(mids) - 1, room).round().astype(int)] if room else []
    return sorted(picked + mids)


def sample_video(path: str | Path, cfg: FramesConfig | None = None) -> SampledVideo:
    """Detect cuts and decode the sampled frames of one video. Raises VideoError for unusable input."""
    cfg = cfg or FramesConfig()
    t0 = time.perf_counter()
    info = probe(path, max_pixels=cfg.max_pixels)
    with corrupt_on_decode_error("decode failed during cut detection"):   # damage past the probed head
        detection = _detect(info, cfg, capture=True)   # after-cut frames captured on the way
    cuts = detection.cuts
    t1 = time.perf_counter()
    minutes = max(info.duration, 1e-9) / 60.0
    cpm = len(cuts) / minutes
    low_cut = cpm < cfg.min_cuts_per_minute
    result = SampledVideo(path=str(path), frames=[], cuts=cuts, duration=info.duration, first_pts=info.first_pts,
                          cuts_per_minute=cpm, low_cut=low_cut, fallback=low_cut and not cfg.drop_low_cut,
                          dropped=low_cut and cfg.drop_low_cut, seconds_detect=t1 - t0)
    if result.dropped:
        return result
    plan = plan_times(info, cuts, cfg, uniform=result.fallback)
    captured = detection.frames
    decoded = decode_at(info, [t for t, _, _ in plan if t not in captured], short_side=cfg.short_side or None,
                        backend=cfg.decode_backend)
    images = {**captured, **{pts: img for pts, img in decoded}}
    result.frames = [SampledFrame(pts=t, kind=k, shot=s, image=images[t]) for t, k, s in plan]
    result.seconds_extract = time.perf_counter() - t1
    return result


def _media_path(item: WorkItem) -> str | None:
    rows = item.rows("download", "videos")
    return rows[0].get("path") if rows else None


def _sample_item(video_id: str, path: str, cfg: FramesConfig) -> tuple[ItemResult, tuple[float, float, float] | None]:
    """One video's rows (JPEG-encoded frames + the video row) and (duration, detect s, extract s)."""
    try:
        sampled = sample_video(path, cfg)
    except VideoError as exc:
        return ItemResult.failed(video_id, exc.reason), None
    t0 = time.perf_counter()
    frames = []
    for idx, f in enumerate(sampled.frames):
        h, w = f.image.shape[:2]
        frames.append({"video_id": video_id, "frame_idx": idx, "pts": f.pts, "shot": f.shot,
                       "kind": f.kind, "jpeg": encode_jpeg(f.image, cfg.jpeg_quality),
                       "width": w, "height": h})
    video = {"video_id": video_id, "duration": sampled.duration, "n_cuts": len(sampled.cuts),
             "cuts": sampled.cuts, "cuts_per_minute": sampled.cuts_per_minute, "low_cut": sampled.low_cut,
             "fallback": sampled.fallback, "first_pts": sampled.first_pts, "n_frames": len(frames)}
    result = ItemResult(video_id, rows={"frames": frames, "videos": [video]})
    if sampled.dropped:
        result.status = "skipped"
        result.reason = (f"low_cut: {sampled.cuts_per_minute:.2f} cuts/min < "
                         f"min_cuts_per_minute={cfg.min_cuts_per_minute}")
    elif sampled.fallback:
        result.note = "low_cut_fallback"
    result.seconds = time.perf_counter() - t0 + sampled.seconds_detect + sampled.seconds_extract
    return result, (sampled.duration, sampled.seconds_detect, sampled.seconds_extract)


_POOL_CFG: FramesConfig | None = None   # in a pool worker: the stage config, sent once


def _pool_init(cfg: FramesConfig) -> None:
    global _POOL_CFG
    _POOL_CFG = cfg


def _pool_sample(video_id: str, path: str):
    return _sample_item(video_id, path, _POOL_CFG)


def _frames_pool(cfg: FramesConfig, workers: int) -> ProcessPoolExecutor:
    # spawn: no forked decoder threads or other thread state in the workers
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_pool_init,
                               initargs=(cfg,))


class FramesStage(Stage):
    name = "frames"
    Config = FramesConfig
    upstream = {"download": ("videos",)}
    tables = {"frames": ("video_id", "frame_idx"), "videos": ("video_id",)}
    schemas = {
        "frames": pa.schema([("video_id", pa.string()), ("frame_idx", pa.int32()), ("pts", pa.float64()),
                             ("shot", pa.int32()), ("kind", pa.string()), ("jpeg", pa.binary()),
                             ("width", pa.int32()), ("height", pa.int32())]),
        "videos": pa.schema([("video_id", pa.string()), ("duration", pa.float64()), ("n_cuts", pa.int32()),
                             ("cuts", pa.list_(pa.float64())), ("cuts_per_minute", pa.float64()),
                             ("low_cut", pa.bool_()), ("fallback", pa.bool_()), ("first_pts", pa.float64()),
                             ("n_frames", pa.int32())]),
    }

    def __init__(self, cfg: FramesConfig, ctx: RunContext):
        super().__init__(cfg, ctx)
        self._video_seconds = 0.0
        self._busy = {"detect": 0.0, "extract": 0.0}
        self._n = 0

    def process_item(self, item: WorkItem) -> ItemResult:
        path = _media_path(item)
        if not path:
            return ItemResult.failed(item.video_id, "missing: no downloaded media path")
        result, stats = _sample_item(item.video_id, path, self.cfg)
        self._account(stats)
        return result

    def _account(self, stats: tuple[float, float, float] | None) -> None:
        if stats is not None:
            self._n += 1
            self._video_seconds += stats[0]
            self._busy["detect"] += stats[1]
            self._busy["extract"] += stats[2]

    def process(self, items: Iterable[WorkItem]) -> Iterator[ItemResult]:
        """`workers` > 1: that many videos at once in a process pool (one decode is at most a few threads
        busy, so a task with N CPUs keeps them busy with N videos). A video that kills its worker (native crash,
        OOM) breaks the pool: the videos in flight are then re-run one at a time in a fresh worker, and one that
        kills that worker too is recorded failed (crashed); the others go on."""
        if int(self.cfg.workers) <= 1:
            yield from super().process(items)
            return
        workers = int(self.cfg.workers)
        todo = iter(items)
        pool = _frames_pool(self.cfg, workers)
        pending: dict[Future, WorkItem] = {}
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < workers:
                    item = next(todo, None)
                    if item is None:
                        exhausted = True
                    elif not _media_path(item):
                        yield ItemResult.failed(item.video_id, "missing: no downloaded media path")
                    else:
                        pending[pool.submit(_pool_sample, item.video_id, _media_path(item))] = item
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                broken = []
                for fut in done:
                    item = pending.pop(fut)
                    result = self._pool_result(item, fut, broken)
                    if result is not None:
                        yield result
                if broken:     # every other video in this pool is lost with it
                    for fut in list(pending):
                        item = pending.pop(fut)
                        result = self._pool_result(item, fut, broken)
                        if result is not None:
                            yield result
                    pool.shutdown(wait=True, cancel_futures=True)
                    for item in broken:
                        yield self._alone(item)
                    pool = _frames_pool(self.cfg, workers)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _pool_result(self, item: WorkItem, fut: Future, broken: list[WorkItem]) -> ItemResult | None:
        try:
            result, stats = fut.result()
        except BrokenProcessPool:
            broken.append(item)
            return None
        except Exception as exc:  # noqa: BLE001 - one video's failure, not the shard's
            self.ctx.log(f"{item.video_id}: {error_reason(exc)}")
            return ItemResult.failed(item.video_id, error_reason(exc))
        self._account(stats)
        return result

    def _alone(self, item: WorkItem) -> ItemResult:
        pool = _frames_pool(self.cfg, 1)
        try:
            result, stats = pool.submit(_pool_sample, item.video_id, _media_path(item)).result()
        except BrokenProcessPool:
            return ItemResult.failed(item.video_id, "crashed: the worker process died while processing this "
                                                    "item alone (native crash or out of memory)")
        except Exception as exc:  # noqa: BLE001
            return ItemResult.failed(item.video_id, error_reason(exc))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        self._account(stats)
        return result

    def shard_stats(self) -> dict:
        busy = sum(self._busy.values())
        return {"videos": self._n, "video_minutes": self._video_seconds / 60.0,
                "seconds_detect": self._busy["detect"], "seconds_extract": self._busy["extract"],
                "seconds_per_video_minute": busy / (self._video_seconds / 60.0) if self._video_seconds else None}


STAGE = FramesStage
