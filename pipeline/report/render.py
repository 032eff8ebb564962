"""The report's markdown: one section per part of the run, the plots linked relatively, what is missing listed
first; written atomically (plots first, the markdown last)."""
from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..atomic import read_json, write_bytes, write_text
from ..manifest import GEOMETRY_FILE
from ..shards import FAILED, OK, SKIPPED
from ..stages import STAGES
from ..train.layout import METRICS_LOG, REPORT_DIR, REPORT_FILE  # noqa: F401 - REPORT_*: re-exported
from .collect import (PRETRAIN_DIR, VQA_METRICS, collect_stage, cuts_per_minute, dataset_rows, finetune_metrics,
                      read_metrics_jsonl, video_durations, vqa_metrics)
from .collect import finite as _finite
from .plot import plot_cuts_histogram, plot_losses, plot_stage_items, plot_vqa


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
        pre = read_metrics_jsonl(self.run_dir / PRETRAIN_DIR / METRICS_LOG)
        if pre:
            curves["pretraining"] = pre
        else:
            self.missing.append(f"pretraining: no `{PRETRAIN_DIR}/metrics.jsonl`")
        finetune = finetune_metrics(self.run_dir)
        if finetune:
            curves["VQA finetuning"] = finetune
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
        metrics = vqa_metrics(self.run_dir)
        if metrics is None:
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
