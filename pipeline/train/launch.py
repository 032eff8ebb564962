"""Training on Slurm: `python -m pipeline.train run_on=slurm slurm.nodes=2 slurm.tasks_per_node=4 ...`.

One Slurm task per rank (per GPU; per node on CPU). `slurm.cluster=a40` takes the partition, account, QoS,
constraint, setup lines and GPUs per node (= ranks per node) from that profile in conf/cluster, the same profiles
the stages use; explicit `slurm.*` values win. Each task sets the torch.distributed variables from Slurm's
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and runs the same training loop as torchrun. The task is
checkpointable: on the pre-timeout signal or preemption submitit requeues the job, and the loop resumes from the
latest complete DCP checkpoint (`train.resume=true`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import submitit

from ..launchers.ray_cluster import _job_number, _node_address
from ..launchers.sbatch import slurm_params
from ..launchers.slurm import Requeueable

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "conf" / "cluster"


def master_port(job_id: str) -> int:
    """The rendezvous port of a job: spread by job id so jobs sharing a node differ, and kept below the kernel's
    ephemeral range (32768+), where any outgoing connection may already hold it."""
    return 29000 + _job_number(job_id) % 3500


class TrainTask(Requeueable):
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        os.environ.update({
            "RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes)),
            "MASTER_ADDR": _node_address(env.hostnames[0]), "MASTER_PORT": str(master_port(env.job_id)),
        })
        from ..logs import configure
        from .loop import train

        configure(rank=env.global_rank)     # a Slurm task does not pass through `python -m pipeline.train`
        return train(self.cfg)


def cluster_profile(name: str | None) -> dict[str, Any]:
    """conf/cluster/<name>.yaml (or a yaml path) over its schema (`ClusterConfig`, as the stages see it) as a dict;
    {} for none."""
    if not name:
        return {}
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ..config import ClusterConfig

    path = Path(name) if str(name).endswith(".yaml") else CLUSTER_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml")))
        raise ValueError(f"slurm.cluster={name!r}: no profile {path} (known: {known})")
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    own.pop("defaults", None)  # the yaml names its schema; merged here by hand
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ClusterConfig), own)
    except OmegaConfBaseException as exc:
        raise ValueError(f"slurm.cluster={name!r}: {path}: {str(exc).splitlines()[0]}") from None
    return OmegaConf.to_container(merged, resolve=True)


def executor_parameters(sl: dict[str, Any]) -> dict[str, Any]:
    """submitit parameters of a training job: the explicit `slurm.*` values, every null one from the profile.
    One rank per task and one GPU per rank: tasks per node default to the node's GPUs (1 without GPUs)."""
    prof = cluster_profile(sl.get("cluster"))
    gpus = int(sl["gpus_per_node"] if sl.get("gpus_per_node") is not None else prof.get("gpus_per_node", 0))
    tasks = int(sl["tasks_per_node"] if sl.get("tasks_per_node") is not None else max(1, gpus))
    resources = {"nodes": sl["nodes"], "tasks_per_node": tasks, "gpus": gpus, "gpus_per_task": 1,
                 "cpus": sl.get("cpus_per_task"), "mem_gb": sl.get("mem_gb"), "timeout_min": sl["timeout_min"],
                 **{key: sl.get(key) for key in ("partition", "account", "qos", "constraint")}}
    return slurm_params(resources, prof, None, name="vpt-train", gpu_share="default")


def submit(cfg: dict[str, Any]) -> submitit.Job:
    params = executor_parameters(cfg["slurm"])
    ex = submitit.AutoExecutor(folder=str(Path(cfg["run_dir"]) / "logs" / "slurm"), cluster="slurm")
    ex.update_parameters(**params)
    job = ex.submit(TrainTask(cfg))
    # the command's output when it does not wait: the job id to watch
    print(f"submitted training: job {job.job_id} ({params['nodes']} node(s) x {params['tasks_per_node']} rank(s)); "
          f"logs in {Path(cfg['run_dir']) / 'logs' / 'slurm'}", flush=True)
    return job
