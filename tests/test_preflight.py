"""Launch preflight: Slurm unreachable, run dir read-only or without room -> one line, exit 2, nothing written."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

from pipeline.errors import ConfigError


def _fake_slurm(bin_dir: Path, sinfo: str, squeue: str = "exit 0") -> dict:
    """sbatch installed, sinfo/squeue behaving as given (shell bodies)."""
    bin_dir.mkdir()
    for name, body in (("sbatch", "echo 'Submitted batch job 1'"), ("sinfo", sinfo), ("squeue", squeue),
                       ("scontrol", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _manifest(tmp_path: Path) -> Path:
    m = tmp_path / "m.txt"
    m.write_text("a /x/a.mp4\nb /x/b.mp4\n")
    return m


def _one_line_exit_2(proc, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


DOWN = "echo 'slurm_load_partitions: Unable to contact slurm controller (connect failure)' >&2; exit 1"


@pytest.mark.parametrize("sinfo,squeue,message", [
    (DOWN, "exit 0", "Unable to contact slurm controller"),
    ("exit 0", "echo 'squeue: error: Invalid user' >&2; exit 1", "squeue"),
    ("sleep 30", "exit 0", "did not answer within 1s"),
])
def test_slurm_unreachable_is_one_line_and_nothing_is_pinned(tmp_path, sinfo, squeue, message):
    env = _fake_slurm(tmp_path / "bin", sinfo, squeue)
    run = tmp_path / "run"
    proc = run_cli("stage=download", "launcher=slurm", "launcher.preflight_timeout_s=1", f"run_dir={run}",
                   f"input={_manifest(tmp_path)}", "num_shards=4", env=env, check=False, timeout=120)
    _one_line_exit_2(proc, message)
    assert "Slurm is not reachable" in proc.stderr
    assert not run.exists()  # no manifest, no geometry.json pinned


def test_require_slurm_unit(tmp_path, monkeypatch):
    from pipeline.launchers.slurm import require_slurm

    env = _fake_slurm(tmp_path / "bin", DOWN)
    monkeypatch.setenv("PATH", env["PATH"])
    with pytest.raises(ConfigError, match=r"sinfo -h -o %P` failed \(exit 1\): slurm_load_partitions"):
        require_slurm(5)
    (tmp_path / "bin" / "sinfo").write_text("#!/bin/sh\nexit 0\n")
    require_slurm(5)  # the controller answers


def test_run_dir_without_room_is_refused_before_anything_is_written(tmp_path):
    m = _manifest(tmp_path)
    run = tmp_path / "run"
    proc = run_cli("stage=download", f"run_dir={run}", f"input={m}", "min_free_gb=1e9", check=False, timeout=120)
    _one_line_exit_2(proc, "GB free on its filesystem")
    assert not run.exists()
    # an existing run: nothing is added to it either (no config, no temp file)
    run_cli("stage=download", f"run_dir={run}", f"input={m}", "shards=[]", timeout=120)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    proc = run_cli("stage=download", f"run_dir={run}", "min_free_gb=1e9", check=False, timeout=120)
    _one_line_exit_2(proc, "GB free on its filesystem")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only directory: a read-only tmpfs when root (root writes through permission bits), else mode 555."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("root without permission to mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_run_dir_is_one_line_and_leaves_nothing(tmp_path, read_only_dir):
    run = read_only_dir / "run"
    proc = run_cli("stage=download", f"run_dir={run}", f"input={_manifest(tmp_path)}", check=False, timeout=120)
    _one_line_exit_2(proc, "run_dir")
    assert "read-only" in proc.stderr or "not writable" in proc.stderr
    assert list(read_only_dir.iterdir()) == []


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from pipeline import atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(tmp_path / "config.yaml", "x: 1\n")
    import pyarrow as pa

    with pytest.raises(OSError, match="No space"):
        atomic.write_parquet(tmp_path / "t.parquet", pa.table({"x": [1]}))
    assert list(tmp_path.iterdir()) == []
