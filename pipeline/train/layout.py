"""Where a training run keeps what (torch-free, so `python -m pipeline status` can read it quickly).

    <run_dir>/metrics.jsonl              one JSON record per logged step (loss, eval_loss, lr, tokens/s, ...)
    <run_dir>/checkpoints/step-NNNNNNNN/ one checkpoint (see pipeline.train.checkpoint); complete once meta.json exists
    <run_dir>/vqa/metrics.json           VQA finetuning: accuracy beside the majority baseline
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META = "meta.json"


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
