"""workflows/demo.yaml end to end through the real local Slurm: every stage an array job, chained with afterany
dependencies; then the dataset verifies, the checkpoint exists, and a re-run submits nothing new."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli

from pipeline.dataset import open_read_only, read_layout
from pipeline.demo import serve, write_manifest
from pipeline.schema import TABLE
from pipeline.shards import ShardStore
from pipeline.workflow import load
from pipeline.samples import make_samples

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_demo_workflow_on_slurm(tmp_path, slurm_cluster, cache_dir):
    paths = make_samples(tmp_path / "samples", 6, shots=2, shot_seconds=2.0)
    httpd, base = serve(tmp_path / "samples")
    run = tmp_path / "run"
    run.mkdir()
    write_manifest(run, paths, base)
    env = {**slurm_cluster.env, "VPT_CACHE_DIR": str(cache_dir)}
    try:
        run_cli(str(REPO / "workflows" / "demo.yaml"), "launcher=slurm", f"run_dir={run}", "pretrain_steps=20",
                      "vqa_steps=20", module="pipeline.workflow", env=env, timeout=1500).stdout
    finally:
        httpd.shutdown()
    jobs = json.loads((run / "workflow" / "jobs.json").read_text())
    assert set(jobs) >= {"download", "frames", "asr", "clip", "audio", "scenegraph", "ingest", "pretrain"}
    assert all(jobs[s] for s in jobs), jobs  # every step was submitted as Slurm job(s)
    for step, ids in jobs.items():
        for job_id in ids:
            assert slurm_cluster.final_state(job_id) == "COMPLETED", (step, job_id)
    # Every job (array task) started only after all jobs of its upstream steps had ended: the afterany chains held.
    times = slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID,Start,End", "-j",
                              ",".join(j for ids in jobs.values() for j in ids)).stdout
    start: dict[str, str] = {}
    end: dict[str, str] = {}
    for line in times.splitlines():
        task, started, ended = line.strip().split("|")
        job = task.split("_")[0]  # an array's tasks: the array starts with its first task, ends with its last
        start[job] = min(start.get(job, started), started)
        end[job] = max(end.get(job, ended), ended)
    steps = load(REPO / "workflows" / "demo.yaml", [f"run_dir={run}"]).steps
    checked = 0
    for step, ids in jobs.items():
        for up in steps[step].get("after", []):
            for job in ids:
                for up_job in jobs[up]:
                    assert start[job] >= end[up_job], f"{step} job {job} started before {up} job {up_job} ended"
                    checked += 1
    assert checked >= 8, times
    status = run_cli("status", f"run_dir={run}").stdout
    for stage in ("download", "frames", "asr", "clip", "audio", "scenegraph", "ingest"):
        line = next(ln for ln in status.splitlines() if ln.startswith(stage))
        assert "2/0/0/0 of 2" in line, status
    assert "failed: not_found x1" in status  # the demo's deliberately missing video
    run_cli("verify", f"run_dir={run}")  # exit 0: every row aligned
    # one dataset per shard group, written by the finish step's array of group writers, read as one
    layout = read_layout(f"file://{run / 'dataset'}")
    assert layout is not None and layout.grouped and layout.num_groups == 2
    assert len(jobs["ingest"]) == 2         # the shards' array, then the group writers' array
    rows = sum(pq.read_metadata(ShardStore(run, "ingest", s).table_path(TABLE)).num_rows for s in range(2))
    assert rows > 0 and len(open_read_only(run)) == rows
    ckpts = sorted((run / "pretrain" / "checkpoints").glob("step-*"))
    assert ckpts and ckpts[-1].name == "step-00000020"
    assert (run / "workflow" / "pretrain.done").exists()
    metrics = json.loads((run / "vqa" / "vqa" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 100 and "majority_baseline" in metrics
    status = run_cli("status", f"run_dir={run}").stdout  # training runs are part of the status too
    pretrain = next(ln for ln in status.splitlines() if ln.startswith("pretrain "))
    assert pretrain.split()[1] == "20" and "step 20 (" in pretrain, status
    vqa = next(ln for ln in status.splitlines() if ln.startswith("vqa "))
    assert f"VQA {metrics['accuracy']:.2f}% vs {metrics['majority_baseline']:.2f}%" in vqa, status
    report = (run / "report" / "report.md").read_text()
    assert "Cost per video-hour" in report or "cost per video-hour" in report.lower()
    assert "VQA" in report and (run / "report" / "loss_curves.png").exists()
    # Everything is done: a second submission has nothing to run.
    again = run_cli(str(REPO / "workflows" / "demo.yaml"), "launcher=slurm", f"run_dir={run}", "pretrain_steps=20",
                    "vqa_steps=20", "wait=false", module="pipeline.workflow", env=env, timeout=600).stdout
    submitted = [ln for ln in again.splitlines() if ln.startswith("submitted")]
    assert len(submitted) == 1 and submitted[0].startswith("submitted report:"), again  # only the rerun step
