"""What is done, failed and pending, per stage: `python -m pipeline status run_dir=<dir>`.

Data stages: shards and items per stage. Training runs (pretraining, VQA finetuning) found at run_dir or one level
below it: last step and losses, the latest complete checkpoint, and VQA accuracy beside its baseline.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import read_json, write_json
from .manifest import GEOMETRY_FILE
from .shards import FAILED, OK, SKIPPED, ShardStore, describe_owner, lease_owner, reason_category
from .stages import STAGES
from .train.layout import checkpoints_dir, complete_checkpoints, metrics_log, vqa_metrics


@dataclass
class StageStatus:
    stage: str
    shards_total: int
    shards_done: int = 0
    shards_failed: int = 0        # a task died on it (see its _FAILED) and it is not complete
    shards_partial: int = 0       # has progress parts but no marker: running, or killed and resumable
    items: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    processed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def shards_pending(self) -> int:
        return self.shards_total - self.shards_done - self.shards_failed - self.shards_partial

    def to_dict(self) -> dict:
        return {"stage": self.stage, "shards": {"total": self.shards_total, "done": self.shards_done,
                                                "failed": self.shards_failed, "partial": self.shards_partial,
                                                "pending": self.shards_pending},
                "items": dict(self.items), "failure_reasons": dict(self.reasons.most_common()),
                "seconds": self.seconds, "processed": self.processed, **self.extra}


def stage_status(run_dir: Path, stage: str, num_shards: int) -> StageStatus:
    st = StageStatus(stage, num_shards)
    busy, n_busy = 0.0, 0
    for shard in range(num_shards):
        store = ShardStore(run_dir, stage, shard)
        owner = lease_owner(store.dir)
        if owner is not None:  # leased by a live owner: running now
            st.extra.setdefault("running", {})[shard] = describe_owner(owner)
        if store.is_complete():
            st.shards_done += 1
            ledger = store.read_ledger()
            stats = store.stats()
            st.seconds += float(stats.get("seconds", 0.0))
            st.processed += int(stats.get("processed", 0))
            if "model_busy_fraction" in stats:
                busy += float(stats["model_busy_fraction"])
                n_busy += 1
        else:
            ledger, _ = store.read_parts() if store.parts_dir.exists() else ([], {})
            if store.failure() is not None:
                st.shards_failed += 1
            elif ledger:
                st.shards_partial += 1
        for row in ledger:
            st.items[row["status"]] += 1
            if row["status"] in (FAILED, SKIPPED):
                st.reasons[f"{row['status']}: {reason_category(row['reason'])}"] += 1
    if st.processed and st.seconds:
        st.extra["items_per_s"] = st.processed / st.seconds
    if n_busy:
        st.extra["model_busy_fraction"] = busy / n_busy
    return st


def run_status(run_dir: str | Path) -> list[StageStatus]:
    run_dir = Path(run_dir)
    geo = read_json(run_dir / GEOMETRY_FILE)
    if geo is None:
        return []
    n = int(geo["num_shards"])
    names = [s for s in STAGES if (run_dir / s).is_dir()]
    out = [stage_status(run_dir, s, n) for s in names]
    for st in out:
        if st.stage == "ingest":
            dataset_status(run_dir, st)
    return out


def dataset_status(run_dir: Path, st: StageStatus) -> None:
    """The ingest dataset's head (local datasets): an unreadable one means ingest is not done, whatever its
    shards say (`verify` or the next `stage=ingest` rolls it back to the last good version). A dataset of several
    shard groups (`pipeline.dataset.layout`): groups written of the catalogue's, their rows and shards summed; it
    is done once every group is written, complete and tagged."""
    from .dataset_health import head_problem, local_dir
    from .dataset.layout import dataset_url, read_layout
    from .verify import ingest_settings

    from filelock import FileLock, Timeout

    url = dataset_url(ingest_settings(run_dir), run_dir)
    if local_dir(url) is None:
        return
    layout = read_layout(url)
    groups = layout.groups() if layout is not None and layout.grouped else [None]
    heads = []
    for g in groups:
        lock_name = layout.lock_name(g) if g is not None else "dataset.lock"
        lock = FileLock(str(run_dir / "ingest" / lock_name))
        try:
            lock.acquire(timeout=0)     # a head read mid-commit would look unreadable: not while a writer is at it
        except Timeout:
            st.extra["dataset"] = f"being written (an ingest writer holds ingest/{lock_name})"
            return
        try:
            heads.append((g, *head_problem(layout.group_url(g) if g is not None else url)))
        finally:
            lock.release()
    bad = [(g, problem) for g, problem, _ in heads if problem is not None]
    if bad:
        where = lambda g: "" if g is None else f" of group {g}"  # noqa: E731
        problem = "; ".join(f"{p}{where(g)}" for g, p in bad)
        st.extra["dataset_unreadable"] = problem
        st.extra["dataset"] = (f"NOT DONE: the dataset's head{'s' if len(bad) > 1 else ''} unreadable ({problem}); "
                               f"`python -m pipeline verify` or stage=ingest rolls it back to the last good version")
        return
    infos = [(g, info) for g, _, info in heads if info]
    if not infos:
        return
    if groups == [None]:
        info = infos[0][1]
        shards = info.get("ingested_shards")
        tags = [t for t, v in (info.get("tags") or {}).items() if v == info.get("version")]
        st.extra["dataset"] = (f"{info.get('rows')} rows"
                               + (f", {len(shards)} of {st.shards_total} shards" if shards is not None else "")
                               + (f", tagged {', '.join(sorted(tags))}" if tags else ", untagged"))
        return
    rows = sum(int(info.get("rows") or 0) for _, info in infos)
    shards = sum(len(info.get("ingested_shards") or []) for _, info in infos)
    tagged = sum(1 for _, info in infos
                 if any(v == info.get("version") for v in (info.get("tags") or {}).values()))
    written = len(infos)
    done = written == len(groups) and tagged == written
    st.extra["dataset"] = (f"{rows} rows in {written} of {len(groups)} groups, {shards} of {st.shards_total} shards, "
                           f"{tagged} of {len(groups)} groups tagged" + ("" if done else " (NOT DONE: groups left to "
                                                                         "write; re-run stage=ingest)"))


def write_summary(run_dir: str | Path, stage: str) -> dict:
    """Per-shard stats merged into <stage>/summary.json."""
    run_dir = Path(run_dir)
    geo = read_json(run_dir / GEOMETRY_FILE)
    summary = stage_status(run_dir, stage, int(geo["num_shards"])).to_dict()
    write_json(run_dir / stage / "summary.json", summary)
    return summary


def format_status(run_dir: str | Path, statuses: list[StageStatus]) -> str:
    if not statuses:
        return f"{run_dir}: no run here yet (no geometry.json)"
    geo = read_json(Path(run_dir) / GEOMETRY_FILE)
    lines = [f"run {run_dir}: {geo['num_items']} videos in {geo['num_shards']} shards", "",
             f"{'stage':<12} {'shards done/failed/partial/pending':<36} {'items ok':>9} {'failed':>7} "
             f"{'skipped':>8}  top reasons"]
    for st in statuses:
        shards = f"{st.shards_done}/{st.shards_failed}/{st.shards_partial}/{st.shards_pending} of {st.shards_total}"
        reasons = ", ".join(f"{r} x{c}" for r, c in st.reasons.most_common(3)) or "-"
        if "dataset_unreadable" in st.extra:
            reasons = "DATASET UNREADABLE (below); " + reasons
        lines.append(f"{st.stage:<12} {shards:<36} {st.items.get(OK, 0):>9} {st.items.get(FAILED, 0):>7} "
                     f"{st.items.get(SKIPPED, 0):>8}  {reasons}")
        lines.extend(f"{'':<12} running: shard {s}: {o}" for s, o in sorted(st.extra.get("running", {}).items()))
    lines.extend(f"{st.stage} dataset: {st.extra['dataset']}" for st in statuses if st.extra.get("dataset"))
    dups = duplicate_contents(run_dir)
    if dups:
        shown = "; ".join(f"{c} = {', '.join(v)}" for c, v in list(dups.items())[:5])
        more = f" (+{len(dups) - 5} more)" if len(dups) > 5 else ""
        lines.append(f"duplicate content: {sum(map(len, dups.values()))} videos are {len(dups)} contents (each kept "
                     f"in one split): {shown}{more}")
    return "\n".join(lines)


def duplicate_contents(run_dir: str | Path) -> dict[str, list[str]]:
    """content_id -> its video ids, for every content that more than one video id of the run has (the download
    stage's `videos` tables; see `pipeline.stages.download` for what a content id is)."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    geo = read_json(run_dir / GEOMETRY_FILE)
    if geo is None or not (run_dir / "download").is_dir():
        return {}
    ids: dict[str, set[str]] = {}
    for shard in range(int(geo["num_shards"])):
        path = ShardStore(run_dir, "download", shard).table_path("videos")
        if not path.exists():
            continue
        table = pq.read_table(path)
        if "content_id" not in table.column_names:      # downloaded before content ids were recorded
            continue
        for video, content in zip(table["video_id"].to_pylist(), table["content_id"].to_pylist()):
            if content:
                ids.setdefault(content, set()).add(video)
    return {c: sorted(v) for c, v in sorted(ids.items()) if len(v) > 1}


def _last_records(path: Path, n_bytes: int = 1 << 16) -> list[dict]:
    """The JSON records in the last `n_bytes` of a JSON-lines file (a long run's log is not read whole)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - n_bytes))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    if size > n_bytes:
        lines = lines[1:]  # probably cut mid-record
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a record being written right now
    return out


def training_runs(run_dir: str | Path) -> list[Path]:
    """run_dir and its subdirectories that hold a training run (metrics.jsonl or checkpoints/)."""
    run_dir = Path(run_dir)
    candidates = [run_dir] + sorted(d for d in run_dir.iterdir() if d.is_dir())
    return [d for d in candidates if metrics_log(d).is_file() or checkpoints_dir(d).is_dir()]


def format_training_status(run_dir: str | Path) -> str:
    """One line per training run under run_dir; "" if there is none."""
    run_dir = Path(run_dir)
    rows = []
    for d in training_runs(run_dir):
        records = _last_records(metrics_log(d)) if metrics_log(d).is_file() else []
        last = next((r for r in reversed(records) if "loss" in r), {})
        last_eval = next((r for r in reversed(records) if "eval_loss" in r), {})
        ckpts = complete_checkpoints(checkpoints_dir(d))
        ckpt = f"step {ckpts[-1][0]} ({len(ckpts)} kept)" if ckpts else "-"
        vqa = ""
        metrics = read_json(vqa_metrics(d))
        if metrics:
            vqa = f"VQA {metrics['accuracy']:.2f}% vs {metrics['majority_baseline']:.2f}% majority baseline"
        name = "." if d == run_dir else d.name
        loss = f"{last['loss']:.4f}" if "loss" in last else "-"
        eval_loss = f"{last_eval['eval_loss']:.4f}" if last_eval else "-"
        rows.append(f"{name:<12} {str(last.get('step', '-')):>8} {loss:>10} {eval_loss:>10}  {ckpt:<22} {vqa}".rstrip())
    if not rows:
        return ""
    header = f"{'training':<12} {'step':>8} {'loss':>10} {'eval loss':>10}  latest checkpoint"
    return "\n".join([header, *rows])
