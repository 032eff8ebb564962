"""download stage through real yt-dlp against a real HTTP server on 127.0.0.1 (no mocks)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
from conftest import REPO, run_cli

from pipeline.stages.download import DownloadConfig, DownloadStage, _Guard, _private_copy, _scrubber, classify

FAST = ["stage.socket_timeout_s=1.5", "stage.max_attempts=2", "stage.backoff_s=0.1", "stage.retries=0",
        "stage.rate_limited_backoff_s=0.1"]


def _manifest(path: Path, server, good=range(7), missing=("gone1", "gone2"), slow=("v9",)) -> Path:
    lines = [f"v{i} {server.url(f'v{i}.mp4')}" for i in good]
    lines += [f"{m} {server.url(m + '.mp4')}" for m in missing]
    lines += [f"{s}slow {server.url(f'slow/{s}.mp4')}" for s in slow]
    path.write_text("\n".join(lines) + "\n")
    return path


def _table(run: Path, stage: str, name: str):
    import pyarrow as pa

    parts = sorted((run / stage).glob(f"shard-*/{name}.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("video_id").to_pylist()


def test_reason_classification():
    assert classify("ERROR: Unable to download webpage: HTTP Error 404: Not Found") == "not_found"
    assert classify("HTTP Error 429: Too Many Requests") == "rate_limited"
    assert classify("ERROR: [youtube] x: Private video. Sign in if you've been granted access") == "private"
    assert classify("The uploader has not made this video available in your country") == "geo_blocked"
    assert classify("ERROR: [youtube] abc: Video unavailable") == "unavailable"
    assert classify("Read timed out. (read timeout=1.0)") == "timeout"
    assert classify("HTTP Error 503: Service Unavailable") == "server_error"
    assert classify("something new") == "error"


def test_download_ok_and_failures_recorded(tmp_path, media_server):
    run = tmp_path / "run"
    m = _manifest(tmp_path / "m.txt", media_server)
    run_cli("stage=download", f"run_dir={run}", f"input={m}", "num_shards=3", "stage.max_files_per_dir=2", *FAST)
    ledger = {r["video_id"]: r for r in _table(run, "download", "ledger")}
    assert len(ledger) == 10
    assert {v for v, r in ledger.items() if r["status"] == "ok"} == {f"v{i}" for i in range(7)}
    assert ledger["gone1"]["reason"].startswith("not_found:") and ledger["gone2"]["reason"].startswith("not_found:")
    assert ledger["v9slow"]["reason"].startswith("timeout:")
    videos = {r["video_id"]: r for r in _table(run, "download", "videos")}
    for vid, row in videos.items():
        p = Path(row["path"])
        assert p.is_file() and p.stat().st_size == row["filesize"] > 0
        assert p.name == f"{vid}.mp4" and row["duration"] and row["duration"] > 0
    # No media directory holds more than max_files_per_dir files, and no temp dirs are left behind.
    for d in (run / "media" / "videos").rglob("*"):
        if d.is_dir():
            assert len([f for f in d.iterdir() if f.is_file()]) <= 2
            assert not d.name.startswith(".tmp-")
    status = run_cli("status", f"run_dir={run}").stdout
    assert "download" in status and "failed: not_found x2" in status and "failed: timeout x1" in status

    # Re-run: complete shards are skipped, nothing changes.
    before = {p: p.stat().st_mtime_ns for p in (run / "download").glob("shard-*/*.parquet")}
    out = run_cli("stage=download", f"run_dir={run}", *FAST).stdout
    assert "0 of 3 shard(s) to run" in out
    assert before == {p: p.stat().st_mtime_ns for p in (run / "download").glob("shard-*/*.parquet")}

    # retry_failed re-does only the failed items: the missing files appear on the server, the slow one stays slow.
    served_dir = media_server.root
    for name in ("gone1", "gone2"):
        (served_dir / f"{name}.mp4").write_bytes((served_dir / "v0.mp4").read_bytes())
    try:
        run_cli("stage=download", f"run_dir={run}", "retry_failed=true", *FAST)
    finally:
        for name in ("gone1", "gone2"):
            (served_dir / f"{name}.mp4").unlink()
    after = {r["video_id"]: r for r in _table(run, "download", "ledger")}
    assert after["gone1"]["status"] == "ok" and after["gone1"]["attempts"] == 2
    assert after["v9slow"]["status"] == "failed" and after["v9slow"]["attempts"] == 2
    assert all(after[f"v{i}"]["attempts"] == 1 for i in range(7))  # ok items were not redone
    assert len(_table(run, "download", "videos")) == 9


def test_local_paths_and_file_urls(tmp_path, shared_media):
    run = tmp_path / "run"
    m = tmp_path / "m.txt"
    m.write_text(f"{shared_media / 'counter.mp4'}\nfades file://{shared_media / 'fades.mp4'}\n"
                 f"nothere {tmp_path / 'nothere.mp4'}\n")
    run_cli("stage=download", f"run_dir={run}", f"input={m}", "num_shards=1")
    ledger = {r["video_id"]: r for r in _table(run, "download", "ledger")}
    assert ledger["counter"]["status"] == "ok" and ledger["fades"]["status"] == "ok"
    assert ledger["nothere"]["reason"].startswith("not_a_file:")
    videos = {r["video_id"]: r for r in _table(run, "download", "videos")}
    assert Path(videos["counter"]["path"]) == (shared_media / "counter.mp4").resolve()
    assert videos["counter"]["source"] == "local"


def test_kill_9_mid_shard_then_resume_is_identical(tmp_path, media_server):
    """A worker killed with SIGKILL in the middle of a shard loses at most its unflushed items; the re-run
    completes the shard and the outputs equal those of an uninterrupted run (no duplicates, nothing lost)."""
    m = tmp_path / "m.txt"
    # Slow items (each stalls ~1.5 s, then times out) make "the middle of a shard" easy to hit.
    m.write_text("\n".join([f"v{i} {media_server.url(f'v{i}.mp4')}" for i in range(6)] +
                           [f"s{i} {media_server.url(f'slow/v{i}.mp4')}" for i in range(4)]) + "\n")
    args = ["num_shards=1", "stage.flush_every=1", "stage.socket_timeout_s=1", "stage.max_attempts=1",
            "stage.retries=0"]
    reference = tmp_path / "reference"
    run_cli("stage=download", f"run_dir={reference}", f"input={m}", *args)

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "stage=download", f"run_dir={run}", f"input={m}",
                             *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = run / "download" / "shard-00000" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.ledger.parquet"))) < 3:
        time.sleep(0.05)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "python" in c.name()]
    assert workers, "no worker process found"
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not (run / "download" / "shard-00000" / "_SUCCESS").exists()
    n_parts = len(list(parts.glob("*.ledger.parquet")))
    assert 3 <= n_parts < 10

    run_cli("stage=download", f"run_dir={run}", *args)
    got, want = _table(run, "download", "ledger"), _table(reference, "download", "ledger")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(got) == strip(want)
    gv, wv = _table(run, "download", "videos"), _table(reference, "download", "videos")
    assert [r["video_id"] for r in gv] == [r["video_id"] for r in wv] == [f"v{i}" for i in range(6)]
    for a, b in zip(gv, wv):
        assert Path(a["path"]).read_bytes() == Path(b["path"]).read_bytes()
        assert {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}


def _stage(tmp_path, **cfg):
    from omegaconf import OmegaConf

    from pipeline.stages.base import RunContext

    conf = OmegaConf.merge(OmegaConf.structured(DownloadConfig), cfg)
    ctx = RunContext(run_dir=tmp_path, shard=0, models="tiny", cache_dir=tmp_path, device="cpu", log=lambda m: None)
    return DownloadStage(conf, ctx)


def test_http_status_reasons_recorded(tmp_path, media_server):
    """403 / 429 / 500 from a real server: the ledger reason, attempts and the backoff a 429 costs."""
    run = tmp_path / "run"
    m = tmp_path / "m.txt"
    m.write_text("".join(f"s{code} {media_server.url(f'status/{code}.mp4')}\n" for code in (403, 429, 500)))
    run_cli("stage=download", f"run_dir={run}", f"input={m}", "num_shards=1", "stage.max_attempts=2",
            "stage.retries=0", "stage.backoff_s=0.05", "stage.rate_limited_backoff_s=0.2", "stage.jitter=0")
    ledger = {r["video_id"]: r for r in _table(run, "download", "ledger")}
    assert ledger["s403"]["status"] == ledger["s429"]["status"] == ledger["s500"]["status"] == "failed"
    assert ledger["s403"]["reason"].startswith("forbidden:"), ledger["s403"]
    assert ledger["s429"]["reason"].startswith("rate_limited:"), ledger["s429"]
    assert ledger["s500"]["reason"].startswith("server_error:"), ledger["s500"]
    # Two 429s in a row: 0.2 s, then 0.4 s of backoff (the second applies although no retry is left).
    assert ledger["s429"]["seconds"] >= 0.6
    assert all(r["attempts"] == 1 for r in ledger.values())  # attempts counts runs of the item, not retries


def test_pacing_after_every_attempt(tmp_path, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("pipeline.stages.download.time.sleep", slept.append)
    stage = _stage(tmp_path, sleep_between_s=0.5, backoff_s=1.0, rate_limited_backoff_s=10.0, max_backoff_s=35.0,
                   jitter=0.0)
    stage._pause("ok", None)
    stage._pause("not_found", None)
    stage._pause("timeout", 0)           # before retry 1
    stage._pause("timeout", 1)           # before retry 2
    stage._pause("rate_limited", 0)
    stage._pause("rate_limited", None)   # consecutive 429s keep doubling, retry or not
    stage._pause("rate_limited", None)
    stage._pause("ok", None)             # a normal answer resets the 429 streak
    stage._pause("rate_limited", None)
    assert slept == [0.5, 0.5, 1.5, 2.5, 10.5, 20.5, 35.5, 0.5, 10.5]
    slept.clear()
    stage.cfg.jitter = 0.5
    for _ in range(20):
        stage._pause("ok", None)
    assert all(0.5 <= s <= 0.75 for s in slept) and len(set(slept)) > 1


def test_guards_refuse_live_long_and_large():
    guard = _Guard(max_duration_s=3600, max_bytes=1000)
    assert guard.match_filter({"duration": 60, "filesize": 999}) is None and guard.refused is None
    assert guard.match_filter({"duration": 60, "filesize": 5000}, incomplete={"filesize"}) is None  # not selected
    for info, category in [({"is_live": True}, "live"), ({"live_status": "is_upcoming"}, "live"),
                           ({"duration": 7200.0}, "too_long"), ({"filesize_approx": 5000}, "too_large")]:
        g = _Guard(max_duration_s=3600, max_bytes=1000)
        assert g.match_filter(info).startswith(category + ": ") and g.refused[0] == category
    g = _Guard(max_duration_s=None, max_bytes=1000)
    g.progress({"filename": "a.f1.mp4", "downloaded_bytes": 600})
    try:
        g.progress({"filename": "a.f2.m4a", "downloaded_bytes": 100, "total_bytes": 500})
        raise AssertionError("no refusal")
    except Exception as exc:  # noqa: BLE001 - _Refused
        assert type(exc).__name__ == "_Refused" and g.refused[0] == "too_large"
    assert _Guard(None, None).match_filter({"duration": 10 ** 6, "filesize": 10 ** 12}) is None


def test_too_large_over_http(tmp_path, media_server):
    run = tmp_path / "run"
    m = tmp_path / "m.txt"
    m.write_text(f"v0 {media_server.url('v0.mp4')}\n")
    run_cli("stage=download", f"run_dir={run}", f"input={m}", "num_shards=1", "stage.max_filesize=10K", *FAST)
    (row,) = _table(run, "download", "ledger")
    assert row["status"] == "failed" and row["reason"].startswith("too_large:"), row
    assert not list((run / "media").rglob("*.mp4"))


def test_stale_temp_dirs_of_killed_workers_removed(tmp_path, media_server):
    run = tmp_path / "run"
    m = tmp_path / "m.txt"
    m.write_text(f"v0 {media_server.url('v0.mp4')}\nv0-x {media_server.url('v1.mp4')}\n")
    bucket = run / "media" / "videos" / "shard-00000" / "000"
    planted = [bucket / ".tmp-v0-4242424", bucket / ".tmp-v0-x-77"]   # partial downloads of dead pids
    for d in planted:
        d.mkdir(parents=True)
        (d / "video.mp4.part").write_bytes(b"partial")
    other = bucket / ".tmp-notanitem-1"
    other.mkdir()
    run_cli("stage=download", f"run_dir={run}", f"input={m}", "num_shards=1", *FAST)
    assert {r["status"] for r in _table(run, "download", "ledger")} == {"ok"}
    assert not any(d.exists() for d in planted)
    assert other.exists()  # only the temp dirs of the items being started are touched
    assert sorted(p.name for p in bucket.iterdir() if not p.name.startswith(".")) == ["v0-x.mp4", "v0.mp4"]


def test_cookies_file_left_byte_identical(tmp_path, media_server):
    """yt-dlp rewrites the cookie file it is given on every close: the stage gives it a private copy."""
    cookies = tmp_path / "cookies.txt"
    original = (b"# Netscape HTTP Cookie File\n# exported by hand: yt-dlp would rewrite this header\n"
                b"127.0.0.1\tFALSE\t/\tFALSE\t2147483647\tsid\tuservalue123\n")
    cookies.write_bytes(original)
    cookies.chmod(0o644)
    before = cookies.stat()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    run = tmp_path / "run"
    m = _manifest(tmp_path / "m.txt", media_server, good=range(3), missing=("gone1",), slow=())
    run_cli("stage=download", f"run_dir={run}", f"input={m}", "num_shards=2", f"stage.cookies_file={cookies}",
            *FAST, env={"TMPDIR": str(tmp)})
    assert sum(r["status"] == "ok" for r in _table(run, "download", "ledger")) == 3
    assert cookies.read_bytes() == original and cookies.stat().st_mtime_ns == before.st_mtime_ns
    assert list(tmp.glob("vpt-cookies-*")) == []  # the private copies are removed with their task


def test_private_cookie_copy_is_0600(tmp_path, monkeypatch):
    import pytest

    from pipeline.errors import ConfigError

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    src = tmp_path / "c.txt"
    src.write_text("# Netscape HTTP Cookie File\n")
    src.chmod(0o644)
    copy = Path(_private_copy(str(src)))
    assert copy.read_bytes() == src.read_bytes() and (copy.stat().st_mode & 0o777) == 0o600
    with pytest.raises(ConfigError) as err:
        _private_copy(str(tmp_path / "missing.txt"))
    assert "missing" not in str(err.value)  # the path is a secret too
    assert list(tmp_path.glob("vpt-cookies-*")) == [copy]


def test_proxy_scrubbed_from_text():
    scrub = _scrubber("http://someuser:p%40ss%2Fw0rd@proxy.example:3128")
    text = ("Unable to connect to proxy http://someuser:p%40ss%2Fw0rd@proxy.example:3128 (auth someuser:p%40ss%2Fw0rd"
            ", p@ss/w0rd)")
    out = scrub(text)
    assert "p%40ss%2Fw0rd" not in out and "p@ss/w0rd" not in out and "proxy.example:3128" not in out, out
    assert out.startswith("Unable to connect to proxy ***")
    assert _scrubber(None)("http://a:b@c") == "http://a:b@c"
