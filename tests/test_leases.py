"""Shard leases: two launches of one stage on one run dir, stale and foreign leases, one ledger row per item.

Uses the `crashy` test stage of test_engine_crash (its `hold_on`/`gate` keep one shard running until the test
opens the gate)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import stages
from pipeline.engine import container, run_shard
from pipeline.manifest import load_items
from pipeline.shards import FAILED_MARKER, LEASE_FILE, LeaseLost, ShardLease, ShardStore
from pipeline.status import format_status, stage_status
from test_engine_crash import TESTS, _run_dir

N_ITEMS, N_SHARDS = 12, 3


def _cfg(run: Path, workers: int = 1, retry_failed: bool = False, on_leased_shard: str = "wait",
         lease_ttl_s: float = 120.0, **stage):
    from omegaconf import OmegaConf

    from pipeline.config import validate

    return validate(OmegaConf.create({
        "stage": {"name": "crashy", **stage}, "launcher": {"name": "local", "workers": workers}, "cluster": {},
        "run_dir": str(run), "cache_dir": str(run / "cache"), "device": "cpu", "retry_failed": retry_failed,
        "on_leased_shard": on_leased_shard, "lease_ttl_s": lease_ttl_s}))


@pytest.fixture(autouse=True)
def crashy_registered(monkeypatch):
    monkeypatch.setitem(stages.STAGES, "crashy", "test_engine_crash")


LAUNCH = (f"import sys, json; sys.path.insert(0, {str(TESTS)!r})\n"
          "import test_engine_crash as t\n"
          "from pipeline import stages\n"
          "stages.STAGES['crashy'] = 'test_engine_crash'\n"
          "from pipeline.config import from_container\n"
          "from pipeline.launchers.local import launch\n"
          "r = launch(from_container(json.loads(sys.argv[1])), [0, 1, 2], task=t._task)\n"
          "print(json.dumps({'failed': r.failed_shards, 'busy': r.busy_shards}))\n")


def _launch(cfg) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCH, json.dumps(container(cfg))], cwd=TESTS.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, what: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _check_every_item_once(run: Path) -> None:
    """Count every id in (the pinned manifest) and out (ledgers and output rows of every shard)."""
    want = sorted(i.video_id for i in load_items(run))
    assert len(want) == N_ITEMS
    ledger_ids, row_ids = [], []
    for s in range(N_SHARDS):
        store = ShardStore(run, "crashy", s)
        assert store.is_complete() and not (store.dir / FAILED_MARKER).exists()
        assert not (store.dir / LEASE_FILE).exists() and not store.parts_dir.exists()
        ledger = store.read_ledger()
        assert sorted(r["video_id"] for r in ledger) == sorted(i.video_id for i in load_items(run, s))
        assert store.stats()["items"] == len(ledger)
        ledger_ids += [r["video_id"] for r in ledger]
        rows = store.read_table("rows")
        row_ids += rows.column("video_id").to_pylist() if rows is not None else []
    assert sorted(ledger_ids) == want and sorted(row_ids) == want


def _held_shard(run: Path, item: str) -> int:
    return next(i.shard for i in load_items(run) if i.video_id == item)


@pytest.mark.parametrize("mode", ["wait", "skip"])
def test_two_concurrent_launches_of_one_stage(tmp_path, mode):
    """A second launch while the first still runs a shard: it waits for that shard (then finds it complete) or
    leaves it to its owner; either way it never writes into it, and every item ends up exactly once."""
    run = _run_dir(tmp_path, N_ITEMS, num_shards=N_SHARDS)
    held = "v5"
    shard = _held_shard(run, held)
    gate = tmp_path / "gate"
    first = _launch(_cfg(run, workers=1, hold_on=held, gate=str(gate), flush_every=1))
    reached = Path(str(gate) + ".reached")
    _wait_for(lambda: reached.exists() or first.poll() is not None, "the first launch to reach the held item")
    assert first.poll() is None, first.communicate()
    owner_pid = int(reached.read_text())

    # status names the running shard and its owner
    st = stage_status(run, "crashy", N_SHARDS)
    assert st.extra["running"][shard].startswith(f"host {socket.gethostname()} pid {owner_pid}")
    assert f"shard {shard}: host {socket.gethostname()} pid {owner_pid}" in format_status(run, [st])

    store = ShardStore(run, "crashy", shard)
    parts_before = sorted(p.name for p in store.parts_dir.iterdir())
    second = _launch(_cfg(run, workers=2, flush_every=1, on_leased_shard=mode))
    log = run / "crashy" / "logs" / f"shard-{shard:05d}.log"
    if mode == "wait":
        _wait_for(lambda: "waiting for it" in log.read_text() or second.poll() is not None,
                  "the second launch to wait for the lease")
    else:
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["failed"] == {} and list(result["busy"]) == [str(shard)]
        assert f"pid {owner_pid}" in result["busy"][str(shard)]
        assert not store.is_complete()
    # nothing of the held shard was touched by the second launch
    assert sorted(p.name for p in store.parts_dir.iterdir()) == parts_before
    gate.write_text("open")
    for proc in (first, second):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["failed"] == {}
    _check_every_item_once(run)
    # the held shard was processed once, by its owner: each item attempted once
    assert [r["attempts"] for r in store.read_ledger()] == [1] * len(store.read_ledger())


def test_stale_lease_of_a_dead_owner_is_taken_over(tmp_path):
    run = _run_dir(tmp_path, 4)
    store = ShardStore(run, "crashy", 0)
    store.dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (store.dir / LEASE_FILE).write_text(json.dumps({"token": "x", "host": socket.gethostname(), "pid": int(dead),
                                                    "heartbeat": time.time()}))
    (store.dir / FAILED_MARKER).write_text('{"error": "from the dead owner"}')
    run_shard(_cfg(run, on_leased_shard="skip"), 0)
    assert store.is_complete() and not (store.dir / FAILED_MARKER).exists()
    assert len(store.read_ledger()) == 4


def test_lease_of_another_host_is_respected_until_its_heartbeat_is_stale(tmp_path):
    """Where file locks do not reach across nodes, the lease file's heartbeat decides."""
    run = _run_dir(tmp_path, 4)
    store = ShardStore(run, "crashy", 0)
    store.dir.mkdir(parents=True)
    foreign = {"token": "other", "host": "node-elsewhere", "pid": 1, "slurm_job": "4242", "heartbeat": time.time()}
    (store.dir / LEASE_FILE).write_text(json.dumps(foreign))
    stats = run_shard(_cfg(run, on_leased_shard="skip", lease_ttl_s=60), 0)
    assert "node-elsewhere" in stats["leased_by"] and "slurm job 4242" in stats["leased_by"]
    assert not store.is_complete() and not store.parts_dir.exists()
    assert f"shard 0: host node-elsewhere" in format_status(run, [stage_status(run, "crashy", 1)])
    foreign["heartbeat"] = time.time() - 61
    (store.dir / LEASE_FILE).write_text(json.dumps(foreign))
    assert "leased_by" not in run_shard(_cfg(run, on_leased_shard="skip", lease_ttl_s=60), 0)
    assert store.is_complete() and len(store.read_ledger()) == 4


def test_a_lease_taken_over_stops_its_old_owner_writing(tmp_path):
    lease = ShardLease(tmp_path / "shard", ttl_s=60, heartbeat_s=0.05)
    assert lease.try_acquire() is None
    lease.check()
    current = json.loads((tmp_path / "shard" / LEASE_FILE).read_text())
    (tmp_path / "shard" / LEASE_FILE).write_text(json.dumps({**current, "token": "thief", "pid": 1}))
    with pytest.raises(LeaseLost, match="taken over"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / "shard" / LEASE_FILE).read_text())["token"] == "thief"  # not ours to remove
    other = ShardLease(tmp_path / "shard", ttl_s=60)
    assert other.try_acquire() is None  # same host, lock free: taken over
    other.release()


def test_ledger_has_one_row_per_item_after_reruns(tmp_path):
    """Parts that hold an item twice (left by an earlier attempt) still give one ledger row per item; a shard
    whose rows do not cover its items is not marked complete."""
    run = _run_dir(tmp_path, 4)
    store = ShardStore(run, "crashy", 0)
    row = {"video_id": "v1", "status": "ok", "reason": "", "attempts": 1, "seconds": 0.0, "note": ""}
    import pyarrow as pa

    store.write_part([row], {"rows": pa.table({"video_id": ["v1"], "attempts_before": [0]})})
    store.write_part([{**row, "attempts": 2}], {"rows": pa.table({"video_id": ["v1"], "attempts_before": [1]})})
    run_shard(_cfg(run), 0)
    ledger = store.read_ledger()
    assert [r["video_id"] for r in ledger] == ["v0", "v1", "v2", "v3"]
    assert [r["video_id"] for r in store.read_table("rows").to_pylist()] == ["v0", "v1", "v2", "v3"]
    run_shard(_cfg(run, retry_failed=True), 0)  # a re-run of a complete shard: still one row each
    assert [r["video_id"] for r in store.read_ledger()] == ["v0", "v1", "v2", "v3"]
