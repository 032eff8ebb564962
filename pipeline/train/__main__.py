"""`python -m pipeline.train [key=value ...]` (Hydra-style overrides of conf/train/pretrain.yaml, composed onto
the schema `pipeline.train.config.PretrainConfig` registered in Hydra's ConfigStore; `--help` lists them), also
under torchrun. A bad key or value is one error line and exit status 2 before anything runs.
`python -m pipeline.train export CHECKPOINT_DIR OUT_DIR` writes a Hugging Face-format model."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.logs import configure
from pipeline.train.config import CONF_DIR, compose, usage, wants_help  # noqa: F401 - compose: public API


def check(cfg: dict[str, Any]) -> str:
    """What is wrong with a composed config that would otherwise only fail inside a (submitted) job; "" if nothing."""
    choices = {"device": ("auto", "cpu", "cuda"), "precision": ("auto", "bf16", "fp32"), "run_on": ("local", "slurm")}
    for key, allowed in choices.items():
        if cfg.get(key, allowed[0]) not in allowed:
            return f"{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}"
    if cfg.get("run_on") == "slurm":
        from pipeline.train.launch import executor_parameters

        try:
            executor_parameters(cfg["slurm"])
        except (ValueError, TypeError) as exc:
            return str(exc)
    return ""


log = logging.getLogger(__name__)


def rank() -> int:
    """This process's global rank (torchrun: RANK; a Slurm task: SLURM_PROCID); 0 outside a launcher."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def main(argv: list[str]) -> int:
    configure(rank=rank())          # rank 0 logs at INFO, the other ranks warnings and errors
    if argv[:1] == ["export"]:
        if len(argv) != 3:
            print("error: usage: python -m pipeline.train export CHECKPOINT_DIR OUT_DIR", file=sys.stderr)
            return 2
        from pipeline.train.checkpoint import export_hf
        print(export_hf(Path(argv[1]), Path(argv[2])))
        return 0
    if wants_help(argv):
        try:
            print(usage("train/pretrain", [a for a in argv if a not in ("-h", "--help")]))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = compose(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bad = check(cfg)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    if cfg.get("run_on") == "slurm":
        from pipeline.train.launch import submit
        job = submit(cfg)
        if cfg["slurm"]["wait"]:
            print("summary " + json.dumps(job.results()[0]), flush=True)
        return 0
    from pipeline.train.loop import train
    summary = train(cfg)
    if summary.get("start_step") is not None:
        print("summary " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
