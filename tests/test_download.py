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

from pipeline.stages.download import classify

FAST = ["stage.socket_timeout_s=1.5", "stage.max_attempts=2", "stage.backoff_s=0.1", "stage.retries=0"]


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
