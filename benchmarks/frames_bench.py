"""frames benchmark: seconds per video-minute of cut detection and of frame extraction, next to the floor
(`ffmpeg -i X -f null -`, a full decode) and to naive uniform 1 FPS sampling (decode everything, keep one
frame a second).

    .venv/bin/python benchmarks/frames_bench.py [VIDEO] [--write]

--write replaces benchmarks/results/frames.md with the table and the machine it ran on.
"""
from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import av

from pipeline.stages.frames import FramesConfig, detect_cuts, plan_times
from pipeline.video import decode_at, encode_jpeg, probe, resize_short_side

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = REPO / "tests" / "media" / "speech_cuts_1080p.mp4"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def naive_uniform_1fps(path: str, short_side: int) -> int:
    """Decode every frame in order and keep the first one at or after each whole second (resized, JPEG)."""
    kept, next_t = 0, None
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base)
            next_t = t if next_t is None else next_t
            if t + 1e-6 >= next_t:
                encode_jpeg(resize_short_side(frame.to_ndarray(format="rgb24"), short_side))
                kept += 1
                next_t += 1.0
    return kept


def scenedetect_default(path: str, cfg: FramesConfig) -> int:
    from scenedetect import ContentDetector, detect

    return len(detect(path, ContentDetector(threshold=cfg.threshold, min_scene_len=cfg.min_shot_len,
                                            luma_only=cfg.luma_only))) - 1


def machine() -> str:
    from pipeline.machine import describe

    ff = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    return f"{describe(with_gpu=False)}; {ff}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("video", nargs="?", default=str(DEFAULT_VIDEO))
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    path, cfg = args.video, FramesConfig()
    host = machine()

    t_probe, info = timed(lambda: probe(path, cfg.max_pixels))
    t_detect, cuts = timed(lambda: detect_cuts(info, cfg))
    plan = plan_times(info, cuts, cfg, uniform=False)

    def extract():
        frames = decode_at(info, [t for t, _, _ in plan], short_side=cfg.short_side, backend=cfg.decode_backend)
        return [encode_jpeg(img, cfg.jpeg_quality) for _, img in frames]

    t_extract, jpegs = timed(extract)
    t_ffmpeg, _ = timed(lambda: subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-f", "null", "-"], check=True))
    t_naive, n_naive = timed(lambda: naive_uniform_1fps(path, cfg.short_side))
    t_sd, n_sd = timed(lambda: scenedetect_default(path, cfg))

    minutes = info.duration / 60
    per_min = lambda s: s / minutes  # noqa: E731
    rows = [
        ("probe (demux PTS index + first frame)", t_probe, ""),
        ("cut detection (PyAV decode scaled to 256 px wide in the decoder + ContentDetector)", t_detect,
         f"{len(cuts)} cuts"),
        ("extraction of the sampled frames (decord, resize to 336, JPEG)", t_extract, f"{len(jpegs)} frames"),
        ("**frames stage total** (probe + detection + extraction)", t_probe + t_detect + t_extract,
         f"{len(jpegs)} frames"),
        ("floor: `ffmpeg -i X -f null -` (full decode, video + audio)", t_ffmpeg, ""),
        ("naive uniform 1 FPS (decode all frames, keep 1/s, resize, JPEG)", t_naive, f"{n_naive} frames"),
        ("reference: `scenedetect.detect()` (OpenCV backend, auto-downscale)", t_sd, f"{n_sd} cuts"),
    ]
    table = ["| step | seconds | s per video-minute | output |", "|---|---:|---:|---|"]
    table += [f"| {name} | {s:.2f} | {per_min(s):.2f} | {out} |" for name, s, out in rows]
    text = (f"# frames benchmark\n\nVideo: `{Path(path).name}`, {info.width}x{info.height}, {info.codec}, "
            f"{info.duration:.1f} s ({minutes:.2f} min), {info.n_frames} frames.\n\nMachine: {host}\n\n"
            + "\n".join(table) + "\n")
    print(text)
    if args.write:
        out = REPO / "benchmarks" / "results" / "frames.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + NOTES)


NOTES = """
Notes:
- Seconds per video-minute = wall seconds / video duration in minutes, one run, single process.
- Cut detection has to look at every frame, so it is bounded below by a full decode (the ffmpeg row); scaling
  inside the decoder's pixel converter avoids materialising full-resolution RGB frames.
- Extraction decodes only from the keyframe before each sampled frame; its cost grows with the GOP length
  (5.3 s here) times the number of shots, not with the video length.
- The machine is shared with other jobs (see the load average): compare rows of one run, not runs.
"""


if __name__ == "__main__":
    main()
