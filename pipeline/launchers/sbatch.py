"""The sbatch parameters of every job the pipeline submits, from one function: `slurm_params`.

Stage arrays and their finish jobs (`pipeline.launchers.slurm`), workflow command steps (`pipeline.workflow`) and
training jobs (`pipeline.train.launch`) all size their jobs here from two things:

- `resources`, what the job asks for: `nodes`, `tasks_per_node` (1), `gpus` (per node, 0), `gpus_per_task`
  (default: the node's GPUs spread over its tasks), `cpus` (per task), `mem_gb` (per node), `timeout_min`, and
  optionally `partition`, `account`, `qos`, `constraint` that replace the cluster profile's;
- `cluster`, a cluster profile (conf/cluster/*.yaml over `ClusterConfig`): partition and GPU partition, account,
  QoS, constraint, CPUs and memory per GPU, the time limit cap, setup lines and extra sbatch options.

GPU jobs get at least the GPUs' share of a node (`cpus_per_gpu` x GPUs per task CPUs, `mem_gb_per_gpu` x GPUs
memory). With `gpu_share="floor"` (stage arrays, command steps: their resources are minimums with defaults) the
request is raised to that share; with `gpu_share="default"` (training: `slurm.*` values are exact and null means
"from the profile") the share only fills a request left at None. Without GPUs a None request is 2 CPUs and 8 GB.

Pure: no Slurm, no submitit, nothing from the package; the result is what `submitit.AutoExecutor.update_parameters`
takes.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping

DEFAULT_CPUS = 2        # per task, for a request left at None on a node without GPUs (or per GPU, no profile)
DEFAULT_MEM_GB = 8.0    # per node, likewise


def slurm_params(resources: Mapping[str, Any], cluster: Mapping[str, Any] | None, dependency: str | None = None,
                 *, name: str, array_parallelism: int | None = None,
                 gpu_share: Literal["floor", "default"] = "floor") -> dict[str, Any]:
    """submitit parameters for one job (or one array, with `array_parallelism`), `dependency` as sbatch takes it
    (e.g. `afterany:12:13`)."""
    if gpu_share not in ("floor", "default"):
        raise ValueError(f"gpu_share must be 'floor' or 'default', got {gpu_share!r}")
    res = dict(resources)
    cl = dict(cluster or {})
    gpus = int(res.get("gpus") or 0)
    tasks = int(res.get("tasks_per_node") or 1)
    gpus_per_task = res.get("gpus_per_task")
    gpus_per_task = int(gpus_per_task) if gpus_per_task is not None else max(1, gpus // tasks)
    cpus_per_gpu = cl["cpus_per_gpu"] if cl.get("cpus_per_gpu") is not None else DEFAULT_CPUS
    mem_gb_per_gpu = cl["mem_gb_per_gpu"] if cl.get("mem_gb_per_gpu") is not None else DEFAULT_MEM_GB
    cpus_share = cpus_per_gpu * gpus_per_task if gpus else DEFAULT_CPUS
    mem_share = mem_gb_per_gpu * gpus if gpus else DEFAULT_MEM_GB
    cpus, mem = res.get("cpus"), res.get("mem_gb")
    if gpu_share == "floor":
        if cpus is None or mem is None:
            raise ValueError("gpu_share='floor' needs cpus and mem_gb in resources")
        cpus = max(cpus, cpus_share) if gpus else cpus
        mem = max(mem, mem_share) if gpus else mem
    else:
        cpus = cpus_share if cpus is None else cpus
        mem = mem_share if mem is None else mem
    timeout = int(res["timeout_min"])
    if cl.get("max_timeout_min"):
        timeout = min(timeout, int(cl["max_timeout_min"]))

    params: dict[str, Any] = {"name": name, "timeout_min": timeout, "nodes": int(res.get("nodes") or 1),
                              "tasks_per_node": tasks, "cpus_per_task": int(cpus), "mem_gb": float(mem)}
    if array_parallelism is not None:
        params["slurm_array_parallelism"] = int(array_parallelism)
    if gpus:
        params["gpus_per_node"] = gpus
    partition = res.get("partition") or ((cl.get("gpu_partition") or cl.get("partition")) if gpus
                                         else cl.get("partition"))
    if partition:
        params["slurm_partition"] = partition
    for key in ("account", "qos", "constraint"):
        value = res.get(key) or cl.get(key)
        if value:
            params[f"slurm_{key}"] = value
    if cl.get("setup"):
        params["slurm_setup"] = list(cl["setup"])
    extra = dict(cl.get("additional") or {})
    if dependency:
        extra["dependency"] = dependency
    if extra:
        params["slurm_additional_parameters"] = extra
    return params
