"""Training throughput (tokens/s, MFU estimate) of the real loop, one process, synthetic batches.

    .venv/bin/python benchmarks/train_bench.py                 # tiny model
    .venv/bin/python benchmarks/train_bench.py --size base     # flan-t5-base dimensions, random init
    .venv/bin/python benchmarks/train_bench.py --nproc 2       # under torchrun

Tokens = encoder positions in use + target tokens. Record results in benchmarks/results/train.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "base", "large"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=0)
    ap.add_argument("--peak-flops", type=float, default=1.0e12, help="per device, for the MFU estimate")
    ap.add_argument("extra", nargs="*", help="more overrides, e.g. train.activation_checkpointing=true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run_dir={tmp}/run", f"train.max_steps={args.steps}", f"train.log_every={args.log_every}",
                     "train.eval_every=0", "checkpoint.every=0", "logging.tensorboard=false",
                     f"data.batch_size={args.batch_size}", f"train.peak_flops_per_device={args.peak_flops}"]
        if args.size != "tiny":
            overrides += [f"model.backbone=random-{args.size}", "model.d_clip=768", "data.synthetic.d_clip=768"]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
                    if args.nproc else [sys.executable])
        proc = subprocess.run(launcher + ["-m", "pipeline.train", *overrides, *args.extra], cwd=REPO,
                              capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        if proc.returncode != 0:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        records = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r][1:]     # the first interval includes warm-up
    summary = json.loads(proc.stdout.split("summary ", 1)[1].splitlines()[0])
    rate = statistics.median(r["tokens_per_s"] for r in timed)
    print(json.dumps({
        "size": args.size, "params": summary["params"], "batch_size_per_rank": args.batch_size,
        "nproc": args.nproc or 1, "steps": args.steps, "tokens_per_s": round(rate, 1),
        "mfu_at_peak_flops": statistics.median(r["mfu"] for r in timed), "peak_flops": args.peak_flops,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus", "extra": args.extra}))


if __name__ == "__main__":
    main()
