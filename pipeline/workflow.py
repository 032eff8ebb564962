"""Workflows: a DAG of stages (and command steps such as pretraining) from `workflows/<name>.yaml`.

    python -m pipeline.workflow workflows/demo.yaml launcher=local|slurm [wait=true] [key=value ...]

Locally the steps run one after another in dependency order. On Slurm every step is submitted at once as array
jobs chained with `afterany` dependencies: a task whose upstream shard has no completion marker refuses to run
(the engine is the gate), so one bad video or task can never block the DAG forever, and a re-run submits only what
is missing. Running a workflow again only does what is missing: complete shards are skipped and command steps
leave a done marker.

Workflow file:
    name: demo
    run_dir: runs/demo
    launcher: local              # local | slurm
    cluster: generic             # conf/cluster profile for Slurm
    overrides: [models=tiny]     # added to every stage step
    steps:
      download: {stage: download, overrides: ["input=${run_dir}/videos.txt"]}
      frames:   {stage: frames, after: [download]}
      pretrain: {module: pipeline.train, args: [...], after: [ingest], resources: {cpus: 2, mem_gb: 8}}
      report:   {module: pipeline.report, args: ["run_dir=${run_dir}"], after: [pretrain], rerun: true}

Command steps take `nproc: N` (run under torchrun) and `rerun: true` (run every time, no done marker skip); on
Slurm they get the cluster profile's partition, account, QoS, constraint and setup lines, like stage arrays.

Every step is composed and validated before anything runs, is submitted or written. The exit code is 1 when a
stage ended with shards that did not complete (a task died or was refused) or a command step failed; failed items
(a video that would not download) are recorded outcomes, not workflow failures.
"""
from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .atomic import write_json
from .errors import ConfigError, fail

log = logging.getLogger(__name__)

STEP_KEYS = {"stage", "module", "args", "overrides", "after", "resources", "nproc", "rerun"}
RESOURCE_KEYS = {"cpus", "gpus", "mem_gb", "timeout_min", "partition"}


class WaitError(RuntimeError):
    """Waiting on the workflow's Slurm jobs gave up (squeue kept failing)."""


def load(path: str | Path, overrides: list[str]) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"workflow file not found: {path}")
    wf = OmegaConf.load(path)
    try:
        wf = OmegaConf.merge(wf, OmegaConf.from_dotlist(overrides))
        OmegaConf.resolve(wf)
    except Exception as exc:  # noqa: BLE001 - interpolation / override syntax
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    for key in ("run_dir", "steps"):
        if key not in wf:
            raise ConfigError(f"{path}: missing key {key!r}")
    wf.setdefault("launcher", "local")
    wf.setdefault("cluster", "generic")
    wf.setdefault("overrides", [])
    wf.setdefault("wait", True)
    if wf.launcher not in ("local", "slurm"):
        raise ConfigError(f"launcher must be local or slurm, got {wf.launcher!r}")
    for name, step in wf.steps.items():
        unknown = set(step) - STEP_KEYS
        if unknown:
            raise ConfigError(f"step {name}: unknown keys {sorted(unknown)}")
        if ("stage" in step) == ("module" in step):
            raise ConfigError(f"step {name}: give exactly one of stage: or module:")
        for dep in step.get("after", []):
            if dep not in wf.steps:
                raise ConfigError(f"step {name}: after {dep!r}, which is not a step")
    order(wf)
    return wf


def order(wf: DictConfig) -> list[str]:
    """Steps in dependency order (Kahn), file order among ready steps; a cycle is a config error."""
    deps = {n: list(s.get("after", [])) for n, s in wf.steps.items()}
    done: list[str] = []
    while len(done) < len(deps):
        ready = [n for n in deps if n not in done and all(d in done for d in deps[n])]
        if not ready:
            raise ConfigError(f"workflow steps form a cycle: {sorted(set(deps) - set(done))}")
        done.append(ready[0])
    return done


def stage_overrides(wf: DictConfig, step: DictConfig) -> list[str]:
    return [f"stage={step.stage}", f"run_dir={wf.run_dir}", f"launcher={wf.launcher}", f"cluster={wf.cluster}",
            *wf.overrides, *step.get("overrides", [])]


def ancestors(wf: DictConfig, name: str) -> set[str]:
    """Every step `name` comes after, directly or through others."""
    seen: set[str] = set()
    todo = list(wf.steps[name].get("after", []))
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo.extend(wf.steps[dep].get("after", []))
    return seen


def check_upstream_order(wf: DictConfig) -> None:
    """A stage step comes after every step that runs a stage it reads (its `upstream`): otherwise, on Slurm, it is
    queued without waiting for them, and its shards refuse to run for want of their inputs."""
    from .stages import get_stage

    runs = {n: s.stage for n, s in wf.steps.items() if "stage" in s}
    for name, stage in runs.items():
        try:
            reads = set(get_stage(stage).upstream)
        except ConfigError as exc:
            raise ConfigError(f"step {name}: {exc}") from None
        before = ancestors(wf, name)
        for other, up in runs.items():
            if up in reads and other not in before:
                raise ConfigError(f"step {name}: stage {stage} reads the outputs of stage {up}, but the step does "
                                  f"not come after step {other} (add it to `after`)")


def check_steps(wf: DictConfig) -> dict[str, DictConfig]:
    """Compose and validate every step up front, so a typo in the last step fails before the first one runs or is
    queued. Returns each stage step's composed config."""
    from .config import compose

    check_upstream_order(wf)
    cluster = None
    if wf.launcher == "slurm":
        from .launchers.slurm import require_sbatch

        require_sbatch()
        cluster = command_cluster(wf)
    cfgs: dict[str, DictConfig] = {}
    for name in order(wf):
        step = wf.steps[name]
        try:
            if "stage" in step:
                cfgs[name] = compose(stage_overrides(wf, step))
            else:
                _check_command(name, step, cluster)
        except ConfigError as exc:
            raise ConfigError(f"step {name}: {exc}") from None
    return cfgs


def _check_command(name: str, step: DictConfig, cluster: DictConfig | None) -> None:
    try:
        found = importlib.util.find_spec(step.module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"module {step.module!r} not found")
    unknown = set(step.get("resources", {})) - RESOURCE_KEYS
    if unknown:
        raise ConfigError(f"unknown resources {sorted(unknown)}; known: {sorted(RESOURCE_KEYS)}")
    if cluster is not None:
        try:
            command_parameters(name, step, cluster, [])
        except (ValueError, TypeError) as exc:  # e.g. resources: {cpus: two}
            raise ConfigError(f"bad resources: {exc}") from None


def command_cluster(wf: DictConfig) -> DictConfig:
    """The cluster profile the stage steps get: conf/cluster/<cluster>.yaml plus the workflow's cluster.* overrides."""
    from .config import compose

    ovs = [o for o in wf.overrides if o.lstrip("+~").startswith("cluster.")]
    return compose([f"run_dir={wf.run_dir}", "launcher=slurm", f"cluster={wf.cluster}", *ovs]).cluster


def command_parameters(name: str, step: DictConfig, cluster: DictConfig, upstream: list[str]) -> dict[str, Any]:
    """submitit parameters of a command step: the stage launcher's own (partition, account, QoS, constraint, setup
    lines, extra sbatch options, time limit cap), sized by the step's resources; one job, not an array."""
    from .launchers.sbatch import slurm_params

    res = step.get("resources", {})
    resources = {"cpus": res.get("cpus", 2), "gpus": res.get("gpus", 0), "mem_gb": res.get("mem_gb", 8),
                 "timeout_min": res.get("timeout_min", 240), "nodes": 1, "tasks_per_node": 1,
                 "partition": res.get("partition")}
    return slurm_params(resources, cluster, f"afterany:{':'.join(upstream)}" if upstream else None,
                        name=f"vpt-{name}")


def _marker(wf: DictConfig, name: str) -> Path:
    return Path(wf.run_dir) / "workflow" / f"{name}.done"


def run_command_step(module: str, args: list[str], marker: str, nproc: int = 1) -> None:
    """A command step (pretraining, VQA): runs the module (under torchrun when nproc > 1), then its done marker."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    from .logs import configure

    configure()  # in a Slurm job this is the process's entry point
    log.info("$ python %s", " ".join([*launcher, "-m", module, *args]))
    subprocess.run([sys.executable, *launcher, "-m", module, *args], check=True)
    write_json(marker, {"module": module, "args": list(args), "time": time.time()})


def run_local(wf: DictConfig, cfgs: dict[str, DictConfig] | None = None) -> int:
    """Steps one after another; `cfgs` is check_steps' result when the caller has validated already."""
    from .cli import launch_stage

    if cfgs is None:
        check_steps(wf)
    failed: dict[str, list[int]] = {}  # step -> its shards that did not complete ([] for a command step)
    for name in order(wf):
        step = wf.steps[name]
        if any(d in failed for d in step.get("after", [])):
            log.warning("== %s: skipped (upstream step failed)", name)
            failed[name] = []
            continue
        log.info("== %s", name)
        if "stage" in step:
            result = launch_stage(stage_overrides(wf, step))
            if not result.ok:
                failed[name] = sorted(result.failed_shards)
        elif _marker(wf, name).exists() and not step.get("rerun", False):
            log.info("%s: done already (%s)", name, _marker(wf, name))
        else:
            try:
                run_command_step(step.module, list(step.get("args", [])), str(_marker(wf, name)),
                                 int(step.get("nproc", 1)))
            except subprocess.CalledProcessError as exc:
                log.error("%s failed: %s", name, exc)
                failed[name] = []
    return report_failures(wf, failed)


def report_failures(wf: DictConfig, failed: dict[str, list[int]]) -> int:
    """One line naming the failed steps (and a stage's incomplete shards); the workflow's exit code."""
    if not failed:
        return 0
    parts = [f"{n} (shards {', '.join(map(str, s))})" if s else n for n, s in failed.items()]
    print(f"\nworkflow {wf.get('name', '')}: steps with failures: {'; '.join(parts)}", file=sys.stderr)
    return 1


def slurm_failures(wf: DictConfig, cfgs: dict[str, DictConfig]) -> dict[str, list[int]]:
    """After every job ended: stage shards with no completion marker (the task died, timed out or was refused
    because an upstream shard was missing) and command steps with no done marker."""
    from .atomic import read_json
    from .manifest import GEOMETRY_FILE
    from .shards import ShardStore

    geo = read_json(Path(wf.run_dir) / GEOMETRY_FILE) or {"num_shards": 0}
    failed: dict[str, list[int]] = {}
    for name in order(wf):
        if name in cfgs:
            cfg = cfgs[name]
            shards = list(cfg.shards) if cfg.shards is not None else range(int(geo["num_shards"]))
            bad = [s for s in shards if not ShardStore(wf.run_dir, cfg.stage.name, s).is_complete()]
            if bad:
                failed[name] = bad
        elif not _marker(wf, name).exists():
            failed[name] = []
    return failed


def submit_slurm(wf: DictConfig, cfgs: dict[str, DictConfig] | None = None) -> dict[str, list[str]]:
    """Submit every step with afterany dependencies on its upstream steps' jobs. Returns step -> job ids.
    `cfgs` is check_steps' result when the caller has validated already."""
    import submitit

    from .cli import launch_stage

    if cfgs is None:
        check_steps(wf)
    cluster = command_cluster(wf)
    jobs: dict[str, list[str]] = {}
    for name in order(wf):
        step = wf.steps[name]
        upstream = [j for d in step.get("after", []) for j in jobs.get(d, [])]
        dep = [f"launcher.dependency=afterany:{':'.join(upstream)}"] if upstream else []
        if "stage" in step:
            result = launch_stage([*stage_overrides(wf, step), "launcher.wait=false", *dep])
            jobs[name] = list(result.job_ids)
        elif _marker(wf, name).exists() and not step.get("rerun", False):
            jobs[name] = []
        else:
            _marker(wf, name).unlink(missing_ok=True)  # a rerun step's old marker must not vouch for this run
            ex = submitit.AutoExecutor(folder=str(Path(wf.run_dir) / "workflow" / "logs"), cluster="slurm")
            ex.update_parameters(**command_parameters(name, step, cluster, upstream))
            job = ex.submit(run_command_step, step.module, list(step.get("args", [])), str(_marker(wf, name)),
                            int(step.get("nproc", 1)))
            print(f"submitted {name}: job {job.job_id}")  # the command's output: the job ids to watch
            jobs[name] = [job.job_id]
    write_json(Path(wf.run_dir) / "workflow" / "jobs.json", jobs)
    return jobs


def wait_for(job_ids: list[str], poll_s: float = 3.0, max_failures: int = 20) -> None:
    """Until none of the jobs is queued or running. Gives up after `max_failures` squeue failures in a row (the
    controller is down or unreachable) instead of polling forever."""
    failures = 0
    while job_ids:
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            if out.returncode == 0:
                if not out.stdout.strip():
                    return
                error = None
            elif "Invalid job id" in out.stderr:
                return  # every job has ended and slurmctld has already forgotten them
            else:
                error = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[0]
        failures = failures + 1 if error else 0
        if failures >= max_failures:
            raise WaitError(f"squeue failed {failures} times in a row (last: {error}); the jobs may still run: "
                            "check squeue, then re-run the workflow (it does only what is missing)")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    from .logs import configure
    from .status import format_status, run_status

    configure()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        wf = load(argv[0], argv[1:])
        cfgs = check_steps(wf)  # all of them before anything runs, is submitted or written
        if wf.launcher == "local":
            rc = run_local(wf, cfgs)
        else:
            jobs = submit_slurm(wf, cfgs)
            rc = 0
            if wf.wait:
                log.info("waiting for the workflow's jobs ...")
                wait_for([j for ids in jobs.values() for j in ids])
                rc = report_failures(wf, slurm_failures(wf, cfgs))
    except ConfigError as exc:
        return fail(str(exc))
    except WaitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_status(wf.run_dir, run_status(wf.run_dir)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
