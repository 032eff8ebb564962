"""The local Slurm cluster (`slurm/local_cluster.sh`) for a block of code: the tests' session fixture, the
benchmarks that submit to Slurm, trying things out.

Several users (test sessions, benchmarks) may share one cluster: each holds a shared lock on DIR/.test-users
while it uses it. A cluster started here is marked DIR/.started-by-tests, and the last user out stops it; a
cluster that was already up (started by hand) is left running.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "slurm" / "local_cluster.sh"
NODES = 3


class LocalClusterError(RuntimeError):
    """`local_cluster.sh up` failed (its output is in the message)."""


@dataclass
class LocalCluster:
    state_dir: Path
    started_here: bool      # this block ran `up` (a cluster already up is reused)


def cluster_script(action: str, state_dir: Path, *extra: str,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), action, "--dir", str(state_dir), *extra],
                          env=env, capture_output=True, text=True, timeout=900)


def default_state_dir() -> Path:
    return Path(os.environ.get("VPT_SLURM_DIR", "/tmp/vpt-slurm")).resolve()


@contextmanager
def local_cluster(state_dir: str | Path | None = None, nodes: int = NODES) -> Iterator[LocalCluster]:
    """A running local cluster for the block (started with `nodes` nodes when none is up). SLURM_CONF (and
    /usr/sbin on PATH) are set in os.environ for the block, so that sbatch, sacct and submitit use it, then
    restored. Raises LocalClusterError when it cannot be started."""
    state_dir = Path(state_dir).resolve() if state_dir else default_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    marker = state_dir / ".started-by-tests"
    users = open(state_dir / ".test-users", "a")  # noqa: SIM115  (held for the whole block)
    fcntl.flock(users, fcntl.LOCK_SH)
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    try:
        was_up = cluster_script("status", state_dir, env=dict(os.environ)).returncode == 0
        if not was_up:
            up = cluster_script("up", state_dir, "--nodes", str(nodes), env=dict(os.environ))
            if up.returncode != 0:
                raise LocalClusterError(f"local_cluster.sh up failed (rc {up.returncode}):\n{up.stdout}\n"
                                        f"{up.stderr[-4000:]}")
            marker.touch()
        os.environ["SLURM_CONF"] = str(state_dir / "etc" / "slurm.conf")
        if "/usr/sbin" not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
        yield LocalCluster(state_dir, started_here=not was_up)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)     # fails while someone else uses the cluster
            if marker.exists():
                cluster_script("down", state_dir, env=dict(os.environ))
                marker.unlink(missing_ok=True)
        except BlockingIOError:
            pass
        finally:
            users.close()
