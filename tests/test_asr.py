"""asr stage with the tiny faster-whisper model on real speech (Ray runner, real PyAV decode, real Silero VAD)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.stages.asr import AsrConfig, AsrStage
from pipeline.stages.base import RunContext, WorkItem


pytestmark = pytest.mark.usefixtures("ray_session")  # one Ray for the module (conftest)


def _item(i: int, video_id: str, path: Path) -> WorkItem:
    return WorkItem(video_id, str(path), i, inputs={"download": {"videos": [{"video_id": video_id,
                                                                            "path": str(path)}]}})


@pytest.fixture(scope="module")
def media(tmp_path_factory, shared_media) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("asr-media")
    ff = ["ffmpeg", "-loglevel", "error", "-y"]
    subprocess.run(ff + ["-i", str(shared_media / "speech_lecture.mp3"), "-t", "60", "-c", "copy",
                         str(d / "lecture60.mp3")], check=True)
    subprocess.run(ff + ["-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo", "-t", "20", str(d / "silent.wav")],
                   check=True)
    subprocess.run(ff + ["-f", "lavfi", "-i", "color=c=black:s=64x64:d=2", str(d / "no_audio.mp4")], check=True)
    (d / "truncated.mp4").write_bytes((shared_media / "speech_cuts_1080p.mp4").read_bytes()[:30000])
    return {"lecture": d / "lecture60.mp3", "cuts": shared_media / "speech_cuts_1080p.mp4",
            "silent": d / "silent.wav", "no_audio": d / "no_audio.mp4", "truncated": d / "truncated.mp4"}


@pytest.fixture(scope="module")
def results(media, cache_dir, tmp_path_factory):
    ctx = RunContext(run_dir=tmp_path_factory.mktemp("asr-run"), shard=0, models="tiny", cache_dir=cache_dir,
                     device="cpu")
    stage = AsrStage(AsrConfig(), ctx)
    items = [_item(i, vid, path) for i, (vid, path) in enumerate(sorted(media.items()))]
    out = {r.video_id: r for r in stage.process(items)}
    return out, stage.shard_stats()


def _tiny_languages(cache_dir) -> set[str]:
    """The language codes of the tiny model's tokenizer that CTranslate2 detects among (its lang_ids)."""
    import json

    from tokenizers import Tokenizer

    from pipeline.models.whisper import model_path

    path = Path(model_path("medium", "tiny", cache_dir))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return {tok.id_to_token(i)[2:-2] for i in json.loads((path / "config.json").read_text())["lang_ids"]}


def _assert_well_formed(res, video_id: str, duration: float) -> None:
    """What every ok result with speech must satisfy, whichever faster-whisper path produced it."""
    assert res.status == "ok" and res.note == ""
    segments, videos = res.rows["segments"], res.rows["videos"]
    # the engine builds tables with the stage's schemas: they must accept the rows
    table = pa.Table.from_pylist(segments, schema=AsrStage.schemas["segments"])
    pa.Table.from_pylist(videos, schema=AsrStage.schemas["videos"])
    assert table.num_rows >= 1
    assert all(set(s) == set(AsrStage.schemas["segments"].names) for s in segments)
    assert [set(v) for v in videos] == [set(AsrStage.schemas["videos"].names)]
    assert [s["segment_idx"] for s in segments] == list(range(len(segments)))
    [video] = videos
    assert video["video_id"] == video_id and video["n_segments"] == len(segments) and video["has_speech"] is True
    assert video["duration"] == pytest.approx(duration, abs=0.2)
    n_words = 0
    for s in segments:
        assert s["video_id"] == video_id
        assert (s["language"], s["language_probability"]) == (video["language"], video["language_probability"])
        assert 0.0 <= s["start"] <= s["end"] <= video["duration"]
        assert 0.0 <= s["no_speech_prob"] <= 1.0 and s["avg_logprob"] <= 0.0
        for w in s["words"]:
            n_words += 1
            assert set(w) == {"word", "start", "end", "probability"}
            assert s["start"] - 0.02 <= w["start"] <= w["end"] <= s["end"] + 0.02
            assert 0.0 <= w["probability"] <= 1.0
    assert n_words > 0


@pytest.mark.parametrize("video_id, duration", [("lecture", 60.0), ("cuts", 122.7)])
def test_segments_are_well_formed(results, video_id, duration):
    res = results[0][video_id]
    _assert_well_formed(res, video_id, duration)
    segments = res.rows["segments"]
    starts = [s["start"] for s in segments]
    assert starts == sorted(starts)  # sentences re-cut from the words of all chunks, in time order
    for s in segments:  # a row's text is its words, from its first word's start to its last word's end
        assert "".join(w["word"] for w in s["words"]).strip() == s["text"]
        assert s["start"] == s["words"][0]["start"] and s["end"] == max(w["end"] for w in s["words"])
    for a, b in zip(segments, segments[1:]):
        assert a["end"] <= b["start"]


@pytest.mark.parametrize("video_id", ["lecture", "cuts"])
def test_language_is_detected_by_the_model(results, cache_dir, video_id):
    """language=null (the default) runs Whisper's language detection; the tiny model is multilingual, so this is
    the model's own choice among its language tokens, not the English-only shortcut ("en" with probability 1)."""
    video = results[0][video_id].rows["videos"][0]
    assert video["language"] in _tiny_languages(cache_dir)
    assert 0.0 < video["language_probability"] < 1.0


def test_speech_is_found_where_the_vad_finds_it(results):
    # the lecture speaks from the first seconds; the VAD (real Silero weights) must place segments there
    segments = results[0]["lecture"].rows["segments"]
    assert segments[0]["start"] < 10.0


def test_silence_is_no_speech_not_failure(results):
    res = results[0]["silent"]
    assert res.status == "ok" and res.note == "no_speech"
    assert res.rows["segments"] == []
    assert res.rows["videos"][0]["has_speech"] is False and res.rows["videos"][0]["n_segments"] == 0


def test_bad_media_is_recorded(results):
    out = results[0]
    assert out["no_audio"].status == "failed" and out["no_audio"].reason.startswith("no_audio:")
    assert out["truncated"].status == "failed" and out["truncated"].reason.startswith("corrupt:")


def test_runner_stats_are_reported(results):
    stats = results[1]
    assert stats["runner_items"] == 5 and stats["runner_ok"] == 3 and stats["runner_failed"] == 2
    assert 0.0 < stats["model_busy_fraction"] <= 1.0
    assert stats["runner_peak_rss_mb_model"] > 0


@pytest.fixture(scope="module")
def clip15(media, tmp_path_factory) -> Path:
    clip = tmp_path_factory.mktemp("asr-clip") / "lecture15.wav"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(media["lecture"]), "-t", "15", str(clip)],
                   check=True)
    return clip


def _run_inline(cfg: AsrConfig, clip: Path, cache_dir, run_dir):
    cfg.runner.backend = "inline"
    ctx = RunContext(run_dir=run_dir, shard=0, models="tiny", cache_dir=cache_dir, device="cpu")
    [res] = list(AsrStage(cfg, ctx).process([_item(0, "lecture15", clip)]))
    return res


def test_sequential_path_matches_structure(clip15, cache_dir, tmp_path):
    """batch_size=1 uses WhisperModel.transcribe (timestamps decoded by the model) instead of the batched pipeline;
    both must give rows of the same shape on the same audio."""
    seq = _run_inline(AsrConfig(batch_size=1, beam_size=1), clip15, cache_dir, tmp_path / "seq")
    bat = _run_inline(AsrConfig(batch_size=8, beam_size=1), clip15, cache_dir, tmp_path / "bat")
    for res in (seq, bat):
        _assert_well_formed(res, "lecture15", 15.0)
    # Both paths re-cut their decoded words into sentences; with the random model their texts differ (the
    # sequential decoder is prompted with its previous text and emits timestamp tokens), so the rows' shape, the
    # audio they cover and the language detected from the same speech must agree.
    (seq_video,), (bat_video,) = seq.rows["videos"], bat.rows["videos"]
    assert seq_video["duration"] == bat_video["duration"]
    assert seq_video["language"] == bat_video["language"]
    assert seq_video["language_probability"] == pytest.approx(bat_video["language_probability"], rel=0.1)
    from pipeline.stages.asr import ends_sentence

    for res in (seq, bat):  # rows are sentences: a word that ends a sentence ends its row
        segments = res.rows["segments"]
        assert len(segments) >= 2
        assert sum(bool(s["words"]) for s in segments) >= 2
        for s in segments:
            assert not any(ends_sentence(w["word"]) for w in s["words"][:-1])


def test_batched_without_vad_decodes_fixed_windows(media, cache_dir, tmp_path):
    """vad_filter=false: the batched pipeline gets explicit 30 s windows (clip_timestamps, in seconds)."""
    from pipeline.stages.asr import _fixed_windows

    assert _fixed_windows(70.0, 30.0) == [{"start": 0.0, "end": 30.0}, {"start": 30.0, "end": 60.0},
                                          {"start": 60.0, "end": 70.0}]
    cfg = AsrConfig(batch_size=8, beam_size=1, vad_filter=False)
    cfg.runner.backend = "inline"
    ctx = RunContext(run_dir=tmp_path, shard=0, models="tiny", cache_dir=cache_dir, device="cpu")
    [res] = list(AsrStage(cfg, ctx).process([_item(0, "lecture", media["lecture"])]))
    _assert_well_formed(res, "lecture", 60.0)
    segments, duration = res.rows["segments"], res.rows["videos"][0]["duration"]
    windows = _fixed_windows(duration, 30.0)  # the copied 60 s mp3 runs a few ms over: a short third window
    # each window is decoded and aligned on its own: every word lies inside one window (rows are then re-cut
    # into sentences over the words of all windows)
    words = [w for s in segments for w in s["words"]]
    assert words and all(any(x["start"] <= w["start"] <= w["end"] <= x["end"] for x in windows) for w in words)


@pytest.mark.parametrize("language", ["en", "de"])
def test_configured_language_is_forced(clip15, cache_dir, tmp_path, language):
    """A configured language skips detection: it is recorded with probability 1 (and "de" stays "de", which an
    English-only model would replace by "en")."""
    res = _run_inline(AsrConfig(language=language, beam_size=1), clip15, cache_dir, tmp_path)
    _assert_well_formed(res, "lecture15", 15.0)
    assert res.rows["videos"][0]["language"] == language
    assert res.rows["videos"][0]["language_probability"] == 1.0


def test_asr_through_the_cli_and_a_rerun_does_nothing(media, cache_dir, tmp_path):
    import json

    import pyarrow.parquet as pq
    from conftest import run_cli

    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"lecture {media['lecture']}\nno_audio {media['no_audio']}\n")
    run_dir = tmp_path / "run"
    env = {"VPT_CACHE_DIR": str(cache_dir)}
    run_cli("stage=download", "launcher=local", f"run_dir={run_dir}", f"input={manifest}", "models=tiny", env=env)
    run_cli("stage=asr", "launcher=local", f"run_dir={run_dir}", "models=tiny", env=env)
    shard = run_dir / "asr" / "shard-00000"
    segments = pq.read_table(shard / "segments.parquet")
    assert segments.num_rows >= 1 and set(segments.column("video_id").to_pylist()) == {"lecture"}
    ledger = {r["video_id"]: r for r in pq.read_table(shard / "ledger.parquet").to_pylist()}
    assert ledger["lecture"]["status"] == "ok"
    assert ledger["no_audio"]["status"] == "failed" and ledger["no_audio"]["reason"].startswith("no_audio:")
    stats = json.loads((shard / "stats.json").read_text())
    assert stats["runner_backend"] == "ray" and 0 < stats["model_busy_fraction"] <= 1
    before = (shard / "_SUCCESS").stat().st_mtime_ns
    run_cli("stage=asr", "launcher=local", f"run_dir={run_dir}", "models=tiny", env=env)
    assert (shard / "_SUCCESS").stat().st_mtime_ns == before          # complete shard: nothing redone
    assert pq.read_table(shard / "segments.parquet").equals(segments)


def test_audio_that_starts_late_keeps_its_place_on_the_frames_timeline(tmp_path, shared_media):
    """ASR and audio times index `load_audio` samples; frames carry container PTS. An audio track that starts 2 s
    into the video must come out 2 s later than the same audio starting at 0, not shifted onto the first frames."""
    import numpy as np

    from pipeline.audio import SAMPLE_RATE, load_audio

    ff = ["ffmpeg", "-v", "error", "-y"]
    late, on_time = tmp_path / "late.mp4", tmp_path / "on_time.m4a"
    subprocess.run(ff + ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-itsoffset", "2",
                         "-i", str(shared_media / "speech_lecture.mp3"), "-t", "8", "-map", "0:v", "-map", "1:a",
                         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(late)], check=True)
    subprocess.run(ff + ["-i", str(shared_media / "speech_lecture.mp3"), "-t", "6", "-c:a", "aac", str(on_time)],
                   check=True)

    def onset(audio: np.ndarray) -> float:
        return float(np.argmax(np.abs(audio) > 0.02)) / SAMPLE_RATE

    a, b = load_audio(late), load_audio(on_time)
    assert onset(b) < 1.5  # speech within the first second and a half
    assert abs(onset(a) - onset(b) - 2.0) < 0.01
    assert np.abs(a[: int(1.9 * SAMPLE_RATE)]).max() < 1e-3  # what precedes the track is silence
    assert abs(len(a) / SAMPLE_RATE - 8.0) < 0.1  # and the track still ends where the video does
