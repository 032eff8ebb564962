"""Hard-cut detection at the cost of one decode.

Cut detection has to look at every frame, so its floor is one full decode of the video stream. This module
stays close to that floor:

- **Planes as decoded, no full-frame colour conversion.** The decoder produces YUV. Each frame's planes are
  read in place and scaled to `detect_width` (nearest pixel; PySceneDetect scales bilinearly to the same size):
  256x144 luma and 128x72 chroma for a 16:9 video, whatever its resolution. Nothing at full resolution is
  converted to RGB.
- **PySceneDetect's content score, computed in numpy.** `ContentDetector(luma_only=True)` scores a frame by
  the mean absolute difference, over the scaled frame, of the HSV "value" channel V = max(R, G, B) of it and
  the frame before. That is not luma: a cut between two shots of equal brightness but different hue changes
  V, not Y (tests/media/counter.mp4 has two such cuts). So the score here is the same quantity: V of the
  scaled planes (BT.601, limited or full range as tagged, chroma repeated 2x2), mean |dV|.
- **Only where it can matter.** V is 1-Lipschitz in each of R, G, B and those are affine in Y, Cb, Cr, so
  `mean|dV| <= sY mean|dY| + sC (1.772 mean|dCb| + 1.402 mean|dCr|)`. Per frame the sums run over the rows
  the scaling samples at full width (a superset of the scaled pixels: still a bound; `cv2.norm` over strided
  views of those rows, or over a copy of them for 10-bit and irregular row patterns; no per-pixel gather).
  A frame whose bound is below the threshold cannot be a cut; for the others (a few per cent of frames) the columns are picked, the bound over the scaled pixels
  checked, then the exact score computed. `exact_scores=True` computes it for every frame (tests, stats).
- **Same decisions as PySceneDetect 0.7.** `ContentCuts` ports `ContentDetector` + its `FlashFilter` (MERGE
  mode, `min_scene_len` in seconds), `AdaptiveCuts` ports `AdaptiveDetector`. tests/test_cuts.py checks the
  scores against PySceneDetect's own statistics and the cuts against `scenedetect.detect()` run directly
  (OpenCV backend, auto-downscale) on the sample media: equal within one frame.
- **Decoding ahead, in place.** A second thread decodes (FFmpeg runs without the GIL) while this one scores
  the frames it handed over; the 8-bit planes are read in place (the sampled rows as strided views of the
  decoder's buffers, no copy). Frames up to `_ONE_THREAD_PIXELS` are decoded by one decoder thread: at 360p
  FFmpeg's frame threading costs ~30 % more CPU for the same frames, and the decoding thread and the scoring
  thread already keep two cores busy; larger frames use FFmpeg's frame threading (`decode_threads` overrides).
  Optionally `skip_loop_filter` (deblocking off) for a cheaper decode; the pixels are then not exact, so that
  mode keeps none of them (see below).
- **One pass.** The sampled frames of the stage's policy (pipeline/stages/frames.py) are gathered during the
  scan: with exact decoding, the after-cut frame of each shot (`offset` s after its first frame, clamped to the
  shot's last frame) and the last shot's midpoint are kept as they are decoded, converted exactly as
  `pipeline.video.decode_at` converts (PyAV rgb24, then `resize_short_side`); the other shots' midpoints,
  known once the scan is past them (and, with `skip_loop_filter`, every sampled frame), are decoded by
  seeking (`decode_at`) in a thread of their own while the scan goes on. Nothing is left for a second pass
  but what a cap or a failure left out.

Times are absolute stream PTS in seconds, snapped onto the probe's frame index (`VideoInfo.frame_pts`).
"""
from __future__ import annotations

import math
import queue
import threading
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import av
import cv2
import numpy as np

from .video import PTS_EPS, VideoError, VideoInfo, decode_at, resize_short_side, set_decode_threads

# Frames kept to look back at, so that a cut decided a few frames late (AdaptiveDetector's window, the flash
# filter) still finds the frame just before it for the capture.
_LOOKBACK = 8
# BT.601 YCbCr -> RGB: the largest coefficient of Cb and of Cr over the three channels (B and R).
_KB, _KR = 1.772, 1.402
# Scaling to detect_width picks the nearest pixel: 3x cheaper than bilinear (PySceneDetect's) on a frame just
# decoded, and at the 2.5x-7.5x reductions of 360p-1080p bilinear is itself little more than a 2-tap sample.
# On the sample media the per-frame scores stay within 1.1 of PySceneDetect's (tests/test_cuts.py).
_RESAMPLE = cv2.INTER_NEAREST


@dataclass
class CutParams:
    detector: str = "content"          # content | adaptive
    threshold: float = 15.0            # content: score threshold
    min_shot_len: float = 0.5          # seconds between cuts (content: flash filter MERGE; adaptive: suppress)
    adaptive_threshold: float = 3.0    # adaptive: score / mean score of the window around it
    min_content_val: float = 15.0      # adaptive: minimum score of a cut
    window_width: int = 2              # adaptive: frames on each side of the scored frame
    detect_width: int = 256            # frames scaled to this width (never upscaled), as PySceneDetect does
    skip_loop_filter: bool = False     # cheaper, inexact decode (no capture then)
    decode_threads: int = 0            # 0 = auto (1 up to _ONE_THREAD_PIXELS, else as -1); 1 = one thread;
                                       # N > 1: frame threading with N; -1: frame threading, FFmpeg's count
    decode_ahead: bool = True          # decode in a second thread while this one scores


@dataclass
class Capture:
    """Which frames to keep during the detection pass: the frame `offset` s after each shot start (clamped
    to the shot) and, with `midpoints`, the last shot's midpoint (the frame shown at (start + end) / 2, end =
    the stream's end: the sampling policy of pipeline/stages/frames.py), resized to `short_side` (None =
    native), at most `max_frames` of them."""
    offset: float = 0.5
    short_side: int | None = None
    max_frames: int = 256
    midpoints: bool = True
    seek: bool = True                # frames the scan cannot keep (the other shots' midpoints; every frame
                                     # without exact decoding): decoded by seeking in a thread during the scan


@dataclass
class Detection:
    cuts: list[float]                   # absolute PTS (s) of the first frame of each new shot
    pts: np.ndarray                     # seconds, every decoded frame (canonical PTS)
    scores: np.ndarray                  # content score per frame (first 0); NaN where only the bound was needed
    bounds: np.ndarray                  # upper bound of each score
    frames: dict[float, np.ndarray] = field(default_factory=dict)   # captured frames by canonical PTS


# ---------------------------------------------------------------------------------------------- scoring

class _Small:
    """One frame reduced for scoring: the rows of its luma (h x W) and chroma planes that the scaled frame
    samples, at full width (the columns are picked only for an exact score), or a scaled V plane directly."""
    __slots__ = ("y", "cb", "cr", "v", "scaled")

    def __init__(self, y=None, cb=None, cr=None, v=None):
        self.y, self.cb, self.cr, self.v = y, cb, cr, v
        self.scaled: tuple | None = None     # (y, cb, cr) scaled, once needed


def _nearest(n: int, size: int) -> np.ndarray | None:
    """The source indices OpenCV's nearest-pixel scaling picks along an axis of n samples scaled to `size`
    (None: all of them)."""
    if n == size:
        return None
    src = np.arange(n, dtype=np.float32).reshape(1, n)
    return cv2.resize(src, (size, 1), interpolation=_RESAMPLE)[0].astype(np.intp)


def _row_slices(n: int, rows: np.ndarray | None, most: int = 8) -> list[slice] | None:
    """`rows` (sorted, of 0..n-1; None: all) as at most `most` strided slices whose union is exactly those
    rows, or None when no such few slices exist."""
    if rows is None:
        return [slice(None)]
    m = len(rows)
    for q in range(1, min(most, m - 1) + 1):
        step = int(rows[q] - rows[0])
        if step > 0 and np.all(rows[q:] - rows[:-q] == step):
            slices = [slice(int(rows[j]), int(rows[-1]) + 1, step) for j in range(q)]
            if np.array_equal(np.sort(np.concatenate([np.arange(n)[sl] for sl in slices])), rows):
                return slices
    return [slice(int(rows[0]), int(rows[0]) + 1)] if m == 1 else None


class _Scorer:
    """Scales planes and computes PySceneDetect's luma-only content score (mean |dV|, V = max(R, G, B)).

    Nearest-pixel scaling samples a subset of rows and columns. Per frame only the sampled rows are kept
    (a row copy, cheap), and the bound sums |d| over them at full width: a sum over a superset of the scaled
    pixels, so still an upper bound of the score, without the per-pixel gather of the columns, which is done
    only for the few frames where that bound reaches the threshold (the same pixels `cv2.resize` would pick):
    there the bound over the scaled pixels is checked first, then the exact score."""

    def __init__(self, frame: av.VideoFrame, detect_width: int):
        fmt = frame.format
        name, c0 = fmt.name, fmt.components[0]
        self.w, self.h = frame.width, frame.height
        if detect_width and self.w > detect_width:       # PySceneDetect's auto-downscale: w / detect_width
            scale = self.w / float(detect_width)
            self.size = (max(1, round(self.w / scale)), max(1, round(self.h / scale)))
        else:
            self.size = (self.w, self.h)
        self.csize = ((self.size[0] + 1) // 2, (self.size[1] + 1) // 2)
        planar = (c0.is_luma and c0.plane == 0 and name.startswith(("yuv", "yuvj", "gray"))
                  and not name.startswith("grayf") and (name.endswith("le") or c0.bits == 8))
        self.gray = planar and name.startswith("gray")
        self.planar = planar and (self.gray or (len(fmt.components) >= 3 and fmt.components[1].plane == 1
                                                and fmt.components[2].plane == 2))
        self.bits = c0.bits
        full = name.startswith("yuvj") or frame.color_range == 2      # 2: AVCOL_RANGE_JPEG
        self.sy = 1.0 if (full or self.gray) else 255.0 / 219.0
        self.sc = 1.0 if full else 255.0 / 224.0
        # Each chroma sample covers at most 4 scaled luma pixels: bound factor for odd sizes.
        self.cover = 4.0 * self.csize[0] * self.csize[1] / float(self.size[0] * self.size[1])
        self.n = float(self.size[0] * self.size[1])
        self.nc = float(self.csize[0] * self.csize[1])
        self.pick: list[tuple[np.ndarray | None, np.ndarray | None]] = []   # (rows, cols) per plane
        # 8-bit planes are read in place: the sampled rows as a few strided views (nearest scaling by a ratio
        # p/q samples q rows in every p), no copy; the frame stays referenced while its views are in use.
        self.strides: list[list[slice]] | None = [] if self.bits == 8 else None
        if self.planar:
            for k, plane in enumerate(frame.planes[:1 if self.gray else 3]):
                size = self.size if k == 0 else self.csize
                self.pick.append((_nearest(plane.height, size[1]), _nearest(plane.width, size[0])))
                if self.strides is not None:
                    strided = _row_slices(plane.height, self.pick[-1][0])
                    self.strides = None if strided is None else self.strides + [strided]

    def _rows(self, plane, k: int) -> np.ndarray:
        """The sampled rows of plane k, full width, 8 bits (a copy); with `strides`, the whole plane in place."""
        h, w = plane.height, plane.width
        rows = self.pick[k][0]
        if self.bits == 8:
            a = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)[:, :w]
            if self.strides is not None:
                return a
            return np.ascontiguousarray(a) if rows is None else a.take(rows, axis=0)
        a16 = np.frombuffer(plane, "<u2").reshape(h, plane.line_size // 2)[:, :w]
        if rows is not None:
            a16 = a16.take(rows, axis=0)
        shift = self.bits - 8       # rounded to 8 bits, as a conversion to 8-bit RGB rounds
        return np.minimum((a16 + (1 << (shift - 1))) >> shift, 255).astype(np.uint8)

    def _cols(self, a: np.ndarray | None, k: int) -> np.ndarray | None:
        """Plane k scaled: the sampled columns of its sampled rows."""
        if a is None:
            return None
        rows, cols = self.pick[k]
        if self.strides is not None and rows is not None:     # a whole plane: pick its rows first
            a = a.take(rows, axis=0)
        return a if cols is None else a[:, cols]

    def _scaled(self, s: _Small) -> tuple:
        if s.scaled is None:
            s.scaled = (self._cols(s.y, 0), self._cols(s.cb, 1), self._cols(s.cr, 2))
        return s.scaled

    def _norms(self, a: tuple, b: tuple, strided: bool = False) -> float:
        """The bound from the L1 norms of the planes' differences (with `strided`, over the sampled rows of
        whole planes, as the views in `strides` give them)."""
        if strided:
            norm, l1, (ya, cba, cra), (yb, cbb, crb) = cv2.norm, cv2.NORM_L1, a, b
            dy = dcb = dcr = 0.0
            for r in self.strides[0]:
                dy += norm(ya[r], yb[r], l1)
            if cba is not None:
                for r in self.strides[1]:
                    dcb += norm(cba[r], cbb[r], l1)
                for r in self.strides[2]:
                    dcr += norm(cra[r], crb[r], l1)
        else:
            dy = cv2.norm(a[0], b[0], cv2.NORM_L1)
            if a[1] is not None:
                dcb, dcr = cv2.norm(a[1], b[1], cv2.NORM_L1), cv2.norm(a[2], b[2], cv2.NORM_L1)
        ub = self.sy * dy / self.n
        if a[1] is not None:
            ub += self.sc * self.cover * (_KB * dcb + _KR * dcr) / self.nc
        return ub * (1.0 + 1e-4) + 1e-3    # float slack: never below the exact value

    def small(self, frame: av.VideoFrame) -> _Small:
        if not self.planar:   # RGB, paletted, packed or big-endian formats: the library's own conversion
            bgr = frame.to_ndarray(format="bgr24")
            if (bgr.shape[1], bgr.shape[0]) != self.size:
                bgr = cv2.resize(bgr, self.size, interpolation=_RESAMPLE)
            return _Small(v=bgr.max(axis=2))
        planes = frame.planes
        y = self._rows(planes[0], 0)
        if self.gray:
            return _Small(y=y)
        return _Small(y=y, cb=self._rows(planes[1], 1), cr=self._rows(planes[2], 2))

    def bound(self, a: _Small, b: _Small) -> float:
        """An upper bound of the score over the sampled rows at full width (exact for converted frames)."""
        if a.v is not None:
            return cv2.norm(a.v, b.v, cv2.NORM_L1) / a.v.size
        return self._norms((a.y, a.cb, a.cr), (b.y, b.cb, b.cr), self.strides is not None)

    def tight(self, a: _Small, b: _Small) -> float:
        """The upper bound over the scaled pixels only (never above `bound`)."""
        if a.v is not None or all(cols is None for _, cols in self.pick):
            return self.bound(a, b)
        return self._norms(self._scaled(a), self._scaled(b))

    def value(self, s: _Small) -> np.ndarray:
        """V = max(R, G, B) of the scaled frame (float32, full-range units, clipped to 0..255)."""
        if s.v is not None:
            return s.v.astype(np.float32)
        sy, scb, scr = self._scaled(s)
        if self.gray or s.cb is None:
            return self.sy * (sy.astype(np.float32) - (0.0 if self.sy == 1.0 else 16.0))
        y = sy.astype(np.float32)
        if self.sy != 1.0:
            y = (y - 16.0) * self.sy
        h, w = y.shape
        cb = np.repeat(np.repeat((scb.astype(np.float32) - 128.0) * self.sc, 2, 0), 2, 1)[:h, :w]
        cr = np.repeat(np.repeat((scr.astype(np.float32) - 128.0) * self.sc, 2, 0), 2, 1)[:h, :w]
        v = np.maximum(np.maximum(y + _KR * cr, y - 0.344136 * cb - 0.714136 * cr), y + _KB * cb)
        return np.clip(v, 0.0, 255.0)

    def exact(self, a: _Small, b: _Small) -> float:
        if a.v is not None:
            return self.bound(a, b)
        if self.gray:
            return self.sy * cv2.norm(self._scaled(a)[0], self._scaled(b)[0], cv2.NORM_L1) / self.n
        return float(np.abs(self.value(a) - self.value(b)).mean(dtype=np.float64))


class _Rec:
    """One decoded frame as the rules see it: time, scaled planes, score bound, exact score once computed."""
    __slots__ = ("t", "small", "bound", "score", "tight")

    def __init__(self, t: float, small: _Small | None, bound: float, score: float | None):
        self.t, self.small, self.bound, self.score = t, small, bound, score
        self.tight = False


class _Scores:
    """The frames seen so far (a short history) with lazily computed exact scores."""

    def __init__(self, scorer: _Scorer, keep: int):
        self.scorer = scorer
        self.recs: deque[_Rec] = deque(maxlen=keep)

    def add(self, t: float, small: _Small) -> _Rec:
        prev = self.recs[-1] if self.recs else None
        if len(self.recs) == self.recs.maxlen:
            self.recs[0].small = None      # leaves the history: free its planes
        rec = _Rec(t, small, 0.0 if prev is None else self.scorer.bound(small, prev.small),
                   0.0 if prev is None else None)
        self.recs.append(rec)
        return rec

    def tighten(self, k: int) -> float:
        """The bound of self.recs[k] over the scaled pixels only (computed once; 0 = the oldest frame kept)."""
        rec = self.recs[k]
        if not rec.tight and rec.score is None and k > 0:
            rec.bound = min(rec.bound, self.scorer.tight(rec.small, self.recs[k - 1].small))
            rec.tight = True
        return rec.bound

    def exact(self, k: int) -> float:
        """Exact score of self.recs[k] (0 = the oldest frame kept)."""
        rec = self.recs[k]
        if rec.score is None:
            rec.score = self.scorer.exact(rec.small, self.recs[k - 1].small) if k > 0 else rec.bound
        return rec.score


# ------------------------------------------------------------------------------------------------ rules

class ContentCuts:
    """PySceneDetect 0.7 `ContentDetector` decisions: score >= threshold, then its FlashFilter in MERGE mode
    with `min_shot_len` seconds. Fed every frame in order; returns the cut times decided at that frame."""

    history = 2

    def __init__(self, threshold: float, min_shot_len: float):
        self.threshold, self.min_len = threshold, min_shot_len
        self.last_above: float | None = None
        self.merge_enabled = self.merge_triggered = False
        self.merge_start = 0.0

    def __call__(self, scores: _Scores) -> list[float]:
        rec = scores.recs[-1]
        k = len(scores.recs) - 1
        above = (rec.bound >= self.threshold and scores.tighten(k) >= self.threshold
                 and scores.exact(k) >= self.threshold)
        return self.step(rec.t, above)

    def step(self, t: float, above: bool) -> list[float]:
        if self.min_len <= 0:
            return [t] if above else []
        if self.last_above is None:
            self.last_above = t
        met = t - self.last_above >= self.min_len
        if above:
            self.last_above = t
        if self.merge_triggered:
            if met and not above and self.last_above - self.merge_start >= self.min_len:
                self.merge_triggered = False
                return [self.last_above]
            return []
        if not above:
            return []
        if met:
            self.merge_enabled = True
            return [t]
        if self.merge_enabled:
            self.merge_triggered, self.merge_start = True, t
        return []


class AdaptiveCuts:
    """PySceneDetect 0.7 `AdaptiveDetector` decisions: a frame is a cut when its score is at least
    `min_content_val` and `adaptive_threshold` times the mean score of the `window_width` frames on each side,
    and `min_shot_len` seconds have passed since the last cut. Decisions lag `window_width` frames."""

    def __init__(self, adaptive_threshold: float, min_content_val: float, window_width: int, min_shot_len: float):
        if window_width < 1:
            raise ValueError("window_width must be at least 1")
        self.ratio, self.min_val, self.w, self.min_len = adaptive_threshold, min_content_val, window_width, min_shot_len
        self.history = 2 * window_width + 2
        self.seen = 0
        self.last_cut: float | None = None

    def __call__(self, scores: _Scores) -> list[float]:
        if self.last_cut is None:
            self.last_cut = scores.recs[-1].t
        self.seen += 1
        if self.seen < 2 * self.w + 1:
            return []
        n = len(scores.recs)
        first = n - (2 * self.w + 1)                  # the window: recs[first .. n-1], target in the middle
        target_k = first + self.w
        target = scores.recs[target_k]
        if target.bound < self.min_val or scores.tighten(target_k) < self.min_val:   # cannot be a cut
            return []
        score = scores.exact(target_k)
        window = sum(scores.exact(k) for k in range(first, n) if k != target_k) / (2.0 * self.w)
        if abs(window) >= 0.00001:
            ratio = min(score / window, 255.0)
        else:
            ratio = 255.0 if score >= self.min_val else 0.0
        if ratio >= self.ratio and score >= self.min_val and target.t - self.last_cut >= self.min_len:
            self.last_cut = target.t
            return [target.t]
        return []


def make_rule(params: CutParams) -> ContentCuts | AdaptiveCuts:
    if params.detector == "content":
        return ContentCuts(params.threshold, params.min_shot_len)
    if params.detector == "adaptive":
        return AdaptiveCuts(params.adaptive_threshold, params.min_content_val, params.window_width,
                            params.min_shot_len)
    raise ValueError(f"unknown detector {params.detector!r} (content | adaptive)")


# ---------------------------------------------------------------------------------------------- capture

class _SeekingDecoder:
    """Decodes sampled frames the scan cannot keep (shot midpoints known only once the scan is past them; every
    frame when the scan's decode is not exact) by seeking (`decode_at`, PyAV, one decoder thread), in a thread
    of its own while the scan goes on, so that they cost the scan's critical path nothing. A frame it fails to
    decode is simply left out (the stage decodes it later and reports any failure)."""

    def __init__(self, info: VideoInfo, short_side: int | None):
        self.info, self.short_side = info, short_side
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.frames: dict[float, np.ndarray] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cut-scan-seek", daemon=True)
        self.thread.start()

    def want(self, t: float) -> None:
        self.todo.put(t)

    def _run(self) -> None:
        while not self.stop.is_set():
            t = self.todo.get()
            if t is None:
                return
            try:
                (pts, image), = decode_at(self.info, [t], short_side=self.short_side, backend="pyav", threads=1)
            except Exception:  # noqa: BLE001 - decoded again by the stage, which reports the failure
                continue
            if abs(pts - t) < PTS_EPS:
                self.frames[t] = image

    def close(self, cancel: bool = False) -> dict[float, np.ndarray]:
        if cancel:
            self.stop.set()
        self.todo.put(None)
        self.thread.join()
        return self.frames


class _Capturer:
    """The sampled frames of the stage's policy, gathered during the scan.

    With exact decoding (`exact`), frames are kept as they are decoded: the after-cut frame of each shot (the
    frame `offset` s after the shot's first frame or, for a shot that ends before that, its last frame, from a
    short look-back of recent frames) and the last shot's midpoint (for the shot under way, the frame at the
    middle between its start and the stream's end is held, one reference, and kept when the stream ends with
    no further cut). The other shots' midpoints are known only once the scan is past them: holding every frame
    that could still be one costs the scan more (memory traffic) than a seeking decode, so with
    `seek` each is decoded by seeking in a thread of its own as soon as its shot ends
    (`_SeekingDecoder`). Without exact decoding (`skip_loop_filter`) nothing decoded by the scan is kept: every
    one of those frames goes to the seeking thread instead, when the scan reaches it. Any frame kept is exact
    for its PTS; one missed (look-back too short, cap reached) is simply decoded later by the stage."""

    def __init__(self, info: VideoInfo, capture: Capture, lookback: int, exact: bool = True):
        self.pts, self.cap, self.exact = info.frame_pts, capture, exact
        self.end = info.end_pts
        self.recent: deque[tuple[int, av.VideoFrame]] = deque(maxlen=lookback)
        self.frames: dict[float, np.ndarray] = {}
        self.want = self._target(0)       # shot 0 starts at the first frame of the index
        self.shot_t = info.first_pts      # start of the shot under way
        self.mid = self._index_at((self.shot_t + self.end) / 2) if capture.midpoints else -1
        self.mid_frame: av.VideoFrame | None = None
        self.seeker = _SeekingDecoder(info, capture.short_side) if capture.seek else None
        self.sought: set[float] = set()

    def _index_at(self, t: float) -> int:
        """As VideoInfo.index_at: the frame shown at time t."""
        i = int(np.searchsorted(self.pts, t + PTS_EPS, side="right")) - 1
        return min(max(i, 0), len(self.pts) - 1)

    def _target(self, start: int) -> int:
        t = self.pts[start] + self.cap.offset
        return max(start, int(np.searchsorted(self.pts, t + 1e-6, side="right")) - 1)

    def _keep(self, idx: int, frame: av.VideoFrame | None) -> None:
        if len(self.frames) + len(self.sought) >= self.cap.max_frames:
            return
        t = float(self.pts[idx])
        if frame is not None and self.exact:
            image = frame.to_ndarray(format="rgb24")     # exactly as pipeline.video.decode_at converts
            self.frames[t] = resize_short_side(image, self.cap.short_side)
        else:
            self._seek(t)

    def _seek(self, t: float) -> None:
        if self.seeker is not None and t not in self.frames and t not in self.sought:
            self.seeker.want(t)
            self.sought.add(t)

    def _recent(self, idx: int) -> av.VideoFrame | None:
        return next((f for i, f in self.recent if i == idx), None)

    def frame(self, idx: int, frame: av.VideoFrame, cuts: list[float]) -> None:
        """Called for every decoded frame (its index in the PTS index) with the cuts decided at it."""
        if self.exact:
            self.recent.append((idx, frame))
            if idx == self.mid:
                self.mid_frame = frame
        for c in cuts:
            start = int(np.searchsorted(self.pts, c - 1e-6))
            if self.want >= 0 and start > 0:      # the previous shot ended before its after-cut frame
                self._keep(start - 1, self._recent(start - 1))
            self.want = self._target(start)
            if self.want < idx:                   # decided late: the target may already be behind us
                self._keep(self.want, self._recent(self.want))
                self.want = -1
            if self.cap.midpoints:                # a new shot under way: its midpoint should it be the last
                if start > 0 and len(self.frames) + len(self.sought) < self.cap.max_frames:
                    # the shot that ended: its midpoint, by seeking
                    self._seek(float(self.pts[self._index_at((self.shot_t + float(self.pts[start])) / 2)]))
                self.shot_t = float(self.pts[start])
                self.mid = self._index_at((self.shot_t + self.end) / 2)
                self.mid_frame = self._recent(self.mid)
        if self.want == idx:
            self._keep(idx, frame)
            self.want = -1

    def finish(self) -> None:
        """The stream ended: the last shot's midpoint, and the frames the seeking thread decodes."""
        if self.cap.midpoints and self.mid >= 0:
            self._keep(self.mid, self.mid_frame)
            self.mid_frame = None
        if self.seeker is not None:
            for t, image in self.seeker.close().items():
                self.frames.setdefault(t, image)
            self.seeker = None

    def cancel(self) -> None:
        if self.seeker is not None:
            self.seeker.close(cancel=True)
            self.seeker = None


# ------------------------------------------------------------------------------------------------ decode

# Up to this many pixels a frame, one decoder thread (frame threading costs ~30 % more CPU at 360p: its
# per-frame context copies and hand-offs), decoding ahead of the scoring thread; above, FFmpeg's own choice.
_ONE_THREAD_PIXELS = 1024 * 576
# Decoded frames handed to the scoring thread at once, and batches waiting at most (bounds the frames held).
_BATCH_BYTES = 4 << 20
_QUEUED = 3


def _frames_ahead(container, stream, batch: int) -> Iterator[av.VideoFrame]:
    """The frames of `stream`, decoded in a second thread (the decoder runs without the GIL) `batch` at a
    time, at most `_QUEUED` batches ahead of the caller. Decoder errors are raised here."""
    q: queue.Queue = queue.Queue(maxsize=_QUEUED)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        frames = container.decode(stream)
        try:
            out = []
            for frame in frames:
                out.append(frame)
                if len(out) >= batch:
                    if not put(out):
                        return
                    out = []
            if put(out):
                put(None)
        except BaseException as exc:   # noqa: BLE001 - handed to the caller, raised there
            put(exc)
        finally:
            frames.close()

    worker = threading.Thread(target=produce, name="cut-scan-decode", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        stop.set()
        worker.join()


# ------------------------------------------------------------------------------------------------ detect

def detect(info: VideoInfo, params: CutParams, capture: Capture | None = None,
           exact_scores: bool = False) -> Detection:
    """Decode every frame of the video stream once, score it and decide cuts; with `capture`, gather the
    sampled frames on the way (`_Capturer`: kept from the scan's own exact decode, or decoded by seeking in a
    thread of their own; with `skip_loop_filter` the scan's pixels are not exact and every one is sought).
    Raises VideoError('corrupt') when the stream stops decoding."""
    rule = make_rule(params)
    frame_pts = info.frame_pts
    pts_list = frame_pts.tolist()
    last = len(frame_pts) - 1
    tb = float(info.time_base)
    capturer = None
    if capture is not None and (capture.seek or not params.skip_loop_filter):
        capturer = _Capturer(info, capture, lookback=max(_LOOKBACK, params.window_width + 3),
                             exact=not params.skip_loop_filter)
    scores: _Scores | None = None
    times: list[float] = []
    recs: list[_Rec] = []
    cuts: list[float] = []
    try:
        with av.open(info.path) as container:
            stream = container.streams[info.stream_index]
            threads = params.decode_threads
            if threads == 0:
                threads = 1 if info.width * info.height <= _ONE_THREAD_PIXELS else -1
            set_decode_threads(stream, threads)
            if params.skip_loop_filter:
                stream.codec_context.options = {"skip_loop_filter": "all"}
            if params.decode_ahead:
                frame_bytes = max(1, info.width * info.height * 3 // 2)
                decoded = _frames_ahead(container, stream, max(1, min(16, _BATCH_BYTES // frame_bytes)))
            else:
                decoded = container.decode(stream)
            try:
                for frame in decoded:
                    if frame.pts is None:
                        continue
                    if scores is None:
                        scores = _Scores(_Scorer(frame, params.detect_width), keep=max(2, rule.history))
                    # Snap onto the probe's PTS index: the same float for the same frame everywhere.
                    idx = min(max(bisect_right(pts_list, frame.pts * tb + 1e-6) - 1, 0), last)
                    t = pts_list[idx]
                    rec = scores.add(t, scores.scorer.small(frame))
                    if exact_scores:
                        scores.exact(len(scores.recs) - 1)
                    times.append(t)
                    recs.append(rec)
                    decided = rule(scores)
                    if capturer is not None:
                        capturer.frame(idx, frame, decided)
                    cuts += decided
            finally:
                decoded.close()     # stops the decoding thread before the container closes
            if capturer is not None:
                capturer.finish()
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt", f"decode failed after {len(times)} frames: {exc}") from exc
    finally:
        if capturer is not None:
            capturer.cancel()
    first = float(frame_pts[0]) if len(frame_pts) else 0.0
    return Detection(cuts=sorted({c for c in cuts if c > first + 1e-6}), pts=np.asarray(times),
                     scores=np.array([math.nan if r.score is None else r.score for r in recs]),
                     bounds=np.array([r.bound for r in recs]), frames=capturer.frames if capturer else {})
