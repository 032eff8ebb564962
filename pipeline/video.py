"""Video probing and PTS-exact frame decoding shared by the stages.

Every time here is a presentation timestamp (PTS) of the video stream in seconds, on the container timeline:
the first frame of a stream whose edit list delays it by 1.075 s has `pts == 1.075`, and audio and video
timestamps of one file are comparable. Frame times always come from the demuxed packet PTS list
(`VideoInfo.frame_pts`), never from `index / avg_fps`, so variable-frame-rate video stays exact.

The index holds exactly the frames the decoder outputs: packets the demuxer marks for discard (the pre-roll of
an MP4 edit list, e.g. a stream copy cut at a non-keyframe) and packets before the first frame the decoder
produces (an MPEG-TS recording that starts mid-GOP) are left out. MPEG-TS (which starts at ~1.4 s), WebM (VP9,
Opus), MKV and MP4 are all indexed on their own container timeline.

Decoding picks frames by their PTS: decord (batch reads) is the fast path for the containers whose index it
reads like ours (MP4/MOV, Matroska); PyAV is the exact path everywhere else and the fallback when decord cannot
open the file or its frame index disagrees with ours. PyAV seeks to the keyframe before each wanted frame (further
back when the demuxer's seek lands after it) and decodes forward; every returned frame carries the PTS the
decoder gave it, and a wanted frame the decoder does not output fails the video (`corrupt`) instead of being
replaced by a neighbour. Both hold at most `DECODE_CHUNK` full-resolution frames at a time and resize each right
after decoding, so a request for hundreds of 4K frames does not hold them all at full resolution.

Public timeline API: `probe(path)` (`.frame_pts`, `.first_pts`), `decode_at(info, times, backend=...)` ->
`[(pts, image)]`, and `pipeline.audio.load_audio(path, sample_rate=...)` for the audio on the same timeline.
"""
from __future__ import annotations

import io
import itertools
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Sequence

import av
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# PTS differences below this are the same frame (float rounding of rational timestamps).
PTS_EPS = 1e-6
# Full-resolution frames held at once while decoding (a 3840x2160 RGB frame is 25 MB).
DECODE_CHUNK = 16
# Containers whose frame index decord builds the way the probe does (its seeks in MPEG-TS land on other frames).
DECORD_FORMATS = ("mov", "mp4", "matroska", "webm")


class VideoError(Exception):
    """A video that cannot be used; `category` is the recorded failure category."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.category}: {self.detail}"[:500]


@dataclass
class VideoInfo:
    path: str
    width: int
    height: int
    codec: str
    stream_index: int
    time_base: Fraction
    frame_pts: np.ndarray        # float64 seconds, sorted, one per frame, absolute stream PTS
    avg_fps: float               # nominal only; never used to compute a time
    has_audio: bool
    container_format: str = ""   # the demuxer's name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "mpegts"
    skipped_packets: int = 0     # packets with no output frame (edit-list pre-roll, before the first keyframe)

    @property
    def n_frames(self) -> int:
        return len(self.frame_pts)

    @property
    def first_pts(self) -> float:
        return float(self.frame_pts[0])

    @property
    def end_pts(self) -> float:
        """End of the last frame: its PTS plus the last frame interval (or 1/avg_fps for a 1-frame video)."""
        if self.n_frames > 1:
            last_dt = float(self.frame_pts[-1] - self.frame_pts[-2])
        else:
            last_dt = 1.0 / self.avg_fps if self.avg_fps > 0 else 0.0
        return float(self.frame_pts[-1]) + last_dt

    @property
    def duration(self) -> float:
        """Span of the video stream in seconds (end_pts - first_pts)."""
        return self.end_pts - self.first_pts

    def index_at(self, t: float) -> int:
        """Index of the frame shown at time t: the last frame with pts <= t (clamped to the stream)."""
        i = int(np.searchsorted(self.frame_pts, t + PTS_EPS, side="right")) - 1
        return min(max(i, 0), self.n_frames - 1)

    def index_before(self, t: float) -> int:
        """Index of the last frame with pts < t, i.e. the last frame of a span ending at t (clamped)."""
        i = int(np.searchsorted(self.frame_pts, t - PTS_EPS, side="right")) - 1
        return min(max(i, 0), self.n_frames - 1)


def _open(path: str | Path) -> av.container.InputContainer:
    p = Path(path)
    if not p.exists():
        raise VideoError("missing", str(p))
    if p.stat().st_size == 0:
        raise VideoError("corrupt", "zero-byte file")
    try:
        return av.open(str(p))
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt", f"cannot open: {exc}") from exc


def _video_stream(container) -> av.video.stream.VideoStream:
    streams = [s for s in container.streams.video
               if not (s.disposition & av.stream.Disposition.attached_pic)]
    if not streams:
        kinds = ",".join(sorted({s.type for s in container.streams})) or "none"
        raise VideoError("no_video_stream", f"streams: {kinds}")
    return streams[0]


def probe(path: str | Path, max_pixels: int | None = None) -> VideoInfo:
    """Open a file, check it is a decodable video within `max_pixels`, and index the PTS of every frame the
    decoder outputs.

    Demuxes the whole video stream (no decoding), leaving out packets the demuxer marks for discard (edit-list
    pre-roll), then decodes from the start up to the first output frame: packets before it (a stream that starts
    mid-GOP) output nothing and are left out too. Raises VideoError with the categories
    missing | corrupt | no_video_stream | unsupported_codec | too_large.
    """
    with _open(path) as container:
        stream = _video_stream(container)
        ctx = stream.codec_context  # None when FFmpeg does not know the codec at all
        if ctx is None or ctx.codec is None or not ctx.codec.is_decoder:
            name = ctx.name if ctx is not None else "unknown"
            raise VideoError("unsupported_codec", f"no decoder for {name!r}")
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if max_pixels and width * height > max_pixels:
            raise VideoError("too_large", f"{width}x{height} > max_pixels={max_pixels}")
        if stream.time_base is None:
            raise VideoError("corrupt", "video stream has no time base")
        pts: list[int] = []
        n_packets = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue            # the flush packet
                n_packets += 1
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:
                    raise VideoError("unsupported_codec", "video packets carry no timestamps")
                if packet.is_discard:
                    continue            # edit-list pre-roll: decoded for reference, never output
                pts.append(ts)
        except av.error.FFmpegError as exc:
            raise VideoError("corrupt", f"demux failed after {n_packets} packets: {exc}") from exc
        if not pts:
            raise VideoError("corrupt", "no video packets")
        # A file cut short with its index at the front demuxes without error up to where the data ends.
        if stream.frames and n_packets < stream.frames - 1:
            raise VideoError("corrupt", f"truncated: {n_packets} of {stream.frames} frames present")
        time_base = Fraction(stream.time_base)
        fmt = container.format.name if container.format else ""
        has_audio = bool(container.streams.audio)
        stream_index, codec = stream.index, ctx.name
        avg_fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    # A file whose index looks fine can still fail to decode (damaged bitstream); and the decoder outputs nothing
    # for packets before the first frame it can reconstruct.
    first = _first_output_pts(str(path), stream_index)
    if first is None:
        raise VideoError("corrupt", "first frame does not decode")
    kept = np.unique(np.asarray([t for t in pts if t >= first], dtype=np.int64))
    if kept.size == 0 or kept[0] != first:
        raise VideoError("corrupt", f"the decoder's first frame (pts {float(first * time_base):.4f}) is not "
                                    f"in the stream's packets")
    return VideoInfo(
        path=str(path), width=width, height=height, codec=codec, stream_index=stream_index,
        time_base=time_base, frame_pts=kept * float(time_base),
        avg_fps=avg_fps, has_audio=has_audio,
        container_format=fmt, skipped_packets=n_packets - int(kept.size))


def _first_output_pts(path: str, stream_index: int) -> int | None:
    """PTS (stream time base) of the first frame the decoder outputs from the start of the file, or None."""
    try:
        with av.open(path) as container:
            stream = container.streams[stream_index]
            for frame in container.decode(stream):
                if frame.pts is not None:
                    return int(frame.pts)
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt", f"first frame does not decode: {exc}") from exc
    return None


@contextmanager
def corrupt_on_decode_error(what: str = "decode failed"):
    """FFmpeg errors raised inside (damaged data mid-file, found only when decoding gets there) become
    VideoError("corrupt", ...): a recorded category, not an unexpected exception."""
    try:
        yield
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt", f"{what}: {exc}") from exc


def resize_short_side(image: np.ndarray, short_side: int | None) -> np.ndarray:
    """Resize so that min(H, W) == short_side keeping the aspect ratio; never upscales."""
    h, w = image.shape[:2]
    if not short_side or min(h, w) <= short_side:
        return image
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC, reducing_gap=2.0))


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_at(info: VideoInfo, times: Sequence[float], short_side: int | None = None,
              backend: str = "auto", threads: int = 0) -> list[tuple[float, np.ndarray]]:
    """Decode the frames shown at `times` (seconds, absolute PTS) as (frame_pts, HxWx3 uint8 RGB).

    Each time maps to the frame whose PTS is the last one <= t; duplicates are decoded once. Returned in PTS
    order, one entry per distinct frame, each with the PTS its decoder gave it. backend: auto (decord where it
    indexes the container like the probe, else or on any decord failure PyAV) | decord (raises where it cannot
    be trusted) | pyav. `threads`: PyAV's decoder threads (0: FFmpeg's frame threading, its own count; 1: one
    thread, the least CPU). A wanted frame that does not decode raises VideoError("corrupt", ...).
    """
    indices = sorted({info.index_at(t) for t in times})
    if not indices:
        return []
    images = None
    if backend in ("auto", "decord"):
        try:
            images = _decode_decord(info, indices, short_side)
        except Exception as exc:  # noqa: BLE001 - decord failures of any kind mean: use PyAV
            if backend == "decord":
                raise
            log.info("decord failed on %s (%s); using PyAV", info.path, exc)
    if images is None:
        images = _decode_pyav(info, indices, short_side, threads)
    if isinstance(images, dict):        # PyAV: keyed by the wanted PTS, with the PTS each frame decoded at
        return [images[k] for k in range(len(indices))]
    return [(float(info.frame_pts[i]), img) for i, img in zip(indices, images)]


def _decode_decord(info: VideoInfo, indices: list[int], short_side: int | None) -> list[np.ndarray]:
    import decord

    if info.container_format and not any(f in info.container_format.split(",") for f in DECORD_FORMATS):
        raise RuntimeError(f"decord does not index {info.container_format} frames like the demuxer")
    if info.skipped_packets:
        raise RuntimeError(f"decord would output {info.skipped_packets} packets the decoder discards")
    reader = decord.VideoReader(info.path, ctx=decord.cpu(0), num_threads=0)
    if len(reader) != info.n_frames:
        raise RuntimeError(f"decord indexes {len(reader)} frames, the demuxer {info.n_frames}")
    # decord's frame i is the packet with the i-th smallest PTS, timed from the stream's start_time (the first
    # frame's PTS; where they differ the check fails and PyAV decodes). Compare absolute times: differences from
    # the first requested frame would hide an index shifted as a whole. The tolerance covers decord's float32.
    ts = reader.get_frame_timestamp(indices)[:, 0].astype(np.float64)
    if np.abs(ts - (info.frame_pts[indices] - info.first_pts)).max() > 2e-3:
        raise RuntimeError("decord timestamps disagree with the demuxed PTS")
    out = []
    for k in range(0, len(indices), DECODE_CHUNK):
        batch = reader.get_batch(indices[k:k + DECODE_CHUNK]).asnumpy()
        out += [resize_short_side(np.ascontiguousarray(image), short_side) for image in batch]
        del batch   # free this chunk before decoding the next
    return out


# Decode forward instead of seeking when the next wanted frame is at most this far ahead.
_SEEK_GAP_S = 2.0
# How far before a wanted frame successive seeks go when the demuxer's seek lands after it (None: the start).
_SEEK_BACK_S = (0.0, 1.0, 4.0, 16.0, None)


def _seek_run(container, stream, info: VideoInfo, target: float) -> tuple[Any, Iterator]:
    """Decoded frames from a keyframe at or before `target`: seek there (further back while the demuxer's seek
    lands after the target or on a frame the decoder cannot start from). Returns (first frame, generator of the
    frames after it); the caller closes the generator while the container is open (a decode generator that
    outlives its container crashes when it is collected)."""
    tb = info.time_base
    run: tuple[Any, Iterator] | None = None
    for back in _SEEK_BACK_S:
        if back is None:
            offset = int(stream.start_time) if stream.start_time is not None else 0
        else:
            offset = int(math.floor(Fraction(target - back) / tb))
        try:
            container.seek(offset, stream=stream, backward=True)
        except av.error.FFmpegError:
            continue
        frames = (f for f in container.decode(stream) if f.pts is not None)
        first = next(frames, None)
        if first is None:
            frames.close()
            continue
        if run is not None:
            run[1].close()
        run = (first, frames)
        if float(first.pts * tb) <= target + PTS_EPS and first.key_frame:
            return run
    if run is None:
        raise VideoError("corrupt", f"no frame decodes at or before {target:.4f} s")
    return run


def set_decode_threads(stream, threads: int) -> None:
    """1: one decoder thread; 0 or -1: FFmpeg's frame threading with its own thread count; N > 1: N threads."""
    if threads == 1:
        stream.codec_context.thread_count = 1
    else:
        stream.thread_type = "AUTO"
        if threads > 1:
            stream.codec_context.thread_count = threads


def _decode_pyav(info: VideoInfo, indices: list[int], short_side: int | None,
                 threads: int = 0) -> dict[int, tuple[float, np.ndarray]]:
    """Exact path: seek to the keyframe before each wanted frame (or decode forward when it is near) and decode
    until its PTS; each kept frame is resized at once, so one full-resolution RGB frame exists at a time.
    Returns {k: (pts the decoder gave the frame, image)}; a wanted frame the decoder does not output is a
    VideoError naming it, never a neighbour in its place."""
    wanted = [float(info.frame_pts[i]) for i in indices]
    tb = info.time_base
    out: dict[int, tuple[float, np.ndarray]] = {}
    try:
        with av.open(info.path) as container:
            stream = container.streams[info.stream_index]
            set_decode_threads(stream, threads)
            k = 0
            rest: Iterator | None = None
            try:
                while k < len(wanted):
                    if rest is not None:
                        rest.close()
                    first, rest = _seek_run(container, stream, info, wanted[k])
                    k = _decode_run(itertools.chain([first], rest), wanted, k, tb, short_side, out)
            finally:
                if rest is not None:
                    rest.close()        # before the container closes
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt", f"decode failed: {exc}") from exc
    return out


def _decode_run(run: Iterator, wanted: list[float], k: int, tb: Fraction, short_side: int | None,
                out: dict[int, tuple[float, np.ndarray]]) -> int:
    """Decode forward from a seek, keeping wanted[k], wanted[k + 1], ... as they come; returns the next k (stops
    where the next wanted frame is far enough ahead to seek to)."""
    last = -math.inf
    for frame in run:
        t = frame.pts * float(tb)     # as the probe computes frame_pts
        if t > wanted[k] + PTS_EPS:
            raise VideoError("corrupt", f"frame at {wanted[k]:.4f} s does not decode (the decoder went from "
                                        f"{last:.4f} s to {t:.4f} s)")
        if abs(t - wanted[k]) < PTS_EPS:
            out[k] = (t, resize_short_side(frame.to_ndarray(format="rgb24"), short_side))
            k += 1
            if k == len(wanted) or wanted[k] - t > _SEEK_GAP_S:
                return k            # done, or seek for the next one
        last = t
    raise VideoError("corrupt", f"frame at {wanted[k]:.4f} s does not decode (the stream ends at {last:.4f} s)")


def iter_small_frames(info: VideoInfo, width: int) -> Iterator[tuple[float, np.ndarray]]:
    """Every frame as (pts seconds, BGR image scaled to `width`), scaled inside the decoder's pixel
    converter so full-resolution RGB is never materialised (this is the cut-detection stream)."""
    scale = min(1.0, width / info.width)
    w = max(2, int(round(info.width * scale / 2)) * 2)
    h = max(2, int(round(info.height * scale / 2)) * 2)
    with av.open(info.path) as container:
        stream = container.streams[info.stream_index]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            yield float(frame.pts * info.time_base), frame.to_ndarray(width=w, height=h, format="bgr24")
