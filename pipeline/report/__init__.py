"""Run report: `python -m pipeline report run_dir=<dir>` writes `<run_dir>/report/report.md` and PNG plots.

Everything is read from what the run left on disk, so a report can be made at any time (a partial run gets a
partial report that says what is missing):
- per stage: videos ok / failed / skipped / not yet processed and output rows (ledgers, shard tables), failures
  by reason category (ledgers), throughput and model-busy fraction (shard `stats.json`);
- cost per video-hour: per stage, accelerator-seconds per hour of downloaded video. A stage whose resources ask
  for GPUs costs task-seconds x GPUs x nodes (GPU-seconds); a CPU-only stage costs task-seconds x CPUs x nodes
  (CPU-core-seconds). Resources come from `<stage>/config.yaml` (the config the stage ran with);
- cuts per minute (frames stage `videos` table), training / eval loss (`pretrain/metrics.jsonl`), VQA accuracy
  vs the majority-answer baseline (`vqa/metrics.json`).
Files are written atomically (plots first, the markdown last), plots are linked relatively.

Modules: `collect` (what is read from the run directory), `plot` (PNG figures), `render` (the markdown and the
files). `python -m pipeline.report run_dir=<dir>` runs the same command.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, command_main
from .collect import (PRETRAIN_DIR, VQA_METRICS, VQA_METRICS_CANDIDATES, StageReport, collect_stage,  # noqa: F401
                      cuts_per_minute, dataset_rows, finetune_metrics, read_metrics_jsonl, video_durations,
                      vqa_metrics)
from .plot import plot_cuts_histogram, plot_losses, plot_stage_items, plot_vqa  # noqa: F401
from .render import REPORT_DIR, REPORT_FILE, Report, write_report  # noqa: F401

__all__ = ["PRETRAIN_DIR", "REPORT_DIR", "REPORT_FILE", "VQA_METRICS", "VQA_METRICS_CANDIDATES", "Report",
           "StageReport", "cli", "collect_stage", "cuts_per_minute", "dataset_rows", "finetune_metrics", "main",
           "plot_cuts_histogram", "plot_losses", "plot_stage_items", "plot_vqa", "read_metrics_jsonl",
           "video_durations", "vqa_metrics", "write_report"]


def cli(overrides: list[str]) -> int:
    """`python -m pipeline report run_dir=<dir>`."""
    args = dict(o.split("=", 1) for o in overrides if "=" in o)
    unknown = sorted(set(args) - {"run_dir"}) + [o for o in overrides if "=" not in o]
    if unknown or "run_dir" not in args:
        raise ConfigError("usage: python -m pipeline report run_dir=<dir>")
    run_dir = Path(args["run_dir"])
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir not found: {run_dir}")
    print(write_report(run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main(cli, argv)
