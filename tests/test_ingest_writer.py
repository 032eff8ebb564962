"""The Deep Lake writer of ingest: re-done shards replace their rows, empty shards, one writer at a time, the tag.

Upstream outputs are built in the engine's own shard layout (`benchmarks.ingest_bench.make_upstream`); the
engine, the verifier and Deep Lake are the real ones.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import deeplake
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import REPO

from benchmarks.ingest_bench import ingest_config, run_ingest_shards
from pipeline.atomic import write_parquet
from pipeline.engine import run_shard
from pipeline.schema import TABLE
from pipeline.shards import LEDGER, LEDGER_SCHEMA, ShardStore, concat_tables
from pipeline.stages.ingest import dataset_url, write_dataset
from pipeline.verify import verify_run
from test_ingest import SHARDS, run, upstream_template  # noqa: F401  (shared fixtures)

QUIET = {"log": lambda s: None}


def shard_keys(run: Path) -> list[tuple[str, int]]:
    t = concat_tables(ShardStore(run, "ingest", s).read_table(TABLE) for s in range(SHARDS))
    return [(r["video_id"], r["segment_idx"]) for r in t.select(["video_id", "segment_idx"]).to_pylist()]


def dataset_keys(url: str) -> list[tuple[str, int]]:
    ds = deeplake.open_read_only(url)
    n = len(ds)
    return list(zip(ds["video_id"][0:n], [int(x) for x in ds["segment_idx"][0:n]])) if n else []


def assert_dataset_is_shards(run: Path, url: str) -> None:
    keys = dataset_keys(url)
    assert len(keys) == len(set(keys)), "duplicate rows in the dataset"
    assert sorted(keys) == sorted(shard_keys(run))


def test_redone_shard_replaces_its_rows_in_one_commit(run):
    """A shard re-finalized with more rows (retry_failed after upstream was repaired) is re-ingested."""
    cfg = ingest_config(run, "stage.shards_per_commit=1")
    # clip loses one row of a video: ingest refuses that video, its shard is ingested without it
    store = ShardStore(run, "clip", 1)
    clip = store.read_table("clip")
    vid = clip.column("video_id")[0].as_py()
    write_parquet(store.table_path("clip"), clip.slice(1))
    run_ingest_shards(cfg)
    first = write_dataset(cfg, **QUIET)
    url = first["dataset"]
    assert first["shards_written"] == [0, 1, 2] and first["tag"]
    assert vid not in {k[0] for k in dataset_keys(url)}
    # upstream repaired, the failed video re-done the way the engine does it: its shard gains rows
    write_parquet(store.table_path("clip"), clip)
    retry = ingest_config(run, "stage.shards_per_commit=1", "retry_failed=true")
    run_shard(retry, 1)
    added = [k for k in shard_keys(run) if k[0] == vid]
    assert added
    second = write_dataset(cfg, **QUIET)
    assert second["shards_written"] == [1] and second["shards_replaced"] == [1] and second["commits"] == 1
    assert second["rows_deleted"] == first["rows"] - sum(
        ShardStore(run, "ingest", s).read_table(TABLE).num_rows for s in (0, 2))
    assert_dataset_is_shards(run, url)
    assert set(added) <= set(dataset_keys(url))
    assert second["tag"] and second["tag"] != first["tag"]         # the new content is tagged too
    ds = deeplake.open_read_only(url)
    assert [h.message for h in ds.history][-1] == "ingest shards [1]"
    assert verify_run(run) == []
    # nothing changed since: no read of the rows, nothing written, no commit
    third = write_dataset(cfg, **QUIET)
    assert (third["shards_written"], third["commits"], third["tag"]) == ([], 0, None)


def test_refinalized_shard_with_same_rows_is_not_rewritten(run):
    """retry_failed re-finalizes a shard whose failed video fails again: the marker is new, the rows are not."""
    cfg = ingest_config(run)
    store = ShardStore(run, "clip", 1)
    clip = store.read_table("clip")
    write_parquet(store.table_path("clip"), clip.slice(1))
    run_ingest_shards(cfg)
    first = write_dataset(cfg, **QUIET)
    run_shard(ingest_config(run, "retry_failed=true"), 1)
    again = write_dataset(cfg, **QUIET)
    assert again["shards_written"] == [] and again["rows_deleted"] == 0 and again["rows"] == first["rows"]
    assert_dataset_is_shards(run, first["dataset"])
    # the new marker is recorded: the next run has nothing to check
    assert write_dataset(cfg, **QUIET)["commits"] == 0


def test_crash_during_replace_leaves_the_old_rows(run):
    cfg = ingest_config(run, "stage.shards_per_commit=1")
    run_ingest_shards(cfg)
    url = write_dataset(cfg, **QUIET)["dataset"]
    before = sorted(dataset_keys(url))
    # re-finalize shard 0 as a retry that failed one video would (its rows gone, the ledger says why), then die
    # after deleting/appending, before the commit
    s0 = ShardStore(run, "ingest", 0)
    rows = s0.read_table(TABLE)
    vid = rows.column("video_id")[0].as_py()
    ledger = [{**r, "status": "failed", "reason": "misaligned: test"} if r["video_id"] == vid else r
              for r in s0.read_ledger()]
    kept = rows.filter(pc.not_equal(rows.column("video_id"), vid))
    assert 0 < kept.num_rows < rows.num_rows
    s0.finalize(ledger, {TABLE: kept}, {}, s0.marker())
    script = KILL_AFTER_APPEND.format(repo=str(REPO), run=str(run), shard=0)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert sorted(dataset_keys(url)) == before                     # the old rows, not both, not neither
    result = write_dataset(cfg, **QUIET)
    assert result["shards_replaced"] == [0]
    assert_dataset_is_shards(run, url)


def test_empty_shard_is_listed_and_verifies(run):
    """Every video of shard 2 failed upstream: ingest shard 2 has no rows, the dataset lists it, all clean."""
    store = ShardStore(run, "download", 2)
    failed = [{**r, "status": "failed", "reason": "download: 404"} for r in store.read_ledger()]
    assert failed
    write_parquet(store.table_path(LEDGER), pa.Table.from_pylist(failed, schema=LEDGER_SCHEMA))
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    assert ShardStore(run, "ingest", 2).read_table(TABLE).num_rows == 0
    result = write_dataset(cfg, **QUIET)
    ds = deeplake.open_read_only(result["dataset"])
    assert sorted(int(s) for s in ds.metadata["ingested_shards"]) == [0, 1, 2] and result["tag"]
    assert 2 not in {int(s) for s in ds["shard"][0:len(ds)]}
    assert verify_run(run) == []


KILL_AFTER_APPEND = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    from benchmarks.ingest_bench import ingest_config
    from pipeline.stages.ingest import write_dataset
    cfg = ingest_config({run!r}, "stage.shards_per_commit=1")
    def die(shard):
        if shard == {shard}:
            os.kill(os.getpid(), 9)
    write_dataset(cfg, log=lambda s: None, after_append=die)
""")

KILL_BEFORE_TAG = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    from benchmarks.ingest_bench import ingest_config
    from pipeline.stages.ingest import write_dataset
    cfg = ingest_config({run!r}, "stage.shards_per_commit=1")
    def log(line):
        if line.startswith("ingest: committed shards [2]"):   # the last commit is done, the tag is next
            os.kill(os.getpid(), 9)
    write_dataset(cfg, log=log)
""")


def test_tag_is_made_by_a_rerun_after_a_crash_before_it(run):
    cfg = ingest_config(run, "stage.shards_per_commit=1")
    run_ingest_shards(cfg)
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_TAG.format(repo=str(REPO), run=str(run))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    url = dataset_url(cfg.stage, run)
    ds = deeplake.open_read_only(url)
    assert sorted(int(s) for s in ds.metadata["ingested_shards"]) == [0, 1, 2]
    assert list(ds.tags.names()) == []
    result = write_dataset(cfg, **QUIET)
    assert result["shards_written"] == [] and result["tag"]
    ds = deeplake.open_read_only(url)
    assert list(ds.tags.names()) == [result["tag"]] and ds.tags[result["tag"]].version == ds.version
    assert write_dataset(cfg, **QUIET)["tag"] is None                # tagged already: no second tag


WRITER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {repo!r})
    from benchmarks.ingest_bench import ingest_config
    from pipeline.stages.ingest import write_dataset
    cfg = ingest_config({run!r}, "stage.shards_per_commit=1")
    open({ready!r}, "w").close()
    while not os.path.exists({go!r}):
        time.sleep(0.01)
    # slow appends keep the first writer busy while the second one starts
    result = write_dataset(cfg, log=lambda s: None, after_append=lambda shard: time.sleep(0.3))
    print(json.dumps({{"shards_written": result["shards_written"], "rows": result["rows"]}}))
""")


def test_two_concurrent_writers_write_each_row_once(run, tmp_path):
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    go = tmp_path / "go"
    procs = []
    for n in range(2):
        ready = tmp_path / f"ready{n}"
        script = WRITER.format(repo=str(REPO), run=str(run), ready=str(ready), go=str(go))
        procs.append((ready, subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)))
    deadline = time.time() + 120
    while not all(ready.exists() for ready, _ in procs) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    results = []
    for _, proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["shards_written"] for r in results) == [[], [0, 1, 2]], results
    assert_dataset_is_shards(run, dataset_url(cfg.stage, run))


def test_warm_prober_sees_each_new_head_and_survives_a_reader_crash(tmp_path):
    """The warm probe child reads every new version (not a stale one) and a child killed mid-read (what a native
    crash on an unreadable head does) is reported as such, the next probe starting a new child."""
    import os
    import signal

    from pipeline import dataset_health as health

    url = f"file://{tmp_path / 'ds'}"
    ds = deeplake.create(url)
    ds.add_column("x", deeplake.types.Int64())
    ds.commit("empty")
    with health.warm_probes():
        prober = health._warm
        for n in (3, 7):
            ds.append({"x": list(range(n))})
            ds.commit(f"+{n}")
            got = health.probe(url)
            assert got.ok and got.info["rows"] == len(ds) and got.info["version"] == ds.version, got
        child = prober.proc.pid
        os.kill(child, signal.SIGSEGV)
        dead = health.probe(url)
        assert not dead.ok and "kills the reader (SIGSEGV)" in dead.problem, dead
        again = health.probe(url)
        assert again.ok and again.info["rows"] == 10 and prober.proc.pid != child
        missing = health.probe(f"file://{tmp_path / 'nothing'}")
        assert not missing.ok and missing.problem.startswith("reading it fails:"), missing
        assert health.probe(url).ok          # an error reply leaves the child serving
    assert health._warm is None and prober.proc is None


def test_prestarted_prober_is_the_one_the_write_uses(tmp_path, monkeypatch):
    """`prestart_probes` (a writer's entry point, before its imports) starts the child that the next
    `warm_probes` block uses: it imported the preloaded module before its first reply, a dead spare is replaced at
    the first request, and a spare never used ends when its parent's end of the pipe closes."""
    import os
    import signal

    from pipeline import dataset_health as health
    from pipeline.dataset import ROW_CHECK_MODULE
    from pipeline.verify.dataset import NEW_ROWS_CHECK

    assert NEW_ROWS_CHECK.partition(":")[0] == ROW_CHECK_MODULE     # what `python -m pipeline.dataset` preloads
    (tmp_path / "mods").mkdir()
    stamp = tmp_path / "imported"
    (tmp_path / "mods" / "preload_stamp.py").write_text(f"open({str(stamp)!r}, 'w').write(str(__import__('os')"
                                                        ".getpid()))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "mods"))
    url = f"file://{tmp_path / 'ds'}"
    ds = deeplake.create(url)
    ds.add_column("x", deeplake.types.Int64())
    ds.append({"x": [1, 2, 3]})
    ds.commit("three")

    health.prestart_probes(preload=("preload_stamp", "no_such_module_here"))
    spare = health._spare
    with health.warm_probes():
        assert health._warm is spare and health._spare is None
        got = health.probe(url)
        assert got.ok and got.info["rows"] == 3, got
        assert stamp.read_text() == str(spare.proc.pid)      # imported by this very child, before "ready"
    assert spare.proc is None and health._warm is None

    health.prestart_probes()
    spare = health._spare
    os.kill(spare.proc.pid, signal.SIGKILL)
    spare.proc.wait()
    with health.warm_probes():
        got = health.probe(url)
        assert got.ok and got.info["rows"] == 3 and health._warm is spare, got

    health.prestart_probes()
    spare, health._spare = health._spare, None
    spare.proc.stdin.close()                     # what the parent's exit does to an unused spare
    assert spare.proc.wait(timeout=60) == 0
    spare.close()


def test_deeplake_columns_equal_the_row_wise_conversion(run):
    """The column-wise conversion (numpy views of the Arrow buffers) gives, cell for cell, what converting each
    row's Python values gives (the oracle: pyarrow's own to_pylist), null and empty cells and slices included."""
    import math

    import numpy as np

    from pipeline.schema import ROW_SCHEMA, clip_matrix, to_deeplake_columns

    run_ingest_shards(ingest_config(run))
    rows = concat_tables(ShardStore(run, "ingest", s).read_table(TABLE) for s in range(SHARDS)).to_pylist()
    rows[0].update(audio=None, clip=None, frame_idx=[])
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    for part in (table, table.slice(3, 7)):
        cols = to_deeplake_columns(part)
        for i, row in enumerate(part.to_pylist()):
            assert np.array_equal(cols["audio"][i], np.asarray(row["audio"] or [], np.float16))
            assert cols["audio"][i].dtype == np.float16
            assert np.array_equal(cols["clip"][i], clip_matrix(row["clip"])) and cols["clip"][i].dtype == np.float16
            assert cols["clip"][i].shape == clip_matrix(row["clip"]).shape
            for name, dtype in (("frame_idx", np.int64), ("frame_pts", np.float64), ("clip_frame_idx", np.int64)):
                assert cols[name][i].dtype == dtype and list(cols[name][i]) == list(row[name] or [])
            assert cols["frames"][i] == list(row["frames"] or []) and cols["video_id"][i] == row["video_id"]
            assert (math.isnan(cols["audio_start"][i]) if row["audio_start"] is None
                    else cols["audio_start"][i] == row["audio_start"])


def test_probe_that_read_everything_is_not_undone_by_a_crash_at_exit(monkeypatch):
    """Deep Lake 4.7's native teardown has been seen to abort or segfault at process exit after all work was
    done. A probe child that printed its verdict ("ok": every read done) and then died at exit must not read as an
    unreadable head (that would roll a good head back); one that died before "ok" still is one."""
    from pipeline import dataset_health as health

    def fake_run(stdout: str, code: int):
        return lambda args, **kw: subprocess.CompletedProcess(args, code, stdout=stdout, stderr="free(): double free")

    monkeypatch.setattr(health.subprocess, "run", fake_run('{"rows": 3, "version": "v"}\nok\n', -6))
    got = health.probe("file:///nowhere")
    assert got.ok and got.info["rows"] == 3, got
    monkeypatch.setattr(health.subprocess, "run", fake_run('{"rows": 3, "version": "v"}\n', -11))
    got = health.probe("file:///nowhere")
    assert not got.ok and got.problem == "reading it kills the reader (SIGSEGV)", got
