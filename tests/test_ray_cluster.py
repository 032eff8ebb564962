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


def test_clip_stage_as_a_two_node_job_matches_the_local_run(tmp_path, shared_media, cache_dir, slurm_cluster):
    """`stage.resources.nodes=2`: each array task is a 2-node job running the stage on a Ray cluster over its
    allocation, with one model replica per node. Its outputs equal a local run's."""
    import shutil

    import numpy as np
    import pyarrow.parquet as pq
    from conftest import run_cli

    from pipeline.atomic import read_json

    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"counter {shared_media / 'counter.mp4'}\nfades {shared_media / 'fades.mp4'}\n")
    env = {"VPT_CACHE_DIR": str(cache_dir)}
    local, multi = tmp_path / "local", tmp_path / "multi"
    run_cli("stage=download", f"run_dir={local}", f"input={manifest}", "models=tiny", env=env)
    run_cli("stage=frames", f"run_dir={local}", "models=tiny", env=env)
    shutil.copytree(local, multi)
    run_cli("stage=clip", f"run_dir={local}", "models=tiny", env=env)
    run_cli("stage=clip", f"run_dir={multi}", "models=tiny", "launcher=slurm", "stage.resources.nodes=2",
            "stage.resources.cpus=2", "stage.resources.mem_gb=1.5", "stage.resources.timeout_min=10",
            "stage.runner.num_model_actors=2", "cluster.partition=main", "launcher.poll_seconds=0.5",
            env={**slurm_cluster.env, **env})

    def rows(run):
        t = pq.read_table(run / "clip" / "shard-00000" / "clip.parquet").sort_by([("video_id", "ascending"),
                                                                                  ("frame_idx", "ascending")])
        return t.column("video_id").to_pylist(), t.column("frame_idx").to_pylist(), np.array(
            t.column("embedding").to_pylist(), dtype=np.float32)

    (ids_a, idx_a, emb_a), (ids_b, idx_b, emb_b) = rows(local), rows(multi)
    assert ids_a == ids_b and idx_a == idx_b and len(ids_a) > 10
    np.testing.assert_allclose(emb_b, emb_a, atol=2e-3)
    stats = read_json(multi / "clip" / "shard-00000" / "stats.json")
    assert len(stats["model_nodes"]) == 2, stats  # one replica on each node of the job
