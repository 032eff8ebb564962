"""Sync oracle (tests/sync_oracle.py): on every container variant, per decode backend, the flashes and beeps the
code under test decodes land where the construction puts them and where the ffmpeg CLI puts them, on one
timeline; the probe's frame list is exactly what the decoder outputs."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import sync_oracle as so

from pipeline.audio import SAMPLE_RATE, load_audio
from pipeline.video import VideoError, decode_at, probe

VARIANTS = ["plain.mp4", "video_late.mp4", "audio_late.mp4", "plain.ts", "mid_gop.ts", "vp9_opus.webm",
            "cut_editlist.mp4", "audio_gap.mkv", "vfr.mp4"]
# Where decord's own index or decoder cannot be trusted it must refuse (and `auto` decodes with PyAV): MPEG-TS
# (its seeks land on other frames), edit-list pre-roll (it would output discarded packets), VP9 (its decoder
# fails on these packets).
DECORD_REFUSES = {"plain.ts", "mid_gop.ts", "cut_editlist.mp4", "vp9_opus.webm"}


@pytest.fixture(scope="session")
def oracle(tmp_path_factory) -> dict[str, so.Variant]:
    return so.shared_variants(tmp_path_factory)


def _match(got: list[float], want: list[float], tol: float) -> bool:
    return len(got) == len(want) and all(abs(a - b) <= tol for a, b in zip(got, want))


def _decoded_pts(path: Path) -> list[float]:
    """Every frame PyAV's decoder outputs, decoding the file from the start without seeking."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return sorted(float(f.pts * s.time_base) for f in c.decode(s))


@pytest.mark.parametrize("name", VARIANTS)
def test_ffmpeg_reference_agrees_with_the_construction(oracle, name):
    """The oracle itself: the ffmpeg CLI sees every flash and beep where the variant says (no code under test)."""
    v = oracle[name]
    assert _match(so.reference_flashes(v.path), v.expected_flashes(), v.sync_tolerance_s), name
    assert _match(so.reference_beeps(v.path), v.expected_beeps(), v.sync_tolerance_s), name


@pytest.mark.parametrize("name", VARIANTS)
def test_probe_indexes_exactly_the_frames_the_decoder_outputs(oracle, name):
    v = oracle[name]
    info = probe(v.path)
    reference = [t for t, _ in so.reference_frames(v.path)]        # ffprobe's decode
    assert info.n_frames == len(reference), (info.n_frames, len(reference))
    assert np.allclose(info.frame_pts, reference, atol=1e-5)
    assert np.allclose(info.frame_pts, _decoded_pts(v.path), atol=1e-9)
    assert info.first_pts == pytest.approx(reference[0], abs=1e-5)
    assert info.duration == pytest.approx(reference[-1] - reference[0] + (reference[-1] - reference[-2]), abs=1e-5)


@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
@pytest.mark.parametrize("name", VARIANTS)
def test_flashes_decode_at_their_time(oracle, name, backend):
    """Every frame of the index decoded by `backend`: each carries its own PTS and the flashes start where the
    construction and the ffmpeg CLI put them."""
    v = oracle[name]
    info = probe(v.path)
    if backend == "decord" and name in DECORD_REFUSES:
        with pytest.raises(Exception) as err:
            decode_at(info, list(info.frame_pts), backend="decord")
        assert not isinstance(err.value, (AssertionError, KeyError, IndexError)), err.value
        return
    frames = decode_at(info, list(info.frame_pts), backend=backend)
    assert np.array_equal([p for p, _ in frames], info.frame_pts)
    flashes = so.flash_onsets(frames)
    assert _match(flashes, v.expected_flashes(), v.sync_tolerance_s), (flashes, v.expected_flashes())
    assert _match(flashes, so.reference_flashes(v.path), 1e-5)


@pytest.mark.parametrize("name", sorted(set(VARIANTS) - DECORD_REFUSES))
def test_decord_and_pyav_agree_on_every_frame(oracle, name):
    info = probe(oracle[name].path)
    a = decode_at(info, list(info.frame_pts), backend="decord")
    b = decode_at(info, list(info.frame_pts), backend="pyav")
    assert [p for p, _ in a] == [p for p, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))


@pytest.mark.parametrize("name", VARIANTS)
def test_sparse_requests_seek_and_return_the_exact_frames(oracle, name):
    """A few frames far apart (each a seek) are pixel-identical to the same frames of a decode from the start."""
    info = probe(oracle[name].path)
    every = dict(decode_at(info, list(info.frame_pts), backend="pyav"))
    picks = [info.frame_pts[i] for i in np.linspace(info.n_frames - 1, 0, 7).round().astype(int)]
    for backend in ("pyav", "auto"):
        got = decode_at(info, picks, backend=backend)
        assert [p for p, _ in got] == sorted(set(float(p) for p in picks))
        assert all(np.array_equal(image, every[p]) for p, image in got), backend


@pytest.mark.parametrize("name", VARIANTS)
def test_beeps_play_at_their_time(oracle, name):
    """load_audio: sample 0 is time 0, each decoded frame at its own PTS (gaps silent), as the ffmpeg CLI's
    timestamp-compensated decode."""
    v = oracle[name]
    audio = load_audio(v.path)
    beeps = so.beep_onsets(audio, SAMPLE_RATE)
    assert _match(beeps, v.expected_beeps(), v.sync_tolerance_s), (beeps, v.expected_beeps())
    for a, b in v.silent_spans():
        assert np.abs(audio[round(a * SAMPLE_RATE):round(b * SAMPLE_RATE)]).max(initial=0) < 0.01, (a, b)
    ref = so.reference_audio(v.path, SAMPLE_RATE)
    assert abs(len(audio) - len(ref)) <= 2, (len(audio), len(ref))
    n = min(len(audio), len(ref))
    assert np.abs(audio[:n] - ref[:n]).mean() < 0.01


@pytest.mark.parametrize("name", VARIANTS)
def test_every_beep_has_its_flash_on_one_timeline(oracle, name):
    """Where both streams cover a source second, the decoded flash and the decoded beep start together."""
    v = oracle[name]
    info = probe(v.path)
    flashes = so.flash_onsets(decode_at(info, list(info.frame_pts)))
    beeps = so.beep_onsets(load_audio(v.path), SAMPLE_RATE)
    both = [k + v.offset for k in v.seconds()
            if k >= v.video_from - 1e-9 and k + v.offset in v.expected_beeps()]
    assert both, name
    for t in both:
        f = min(flashes, key=lambda x: abs(x - t))
        b = min(beeps, key=lambda x: abs(x - t))
        assert abs(f - b) <= v.sync_tolerance_s, (t, f, b)


def test_audio_limit_keeps_the_timeline(oracle):
    v = oracle["audio_gap.mkv"]
    full = load_audio(v.path)
    head = load_audio(v.path, max_seconds=4.5)
    assert len(head) == int(4.5 * SAMPLE_RATE)
    assert np.array_equal(head, full[:len(head)])
    assert so.beep_onsets(head, SAMPLE_RATE) == so.beep_onsets(full, SAMPLE_RATE)[:3]


def test_a_frame_the_decoder_does_not_output_fails_instead_of_a_neighbour(oracle):
    """Asking for a packet the decoder never outputs (edit-list pre-roll) names the frame; nothing is returned in
    its place."""
    v = oracle["cut_editlist.mp4"]
    info = probe(v.path)
    assert info.skipped_packets > 0 and info.first_pts == 0.0
    info.frame_pts = np.concatenate([[-0.04], info.frame_pts])     # a pre-roll packet's PTS
    with pytest.raises(VideoError) as err:
        decode_at(info, [-0.04, 1.0], backend="pyav")
    assert err.value.category == "corrupt" and "-0.0400" in err.value.reason


# ------------------------------------------------------------------------------- end to end, the real stages


@pytest.fixture(scope="session")
def oracle_run(tmp_path_factory, cache_dir) -> Path:
    return so.shared_run(tmp_path_factory, cache_dir)


def test_stages_keep_every_flash_with_its_beep(oracle_run, tmp_path_factory, cache_dir):
    """download -> frames (uniform 5 fps: every flash sampled) -> asr -> audio (1 s no-speech windows) -> clip ->
    scenegraph -> ingest on every variant, tiny models: each dataset row's frames show a flash exactly where the
    variant has one, its audio embedding holds a beep exactly where the variant has one, so flash rows and beep
    rows coincide wherever both streams play."""
    variants = so.shared_variants(tmp_path_factory)
    problems = so.alignment_violations(oracle_run, variants, so.BeepDetector(cache_dir))
    assert not problems, "\n".join(problems)
