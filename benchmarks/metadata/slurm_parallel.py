"""Parallel mode: the benchmark client as a Slurm array (submitit ``map_array``) or as local processes."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .run import run_client

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_local_clients(cfg: dict, clients: int) -> list[dict]:
    """`clients` processes on this machine, all under cfg["root"]."""
    if clients == 1:
        return [run_client(cfg, 0, 1)]
    # spawn: the parent may hold Deep Lake / pyarrow threads that fork would copy half-locked.
    with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_client, cfg, i, clients) for i in range(clients)]
        return [f.result() for f in futures]


def run_slurm_clients(cfg: dict, clients: int) -> list[dict]:
    """A Slurm array of `clients` tasks running `run_client` concurrently on cfg["root"] (a shared path)."""
    import submitit

    s = cfg["slurm"]
    folder = Path(s["folder"] or Path(cfg["root"]) / "_submitit")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    params = {
        "timeout_min": int(s["timeout_min"]),
        "cpus_per_task": int(s["cpus_per_task"]),
        "mem_gb": float(s["mem_gb"]),
        "nodes": 1,
        "tasks_per_node": 1,
        # All tasks at once: the point is concurrent load on one filesystem.
        "slurm_array_parallelism": clients,
        "slurm_setup": [f"export PYTHONPATH={REPO_ROOT}:${{PYTHONPATH:-}}"],
        "name": "bench-metadata",
    }
    if s["partition"]:
        params["slurm_partition"] = s["partition"]
    if s["additional"]:
        params["slurm_additional_parameters"] = dict(s["additional"])
    executor.update_parameters(**params)
    jobs = executor.map_array(run_client, [cfg] * clients, list(range(clients)), [clients] * clients)
    return [job.result() for job in jobs]
