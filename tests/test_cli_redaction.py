"""Credentials given to the download stage (cookies file, proxy) never reach the run dir or the logs; launch
validation (launcher=slurm without sbatch) fails before anything is written."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from pipeline.cli import redacted

PASSWORD = "s3cr3tpass"
PROXY = f"http://someuser:{PASSWORD}@127.0.0.1:9"   # nothing listens on port 9: every proxied request fails
COOKIE_VALUE = "cookievalue-7f3a9"


def test_redacted_masks_secrets_only():
    cfg = {"stage": {"cookies_file": "/home/me/cookies.txt", "proxy": "http://user:pw@proxy:3128", "retries": 3,
                     "nested": {"api_token": "abc"}}, "run_dir": "/r", "proxy": None}
    out = redacted(cfg)
    assert out["stage"]["cookies_file"] == "***" and out["stage"]["proxy"] == "***"
    assert out["stage"]["nested"]["api_token"] == "***"
    assert out["stage"]["retries"] == 3 and out["run_dir"] == "/r" and out["proxy"] is None


def test_slurm_payload_carries_no_secrets(monkeypatch):
    """What is pickled for Slurm holds env references; the task resolves them from the environment sbatch copies."""
    import pickle

    from pipeline.config import compose, from_container
    from pipeline.engine import container
    from pipeline.launchers.slurm import ShardTask, secretless, secrets_in_environ

    monkeypatch.setenv("VPT_PROXY", PROXY)
    cfg = compose(["stage=download", "run_dir=/tmp/r", "stage.cookies_file=/home/me/cookies.txt"])
    payload, env = secretless(container(cfg))
    blob = pickle.dumps(ShardTask(payload))
    assert PASSWORD.encode() not in blob and b"/home/me/cookies.txt" not in blob
    assert set(env.values()) == {PROXY, "/home/me/cookies.txt"}
    monkeypatch.delenv("VPT_PROXY")
    with secrets_in_environ(env):
        inside = from_container(payload)
    assert inside.stage.proxy == PROXY and inside.stage.cookies_file == "/home/me/cookies.txt"
    assert not any(k in os.environ for k in env)  # gone again after submission
    with pytest.raises(Exception, match="VPT_SECRET_STAGE_.* not found"):  # without them a task fails, not runs bare
        from_container(payload)


def _secrets_setup(tmp_path: Path, media_server, shared_media) -> tuple[Path, Path, bytes]:
    m = tmp_path / "m.txt"
    m.write_text(f"counter {shared_media / 'counter.mp4'}\nweb {media_server.url('v0.mp4')}\n")
    cookies = tmp_path / "private" / "cookies.txt"
    cookies.parent.mkdir()
    original = (b"# Netscape HTTP Cookie File\n# exported by hand\n"
                b"127.0.0.1\tFALSE\t/\tFALSE\t2147483647\tsid\t" + COOKIE_VALUE.encode() + b"\n")
    cookies.write_bytes(original)
    return m, cookies, original


def _assert_no_secret_in(run: Path, cookies: Path) -> None:
    """Every file under the run dir, as bytes (pickles, Parquet, logs...), and Parquet decoded too."""
    import pyarrow.parquet as pq

    needles = [PASSWORD.encode(), b"someuser", str(cookies).encode(), COOKIE_VALUE.encode()]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        if p.suffix == ".parquet":
            data += str(pq.read_table(p).to_pylist()).encode()
        for needle in needles:
            assert needle not in data, (p, needle)


def _assert_proxy_was_used(run: Path) -> None:
    """The web item failed at the (dead) proxy: the proxy reached yt-dlp; the local file did not need it."""
    import pyarrow.parquet as pq

    rows = {r["video_id"]: r for p in run.glob("download/shard-*/ledger.parquet") for r in pq.read_table(p).to_pylist()}
    assert rows["counter"]["status"] == "ok"
    assert rows["web"]["status"] == "failed" and rows["web"]["reason"].startswith("network:"), rows["web"]


@pytest.mark.parametrize("via", ["overrides", "environment"])
def test_proxy_and_cookies_not_written(tmp_path, media_server, shared_media, via):
    m, cookies, original = _secrets_setup(tmp_path, media_server, shared_media)
    run = tmp_path / "run"
    env = {"no_proxy": "", "NO_PROXY": "", "TMPDIR": str(tmp_path)}
    args = ["stage=download", f"run_dir={run}", f"input={m}", "num_shards=1", "stage.max_attempts=2",
            "stage.backoff_s=0.01", "stage.retries=0", "stage.socket_timeout_s=2"]
    if via == "overrides":
        args += [f"stage.proxy={PROXY}", f"stage.cookies_file={cookies}"]
    else:
        env.update(VPT_PROXY=PROXY, VPT_COOKIES_FILE=str(cookies))
    run_cli(*args, env=env)
    _assert_proxy_was_used(run)
    _assert_no_secret_in(run, cookies)
    assert "***" in (run / "download" / "config.yaml").read_text()
    assert cookies.read_bytes() == original
    assert list(tmp_path.glob("vpt-cookies-*")) == []


def test_slurm_without_sbatch_fails_before_writing(tmp_path, shared_media):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    m = tmp_path / "m.txt"
    m.write_text(f"counter {shared_media / 'counter.mp4'}\n")
    run = tmp_path / "run"
    proc = run_cli("stage=download", f"run_dir={run}", f"input={m}", "launcher=slurm", env={"PATH": str(bin_dir)},
                   check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "sbatch is not on PATH" in proc.stderr, proc.stderr
    assert not run.exists()


@pytest.mark.slurm
def test_secrets_not_written_on_slurm(tmp_path, media_server, shared_media, slurm_cluster):
    """The same on the Slurm launcher: submitit's pickles in logs/slurm/ hold no secret, and the task still gets
    the proxy (from the environment) and the cookies file (from an override)."""
    m, cookies, original = _secrets_setup(tmp_path, media_server, shared_media)
    run = tmp_path / "run"
    env = {**slurm_cluster.env, "no_proxy": "", "NO_PROXY": "", "VPT_PROXY": PROXY}
    run_cli("stage=download", f"run_dir={run}", f"input={m}", "num_shards=1", "launcher=slurm",
            f"stage.cookies_file={cookies}", "stage.max_attempts=1", "stage.retries=0", "stage.socket_timeout_s=2",
            "stage.resources.cpus=1", "stage.resources.mem_gb=0.5", "stage.resources.timeout_min=10",
            "cluster.partition=main", "launcher.poll_seconds=0.5", env=env)
    assert list((run / "download" / "logs" / "slurm").glob("*.pkl"))
    _assert_proxy_was_used(run)
    _assert_no_secret_in(run, cookies)
    assert cookies.read_bytes() == original
