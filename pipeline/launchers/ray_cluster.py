"""A Ray cluster over a multi-node Slurm allocation: head on task 0, one worker per other task.

Every task of the job calls `run_on_ray_cluster`; task 0 starts the head, waits for all nodes, runs the work with
RAY_ADDRESS set (the inference runner connects to it) and then writes a done file; the other tasks start a worker,
wait for the done file and stop their worker. Distinct temp dirs per node keep plasma sockets apart when several
"nodes" share a host. Each node's `ray start` output is kept in `<state_dir>/<job_id>/ray-node-<rank>.<attempt>.log`.
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

# Ports below the kernel's ephemeral range (32768+ on Linux): a port from that range can be held at any moment
# by some outgoing connection on the node, and Ray's GCS then dies at start. Ray's own worker ports default to
# 10002-19999; torch rendezvous ports (train/launch.py) use 29000+.
RAY_PORT_RANGE = (20000, 29000)
NODE_START_ATTEMPTS = 3
STARTED_LINE = "Ray runtime started."


def _job_number(job_id: str) -> int:
    return int("".join(ch for ch in str(job_id) if ch.isdigit()) or "0")


def _free_ports(count: int, first: int) -> list[int]:
    """`count` ports not bound on this host, searched from `first` (wrapping) inside RAY_PORT_RANGE. Spreading
    the start by job id keeps jobs and emulated nodes sharing a host from probing the same ports at once."""
    lo, hi = RAY_PORT_RANGE
    ports: list[int] = []
    for i in range(hi - lo):
        port = lo + (first - lo + i) % (hi - lo)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports in {lo}-{hi} on {socket.gethostname()}")


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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start_node(make_args: Callable[[int], list[str]], env: dict, log: Path, deadline: float) -> subprocess.Popen:
    """Start one Ray node and return once Ray says it is up; retried with fresh ports when it dies at start.

    `--block` keeps the node's processes children of this one: stopping it stops exactly this node, never another
    Ray on the same host (emulated nodes, other jobs). Its output goes to `log` (one file per node and attempt).
    """
    for attempt in range(NODE_START_ATTEMPTS):
        path = log.with_name(f"{log.stem}.{attempt}{log.suffix}")
        with open(path, "w") as out:
            proc = subprocess.Popen([_ray_bin(), "start", "--block", "--disable-usage-stats", *make_args(attempt)],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None and STARTED_LINE not in path.read_text(errors="replace"):
            if time.time() > deadline:
                _stop_node(proc)
                raise TimeoutError(f"Ray node did not start in time; {path}:\n{_tail(path)}")
            time.sleep(0.5)
        if proc.poll() is None:
            return proc
    raise RuntimeError(f"Ray node failed to start {NODE_START_ATTEMPTS} times; last log {path}:\n{_tail(path)}")


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
    log = state_dir / f"ray-node-{rank}.log"
    temp_dir = f"/tmp/ray-{job_id}-{rank}"
    ray_env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    lo, hi = RAY_PORT_RANGE
    first_port = lo + (40 * _job_number(job_id)) % (hi - lo)
    deadline = time.time() + timeout_s
    if rank == 0:
        node = None
        try:
            host = _node_address(env.hostnames[0] if env.hostnames else socket.gethostname())
            head_ports: list[int] = []

            def head_args(attempt: int) -> list[str]:
                gcs, client, dashboard, agent = _free_ports(4, first_port + 10 * attempt)
                head_ports[:] = [gcs]
                return ["--head", f"--port={gcs}", f"--node-ip-address={host}", f"--ray-client-server-port={client}",
                        f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
                        f"--temp-dir={temp_dir}", "--include-dashboard=false"]

            node = _start_node(head_args, ray_env, log, deadline)
            address = f"{host}:{head_ports[0]}"
            import ray

            ray.init(address=address)
            head_file.write_text(address)
            while len([nd for nd in ray.nodes() if nd["Alive"]]) < n:
                if time.time() > deadline:
                    raise TimeoutError(f"only {len(ray.nodes())} of {n} Ray nodes joined; node logs in {state_dir}")
                time.sleep(1)
            ray.shutdown()
            os.environ["RAY_ADDRESS"] = address
            return work()
        finally:
            done_file.write_text("done")  # also releases the workers when the head failed to start
            if node is not None:
                _stop_node(node)
    while not head_file.exists():
        if done_file.exists():
            raise RuntimeError(f"the Ray head (task 0) failed before the cluster formed: see {state_dir}")
        if time.time() > deadline:
            raise TimeoutError("Ray head did not start")
        time.sleep(0.5)
    head = head_file.read_text().strip()

    def worker_args(attempt: int) -> list[str]:
        (agent,) = _free_ports(1, first_port + 4 + 10 * attempt + rank % 36)
        return [f"--address={head}", f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={agent}"]

    node = _start_node(worker_args, ray_env, log, deadline)
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
