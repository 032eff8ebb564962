"""Slurm launcher: one submitit array job per stage over the incomplete shards.

- `%` throttle from `launcher.array_parallelism`; split into several arrays past the cluster's MaxArraySize.
- Partition/account/QoS/GPUs from the cluster profile, sizes from the stage's `resources`: `sbatch.slurm_params`,
  the one builder of sbatch parameters (also used by workflow command steps and training jobs).
- Timeouts and preemption: the task is `Checkpointable`, so submitit requeues it on the pre-timeout signal; the
  requeued task resumes from the shard's parts (see pipeline.engine).
- `resources.nodes > 1`: each array task is a multi-node job that starts a Ray cluster over its allocation.
- Credentials (anything `redaction.redacted` masks: proxy, cookies file, tokens) are not pickled into the job folder: the
  pickled config holds `${oc.env:VPT_SECRET_...}` in their place, the values travel in the environment `sbatch`
  passes to the job (its default --export=ALL), and the task resolves them when it rebuilds the config.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit
from tqdm import tqdm

from ..engine import container
from ..errors import ConfigError
from ..redaction import is_secret
from ..stages import get_stage, run_prelude
from ..task import run_task
from .base import LaunchResult, Launcher
from .sbatch import slurm_params


class Requeueable(submitit.helpers.Checkpointable):
    """A submitit task that Slurm's pre-timeout/preemption signal requeues; the requeued call resumes the work.

    submitit's signal handler calls checkpoint() and then runs `scontrol requeue`. A SIGTERM sent to the whole step at
    that moment (preemption sends one; so does the requeue itself) would kill that `scontrol` and fail the job instead
    of requeuing it. SIG_IGN, unlike a Python handler, is inherited by the child, so it is set here, just before the
    requeue. Slurm still ends the step with SIGKILL.
    """

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return super().checkpoint(*args, **kwargs)


class ShardTask(Requeueable):
    """Picklable array-task body. checkpoint() resubmits the same call: the shard resumes."""

    def __init__(self, cfg_container: dict):
        self.cfg_container = cfg_container

    def __call__(self, shard: int) -> dict:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            from .ray_cluster import run_on_ray_cluster

            return run_on_ray_cluster(lambda: run_task(self.cfg_container, shard), env,
                                      Path(self.cfg_container["run_dir"]) / ".ray")
        return run_task(self.cfg_container, shard)


def cluster_max_array_size() -> int:
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"MaxArraySize\s*=\s*(\d+)", out)
        if m:
            return int(m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return 1001  # Slurm's default


def stage_resources(cfg) -> dict:
    """The stage's `resources` as `slurm_params` takes them (one task per node; multi-node tasks start Ray)."""
    res = cfg.stage.resources
    return {"cpus": res.cpus, "gpus": res.gpus, "mem_gb": res.mem_gb, "timeout_min": res.timeout_min,
            "nodes": res.nodes, "tasks_per_node": 1}


def executor_parameters(cfg) -> dict:
    """submitit parameters of the stage's array jobs."""
    return slurm_params(stage_resources(cfg), cfg.cluster, cfg.launcher.dependency or None,
                        name=f"vpt-{cfg.stage.name}", array_parallelism=int(cfg.launcher.array_parallelism))


def finish_parameters(cfg, after_job_ids: list[str]) -> dict:
    """submitit parameters of the stage's finish job: one node, after (`afterany`) the given jobs."""
    dependency = "afterany:" + ":".join(after_job_ids) if after_job_ids else None
    return slurm_params({**stage_resources(cfg), "nodes": 1}, cfg.cluster, dependency,
                        name=f"vpt-{cfg.stage.name}-finish", array_parallelism=1)


SECRET_ENV_PREFIX = "VPT_SECRET_"


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise ConfigError("launcher=slurm but sbatch is not on PATH (start a cluster: make slurm-up, and "
                          "source its env.sh, or run on a login node)")


def _answers(cmd: list[str], timeout_s: float) -> str | None:
    """None if `cmd` answers (exit 0) within the timeout, else one line saying how it failed."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        return f"{cmd[0]} is not on PATH"
    except subprocess.TimeoutExpired:
        return f"`{' '.join(cmd)}` did not answer within {timeout_s:g}s"
    except OSError as exc:
        return f"`{' '.join(cmd)}` could not run: {exc.strerror or exc}"
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        return f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"
    return None


def require_slurm(timeout_s: float = 20.0) -> None:
    """Launch preflight: sbatch installed and the controller answering (`sinfo`, `squeue`), before anything is
    written or submitted. One ConfigError line otherwise (e.g. the controller is down for maintenance)."""
    require_sbatch()
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid())
    for cmd in (["sinfo", "-h", "-o", "%P"], ["squeue", "-h", "-u", user, "-o", "%i"]):
        problem = _answers(cmd, timeout_s)
        if problem:
            raise ConfigError(f"launcher=slurm but Slurm is not reachable: {problem}")


def secretless(plain: dict, _path: tuple[str, ...] = ()) -> tuple[dict, dict[str, str]]:
    """(payload to pickle for Slurm, environment for sbatch): each secret becomes a reference to an env var."""
    payload, env = {}, {}
    for k, v in plain.items():
        path = (*_path, str(k))
        if isinstance(v, dict):
            payload[k], sub = secretless(v, path)
            env.update(sub)
        elif is_secret(k, v):
            payload[k] = _env_ref(SECRET_ENV_PREFIX + "_".join(re.sub(r"\W", "_", p).upper() for p in path), v, env)
        else:
            payload[k] = v
    return payload, env


def _env_ref(name: str, value, env: dict[str, str]):
    """`${oc.env:NAME}` for a scalar (the task's typed schema converts the string back), one per item of a list.
    No default in the reference: a task that did not get the variable fails instead of running without it."""
    if isinstance(value, (list, tuple)):
        return [_env_ref(f"{name}_{i}", v, env) for i, v in enumerate(value)]
    env[name] = str(value)
    return "${oc.env:%s}" % name


@contextlib.contextmanager
def secrets_in_environ(env: dict[str, str]):
    """The secrets in os.environ while sbatch runs (it copies the environment into the job), then gone again."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_executor(cfg, params: dict | None = None) -> submitit.AutoExecutor:
    require_sbatch()
    folder = Path(cfg.run_dir) / cfg.stage.name / "logs" / "slurm"
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    executor.update_parameters(**(executor_parameters(cfg) if params is None else params))
    return executor


def _submit_array(cfg, executor: submitit.AutoExecutor, task_cls, items: list[int],
                  **task_args: Any) -> list[tuple[int, submitit.Job]]:
    """One array task per item, split into arrays of at most the cluster's MaxArraySize; secrets travel in the
    environment, never in the pickled config."""
    max_size = cfg.launcher.max_array_size or cluster_max_array_size()
    payload, secrets = secretless(container(cfg))
    task = task_cls(payload, **task_args)
    submitted: list[tuple[int, submitit.Job]] = []
    with secrets_in_environ(secrets):
        for start in range(0, len(items), max_size):
            chunk = items[start:start + max_size]
            submitted.extend(zip(chunk, executor.map_array(task, chunk)))
    return submitted


def submit(cfg, shards: list[int]) -> list[tuple[int, submitit.Job]]:
    return _submit_array(cfg, make_executor(cfg), ShardTask, shards)


def launch(cfg, shards: list[int]) -> LaunchResult:
    result = LaunchResult(shards=list(shards), waited=bool(cfg.launcher.wait))
    if not shards:
        return result
    submitted = submit(cfg, shards)
    result.job_ids = sorted({job.job_id.split("_")[0] for _, job in submitted})
    # the command's output when it does not wait: the job ids to watch
    print(f"submitted {len(submitted)} array task(s) of {cfg.stage.name}: job(s) {', '.join(result.job_ids)}")
    if not cfg.launcher.wait:
        return result
    bar = tqdm(total=len(submitted), desc=f"{cfg.stage.name} shards (slurm)", unit="shard")
    pending = dict(submitted)
    while pending:
        for shard, job in list(pending.items()):
            if not job.done():
                continue
            del pending[shard]
            try:
                # one per task: a multi-node task's workers return None, its first task the stats
                leased = [r["leased_by"] for r in job.results() if isinstance(r, dict) and r.get("leased_by")]
                if leased:
                    result.busy_shards[shard] = leased[0]
            except Exception as exc:  # noqa: BLE001 - FailedJobError, UncompletedJobError: reported per shard
                result.failed_shards[shard] = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
            bar.update(1)
        if pending:
            time.sleep(cfg.launcher.poll_seconds)
    bar.close()
    return result


def _stage_of(cfg_container: dict):
    """(config, stage class) of a job body, after checking every shard of the stage is complete."""
    from ..config import from_container
    from ..shards import ShardStore
    from ..atomic import read_json
    from ..logs import configure

    configure()         # a job body does not pass through an entry point's main
    cfg = from_container(cfg_container)
    stage_cls = get_stage(cfg.stage.name)
    n = int(read_json(Path(cfg.run_dir) / "geometry.json")["num_shards"])
    incomplete = [s for s in range(n) if not ShardStore(cfg.run_dir, stage_cls.name, s).is_complete()]
    if incomplete:
        raise RuntimeError(f"{stage_cls.name}: shards {incomplete[:10]} incomplete; re-run the stage to finish")
    return cfg, stage_cls


def finish_stage(cfg_container: dict, prelude: str | None = None) -> None:
    """Job body: the stage's once-per-run step (e.g. ingest's Deep Lake writer) after its array. `prelude`: the
    stage's `finish_prelude`, called before the stage's modules load."""
    run_prelude(prelude)
    cfg, stage_cls = _stage_of(cfg_container)
    stage_cls.finish(cfg)


class FinishGroupTask(Requeueable):
    """Array-task body: one independent unit of a stage's finish step (ingest: one shard group's dataset writer).
    A requeued or re-run task redoes only what its unit's last commit did not hold. `prelude`: the stage's
    `finish_prelude`, called first."""

    def __init__(self, cfg_container: dict, prelude: str | None = None):
        self.cfg_container = cfg_container
        self.prelude = prelude

    def __call__(self, group: int):
        run_prelude(getattr(self, "prelude", None))     # (a task pickled before preludes has none)
        cfg, stage_cls = _stage_of(self.cfg_container)
        return stage_cls.finish_group(cfg, group)


def finish_groups(cfg, stage_cls=None) -> list[int]:
    """The units of the stage's finish step that run as one array (`Stage.finish_groups`, e.g. ingest's shard
    groups); [] when the finish step is one job."""
    if stage_cls is None:
        stage_cls = get_stage(cfg.stage.name)
    units = getattr(stage_cls, "finish_groups", None)
    return list(units(cfg)) if units is not None else []


def group_parameters(cfg, after_job_ids: list[str]) -> dict:
    """submitit parameters of the finish step's array: one node per task, `stage.writers` tasks at once, after
    (`afterany`, like the single finish job: the gate is the markers) the given jobs."""
    dependency = "afterany:" + ":".join(after_job_ids) if after_job_ids else None
    return slurm_params({**stage_resources(cfg), "nodes": 1}, cfg.cluster, dependency,
                        name=f"vpt-{cfg.stage.name}-writers",
                        array_parallelism=max(1, int(cfg.stage.get("writers", 1) or 1)))


def submit_groups(cfg, groups: list[int], after_job_ids: list[str]) -> list[tuple[int, submitit.Job]]:
    """One array task per unit of the finish step (split past the cluster's MaxArraySize)."""
    submitted = _submit_array(cfg, make_executor(cfg, group_parameters(cfg, after_job_ids)), FinishGroupTask, groups,
                              prelude=get_stage(cfg.stage.name).finish_prelude)
    ids = sorted({job.job_id.split("_")[0] for _, job in submitted})
    print(f"submitted {cfg.stage.name} finish step: {len(submitted)} group writer task(s), job(s) {', '.join(ids)}")
    return submitted


def wait_groups(cfg, submitted: list[tuple[int, submitit.Job]]) -> list[dict]:
    """Wait for every task of the finish step's array; raises, naming each group that failed, once all ended."""
    pending, results, failures = dict(submitted), [], []
    while pending:
        for group, job in list(pending.items()):
            if not job.done():
                continue
            del pending[group]
            try:
                results.append(job.result())
            except Exception as exc:  # noqa: BLE001 - FailedJobError, UncompletedJobError: reported per group
                lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                failures.append(f"group {group} (job {job.job_id}): {lines[-1].strip() if lines else type(exc).__name__}")
        if pending:
            time.sleep(cfg.launcher.poll_seconds)
    if failures:
        raise ConfigError(f"{cfg.stage.name} finish step: " + "; ".join(failures) + " (re-run to complete them)")
    return results


def submit_finish(cfg, after_job_ids: list[str]) -> str:
    """Submit the finish step after the stage's arrays (afterany: the gate is the markers): one array task per
    unit when the stage has several (`finish_groups`), else finish_stage as one job."""
    groups = finish_groups(cfg)
    if groups:
        submitted = submit_groups(cfg, groups, after_job_ids)
        return ",".join(sorted({job.job_id.split("_")[0] for _, job in submitted}))
    executor = make_executor(cfg, finish_parameters(cfg, after_job_ids))
    payload, secrets = secretless(container(cfg))
    with secrets_in_environ(secrets):
        job = executor.submit(finish_stage, payload, get_stage(cfg.stage.name).finish_prelude)
    print(f"submitted {cfg.stage.name} finish step: job {job.job_id}")
    return job.job_id


def run_finish(cfg, stage_cls) -> list[str]:
    """The stage's finish step once its shards are complete: several units (ingest's shard groups) as one array,
    waited for when `launcher.wait`, without the units that have nothing to do (`finish_groups_to_run`: a re-run
    submits nothing once every group is up to date); else in this process. Returns the job ids submitted."""
    groups = finish_groups(cfg, stage_cls)
    if not groups:
        stage_cls.finish(cfg)
        return []
    to_run = getattr(stage_cls, "finish_groups_to_run", None)
    todo = list(to_run(cfg, groups)) if to_run is not None else groups
    if not todo:
        print(f"{cfg.stage.name} finish step: all {len(groups)} group(s) up to date, nothing submitted")
        return []
    submitted = submit_groups(cfg, todo, [])
    if cfg.launcher.wait:
        wait_groups(cfg, submitted)
    return sorted({job.job_id.split("_")[0] for _, job in submitted})


class SlurmLauncher(Launcher):
    """Array jobs through submitit; with `launcher.wait=false` it returns once they are queued."""
    name = "slurm"

    def preflight(self, cfg) -> None:
        require_slurm(float(cfg.launcher.preflight_timeout_s))

    def launch(self, cfg, shards: list[int]) -> LaunchResult:
        return launch(cfg, shards)

    def submit_finish(self, cfg, after_job_ids: list[str]) -> str:
        return submit_finish(cfg, after_job_ids)

    def run_finish(self, cfg, stage_cls) -> list[str]:
        return run_finish(cfg, stage_cls)


LAUNCHER = SlurmLauncher()
