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
"""
from __future__ import annotations

import io
import json
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .atomic import read_json, write_bytes, write_text
from .errors import ConfigError
from .manifest import GEOMETRY_FILE
from .shards import FAILED, LEDGER, OK, SKIPPED, ShardStore
from .stages import STAGES
from .status import StageStatus, stage_status

REPORT_DIR = "report"
REPORT_FILE = "report.md"
PRETRAIN_DIR = "pretrain"
# The VQA step's own run dir is <run_dir>/vqa and it writes its evaluation under <that>/vqa/.
VQA_METRICS_CANDIDATES = (Path("vqa") / "vqa" / "metrics.json", Path("vqa") / "metrics.json")
VQA_METRICS = VQA_METRICS_CANDIDATES[0]


# --------------------------------------------------------------------------------------------- collection


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

    from .stages import get_stage

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
        from .stages.ingest import dataset_url

        path = run_dir / "ingest" / "config.yaml"
        stage_cfg = {}
        if path.exists():
            from omegaconf import OmegaConf

            stage_cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("stage") or {}
        url = dataset_url(stage_cfg, run_dir)
        import deeplake

        if not deeplake.exists(url):
            return None, url
        return len(deeplake.open_read_only(url)), url
    except Exception as exc:  # the report must not die on an unreadable dataset: it says so instead
        return None, f"unreadable ({type(exc).__name__}: {exc})"


# ------------------------------------------------------------------------------------------------ plots


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stage_items(stages: list[StageReport], num_items: int) -> bytes:
    plt = _pyplot()
    names = [s.name for s in stages]
    ok = [s.status.items.get(OK, 0) for s in stages]
    failed = [s.status.items.get(FAILED, 0) for s in stages]
    skipped = [s.status.items.get(SKIPPED, 0) for s in stages]
    pending = [max(0, num_items - a - b - c) for a, b, c in zip(ok, failed, skipped)]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.6))
    left = [0] * len(names)
    for values, label, color in ((ok, "ok", "#4c9a4c"), (failed, "failed", "#c44e52"),
                                 (skipped, "skipped", "#dd8452"), (pending, "not processed", "#bbbbbb")):
        ax.barh(names, values, left=left, label=label, color=color)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("videos")
    ax.set_title(f"Videos per stage ({num_items} in the manifest)", pad=24)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def plot_cuts_histogram(values: list[float]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    bins = min(30, max(5, int(math.sqrt(len(values))) + 1))
    counts, _, _ = ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
    ax.set_ylim(0, max(counts) * 1.25)    # headroom for the legend
    ax.axvline(statistics.median(values), color="#c44e52", linestyle="--",
               label=f"median {statistics.median(values):.1f}")
    ax.set_xlabel("cuts per minute")
    ax.set_ylabel("videos")
    ax.set_title(f"Cuts per minute ({len(values)} videos)")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    return _png(fig)


def _smooth(values: list[float]) -> list[float]:
    """Centered moving mean (no lag, unlike an EMA), about 1/25 of the run wide."""
    half = max(1, len(values) // 50)
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def plot_losses(curves: dict[str, list[dict]]) -> bytes:
    """One panel per training run (pretrain, finetune): train loss (raw + smoothed) and eval loss points."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 3.8), squeeze=False)
    for ax, (title, records) in zip(axes[0], curves.items()):
        train = [(r["step"], float(r["loss"])) for r in records if _finite(r.get("loss"))]
        evals = [(r["step"], float(r["eval_loss"])) for r in records if _finite(r.get("eval_loss"))]
        if train:
            steps, loss = zip(*train)
            ax.plot(steps, loss, color="#4c72b0", alpha=0.3, linewidth=0.8, label="train loss")
            ax.plot(steps, _smooth(list(loss)), color="#4c72b0", linewidth=1.8, label="train loss (smoothed)")
        if evals:
            steps, loss = zip(*evals)
            ax.plot(steps, loss, "o-", color="#c44e52", label="eval loss")
        values = [v for _, v in train + evals]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def plot_vqa(rows: list[tuple[str, float | None, float | None]]) -> bytes:
    """Grouped bars: model accuracy vs the majority-answer baseline, overall and per answer type."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(rows) + 2), 3.8))
    x = list(range(len(rows)))
    width = 0.38
    model = [r[1] if r[1] is not None else 0.0 for r in rows]
    base = [r[2] if r[2] is not None else 0.0 for r in rows]
    bars_m = ax.bar([i - width / 2 for i in x], model, width, label="model", color="#4c72b0")
    bars_b = ax.bar([i + width / 2 for i in x], base, width, label="majority baseline", color="#bbbbbb")
    for bars, src in ((bars_m, [r[1] for r in rows]), (bars_b, [r[2] for r in rows])):
        for bar, value in zip(bars, src):
            ax.annotate("n/a" if value is None else f"{value:.1f}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r[0] for r in rows])
    ax.set_ylim(0, 105)
    ax.set_ylabel("VQA accuracy (%)")
    ax.set_title("VQA accuracy vs majority baseline")
    ax.legend(fontsize=8)
    return _png(fig)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# --------------------------------------------------------------------------------------------- markdown


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and abs(v) < 10 ** -digits:
            return f"{v:.{digits}g}"
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |")
    return out


def _vqa_value(metrics: dict, *keys: str) -> float | None:
    for key in keys:
        v = metrics
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if _finite(v):
            return float(v)
    return None


class Report:
    """Collects the run's numbers, renders the plots and the markdown."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.out_dir = self.run_dir / REPORT_DIR
        self.header: list[str] = []
        self.lines: list[str] = []
        self.plots: dict[str, bytes] = {}
        self.missing: list[str] = []

    # -- sections ---------------------------------------------------------------------------------------------
    def build(self) -> str:
        geo = read_json(self.run_dir / GEOMETRY_FILE)
        self.header = [f"# Run report: `{self.run_dir.name}`", "",
                       (f"Run directory `{self.run_dir.resolve()}`, report made "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}."), ""]
        if geo is None:
            self.missing.append("the whole run: no `geometry.json` (no stage has been launched here)")
            return self._finish()
        self.num_items, self.num_shards = int(geo["num_items"]), int(geo["num_shards"])
        self.header += [f"**{self.num_items} videos** in the manifest, **{self.num_shards} shard(s)**.", ""]
        self.stages = [collect_stage(self.run_dir, s, self.num_shards) for s in STAGES
                       if (self.run_dir / s).is_dir()]
        for s in STAGES:
            if not (self.run_dir / s).is_dir():
                self.missing.append(f"stage `{s}`: not run yet")
        for rep in self.stages:
            left = self.num_items - sum(rep.status.items.values())
            if left > 0:
                self.missing.append(f"stage `{rep.name}`: {left} video(s) not processed yet "
                                    f"({rep.status.shards_done}/{rep.status.shards_total} shards complete)")
        self.section_items()
        self.section_failures()
        self.section_throughput()
        self.section_cost()
        self.section_cuts()
        self.section_training()
        self.section_vqa()
        return self._finish()

    def _finish(self) -> str:
        missing = ["## Missing", ""]
        missing += [f"- {m}" for m in self.missing] if self.missing else ["Nothing: every part of the run is here."]
        return "\n".join(self.header + missing + [""] + self.lines).rstrip() + "\n"

    def _plot(self, name: str, png: bytes, alt: str) -> None:
        self.plots[name] = png
        self.lines += [f"![{alt}]({name})", ""]

    def section_items(self) -> None:
        self.lines += ["## Videos and segments per stage", ""]
        if not self.stages:
            self.lines += ["No stage has outputs yet.", ""]
            return
        rows = []
        for rep in self.stages:
            st = rep.status
            left = max(0, self.num_items - sum(st.items.values()))
            outputs = ", ".join(f"{t} {n:,}" for t, n in sorted(rep.outputs.items())) or "-"
            rows.append([rep.name, f"{st.shards_done}/{st.shards_total}", st.items.get(OK, 0),
                         st.items.get(FAILED, 0), st.items.get(SKIPPED, 0), left, outputs])
        self.lines += _table(["stage", "shards done", "ok", "failed", "skipped", "not processed",
                              "output rows (complete shards)"], rows)
        self.lines.append("")
        by_name = {r.name: r for r in self.stages}
        facts = []
        if "asr" in by_name:
            facts.append(f"ASR segments: **{by_name['asr'].outputs.get('segments', 0):,}**")
        if "ingest" in by_name:
            facts.append(f"ingest rows (joined segments): **{by_name['ingest'].outputs.get('rows', 0):,}**")
            n, url = dataset_rows(self.run_dir)
            if n is None:
                facts.append(f"Deep Lake dataset: none at {url}")
                self.missing.append(f"Deep Lake dataset: none at {url} (ingest's finish step has not run)")
            else:
                facts.append(f"Deep Lake dataset rows: **{n:,}** ({url})")
        if facts:
            self.lines += [f"- {f}" for f in facts] + [""]
        self._plot("videos_per_stage.png", plot_stage_items(self.stages, self.num_items), "videos per stage")

    def section_failures(self) -> None:
        self.lines += ["## Failures by reason", "",
                       ("Reasons are grouped by category (the part before the first `:`); `skipped: upstream_*` "
                       "means an earlier stage failed or skipped that video."), ""]
        rows = []
        for rep in self.stages:
            for key, count in rep.status.reasons.most_common():
                status, category = key.split(": ", 1)
                example = rep.reason_examples.get(key, "")
                rows.append([rep.name, status, category, count,
                             example if len(example) <= 120 else example[:117] + "..."])
        if rows:
            self.lines += _table(["stage", "status", "category", "videos", "example"], rows)
        else:
            self.lines.append("No failed or skipped videos.")
        self.lines.append("")

    def section_throughput(self) -> None:
        self.lines += ["## Throughput", "",
                       ("Task seconds are summed over the stage's complete shards; items/s = videos processed / "
                       "task seconds; model busy = fraction of the model actor's window spent in the model "
                       "(mean over shards; stages without a model have none)."), ""]
        rows = []
        for rep in self.stages:
            st = rep.status
            rows.append([rep.name, st.shards_done, _fmt(st.seconds, 1), st.processed,
                         _fmt(st.extra.get("items_per_s"), 3), _fmt(st.extra.get("model_busy_fraction"), 2),
                         _fmt(rep.model_load_s, 1) if rep.model_load_s else "-", _fmt(rep.peak_rss_mb, 0)])
        self.lines += _table(["stage", "shards", "task seconds", "processed", "items/s", "model busy",
                              "model load s", "peak RSS MB"], rows)
        self.lines.append("")

    def section_cost(self) -> None:
        self.lines += ["## Cost per video-hour", ""]
        durations, source = video_durations(self.run_dir, self.num_shards)
        hours = sum(durations) / 3600.0
        if not durations:
            self.lines += ["No video durations yet (the download stage has no `videos` rows): cannot compute.", ""]
            return
        self.lines += [
            (f"Video: **{len(durations)} videos, {hours * 60:.2f} minutes ({hours:.4f} h)** (durations from the "
            f"`{source}` stage)."),
            "",
            "Accelerator-seconds per hour of video. A stage whose resources ask for GPUs counts **GPU-seconds** = "
            "task seconds x GPUs x nodes; a CPU-only stage counts **CPU-core-seconds** = task seconds x CPUs x "
            "nodes (the cores one task reserves). Resources are those in `<stage>/config.yaml`."
            + (" The local launcher does not reserve resources: the figures are what a cluster allocation of "
               "that size would spend for the same task time." if any(r.launcher == "local" for r in self.stages)
               else ""),
            ""]
        rows, totals = [], Counter()
        for rep in self.stages:
            unit = "GPU-s" if rep.gpus_per_task else "CPU-core-s"
            per_task = (f"{rep.gpus_per_task} GPU" if rep.gpus_per_task else f"{rep.cpus_per_task} CPU")
            per_hour = rep.accelerator_seconds / hours
            totals[unit] += per_hour
            rows.append([rep.name, f"{per_task} ({rep.resources_source}"
                                   + (f", launcher {rep.launcher})" if rep.launcher else ")"),
                         _fmt(rep.status.seconds, 1), _fmt(rep.accelerator_seconds, 1), unit,
                         f"**{_fmt(per_hour, 1)}**"])
        self.lines += _table(["stage", "per task", "task seconds", "accelerator-seconds", "unit",
                              "per video-hour"], rows)
        self.lines += ["", "Total per video-hour: " + ", ".join(f"**{_fmt(v, 1)} {u}**"
                                                               for u, v in sorted(totals.items())), ""]

    def section_cuts(self) -> None:
        self.lines += ["## Cuts per minute", ""]
        data = cuts_per_minute(self.run_dir, self.num_shards)
        values = data["cuts_per_minute"]
        if not values:
            self.lines += ["No frames-stage `videos` rows yet.", ""]
            if (self.run_dir / "frames").is_dir():
                self.missing.append("cuts per minute: the frames stage has no `videos` rows")
            return
        q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
        self.lines += _table(["videos", "mean", "median", "p10", "p90", "min", "max", "low-cut videos",
                              "fixed-rate fallback"],
                             [[len(values), _fmt(statistics.fmean(values)), _fmt(statistics.median(values)),
                               _fmt(q[0]), _fmt(q[-1]), _fmt(min(values)), _fmt(max(values)),
                               sum(1 for x in data["low_cut"] if x), sum(1 for x in data["fallback"] if x)]])
        self.lines.append("")
        self._plot("cuts_per_minute.png", plot_cuts_histogram(values), "cuts per minute histogram")

    def section_training(self) -> None:
        self.lines += ["## Training", ""]
        curves: dict[str, list[dict]] = {}
        pre = read_metrics_jsonl(self.run_dir / PRETRAIN_DIR / "metrics.jsonl")
        if pre:
            curves["pretraining"] = pre
        else:
            self.missing.append(f"pretraining: no `{PRETRAIN_DIR}/metrics.jsonl`")
        # The finetuning log, if it was written under vqa/ (no recursive glob: vqa/ may hold an image set).
        vqa_logs = [self.run_dir / "vqa" / "metrics.jsonl", *sorted((self.run_dir / "vqa").glob("*/metrics.jsonl"))]
        for path in [p for p in vqa_logs if p.exists()][:1]:
            records = read_metrics_jsonl(path)
            if records:
                curves["VQA finetuning"] = records
        if not curves:
            self.lines += ["No training metrics yet.", ""]
            return
        rows = []
        for title, records in curves.items():
            losses = [float(r["loss"]) for r in records if _finite(r.get("loss"))]
            evals = [(r["step"], float(r["eval_loss"])) for r in records if _finite(r.get("eval_loss"))]
            tps = [float(r["tokens_per_s"]) for r in records if _finite(r.get("tokens_per_s"))]
            wall = records[-1].get("time", 0) - records[0].get("time", 0) if "time" in records[0] else None
            rows.append([title, records[-1]["step"], _fmt(losses[0] if losses else None, 3),
                         _fmt(losses[-1] if losses else None, 3), _fmt(min(losses) if losses else None, 3),
                         ", ".join(f"{_fmt(v, 3)} @ {s}" for s, v in evals[-3:]) or "none recorded",
                         _fmt(tps[-1] if tps else None, 0), _fmt(wall, 0)])
        self.lines += _table(["run", "last step", "first loss", "last loss", "min loss",
                              "eval loss (last 3 evals)", "tokens/s (last)", "wall s"], rows)
        self.lines.append("")
        self._plot("loss_curves.png", plot_losses(curves), "training and eval loss")

    def section_vqa(self) -> None:
        self.lines += ["## VQA accuracy", ""]
        path = next((self.run_dir / p for p in VQA_METRICS_CANDIDATES if (self.run_dir / p).exists()),
                    self.run_dir / VQA_METRICS)
        metrics = read_json(path)
        if not isinstance(metrics, dict):
            self.lines += [f"No VQA evaluation yet (`{VQA_METRICS}` not found).", ""]
            self.missing.append(f"VQA evaluation: no `{VQA_METRICS}`")
            return
        acc = _vqa_value(metrics, "accuracy", "overall")
        base = _vqa_value(metrics, "majority_baseline", "baselines.global.overall")
        prior = _vqa_value(metrics, "per_question_type_prior", "baselines.per_question_type.overall")
        n = metrics.get("n_eval_questions")
        answer = metrics.get("majority_answer", (metrics.get("baselines") or {}).get("global", {}).get("answer"))
        margin = acc - base if acc is not None and base is not None else None
        self.lines += [
            f"Official VQA accuracy (percent) on **{_fmt(n)}** held-out questions: model **{_fmt(acc)}%** vs "
            f"majority baseline **{_fmt(base)}%** (always answering {answer!r}); margin "
            f"**{'+' if margin and margin > 0 else ''}{_fmt(margin)}** points."
            + (f" Per-question-type prior: {_fmt(prior)}%." if prior is not None else ""), ""]
        per_type = metrics.get("per_answer_type") or {}
        base_type = ((metrics.get("baselines") or {}).get("global") or {}).get("per_answer_type") or {}
        rows = [("overall", acc, base)]
        for kind in sorted(set(per_type) | set(base_type)):
            m, b = per_type.get(kind), base_type.get(kind)
            rows.append((kind, float(m) if _finite(m) else None, float(b) if _finite(b) else None))
        self.lines += _table(["answer type", "model %", "majority baseline %"],
                             [[k, _fmt(m), _fmt(b)] for k, m, b in rows])
        self.lines.append("")
        extra = {k: metrics.get(k) for k in ("finetune_mode", "init_from", "n_train_questions") if k in metrics}
        if extra:
            self.lines += ["- " + ", ".join(f"{k}: `{v}`" for k, v in extra.items()), ""]
        self._plot("vqa_accuracy.png", plot_vqa(rows), "VQA accuracy vs majority baseline")

    # -- output -----------------------------------------------------------------------------------------------
    def write(self) -> Path:
        markdown = self.build()
        for name, png in self.plots.items():
            write_bytes(self.out_dir / name, png)
        path = self.out_dir / REPORT_FILE
        write_text(path, markdown)   # last: a report.md never links a plot that is not there
        return path


def write_report(run_dir: str | Path) -> Path:
    """Write `<run_dir>/report/report.md` and its plots; returns the markdown's path."""
    return Report(run_dir).write()


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
    from .cli import command_main

    return command_main(cli, argv)


if __name__ == "__main__":
    from .dataset_health import exit_skipping_native_teardown

    exit_skipping_native_teardown(main())
