"""A Ray cluster over a multi-node Slurm allocation: head on task 0, one worker per other task.

Every task of the job calls `run_on_ray_cluster`; task 0 starts the head, waits for all nodes, runs the work with
RAY_ADDRESS set (the inference runner connects to it) and then writes a done file; the other tasks start a worker,
wait for the done file and stop their worker. Distinct temp dirs per node keep plasma sockets apart when several
"nodes" share a host.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

RAY_PORT = 6379


def _ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _start_node(args: list[str], env: dict) -> subprocess.Popen:
    # --block keeps the node's processes children of this one: stopping it stops exactly this node, never
    # another Ray on the same host (emulated nodes, other jobs).
    return subprocess.Popen([_ray_bin(), "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop_node(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_on_ray_cluster(work: Callable[[], Any], env, state_dir: Path, timeout_s: float = 300) -> Any:
    job_id, rank, n = env.job_id, env.global_rank, env.num_tasks
    state_dir = state_dir / str(job_id)
    state_dir.mkdir(parents=True, exist_ok=True)
    head_file, done_file = state_dir / "head_address", state_dir / "done"
    temp_dir = f"/tmp/ray-{job_id}-{rank}"
    ray_env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    if rank == 0:
        host = socket.gethostbyname(env.hostnames[0]) if env.hostnames else "127.0.0.1"
        port = RAY_PORT + (sum(map(ord, str(job_id))) % 1000)
        address = f"{host}:{port}"
        node = _start_node(["--head", f"--port={port}", f"--node-ip-address={host}", f"--temp-dir={temp_dir}",
                            "--include-dashboard=false"], ray_env)
        try:
            import ray

            deadline = time.time() + timeout_s
            while True:
                try:
                    ray.init(address=address)
                    break
                except Exception:  # noqa: BLE001 - head still starting
                    if time.time() > deadline or node.poll() is not None:
                        raise
                    time.sleep(1)
            head_file.write_text(address)
            while len([nd for nd in ray.nodes() if nd["Alive"]]) < n:
                if time.time() > deadline:
                    raise TimeoutError(f"only {len(ray.nodes())} of {n} Ray nodes joined")
                time.sleep(1)
            ray.shutdown()
            os.environ["RAY_ADDRESS"] = address
            return work()
        finally:
            done_file.write_text("done")
            _stop_node(node)
    deadline = time.time() + timeout_s
    while not head_file.exists():
        if time.time() > deadline:
            raise TimeoutError("Ray head did not start")
        time.sleep(0.5)
    node = _start_node([f"--address={head_file.read_text().strip()}", f"--temp-dir={temp_dir}"], ray_env)
    try:
        while not done_file.exists() and node.poll() is None:
            time.sleep(1)
    finally:
        _stop_node(node)
    return None
