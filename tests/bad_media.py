"""Broken and unusable media for the bad-input tests (video probing and the frames stage), with the failure
category each must be recorded with."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np


def unknown_codec_video(path: Path) -> Path:
    """A valid Matroska file whose video track names a codec FFmpeg has no decoder for."""
    mkv = path.with_suffix(".h264.mkv")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(mkv)], check=True)
    data = mkv.read_bytes()
    assert b"V_MPEG4/ISO/AVC" in data
    path.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/XYZ", 1))  # same length: the file stays valid
    return path


def bad_videos(tmp_path: Path, shared_media: Path) -> dict[Path, str]:
    """{path: expected failure category} for files that exist but cannot be used, and one that does not exist."""
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    data = (shared_media / "fades.mp4").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    cut_short = tmp_path / "cut_short.mp4"  # index at the front: demuxes cleanly until the data ends
    data = (shared_media / "speech_cuts_1080p.mp4").read_bytes()
    cut_short.write_bytes(data[: len(data) // 2])
    return {zero: "corrupt", noise: "corrupt", truncated: "corrupt", cut_short: "corrupt",
            shared_media / "speech_lecture.mp3": "no_video_stream",
            unknown_codec_video(tmp_path / "unknown_codec.mkv"): "unsupported_codec",
            tmp_path / "absent.mp4": "missing"}
