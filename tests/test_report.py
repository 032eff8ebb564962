"""Run report: numbers from a run dir built with the engine's own shard store, plots are real PNGs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
from PIL import Image

from pipeline.manifest import Geometry, Item, pin_geometry, shard_of
from pipeline.report import read_metrics_jsonl, write_report
from pipeline.shards import FAILED, OK, SKIPPED, ShardStore

REPO = Path(__file__).resolve().parents[1]
NUM_SHARDS = 2
VIDEOS = ["vid_a", "vid_b", "vid_c", "vid_d", "vid_e"]
DURATION_S = 1200.0                     # 4 downloaded videos x 20 min = 4/3 video-hours
FAILED_DOWNLOAD = {"vid_e": "not_found: HTTP Error 404"}
FAILED_FRAMES = {"vid_d": "decode_error: invalid data found"}
CUTS_PER_MINUTE = {"vid_a": 2.0, "vid_b": 8.0, "vid_c": 5.0}
SEGMENTS = {"vid_a": 3, "vid_b": 0, "vid_c": 2}
# Per-shard task seconds, the same in each of the 2 shards.
SECONDS = {"download": 10.0, "frames": 6.0, "asr": 45.0}


def _shard(vid: str) -> int:
    return shard_of(vid, NUM_SHARDS)


def _finalize(run: Path, stage: str, ledger: dict[str, tuple[str, str]], tables: dict[str, list[dict]],
              extra_stats: dict | None = None) -> None:
    """One finalized shard store per shard, with the given ledger rows and table rows split by video's shard."""
    for shard in range(NUM_SHARDS):
        rows = [{"video_id": v, "status": s, "reason": r, "attempts": 1, "seconds": 0.1, "note": ""}
                for v, (s, r) in ledger.items() if _shard(v) == shard]
        shard_tables = {name: pa.Table.from_pylist([r for r in trows if _shard(r["video_id"]) == shard])
                        for name, trows in tables.items()}
        shard_tables = {n: t for n, t in shard_tables.items() if t.num_rows}
        processed = sum(1 for r in rows if r["status"] != SKIPPED)
        stats = {"seconds": SECONDS[stage], "processed": processed, "shard": shard, "stage": stage,
                 **(extra_stats or {})}
        ShardStore(run, stage, shard).finalize(rows, shard_tables, stats, {"stage": stage})


def _config(run: Path, stage: str, cpus: int, gpus: int) -> None:
    (run / stage / "config.yaml").write_text(
        f"stage:\n  name: {stage}\n  resources:\n    cpus: {cpus}\n    gpus: {gpus}\n    mem_gb: 8\n"
        f"    timeout_min: 60\n    nodes: 1\nlauncher:\n  name: slurm\n")


def make_download(run: Path) -> None:
    items = [Item(v, f"http://example.invalid/{v}.mp4", _shard(v)) for v in VIDEOS]
    pin_geometry(run, Geometry(NUM_SHARDS, len(items), "0" * 40), items)
    # both shards must hold videos for the test to cover merging across shards
    assert {_shard(v) for v in VIDEOS} == set(range(NUM_SHARDS))
    ledger = {v: (FAILED, FAILED_DOWNLOAD[v]) if v in FAILED_DOWNLOAD else (OK, "") for v in VIDEOS}
    videos = [{"video_id": v, "duration": DURATION_S} for v in VIDEOS if v not in FAILED_DOWNLOAD]
    _finalize(run, "download", ledger, {"videos": videos})
    _config(run, "download", cpus=2, gpus=0)


def make_full_run(run: Path) -> None:
    make_download(run)
    frames_ledger = {}
    for v in VIDEOS:
        if v in FAILED_DOWNLOAD:
            frames_ledger[v] = (SKIPPED, f"upstream_failed: download: {FAILED_DOWNLOAD[v]}")
        elif v in FAILED_FRAMES:
            frames_ledger[v] = (FAILED, FAILED_FRAMES[v])
        else:
            frames_ledger[v] = (OK, "")
    _finalize(run, "frames", frames_ledger, {"videos": [
        {"video_id": v, "duration": DURATION_S, "cuts_per_minute": c, "low_cut": c < 3, "fallback": False}
        for v, c in CUTS_PER_MINUTE.items()]})
    _config(run, "frames", cpus=4, gpus=0)
    asr_ledger = {v: (OK, "") if v in SEGMENTS else
                  (SKIPPED, f"upstream_failed: download: {FAILED_DOWNLOAD[v]}") if v in FAILED_DOWNLOAD else
                  (OK, "") for v in VIDEOS}
    segments = [{"video_id": v, "segment_idx": i, "text": "hi"} for v, n in SEGMENTS.items() for i in range(n)]
    _finalize(run, "asr", asr_ledger, {"segments": segments}, {"model_busy_fraction": 0.75})
    _config(run, "asr", cpus=8, gpus=2)

    pre = run / "pretrain"
    pre.mkdir()
    lines = [{"step": s, "time": 1000.0 + s, "loss": 10.0 / s} for s in range(1, 21)]
    lines[9]["eval_loss"] = 2.5
    lines[19]["eval_loss"] = 1.25
    (pre / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (run / "vqa").mkdir()
    (run / "vqa" / "metrics.json").write_text(json.dumps({
        "accuracy": 47.5, "majority_baseline": 21.25, "majority_answer": "yes", "per_question_type_prior": 33.0,
        "per_answer_type": {"other": 31.0, "yes/no": 80.0}, "n_eval_questions": 40,
        "baselines": {"global": {"answer": "yes", "overall": 21.25, "per_answer_type": {"other": 0.0, "yes/no": 63.75}}},
    }))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.width > 300 and img.height > 200


def test_full_report_numbers_and_plots(tmp_path):
    run = tmp_path / "run"
    make_full_run(run)
    md_path = write_report(run)
    assert md_path == run / "report" / "report.md"
    md = md_path.read_text()

    # videos per stage: ok / failed / skipped / not processed, output rows
    assert "| download | 2/2 | 4 | 1 | 0 | 0 | videos 4 |" in md
    assert "| frames | 2/2 | 3 | 1 | 1 | 0 | videos 3 |" in md
    assert "| asr | 2/2 | 4 | 0 | 1 | 0 | segments 5 |" in md
    assert "ASR segments: **5**" in md
    # failures by reason category
    assert "| download | failed | not_found | 1 |" in md
    assert "| frames | failed | decode_error | 1 |" in md
    assert "| frames | skipped | upstream_failed | 1 |" in md
    # throughput: 2 shards x SECONDS, model busy from stats
    assert "| asr | 2 | 90.0 | 4 | 0.044 | 0.75 |" in md
    # cost per video-hour over the 4 downloaded videos x 20 min
    assert "Video: **4 videos, 80.00 minutes (1.3333 h)**" in md
    # download: 2 shards x 10 s x 2 CPUs = 40 CPU-core-s / (4/3 h) = 30.0
    assert "| download | 2 CPU (config.yaml, launcher slurm) | 20.0 | 40.0 | CPU-core-s | **30.0** |" in md
    # frames: 2 shards x 6 s x 4 CPUs = 48 CPU-core-s / (4/3 h) = 36.0
    assert "| frames | 4 CPU (config.yaml, launcher slurm) | 12.0 | 48.0 | CPU-core-s | **36.0** |" in md
    # asr asks for GPUs: 2 shards x 45 s x 2 GPUs = 180 GPU-s / (4/3 h) = 135.0 (its CPUs are not counted)
    assert "| asr | 2 GPU (config.yaml, launcher slurm) | 90.0 | 180.0 | GPU-s | **135.0** |" in md
    assert "Total per video-hour: **66.0 CPU-core-s**, **135.0 GPU-s**" in md
    # cuts per minute over the 3 frames videos; one below 3 cuts/min flagged low-cut
    assert "| 3 | 5.00 | 5.00 | 2.60 | 7.40 | 2.00 | 8.00 | 1 | 0 |" in md
    # training: first / last / min loss and both evals
    assert "| pretraining | 20 | 10.000 | 0.500 | 0.500 | 2.500 @ 10, 1.250 @ 20 |" in md
    # VQA vs the majority baseline, per answer type
    assert "model **47.50%** vs majority baseline **21.25%** (always answering 'yes'); margin **+26.25**" in md
    assert "| yes/no | 80.00 | 63.75 |" in md
    # what is missing: the stages after asr, no VQA line
    assert "stage `ingest`: not run yet" in md and "stage `clip`: not run yet" in md
    assert "VQA evaluation" not in md.split("## Missing", 1)[1].split("##", 1)[0]

    plots = ["videos_per_stage.png", "cuts_per_minute.png", "loss_curves.png", "vqa_accuracy.png"]
    for name in plots:
        assert f"]({name})" in md          # linked relatively, beside report.md
        assert_png(run / "report" / name)
    assert not list((run / "report").glob(".*tmp*"))   # atomic writes leave no temp files


def test_only_download_done_reports_what_is_missing(tmp_path):
    run = tmp_path / "run"
    make_download(run)
    md = write_report(run).read_text()
    missing = md.split("## Missing", 1)[1].split("\n## ", 1)[0]
    for stage in ("frames", "asr", "clip", "audio", "scenegraph", "ingest"):
        assert f"stage `{stage}`: not run yet" in missing
    assert "pretraining: no `pretrain/metrics.jsonl`" in missing
    assert "VQA evaluation: no `vqa/vqa/metrics.json`" in missing
    assert "| download | 2/2 | 4 | 1 | 0 | 0 | videos 4 |" in md
    assert "No frames-stage `videos` rows yet." in md and "No training metrics yet." in md
    assert "| download | 2 CPU (config.yaml, launcher slurm) | 20.0 | 40.0 | CPU-core-s | **30.0** |" in md
    assert_png(run / "report" / "videos_per_stage.png")
    assert not (run / "report" / "loss_curves.png").exists()
    assert not (run / "report" / "vqa_accuracy.png").exists()


def test_partial_stage_counts_unprocessed_videos(tmp_path):
    run = tmp_path / "run"
    make_download(run)
    # frames: only shard 0 complete
    videos0 = [v for v in VIDEOS if _shard(v) == 0]
    ShardStore(run, "frames", 0).finalize([{"video_id": v, "status": OK, "reason": "", "attempts": 1,
                                            "seconds": 0.1, "note": ""} for v in videos0], {}, {"seconds": 1.0},
                                          {})
    md = write_report(run).read_text()
    left = len(VIDEOS) - len(videos0)
    assert f"stage `frames`: {left} video(s) not processed yet (1/2 shards complete)" in md
    assert f"| frames | 1/2 | {len(videos0)} | 0 | 0 | {left} | - |" in md
    assert "frames | 2 CPU (stage defaults)" in md   # no config.yaml: the stage's default resources


def test_metrics_jsonl_resumed_run_last_record_wins(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                    '{"step": 3, "lo')   # a line torn by a kill
    assert [(r["step"], r["loss"]) for r in read_metrics_jsonl(path)] == [(1, 3.0), (2, 1.5)]


def test_cli_prints_the_report_path(tmp_path):
    run = tmp_path / "run"
    make_download(run)
    proc = subprocess.run([sys.executable, "-m", "pipeline.report", f"run_dir={run}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "report" / "report.md")
    bad = subprocess.run([sys.executable, "-m", "pipeline.report", f"run_dir={tmp_path / 'nope'}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "run_dir not found" in bad.stderr


def test_empty_dir_says_no_run(tmp_path):
    md = write_report(tmp_path).read_text()
    assert "the whole run: no `geometry.json`" in md
