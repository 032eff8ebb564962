"""Throughput of the audio and scenegraph stages on the shared inference runner (Ray backend).

    python benchmarks/experts_bench.py                 # tiny random models
    python benchmarks/experts_bench.py --full          # published-size architectures, random weights
    python benchmarks/experts_bench.py --full --device cuda --write

Inputs are real media from tests/media: `--videos` copies of 60 s of speech_cuts_1080p.mp4 for audio (half
with hand-made 5 s "ASR" segments, half without speech -> 10 s windows) and frames sampled every 0.5 s from
fades.mp4 / counter.mp4 (as JPEG rows, like the frames stage writes) for scenegraph. `--full` builds a random
Cnn14 of the published size (81.8 M parameters) and a random DETR-ResNet-50 (timm backbone, no download) and runs
them through the `models=real` checkpoint path. Reports items/s (videos/s), spans or frames per second and the
model-busy fraction from the runner; `--write` appends the table to benchmarks/results/experts.md.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "tests" / "media"
RESULTS = REPO / "benchmarks" / "results" / "experts.md"


def machine() -> str:
    from pipeline.machine import describe

    return describe()


def audio_items(n: int, work: Path):
    from pipeline.stages.base import WorkItem

    clip = work / "speech60.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(MEDIA / "speech_cuts_1080p.mp4"), "-t", "60", "-c",
                    "copy", str(clip)], check=True)
    items = []
    for i in range(n):
        vid = f"a{i}"
        segs = ([{"video_id": vid, "segment_idx": k, "start": 5.0 * k, "end": 5.0 * k + 4.5, "text": ""}
                 for k in range(12)] if i % 2 == 0 else [])
        items.append(WorkItem(vid, str(clip), i, {"download": {"videos": [{"video_id": vid, "path": str(clip)}]},
                                                  "asr": {"segments": segs, "videos": []}}))
    return items


def frame_items(n: int):
    from pipeline.stages.base import WorkItem
    from pipeline.video import decode_at, encode_jpeg, probe, resize_short_side

    sources = []
    for name in ("fades.mp4", "counter.mp4"):
        info = probe(MEDIA / name)
        times = [info.first_pts + 0.5 * k for k in range(int(info.duration / 0.5))]
        frames = decode_at(info, times, backend="pyav")
        sources.append([(pts, encode_jpeg(resize_short_side(im, 360))) for pts, im in frames])
    items = []
    for i in range(n):
        vid = f"f{i}"
        rows = [{"video_id": vid, "frame_idx": k, "pts": pts, "jpeg": jpg, "width": 0, "height": 0}
                for k, (pts, jpg) in enumerate(sources[i % 2])]
        items.append(WorkItem(vid, vid, i, {"frames": {"frames": rows}}))
    return items


def full_size_checkpoints(work: Path) -> tuple[str, str]:
    import torch

    from pipeline.models.panns import Cnn14

    cnn = work / "Cnn14_random.pth"
    torch.manual_seed(0)
    torch.save({"model": Cnn14().state_dict()}, cnn)
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

    from pipeline.models.detector import COCO_LABELS

    det = work / "detr-r50-random"
    cfg = DetrConfig(use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False,
                     id2label=dict(enumerate(COCO_LABELS)), label2id={n: i for i, n in enumerate(COCO_LABELS)})
    DetrForObjectDetection(cfg).save_pretrained(det)
    DetrImageProcessor().save_pretrained(det)
    return str(cnn), str(det)


def run(stage_cls, cfg, items, models: str, cache: Path, work: Path, device: str) -> dict:
    from pipeline.stages.base import RunContext

    ctx = RunContext(run_dir=work / "run", shard=0, models=models, cache_dir=cache, device=device)
    stage = stage_cls(cfg, ctx)
    t0 = time.perf_counter()
    results = list(stage.process(items))
    wall = time.perf_counter() - t0
    units = sum(len(r.rows.get(stage_cls.name, [])) for r in results)
    stats = stage.shard_stats()
    return {"stage": stage_cls.name, "videos": len(items), "ok": sum(r.status == "ok" for r in results),
            "units": units, "wall_s": wall, "items_per_s": stats["runner_items_per_s"],
            "units_per_s": units / stats["runner_wall_s"],
            "units_per_model_s": units / stats["model_window_s"] if stats["model_window_s"] else 0.0, "busy": stats["model_busy_fraction"],
            "load_s": stats["model_load_s"], "rss_mb": stats["runner_peak_rss_mb_model"],
            "batches": stats["runner_batches"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--full", action="store_true", help="published-size architectures (random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write", action="store_true", help=f"append the results to {RESULTS}")
    args = ap.parse_args()

    from pipeline.inference.runner import RunnerConfig
    from pipeline.stages.audio import AudioConfig, AudioStage
    from pipeline.stages.scenegraph import SceneGraphConfig, SceneGraphStage

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = work / "cache"
        models = "tiny"
        audio_cfg = AudioConfig(runner=RunnerConfig(batch_size=2, max_in_flight=4, num_cpus_preprocess=1))
        sg_cfg = SceneGraphConfig(score_threshold=0.0 if not args.full else 0.5,
                                  runner=RunnerConfig(batch_size=2, max_in_flight=4, num_cpus_preprocess=1))
        if args.full:
            cnn, det = full_size_checkpoints(work)
            models = "real"
            audio_cfg.checkpoint, sg_cfg.checkpoint = cnn, det
        rows = [run(AudioStage, audio_cfg, audio_items(args.videos, work), models, cache, work, args.device),
                run(SceneGraphStage, sg_cfg, frame_items(args.videos), models, cache, work, args.device)]

    size = "published-size, random weights" if args.full else "tiny random"
    lines = [f"\n### {time.strftime('%Y-%m-%d')} — {size}, device {args.device}, Ray runner\n",
             f"Machine: {machine()}\n",
             "| stage | videos | rows (spans / frames) | videos/s | rows/s | rows/s after model load | "
             "model-busy fraction | batches | model load s | peak RSS model MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['videos']} ({r['ok']} ok) | {r['units']} | {r['items_per_s']:.3f} | "
                     f"{r['units_per_s']:.2f} | {r['units_per_model_s']:.2f} | {r['busy']:.2f} | {r['batches']} | {r['load_s']:.1f} | "
                     f"{r['rss_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        if not RESULTS.exists():
            RESULTS.write_text("# audio + scenegraph stages: throughput on the inference runner\n\n"
                               "Produced by `python benchmarks/experts_bench.py [--full] --write`. "
                               "Inputs: 60 s of speech_cuts_1080p.mp4 per audio video (half with twelve 4.5 s "
                               "segments, half as 10 s windows); frames every 0.5 s of fades.mp4 / counter.mp4 "
                               "at 360p for scenegraph. Model-busy fraction = time inside predict() / time from "
                               "model loaded to last batch done.\n")
        with RESULTS.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
