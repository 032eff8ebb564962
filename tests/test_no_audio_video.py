"""Videos without an audio stream reach the dataset as visual-only rows: every stage (the engine, tiny models),
real media, real Deep Lake, then `python -m pipeline verify`.

The oracle is ffprobe: the test media have no audio stream, and where each one ends on the container timeline
(counter.mp4 0 -> 3.0 s; delayed_start.mp4 starts at 1.075 s and ends at 2.035 s) fixes the windows the rows must
tile, and the frames stage's own table fixes the frames they must hold.
"""
from __future__ import annotations

import json
import subprocess

import deeplake
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from pipeline.stages.ingest import dataset_url

WINDOW_S = 1.0
STAGES = ("download", "frames", "asr", "clip", "audio", "scenegraph", "ingest")


def ffprobe_streams(path) -> list[dict]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,start_time,duration",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["streams"]


@pytest.fixture(scope="module")
def run(shared_media, cache_dir, tmp_path_factory):
    """download and ingest through the CLI (pins the run; joins, writes, records its config), the model stages'
    shard with the engine in this process (one import of the models' libraries)."""
    from pipeline.config import compose
    from pipeline.engine import run_shard

    media = {"counter": shared_media / "counter.mp4", "delayed": shared_media / "delayed_start.mp4"}
    root = tmp_path_factory.mktemp("no-audio")
    manifest = root / "manifest.txt"
    manifest.write_text("".join(f"{vid} {path}\n" for vid, path in media.items()))
    run_dir = root / "run"
    run_cli("stage=download", "launcher=local", f"run_dir={run_dir}", "models=tiny", f"input={manifest}",
            env={"VPT_CACHE_DIR": str(cache_dir)})
    for stage in STAGES[1:-1]:
        cfg = compose([f"stage={stage}", f"run_dir={run_dir}", "models=tiny", f"cache_dir={cache_dir}",
                       "stage.runner.backend=inline"] if stage != "frames" else
                      [f"stage={stage}", f"run_dir={run_dir}", "models=tiny"])
        run_shard(cfg, 0)
    run_cli("stage=ingest", "launcher=local", f"run_dir={run_dir}", "models=tiny", f"stage.window_s={WINDOW_S}")
    return run_dir, media


def ledger(run_dir, stage):
    return {r["video_id"]: r for r in pq.read_table(run_dir / stage / "shard-00000" / "ledger.parquet").to_pylist()}


def test_media_have_no_audio_stream(run):
    _, media = run
    for path in media.values():
        assert [s["codec_type"] for s in ffprobe_streams(path)] == ["video"]


def test_visual_only_rows_with_windows_and_every_frame(run):
    run_dir, media = run
    for stage in STAGES:
        rows = ledger(run_dir, stage)
        assert set(rows) == set(media) and all(r["status"] == "ok" for r in rows.values()), (stage, rows)
    assert all(r["note"] == "no_audio" for r in ledger(run_dir, "asr").values())
    assert all(r["note"] == "no_audio" for r in ledger(run_dir, "audio").values())
    ds = deeplake.open_read_only(dataset_url({"dataset_path": None}, run_dir))
    n = len(ds)
    cols = {c: ds[c][0:n] for c in ("video_id", "segment_idx", "start", "end", "is_speech", "has_audio", "flags",
                                     "frame_idx", "frame_pts", "text")}
    rows = [{c: cols[c][i] for c in cols} for i in range(n)]
    keys = [(str(r["video_id"]), int(r["segment_idx"])) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    frames = pq.read_table(run_dir / "frames" / "shard-00000" / "frames.parquet").to_pylist()
    for vid, path in media.items():
        (video,) = ffprobe_streams(path)
        end = float(video["start_time"]) + float(video["duration"])
        mine = sorted((r for r in rows if r["video_id"] == vid), key=lambda r: int(r["segment_idx"]))
        assert [int(r["segment_idx"]) for r in mine] == list(range(len(mine))) and mine
        spans = [(float(r["start"]), float(r["end"])) for r in mine]
        assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(end, abs=1e-3), (vid, spans, end)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans           # contiguous
        assert all(b - a == pytest.approx(WINDOW_S) for a, b in spans[:-1])         # full windows but the last
        assert WINDOW_S <= spans[-1][1] - spans[-1][0] < 2 * WINDOW_S or len(spans) == 1
        for r in mine:
            assert not bool(r["has_audio"]) and not bool(r["is_speech"]) and not r["text"]
            assert "no_audio_stream" in str(r["flags"]).split(",")
        # every frame the frames stage sampled is in the row whose window holds its PTS (once); a window without
        # one borrows the nearest (flag nearest_frame: delayed_start.mp4 shows nothing before 1.075 s)
        want = sorted((int(f["frame_idx"]), float(f["pts"])) for f in frames if f["video_id"] == vid)
        inside = [r for r in mine if "nearest_frame" not in str(r["flags"])]
        got = sorted((int(i), float(p)) for r in inside for i, p in zip(r["frame_idx"], r["frame_pts"]))
        assert want and got == want
        for r in inside:
            assert all(float(r["start"]) - 1e-3 <= float(p) < float(r["end"]) for p in r["frame_pts"])
        for r in mine:
            if r not in inside:
                assert len(r["frame_idx"]) == 1 and (int(r["frame_idx"][0]), float(r["frame_pts"][0])) in want
    audio = pq.read_table(run_dir / "audio" / "shard-00000" / "videos.parquet").to_pylist()
    assert {r["video_id"]: r["has_audio"] for r in audio} == {vid: False for vid in media}
    proc = run_cli(f"run_dir={run_dir}", module="pipeline.verify", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
