"""`verify content=true` (pipeline/verify_content.py): re-decodes frames and audio by the ffmpeg CLI and compares
the dataset with the stage tables. It passes on a run of the real stages over the sync-oracle videos and reports
a run whose audio was decoded with the earlier loader (decoded samples joined end to end from the first
timestamp: a 2 s gap in the audio packets moved everything after it 2 s early), which the alignment verifier
and the dataset itself cannot see."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import sync_oracle as so
from conftest import run_cli

from pipeline.verify import verify_run
from pipeline.verify_content import block_difference, check_frames, ffmpeg_frame, verify_content
from pipeline.video import decode_at, probe


def end_to_end_audio(path, sample_rate: int = 16000, max_seconds: float | None = None) -> np.ndarray:
    """The earlier `pipeline.audio.load_audio`: the first frame's timestamp as lead, then every decoded sample
    joined end to end (what a gap in the packets does to the timeline is lost)."""
    import av

    chunks: list[np.ndarray] = []
    first_time = None
    limit = int(max_seconds * sample_rate) if max_seconds else None
    n = 0
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        for frame in container.decode(stream):
            if first_time is None and frame.time is not None:
                first_time = float(frame.time)
                n += round(first_time * sample_rate)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                n += chunks[-1].size
            if limit is not None and n >= limit:
                break
        else:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    lead = round((first_time or 0.0) * sample_rate)
    audio = np.concatenate([np.zeros(lead, np.float32), audio]) if lead > 0 else audio[-lead:]
    return audio[:limit] if limit is not None else audio


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, cache_dir) -> Path:
    return so.shared_run(tmp_path_factory, cache_dir)


@pytest.fixture(scope="module")
def gap_run(good_run, tmp_path_factory, cache_dir) -> Path:
    """The same run with asr, audio and ingest redone by the earlier audio loader."""
    run = tmp_path_factory.mktemp("gap-run") / "run"
    shutil.copytree(good_run, run, ignore=shutil.ignore_patterns("asr", "audio", "ingest", "dataset"))
    variants = so.shared_variants(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pipeline.audio.load_audio", end_to_end_audio)
        so.run_stages(run, {so.video_id(n): v.path for n, v in variants.items()}, cache_dir,
                      stages=("asr", "audio", "ingest"))
    return run


def test_ffmpeg_frame_is_the_frame_at_that_pts(tmp_path_factory):
    """The content check's reference decode picks frames by PTS on every container (against PyAV's exact path)."""
    for name, v in so.shared_variants(tmp_path_factory).items():
        info = probe(v.path)
        picks = [float(info.frame_pts[i]) for i in (0, info.n_frames // 2, info.n_frames - 1)]
        for pts, image in decode_at(info, picks, backend="pyav"):
            ref = ffmpeg_frame(v.path, pts, (image.shape[1], image.shape[0]))
            assert block_difference(image, ref) < 1.0, (name, pts)


def test_content_check_passes_on_a_normal_run(good_run):
    stats: dict = {}
    violations = verify_content(good_run, sample=8, stats=stats)
    assert violations == [], violations
    assert stats["sampled"] == 8 and len(stats["frame_diffs"]) >= 8 and len(stats["audio_diffs"]) == 8
    assert max(stats["audio_diffs"]) < 0.005


def test_content_check_reports_the_end_to_end_audio_run(gap_run, tmp_path_factory, cache_dir):
    # what the stages copied from each other agrees: the alignment verifier sees nothing wrong
    assert verify_run(gap_run) == []
    # the timeline oracle does see it ...
    problems = so.alignment_violations(gap_run, so.shared_variants(tmp_path_factory), so.BeepDetector(cache_dir))
    assert problems and {p.split(" ")[0].rstrip(":") for p in problems} == {"audio_gap.mkv"}, problems
    # ... and so does the content check, on the rows after the gap only
    violations = verify_content(gap_run, sample=0, frames_per_row=0)
    named = {(v.video_id, v.segment_idx) for v in violations}
    assert named and {vid for vid, _ in named} == {"audio_gap_mkv"}, violations
    assert all("audio embedding" in v.what for v in violations)
    assert {idx for _, idx in named} >= {2}          # [2, 3): beeps from 4 s where the file has no audio


def test_verify_cli_content(good_run, gap_run):
    bad = run_cli("verify", f"run_dir={gap_run}", "content=true", "sample=0", "frames=0", "dataset=false",
                  check=False)
    assert bad.returncode == 1 and "audio_gap_mkv 2: audio embedding" in bad.stdout and "content:" in bad.stderr
    usage = run_cli("verify", f"run_dir={good_run}", "content=maybe", check=False)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


def test_content_check_names_a_frame_of_another_moment(good_run, tmp_path, tmp_path_factory):
    """A stored frame swapped for one a second later (same size, same JPEG settings) is named."""
    import deeplake

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    ds = deeplake.open(f"file://{run / 'dataset'}")
    vids = list(ds["video_id"][0:len(ds)])
    i = vids.index("plain_mp4")
    frames = list(ds["frames"][i + 1])     # the next window's frames, a second later
    first = list(ds["frames"][i])
    first[0] = frames[0]
    from pipeline.video import encode_jpeg

    ds["frames"][i] = [encode_jpeg(np.asarray(f), 90) for f in first]
    ds.commit("swap a frame")
    paths = {vid: str(v.path) for vid, v in ((so.video_id(n), v) for n, v in
                                             so.shared_variants(tmp_path_factory).items())}
    violations, diffs = check_frames(ds, [i, i + 1], paths, 2, print)
    assert len(diffs) == 4
    assert {(v.video_id, v.segment_idx) for v in violations} == {("plain_mp4", int(ds["segment_idx"][i]))}
    assert "frame" in violations[0].what and len(violations) == 1
