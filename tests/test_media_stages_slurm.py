"""frames and asr on the real sample media, through the real local Slurm: the array tasks' outputs equal a local
run's, bad input is recorded the same way, and a second launch submits nothing."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = ["launcher=slurm", "stage.resources.cpus=2", "stage.resources.mem_gb=2", "stage.resources.timeout_min=15",
         "cluster.partition=main", "launcher.poll_seconds=0.5"]
MEDIA = ("counter.mp4", "delayed_start.mp4", "fades.mp4", "speech_cuts_1080p.mp4", "speech_lecture.mp3")


def _table(run: Path, stage: str, table: str, key: list[str], drop: tuple[str, ...] = ()) -> list[dict]:
    paths = sorted((run / stage).glob(f"shard-*/{table}.parquet"))
    assert paths, f"no {stage}/{table} output under {run}"
    rows = []
    for p in paths:
        rows += pq.read_table(p).to_pylist()
    rows.sort(key=lambda r: tuple(r[k] for k in key))
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_frames_and_asr_on_slurm_match_local(tmp_path, shared_media, cache_dir, slurm_cluster):
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("".join(f"{name.split('.')[0]} {shared_media / name}\n" for name in MEDIA))
    env = {"VPT_CACHE_DIR": str(cache_dir)}
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    run_cli("stage=download", f"run_dir={local}", f"input={manifest}", "num_shards=2", "models=tiny", env=env)
    shutil.copytree(local, slurm)
    for stage in ("frames", "asr"):
        run_cli(f"stage={stage}", f"run_dir={local}", "models=tiny", env=env)
        out = run_cli(f"stage={stage}", f"run_dir={slurm}", "models=tiny", *SLURM,
                      env={**slurm_cluster.env, **env}).stdout
        assert "submitted 2 array task(s)" in out, out

    timing = ("seconds", "attempts", "updated_at", "started_at", "finished_at")
    for stage in ("frames", "asr"):
        ledger = _table(slurm, stage, "ledger", ["video_id"], drop=timing)
        assert ledger == _table(local, stage, "ledger", ["video_id"], drop=timing)
        assert {r["video_id"] for r in ledger} == {name.split(".")[0] for name in MEDIA}
    frames = _table(slurm, "frames", "frames", ["video_id", "frame_idx"])
    assert frames == _table(local, "frames", "frames", ["video_id", "frame_idx"])  # JPEG bytes included
    assert {r["video_id"] for r in frames} == {"counter", "delayed_start", "fades", "speech_cuts_1080p"}
    assert min(r["pts"] for r in frames if r["video_id"] == "delayed_start") >= 1.075 - 1e-3
    segments = _table(slurm, "asr", "segments", ["video_id", "segment_idx"])
    assert segments == _table(local, "asr", "segments", ["video_id", "segment_idx"])
    assert {"speech_lecture", "speech_cuts_1080p"} <= {r["video_id"] for r in segments}

    # The audio-only file is a recorded frames failure, not a dead shard; asr transcribed it.
    frames_ledger = {r["video_id"]: r for r in _table(slurm, "frames", "ledger", ["video_id"])}
    assert frames_ledger["speech_lecture"]["status"] == "failed"
    assert frames_ledger["speech_lecture"]["reason"].startswith("no_video_stream")

    again = run_cli("stage=frames", f"run_dir={slurm}", "models=tiny", *SLURM, env={**slurm_cluster.env, **env})
    assert "0 of 2 shard(s) to run" in again.stdout and "submitted" not in again.stdout
