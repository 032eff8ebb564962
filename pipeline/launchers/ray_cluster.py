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

RAY_PORT_BASE = 20000


def _port_block(job_id: str) -> int:
    """A block of 40 ports per job: jobs (and emulated nodes) sharing a host must not clash on Ray's fixed
    ports (GCS, client server, dashboard agent)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return RAY_PORT_BASE + 40 * (int(digits) % 1000)


def _ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _node_address(node_name: str) -> str:
    """IP of a Slurm node: its NodeAddr (emulated nodes have unresolvable names), else DNS, else this host."""
    try:
        out = subprocess.run(["scontrol", "show", "node", node_name], capture_output=True, text=True,
                             timeout=30).stdout
        for field in out.split():
            if field.startswith("NodeAddr="):
                return socket.gethostbyname(field.split("=", 1)[1])
    except (OSError, subprocess.SubprocessError, socket.gaierror):
        pass
    try:
        return socket.gethostbyname(node_name)
    except socket.gaierror:
        return socket.gethostbyname(socket.gethostname())


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
        node = None
        try:
            host = _node_address(env.hostnames[0] if env.hostnames else socket.gethostname())
            port = _port_block(job_id)
            address = f"{host}:{port}"
            node = _start_node(["--head", f"--port={port}", f"--node-ip-address={host}",
                                f"--ray-client-server-port={port + 1}", f"--dashboard-port={port + 2}",
                                f"--dashboard-agent-listen-port={port + 4}", f"--temp-dir={temp_dir}",
                                "--include-dashboard=false"], ray_env)
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
            done_file.write_text("done")  # also releases the workers when the head failed to start
            if node is not None:
                _stop_node(node)
    deadline = time.time() + timeout_s
    while not head_file.exists():
        if done_file.exists():
            raise RuntimeError("the Ray head (task 0) failed before the cluster formed: see its log")
        if time.time() > deadline:
            raise TimeoutError("Ray head did not start")
        time.sleep(0.5)
    node = _start_node([f"--address={head_file.read_text().strip()}", f"--temp-dir={temp_dir}",
                        f"--dashboard-agent-listen-port={_port_block(job_id) + 4 + rank % 36}"], ray_env)
    try:
        while not done_file.exists() and node.poll() is None:
            time.sleep(1)
    finally:
        _stop_node(node)
    return None


def ray_cluster_info() -> dict:
    """Nodes and CPUs of the Ray cluster at RAY_ADDRESS, and the Slurm node each Ray node ran a task on.

    One task is pinned to each Ray node (hard node affinity): a node that joined but cannot run work (no worker
    processes, broken object store) makes this fail or hang instead of passing unnoticed.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]

        @ray.remote(num_cpus=1)
        def where() -> tuple[str, str]:
            return ray.get_runtime_context().get_node_id(), os.environ.get("SLURMD_NODENAME", socket.gethostname())

        ran = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                       .remote() for n in nodes], timeout=120)
        return {"nodes": len(nodes), "cpus": int(sum(n["Resources"].get("CPU", 0) for n in nodes)),
                "task_nodes": len({node_id for node_id, _ in ran}),
                "slurm_nodes": sorted({slurm_node for _, slurm_node in ran})}
    finally:
        ray.shutdown()


def probe_job(state_dir: str) -> dict | None:
    """A Slurm job body that starts the Ray cluster over its allocation and reports on it (rank 0 only)."""
    import submitit

    return run_on_ray_cluster(ray_cluster_info, submitit.JobEnvironment(), Path(state_dir))
