"""The engine on a real Slurm (slurmctld + slurmd + slurmdbd on localhost): array jobs, identical results to the
local launcher, requeue resumes a shard where it stopped."""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

pytestmark = pytest.mark.slurm

SMALL = ["stage.resources.cpus=1", "stage.resources.mem_gb=0.5", "stage.resources.timeout_min=10",
         "cluster.partition=main", "launcher.poll_seconds=0.5"]
FAST = ["stage.socket_timeout_s=1", "stage.max_attempts=1", "stage.retries=0"]


def _rows(run: Path, stage: str, table: str) -> list[dict]:
    t = pa.concat_tables([pq.read_table(p) for p in sorted((run / stage).glob(f"shard-*/{table}.parquet"))])
    drop = {"seconds", "path"}
    return [{k: v for k, v in r.items() if k not in drop} for r in t.sort_by("video_id").to_pylist()]


def test_download_on_slurm_matches_local(tmp_path, media_server, slurm_cluster):
    m = tmp_path / "m.txt"
    m.write_text("\n".join([f"v{i} {media_server.url(f'v{i}.mp4')}" for i in range(6)] +
                           [f"gone {media_server.url('gone.mp4')}"]) + "\n")
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    run_cli("stage=download", f"run_dir={local}", f"input={m}", "num_shards=3", *FAST)
    # max_array_size=2: the 3 shards must be split over two array jobs.
    out = run_cli("stage=download", f"run_dir={slurm}", f"input={m}", "num_shards=3", "launcher=slurm",
                  "launcher.max_array_size=2", *FAST, *SMALL, env=slurm_cluster.env).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("submitted 3 array task(s)"))
    job_ids = line.split("job(s) ")[1].split(", ")
    assert len(job_ids) == 2
    assert _rows(slurm, "download", "ledger") == _rows(local, "download", "ledger")
    assert _rows(slurm, "download", "videos") == _rows(local, "download", "videos")
    # One array job; every task logged to its own files, and Slurm accounting saw it complete.
    logs = list((slurm / "download" / "logs" / "slurm").glob("*_log.out"))
    assert len(logs) == 3
    assert {p.name.split("_")[0] for p in logs} == set(job_ids)
    assert [slurm_cluster.final_state(j) for j in job_ids] == ["COMPLETED", "COMPLETED"]
    # Nothing left to do: the second launch submits nothing.
    again = run_cli("stage=download", f"run_dir={slurm}", "launcher=slurm", *FAST, *SMALL, env=slurm_cluster.env)
    assert "0 of 3 shard(s) to run" in again.stdout and "submitted" not in again.stdout


def test_requeued_task_resumes_where_it_stopped(tmp_path, media_server, slurm_cluster, monkeypatch):
    """Preemption/timeout path: submitit signals the task, it checkpoints and requeues, and the requeued task
    resumes from the shard's parts instead of starting over."""
    from pipeline.config import compose
    from pipeline.launchers.slurm import submit
    from pipeline.manifest import pin_geometry, plan_geometry

    for k, v in slurm_cluster.env.items():
        monkeypatch.setenv(k, v)
    m = tmp_path / "m.txt"
    # Slow items: each stalls ~1 s before timing out, so the shard takes long enough to interrupt.
    m.write_text("\n".join(f"s{i} {media_server.url(f'slow/v{i}.mp4')}" for i in range(12)) + "\n")
    run = tmp_path / "run"
    cfg = compose(["stage=download", f"run_dir={run}", f"input={m}", "num_shards=1", "stage.flush_every=1",
                   "launcher=slurm", *FAST, *SMALL])
    geo, items, _ = plan_geometry(run, cfg.input, cfg.num_shards, cfg.items_per_shard)
    pin_geometry(run, geo, items)
    [(shard, job)] = submit(cfg, [0])
    parts = run / "download" / "shard-00000" / "parts"
    deadline = time.time() + 120
    while len(list(parts.glob("*.ledger.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.2)
    assert len(list(parts.glob("*.ledger.parquet"))) >= 3
    job._interrupt()  # what Slurm's pre-timeout / preemption signal does: checkpoint + requeue
    marker = run / "download" / "shard-00000" / "_SUCCESS"
    deadline = time.time() + 180
    while not marker.exists() and time.time() < deadline:  # the requeued task finishes the shard
        time.sleep(0.5)
    assert marker.exists()
    ledger = pq.read_table(run / "download" / "shard-00000" / "ledger.parquet").to_pylist()
    assert sorted(r["video_id"] for r in ledger) == sorted(f"s{i}" for i in range(12))
    assert all(r["attempts"] == 1 for r in ledger)  # items done before the requeue were not redone
    log = "".join(p.read_text() for p in (run / "download" / "logs").glob("shard-00000.log"))
    starts = [ln for ln in log.splitlines() if "task start" in ln]
    assert len(starts) == 2  # the first attempt and the requeued one
    resumed = [ln for ln in log.splitlines() if "already in parts" in ln][-1]
    assert " 0 already in parts" not in resumed


def test_stage_array_template_runs_the_real_engine(tmp_path, shared_media, slurm_cluster):
    """slurm/stage_array.sbatch, submitted by hand as a user would, runs real shards through pipeline.task."""
    import subprocess
    import sys

    m = tmp_path / "m.txt"
    import shutil

    for i in range(6):  # one file per id: the manifest keeps the same media given twice only once
        shutil.copy(shared_media / "counter.mp4", tmp_path / f"c{i}.mp4")
    m.write_text("".join(f"c{i} {tmp_path / f'c{i}.mp4'}\n" for i in range(6)))
    run = tmp_path / "run"
    # Pin the run (and run nothing): shards=[] launches no shard.
    run_cli("stage=download", f"run_dir={run}", f"input={m}", "num_shards=3", "shards=[]")
    assert not list(run.glob("download/shard-*/_SUCCESS"))
    job = subprocess.run(
        ["sbatch", "--parsable", "--array=0-2%2", "--mem=512M", "--cpus-per-task=1", f"--chdir={Path.cwd()}",
         f"--output={tmp_path}/%x-%A_%a.out", f"--export=ALL,STAGE=download,RUN_DIR={run},PYTHON={sys.executable}",
         str(Path(__file__).resolve().parents[1] / "slurm" / "stage_array.sbatch")],
        env=slurm_cluster.env, check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
    deadline = time.time() + 120
    while slurm_cluster.run("squeue", "-h", "-j", job, check=False).stdout.strip() and time.time() < deadline:
        time.sleep(0.5)
    assert slurm_cluster.final_state(job) == "COMPLETED"
    assert len(list(run.glob("download/shard-*/_SUCCESS"))) == 3
    assert len(_rows(run, "download", "videos")) == 6
