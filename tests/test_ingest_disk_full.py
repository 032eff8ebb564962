"""Ingest on a filesystem that fills up: nothing lost, nothing duplicated, no reader killed, nothing deleted.

Deep Lake 4.7 commits "successfully" on a full disk and leaves a head whose reads crash the process. A real
tmpfs of a few MiB is mounted in the test's own directory and filled during the write; the dataset is then only
ever read in child processes until it is known to be readable. Upstream outputs come from
`benchmarks.ingest_bench.make_upstream`; the engine, the verifier and Deep Lake are the real ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from benchmarks.ingest_bench import ingest_config, run_ingest_shards
from pipeline import dataset_health as health
from pipeline.schema import TABLE
from pipeline.shards import ShardStore, concat_tables
from pipeline.stages.ingest import dataset_url, write_dataset
from test_ingest import SHARDS, run, upstream_template  # noqa: F401  (shared fixtures)

QUIET = {"log": lambda s: None}

KEYS_SCRIPT = textwrap.dedent("""
    import json, sys, deeplake
    ds = deeplake.open_read_only(sys.argv[1])
    n = len(ds)
    print(json.dumps([[str(v), int(i)] for v, i in zip(ds["video_id"][0:n], ds["segment_idx"][0:n])] if n else []))
""")

CORRUPT_SCRIPT = textwrap.dedent("""
    # a writer without the checks (what every Deep Lake 4.7 writer does): duplicates shard 0's rows, fills the
    # disk and commits
    import sys
    import deeplake
    ds = deeplake.open(sys.argv[1])
    n = len(ds)
    ds.append({c.name: ds[c.name][0:n] for c in ds.schema.columns if c.name not in ("frames",)}
              | {"frames": [[] for _ in range(n)]})
    with open(sys.argv[2], "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\\0" * 65536)
        except OSError:
            pass
    ds.commit("unchecked write on a full disk")
""")


@pytest.fixture
def small_fs(tmp_path):
    """A 8 MiB tmpfs mounted in the test's directory (needs root, as `make test` runs)."""
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    assert health.free_bytes(path.parent) < 65536


def keys_in_child(url: str) -> list[tuple[str, int]]:
    """The dataset's (video_id, segment_idx), read in a child process (a crash there fails only this call)."""
    proc = subprocess.run([sys.executable, "-c", KEYS_SCRIPT, url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"reading the dataset: exit {proc.returncode}: {proc.stderr[-500:]}"
    return [tuple(k) for k in json.loads(proc.stdout.splitlines()[-1])]


def shard_keys(run: Path, shards=range(SHARDS)) -> list[tuple[str, int]]:
    t = concat_tables(ShardStore(run, "ingest", s).read_table(TABLE) for s in shards)
    return [(r["video_id"], r["segment_idx"]) for r in t.select(["video_id", "segment_idx"]).to_pylist()]


def assert_every_row_once(url: str, run: Path) -> None:
    keys = keys_in_child(url)
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert sorted(keys) == sorted(shard_keys(run))


def on_small_fs(run: Path, small_fs: Path, *overrides: str):
    """The ingest config with the dataset on the small filesystem, recorded as `stage=ingest` does (verify and
    status find the dataset there)."""
    (run / "ingest").mkdir(exist_ok=True)
    (run / "ingest" / "config.yaml").write_text(f"stage:\n  dataset_path: {small_fs / 'dataset'}\n")
    return ingest_config(run, f"stage.dataset_path={small_fs / 'dataset'}", "stage.free_space_min_mb=0", *overrides)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_disk_fills_during_a_commit_then_ingest_and_verify_recover(run, small_fs):
    cfg = on_small_fs(run, small_fs, "stage.shards_per_commit=1")
    run_ingest_shards(cfg)
    url = dataset_url(cfg.stage, run)
    filler = small_fs / "filler"

    def fill_before_commit(shard: int) -> None:     # shard 0 is committed; shard 1's commit meets a full disk
        if shard == 1:
            fill(filler)

    messages: list[str] = []
    with pytest.raises(health.DatasetWriteError) as err:
        write_dataset(cfg, log=messages.append, after_append=fill_before_commit)
    text = str(err.value)
    assert "shards [1]" in text and "unreadable" in text and "rolled back" in text, text
    assert any("rolled back to the last good version" in m for m in messages), messages
    kept = list(health.guard_dir(small_fs / "dataset").glob("unreadable-*/_deeplake_log"))
    assert kept, "the unreadable version log is kept, not deleted"
    # still full: the dataset reads, and it is exactly the committed shard 0
    assert sorted(keys_in_child(url)) == sorted(shard_keys(run, [0]))
    before = files_under(small_fs / "dataset")

    filler.unlink()                                  # space freed: verify, then ingest, recover
    proc = run_cli(f"run_dir={run}", module="pipeline.verify", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr       # shard 0 in the dataset, and aligned
    assert before <= files_under(small_fs / "dataset"), "nothing of the dataset was deleted"
    result = write_dataset(cfg, **QUIET)
    assert result["shards_written"] == [1, 2] and result["tag"], result
    assert_every_row_once(url, run)
    assert run_cli(f"run_dir={run}", module="pipeline.verify", check=False).returncode == 0
    status = run_cli("status", f"run_dir={run}").stdout
    assert f"ingest dataset: {len(shard_keys(run))} rows, {SHARDS} of {SHARDS} shards, tagged {result['tag']}" \
        in status, status


def test_unreadable_head_found_on_open_is_rolled_back(run, small_fs):
    """A head left unreadable by a writer that did not check (or died before it could): status says so, verify
    rolls it back, and a re-run of ingest finds everything in place."""
    cfg = on_small_fs(run, small_fs)
    run_ingest_shards(cfg)
    url = dataset_url(cfg.stage, run)
    first = write_dataset(cfg, **QUIET)
    assert first["tag"]
    filler = small_fs / "filler"
    proc = subprocess.run([sys.executable, "-c", CORRUPT_SCRIPT, url, str(filler)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    problem, _ = health.head_problem(url)
    assert problem and "reading it" in problem       # the head no longer reads (the reader is killed or fails)
    filler.unlink()
    assert health.head_problem(url)[0], "freeing space does not repair the head"
    status = run_cli("status", f"run_dir={run}").stdout
    assert "DATASET UNREADABLE" in status and "NOT DONE: the dataset's head" in status \
        and "unreadable (reading it" in status, status
    proc = run_cli(f"run_dir={run}", module="pipeline.verify", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rolled back to the last good version" in proc.stderr and first["tag"] in proc.stderr, proc.stderr
    assert_every_row_once(url, run)
    again = write_dataset(cfg, **QUIET)
    assert again["shards_written"] == [] and again["commits"] == 0 and again["tag"] is None
    assert_every_row_once(url, run)
    assert "NOT DONE" not in run_cli("status", f"run_dir={run}").stdout


def test_unreadable_head_without_a_saved_version_is_one_line_not_a_crash(run, small_fs):
    """A dataset whose good version was never saved (written before the checks existed): verify and ingest
    cannot roll it back, and say so in one line (exit 2) instead of being killed by the reader."""
    cfg = on_small_fs(run, small_fs)
    run_ingest_shards(cfg)
    url = dataset_url(cfg.stage, run)
    first = write_dataset(cfg, **QUIET)
    guard = health.guard_dir(small_fs / "dataset")
    guard.rename(small_fs / "moved-aside")              # as if written before the last good version was kept
    filler = small_fs / "filler"
    proc = subprocess.run([sys.executable, "-c", CORRUPT_SCRIPT, url, str(filler)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    filler.unlink()
    for args in ([f"run_dir={run}"], ["stage=ingest", f"run_dir={run}", "launcher=local",
                                      f"stage.dataset_path={small_fs / 'dataset'}"]):
        proc = run_cli(*args, module="pipeline.verify" if len(args) == 1 else "pipeline", check=False)
        err = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(err) == 1, (proc.returncode, proc.stderr)
        assert "no good version of it was saved" in err[0] and first["tag"] in err[0], err[0]
    assert "NOT DONE" in run_cli("status", f"run_dir={run}").stdout


def test_a_commit_that_does_not_fit_is_refused_before_writing(run):
    cfg = ingest_config(run, "stage.shards_per_commit=1")
    run_ingest_shards(cfg)
    url = dataset_url(cfg.stage, run)
    free = health.free_bytes(run)
    need_mb = free / 2**20 + 1024
    tight = ingest_config(run, "stage.shards_per_commit=1", f"stage.free_space_min_mb={need_mb}")
    with pytest.raises(health.DatasetSpaceError, match=r"not enough free space for ingest shards \[0\]"):
        write_dataset(tight, **QUIET)
    assert keys_in_child(url) == []                  # created, nothing written
    proc = run_cli("stage=ingest", f"run_dir={run}", "launcher=local", f"stage.free_space_min_mb={need_mb}",
                   check=False)
    assert proc.returncode == 2 and "not enough free space" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    result = write_dataset(cfg, **QUIET)
    assert result["shards_written"] == list(range(SHARDS))
    assert_every_row_once(url, run)


def test_free_space_defaults_match_the_config(tmp_path):
    """A run composed from conf/ (stage=ingest) writes with the documented free-space defaults."""
    from pipeline.stages.ingest import IngestConfig

    stage = ingest_config(tmp_path).stage
    assert (stage.free_space_margin, stage.free_space_min_mb) == (IngestConfig.free_space_margin,
                                                                  IngestConfig.free_space_min_mb)


def test_status_does_not_read_a_dataset_being_written(run):
    from filelock import FileLock

    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    result = write_dataset(cfg, **QUIET)
    with FileLock(str(run / "ingest" / "dataset.lock")):
        status = run_cli("status", f"run_dir={run}").stdout
    assert "ingest dataset: being written" in status, status
    status = run_cli("status", f"run_dir={run}").stdout
    assert f"ingest dataset: {result['rows']} rows, {SHARDS} of {SHARDS} shards, tagged {result['tag']}" in status
