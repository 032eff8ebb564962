"""Audio from any media file as 16 kHz mono float32 (what Whisper-style models take), via PyAV.

Failures carry a recorded-reason category: `NoAudioStream` ("no_audio: ...") for files without an audio
track, `AudioDecodeError` ("corrupt: ...") for files that cannot be opened or decoded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
MAX_LEAD_S = 600.0   # the latest first audio timestamp aligned by leading silence


class NoAudioStream(Exception):
    def __str__(self) -> str:
        return f"no_audio: {self.args[0] if self.args else 'no audio stream'}"


class AudioDecodeError(Exception):
    def __str__(self) -> str:
        return f"corrupt: {self.args[0] if self.args else 'audio could not be decoded'}"


def has_audio_stream(path: str | Path) -> bool:
    import av

    try:
        with av.open(str(path)) as container:
            return len(container.streams.audio) > 0
    except av.FFmpegError as exc:
        raise AudioDecodeError(f"{Path(path).name}: {exc}") from exc


# A decoded frame whose timestamp is further than this from where the previous frames end starts a new run:
# silence fills a gap, an overlap is trimmed. Smaller differences are timestamp rounding (Matroska stores
# milliseconds) and are absorbed, so drift stays under this bound.
RESYNC_S = 0.005


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode the first audio stream onto the container timeline, resampled to `sample_rate` mono float32 in
    [-1, 1]: sample k plays at k / sample_rate seconds, the timeline frame PTS are on (`pipeline.video`).

    Each decoded frame is placed at its own PTS, not after the previous one: a stream that starts at t > 0 is
    preceded by silence, packets missing mid-stream (a splice) leave silence of their length, samples stamped
    before 0 (encoder priming) or overlapping what is already placed are dropped. Frames that follow each other
    go through one resampler (its filter delay is compensated at the start and its tail flushed at the end of each
    run), so a continuous stream is resampled without seams. A first timestamp past MAX_LEAD_S (broadcast
    captures whose clocks start hours in) is an AudioDecodeError rather than hours of silence.
    """
    import av

    path = Path(path)
    if not path.exists():
        raise AudioDecodeError(f"{path}: no such file")
    limit = int(max_seconds * sample_rate) if max_seconds else None
    timeline = _Timeline(sample_rate, limit)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise NoAudioStream(f"{path.name} has no audio stream")
            stream = container.streams.audio[0]
            run: _Run | None = None
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else None
                if t is not None and timeline.first_time is None:
                    timeline.first_time = t
                    if t > MAX_LEAD_S:
                        raise AudioDecodeError(f"{path.name}: audio starts at {t:.1f} s "
                                               f"(over {MAX_LEAD_S:.0f} s; timeline not supported)")
                if run is None or not run.continues(frame, t):
                    if run is not None:
                        timeline.place(run.finish())
                    if t is None:
                        t = timeline.end / sample_rate     # no timestamp at all: right after what is placed
                    run = _Run(t, frame, sample_rate)
                run.add(frame)
                if limit is not None and run.start * sample_rate + run.n_out >= limit:
                    break
            if run is not None:
                timeline.place(run.finish())
    except av.FFmpegError as exc:
        raise AudioDecodeError(f"{path.name}: {exc}") from exc
    if timeline.first_time is None and not timeline.pieces:
        raise AudioDecodeError(f"{path.name}: audio stream has no decodable frames")
    return timeline.assemble()


class _Run:
    """Frames decoded back to back (timestamps continuous): one resampler, output starting at `start`."""

    def __init__(self, start: float, frame, sample_rate: int):
        import av

        self.start = start
        self.sample_rate = sample_rate
        self.in_rate = frame.sample_rate
        self.layout = frame.layout.name
        self.format = frame.format.name
        self.n_in = 0                 # input samples fed
        self.n_out = 0
        self.chunks: list[np.ndarray] = []
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)

    def continues(self, frame, t: float | None) -> bool:
        if (frame.sample_rate, frame.layout.name, frame.format.name) != (self.in_rate, self.layout, self.format):
            return False
        if t is None:
            return True
        return abs(t - (self.start + self.n_in / self.in_rate)) <= RESYNC_S

    def add(self, frame) -> None:
        self.n_in += frame.samples
        for out in self.resampler.resample(frame):
            self.chunks.append(out.to_ndarray().reshape(-1))
            self.n_out += self.chunks[-1].size

    def finish(self) -> tuple[float, np.ndarray]:
        for out in self.resampler.resample(None):   # the resampler's tail
            self.chunks.append(out.to_ndarray().reshape(-1))
        audio = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        # The run's length is its input's: the flushed tail can exceed it by a rounding sample.
        n = round(self.n_in * self.sample_rate / self.in_rate)
        return self.start, audio[:n].astype(np.float32, copy=False)


class _Timeline:
    """Pieces of audio placed at sample offsets from time 0; gaps are silence, overlaps keep what came first."""

    def __init__(self, sample_rate: int, limit: int | None):
        self.sample_rate = sample_rate
        self.limit = limit
        self.first_time: float | None = None
        self.pieces: list[tuple[int, np.ndarray]] = []
        self.end = 0                  # one past the last placed sample

    def place(self, piece: tuple[float, np.ndarray]) -> None:
        start_s, audio = piece
        start = round(start_s * self.sample_rate)
        skip = max(0, self.end - start, -start)   # overlap with what is placed, or samples before time 0
        if skip >= audio.size:
            return
        start += skip
        self.pieces.append((start, audio[skip:]))
        self.end = start + audio.size - skip

    def assemble(self) -> np.ndarray:
        n = self.end if self.limit is None else min(self.end, self.limit)
        out = np.zeros(max(n, 0), np.float32)
        for start, audio in self.pieces:
            if start >= n:
                break
            out[start:min(start + audio.size, n)] = audio[:n - start]
        return out
