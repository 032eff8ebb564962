"""Session fixture giving tests a real local Slurm cluster (slurm/local_cluster.sh).

Use from conftest.py:  ``from slurm_cluster import slurm_cluster  # noqa: F401``
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.launchers.local_cluster import NODES, REPO_ROOT, LocalClusterError, local_cluster  # noqa: F401

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "mariadbd")


@dataclass
class SlurmCluster:
    state_dir: Path
    nodes: list[str]  # node names, sorted, e.g. ["node1", "node2", "node3"]
    env: dict[str, str] = field(repr=False)  # full environment for subprocesses (SLURM_CONF set)
    started_here: bool = False  # this session ran `up` (a cluster already up is reused)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, squeue, ...) against this cluster."""
        return subprocess.run(list(args), env=self.env, check=check, capture_output=True, text=True)

    def final_state(self, job_id: str | int, timeout_s: float = 60.0) -> str:
        """sacct_state once accounting has caught up with the end of the job (it lags: an array's tasks may show
        COMPLETING or disagree (MIXED) for a moment after squeue has forgotten the job)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.sacct_state(job_id)
            if state not in ("", "RUNNING", "PENDING", "COMPLETING", "MIXED", "REQUEUED") or time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    def sacct_state(self, job_id: str | int) -> str:
        """Accounting state of a job ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", ...).

        For an array job id (without _N) the states of all tasks must agree, else "MIXED".
        "" when slurmdbd has no record yet.
        """
        out = self.run("sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State").stdout
        # "CANCELLED by 0" -> "CANCELLED"
        states = {line.split()[0] for line in out.splitlines() if line.strip()}
        if not states:
            return ""
        return states.pop() if len(states) == 1 else "MIXED"


def _cannot_run(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"local Slurm required on CI: {reason}")
    pytest.skip(reason)


def _missing_binaries() -> list[str]:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    return [b for b in REQUIRED_BINARIES if shutil.which(b, path=path) is None]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local Slurm cluster (3 nodes unless one was already up in the state dir).

    Sets os.environ["SLURM_CONF"] (and /usr/sbin on PATH) for the whole session so that submitit and
    subprocesses talk to it. Shared with other test sessions and benchmarks, and stopped by the last user out
    when it was started this way (`pipeline.launchers.local_cluster`).
    """
    is_root = os.geteuid() == 0
    missing = _missing_binaries()
    if missing and not is_root:
        _cannot_run(f"Slurm not installed ({', '.join(missing)} missing) and not root to install it")
    try:
        with local_cluster(nodes=NODES) as cluster:
            env = dict(os.environ)
            nodes = subprocess.run(["sinfo", "-h", "-N", "-p", "main", "-o", "%N"], env=env, check=True,
                                   capture_output=True, text=True).stdout.split()
            yield SlurmCluster(state_dir=cluster.state_dir, nodes=sorted(set(nodes)), env=env,
                               started_here=cluster.started_here)
    except LocalClusterError as exc:
        if is_root or os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
