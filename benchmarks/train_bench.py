"""Training throughput (tokens/s, MFU estimate, step time) of the real loop, one process or torchrun.

    .venv/bin/python benchmarks/train_bench.py                 # tiny model, synthetic batches
    .venv/bin/python benchmarks/train_bench.py --size base     # flan-t5-base dimensions, random init
    .venv/bin/python benchmarks/train_bench.py --nproc 2       # under torchrun
    .venv/bin/python benchmarks/train_bench.py --data deeplake --compare-prefetch 2
        # a real ingested Deep Lake dataset through pipeline.loader; runs data.prefetch=0 and data.prefetch=2
        # alternately (--repeats pairs, side by side in one invocation) and prints both step times and the ratio

Tokens = encoder positions in use + target tokens. Step time = median wall time between consecutive steps'
metric records, after the first `--warmup` steps; input wait = median time a step waited for its batch
(reading, collation, tokenisation not hidden by prefetching; the loop logs it as `input_wait_ms`).
Record results in benchmarks/results/train.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_dataset(out: Path, videos: int, d_clip: int, d_audio: int) -> str:
    """An ingested Deep Lake dataset of `videos` synthetic videos (the ingest benchmark's upstream), its URL."""
    sys.path.insert(0, str(REPO))
    from benchmarks.ingest_bench import ingest_config, make_upstream, run_ingest_shards
    from pipeline.stages.ingest import write_dataset

    run = make_upstream(out / "run", n_videos=videos, num_shards=2, seconds=60.0, fps=1.0, d_clip=d_clip,
                        d_audio=d_audio, seed=0)
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    return write_dataset(cfg, log=lambda s: None)["dataset"]


def run_once(args, overrides: list[str], tmp: str, tag: str) -> dict:
    run_dir = f"{tmp}/run-{tag}"
    base = [f"run_dir={run_dir}", f"train.max_steps={args.steps}", f"train.log_every={args.log_every}",
            "train.eval_every=0", "checkpoint.every=0", "logging.tensorboard=false",
            f"data.batch_size={args.batch_size}", f"train.peak_flops_per_device={args.peak_flops}"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
                if args.nproc else [sys.executable])
    proc = subprocess.run(launcher + ["-m", "pipeline.train", *base, *overrides, *args.extra], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if proc.returncode != 0:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r][1:]     # the first interval includes warm-up
    times = [r["time"] for r in records if "loss" in r][args.warmup:]
    summary = json.loads(proc.stdout.split("summary ", 1)[1].splitlines()[0])
    waits = [r["input_wait_ms"] for r in records if "input_wait_ms" in r][args.warmup:]
    return {"params": summary["params"], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "mfu": statistics.median(r["mfu"] for r in timed), "input_wait_ms": statistics.median(waits),
            "step_ms": 1000 * statistics.median(b - a for a, b in zip(times, times[1:]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "base", "large"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the step time")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=0)
    ap.add_argument("--peak-flops", type=float, default=1.0e12, help="per device, for the MFU estimate")
    ap.add_argument("--data", default="synthetic", choices=["synthetic", "deeplake"])
    ap.add_argument("--videos", type=int, default=40, help="--data deeplake: videos (60 s each) in the dataset")
    ap.add_argument("--compare-prefetch", type=int, default=None, metavar="N",
                    help="run data.prefetch=0 and data.prefetch=N alternately and report the ratio")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs for --compare-prefetch")
    ap.add_argument("extra", nargs="*", help="more overrides, e.g. train.activation_checkpointing=true")
    args = ap.parse_args()

    d_clip = 768 if args.size != "tiny" else 128
    with tempfile.TemporaryDirectory() as tmp:
        overrides = []
        if args.size != "tiny":
            overrides += [f"model.backbone=random-{args.size}", "model.d_clip=768", "data.synthetic.d_clip=768"]
        if args.data == "deeplake":
            url = build_dataset(Path(tmp), args.videos, d_clip, 2048)
            overrides += ["data.source=pipeline.loader:build_source", f"data.path={url}",
                          "data.loader.split_fractions=[1,0,0]", f"model.d_clip={d_clip}", "model.d_audio=2048"]
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
        head = {"size": args.size, "data": args.data, "batch_size_per_rank": args.batch_size,
                "nproc": args.nproc or 1, "steps": args.steps, "machine": machine,
                "date": datetime.date.today().isoformat(), "extra": args.extra}
        if args.compare_prefetch is None:
            r = run_once(args, overrides, tmp, "run")
            print(json.dumps(head | {"params": r["params"], "tokens_per_s": round(r["tokens_per_s"], 1),
                                     "mfu_at_peak_flops": r["mfu"], "peak_flops": args.peak_flops,
                                     "step_ms": round(r["step_ms"], 2)}))
            return
        runs: dict[int, list[dict]] = {0: [], args.compare_prefetch: []}
        for k in range(args.repeats):           # alternate, so both see the same (shared, noisy) machine
            for depth in (0, args.compare_prefetch):
                runs[depth].append(run_once(args, overrides + [f"data.prefetch={depth}"], tmp, f"{depth}-{k}"))
    off = statistics.median(r["step_ms"] for r in runs[0])
    on = statistics.median(r["step_ms"] for r in runs[args.compare_prefetch])
    print(json.dumps(head | {
        "step_ms_prefetch_0": round(off, 2), f"step_ms_prefetch_{args.compare_prefetch}": round(on, 2),
        "ratio_off_over_on": round(off / on, 3),
        "runs_step_ms": {str(d): [round(r["step_ms"], 2) for r in rs] for d, rs in runs.items()},
        "input_wait_ms": {str(d): [round(r["input_wait_ms"], 3) for r in rs] for d, rs in runs.items()},
        "tokens_per_s": {str(d): round(statistics.median(r["tokens_per_s"] for r in rs), 1)
                         for d, rs in runs.items()},
        "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
