"""Engine under process death: an item that kills its worker, parts torn by a kill, a re-finalize killed midway,
a local pool that loses a worker. The test stage `crashy` lives here; subprocesses and pool workers import it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from pipeline import stages
from pipeline.config import validate
from pipeline.engine import container, run_shard
from pipeline.manifest import pin_geometry, plan_geometry, shard_of
from pipeline.shards import STAGING, ShardStore
from pipeline.stages.base import ItemResult, Stage, StageConfig
from pipeline.task import run_task

TESTS = Path(__file__).resolve().parent


@dataclass
class CrashyConfig(StageConfig):
    crash_on: str = ""      # this video kills the worker process (SIGKILL: no Python cleanup runs)
    fail_once: str = ""     # this video fails on its first attempt (a recorded failure, for retry_failed)
    raise_on: str = ""      # this video raises out of process(): a shard error, the process lives on
    batch: int = 1          # items taken before any result is returned (a stage with several in flight)
    max_item_crashes: int = 2
    hold_on: str = ""       # this video waits until the file `gate` exists (writes `<gate>.reached` first)
    gate: str = ""


class CrashyStage(Stage):
    name = "crashy"
    Config = CrashyConfig
    tables = {"rows": ("video_id",)}

    def process(self, items):
        batch = []
        for w in items:
            batch.append(w)
            if len(batch) >= self.cfg.batch:
                yield from self._run(batch)
                batch = []
        yield from self._run(batch)

    def _run(self, batch):
        for w in batch:
            if w.video_id == self.cfg.hold_on:
                Path(self.cfg.gate + ".reached").write_text(str(os.getpid()))
                while not Path(self.cfg.gate).exists():
                    time.sleep(0.02)
            if w.video_id == self.cfg.crash_on:
                os.kill(os.getpid(), signal.SIGKILL)
            if w.video_id == self.cfg.raise_on:
                raise RuntimeError("shard-level error")
        for w in batch:
            if w.video_id == self.cfg.fail_once and w.attempts == 0:
                yield ItemResult.failed(w.video_id, "flaky: first attempt")
            else:
                yield ItemResult(w.video_id, rows={"rows": [{"video_id": w.video_id, "attempts_before": w.attempts}]})


STAGE = CrashyStage


def _task(plain: dict, shard: int) -> dict:
    """A launcher task in a fresh worker process: registers the test stage there first."""
    stages.STAGES["crashy"] = __name__
    return run_task(plain, shard)


@pytest.fixture(autouse=True)
def crashy_registered(monkeypatch):
    monkeypatch.setitem(stages.STAGES, "crashy", __name__)


def _run_dir(tmp_path: Path, n: int, num_shards: int = 1) -> Path:
    m = tmp_path / "m.txt"
    m.write_text("".join(f"v{i} /x/v{i}.mp4\n" for i in range(n)))
    run = tmp_path / "run"
    geo, items, _ = plan_geometry(run, str(m), num_shards, 64)
    pin_geometry(run, geo, items)
    return run


def _cfg(run: Path, retry_failed: bool = False, workers: int = 1, **stage):
    return validate(OmegaConf.create({
        "stage": {"name": "crashy", **stage}, "launcher": {"name": "local", "workers": workers}, "cluster": {},
        "run_dir": str(run), "cache_dir": str(run / "cache"), "device": "cpu", "retry_failed": retry_failed}))


def _run_in_subprocess(cfg) -> int:
    script = (f"import sys, json; sys.path.insert(0, {str(TESTS)!r})\n"
              "import test_engine_crash as t\n"
              "t._task(json.loads(sys.argv[1]), 0)\n")
    return subprocess.run([sys.executable, "-c", script, json.dumps(container(cfg))], cwd=TESTS.parent,
                          capture_output=True, timeout=120).returncode


@pytest.mark.parametrize("batch,expected_rcs", [
    (1, [-9, -9, 0]),       # one item in flight: each death counts against it
    (3, [-9, -9, -9, 0]),   # three in flight: the first death makes suspects; alone, only v2 dies again
])
def test_item_that_kills_its_worker_is_recorded_crashed(tmp_path, batch, expected_rcs):
    run = _run_dir(tmp_path, 6)
    cfg = _cfg(run, crash_on="v2", batch=batch, flush_every=1 if batch == 1 else 16)
    store = ShardStore(run, "crashy", 0)
    rcs = []
    while len(rcs) < len(expected_rcs) + 2 and (not rcs or rcs[-1] != 0):
        assert not store.is_complete()
        rcs.append(_run_in_subprocess(cfg))
    assert rcs == expected_rcs
    assert store.is_complete()
    ledger = {r["video_id"]: r for r in store.read_ledger()}
    assert sorted(ledger) == [f"v{i}" for i in range(6)] and len(store.read_ledger()) == 6
    assert ledger["v2"]["status"] == "failed" and ledger["v2"]["reason"].startswith("crashed: ")
    assert all(r["status"] == "ok" and r["attempts"] == 1 for v, r in ledger.items() if v != "v2")
    rows = store.read_table("rows").column("video_id").to_pylist()
    assert rows == ["v0", "v1", "v3", "v4", "v5"]
    assert not store.parts_dir.exists()


def test_shard_error_does_not_count_as_a_crash(tmp_path):
    """A Python error ends the attempt with the process alive: the items in flight are not suspects."""
    run = _run_dir(tmp_path, 4)
    store = ShardStore(run, "crashy", 0)
    with pytest.raises(RuntimeError, match="shard-level"):
        run_shard(_cfg(run, raise_on="v1", batch=4, max_item_crashes=1), 0)
    assert store.in_flight().crashes == {}
    run_shard(_cfg(run, batch=4, max_item_crashes=1), 0)
    assert [r["status"] for r in store.read_ledger()] == ["ok"] * 4


def test_orphan_part_tables_are_not_adopted(tmp_path):
    """A kill between a part's tables and its ledger leaves tables; the next part must not take them over."""
    store = ShardStore(tmp_path, "toy", 0)
    def row(v):
        return {"video_id": v, "status": "ok", "reason": "", "attempts": 1, "seconds": 0.0, "note": ""}

    store.write_part([row("a")], {"t": pa.table({"video_id": ["a"]})})
    pq.write_table(pa.table({"video_id": ["stale"]}), store.parts_dir / "part-000002.t.parquet")  # torn part 2
    store.write_part([row("b")], {})  # no rows for t
    ledger, tables = store.read_parts()
    assert sorted(r["video_id"] for r in ledger) == ["a", "b"]
    assert [t.column("video_id").to_pylist() for t in tables["t"]] == [["a"]]


def test_refinalize_replaces_outputs_whole(tmp_path):
    store = ShardStore(tmp_path, "toy", 0)
    store.finalize([], {"t": pa.table({"x": [1]}), "u": pa.table({"x": [2]})}, {}, {"stage": "toy"})
    # a staging torn by a kill (no staged marker) is dropped: the shard keeps its outputs
    (store.dir / STAGING).mkdir()
    pq.write_table(pa.table({"x": [9]}), store.dir / STAGING / "t.parquet")
    assert store.resume_finalize() is False and not (store.dir / STAGING).exists()
    assert store.is_complete() and store.read_table("t").column("x").to_pylist() == [1]
    store.finalize([], {"t": pa.table({"x": [3]})}, {}, {"stage": "toy"})
    assert store.read_table("t").column("x").to_pylist() == [3]
    assert store.read_table("u") is None and store.marker()["tables"] == ["t"]  # no table left from before


def test_refinalize_killed_midway_then_rerun_completes(tmp_path, monkeypatch):
    """retry_failed re-finalizes a complete shard: a kill while the new outputs replace the old must leave no
    marker (never a marker beside mixed outputs), and the next run finishes the install without redoing work."""
    run = _run_dir(tmp_path, 4)
    store = ShardStore(run, "crashy", 0)
    run_shard(_cfg(run, fail_once="v1"), 0)
    assert [r["status"] for r in store.read_ledger()] == ["ok", "failed", "ok", "ok"]

    real_replace, installed = os.replace, []

    def dies_after_one_install(src, dst):
        if Path(src).parent.name == STAGING and Path(dst).parent == store.dir:
            if installed:
                raise OSError("killed")
            installed.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_one_install)
    with pytest.raises(OSError, match="killed"):
        run_shard(_cfg(run, fail_once="v1", retry_failed=True), 0)
    monkeypatch.setattr(os, "replace", real_replace)
    assert installed and not store.is_complete()

    stats = run_shard(_cfg(run, fail_once="v1"), 0)
    assert stats.get("skipped_shard") and store.is_complete()
    ledger = store.read_ledger()
    assert [(r["video_id"], r["status"], r["attempts"]) for r in ledger] == [
        ("v0", "ok", 1), ("v1", "ok", 2), ("v2", "ok", 1), ("v3", "ok", 1)]
    assert store.read_table("rows").to_pylist() == [
        {"video_id": "v0", "attempts_before": 0}, {"video_id": "v1", "attempts_before": 1},
        {"video_id": "v2", "attempts_before": 0}, {"video_id": "v3", "attempts_before": 0}]
    assert store.stats()["ok"] == 4 and not (store.dir / STAGING).exists()


def test_local_launcher_survives_a_dead_worker(tmp_path):
    """The worker of one shard dies: that shard fails, the shards not yet started still run in a fresh pool;
    re-running the failed shard gets past its bad item."""
    from pipeline.launchers.local import launch

    run = _run_dir(tmp_path, 12, num_shards=3)
    bad = min(f"v{i}" for i in range(12) if shard_of(f"v{i}", 3) == 0)  # the first item of the first shard
    cfg = _cfg(run, crash_on=bad, max_item_crashes=1)
    result = launch(cfg, [0, 1, 2], task=_task)
    assert list(result.failed_shards) == [0] and "worker process died" in result.failed_shards[0]
    assert [ShardStore(run, "crashy", s).is_complete() for s in range(3)] == [False, True, True]
    assert launch(cfg, [0], task=_task).ok
    ledger = {r["video_id"]: r for r in ShardStore(run, "crashy", 0).read_ledger()}
    assert ledger[bad]["reason"].startswith("crashed") and ledger[bad]["status"] == "failed"


def _group_alive(pgid: int) -> list[int]:
    import psutil

    alive = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def test_outside_kill_of_the_whole_task_is_not_counted_against_the_item(tmp_path):
    """Preemption / a kill of the task's process group while one healthy video is alone in flight, twice: the
    video is a suspect (run alone first) but not `crashed`, nothing of the task outlives the kill, and the
    re-run completes it. (A death of the worker alone is counted: test_item_that_kills_its_worker_...)"""
    run = _run_dir(tmp_path, 4)
    store = ShardStore(run, "crashy", 0)
    gate = tmp_path / "gate"  # never opened: v2 stays in flight until the kill
    cfg = _cfg(run, hold_on="v2", gate=str(gate), flush_every=1)
    script = (f"import sys, json; sys.path.insert(0, {str(TESTS)!r})\n"
              "import test_engine_crash as t\n"
              "t._task(json.loads(sys.argv[1]), 0)\n")
    for attempt in range(2):
        reached = Path(str(gate) + ".reached")
        reached.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(container(cfg))], cwd=TESTS.parent,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not reached.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert reached.exists(), "the task never reached v2"
        assert json.loads((store.parts_dir / "inflight.json").read_text())["inflight"] == ["v2"]  # alone
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        deadline = time.time() + 10
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert _group_alive(proc.pid) == []  # the witness went with the task
        assert not store.is_complete()
    assert store.in_flight().crashes == {"v2": 0}   # a suspect, never counted

    assert _run_in_subprocess(_cfg(run, flush_every=1)) == 0
    ledger = {r["video_id"]: r for r in store.read_ledger()}
    assert sorted(ledger) == ["v0", "v1", "v2", "v3"] and len(store.read_ledger()) == 4
    assert all(r["status"] == "ok" for r in ledger.values()), ledger
    assert store.read_table("rows").column("video_id").to_pylist() == ["v0", "v1", "v2", "v3"]


@pytest.mark.parametrize("sacct,counted", [
    ("echo FAILED", 1), ("echo OUT_OF_MEMORY", 1), ("echo PREEMPTED", 0), ("echo 'CANCELLED by 0'", 0),
    ("echo TIMEOUT", 0), ("echo NODE_FAIL", 0), ("exit 1", 0),
])
def test_unwitnessed_death_on_slurm_is_judged_by_accounting(tmp_path, monkeypatch, sacct, counted):
    """Slurm may end the step's other processes (the witness) with its task; then the job's final state decides
    whether the item alone in flight killed it."""
    from pipeline.shards import InFlight

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(f"#!/bin/sh\n{sacct}\n")
    (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = tmp_path / "inflight.json"
    path.write_text(json.dumps({"inflight": ["v2"], "crashes": {}, "owner": {"slurm_job": "77"}}))
    assert InFlight(path).crashes == {"v2": counted}
    # the same job again (requeued after preemption or time-out) is never counted; nor are several in flight
    path.write_text(json.dumps({"inflight": ["v2"], "crashes": {}, "owner": {"slurm_job": "77"}}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert InFlight(path).crashes == {"v2": 0}
    monkeypatch.delenv("SLURM_JOB_ID")
    path.write_text(json.dumps({"inflight": ["v1", "v2"], "crashes": {}, "owner": {"slurm_job": "77"}}))
    assert InFlight(path).crashes == {"v1": 0, "v2": 0}


def test_rows_are_encoded_once_and_the_inflight_record_is_not_fsynced(tmp_path, monkeypatch):
    """Parts are Arrow files and the shard's Parquet output is the only encoding of a row; the in-flight record
    (two writes per item) costs no fsync. Counted against the items fed in, not against the code's own output."""
    import pyarrow.parquet as pq     # the module every Parquet write of the package goes through

    n = 64
    run = _run_dir(tmp_path, n)
    encoded, fsyncs = [], []
    real_write, real_fsync = pq.write_table, os.fsync

    def counting_write(table, where, **kw):
        if isinstance(where, (str, os.PathLike)) and "ledger" not in Path(where).name:  # files of stage tables
            encoded.append(table.num_rows)
        return real_write(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", counting_write)
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    inflight_writes = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: (inflight_writes.append(json.loads(data)["inflight"]),
                                                           real_pwrite(fd, data, at))[1])
    run_shard(_cfg(run, flush_every=16), 0)
    store = ShardStore(run, "crashy", 0)
    assert store.read_table("rows").column("video_id").to_pylist() == sorted(f"v{i}" for i in range(n))
    assert sum(encoded) == n                     # each row once: parts were not Parquet, nor re-encoded
    assert inflight_writes == [w for v in sorted(f"v{i}" for i in range(n)) for w in ([v], [])]  # start, done
    assert len(fsyncs) < n                       # before: 4 per item (file + directory, twice)


def test_resumes_a_shard_whose_parts_an_older_version_wrote_as_parquet(tmp_path):
    """A shard killed mid-run by an older version left Parquet parts: the next run adopts them (no item redone)
    and the shard ends with every item exactly once."""
    from pipeline.atomic import write_parquet
    from pipeline.shards import LEDGER_SCHEMA

    run = _run_dir(tmp_path, 6)
    store = ShardStore(run, "crashy", 0)
    done = ["v0", "v1", "v2"]
    write_parquet(store.parts_dir / "part-000001.rows.parquet",
                  pa.table({"video_id": done, "attempts_before": [0, 0, 0]}))
    write_parquet(store.parts_dir / "part-000001.ledger.parquet", pa.Table.from_pylist(
        [{"video_id": v, "status": "ok", "reason": "", "attempts": 1, "seconds": 0.0, "note": ""} for v in done],
        schema=LEDGER_SCHEMA))
    stats = run_shard(_cfg(run, flush_every=16), 0)
    assert stats["processed"] == 3 and store.is_complete()
    assert store.read_table("rows").column("video_id").to_pylist() == [f"v{i}" for i in range(6)]
    assert sorted(r["video_id"] for r in store.read_ledger()) == [f"v{i}" for i in range(6)]


def test_inflight_record_overwritten_in_place_reads_back_whole(tmp_path):
    """The record is rewritten in place while small, by temp file and rename when over a page; either way each
    state reads back exactly (no tail of a longer earlier record), and a record torn by a machine crash reads as
    empty instead of failing the shard."""
    from pipeline.shards import InFlight

    path = tmp_path / "parts" / "inflight.json"
    record = InFlight(path)
    states = [["a-rather-long-video-id"], ["a-rather-long-video-id", "b"], ["b"], []]
    record.start("a-rather-long-video-id")
    seen = [json.loads(path.read_text())["inflight"]]
    record.start("b")
    seen.append(json.loads(path.read_text())["inflight"])
    record.done("a-rather-long-video-id")
    seen.append(json.loads(path.read_text())["inflight"])
    record.done("b")
    seen.append(json.loads(path.read_text())["inflight"])
    assert seen == states
    many = [f"video-{i:05d}" for i in range(400)]          # ~6 KB: over a page
    for v in many:
        record.start(v)
    assert json.loads(path.read_text())["inflight"] == many
    for v in many[1:]:
        record.done(v)
    assert json.loads(path.read_text())["inflight"] == many[:1] and path.stat().st_size < 4096
    record.close()
    assert InFlight(path).crashes == {many[0]: 0}          # the leftover is a suspect of the next attempt
    path.write_bytes(b'{"inflight": ["vid')                # torn
    assert InFlight(path).crashes == {}
