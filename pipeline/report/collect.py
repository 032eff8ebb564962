"""What a report reads: the run's geometry, each stage's ledgers, shard tables, stats and config, the video
durations, cuts per minute, the training logs, the VQA metrics and the Deep Lake dataset's row count."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..atomic import read_json
from ..shards import FAILED, LEDGER, SKIPPED, ShardStore
from ..status import StageStatus, stage_status
from ..train.layout import METRICS_LOG, PRETRAIN_RUN, VQA_DIR, VQA_RUN
from ..train.layout import VQA_METRICS as _VQA_METRICS_FILE

PRETRAIN_DIR = PRETRAIN_RUN
# The VQA step's own run dir is <run_dir>/vqa and it writes its evaluation under <that>/vqa/.
VQA_METRICS_CANDIDATES = (Path(VQA_RUN) / VQA_DIR / _VQA_METRICS_FILE, Path(VQA_RUN) / _VQA_METRICS_FILE)
VQA_METRICS = VQA_METRICS_CANDIDATES[0]


@dataclass
class StageReport:
    """What one stage did, from its ledgers, shard tables, stats and config."""
    status: StageStatus
    outputs: Counter = field(default_factory=Counter)          # table -> rows, over complete shards
    reason_examples: dict[str, str] = field(default_factory=dict)  # "status: category" -> one full reason
    peak_rss_mb: float | None = None
    model_load_s: float = 0.0
    resources: dict[str, Any] = field(default_factory=dict)
    resources_source: str = ""                                  # "config.yaml" or "stage defaults"
    launcher: str | None = None

    @property
    def name(self) -> str:
        return self.status.stage

    @property
    def gpus_per_task(self) -> int:
        return int(self.resources.get("gpus", 0) or 0) * int(self.resources.get("nodes", 1) or 1)

    @property
    def cpus_per_task(self) -> int:
        return int(self.resources.get("cpus", 1) or 1) * int(self.resources.get("nodes", 1) or 1)

    @property
    def accelerator(self) -> str:
        return "GPU" if self.gpus_per_task else "CPU core"

    @property
    def accelerator_seconds(self) -> float:
        return self.status.seconds * (self.gpus_per_task or self.cpus_per_task)


def _stage_resources(run_dir: Path, stage: str) -> tuple[dict[str, Any], str, str | None]:
    """(resources, where they came from, launcher name) of the config the stage ran with."""
    path = run_dir / stage / "config.yaml"
    if path.exists():
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        res = (cfg.get("stage") or {}).get("resources") or {}
        return dict(res), "config.yaml", (cfg.get("launcher") or {}).get("name")
    from dataclasses import asdict

    from ..stages import get_stage

    return asdict(get_stage(stage).Config().resources), "stage defaults", None


def collect_stage(run_dir: Path, stage: str, num_shards: int) -> StageReport:
    rep = StageReport(stage_status(run_dir, stage, num_shards))
    for shard in range(num_shards):
        store = ShardStore(run_dir, stage, shard)
        if not store.is_complete():
            continue
        for path in store.dir.glob("*.parquet"):
            table = path.name[: -len(".parquet")]
            if table != LEDGER:
                rep.outputs[table] += pq.ParquetFile(path).metadata.num_rows
        stats = store.stats()
        if "peak_rss_mb" in stats:
            rep.peak_rss_mb = max(rep.peak_rss_mb or 0.0, float(stats["peak_rss_mb"]))
        rep.model_load_s += float(stats.get("model_load_s", 0.0))
        for row in store.read_ledger():
            if row["status"] in (FAILED, SKIPPED):
                key = f"{row['status']}: {(row['reason'] or 'unknown').split(':', 1)[0].strip() or 'unknown'}"
                rep.reason_examples.setdefault(key, f"{row['video_id']}: {row['reason']}")
    rep.resources, rep.resources_source, rep.launcher = _stage_resources(run_dir, stage)
    return rep


def video_durations(run_dir: Path, num_shards: int) -> tuple[list[float], str]:
    """Durations (s) of the downloaded videos (download stage), else of the frames stage's videos."""
    for stage in ("download", "frames"):
        durations = []
        for shard in range(num_shards):
            table = ShardStore(run_dir, stage, shard).read_table("videos")
            if table is not None and "duration" in table.column_names:
                durations += [float(d) for d in table.column("duration").to_pylist() if d is not None and d > 0]
        if durations:
            return durations, stage
    return [], ""


def cuts_per_minute(run_dir: Path, num_shards: int) -> dict[str, list]:
    out: dict[str, list] = {"cuts_per_minute": [], "low_cut": [], "fallback": []}
    for shard in range(num_shards):
        table = ShardStore(run_dir, "frames", shard).read_table("videos")
        if table is None:
            continue
        for name in out:
            if name in table.column_names:
                out[name] += table.column(name).to_pylist()
    out["cuts_per_minute"] = [float(c) for c in out["cuts_per_minute"] if c is not None]
    return out


def read_metrics_jsonl(path: Path) -> list[dict]:
    """Per-step training records; a resumed run appends, so the last record of a step wins."""
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:   # a line torn by a kill: skip it
            continue
        if "step" in rec:
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def dataset_rows(run_dir: Path) -> tuple[int | None, str]:
    """Rows of the Deep Lake dataset the ingest stage wrote (None if there is none), and its URL."""
    try:
        from ..dataset.layout import dataset_url

        path = run_dir / "ingest" / "config.yaml"
        stage_cfg = {}
        if path.exists():
            from omegaconf import OmegaConf

            stage_cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("stage") or {}
        url = dataset_url(stage_cfg, run_dir)
        from ..dataset import exists, open_read_only     # one dataset, or every shard group's as one

        if not exists(url):
            return None, url
        return len(open_read_only(url)), url
    except Exception as exc:  # the report must not die on an unreadable dataset: it says so instead
        return None, f"unreadable ({type(exc).__name__}: {exc})"


def finetune_metrics(run_dir: Path) -> list[dict]:
    """The VQA finetuning log, if it was written under vqa/ (no recursive glob: vqa/ may hold an image set)."""
    logs = [run_dir / VQA_RUN / METRICS_LOG, *sorted((run_dir / VQA_RUN).glob(f"*/{METRICS_LOG}"))]
    for path in [p for p in logs if p.exists()][:1]:
        return read_metrics_jsonl(path)
    return []


def vqa_metrics(run_dir: Path) -> dict | None:
    """The VQA evaluation's metrics.json (None if there is none or it is unreadable)."""
    path = next((run_dir / p for p in VQA_METRICS_CANDIDATES if (run_dir / p).exists()), run_dir / VQA_METRICS)
    metrics = read_json(path)
    return metrics if isinstance(metrics, dict) else None


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
