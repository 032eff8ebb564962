"""Ingest under launcher=slurm with a dataset of several shard groups: the group writers run as ONE Slurm array
(one task per group, `stage.writers` at a time) after the stage's array, on a real local Slurm.

Oracle: the ingest shards' own rows tables (what the join produced); Slurm accounting (sacct) for the jobs.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_cli
from test_ingest_writers import shard_keys, view_keys

from benchmarks.ingest_bench import make_upstream
from pipeline.atomic import read_json, write_json
from pipeline.dataset import open_read_only, read_layout
from pipeline.schema import TABLE
from pipeline.shards import MARKER, ShardStore

pytestmark = pytest.mark.slurm

SHARDS, PER_GROUP, WRITERS = 4, 2, 2
SMALL = ["stage.resources.cpus=1", "stage.resources.mem_gb=1", "stage.resources.timeout_min=10",
         "cluster.partition=main", "launcher.poll_seconds=0.5"]
INGEST = ["stage=ingest", "models=tiny", "launcher=slurm", f"stage.shards_per_group={PER_GROUP}",
          f"stage.writers={WRITERS}", "stage.shards_per_commit=1", *SMALL]


def oracle_keys(run: Path) -> list[tuple[str, int]]:
    return shard_keys(run, range(SHARDS))


def writer_job(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if "group writer task(s)" in ln)
    assert line.startswith(f"submitted ingest finish step: {SHARDS // PER_GROUP} group writer task(s), job(s) ")
    [job] = line.split("job(s) ")[1].split(", ")
    return job


def array_tasks(slurm_cluster, job: str, n_tasks: int) -> dict[str, str]:
    """sacct's view of an array job: task id -> state, once every task has ended and accounting has caught up
    (slurmdbd lags: for a moment an array may show as one record, or only some of its tasks)."""
    deadline = time.monotonic() + 180
    while slurm_cluster.run("squeue", "-h", "-j", job, check=False).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    slurm_cluster.final_state(job)
    while True:
        out = slurm_cluster.run("sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State").stdout
        tasks = {ln.split("|")[0]: ln.split("|")[1].split()[0] for ln in out.splitlines() if ln.strip()}
        settled = len(tasks) >= n_tasks and all("_" in t and "[" not in t for t in tasks)
        if settled or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def task_result(folder: Path, job_id: str):
    """What a finished submitit task returned (its result pickle)."""
    import pickle

    from submitit.core.utils import JobPaths

    with open(JobPaths(folder, job_id=job_id, task_id=0).result_pickle, "rb") as f:
        outcome, value = pickle.load(f)
    assert outcome == "success", value
    return value


def test_group_writers_run_as_one_array_after_the_stage_array(tmp_path, slurm_cluster):
    run = make_upstream(tmp_path / "run", n_videos=8, num_shards=SHARDS, seed=3, seconds=12.0)

    # wait=false: the stage's array and the writers' array are queued; the writers' depend on the stage's.
    out = run_cli(*INGEST, f"run_dir={run}", "launcher.wait=false", env=slurm_cluster.env).stdout
    stage_job = next(ln for ln in out.splitlines() if ln.startswith("submitted 4 array task(s) of ingest"))
    stage_job = stage_job.split("job(s) ")[1].strip()
    job = writer_job(out)
    script = (run / "ingest" / "logs" / "slurm" / f"{job}_submission.sh").read_text()
    assert f"#SBATCH --array=0-{SHARDS // PER_GROUP - 1}%{WRITERS}" in script
    assert f"#SBATCH --dependency=afterany:{stage_job}" in script
    tasks = array_tasks(slurm_cluster, job, SHARDS // PER_GROUP)
    assert tasks == {f"{job}_{g}": "COMPLETED" for g in range(SHARDS // PER_GROUP)}, tasks
    assert array_tasks(slurm_cluster, stage_job, SHARDS) == {f"{stage_job}_{s}": "COMPLETED" for s in range(SHARDS)}

    layout = read_layout(f"file://{run / 'dataset'}")
    assert layout is not None and layout.num_groups == SHARDS // PER_GROUP
    expected = oracle_keys(run)
    assert len(expected) > SHARDS
    keys = view_keys(run)
    assert Counter(keys) == Counter(expected) and len(keys) == len(set(keys))
    for g in range(SHARDS // PER_GROUP):     # the stage's finish prelude ran first in each task
        result = task_result(run / "ingest" / "logs" / "slurm", f"{job}_{g}")
        assert result["group"] == g and result["probe_child_prestarted"], result
    status = run_cli("status", f"run_dir={run}").stdout
    line = next(ln for ln in status.splitlines() if ln.startswith("ingest dataset:"))
    assert f"{len(expected)} rows" in line and f"{SHARDS // PER_GROUP} of {SHARDS // PER_GROUP} groups" in line
    assert f"{SHARDS} of {SHARDS} shards" in line

    # wait=true with nothing left to join and every group up to date: nothing is submitted.
    out = run_cli(*INGEST, f"run_dir={run}", env=slurm_cluster.env).stdout
    assert "0 of 4 shard(s) to run" in out
    assert f"ingest finish step: all {SHARDS // PER_GROUP} group(s) up to date, nothing submitted" in out, out
    assert "group writer task(s)" not in out
    # shard 3 re-finalized (what retry_failed does; same rows, a new marker): only its group's writer runs again,
    # as an array of one task without dependency, and records the new marker (a commit of metadata only)
    store = ShardStore(run, "ingest", 3)
    write_json(store.dir / MARKER, {**read_json(store.dir / MARKER), "time": time.time() + 1})
    out = run_cli(*INGEST, f"run_dir={run}", env=slurm_cluster.env).stdout
    line = next(ln for ln in out.splitlines() if "group writer task(s)" in ln)
    assert line.startswith("submitted ingest finish step: 1 group writer task(s), job(s) "), out
    again = line.split("job(s) ")[1].strip()
    assert "--dependency" not in (run / "ingest" / "logs" / "slurm" / f"{again}_submission.sh").read_text()
    assert slurm_cluster.final_state(again) == "COMPLETED"
    result = task_result(run / "ingest" / "logs" / "slurm", again)      # (submitit: an array of one is one job)
    assert result["group"] == 1 and result["rows_written"] == 0 and result["commits"] == 1, result
    keys = view_keys(run)
    assert Counter(keys) == Counter(expected) and len(keys) == len(set(keys))
    out = run_cli(*INGEST, f"run_dir={run}", env=slurm_cluster.env).stdout
    assert "group(s) up to date, nothing submitted" in out, out


def test_status_reports_the_groups_written(tmp_path):
    """`python -m pipeline status` on a grouped dataset: groups written of the catalogue's, rows and shards summed
    over the groups, NOT DONE until every group is written and tagged (no Slurm: the writers run here)."""
    from benchmarks.ingest_bench import ingest_config
    from pipeline.engine import run_shard
    from pipeline.stages.ingest import write_dataset

    run = make_upstream(tmp_path / "run", n_videos=8, num_shards=SHARDS, seed=3, seconds=12.0)
    cfg = ingest_config(run, f"stage.shards_per_group={PER_GROUP}")
    for shard in range(SHARDS):
        run_shard(cfg, shard)
    quiet = {"log": lambda s: None}
    write_dataset(cfg, group=0, **quiet)
    first = sum(ShardStore(run, "ingest", s).read_table(TABLE).num_rows for s in range(PER_GROUP))

    def dataset_line() -> str:
        out = run_cli("status", f"run_dir={run}").stdout
        return next(ln for ln in out.splitlines() if ln.startswith("ingest dataset:"))

    line = dataset_line()
    assert line.startswith(f"ingest dataset: {first} rows in 1 of 2 groups, {PER_GROUP} of {SHARDS} shards, "
                           "1 of 2 groups tagged"), line
    assert "NOT DONE" in line
    write_dataset(cfg, group=1, **quiet)
    line = dataset_line()
    assert line == (f"ingest dataset: {len(oracle_keys(run))} rows in 2 of 2 groups, {SHARDS} of {SHARDS} shards, "
                    "2 of 2 groups tagged"), line


def test_verify_accepts_shards_without_videos(tmp_path):
    """A shard the manifest gave no video (3 videos hashed into 4 shards) is complete with no rows and listed in
    its group's dataset: `verify_run` checks it like any shard and finds nothing wrong, and still finds it when
    its ingest shard is not complete."""
    from benchmarks.ingest_bench import ingest_config
    from pipeline.engine import run_shard
    from pipeline.manifest import load_items
    from pipeline.stages.ingest import write_dataset
    from pipeline.verify import verify_run

    run = make_upstream(tmp_path / "run", n_videos=3, num_shards=SHARDS, seed=3, seconds=12.0)
    empty = sorted(set(range(SHARDS)) - {i.shard for i in load_items(run)})
    assert empty, "the hash put a video in every shard: no empty shard to check"
    cfg = ingest_config(run, f"stage.shards_per_group={PER_GROUP}")
    for shard in range(SHARDS):
        run_shard(cfg, shard)
    result = write_dataset(cfg, log=lambda s: None, writers=1)
    assert result["dataset_violations"] == [] and len(result["tag"]) == SHARDS // PER_GROUP
    ds = open_read_only(run)
    assert sorted(int(s) for s in ds.metadata["ingested_shards"]) == list(range(SHARDS))
    assert Counter(view_keys(run)) == Counter(oracle_keys(run))
    assert [str(v) for v in verify_run(run)] == []
    (ShardStore(run, "ingest", empty[0]).dir / "_SUCCESS").unlink()
    assert [str(v) for v in verify_run(run, check_dataset=False)] == [
        f"shard-{empty[0]:05d}: ingest shard not complete"]
