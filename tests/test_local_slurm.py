"""submitit and the sbatch templates against the real local Slurm cluster (slurm/local_cluster.sh)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from slurm_cluster import REPO_ROOT

from pipeline.launchers.slurm import Requeueable

pytestmark = pytest.mark.slurm

# Jobs unpickle the functions below; this module is not importable inside a job, so ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _executor(folder: Path, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    defaults = {"timeout_min": 10, "slurm_partition": "main", "cpus_per_task": 1, "mem_gb": 1}
    executor.update_parameters(**(defaults | params))
    return executor


def _wait_running(job: submitit.Job, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while job.watcher.get_state(job.job_id, mode="force") != "RUNNING":
        assert time.monotonic() < deadline, f"job {job.job_id} never started: {job.state}"
        time.sleep(0.3)


def _square(x: int) -> int:
    return x * x


def _fail(message: str) -> None:
    raise RuntimeError(message)


def _sleep_through_warning(seconds: float) -> None:
    # Ignore submitit's pre-timeout USR2 so that Slurm itself kills the job at its limit.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    time.sleep(seconds)


def _node_name() -> str:
    return os.environ["SLURMD_NODENAME"]


class CountSteps(Requeueable):
    """Counts to `total`, one step per 0.5 s; the count survives a requeue through the checkpoint."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.step = 0
        self.started_at: list[int] = []  # step at which each attempt began

    def __call__(self, progress_file: str) -> tuple[int, list[int]]:
        self.started_at.append(self.step)
        while self.step < self.total:
            self.step += 1
            Path(progress_file).write_text(str(self.step))
            time.sleep(0.5)
        return self.step, self.started_at


@pytest.mark.timeout(120)
def test_map_array_returns_results(slurm_cluster, tmp_path):
    jobs = _executor(tmp_path).map_array(_square, [1, 2, 3, 4])
    assert [job.result() for job in jobs] == [1, 4, 9, 16]
    assert slurm_cluster.final_state(jobs[0].job_id.split("_")[0]) == "COMPLETED"


@pytest.mark.timeout(120)
def test_cancelled_job_is_reported_failed(slurm_cluster, tmp_path):
    job = _executor(tmp_path).submit(time.sleep, 600)
    _wait_running(job)
    job.cancel(check=True)
    job._results_timeout_s = 2  # submitit waits 15 s for a result file on slow shared filesystems
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()
    assert slurm_cluster.final_state(job.job_id) == "CANCELLED"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_timed_out_job_is_reported_failed(slurm_cluster, tmp_path):
    # Slurm limits are whole minutes and checked every ~30 s: this takes 60-100 s.
    job = _executor(tmp_path, timeout_min=1, slurm_partition="short").submit(_sleep_through_warning, 600)
    job._results_timeout_s = 2  # submitit waits 15 s for a result file on slow shared filesystems
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()
    assert slurm_cluster.final_state(job.job_id) == "TIMEOUT"


@pytest.mark.timeout(120)
def test_checkpointable_job_requeues_and_resumes(slurm_cluster, tmp_path):
    progress = tmp_path / "progress.txt"
    job = _executor(tmp_path).submit(CountSteps(total=8), str(progress))
    deadline = time.monotonic() + 30
    while not (progress.exists() and int(progress.read_text() or 0) >= 2):
        assert time.monotonic() < deadline, "job made no progress"
        time.sleep(0.2)
    job._interrupt()  # preemption: SIGTERM then USR2 -> checkpoint -> scontrol requeue
    steps, started_at = job.result()
    assert steps == 8
    assert len(started_at) == 2 and started_at[0] == 0
    assert started_at[1] >= 2, "second attempt did not resume from the checkpoint"


@pytest.mark.timeout(120)
def test_afterany_dependency_runs_after_failed_job(slurm_cluster, tmp_path):
    failing = _executor(tmp_path).submit(_fail, "bad input")
    dependent = _executor(tmp_path, slurm_additional_parameters={"dependency": f"afterany:{failing.job_id}"}).submit(
        _square, 7
    )
    assert dependent.result() == 49
    with pytest.raises(submitit.core.utils.FailedJobError, match="bad input"):
        failing.result()
    assert slurm_cluster.final_state(failing.job_id) == "FAILED"
    times = slurm_cluster.run(
        "sacct", "-j", f"{failing.job_id},{dependent.job_id}", "-X", "-n", "-P", "-o", "JobID,Start,End"
    ).stdout.split()
    rows = {line.split("|")[0]: line.split("|")[1:] for line in times}
    assert rows[dependent.job_id][0] >= rows[failing.job_id][1], "dependent job started before the failed one ended"


@pytest.mark.timeout(120)
def test_two_node_job_runs_a_task_on_each_node(slurm_cluster, tmp_path):
    assert len(slurm_cluster.nodes) >= 2
    job = _executor(tmp_path, nodes=2, tasks_per_node=1).submit(_node_name)
    names = job.results()
    assert len(names) == 2
    assert len(set(names)) == 2 and set(names) <= set(slurm_cluster.nodes)


def _write_fake_task_module(root: Path) -> None:
    """A stand-in `pipeline.task` that records its arguments (the template is what is under test)."""
    package = root / "pipeline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "task.py").write_text(
        textwrap.dedent(
            """
            import os, sys
            args = dict(a.split("=", 1) for a in sys.argv[1:])
            out = os.path.join(args["run_dir"], f"{args['stage']}-{args['shard']}.txt")
            with open(out, "w") as f:
                f.write(" ".join(sys.argv[1:]) + " node=" + os.environ["SLURMD_NODENAME"])
            """
        )
    )


def _wait_job_end(cluster, job_id: str, limit_s: float) -> str:
    deadline = time.monotonic() + limit_s
    while cluster.run("squeue", "-h", "-j", job_id, "-o", "%A", check=False).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} still queued/running"
        time.sleep(0.3)
    for _ in range(60):  # accounting lags the end of the job (an array's tasks may disagree for a moment: MIXED)
        state = cluster.sacct_state(job_id)
        if state and state not in ("RUNNING", "PENDING", "COMPLETING", "MIXED"):
            return state
        time.sleep(0.5)
    return state


@pytest.mark.timeout(120)
def test_stage_array_template_runs_one_task_per_shard(slurm_cluster, tmp_path):
    _write_fake_task_module(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(slurm_cluster.env, PYTHON=sys.executable, PYTHONPATH=str(tmp_path))
    submitted = subprocess.run(
        [
            "sbatch", "--parsable", "--array=0-3%2", "--mem=512M", "--cpus-per-task=1",
            f"--chdir={tmp_path}", f"--output={tmp_path}/%x-%A_%a.out",
            f"--export=ALL,STAGE=frames,RUN_DIR={run_dir},EXTRA=models=tiny",
            str(REPO_ROOT / "slurm" / "stage_array.sbatch"),
        ],
        env=env, check=True, capture_output=True, text=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        assert _wait_job_end(slurm_cluster, job_id, 45) == "COMPLETED"
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    for shard in range(4):
        args = (run_dir / f"frames-{shard}.txt").read_text()
        assert f"stage=frames run_dir={run_dir} shard={shard} models=tiny" in args


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_template_builds_a_cluster_over_all_nodes(slurm_cluster, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """
            import json, os, sys, ray
            ray.init()
            alive = [n for n in ray.nodes() if n["Alive"]]
            json.dump({"address": os.environ["RAY_ADDRESS"], "nodes": len(alive),
                       "cpus": ray.cluster_resources()["CPU"]}, open(sys.argv[1], "w"))
            """
        )
    )
    venv_bin = Path(sys.executable).parent
    env = dict(slurm_cluster.env, PYTHON=sys.executable, RAY=str(venv_bin / "ray"))
    submitted = subprocess.run(
        [
            "sbatch", "--parsable", "--nodes=2", "--mem=1G", f"--chdir={tmp_path}",
            f"--output={tmp_path}/%x-%j.out", str(REPO_ROOT / "slurm" / "ray_multinode.sbatch"),
            sys.executable, str(probe), str(tmp_path / "probe.json"),
        ],
        env=env, check=True, capture_output=True, text=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        state = _wait_job_end(slurm_cluster, job_id, 200)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    log = next(tmp_path.glob("*.out")).read_text()
    assert state == "COMPLETED", log[-3000:]
    seen = json.loads((tmp_path / "probe.json").read_text())
    assert seen["nodes"] == 2
    assert seen["cpus"] == 8  # 2 nodes x 4 CPUs per task
    assert seen["address"].endswith(f":{20000 + 40 * (int(job_id) % 225)}")
