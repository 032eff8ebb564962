"""How the writer reads the shards' rows tables: bounded memory (`stage.max_rows_in_memory`), the next shard read
ahead in a thread only within that bound, and one inode per shard whatever a finalize renames meanwhile.

Oracles: the shards' rows.parquet files read here with pyarrow and hashlib (every key and every audio vector of
the dataset against them, exactly once), and files swapped here under an open reader.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import deeplake
import numpy as np
import pyarrow.parquet as pq
from test_ingest import SHARDS, run, upstream_template  # noqa: F401  (fixtures)

from benchmarks.ingest_bench import ingest_config, run_ingest_shards
from pipeline.dataset.writer import ShardReader, ShardRows
from pipeline.schema import TABLE
from pipeline.shards import ShardStore
from pipeline.stages.ingest import write_dataset

QUIET = {"log": lambda s: None}


def _source_rows(run) -> dict[tuple[str, int], np.ndarray | None]:
    """(video_id, segment_idx) -> the row's audio vector, from every shard's rows.parquet."""
    out: dict[tuple[str, int], np.ndarray | None] = {}
    for s in range(SHARDS):
        t = pq.read_table(ShardStore(run, "ingest", s).table_path(TABLE), columns=["video_id", "segment_idx", "audio"])
        for vid, seg, audio in zip(*(t.column(c).to_pylist() for c in ("video_id", "segment_idx", "audio"))):
            assert (vid, seg) not in out
            out[(vid, seg)] = None if audio is None else np.asarray(audio, np.float16)
    return out


def test_a_writer_reading_a_few_rows_at_a_time_writes_every_row_once(run):
    cfg = ingest_config(run, "stage.max_rows_in_memory=7", "stage.append_batch_rows=5")
    run_ingest_shards(cfg)
    biggest = max(ShardRows(ShardStore(run, "ingest", s), 1).num_rows for s in range(SHARDS))
    assert biggest > 7          # so the shards are read in batches, not whole
    res = write_dataset(cfg, **QUIET)
    assert res["tag"] and res["dataset_violations"] == [], res
    want = _source_rows(run)
    ds = deeplake.open_read_only(res["dataset"])
    n = len(ds)
    keys = list(zip((str(v) for v in ds["video_id"][0:n]), (int(i) for i in ds["segment_idx"][0:n])))
    assert sorted(keys) == sorted(want) and len(set(keys)) == n
    audio = ds["audio"][0:n]
    for k, key in enumerate(keys):
        if want[key] is None or not len(want[key]):
            assert not len(audio[k])
        else:
            np.testing.assert_array_equal(np.asarray(audio[k], np.float16), want[key])


def test_the_read_ahead_decodes_the_next_shard_only_when_both_fit(run):
    run_ingest_shards(ingest_config(run))
    sizes = [ShardRows(ShardStore(run, "ingest", s), 1).num_rows for s in range(SHARDS)]
    assert min(sizes[:2]) > 0
    for max_rows, decoded in ((sizes[0] + sizes[1], True), (sizes[0] + sizes[1] - 1, False)):
        reader = ShardReader(run, [0, 1], max_rows)
        try:
            first = reader.open(0)
            second = reader.ahead[1].result()       # read ahead in the thread while shard 0 is in use
            assert (second.whole is not None) == decoded, (max_rows, sizes)
            path = ShardStore(run, "ingest", 1).table_path(TABLE)
            assert second.digest == hashlib.sha256(path.read_bytes()).hexdigest()
            assert reader.open(1) is second and not reader.ahead
            want = pq.read_table(path)
            got = next(second.batches())
            assert got.num_rows == want.num_rows
            assert got.column("video_id").equals(want.column("video_id"))
            assert got.column("audio").equals(want.column("audio").cast(got.schema.field("audio").type))
            first.close()
            second.close()
        finally:
            reader.close()


def test_a_shard_renamed_over_while_open_is_read_as_it_was(run):
    """A finalize replaces rows.parquet by rename while the writer holds the old one: the writer reads, and
    hashes, the file it opened."""
    run_ingest_shards(ingest_config(run))
    path = ShardStore(run, "ingest", 0).table_path(TABLE)
    before_bytes = path.read_bytes()
    before = pq.read_table(path)
    rows = ShardRows(ShardStore(run, "ingest", 0), 1 << 30)
    other = ShardStore(run, "ingest", 1).table_path(TABLE)
    tmp = path.with_name("rows.parquet.new")
    shutil.copyfile(other, tmp)
    os.replace(tmp, path)           # what a re-finalize does
    assert path.read_bytes() != before_bytes
    assert rows.digest == hashlib.sha256(before_bytes).hexdigest()
    got = next(rows.batches())
    assert got.column("video_id").equals(before.column("video_id"))
    assert got.column("segment_idx").equals(before.column("segment_idx"))
    rows.close()
