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


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode the first audio stream, resampled to `sample_rate` mono float32 in [-1, 1].

    Sample k plays at k / sample_rate seconds on the container's timeline, the timeline frame PTS are on, so ASR and
    audio times line up with frames: a stream whose first sample plays at t > 0 is preceded by that much silence,
    samples stamped before 0 (encoder priming) are dropped. A first timestamp past MAX_LEAD_S (broadcast captures
    whose clocks start hours in) is an AudioDecodeError rather than hours of silence.
    """
    import av

    path = Path(path)
    if not path.exists():
        raise AudioDecodeError(f"{path}: no such file")
    chunks: list[np.ndarray] = []
    n = 0
    first_time: float | None = None
    limit = int(max_seconds * sample_rate) if max_seconds else None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise NoAudioStream(f"{path.name} has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(stream):
                if first_time is None and frame.time is not None:
                    first_time = float(frame.time)
                    if first_time > MAX_LEAD_S:
                        raise AudioDecodeError(f"{path.name}: audio starts at {first_time:.1f} s "
                                               f"(over {MAX_LEAD_S:.0f} s; timeline not supported)")
                    n += round(first_time * sample_rate)  # samples on the timeline, after the lead below
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    n += chunks[-1].size
                if limit is not None and n >= limit:
                    break
            else:
                for out in resampler.resample(None):   # flush the resampler's tail
                    chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:
        raise AudioDecodeError(f"{path.name}: {exc}") from exc
    if not chunks:
        raise AudioDecodeError(f"{path.name}: audio stream has no decodable frames")
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    lead = round((first_time or 0.0) * sample_rate)
    if lead > 0:
        audio = np.concatenate([np.zeros(lead, np.float32), audio])
    elif lead < 0:
        audio = audio[-lead:]
    return audio[:limit] if limit is not None else audio
