"""Training on Slurm: `python -m pipeline.train run_on=slurm slurm.nodes=2 slurm.tasks_per_node=4 ...`.

One Slurm task per rank (per GPU; per node on CPU). Each task sets the torch.distributed variables from Slurm's
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
from ..launchers.slurm import Requeueable


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
        from .loop import train

        return train(self.cfg)


def submit(cfg: dict[str, Any]) -> submitit.Job:
    sl = cfg["slurm"]
    ex = submitit.AutoExecutor(folder=str(Path(cfg["run_dir"]) / "logs" / "slurm"), cluster="slurm")
    params: dict[str, Any] = {"name": "vpt-train", "nodes": int(sl["nodes"]), "tasks_per_node": int(sl["tasks_per_node"]),
                              "cpus_per_task": int(sl["cpus_per_task"]), "mem_gb": float(sl["mem_gb"]),
                              "timeout_min": int(sl["timeout_min"])}
    if sl.get("gpus_per_node"):
        params["gpus_per_node"] = int(sl["gpus_per_node"])
    for key in ("partition", "account", "qos"):
        if sl.get(key):
            params[f"slurm_{key}"] = sl[key]
    ex.update_parameters(**params)
    job = ex.submit(TrainTask(cfg))
    print(f"submitted training: job {job.job_id} ({sl['nodes']} node(s) x {sl['tasks_per_node']} rank(s)); "
          f"logs in {Path(cfg['run_dir']) / 'logs' / 'slurm'}", flush=True)
    return job
