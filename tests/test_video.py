"""pipeline.video: probing, PTS-exact decoding (decord and PyAV) on real files, resizing, bad input."""
from __future__ import annotations

import subprocess
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
from bad_media import bad_videos
from PIL import Image

from pipeline import video
from pipeline.video import VideoError, decode_at, decode_jpeg, encode_jpeg, probe, resize_short_side


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def _ffprobe_frame_pts(path: Path) -> list[float]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries", "frame=pts_time",
                          "-of", "csv=p=0", str(path)], check=True, capture_output=True, text=True).stdout
    return sorted(float(x.strip().strip(",")) for x in out.split() if x.strip().strip(","))


@pytest.fixture(scope="module")
def counter_frames(shared_media) -> np.ndarray:
    paths = sorted((shared_media / "counter_frames").glob("frame*.png"))
    assert len(paths) == 30
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory) -> Path:
    """3 s: the first second at 10 fps, then 30 fps (frames dropped with select, timestamps kept)."""
    path = tmp_path_factory.mktemp("vfr") / "vfr.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30:duration=3",
            "-vf", r"select='lt(t\,1)*not(mod(n\,3))+gte(t\,1)'", "-fps_mode", "vfr",
            "-c:v", "libx264", "-g", "15", "-pix_fmt", "yuv420p", str(path))
    return path


def _best_match(image: np.ndarray, references: np.ndarray) -> tuple[int, float]:
    diffs = [np.abs(image.astype(np.int16) - ref.astype(np.int16)).mean() for ref in references]
    return int(np.argmin(diffs)), float(min(diffs))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_counter_frames_at_known_times_match_reference_pngs(shared_media, counter_frames, backend):
    info = probe(shared_media / "counter.mp4")
    assert info.n_frames == 30 and (info.width, info.height) == (1920, 1080)
    # frame N (1-based) is shown on [(N-1)*0.1, N*0.1): ask for instants inside that interval
    wanted = {1: 0.0, 2: 0.15, 11: 1.0999, 17: 1.63, 30: 2.95}
    got = decode_at(info, list(wanted.values()), backend=backend)
    assert [round(pts, 6) for pts, _ in got] == [round((n - 1) * 0.1, 6) for n in wanted]
    for n, (pts, image) in zip(wanted, got):
        assert image.shape == (1080, 1920, 3) and image.dtype == np.uint8
        best, mean_diff = _best_match(image, counter_frames)
        assert best == n - 1, f"t={wanted[n]}: decoded frame matches frame{best + 1:03d}, not frame{n:03d}"
        assert mean_diff < 2.5  # colour conversion rounding only; the neighbouring frames differ by more


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_decoding_holds_one_chunk_at_full_resolution(shared_media, counter_frames, backend, monkeypatch):
    import decord

    monkeypatch.setattr(video, "DECODE_CHUNK", 4)
    batches = []
    get_batch = decord.VideoReader.get_batch
    monkeypatch.setattr(decord.VideoReader, "get_batch",
                        lambda self, indices: batches.append(len(indices)) or get_batch(self, indices))
    # Full-resolution frames still alive when one is resized. Weak references see PyAV's arrays, which
    # wrap FFmpeg memory that tracemalloc cannot see.
    alive, most_alive = [], 0
    resize = video.resize_short_side

    def counting_resize(image, short_side):
        nonlocal most_alive
        alive.append(weakref.ref(image))
        most_alive = max(most_alive, sum(ref() is not None for ref in alive))
        return resize(image, short_side)

    info = probe(shared_media / "counter.mp4")
    monkeypatch.setattr(video, "resize_short_side", counting_resize)
    tracemalloc.start()
    try:
        got = decode_at(info, list(info.frame_pts), short_side=336, backend=backend)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # All 30 frames at full resolution would be 30 * 6.2 MB; a chunk of 4 plus the small outputs is far less.
    assert peak < 8 * 1920 * 1080 * 3, f"peak {peak / (1920 * 1080 * 3):.1f} full frames"
    assert len(alive) == 30 and most_alive <= 4
    assert batches == ([4] * 7 + [2] if backend == "decord" else [])
    assert np.allclose([p for p, _ in got], info.frame_pts)
    for (_, image), ref in zip(got, counter_frames):
        assert image.shape == (336, 597, 3)
        assert np.abs(image.astype(np.int16) - resize(ref, 336)).mean() < 2.5


def test_decord_index_shifted_as_a_whole_falls_back_to_pyav(shared_media, counter_frames, monkeypatch):
    import decord

    # decord's frame i claims the time of our frame i + 1: every gap between requested frames still matches
    timestamps = decord.VideoReader.get_frame_timestamp
    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp",
                        lambda self, idx: timestamps(self, [i + 1 for i in idx]))
    info = probe(shared_media / "counter.mp4")
    times = [0.2, 1.0, 2.0]
    with pytest.raises(RuntimeError, match="disagree"):
        decode_at(info, times, backend="decord")
    got = decode_at(info, times, backend="auto")
    assert [round(p, 6) for p, _ in got] == times
    assert [_best_match(image, counter_frames)[0] for _, image in got] == [2, 10, 20]


def test_delayed_start_pts_come_from_the_stream(shared_media):
    info = probe(shared_media / "delayed_start.mp4")
    assert info.first_pts == pytest.approx(1.075, abs=1e-6)
    assert info.n_frames == 24
    assert np.allclose(np.diff(info.frame_pts), 0.04)
    assert info.duration == pytest.approx(0.96, abs=1e-6)
    # a time before the first frame maps to the first frame; times are absolute, not from 0
    got = decode_at(info, [0.0, 1.075, 1.5], backend="decord")
    assert [round(p, 4) for p, _ in got] == [1.075, 1.475]
    ref = decode_at(info, [1.075, 1.5], backend="pyav")
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(got, ref))


def test_variable_frame_rate_pts_equal_ffprobe(vfr_clip):
    info = probe(vfr_clip)
    expected = _ffprobe_frame_pts(vfr_clip)
    assert info.n_frames == len(expected) == 70
    assert np.allclose(info.frame_pts, expected, atol=1e-5)
    # index / avg_fps would put frame 20 at 20/22.3 s = 0.895 s; it is at 1.333 s
    assert abs(20 / info.avg_fps - info.frame_pts[20]) > 0.3
    times = [0.05, 0.95, 1.0, 1.34, 2.99]
    want = [0.0, 0.9, 1.0, 4 / 3, 2.9666667]
    for backend in ("decord", "pyav"):
        got = decode_at(info, times, backend=backend)
        assert np.allclose([p for p, _ in got], want, atol=1e-4), backend
    a, b = decode_at(info, times, backend="decord"), decode_at(info, times, backend="pyav")
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def test_resize_short_side_keeps_aspect_and_never_upscales():
    wide = np.zeros((1080, 1920, 3), np.uint8)
    tall = np.zeros((1920, 1080, 3), np.uint8)
    assert resize_short_side(wide, 336).shape == (336, 597, 3)
    assert resize_short_side(tall, 336).shape == (597, 336, 3)
    small = np.zeros((240, 320, 3), np.uint8)
    assert resize_short_side(small, 336) is small
    assert resize_short_side(wide, None) is wide


def test_jpeg_round_trip_is_close():
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 255, (12, 16, 3)), np.ones((20, 20, 1))).astype(np.uint8)
    back = decode_jpeg(encode_jpeg(image, 95))
    assert back.shape == image.shape and np.abs(back.astype(int) - image).mean() < 4


def test_bad_inputs_raise_video_error_with_category(tmp_path, shared_media):
    cases = bad_videos(tmp_path, shared_media)
    for path, category in cases.items():
        with pytest.raises(VideoError) as err:
            probe(path)
        assert err.value.category == category, (path.name, err.value.reason)
    with pytest.raises(VideoError) as err:
        probe(shared_media / "counter.mp4", max_pixels=1280 * 720)
    assert err.value.category == "too_large" and "1920x1080" in err.value.reason


def test_random_bytes_mid_file_are_recorded_corrupt(tmp_path, shared_media):
    """Damage past the header: the probe passes, decoding reaches it later; the video fails as `corrupt` (a
    category), not as an unexpected InvalidDataError."""
    from pipeline.stages.base import RunContext, WorkItem
    from pipeline.stages.frames import FramesConfig, FramesStage, sample_video

    data = bytearray((shared_media / "fades.mp4").read_bytes())
    n = len(data)
    data[n // 3: n // 3 + n // 10] = np.random.default_rng(0).integers(0, 256, n // 10, dtype=np.uint8).tobytes()
    path = tmp_path / "mid_noise.mp4"
    path.write_bytes(bytes(data))
    probe(path)   # the header and the first frame are intact
    with pytest.raises(VideoError) as err:
        sample_video(path)
    assert err.value.category == "corrupt"
    stage = FramesStage(FramesConfig(), RunContext(run_dir=tmp_path / "run", shard=0, models="tiny",
                                                   cache_dir=tmp_path, device="cpu"))
    item = WorkItem("noisy", str(path), 0, inputs={"download": {"videos": [{"video_id": "noisy", "path": str(path)}]}})
    result = stage.process_item(item)
    assert result.status == "failed" and result.reason.startswith("corrupt: "), result.reason
