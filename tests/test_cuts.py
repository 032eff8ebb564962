"""Cut detection (pipeline/cuts.py) against PySceneDetect itself: the decision rules fed the same scores, the
scores against PySceneDetect's own statistics, and the cuts against `scenedetect.detect()` run directly
(OpenCV backend, auto-downscale) on the sample media; frames captured during detection against `decode_at`;
the frames stage's process pool against sequential processing."""
from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.cuts import AdaptiveCuts, Capture, ContentCuts, CutParams, detect
from pipeline.stages.base import RunContext, WorkItem
from pipeline.stages.frames import STAGE, FramesConfig, plan_times
from pipeline.video import decode_at, probe

CFG = FramesConfig()


def _content(**kw):
    from scenedetect import ContentDetector

    return ContentDetector(threshold=CFG.threshold, min_scene_len=CFG.min_shot_len, luma_only=True, **kw)


def _adaptive():
    from scenedetect import AdaptiveDetector

    return AdaptiveDetector(adaptive_threshold=CFG.adaptive_threshold, min_scene_len=CFG.min_shot_len,
                            min_content_val=CFG.min_content_val, luma_only=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, shared_media) -> dict[str, Path]:
    """The sample media plus: the edited part of speech_cuts_1080p.mp4 (64-106 s, 4 cuts) at 640x360, and a
    3-shot clip (2 s, 0.5 s, 2 s; the last cut changes hue more than brightness) in several pixel formats."""
    d = tmp_path_factory.mktemp("cut_clips")
    out = {name: shared_media / name for name in ("counter.mp4", "fades.mp4", "delayed_start.mp4")}
    speech = d / "speech_360p.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", "64", "-t", "42", "-i",
                    str(shared_media / "speech_cuts_1080p.mp4"), "-an", "-vf", "scale=640:360", "-c:v", "libx264",
                    "-preset", "veryfast", str(speech)], check=True)
    out["speech_360p.mp4"] = speech
    sources = ["testsrc2=size=160x120:rate=10:duration=2", "smptebars=size=160x120:rate=10:duration=0.5",
               "color=c=red:size=160x120:rate=10:duration=2"]
    base = d / "shots.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", *[a for src in sources for a in ("-f", "lavfi", "-i", src)],
                    "-filter_complex", "[0:v][1:v][2:v]concat=n=3:v=1[v]", "-map", "[v]", "-c:v", "libx264",
                    "-g", "10", "-pix_fmt", "yuv420p", str(base)], check=True)
    out["shots.mp4"] = base
    for name, args in {"shots_10bit.mp4": ["-c:v", "libx264", "-pix_fmt", "yuv420p10le"],
                       "shots_444.mp4": ["-c:v", "libx264", "-pix_fmt", "yuv444p"],
                       "shots_full_range.avi": ["-c:v", "mjpeg", "-pix_fmt", "yuvj420p"],
                       "shots_gray.mkv": ["-c:v", "ffv1", "-pix_fmt", "gray"],
                       "shots_rgb.mp4": ["-c:v", "libx264rgb"]}.items():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(base), *args, str(d / name)], check=True)
        out[name] = d / name
    return out


def _reference(path: Path, detector) -> tuple[list[float], dict[float, float]]:
    """PySceneDetect run directly (OpenCV backend, auto-downscale): cut times relative to the first frame, and
    its per-frame content score by time."""
    from scenedetect import SceneManager, StatsManager, detect as sd_detect, open_video

    cuts = [start.seconds for start, _ in sd_detect(str(path), detector)[1:]]
    if not hasattr(detector, "_adaptive_ratio_key"):
        stats = StatsManager()
        manager = SceneManager(stats_manager=stats)
        manager.add_detector(_content())
        manager.detect_scenes(open_video(str(path), backend="opencv"))
        scores = {tc.seconds: m["content_val"] for tc, m in stats._frame_metrics.items() if "content_val" in m}
        return cuts, scores
    return cuts, {}


def _params(detector: str) -> CutParams:
    return CutParams(detector=detector, threshold=CFG.threshold, min_shot_len=CFG.min_shot_len,
                     adaptive_threshold=CFG.adaptive_threshold, min_content_val=CFG.min_content_val)


CONTENT_CASES = ["counter.mp4", "fades.mp4", "delayed_start.mp4", "speech_360p.mp4", "shots.mp4",
                 "shots_10bit.mp4", "shots_444.mp4", "shots_full_range.avi", "shots_gray.mkv", "shots_rgb.mp4"]


@pytest.mark.parametrize("name", CONTENT_CASES)
def test_content_cuts_and_scores_equal_pyscenedetect_run_directly(clips, name):
    path = clips[name]
    info = probe(path)
    ref_cuts, ref_scores = _reference(path, _content())
    got = detect(info, _params("content"), exact_scores=True)
    rel = [c - info.first_pts for c in got.cuts]
    one_frame = 1.0 / info.avg_fps + 1e-6
    assert len(rel) == len(ref_cuts), (rel, ref_cuts)
    assert np.allclose(rel, ref_cuts, atol=one_frame), (rel, ref_cuts)
    if name in ("counter.mp4", "speech_360p.mp4") or name.startswith("shots"):
        assert got.cuts, "the case has cuts"
    # The score itself: PySceneDetect's mean |dV| on its 256-wide frames, frame by frame.
    times = got.pts - info.first_pts
    diffs = [abs(got.scores[int(np.argmin(np.abs(times - t)))] - v) for t, v in ref_scores.items()]
    assert len(diffs) >= len(times) - 2
    assert max(diffs) < 2.0 and float(np.mean(diffs)) < 0.75, (max(diffs), float(np.mean(diffs)))
    # The bound that spares the exact score is never below it; the fast mode decides the same cuts.
    assert np.all(got.bounds >= got.scores)
    fast = detect(info, _params("content"))
    assert fast.cuts == got.cuts
    if name == "speech_360p.mp4":       # natural video: the exact score is needed for very few frames
        assert np.isfinite(fast.scores).sum() <= 0.02 * len(fast.scores)


@pytest.mark.parametrize("name", ["counter.mp4", "speech_360p.mp4", "shots.mp4"])
def test_adaptive_cuts_equal_pyscenedetect_run_directly(clips, name):
    path = clips[name]
    info = probe(path)
    ref_cuts, _ = _reference(path, _adaptive())
    got = detect(info, _params("adaptive"))
    rel = [c - info.first_pts for c in got.cuts]
    assert len(rel) == len(ref_cuts) and np.allclose(rel, ref_cuts, atol=1.0 / info.avg_fps + 1e-6), (rel, ref_cuts)
    assert detect(info, _params("adaptive"), exact_scores=True).cuts == got.cuts


def _feed_pyscenedetect(detector, times: list[Fraction], scores: list[float]) -> list[float]:
    """Drive a real PySceneDetect detector with given frame scores (its frame scoring replaced)."""
    from scenedetect import FrameTimecode
    from scenedetect.common import Timecode

    it = iter(scores)
    detector._calculate_frame_score = lambda timecode, image: next(it)
    tb = Fraction(1, 90000)
    found, tc = [], None
    for t in times:
        tc = FrameTimecode(Timecode(pts=int(t / tb), time_base=tb), fps=Fraction(30))
        found += detector.process_frame(tc, None)
    found += detector.post_process(tc)
    return [float(c.seconds) for c in found]


@pytest.mark.parametrize("seed", range(6))
def test_decision_rules_equal_pyscenedetect_detectors_on_the_same_scores(seed):
    """Scores with bursts of spikes closer than min_shot_len (the flash filter's merging), isolated cuts and
    plateaus (the adaptive window): the ported rules decide exactly what PySceneDetect's detectors decide."""
    rng = np.random.default_rng(seed)
    n = 900
    scores = rng.gamma(2.0, 2.0, n)
    for start in rng.choice(n - 20, 40, replace=False):
        burst = rng.integers(1, 5)
        for k in range(burst):
            scores[start + k * rng.integers(1, 12)] = rng.uniform(10, 60)
    scores[0] = 0.0
    times = [Fraction(i, 30) for i in range(n)]
    want = _feed_pyscenedetect(_content(), times, list(scores))
    rule = ContentCuts(CFG.threshold, CFG.min_shot_len)
    got = [c for t, s in zip(times, scores) for c in rule.step(float(t), s >= CFG.threshold)]
    assert got == pytest.approx(want, abs=1e-9) and len(want) > 10
    want_a = _feed_pyscenedetect(_adaptive(), times, list(scores))
    a = AdaptiveCuts(CFG.adaptive_threshold, CFG.min_content_val, 2, CFG.min_shot_len)
    got_a = []
    buf: list[tuple[float, float]] = []
    for t, s in zip(times, scores):   # the rule reads exact scores from its history: give it a plain one
        buf.append((float(t), s))
        got_a += a(_History(buf))
    assert got_a == pytest.approx(want_a, abs=1e-9) and len(want_a) > 10


class _History:
    """What AdaptiveCuts reads: .recs (t, bound, score), .tighten(k) and .exact(k), over a plain list of
    (t, score)."""

    class _R:
        def __init__(self, t, s):
            self.t, self.bound, self.score = t, s, s

    def __init__(self, buf):
        self.recs = [self._R(t, s) for t, s in buf[-6:]]

    def tighten(self, k):
        return self.recs[k].bound

    def exact(self, k):
        return self.recs[k].score


@pytest.mark.parametrize("name,short_side", [("counter.mp4", 336), ("counter.mp4", 0), ("speech_360p.mp4", 336),
                                             ("shots.mp4", 336)])
def test_after_cut_frames_captured_during_detection_are_the_exact_frames(clips, name, short_side):
    path = clips[name]
    info = probe(path)
    cfg = FramesConfig(short_side=short_side)
    got = detect(info, _params("content"), capture=Capture(offset=cfg.after_cut_offset, short_side=short_side or None))
    plan = plan_times(info, got.cuts, cfg, uniform=False)
    after = {t for t, kind, _ in plan if kind == "after_cut"}
    assert after and after <= set(got.frames)          # every after-cut frame came from the detection pass
    mids = {t for t, kind, shot in plan if kind == "midpoint"}
    assert mids <= set(got.frames)                     # and the midpoints (the others by seeking, meanwhile)
    assert set(got.frames) <= {t for t, _, _ in plan}  # and nothing else
    for backend in ("pyav", "auto"):
        for pts, image in decode_at(info, sorted(got.frames), short_side=short_side or None, backend=backend):
            assert pts in got.frames
            assert np.array_equal(got.frames[pts], image), (name, pts, backend)


def test_skip_loop_filter_finds_the_same_cuts_and_keeps_only_frames_decoded_exactly(clips):
    """Without the loop filter the scan's pixels are not the frames: every sampled frame is decoded by seeking
    instead, during the scan; the same frames, pixel for pixel, as the exact scan keeps."""
    info = probe(clips["speech_360p.mp4"])
    exact = detect(info, _params("content"), capture=Capture(short_side=336))
    params = _params("content")
    params.skip_loop_filter = True
    fast = detect(info, params, capture=Capture(short_side=336))
    assert fast.cuts == exact.cuts and len(exact.cuts) == 4
    plan = {t for t, _, _ in plan_times(info, exact.cuts, FramesConfig(), uniform=False)}
    assert fast.frames.keys() == exact.frames.keys() == plan     # nothing left for a second pass
    assert all(np.array_equal(fast.frames[t], exact.frames[t]) for t in plan)
    without = detect(info, params, capture=Capture(short_side=336, seek=False))
    assert without.cuts == exact.cuts and without.frames == {}    # the scan's own (inexact) pixels are never kept


def _ctx(tmp_path: Path) -> RunContext:
    return RunContext(run_dir=tmp_path, shard=0, models="tiny", cache_dir=tmp_path / "cache", device="cpu",
                      log=lambda msg: None)


def _item(video_id: str, path: Path | None) -> WorkItem:
    rows = [{"video_id": video_id, "path": str(path)}] if path is not None else []
    return WorkItem(video_id=video_id, url=str(path), index=0, inputs={"download": {"videos": rows}})


def test_pool_of_workers_gives_the_same_results_as_sequential(tmp_path, clips, shared_media):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    videos = {"counter": clips["counter.mp4"], "fades": clips["fades.mp4"], "delayed": clips["delayed_start.mp4"],
              "speech": clips["speech_360p.mp4"], "shots": clips["shots.mp4"], "noise": noise,
              "audio_only": shared_media / "speech_lecture.mp3"}
    # Items without a media path first and together: the pool must still go on to the videos after them.
    items = [_item("nopath", None), _item("nopath2", None)] + [_item(v, p) for v, p in videos.items()]

    def run(workers: int) -> tuple[dict, dict]:
        stage = STAGE(FramesConfig(workers=workers), _ctx(tmp_path))
        results = {r.video_id: r for r in stage.process(iter(items))}
        return results, stage.shard_stats()

    seq, seq_stats = run(1)
    par, par_stats = run(2)
    assert set(seq) == set(par) == {it.video_id for it in items}
    for vid in seq:
        a, b = seq[vid], par[vid]
        assert (a.status, a.reason, a.note) == (b.status, b.reason, b.note), vid
        assert a.rows == b.rows, vid             # same frames, PTS, shots and JPEG bytes
    assert seq["noise"].status == "failed" and seq["noise"].reason.startswith("corrupt")
    assert seq["audio_only"].reason.startswith("no_video_stream") and seq["nopath"].reason.startswith("missing")
    assert seq["speech"].status == "ok" and len(seq["speech"].rows["videos"][0]["cuts"]) == 4
    assert par_stats["videos"] == seq_stats["videos"] == 5
    assert par_stats["video_minutes"] == pytest.approx(seq_stats["video_minutes"])


def test_both_scan_modes_of_the_stage_give_the_same_frames(clips):
    """counter.mp4 is 1080p: by default scanned without the loop filter (after-cut frames decoded by seeking);
    with the loop filter kept they are captured during the scan. Same cuts, same frames, same pixels."""
    from pipeline.stages.frames import sample_video

    skipped = sample_video(clips["counter.mp4"], FramesConfig())
    captured = sample_video(clips["counter.mp4"], FramesConfig(detect_skip_loop_filter_min_height=10**6))
    assert skipped.cuts == captured.cuts == pytest.approx([1.0, 2.0])
    assert [(f.pts, f.kind, f.shot) for f in skipped.frames] == [(f.pts, f.kind, f.shot) for f in captured.frames]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(skipped.frames, captured.frames))


@pytest.mark.parametrize("n,size", [(360, 144), (180, 72), (1080, 144), (540, 72), (480, 144), (240, 72),
                                    (720, 144), (576, 144), (120, 120), (121, 60), (1000, 7), (2, 1)])
def test_strided_row_views_are_exactly_the_rows_the_scaling_samples(n, size):
    """The rows the bound reads in place are the rows OpenCV's nearest scaling picks: no more, no fewer, none
    twice; the common video heights (360p to 1080p, luma and 4:2:0 chroma) get the in-place views."""
    import cv2

    from pipeline.cuts import _row_slices

    src = np.arange(n, dtype=np.float32).reshape(n, 1)
    picked = cv2.resize(src, (1, size), interpolation=cv2.INTER_NEAREST)[:, 0].astype(int)
    slices = _row_slices(n, None if size == n else picked)
    assert slices is not None and len(slices) <= 8
    got = np.sort(np.concatenate([np.arange(n)[sl] for sl in slices]))
    assert np.array_equal(got, picked)


@pytest.mark.parametrize("name", ["speech_360p.mp4", "counter.mp4", "shots_10bit.mp4", "shots_444.mp4"])
def test_scan_modes_give_the_same_scores_cuts_and_frames(clips, name, monkeypatch):
    """Decoding ahead in a second thread with one decoder thread (the default up to 1024x576), FFmpeg's frame
    threading decoded inline, and the bound over copied rows instead of in-place views: the same frames, bounds,
    scores, cuts and captured pixels."""
    import pipeline.cuts as cuts

    info = probe(clips[name])

    def run(**kw):
        params = _params("content")
        for k, v in kw.items():
            setattr(params, k, v)
        return detect(info, params, capture=Capture(offset=CFG.after_cut_offset, short_side=336),
                      exact_scores=True)

    runs = [run(decode_threads=1, decode_ahead=True), run(decode_threads=2, decode_ahead=False)]
    monkeypatch.setattr(cuts, "_row_slices", lambda n, rows, most=8: None)    # the copying path
    runs.append(run(decode_threads=0, decode_ahead=True))
    first = runs[0]
    assert len(first.pts) == info.n_frames and first.frames
    for other in runs[1:]:
        assert other.cuts == first.cuts
        assert np.array_equal(other.pts, first.pts)
        assert np.array_equal(other.bounds, first.bounds)
        assert np.array_equal(other.scores, first.scores, equal_nan=True)
        assert other.frames.keys() == first.frames.keys()
        assert all(np.array_equal(other.frames[t], first.frames[t]) for t in first.frames)


def test_a_failing_scan_stops_its_decoding_thread(clips, monkeypatch):
    import threading

    import pipeline.cuts as cuts

    calls = {"n": 0}
    step = cuts.ContentCuts.__call__

    def failing(self, scores):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("scoring failed")
        return step(self, scores)

    monkeypatch.setattr(cuts.ContentCuts, "__call__", failing)
    info = probe(clips["speech_360p.mp4"])
    with pytest.raises(RuntimeError, match="scoring failed"):
        detect(info, _params("content"), capture=Capture())
    assert not [t for t in threading.enumerate() if t.name.startswith("cut-scan")]
