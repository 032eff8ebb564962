"""Where a training run keeps what (torch-free, so `python -m pipeline status` can read it quickly).

    <run_dir>/metrics.jsonl              one JSON record per logged step (loss, eval_loss, lr, tokens/s, ...)
    <run_dir>/checkpoints/step-NNNNNNNN/ one checkpoint (see pipeline.train.checkpoint); complete once meta.json exists
    <run_dir>/vqa/metrics.json           VQA finetuning: accuracy beside the majority baseline

and where `workflows/demo.yaml` puts its runs under the pipeline's run dir:

    <run_dir>/pretrain/                  the pretraining run
    <run_dir>/vqa/                       the VQA finetuning run (so its metrics are <run_dir>/vqa/vqa/metrics.json)
    <run_dir>/report/report.md           the run report (`python -m pipeline report`)

Every module that reads or writes these paths takes them from here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META = "meta.json"
METRICS_LOG = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
VQA_DIR = "vqa"
VQA_METRICS = "metrics.json"
PRETRAIN_RUN = "pretrain"
VQA_RUN = "vqa"
REPORT_DIR = "report"
REPORT_FILE = "report.md"


def metrics_log(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS_LOG


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def vqa_metrics(run_dir: str | Path) -> Path:
    """The metrics of a VQA finetuning run whose run_dir is `run_dir`."""
    return Path(run_dir) / VQA_DIR / VQA_METRICS


def report_file(run_dir: str | Path) -> Path:
    """The markdown report of a pipeline run."""
    return Path(run_dir) / REPORT_DIR / REPORT_FILE


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """(step, dir, meta) of every complete checkpoint under `root`, oldest first."""
    out = []
    for d in Path(root).glob("step-*"):
        meta_file = d / META
        if d.is_dir() and meta_file.exists():
            meta = json.loads(meta_file.read_text())
            out.append((int(meta["step"]), d, meta))
    return sorted(out, key=lambda x: x[0])
