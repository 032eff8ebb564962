"""Inference runner benchmark: model-busy fraction and throughput per stage, asr batched vs sequential.

    .venv/bin/python benchmarks/inference_bench.py [--cache-dir DIR] [--out benchmarks/results/inference.md]

1. Fixed-latency fake model on Ray: preprocessing and model each take a fixed time per item; the runner should
   keep the model busy (~97%+), where strictly sequential processing gives ~50%.
2. asr stage (tiny faster-whisper, models=tiny) on real speech: items/s, model-busy fraction.
3. asr batched (BatchedInferencePipeline) vs sequential (WhisperModel.transcribe) on the same 5 minutes of the
   lecture, same tiny model, same decoding settings.
4. clip stage (tiny open_clip) on frames of a real 1080p video: items/s, frames/s, model-busy fraction.
"""
from __future__ import annotations

import argparse
import functools
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_MEDIA = REPO.parent / "shared" / "media"

from pipeline.inference.runner import (FixedLatencyModel, RunnerConfig, ensure_ray,  # noqa: E402
                                       fixed_latency_preprocess, run_inference)
from pipeline.stages.base import ItemResult, RunContext, WorkItem  # noqa: E402


def machine() -> str:
    from pipeline.machine import describe

    return describe()


def bench_fake(n_items: int, prep_s: float, model_s: float) -> list[dict]:
    rows = []
    items = [WorkItem(f"v{i:04d}", "", i) for i in range(n_items)]
    for label, cfg in [("sequential (max_in_flight=1)", RunnerConfig(batch_size=1, max_in_flight=1)),
                       ("runner (max_in_flight=16)", RunnerConfig(batch_size=1, max_in_flight=16))]:
        run = run_inference(items, functools.partial(fixed_latency_preprocess, seconds=prep_s, payload_bytes=1 << 16),
                            functools.partial(FixedLatencyModel, model_s), lambda it, o: ItemResult(it.video_id), cfg)
        n = sum(1 for _ in run)
        s = run.stats
        rows.append({"case": label, "items": n, "items_per_s": s.items_per_s,
                     "busy": s.model_busy_fraction, "wall_s": s.wall_s})
    return rows


def _asr_items(paths: dict[str, Path]) -> list[WorkItem]:
    return [WorkItem(v, str(p), i, inputs={"download": {"videos": [{"video_id": v, "path": str(p)}]}})
            for i, (v, p) in enumerate(paths.items())]


def bench_asr_stage(tmp: Path, cache_dir: Path) -> dict:
    from pipeline.stages.asr import AsrConfig, AsrStage

    paths = {}
    for i in range(4):   # four 60 s pieces of the lecture + the 1080p video's soundtrack
        out = tmp / f"lecture_{i}.mp3"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-ss", str(60 * i), "-i",
                        str(SHARED_MEDIA / "speech_lecture.mp3"), "-t", "60", "-c", "copy", str(out)], check=True)
        paths[f"lecture_{i}"] = out
    paths["cuts"] = SHARED_MEDIA / "speech_cuts_1080p.mp4"
    ctx = RunContext(run_dir=tmp / "asr", shard=0, models="tiny", cache_dir=cache_dir, device="cpu")
    stage = AsrStage(AsrConfig(beam_size=1), ctx)
    t0 = time.perf_counter()
    results = list(stage.process(_asr_items(paths)))
    wall = time.perf_counter() - t0
    stats = stage.shard_stats()
    audio_s = sum(r.rows["videos"][0]["duration"] for r in results if r.status == "ok")
    return {"items": len(results), "audio_s": audio_s, "items_per_s": stats["runner_items_per_s"],
            "busy": stats["model_busy_fraction"], "runner_wall_s": stats["runner_wall_s"], "wall_s": wall,
            "model_busy_s": stats["model_busy_s"]}


def bench_asr_batched_vs_sequential(cache_dir: Path, seconds: float = 300.0) -> list[dict]:
    from pipeline.audio import load_audio
    from pipeline.models.whisper import load_whisper, model_path
    from faster_whisper import BatchedInferencePipeline

    audio = load_audio(SHARED_MEDIA / "speech_lecture.mp3", max_seconds=seconds)
    model = load_whisper(model_path("medium", "tiny", cache_dir), device="cpu", compute_type="auto")
    common = dict(beam_size=1, temperature=0.0, word_timestamps=True, vad_filter=True)
    rows = []
    for label, fn in [("sequential WhisperModel.transcribe", lambda: model.transcribe(audio, **common)),
                      ("BatchedInferencePipeline batch_size=8",
                       lambda: BatchedInferencePipeline(model).transcribe(audio, batch_size=8, **common))]:
        t0 = time.perf_counter()
        segments, _ = fn()
        n = len(list(segments))
        dt = time.perf_counter() - t0
        rows.append({"case": label, "audio_s": seconds, "seconds": dt, "x_realtime": seconds / dt, "segments": n})
    return rows


def bench_clip_stage(tmp: Path, cache_dir: Path, n_videos: int = 4, frames_per_video: int = 32) -> dict:
    import av

    from pipeline.stages.clip import ClipConfig, ClipStage

    rows = []
    with av.open(str(SHARED_MEDIA / "speech_cuts_1080p.mp4")) as container:
        for n, frame in enumerate(container.decode(container.streams.video[0])):
            if n % 15:
                continue
            img = frame.to_image()
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            rows.append({"frame_idx": len(rows), "pts": float(frame.time), "jpeg": buf.getvalue(),
                         "width": img.width, "height": img.height})
            if len(rows) == n_videos * frames_per_video:
                break
    items = []
    for v in range(n_videos):
        chunk = [dict(r, video_id=f"v{v}", frame_idx=i)
                 for i, r in enumerate(rows[v * frames_per_video:(v + 1) * frames_per_video])]
        items.append(WorkItem(f"v{v}", "", v, inputs={"frames": {"frames": chunk}}))
    ctx = RunContext(run_dir=tmp / "clip", shard=0, models="tiny", cache_dir=cache_dir, device="cpu")
    stage = ClipStage(ClipConfig(runner=RunnerConfig(batch_size=1, max_in_flight=4)), ctx)
    results = list(stage.process(items))
    stats = stage.shard_stats()
    frames = sum(len(r.rows.get("clip", [])) for r in results)
    return {"items": len(results), "frames": frames, "items_per_s": stats["runner_items_per_s"],
            "frames_per_s": frames / stats["runner_wall_s"], "busy": stats["model_busy_fraction"],
            "runner_wall_s": stats["runner_wall_s"], "model_load_s": stats["model_load_s"]}


def _table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "VPT_CACHE_DIR", Path.home() / ".cache" / "vpt-pipeline")))
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    ap.add_argument("--fake-items", type=int, default=200)
    args = ap.parse_args()

    ensure_ray(num_cpus=2)   # one Ray for all runs (the runner reuses it); startup is not part of the figures
    lines = [f"Machine: {machine()}", ""]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fake = bench_fake(args.fake_items, prep_s=0.04, model_s=0.05)
        lines += ["## Fixed-latency fake model (Ray, 1 preprocess worker, 1 model actor, batch 1)",
                  f"preprocess 40 ms/item, model 50 ms/batch, {args.fake_items} items", ""]
        lines += _table(["case", "items/s", "model-busy fraction", "wall s"],
                        [[r["case"], f"{r['items_per_s']:.1f}", f"{r['busy']:.1%}", f"{r['wall_s']:.1f}"] for r in fake])
        asr = bench_asr_stage(tmp, args.cache_dir)
        lines += ["", "## asr stage (tiny faster-whisper, int8 CPU, beam 1, batch 8, VAD; Ray runner)"]
        lines += _table(["items", "audio s", "items/s", "audio s per wall s", "model-busy fraction", "runner wall s"],
                        [[asr["items"], f"{asr['audio_s']:.0f}", f"{asr['items_per_s']:.2f}",
                          f"{asr['audio_s'] / asr['runner_wall_s']:.1f}", f"{asr['busy']:.1%}",
                          f"{asr['runner_wall_s']:.1f}"]])
        bvs = bench_asr_batched_vs_sequential(args.cache_dir)
        lines += ["", "## asr batched vs sequential (same tiny model, first 300 s of speech_lecture.mp3, "
                  "beam 1, word timestamps, VAD)"]
        lines += _table(["case", "seconds", "x real time", "segments"],
                        [[r["case"], f"{r['seconds']:.2f}", f"{r['x_realtime']:.0f}", r["segments"]] for r in bvs])
        clip = bench_clip_stage(tmp, args.cache_dir)
        lines += ["", "## clip stage (tiny open_clip 224 px, fp32 CPU; Ray runner, 1 video per model call)"]
        lines += _table(["videos", "frames", "items/s", "frames/s", "model-busy fraction", "runner wall s",
                         "model load s"],
                        [[clip["items"], clip["frames"], f"{clip['items_per_s']:.2f}", f"{clip['frames_per_s']:.1f}",
                          f"{clip['busy']:.1%}", f"{clip['runner_wall_s']:.1f}", f"{clip['model_load_s']:.1f}"]])
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Inference runner benchmark\n\n`.venv/bin/python benchmarks/inference_bench.py "
                            "--out benchmarks/results/inference.md`\n\n" + report)


if __name__ == "__main__":
    main()
