"""The Slurm group-writers benchmark (benchmarks/ingest_slurm_writers.py) on a tiny run, on the real local Slurm:
both cases (1 writer at once, 2 at once) write every group through the finish step's array, and the rows read
back from each group's dataset are the ingest shards' rows.

Oracle: the ingest shards' rows tables (what the join produced), read here with pyarrow, not by the writer.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks.ingest_bench import ingest_config, make_upstream
from benchmarks.ingest_slurm_writers import measure_slurm_writers
from pipeline.engine import run_shard
from pipeline.schema import TABLE
from pipeline.shards import ShardStore

pytestmark = pytest.mark.slurm

SHARDS, PER_GROUP = 4, 2


def oracle_rows(run: Path, shard: int) -> int:
    store = ShardStore(run, "ingest", shard)
    assert store.is_complete()
    path = store.table_path(TABLE)      # absent: a shard the manifest gave no video
    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def test_slurm_writers_cases_write_every_row(tmp_path, slurm_cluster):
    run = make_upstream(tmp_path / "run", n_videos=8, num_shards=SHARDS, seed=5, seconds=12.0)
    overrides = ("stage.shards_per_commit=2",)
    cfg = ingest_config(run, *overrides)
    for shard in range(SHARDS):         # the join of every shard (one of them holds no video with this seed)
        run_shard(cfg, shard)
    per_group = {g: sum(oracle_rows(run, s) for s in range(g * PER_GROUP, (g + 1) * PER_GROUP))
                 for g in range(SHARDS // PER_GROUP)}
    total = sum(per_group.values())
    assert total > SHARDS

    res = measure_slurm_writers(run, overrides, PER_GROUP, writers_cases=(1, 2), repeat=1)
    assert res["rows_expected"] == total
    assert sorted(res["cases"]) == [1, 2]
    for n, case in res["cases"].items():
        assert case["rows_per_group"] == per_group, n
        assert case["rows_counted"] == case["rows"] == total, n
        assert case["throttle"] == n
        assert case["span_s"] > 0 and case["wall_s"] >= case["span_s"], n
    assert res["cases"][1]["most_at_once"] == 1       # the %1 throttle ran the writers one after the other
    assert not list(run.glob("dataset-slurm-*"))      # each case's dataset removed once checked
