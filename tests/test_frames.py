"""frames stage on real media: cut-aware sampling, PTS exactness, fallback, failures, CLI + resumability."""
from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bad_media import bad_videos
from conftest import run_cli
from PIL import Image

from pipeline.stages.base import RunContext, WorkItem
from pipeline.stages.frames import STAGE, FramesConfig, plan_times, sample_video
from pipeline.video import VideoInfo, decode_jpeg, probe


@pytest.fixture(scope="module")
def speech(shared_media):
    """The 122 s 1080p video, sampled once for the whole module."""
    return sample_video(shared_media / "speech_cuts_1080p.mp4")


@pytest.fixture(scope="module")
def short_shot_clip(tmp_path_factory) -> Path:
    """Three hard-cut shots at 10 fps: 2 s, then 0.5 s (exactly after_cut_offset, the shortest shot
    min_shot_len allows), then 2 s."""
    path = tmp_path_factory.mktemp("short_shot") / "short_shot.mp4"
    sources = ["testsrc2=size=160x120:rate=10:duration=2", "smptebars=size=160x120:rate=10:duration=0.5",
               "color=c=red:size=160x120:rate=10:duration=2"]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *[a for src in sources for a in ("-f", "lavfi", "-i", src)],
                    "-filter_complex", "[0:v][1:v][2:v]concat=n=3:v=1[v]", "-map", "[v]", "-c:v", "libx264",
                    "-g", "10", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def _synthetic_info(n_frames: int, fps: int) -> VideoInfo:
    """A frame index with no file behind it; PTS are float seconds of a 1/15360 time base, as probe() makes."""
    tb = Fraction(1, 15360)
    return VideoInfo(path="synthetic", width=64, height=36, codec="h264", stream_index=0, time_base=tb,
                     frame_pts=np.arange(n_frames) * (15360 // fps) * float(tb), avg_fps=float(fps),
                     has_audio=False)


def _assert_inside_shots(plan: list[tuple[float, str, int]], info: VideoInfo, cuts: list[float]) -> None:
    bounds = [info.first_pts, *cuts, info.end_pts]
    for pts, kind, shot in plan:
        assert bounds[shot] <= pts < bounds[shot + 1], (pts, kind, shot, bounds[shot:shot + 2])


def _ctx(tmp_path: Path) -> RunContext:
    return RunContext(run_dir=tmp_path, shard=0, models="tiny", cache_dir=tmp_path / "cache", device="cpu",
                      log=lambda msg: None)


def _item(video_id: str, path: Path | None) -> WorkItem:
    rows = [{"video_id": video_id, "path": str(path)}] if path is not None else []
    return WorkItem(video_id=video_id, url=str(path), index=0, inputs={"download": {"videos": rows}})


def test_speech_cuts_agree_with_pyscenedetect_run_directly(speech, shared_media):
    from scenedetect import ContentDetector, detect

    cfg = FramesConfig()
    # The reference run covers 65-105 s (a third of the 1080p decode) where the edited part of the video is.
    scenes = detect(str(shared_media / "speech_cuts_1080p.mp4"),
                    ContentDetector(threshold=cfg.threshold, min_scene_len=cfg.min_shot_len, luma_only=cfg.luma_only),
                    start_time=65.0, end_time=105.0)
    reference = [start.seconds for start, _ in scenes[1:]]
    assert len(reference) >= 3
    assert all(65.0 < c < 105.0 for c in speech.cuts)
    assert len(speech.cuts) == len(reference)
    assert np.allclose(speech.cuts, reference, atol=1.01 / 30)  # within one frame at 30 fps
    assert not speech.low_cut and not speech.fallback


def test_speech_sampling_policy(speech):
    cfg = FramesConfig()
    bounds = [speech.first_pts, *speech.cuts, speech.first_pts + speech.duration]
    assert speech.duration == pytest.approx(122.6, abs=0.05)
    assert [f.pts for f in speech.frames] == sorted(f.pts for f in speech.frames)
    for shot, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        mine = {f.kind: f for f in speech.frames if f.shot == shot}
        assert set(mine) == {"after_cut", "midpoint"}
        assert start <= mine["after_cut"].pts < end and start <= mine["midpoint"].pts < end
        assert mine["after_cut"].pts == pytest.approx(start + cfg.after_cut_offset, abs=1 / 30 + 1e-6)
        assert mine["midpoint"].pts == pytest.approx((start + end) / 2, abs=1 / 30 + 1e-6)
    for f in speech.frames:
        assert f.image.dtype == np.uint8 and f.image.shape == (336, 597, 3)  # 16:9 kept, short side 336


def test_speech_every_frame_lies_inside_its_shot(speech, shared_media):
    info = probe(shared_media / "speech_cuts_1080p.mp4")
    _assert_inside_shots([(f.pts, f.kind, f.shot) for f in speech.frames], info, speech.cuts)
    # An offset longer than the 2.9 s shot: that shot's after-cut frame is its own last frame (the frame just
    # before the next cut), not the next shot's first frame.
    plan = plan_times(info, speech.cuts, FramesConfig(after_cut_offset=5.0), uniform=False)
    _assert_inside_shots(plan, info, speech.cuts)
    bounds = [info.first_pts, *speech.cuts, info.end_pts]
    short = [s for s in range(len(bounds) - 1) if bounds[s + 1] - bounds[s] < 5.0]
    assert short
    for s in short:
        after = [t for t, k, shot in plan if k == "after_cut" and shot == s]
        assert after == [info.frame_pts[info.index_at(bounds[s + 1]) - 1]]


def test_shot_shorter_than_after_cut_offset_gets_its_own_last_frame():
    info = _synthetic_info(90, fps=30)
    pts = info.frame_pts
    cuts = [float(pts[30]), float(pts[36]), float(pts[51])]   # shot 1 lasts 0.2 s, shot 2 exactly 0.5 s
    plan = plan_times(info, cuts, FramesConfig(after_cut_offset=0.5), uniform=False)
    _assert_inside_shots(plan, info, cuts)
    after = {shot: t for t, k, shot in plan if k == "after_cut"}
    assert after == {0: pts[15], 1: pts[35], 2: pts[50], 3: pts[66]}


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_short_shot_clip_both_detectors(short_shot_clip, detector):
    sampled = sample_video(short_shot_clip, FramesConfig(detector=detector))
    assert sampled.cuts == pytest.approx([2.0, 2.5], abs=1e-6)
    info = probe(short_shot_clip)
    _assert_inside_shots([(f.pts, f.kind, f.shot) for f in sampled.frames], info, sampled.cuts)
    mine = {f.kind: f.pts for f in sampled.frames if f.shot == 1}
    assert mine == pytest.approx({"after_cut": 2.4, "midpoint": 2.2}, abs=1e-6)


def test_cap_keeps_after_cut_frames_first_then_evenly_spaced_midpoints():
    info = _synthetic_info(2000, fps=10)                   # 200 s
    cuts = [float(t) for t in info.frame_pts[20::20]]      # a cut every 2 s: 100 shots
    plan = lambda cap: plan_times(info, cuts, FramesConfig(max_frames_per_video=cap), uniform=False)  # noqa: E731
    full = plan(1000)
    assert len(full) == 200 and len({t for t, _, _ in full}) == 200
    _assert_inside_shots(full, info, cuts)
    # Room for every after-cut frame and 50 midpoints: the midpoints of 50 evenly spaced shots.
    capped = plan(150)
    assert len(capped) == 150 and capped == sorted(capped) and set(capped) <= set(full)
    assert [s for _, k, s in capped if k == "after_cut"] == list(range(100))
    mid_shots = [s for _, k, s in capped if k == "midpoint"]
    assert len(mid_shots) == 50 and mid_shots[0] == 0 and mid_shots[-1] == 99
    assert set(np.diff(mid_shots)) <= {2, 3}
    # Exactly room for the after-cut frames: no midpoint.
    assert plan(100) == [x for x in full if x[1] == "after_cut"]
    # Fewer than the shots: after-cut frames of evenly spaced shots, first and last included, no midpoint.
    thin = plan(40)
    assert len(thin) == 40 and set(thin) <= set(full) and {k for _, k, _ in thin} == {"after_cut"}
    shots = [s for _, _, s in thin]
    assert shots[0] == 0 and shots[-1] == 99 and set(np.diff(shots)) <= {2, 3}
    assert len(plan(1)) == 1


def test_cap_on_a_real_video(shared_media):
    sampled = sample_video(shared_media / "counter.mp4", FramesConfig(max_frames_per_video=2))
    assert len(sampled.cuts) >= 2
    assert [(f.kind, f.shot) for f in sampled.frames] == [("after_cut", 0), ("after_cut", len(sampled.cuts))]


def test_counter_sampled_frames_are_the_frames_at_their_pts(shared_media):
    sampled = sample_video(shared_media / "counter.mp4", FramesConfig(short_side=0))
    assert sampled.frames
    for f in sampled.frames:
        n = round(f.pts * 10) + 1   # frame N shows PTS (N-1)*0.1
        ref = np.asarray(Image.open(shared_media / "counter_frames" / f"frame{n:03d}.png").convert("RGB"))
        assert f.image.shape == ref.shape
        assert np.abs(f.image.astype(np.int16) - ref).mean() < 2.5


def test_delayed_start_reports_absolute_pts(shared_media):
    sampled = sample_video(shared_media / "delayed_start.mp4")
    assert sampled.first_pts == pytest.approx(1.075, abs=1e-6)
    assert sampled.frames and sampled.frames[0].pts == pytest.approx(1.075, abs=1e-6)
    assert all(1.075 - 1e-6 <= f.pts < 1.075 + sampled.duration for f in sampled.frames)


def test_fades_only_video_is_low_cut_and_falls_back_to_uniform(shared_media):
    sampled = sample_video(shared_media / "fades.mp4")
    assert sampled.cuts == []           # fades through black are not hard cuts
    assert sampled.low_cut and sampled.fallback and not sampled.dropped
    assert {f.kind for f in sampled.frames} == {"uniform"}
    assert [round(f.pts, 3) for f in sampled.frames] == [float(k) for k in range(10)]  # 1 FPS over 10 s
    half = sample_video(shared_media / "fades.mp4", FramesConfig(fallback_fps=2.0, max_frames_per_video=5))
    assert len(half.frames) == 5 and half.frames[0].pts == 0.0 and half.frames[-1].pts == pytest.approx(9.5, abs=0.04)


def test_stage_rows_and_drop_low_cut(tmp_path, shared_media):
    stage = STAGE(FramesConfig(drop_low_cut=True), _ctx(tmp_path))
    results = {r.video_id: r for r in stage.process([_item("counter", shared_media / "counter.mp4"),
                                                     _item("fades", shared_media / "fades.mp4")])}
    fades = results["fades"]
    assert fades.status == "skipped" and fades.reason.startswith("low_cut: ")
    assert fades.rows["frames"] == [] and fades.rows["videos"][0]["low_cut"] is True
    counter = results["counter"]
    assert counter.status == "ok"
    frames, (video,) = counter.rows["frames"], counter.rows["videos"]
    assert [f["frame_idx"] for f in frames] == list(range(len(frames))) == list(range(video["n_frames"]))
    assert [f["pts"] for f in frames] == sorted(f["pts"] for f in frames)
    assert video["n_cuts"] == len(video["cuts"]) and video["first_pts"] == 0.0
    for f in frames:
        image = decode_jpeg(f["jpeg"])
        assert image.shape == (f["height"], f["width"], 3) and min(image.shape[:2]) == 336
    for table, rows in counter.rows.items():   # rows fit the declared schemas
        pa.Table.from_pylist(rows, schema=STAGE.schemas[table])
    assert stage.shard_stats()["videos"] == 2


def test_bad_inputs_are_recorded_failures_and_the_shard_goes_on(tmp_path, shared_media):
    big = tmp_path / "big.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=2560x1440:rate=5:duration=1",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(big)], check=True)
    bad = bad_videos(tmp_path, shared_media)
    expected = {path.stem: category for path, category in bad.items()} | {"big": "too_large", "nopath": "missing"}
    items = [_item(path.stem, path) for path in bad]
    items += [_item("big", big), _item("nopath", None), _item("good", shared_media / "delayed_start.mp4")]
    stage = STAGE(FramesConfig(max_pixels=1920 * 1080), _ctx(tmp_path))
    results = {r.video_id: r for r in stage.process(items)}
    assert len(results) == len(items)
    for video_id, category in expected.items():
        assert results[video_id].status == "failed", video_id
        assert results[video_id].reason.startswith(category + ": "), (video_id, results[video_id].reason)
    assert results["good"].status == "ok" and results["good"].rows["frames"]


def _table(run: Path, stage: str, name: str) -> list[dict]:
    parts = sorted((run / stage).glob(f"shard-*/{name}.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("video_id").to_pylist()


def test_cli_local_launcher_and_resume(tmp_path, shared_media):
    run = tmp_path / "run"
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"counter {shared_media / 'counter.mp4'}\nfades {shared_media / 'fades.mp4'}\n"
                        f"delayed {shared_media / 'delayed_start.mp4'}\nlecture {shared_media / 'speech_lecture.mp3'}\n")
    run_cli("stage=download", f"run_dir={run}", f"input={manifest}", "num_shards=1", "launcher=local", "models=tiny")
    run_cli("stage=frames", f"run_dir={run}", "launcher=local", "models=tiny")
    ledger = {r["video_id"]: r for r in _table(run, "frames", "ledger")}
    assert {v for v, r in ledger.items() if r["status"] == "ok"} == {"counter", "fades", "delayed"}
    assert ledger["lecture"]["status"] == "failed" and ledger["lecture"]["reason"].startswith("no_video_stream:")
    videos = {r["video_id"]: r for r in _table(run, "frames", "videos")}
    assert videos["fades"]["fallback"] and videos["delayed"]["first_pts"] == pytest.approx(1.075)
    frames = _table(run, "frames", "frames")
    assert sum(r["video_id"] == "fades" for r in frames) == 10
    assert (run / "frames" / "shard-00000" / "_SUCCESS").exists()
    before = {p: p.stat().st_mtime_ns for p in (run / "frames").rglob("*.parquet")}
    run_cli("stage=frames", f"run_dir={run}", "launcher=local", "models=tiny")   # resume: nothing left to do
    after = {p: p.stat().st_mtime_ns for p in (run / "frames").rglob("*.parquet")}
    assert after == before
    assert _table(run, "frames", "frames") == frames
