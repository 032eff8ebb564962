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

Command steps take `nproc: N` (run under torchrun) and `rerun: true` (run every time, no done marker skip).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .atomic import write_json
from .errors import ConfigError

STEP_KEYS = {"stage", "module", "args", "overrides", "after", "resources", "nproc", "rerun"}


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


def _marker(wf: DictConfig, name: str) -> Path:
    return Path(wf.run_dir) / "workflow" / f"{name}.done"


def run_command_step(module: str, args: list[str], marker: str, nproc: int = 1) -> None:
    """A command step (pretraining, VQA): runs the module (under torchrun when nproc > 1), then its done marker."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    print(f"\n$ python {' '.join(launcher)} -m {module} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *launcher, "-m", module, *args], check=True)
    write_json(marker, {"module": module, "args": list(args), "time": time.time()})


def run_local(wf: DictConfig) -> int:
    from .cli import launch_stage

    failed: list[str] = []
    for name in order(wf):
        step = wf.steps[name]
        if any(d in failed for d in step.get("after", [])):
            print(f"\n== {name}: skipped (upstream step failed)")
            failed.append(name)
            continue
        print(f"\n== {name}", flush=True)
        if "stage" in step:
            result = launch_stage(stage_overrides(wf, step))
            if not result.ok:
                failed.append(name)
        elif _marker(wf, name).exists() and not step.get("rerun", False):
            print(f"{name}: done already ({_marker(wf, name)})")
        else:
            try:
                run_command_step(step.module, list(step.get("args", [])), str(_marker(wf, name)),
                                 int(step.get("nproc", 1)))
            except subprocess.CalledProcessError as exc:
                print(f"{name} failed: {exc}", file=sys.stderr)
                failed.append(name)
    if failed:
        print(f"\nworkflow {wf.get('name', '')}: steps with failures: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def submit_slurm(wf: DictConfig) -> dict[str, list[str]]:
    """Submit every step with afterany dependencies on its upstream steps' jobs. Returns step -> job ids."""
    import submitit

    from .cli import launch_stage

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
            res = dict(step.get("resources", {}))
            ex = submitit.AutoExecutor(folder=str(Path(wf.run_dir) / "workflow" / "logs"), cluster="slurm")
            params: dict[str, Any] = {"name": f"vpt-{name}", "timeout_min": int(res.get("timeout_min", 240)),
                                      "cpus_per_task": int(res.get("cpus", 2)),
                                      "mem_gb": float(res.get("mem_gb", 8)), "nodes": 1, "tasks_per_node": 1}
            if res.get("gpus"):
                params["gpus_per_node"] = int(res["gpus"])
            partition = res.get("partition")
            if partition:
                params["slurm_partition"] = partition
            if upstream:
                params["slurm_additional_parameters"] = {"dependency": f"afterany:{':'.join(upstream)}"}
            ex.update_parameters(**params)
            job = ex.submit(run_command_step, step.module, list(step.get("args", [])), str(_marker(wf, name)),
                            int(step.get("nproc", 1)))
            print(f"submitted {name}: job {job.job_id}")
            jobs[name] = [job.job_id]
    write_json(Path(wf.run_dir) / "workflow" / "jobs.json", jobs)
    return jobs


def wait_for(job_ids: list[str], poll_s: float = 3.0) -> None:
    while job_ids:
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
        if out.returncode == 0 and not out.stdout.strip():
            return
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    from .cli import fail
    from .status import format_status, run_status

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        wf = load(argv[0], argv[1:])
        if wf.launcher == "local":
            rc = run_local(wf)
        else:
            jobs = submit_slurm(wf)
            rc = 0
            if wf.wait:
                print("waiting for the workflow's jobs ...", flush=True)
                wait_for([j for ids in jobs.values() for j in ids])
                missing = [n for n, s in wf.steps.items() if "module" in s and not _marker(wf, n).exists()]
                rc = 1 if missing else 0
    except ConfigError as exc:
        return fail(str(exc))
    print()
    print(format_status(wf.run_dir, run_status(wf.run_dir)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
