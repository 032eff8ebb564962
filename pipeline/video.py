"""Video probing and PTS-exact frame decoding shared by the stages.

Every time here is a presentation timestamp (PTS) of the video stream in seconds, on the container timeline:
the first frame of a stream whose edit list delays it by 1.075 s has `pts == 1.075`, and audio and video
timestamps of one file are comparable. Frame times always come from the demuxed packet PTS list
(`VideoInfo.frame_pts`), never from `index / avg_fps`, so variable-frame-rate video stays exact.

Decoding picks frames by their PTS: decord (batch reads) is the fast path; PyAV seek + decode is the fallback
when decord cannot open the file or its frame index disagrees with ours. Both hold at most `DECODE_CHUNK`
full-resolution frames at a time and resize each right after decoding, so a request for hundreds of 4K frames
does not hold them all at full resolution.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# PTS differences below this are the same frame (float rounding of rational timestamps).
PTS_EPS = 1e-6
# Full-resolution frames held at once while decoding (a 3840x2160 RGB frame is 25 MB).
DECODE_CHUNK = 16


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
    """Open a file, check it is a decodable video within `max_pixels`, and index every frame's PTS.

    Demuxes the whole video stream (no decoding) and decodes its first frame. Raises VideoError with the
    categories missing | corrupt | no_video_stream | unsupported_codec | too_large.
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
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue            # the flush packet
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:
                    raise VideoError("unsupported_codec", "video packets carry no timestamps")
                pts.append(ts)
        except av.error.FFmpegError as exc:
            raise VideoError("corrupt", f"demux failed after {len(pts)} packets: {exc}") from exc
        if not pts:
            raise VideoError("corrupt", "no video packets")
        # A file cut short with its index at the front demuxes without error up to where the data ends.
        if stream.frames and len(pts) < stream.frames - 1:
            raise VideoError("corrupt", f"truncated: {len(pts)} of {stream.frames} frames present")
        info = VideoInfo(
            path=str(path), width=width, height=height, codec=ctx.name, stream_index=stream.index,
            time_base=Fraction(stream.time_base), frame_pts=np.unique(np.asarray(pts, dtype=np.int64))
            * float(stream.time_base), avg_fps=float(stream.average_rate or stream.guessed_rate or 0.0),
            has_audio=bool(container.streams.audio))
    # A file whose index looks fine can still fail to decode (damaged bitstream).
    first = decode_at(info, [info.first_pts], backend="pyav")
    if not first:
        raise VideoError("corrupt", "first frame does not decode")
    return info


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
              backend: str = "auto") -> list[tuple[float, np.ndarray]]:
    """Decode the frames shown at `times` (seconds, absolute PTS) as (frame_pts, HxWx3 uint8 RGB).

    Each time maps to the frame whose PTS is the last one <= t; duplicates are decoded once. Returned in PTS
    order, one entry per distinct frame. backend: auto (decord, falling back to PyAV) | decord | pyav.
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
        images = _decode_pyav(info, indices, short_side)
    return [(float(info.frame_pts[i]), img) for i, img in zip(indices, images)]


def _decode_decord(info: VideoInfo, indices: list[int], short_side: int | None) -> list[np.ndarray]:
    import decord

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


def _decode_pyav(info: VideoInfo, indices: list[int], short_side: int | None) -> list[np.ndarray]:
    """Exact fallback: seek to the keyframe before each target and decode until its PTS; each kept frame is
    resized at once, so one full-resolution RGB frame exists at a time."""
    wanted = [float(info.frame_pts[i]) for i in indices]
    out: dict[int, np.ndarray] = {}
    with av.open(info.path) as container:
        stream = container.streams[info.stream_index]
        stream.thread_type = "AUTO"
        frames: Iterator | None = None
        last_time = -np.inf
        seeked_for = -1             # seek at most once per wanted frame, then decode forward
        k = 0
        while k < len(wanted):
            target = wanted[k]
            far = target < last_time - PTS_EPS or target - last_time > _SEEK_GAP_S
            if frames is None or (far and seeked_for != k):
                container.seek(int(round(target / float(info.time_base))), stream=stream, backward=True)
                frames = container.decode(stream)
                seeked_for = k
            frame = next(frames, None)
            if frame is None:
                break
            if frame.pts is None:
                continue
            last_time = float(frame.pts * info.time_base)
            while k < len(wanted) and abs(last_time - wanted[k]) < PTS_EPS:
                out[k] = resize_short_side(frame.to_ndarray(format="rgb24"), short_side)
                k += 1
            if k < len(wanted) and last_time > wanted[k] + PTS_EPS:
                # Passed a target without seeing it (should not happen with an exact index): take this frame.
                log.warning("%s: frame at %.4f missing, using %.4f", info.path, wanted[k], last_time)
                out[k] = resize_short_side(frame.to_ndarray(format="rgb24"), short_side)
                k += 1
    if len(out) < len(wanted):
        raise VideoError("corrupt", f"{len(wanted) - len(out)} wanted frames do not decode")
    return [out[k] for k in range(len(wanted))]


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
