"""The run-level check of an ingest shard runs once, at its finalize; the Deep Lake writer uses the kept verdict
only for the very bytes, ledger, upstream and settings it judged, and checks the shard itself otherwise.

Oracles: a corruption of one row made here (the check must name it), and verdicts forged here (a clean verdict
bound to other bytes must be ignored; a refusing verdict bound to these bytes must be obeyed).
"""
from __future__ import annotations

import json

from test_ingest import SHARDS, run, upstream_template  # noqa: F401  (fixtures)
from test_verify import a_row, drop_last_frame, edit_row

from benchmarks.ingest_bench import ingest_config, run_ingest_shards
from pipeline.join import JoinParams
from pipeline.manifest import load_items
from pipeline.schema import TABLE
from pipeline.shards import MARKER, ShardStore
from pipeline.stages.ingest import write_dataset
from pipeline.verify.checks import Tolerances
from pipeline.verify.shard import VERDICT, rows_digest, trusted_verdict

QUIET = {"log": lambda s: None}


def videos(run, shard: int) -> list[str]:
    return [i.video_id for i in load_items(run) if i.shard == shard]


def verdict_of(run, shard: int, cfg) -> list[str] | None:
    store = ShardStore(run, "ingest", shard)
    return trusted_verdict(run, shard, videos(run, shard), Tolerances.from_config(cfg.stage),
                           JoinParams.from_config(cfg.stage), rows_digest(store.table_path(TABLE)))


def test_the_writer_uses_the_verdict_kept_at_finalize(run):
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    for shard in range(SHARDS):
        assert (ShardStore(run, "ingest", shard).dir / VERDICT).exists()
        assert verdict_of(run, shard, cfg) == []            # clean, and bound to what is there now
    result = write_dataset(cfg, **QUIET)
    assert result["verdicts_used"] == SHARDS and result["tag"], result
    assert result["shards_written"] == list(range(SHARDS)) and result["dataset_violations"] == []


def test_a_verdict_binds_rows_ledger_upstream_and_settings(run):
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    assert verdict_of(run, 0, cfg) == []
    # other check settings: not this verdict's
    looser = ingest_config(run, "stage.span_tolerance_s=0.5")
    assert verdict_of(run, 0, looser) is None
    # an upstream shard re-finalized (its marker rewritten): not this verdict's
    marker = ShardStore(run, "clip", 0).dir / MARKER
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "time": info.get("time", 0) + 1}))
    assert verdict_of(run, 0, cfg) is None
    # the ingest shard's own marker rewritten (a new ledger with the same rows): not this verdict's
    own = ShardStore(run, "ingest", 1).dir / MARKER
    info = json.loads(own.read_text())
    own.write_text(json.dumps({**info, "time": info.get("time", 0) + 1}))
    assert verdict_of(run, 1, cfg) is None
    assert verdict_of(run, 2, cfg) == []


def test_a_stale_clean_verdict_does_not_let_a_bad_shard_in(run):
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    row = a_row(run, 1)
    key = (row["video_id"], row["segment_idx"])
    edit_row(run, 1, key, drop_last_frame)             # new bytes; the kept verdict judged the old ones clean
    result = write_dataset(cfg, **QUIET)
    assert list(result["shards_refused"]) == [1] and result["verdicts_used"] == SHARDS - 1, result
    assert any(f"{key[0]} {key[1]}: frames missing" in v for v in result["shards_refused"][1]), result


def test_a_refusing_verdict_for_these_bytes_keeps_the_shard_out(run):
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    path = ShardStore(run, "ingest", 2).dir / VERDICT
    verdict = json.loads(path.read_text())
    path.write_text(json.dumps({**verdict, "blocking": ["vidX 0: a violation the check found"]}))
    result = write_dataset(cfg, **QUIET)
    assert list(result["shards_refused"]) == [2] and result["tag"] is None, result
    assert result["shards_refused"][2] == ["vidX 0: a violation the check found"]
