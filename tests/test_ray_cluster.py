"""Multi-node job mode: a Ray cluster started over a 2-node Slurm allocation (head + worker via the job's tasks)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slurm


def test_ray_cluster_over_two_slurm_nodes(tmp_path, slurm_cluster, monkeypatch):
    import submitit

    from pipeline.launchers.ray_cluster import probe_job

    for k, v in slurm_cluster.env.items():
        monkeypatch.setenv(k, v)
    ex = submitit.AutoExecutor(folder=str(tmp_path / "logs"), cluster="slurm")
    ex.update_parameters(nodes=2, tasks_per_node=1, cpus_per_task=2, mem_gb=1.5, timeout_min=5,
                         slurm_partition="main")
    job = ex.submit(probe_job, str(tmp_path / "ray"))
    results = job.results()  # one per task: rank 0 returns the report, the worker None
    assert results[1:] == [None]
    report = results[0]
    assert report["nodes"] == 2 and report["cpus"] >= 4
    assert report["task_nodes"] == 2  # a task ran on each Ray node ...
    assert len(report["slurm_nodes"]) == 2, report  # ... and they are the allocation's two Slurm nodes
