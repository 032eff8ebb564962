"""Deterministic multimodal samples shaped like the pipeline's rows: JPEG frame, float16 embedding, caption, JSON metadata."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = (
    "a person speaks to the camera while slides change behind them in a bright lecture hall "
    "the crowd cheers as the player scores and the camera pans across the field at night "
    "close up of hands assembling a circuit board on a wooden desk with tools nearby"
).split()


@dataclass(frozen=True)
class Sample:
    key: str
    jpeg: bytes
    embedding: np.ndarray  # float16[dim]
    caption: str
    metadata_json: str

    def equals(self, other: "Sample") -> bool:
        return (
            self.key == other.key
            and self.jpeg == other.jpeg
            and self.embedding.dtype == other.embedding.dtype
            and np.array_equal(self.embedding, other.embedding)
            and self.caption == other.caption
            and json.loads(self.metadata_json) == json.loads(other.metadata_json)
        )


def sample_key(index: int) -> str:
    return f"{index:09d}"


def _synthetic_frame(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # Smooth colour blobs plus sensor-like noise: compresses like a real frame (~20-40 KB at 320x240, q85),
    # unlike pure noise (~100 KB) or flat colour (~2 KB).
    low = rng.integers(0, 256, (max(2, height // 20), max(2, width // 20), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = smooth + rng.normal(0.0, 10.0, smooth.shape).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _video_frames(video: Path, count: int, width: int, height: int) -> list[Image.Image]:
    import av  # only needed when frames come from a real video

    frames: list[Image.Image] = []
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        total = stream.frames or 300
        step = max(1, total // max(1, count))
        for i, frame in enumerate(container.decode(stream)):
            if i % step == 0:
                frames.append(frame.to_image().resize((width, height), Image.BILINEAR))
            if len(frames) >= count:
                break
    if not frames:
        raise ValueError(f"no frames decoded from {video}")
    return frames


def make_samples(
    count: int,
    *,
    seed: int = 0,
    embedding_dim: int = 768,
    width: int = 320,
    height: int = 240,
    quality: int = 85,
    video: str | None = None,
) -> list[Sample]:
    """`count` samples, identical for the same arguments on every client."""
    rng = np.random.default_rng(seed)
    video_frames = _video_frames(Path(video), min(count, 64), width, height) if video else None
    samples = []
    for i in range(count):
        if video_frames:
            # Real frames repeat; a little noise keeps every JPEG distinct and of realistic size.
            base = np.asarray(video_frames[i % len(video_frames)], dtype=np.int16)
            noisy = base + rng.normal(0.0, 3.0, base.shape).astype(np.int16)
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        else:
            image = _synthetic_frame(rng, width, height)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        embedding = rng.standard_normal(embedding_dim).astype(np.float16)
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 30))))
        metadata = {
            "video_id": f"vid{i // 50:06d}",
            "frame_idx": int(i % 50),
            "timestamp_s": round(float(i % 50) * 2.0, 3),
            "scene_id": int((i % 50) // 7),
            "width": width,
            "height": height,
            "audio_tags": [str(t) for t in rng.choice(["Speech", "Music", "Crowd", "Vehicle"], size=2, replace=False)],
        }
        samples.append(
            Sample(sample_key(i), buf.getvalue(), embedding, caption, json.dumps(metadata, sort_keys=True))
        )
    return samples
