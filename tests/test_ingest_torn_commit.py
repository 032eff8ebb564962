"""A commit torn by a kill: Deep Lake 4.7 writes a commit's metadata (`_deeplake_log/_meta`) and its rows (the
branch's log) apart, and the kill soak once landed between the two, leaving a head that read fine with 0 rows
while its metadata listed both shards as ingested. The re-run then skipped them.

Here the tear is made by hand on a real dataset: the writer's first data commit is stopped right after it lands
(so the last good version saved stays the empty one), then the rows' log entry of that commit is removed. The
oracle: every key of the shards' rows tables (read here with pyarrow) in the dataset exactly once after a re-run.
`verify` reports such a head (rows missing) rather than rolling it back: a test in test_ingest_writers.py appends
rows with a foreign handle and expects them reported.
"""
from __future__ import annotations

import deeplake
import pyarrow.parquet as pq
import pytest
from test_ingest import SHARDS, run, upstream_template  # noqa: F401  (fixtures)

from benchmarks.ingest_bench import ingest_config, run_ingest_shards
from pipeline import dataset_health as health
from pipeline.schema import TABLE
from pipeline.shards import ShardStore
from pipeline.stages.ingest import dataset_url, write_dataset

QUIET = {"log": lambda s: None}


class Stop(Exception):
    pass


def _source_keys(run) -> list[tuple[str, int]]:
    """(video_id, segment_idx) of every row of the shards' rows tables."""
    want = []
    for s in range(SHARDS):
        t = pq.read_table(ShardStore(run, "ingest", s).table_path(TABLE), columns=["video_id", "segment_idx"])
        want += list(zip(t.column("video_id").to_pylist(), t.column("segment_idx").to_pylist()))
    return want


def test_a_commit_torn_between_its_metadata_and_its_rows_is_rolled_back_and_rewritten(run):
    cfg = ingest_config(run, f"stage.shards_per_commit={SHARDS}")
    run_ingest_shards(cfg)
    url = dataset_url(cfg.stage, run)
    path = health.local_dir(url)

    def stop(shards):
        raise Stop(shards)

    with pytest.raises(health.DatasetWriteError, match="reads fine"):
        write_dataset(cfg, after_commit=stop, **QUIET)
    assert health.saved_state(path)["rows"] == 0       # the last good version: the empty dataset
    _tear(path)             # the rows' half of the commit never landed
    torn = deeplake.open_read_only(url)
    assert len(torn) == 0 and sorted(int(s) for s in torn.metadata["ingested_shards"]) == list(range(SHARDS))
    seen = health.probe(url)        # it reads fine: only the records show it
    assert seen.ok and health.torn_commit(seen.info) is not None and health.torn_commit(health.head_info(torn))

    res = write_dataset(cfg, **QUIET)
    assert res["tag"] and res["dataset_violations"] == [], res
    want = _source_keys(run)
    ds = deeplake.open_read_only(url)
    n = len(ds)
    got = list(zip((str(v) for v in ds["video_id"][0:n]), (int(i) for i in ds["segment_idx"][0:n])))
    assert sorted(got) == sorted(want) and len(set(got)) == len(got) == len(want)
    assert health.torn_commit(health.head_info(ds)) is None
    assert sorted(p.name for p in (path.parent / (path.name + ".lastgood")).iterdir() if "unreadable" in p.name)


def _tear(path) -> None:
    """Remove the newest entry of the rows' log (the branch's), keeping the metadata's."""
    branch = [d for d in (path / health.LOG_DIR).iterdir() if d.is_dir() and d.name != "_meta"]
    assert len(branch) == 1
    sorted(p for p in branch[0].iterdir() if p.name[:1].isdigit())[-1].unlink()


def test_a_commit_the_writer_finds_torn_after_it_is_rolled_back_at_once(run):
    """The same tear, made right after the writer's own commit (as a disk filling between the two logs would):
    the writer's check of the new head sees it, rolls back to the last good version and stops with the error;
    the re-run writes every row once."""
    cfg = ingest_config(run, f"stage.shards_per_commit={SHARDS}")
    run_ingest_shards(cfg)
    url = dataset_url(cfg.stage, run)
    path = health.local_dir(url)
    with pytest.raises(health.DatasetWriteError, match="torn commit.*rolled back"):
        write_dataset(cfg, after_commit=lambda shards: _tear(path), **QUIET)
    ds = deeplake.open_read_only(url)
    assert len(ds) == 0 and health.torn_commit(health.head_info(ds)) is None
    res = write_dataset(cfg, **QUIET)
    assert res["tag"] and res["dataset_violations"] == [] and res["rows"] == len(_source_keys(run)), res
