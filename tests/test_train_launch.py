"""Training jobs on Slurm take their partition, account, QoS, setup lines and GPUs per node from the same
cluster profiles as the stages (no Slurm needed: the submitit parameters are computed, not submitted)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.train.__main__ import compose
from pipeline.train.launch import executor_parameters

from conftest import REPO


def test_a_gpu_profile_fills_every_unset_slurm_value():
    sl = compose(["run_on=slurm", "slurm.cluster=a40", "slurm.nodes=2"])["slurm"]
    params = executor_parameters({**sl, "account": "proj42"})
    assert params["nodes"] == 2
    assert params["gpus_per_node"] == 4 and params["tasks_per_node"] == 4       # one rank per GPU
    assert params["cpus_per_task"] == 16 and params["mem_gb"] == 4 * 60         # a40: 16 CPUs, 60 GB per GPU
    assert params["slurm_partition"] == "gpuA40x4"                              # the GPU partition
    assert params["slurm_account"] == "proj42"


def test_explicit_values_win_over_the_profile_and_no_profile_keeps_the_small_defaults():
    sl = compose(["slurm.cluster=a100", "slurm.tasks_per_node=2", "slurm.gpus_per_node=2", "slurm.mem_gb=100",
                  "slurm.partition=debug", "slurm.timeout_min=99999"])["slurm"]
    params = executor_parameters(sl)
    assert params["tasks_per_node"] == 2 and params["gpus_per_node"] == 2 and params["mem_gb"] == 100
    assert params["slurm_partition"] == "debug"
    assert params["timeout_min"] <= 2880                                        # capped by the profile
    plain = executor_parameters(compose([])["slurm"])
    assert (plain["tasks_per_node"], plain["cpus_per_task"], plain["mem_gb"]) == (1, 2, 8.0)
    assert "gpus_per_node" not in plain and "slurm_partition" not in plain


def test_an_unknown_profile_fails_before_anything_is_submitted(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "pipeline.train", f"run_dir={run}", "run_on=slurm",
                        "slurm.cluster=nosuchsite"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nosuchsite" in lines[0] and "a40" in lines[0], r.stderr
    assert not run.exists()


@pytest.mark.parametrize("name", ["generic", "a40", "a100"])
def test_every_shipped_profile_gives_parameters(name):
    params = executor_parameters(compose([f"slurm.cluster={name}"])["slurm"])
    assert params["tasks_per_node"] >= 1 and params["mem_gb"] > 0
