"""Audio from any media file as 16 kHz mono float32 (what Whisper-style models take), via PyAV.

Failures carry a recorded-reason category: `NoAudioStream` ("no_audio: ...") for files without an audio
track, `AudioDecodeError` ("corrupt: ...") for files that cannot be opened or decoded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


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
    """Decode the first audio stream, resampled to `sample_rate` mono float32 in [-1, 1]."""
    import av

    path = Path(path)
    if not path.exists():
        raise AudioDecodeError(f"{path}: no such file")
    chunks: list[np.ndarray] = []
    n = 0
    limit = int(max_seconds * sample_rate) if max_seconds else None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise NoAudioStream(f"{path.name} has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(stream):
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
    return audio[:limit] if limit is not None else audio
