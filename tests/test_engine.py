"""Engine units: manifests, stable sharding, geometry pinning, config validation, ledger/parts/finalize, requeue."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
from conftest import run_cli

from pipeline.errors import ConfigError
from pipeline.manifest import item_from_entry, pin_geometry, plan_geometry, read_manifest, shard_of
from pipeline.shards import ShardStore, dedupe_sorted


def test_manifest_entries(tmp_path):
    assert item_from_entry("dQw4w9WgXcQ") == ("dQw4w9WgXcQ", "https://www.youtube.com/watch?v=dQw4w9WgXcQ")
    assert item_from_entry("https://www.youtube.com/watch?v=dQw4w9WgXcQ&t=3")[0] == "dQw4w9WgXcQ"
    assert item_from_entry("https://youtu.be/dQw4w9WgXcQ")[0] == "dQw4w9WgXcQ"
    assert item_from_entry("https://www.youtube.com/shorts/dQw4w9WgXcQ")[0] == "dQw4w9WgXcQ"
    assert item_from_entry("http://127.0.0.1:8000/v/clip-1.mp4") == ("clip-1", "http://127.0.0.1:8000/v/clip-1.mp4")
    assert item_from_entry("myid /data/x.mp4") == ("myid", "/data/x.mp4")
    m = tmp_path / "m.txt"
    m.write_text("# comment\n\na1 /x/1.mp4\na2 /x/2.mp4\na1 /x/1.mp4\n")
    assert [i.video_id for i in read_manifest(m)] == ["a1", "a2"]  # exact duplicates collapse
    m.write_text("a1 /x/1.mp4\na1 /x/other.mp4\n")
    with pytest.raises(ConfigError, match="twice"):
        read_manifest(m)
    m.write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="no videos"):
        read_manifest(m)


def test_parquet_manifest(tmp_path):
    import pyarrow.parquet as pq

    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"video_id": ["a", "b"], "url": ["/a.mp4", "/b.mp4"]}), p)
    assert [(i.video_id, i.url) for i in read_manifest(p)] == [("a", "/a.mp4"), ("b", "/b.mp4")]
    pq.write_table(pa.table({"id": ["a"]}), p)
    with pytest.raises(ConfigError, match="columns"):
        read_manifest(p)


def test_shard_of_is_stable_and_spread():
    # Pinned values: sharding must never change between versions, or half-finished runs would be re-sharded.
    assert [shard_of(v, 7) for v in ("a", "b", "dQw4w9WgXcQ")] == [shard_of(v, 7) for v in ("a", "b", "dQw4w9WgXcQ")]
    import hashlib

    assert shard_of("abc", 1000) == int.from_bytes(hashlib.sha1(b"abc").digest()[:8], "big") % 1000
    counts = [0] * 8
    for i in range(4000):
        counts[shard_of(f"video{i}", 8)] += 1
    assert min(counts) > 400 and max(counts) < 600


def test_geometry_is_pinned(tmp_path):
    m = tmp_path / "m.txt"
    m.write_text("".join(f"v{i} /x/{i}.mp4\n" for i in range(10)))
    run = tmp_path / "run"
    geo, items, new = plan_geometry(run, str(m), None, items_per_shard=4)
    assert new and geo.num_shards == 3 and not run.exists()  # planning writes nothing
    pin_geometry(run, geo, items)
    geo2, items2, new2 = plan_geometry(run, None, None, 4)
    assert not new2 and geo2 == geo and sorted(i.video_id for i in items2) == sorted(i.video_id for i in items)
    assert all(i.shard == shard_of(i.video_id, 3) for i in items2)
    with pytest.raises(ConfigError, match="pinned to num_shards=3"):
        plan_geometry(run, None, 5, 4)
    m2 = tmp_path / "m2.txt"
    m2.write_text("other /x/o.mp4\n")
    with pytest.raises(ConfigError, match="differs"):
        plan_geometry(run, str(m2), None, 4)


@pytest.mark.parametrize("args,message", [
    (["stage=nope"], "unknown stage 'nope'"),
    (["stage=download", "bogus_key=1"], "unknown config key 'bogus_key'"),
    (["stage=download", "stage.not_a_knob=1"], "unknown config key 'stage.not_a_knob'"),
    (["stage=download", "stage.retries=many"], "retries"),
    (["stage=download", "num_shards=zero"], "num_shards"),
    (["stage=download", "input=/definitely/missing.txt"], "input manifest not found"),
    (["stage=download", "launcher=pbs"], "unknown launcher 'pbs'"),
    (["stage=download", "models=huge"], "models must be"),
    (["stage=frames"], "needs the outputs of download"),
    (["stage=asr", "launcher=slurm", "stage.resources.gpus=2", "stage.runner.num_model_actors=4"],
     "needs more GPUs than the task asks for"),
])
def test_bad_config_fails_fast_and_writes_nothing(tmp_path, args, message):
    m = tmp_path / "m.txt"
    m.write_text("a /x/a.mp4\n")
    run = tmp_path / "run"
    extra = [] if any(a.startswith("input=") for a in args) else [f"input={m}"]
    if args == ["stage=nope"]:
        extra = []
    proc = run_cli(*args, f"run_dir={run}", *extra, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not run.exists()


def test_status_and_help(tmp_path):
    proc = run_cli("--help", timeout=60)
    assert "stage=<name>" in proc.stdout and "download" in proc.stdout
    proc = run_cli("status", f"run_dir={tmp_path / 'missing'}", check=False, timeout=60)
    assert proc.returncode == 2 and "run_dir not found" in proc.stderr


def test_parts_finalize_and_dedupe(tmp_path):
    store = ShardStore(tmp_path, "toy", 0)
    row = lambda v, s="ok": {"video_id": v, "status": s, "reason": "", "attempts": 1, "seconds": 0.1, "note": ""}  # noqa: E731
    store.write_part([row("b"), row("a")], {"t": pa.table({"video_id": ["b", "a"], "k": [1, 1], "x": [2.0, 1.0]})})
    store.write_part([row("c", "failed")], {})
    # A torn part (outputs without their ledger) must be ignored: the ledger is written last.
    pa_path = store.parts_dir / "part-000099.t.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"video_id": ["z"], "k": [1], "x": [9.0]}), pa_path)
    ledger, tables = store.read_parts()
    assert sorted(r["video_id"] for r in ledger) == ["a", "b", "c"]
    assert sum(t.num_rows for t in tables["t"]) == 2
    t = dedupe_sorted(pa.concat_tables(tables["t"] + [pa.table({"video_id": ["a"], "k": [1], "x": [5.0]})]),
                      ["video_id", "k"])
    assert t.column("video_id").to_pylist() == ["a", "b"] and t.column("x").to_pylist() == [5.0, 2.0]
    store.finalize(ledger, {"t": t}, {"seconds": 1}, {"stage": "toy"})
    assert store.is_complete() and not store.parts_dir.exists()
    stats = json.loads((store.dir / "stats.json").read_text())
    assert (stats["ok"], stats["failed"], stats["items"]) == (2, 1, 3)
    assert [r["video_id"] for r in store.read_ledger()] == ["a", "b", "c"]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_requeue_command_survives_the_steps_sigterm(checkpointed):
    """submitit runs `scontrol requeue` right after checkpoint(); a SIGTERM sent to the whole Slurm step at that moment
    (preemption, or the requeue's own kill) must not kill it, or the job fails instead of being requeued."""
    script = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        from pipeline.launchers.slurm import ShardTask
        signal.signal(signal.SIGTERM, lambda *_: None)  # what submitit installs: a Python handler (not inherited)
        if {checkpointed}:
            ShardTask({{}}).checkpoint(0)
        child = subprocess.Popen(["sleep", "30"])  # stands in for `scontrol requeue`
        time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        alive = child.poll() is None
        child.kill()
        print("alive" if alive else "killed")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("alive" if checkpointed else "killed")


def test_status_reports_training_runs_from_their_logs_and_checkpoints(tmp_path):
    """A long run's metrics log is read from its tail; a checkpoint counts once its meta.json exists."""
    run = tmp_path / "pretrain"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "checkpoints" / "step-00000010" / "meta.json").write_text('{"step": 10}')
    (run / "checkpoints" / "step-00000020").mkdir()  # being written: not complete
    records = [{"step": s, "loss": 100.0 / s} for s in range(1, 5001)] + [{"step": 5000, "eval_loss": 0.125}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 50')  # torn tail
    out = run_cli("status", f"run_dir={tmp_path}").stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("pretrain "))
    assert line.split()[1:4] == ["5000", "0.0200", "0.1250"] and "step 10 (1 kept)" in line, out


def test_ray_ports_skip_bound_ports_and_stay_below_the_ephemeral_range():
    import socket

    from pipeline.launchers.ray_cluster import RAY_PORT_RANGE, _free_ports
    from pipeline.train.launch import master_port

    with socket.socket() as held:
        held.bind(("", _free_ports(1, 25000)[0]))
        taken = held.getsockname()[1]
        ports = _free_ports(3, taken)
        assert taken not in ports and len(set(ports)) == 3
        assert all(RAY_PORT_RANGE[0] <= p < RAY_PORT_RANGE[1] for p in ports)
    # the search wraps inside the range instead of running into the ephemeral ports
    assert all(p < RAY_PORT_RANGE[1] for p in _free_ports(2, RAY_PORT_RANGE[1] - 1))
    assert all(29000 <= master_port(str(j)) < 32768 for j in (0, 870, 3499, 123456, "77_3"))


def test_ray_node_start_retries_with_fresh_ports_and_reports_its_log(tmp_path, monkeypatch):
    """A node whose `ray start` dies (a port taken between probe and bind) is started again with new arguments;
    one that never comes up fails with its log, not a hang."""
    import time

    from pipeline.launchers import ray_cluster

    fake = tmp_path / "ray"
    # exits 1 until its argument says attempt 2, then reports started and blocks like `ray start --block`
    fake.write_text("#!/bin/sh\nfor a; do :; done\necho \"port $a in use\"\n"
                    "[ \"$a\" = attempt2 ] || exit 1\necho 'Ray runtime started.'\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(ray_cluster, "_ray_bin", lambda: str(fake))
    seen = []

    def args(attempt):
        seen.append(attempt)
        return [f"attempt{attempt}"]

    node = ray_cluster._start_node(args, {}, tmp_path / "node.log", time.time() + 30)
    try:
        assert seen == [0, 1, 2] and node.poll() is None
        assert "port attempt0 in use" in (tmp_path / "node.0.log").read_text()
    finally:
        ray_cluster._stop_node(node)
    with pytest.raises(RuntimeError, match="failed to start 3 times(.|\n)*port never in use"):
        ray_cluster._start_node(lambda attempt: ["never"], {}, tmp_path / "bad.log", time.time() + 30)


def test_dedupe_sorted_matches_a_plain_python_oracle():
    """Last row per key wins, rows sorted by key: for tables already sorted and unique (returned as they are,
    without a copy), for unsorted ones, with duplicates and with null keys, over several chunks."""
    import random

    rng = random.Random(7)
    for trial in range(200):
        n = rng.randint(0, 14)
        rows = [{"v": rng.choice(["a", "b", "c", None] if trial % 5 == 0 else ["a", "b", "c"]),
                 "k": rng.randint(0, 3), "x": i} for i in range(n)]
        if trial % 2:
            rows = sorted({(r["v"] or "", r["k"]): r for r in rows}.values(), key=lambda r: (r["v"] or "", r["k"]))
        cut = rng.randint(0, len(rows))
        table = pa.concat_tables([pa.Table.from_pylist(rows[:cut], schema=pa.schema(
            [("v", pa.string()), ("k", pa.int64()), ("x", pa.int64())]))] + [pa.Table.from_pylist(
                rows[cut:], schema=pa.schema([("v", pa.string()), ("k", pa.int64()), ("x", pa.int64())]))])
        last = {}
        for r in rows:
            last[(r["v"], r["k"])] = r
        want = sorted(last.values(), key=lambda r: (r["v"] is None, r["v"] or "", r["k"]))
        assert dedupe_sorted(table, ["v", "k"]).to_pylist() == want, rows


def test_finalized_tables_store_media_uncompressed_and_the_rest_with_zstd(tmp_path):
    """JPEG bytes (alone or in lists) are already compressed: the final Parquet keeps them as they are, the other
    columns zstd; min/max statistics only for columns of one value per row; the table reads back equal."""
    import pyarrow.parquet as pq

    store = ShardStore(tmp_path, "toy", 0)
    t = pa.table({"video_id": ["a", "b"], "jpeg": [b"\xff\xd8one", b"\xff\xd8two"],
                  "frames": [[b"\xff\xd8x", b"\xff\xd8y"], []], "emb": [[1.0, 2.0], [3.0]]})
    ledger = [{"video_id": v, "status": "ok", "reason": "", "attempts": 1, "seconds": 0.1, "note": ""}
              for v in ("a", "b")]
    store.finalize(ledger, {"t": t}, {}, {"stage": "toy"})
    meta = pq.ParquetFile(store.table_path("t")).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).compression
              for i in range(meta.num_columns)}
    assert codecs == {"video_id": "ZSTD", "jpeg": "UNCOMPRESSED", "frames": "UNCOMPRESSED", "emb": "ZSTD"}, codecs
    stats = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).is_stats_set
             for i in range(meta.num_columns)}
    assert stats == {"video_id": True, "jpeg": True, "frames": False, "emb": False}, stats
    assert meta.column(0).statistics.min == "a" and meta.column(0).statistics.max == "b"
    assert store.read_table("t").equals(t)
