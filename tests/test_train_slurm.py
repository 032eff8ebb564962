"""Pretraining through the real local Slurm: 2 emulated nodes x 1 rank (gloo), requeued mid-run, resumed from the
last DCP checkpoint, completes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def _logs(run: Path, pattern: str = "*_log.*") -> str:
    return "".join(p.read_text() for p in sorted(Path(run / "logs" / "slurm").glob(pattern)))


def test_two_node_training_requeues_and_resumes(tmp_path, slurm_cluster, cache_dir, monkeypatch):
    from pipeline.train.__main__ import compose
    from pipeline.train.checkpoint import complete_checkpoints
    from pipeline.train.launch import submit

    for k, v in {**slurm_cluster.env, "VPT_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "train"
    cfg = compose([f"run_dir={run}", "run_on=slurm", "slurm.nodes=2", "slurm.tasks_per_node=1",
                   "slurm.cpus_per_task=1", "slurm.mem_gb=1.5", "slurm.timeout_min=10", "slurm.partition=main",
                   "train.max_steps=40", "checkpoint.every=10", "train.log_every=5", "train.eval_every=0",
                   "data.batch_size=4", "device=cpu"])
    job = submit(cfg)
    ckpts = run / "checkpoints"
    deadline = time.time() + 300
    while not complete_checkpoints(ckpts) and time.time() < deadline:  # the step-10 checkpoint, fully written
        time.sleep(0.5)
    assert complete_checkpoints(ckpts)
    job._interrupt()  # preemption: SIGTERM + USR2 -> checkpoint (submitit) + scontrol requeue
    deadline = time.time() + 400
    ended = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    while not any(step == 40 for step, _, _ in complete_checkpoints(ckpts)) and time.time() < deadline:
        assert slurm_cluster.sacct_state(job.job_id) not in ended, _logs(run)[-3000:]  # not requeued: why
        time.sleep(1)
    assert any(step == 40 for step, _, _ in complete_checkpoints(ckpts)), _logs(run)[-3000:]
    while slurm_cluster.sacct_state(job.job_id) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.time() < deadline
        time.sleep(1)
    assert slurm_cluster.sacct_state(job.job_id) == "COMPLETED"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps[-1] == 40 and min(steps) == 1
    assert sorted(set(steps)) == list(range(1, 41))  # every step trained, none lost across the requeue
    attempts = slurm_cluster.run("sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", str(job.job_id)).stdout.split()
    assert attempts == ["REQUEUED", "COMPLETED"], attempts
    nodelist = slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "NodeList", "-j", str(job.job_id)).stdout.split()
    hosts = slurm_cluster.run("scontrol", "show", "hostnames", nodelist[-1]).stdout.split()
    assert len(set(hosts)) == 2, nodelist  # the two ranks ran on two Slurm nodes
    out = _logs(run, "*_0_log.*")      # (the loop logs to stderr)
    resumed = [ln for ln in out.splitlines() if "resumed from" in ln]
    assert resumed and not resumed[-1].endswith("at step 0"), out[-2000:]  # from a checkpoint, not scratch
