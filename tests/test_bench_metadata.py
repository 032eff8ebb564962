"""Metadata-throughput benchmark (benchmarks/metadata): layouts round-trip, fs phase counts, syscall counts, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks.metadata.__main__ import run_benchmark
from benchmarks.metadata.fsbench import PHASES, FileBarrier, aggregate_phases, run_fs_phase
from benchmarks.metadata.layouts import LAYOUTS, LayoutOptions, disk_usage, make_layout
from benchmarks.metadata.samples import make_samples
from benchmarks.metadata.syscalls import MARKER_DIR, count_read_syscalls, parse_strace, strace_usable
from slurm_cluster import slurm_cluster  # noqa: F401

CONF_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "metadata" / "conf"
# Small enough to be quick, large enough to span several directories, files, row groups and shards.
TINY = LayoutOptions(write_batch=8, files_per_dir=8, rows_per_file=12, row_group_rows=5, shard_samples=10)


@pytest.fixture(scope="module")
def samples():
    return make_samples(30, seed=3, width=96, height=72)


@pytest.fixture(scope="module")
def written(tmp_path_factory, samples):
    """Every layout written once with the tiny samples."""
    root = tmp_path_factory.mktemp("layouts")
    for name in LAYOUTS:
        make_layout(name, root / name, TINY).write(samples)
    return root


def tiny_config(tmp_path: Path, **overrides) -> dict:
    args = [f"{k}={v}" for k, v in {
        "root": tmp_path / "data", "out": tmp_path / "out", "samples": 24, "random_reads": 16, "batch_size": 8,
        "image.width": 96, "image.height": 72, "fs.files_per_client": 40, "fs.dirs": 4,
        "syscalls.random_reads": 8, "drop_caches": "false", "layout_options.files_per_dir": 10,
        "layout_options.rows_per_file": 10, "layout_options.row_group_rows": 4, "layout_options.shard_samples": 10,
        **overrides,
    }.items()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_container(compose("metadata", overrides=args), resolve=True)


def test_samples_look_like_pipeline_rows():
    s = make_samples(20)  # default sizes
    mean_jpeg = sum(len(x.jpeg) for x in s) / len(s)
    assert 15_000 < mean_jpeg < 45_000
    assert all(x.jpeg[:2] == b"\xff\xd8" for x in s)  # real JPEG streams
    assert s[0].embedding.dtype.name == "float16" and s[0].embedding.shape == (768,)
    assert make_samples(3)[2].equals(s[2])  # deterministic: every client writes the same data


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_round_trips(name, written, samples):
    order = [17, 3, 29, 0, 3, 11, 22, 8]  # random order, one repeat, across files/groups/shards
    with make_layout(name, written / name, TINY).reader() as reader:
        got = reader.read(order)
        scanned = [s for batch in reader.scan(7) for s in batch]
    assert [g.key for g in got] == [samples[i].key for i in order]
    for g, i in zip(got, order):
        assert g.jpeg == samples[i].jpeg  # byte-exact
        assert g.equals(samples[i])
    assert len(scanned) == len(samples)
    assert all(a.equals(b) for a, b in zip(scanned, samples))
    usage = disk_usage(written / name)
    assert usage["files"] >= 1 and usage["bytes_apparent"] >= sum(len(s.jpeg) for s in samples)
    if name == "files":
        assert usage["files"] == 4 * len(samples)


def test_fs_phase_counts_ops(tmp_path):
    calls = []
    result = run_fs_phase(tmp_path, files=50, dirs=4, file_size=512, client=2, barrier=calls.append)
    assert calls == list(PHASES)
    assert [result["phases"][p]["ops"] for p in PHASES] == [50, 50, 50, 50]
    assert all(result["phases"][p]["ops_per_s"] > 0 for p in PHASES)
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == [f"dir-{i:05d}" for i in range(4)]
    assert all(not any(d.iterdir()) for d in tmp_path.iterdir())  # remove phase removed every file
    agg = aggregate_phases([result, result])
    assert agg["create"]["ops"] == 100


def test_file_barrier_releases_when_all_arrive_and_times_out_otherwise(tmp_path):
    other = FileBarrier(tmp_path, clients=2, client=1)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "client-0001").touch()  # the peer already arrived
    FileBarrier(tmp_path, clients=2, client=0)("p")
    lonely = FileBarrier(tmp_path, clients=3, client=0, timeout_s=0.1)
    lonely("q")
    assert lonely.timeouts == ["q"] and other.timeouts == []


def test_parse_strace_counts_only_between_markers():
    lines = [
        '100 openat(AT_FDCWD, "/usr/lib/x.so", O_RDONLY) = 3',
        f'100 newfstatat(AT_FDCWD, "{MARKER_DIR}/random-begin", 0x7f, 0) = -1 ENOENT',
        '100 openat(AT_FDCWD, "/d/a.jpg", O_RDONLY) = 3',
        '[pid   101] openat(AT_FDCWD, "/d/b", O_RDONLY <unfinished ...>',
        '100 close(3)                          = 0',
        '[pid   101] <... openat resumed>) = 4',
        f'100 newfstatat(AT_FDCWD, "{MARKER_DIR}/random-end", 0x7f, 0) = -1 ENOENT',
        f'100 newfstatat(AT_FDCWD, "{MARKER_DIR}/scan-begin", 0x7f, 0) = -1 ENOENT',
        '100 getdents64(3, 0x5 /* 4 entries */, 32768) = 112',
        f'100 newfstatat(AT_FDCWD, "{MARKER_DIR}/scan-end", 0x7f, 0) = -1 ENOENT',
        '100 close(4) = 0',
    ]
    counts = parse_strace(lines)
    assert counts["random"] == {"openat": 2, "close": 1}
    assert counts["scan"] == {"getdents64": 1}


@pytest.mark.parametrize("method", ["strace", "audit"])
def test_syscall_counter_sees_reads(method, written):
    if method == "strace" and not strace_usable():
        pytest.skip("strace missing or not permitted here")
    order = [5, 1, 20, 13]
    files = count_read_syscalls("files", written / "files", TINY, order, batch_size=2, method=method)
    # One open per modality file of each sample read, whichever counter.
    assert files["random"]["samples"] == 4 and files["random"]["opens_per_sample"] == 4.0
    assert files["scan"]["samples"] == 30 and files["scan"]["per_sample"] >= 4.0
    if method == "strace":
        assert files["method"] == "strace"
        packed = count_read_syscalls("deeplake", written / "deeplake", TINY, order, batch_size=2, method=method)
        # Deep Lake opens its chunk files natively: only strace sees them.
        assert packed["random"]["total"] > 0 and packed["random"]["opens_per_sample"] > 0
    else:
        assert files["method"].startswith("audit-hook")


def test_run_benchmark_writes_reports(tmp_path):
    cfg = tiny_config(tmp_path, **{"syscalls.method": "audit", "layouts": "[files,deeplake,parquet,webdataset]"})
    result, paths = run_benchmark(cfg)
    data = json.loads(paths["json"].read_text())
    assert set(data["aggregate"]["dataset"]) == set(LAYOUTS)
    for name, row in data["aggregate"]["dataset"].items():
        assert row["write"]["samples"] == 24 and row["random"]["samples"] == 16 and row["scan"]["samples"] == 24
        assert row["syscalls"]["random"]["samples"] == 8
    assert data["aggregate"]["fs"]["stat"]["ops"] == 40
    assert data["stamp"]["filesystem"]["type"] not in ("", "unknown") and data["stamp"]["host"]
    md = paths["markdown"].read_text()
    assert "| deeplake |" in md and "| create |" in md and data["stamp"]["filesystem"]["type"] in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any((tmp_path / "data").glob("client-*"))  # data removed unless keep=true


@pytest.mark.slurm
def test_parallel_mode_on_slurm(tmp_path, slurm_cluster):  # noqa: F811
    cfg = tiny_config(
        tmp_path, mode="slurm", clients=2, layouts="[files,deeplake]", **{"syscalls.enabled": "false"},
        **{"slurm.timeout_min": 5, "slurm.mem_gb": 1, "barrier_timeout_s": 120},
    )
    result, paths = run_benchmark(cfg)
    assert [r["client"] for r in result["client_results"]] == [0, 1]
    assert all(r["node"] for r in result["client_results"])  # ran as Slurm tasks
    assert result["barrier_timeouts"] == []  # both clients ran each phase concurrently
    fs = result["aggregate"]["fs"]
    assert fs["create"]["ops"] == 80 and fs["remove"]["ops"] == 80
    assert result["aggregate"]["dataset"]["deeplake"]["random"]["samples"] == 32
    assert paths["markdown"].exists() and "Per-client spread" in paths["markdown"].read_text()
