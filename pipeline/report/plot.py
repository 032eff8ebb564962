"""The report's plots: matplotlib (Agg) figures rendered to PNG bytes."""
from __future__ import annotations

import io
import math
import statistics

from ..shards import FAILED, OK, SKIPPED
from .collect import StageReport
from .collect import finite as _finite


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
