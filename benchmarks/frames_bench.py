"""frames benchmark: the frames stage next to the decode floor and to PySceneDetect, side by side.

For each resolution (360p: tests/media/speech_cuts_1080p.mp4 transcoded here to 640x360 H.264, audio copied;
1080p: the file itself) one table, every row run in the same invocation, round-robin, median of 3:

- `ffmpeg -i X -f null -`: one full decode (video + audio), the floor of anything that looks at every frame;
- `scenedetect.detect()` with the OpenCV backend and auto-downscale (what video2dataset's cut-detection
  subsampler runs), same threshold / minimum shot length / luma-only as the stage;
- the stage's `sample_video` (probe + cut detection, then extraction of the sampled frames), default config,
  and with the other cut-scan mode (`detect_skip_loop_filter_min_height`: by default the loop filter is
  skipped from 720 lines up, and kept below, where the after-cut frames are captured during the scan).

Then videos per second of one task with `workers` = 1 and 2 (4 copies of the 360p video through
`FramesStage.process`, pool start-up included).

    .venv/bin/python benchmarks/frames_bench.py [--reps 3] [--write]

--write replaces benchmarks/results/frames.md with the tables, the machine and the date.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.stages.base import RunContext, WorkItem
from pipeline.stages.frames import STAGE, FramesConfig, sample_video
from pipeline.video import probe

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tests" / "media" / "speech_cuts_1080p.mp4"


def make_360p(out: Path) -> Path:
    if not out.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(SOURCE), "-vf", "scale=640:360", "-c:v", "libx264",
                        "-c:a", "copy", str(out)], check=True)
    return out


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    cores = fields.get("CPU(s)", str(os.cpu_count())).strip()
    ff = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    ff = " ".join(ff.split()[:3])
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {cores} CPUs (lscpu); {ff}; load average at start {load}"


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children (ffmpeg)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_ffmpeg(path: str) -> dict:
    subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-f", "null", "-"], check=True)
    return {}


def run_pyscenedetect(path: str, cfg: FramesConfig) -> dict:
    from scenedetect import ContentDetector, detect

    scenes = detect(path, ContentDetector(threshold=cfg.threshold, min_scene_len=cfg.min_shot_len,
                                          luma_only=cfg.luma_only), backend="opencv")
    return {"cuts": [round(s.seconds, 3) for s, _ in scenes[1:]]}


def run_stage(path: str, cfg: FramesConfig) -> dict:
    v = sample_video(path, cfg)
    return {"cuts": [round(c, 3) for c in v.cuts], "detect": v.seconds_detect, "extract": v.seconds_extract,
            "frames": len(v.frames)}


GOALS = {"360p": {"ffmpeg": 1.2, "pyscenedetect": 0.7}, "1080p": {"ffmpeg": 1.5}}


def bench_resolution(label: str, path: str, reps: int) -> tuple[list[str], dict]:
    cfg = FramesConfig()
    skips = probe(path).height >= cfg.detect_skip_loop_filter_min_height
    other = FramesConfig(detect_skip_loop_filter_min_height=10**6 if skips else 0)
    mode = ("loop filter skipped" if skips else "loop filter kept, after-cut frames captured during the scan")
    other_mode = ("loop filter kept, after-cut frames captured during the scan" if skips else "loop filter skipped")
    rows = {
        "ffmpeg": ("`ffmpeg -i X -f null -` (full decode, video + audio: the floor)", lambda: run_ffmpeg(path)),
        "pyscenedetect": ("PySceneDetect `detect()`, OpenCV backend, auto-downscale (video2dataset's cut detection)",
                          lambda: run_pyscenedetect(path, cfg)),
        "stage": (f"**frames stage** `sample_video`, default config ({mode})", lambda: run_stage(path, cfg)),
        "stage_other": (f"frames stage, other scan mode ({other_mode})", lambda: run_stage(path, other)),
    }
    times: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    out: dict[str, dict] = {}
    for rep in range(reps):              # round-robin: load changes hit every row alike
        for key, (_, fn) in rows.items():
            t0, c0 = time.perf_counter(), cpu_seconds()
            info = fn()
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(cpu_seconds() - c0)
            for k, v in info.items():
                out.setdefault(key, {}).setdefault(k, []).append(v)
            print(f"  {label} rep {rep + 1}/{reps} {key}: {times[key][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    info = probe(path)
    lines = [f"### {label}: `{Path(path).name}`, {info.width}x{info.height} {info.codec}, {info.duration:.1f} s, "
             f"{info.n_frames} frames", "",
             "| what | median s | runs (s) | x ffmpeg | x PySceneDetect | CPU s | CPU x ffmpeg | output |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for key, (name, _) in rows.items():
        extra = ""
        if key.startswith("stage"):
            d = statistics.median(out[key]["detect"])
            e = statistics.median(out[key]["extract"])
            extra = f"detect {d:.2f} / extract {e:.2f} s; {out[key]['frames'][0]} frames; cuts {out[key]['cuts'][0]}"
        elif key == "pyscenedetect":
            extra = f"cuts {out[key]['cuts'][0]}"
        runs = " ".join(f"{t:.2f}" for t in times[key])
        lines.append(f"| {name} | {med[key]:.2f} | {runs} | {med[key] / med['ffmpeg']:.2f} | "
                     f"{med[key] / med['pyscenedetect']:.2f} | {mcpu[key]:.2f} | {mcpu[key] / mcpu['ffmpeg']:.2f} | "
                     f"{extra} |")
    same = out["stage"]["cuts"][0] == out["pyscenedetect"]["cuts"][0]
    lines += ["", f"Stage / ffmpeg = **{med['stage'] / med['ffmpeg']:.2f}**, stage / PySceneDetect = "
                  f"**{med['stage'] / med['pyscenedetect']:.2f}** (CPU time: {mcpu['stage'] / mcpu['ffmpeg']:.2f} and "
                  f"{mcpu['stage'] / mcpu['pyscenedetect']:.2f}); cuts identical to PySceneDetect's: {same}."]
    goals = [f"stage <= {limit} x {ref}: {'met' if med['stage'] / med[ref] <= limit else '**not met**'}"
             for ref, limit in GOALS.get(label, {}).items()]
    lines += [f"Goals: {'; '.join(goals)}." if goals else "", ""]
    return lines, med


def bench_pool(path: str, n_videos: int = 4) -> list[str]:
    items = [WorkItem(video_id=f"v{i}", url=path, index=i,
                      inputs={"download": {"videos": [{"video_id": f"v{i}", "path": path}]}}) for i in range(n_videos)]
    lines = ["### One task, several videos at once (`stage.workers`)", "",
             f"{n_videos} copies of the 360p video through `FramesStage.process` (JPEG encoding included; "
             "a pool's start-up included).", "", "| workers | seconds | videos / s | speed-up |", "|---:|---:|---:|---:|"]
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            ctx = RunContext(run_dir=Path(tmp), shard=0, models="tiny", cache_dir=Path(tmp), device="cpu",
                             log=lambda msg: None)
            stage = STAGE(FramesConfig(workers=workers), ctx)
            t0 = time.perf_counter()
            results = list(stage.process(iter(items)))
            took = time.perf_counter() - t0
            assert all(r.status == "ok" for r in results), [r.reason for r in results]
            base = base or took
            lines.append(f"| {workers} | {took:.2f} | {n_videos / took:.2f} | {base / took:.2f} |")
            print(f"  pool workers={workers}: {took:.2f} s", flush=True)
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--skip-1080p", action="store_true")
    args = ap.parse_args()
    host = machine()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory() as tmp:
        p360 = str(make_360p(Path(tmp) / "speech_cuts_360p.mp4"))
        text = ["# frames benchmark", "", f"Date: {started}. Machine: {host}.", ""]
        lines, _ = bench_resolution("360p", p360, args.reps)
        text += lines
        if not args.skip_1080p:
            lines, _ = bench_resolution("1080p", str(SOURCE), args.reps)
            text += lines
        text += bench_pool(p360)
    report = "\n".join(text)
    print(report)
    if args.write:
        out = REPO / "benchmarks" / "results" / "frames.md"
        out.write_text(report + NOTES)


NOTES = """
Notes:
- Every row of a table ran in this one invocation, round-robin, on the same file; the table gives the median
  of the runs and every run. The machine is shared with other jobs (see the load average): compare the rows
  of one table (the ratios), not runs made at different times. The goals are on wall time; the CPU columns
  (median CPU seconds of all the row's threads and child processes) vary less with the load.
- The stage's detect time includes the probe (a demux of the whole stream and a decode of its first frame);
  its extract time is the seeking decode of the frames not captured during detection (the shot midpoints;
  after-cut frames are captured while detecting when the loop filter is kept) plus their resize.
- Skipping the loop filter (deblocking) makes the scan's decode cheaper, but its pixels are not the exact
  frames, so nothing is captured and the after-cut frames are decoded by seeking too. In the three runs made
  when it was chosen, it paid at 1080p in two (median 21.5 vs 24.3 s, 15.5 vs 18.9 s) and tied in the third,
  while at 360p the two modes were within the noise: hence `detect_skip_loop_filter_min_height: 720`. Cuts
  were identical in every row of every run.
- Other runs of this code the same night, to show the spread: 00:26 UTC (load ~9-13) 360p 1.34 x ffmpeg,
  1080p 1.21 x; 00:32 UTC, 360p only (load ~21) 1.87 x (stage 1.34 vs ffmpeg 0.72 s). The CPU-time ratio at
  360p stayed at ~1.4 (1.52 before the change below), so the 1.2 x goal at 360p is not met.
- The run before the scan's bound went to the sampled rows (2026-12-04 23:53 UTC, same VM, load ~12): 360p
  stage 1.59 x ffmpeg (1.40 vs 0.88 s), 1080p 1.35 x (22.1 vs 16.3 s). Every run differs by tens of per cent
  with the load: see the table's runs, and the goal line of each table.
- Before the one-decode scan (PySceneDetect's detector fed frames scaled to 256 px BGR by the decoder's converter,
  every sampled frame decoded by seeking), measured side by side on the same VM: 360p stage 5.42 s vs ffmpeg
  0.69 s and PySceneDetect 1.30 s; 1080p stage 11.9 s vs ffmpeg 4.6 s.
- Where the time goes (360p, CPU seconds of the process and its children, medians of 5 runs on the same VM:
  less noisy than wall time under this load): ffmpeg ~0.69 (video ~0.62 + audio); PyAV's decode of the video
  stream alone ~0.54; the stage ~0.95-1.0 (1.4 x ffmpeg) = probe ~0.03 + scan ~0.80 + seeking decode of the
  shot midpoints ~0.15 (decord, `decode_backend: auto`; PyAV's path took ~0.11 for the same frames). What
  keeps 360p above 1.2 x: the scan's work beyond the decode (~0.25 s) and the midpoints' second decode. The scan's
  own work beyond the decode is now ~70 us a frame: a copy of the rows the 256-px scaling samples, three L1
  norms over them, Python bookkeeping. It was ~100 us before: `cv2.resize` (nearest) of the three planes, a
  per-pixel gather, took ~0.15-0.2 s of it (perf), now done only for the few frames whose bound over the
  sampled rows reaches the threshold. Holding the frames of each shot to capture every midpoint during the
  scan was tried: it saved ~0.1 s of seeking decode but cost the scan ~0.16 s (memory traffic of a large
  frame pool), so only the last shot's midpoint (one frame held) is captured.
- Cut detection decodes every frame once with frame threading and scores it on the decoder's own planes
  scaled to 256 px wide (pipeline/cuts.py); nothing is converted to RGB except the sampled frames.
"""


if __name__ == "__main__":
    main()
