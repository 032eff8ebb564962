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
    # no audio stream: ok, no segments, the media's 2 s as its duration (downstream it gets visual-only windows)
    assert out["no_audio"].status == "ok" and out["no_audio"].note == "no_audio"
    assert not out["no_audio"].rows.get("segments")
    assert out["no_audio"].rows["videos"][0]["duration"] == pytest.approx(2.0, abs=0.05)
    assert out["truncated"].status == "failed" and out["truncated"].reason.startswith("corrupt:")


def test_runner_stats_are_reported(results):
    stats = results[1]
    assert stats["runner_items"] == 5 and stats["runner_ok"] == 4 and stats["runner_failed"] == 1   # truncated
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
    assert ledger["no_audio"]["status"] == "ok" and ledger["no_audio"]["note"] == "no_audio"
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


# --- segmentation and filter on hand-made decoder output (unit tests: the expected rows are worked out by hand) ---

def _unit(words: list[tuple[str, float, float]], nsp=0.01, lp=-0.2, cr=1.5) -> dict:
    ws = [{"word": w, "start": a, "end": b, "probability": 0.9} for w, a, b in words]
    return {"start": ws[0]["start"] if ws else 0.0, "end": ws[-1]["end"] if ws else 0.0,
            "text": "".join(w for w, _, _ in words).strip(), "words": ws, "no_speech_prob": nsp,
            "avg_logprob": lp, "compression_ratio": cr}


def test_sentences_are_cut_after_sentence_ends_not_after_titles():
    from pipeline.stages.asr import split_sentences

    unit = _unit([(" Hello", 0.0, 0.4), (" there.", 0.5, 0.9), (" Dr.", 1.2, 1.4), (" Smith", 1.5, 1.9),
                  (" is", 2.0, 2.1), (" here!", 2.2, 2.6), (" Is", 2.9, 3.0), (" it", 3.1, 3.2),
                  (' "true?"', 3.3, 3.8), (" J.", 4.0, 4.2), (" Doe", 4.3, 4.6), (" says", 4.7, 5.0)])
    rows = split_sentences([unit], max_segment_s=15.0, max_pause_s=3.0)
    assert [r["text"] for r in rows] == ["Hello there.", "Dr. Smith is here!", 'Is it "true?"', "J. Doe says"]
    assert [(r["start"], r["end"]) for r in rows] == [(0.0, 0.9), (1.2, 2.6), (2.9, 3.8), (4.0, 5.0)]
    assert [len(r["words"]) for r in rows] == [2, 4, 3, 3]


def test_sentences_span_decoded_chunks_and_take_the_worst_quality():
    """A sentence begun at the end of one batched chunk and finished in the next is one row; its quality fields
    are the worse of the two chunks'."""
    from pipeline.stages.asr import split_sentences

    a = _unit([(" One", 0.0, 0.3), (" two.", 0.4, 0.8), (" Three", 1.0, 1.3)], nsp=0.1, lp=-0.3, cr=1.2)
    b = _unit([(" four.", 1.5, 1.9), (" Five.", 2.0, 2.4)], nsp=0.05, lp=-0.5, cr=1.9)
    rows = split_sentences([b, a], max_segment_s=15.0, max_pause_s=3.0)   # any order in: time order out
    assert [r["text"] for r in rows] == ["One two.", "Three four.", "Five."]
    assert [(r["no_speech_prob"], r["avg_logprob"], r["compression_ratio"]) for r in rows] == [
        (0.1, -0.3, 1.2), (0.1, -0.5, 1.9), (0.05, -0.5, 1.9)]


def test_long_pauses_and_long_sentences_are_cut():
    from pipeline.stages.asr import split_sentences

    # a 4 s pause ends a row even mid-sentence
    rows = split_sentences([_unit([(" and", 0.0, 0.2), (" so", 0.3, 0.5), (" on", 4.5, 4.7)])], 15.0, 3.0)
    assert [r["text"] for r in rows] == ["and so", "on"]
    # a 16 s run without a sentence end (max 15 s) is cut at its longest pause (1.2 s, before " w7"), the parts
    # then fit; a pause after a comma counts 0.3 s more than a plain one
    words = [(f" w{i}", 2.0 * i, 2.0 * i + 1.0) for i in range(7)] + [(" w7", 15.2, 16.0)]
    rows = split_sentences([_unit(words)], 15.0, 3.0)
    assert [len(r["words"]) for r in rows] == [7, 1]
    words = [(f" w{i}", 1.0 * i, 1.0 * i + 0.9) for i in range(20)]
    words[6] = (" w6,", 6.0, 6.9)
    rows = split_sentences([_unit(words)], 15.0, 3.0)
    assert [r["text"].split()[0] for r in rows] == ["w0", "w7"]
    assert all(r["end"] - r["start"] <= 15.0 for r in rows)


def _rows(texts, quality: dict | None = None) -> list[dict]:
    out = []
    for i, t in enumerate(texts):
        row = _unit([(" " + t, float(i), i + 0.5)] if t else [])
        row.update(start=float(i), end=i + 0.5, text=t)
        row.update((quality or {}).get(i, {}))
        out.append(row)
    return out


def test_filter_drops_or_marks_hallucinations():
    from pipeline.stages.asr import filter_segments

    quality = {1: {"no_speech_prob": 0.9, "avg_logprob": -1.5},    # silence decoded as words: no_speech
               2: {"no_speech_prob": 0.9, "avg_logprob": -0.3},    # confident despite no_speech_prob: kept
               3: {"compression_ratio": 3.1},                      # a looping decoder
               4: {"avg_logprob": -2.5}}                           # low confidence (checked only when configured)
    rows = _rows(["Alpha.", "Thanks for watching.", "Beta.", "go go go go go", "Gamma."], quality)
    kept, dropped = filter_segments(rows, AsrConfig())
    assert [r["text"] for r in kept] == ["Alpha.", "Beta.", "Gamma."] and dropped == 2
    assert all(r["quality_flags"] == "" for r in kept)
    kept, dropped = filter_segments(rows, AsrConfig(min_avg_logprob=-2.0))
    assert [r["text"] for r in kept] == ["Alpha.", "Beta."] and dropped == 3
    kept, dropped = filter_segments(rows, AsrConfig(filter_action="mark", min_avg_logprob=-2.0))
    assert [r["quality_flags"] for r in kept] == ["", "no_speech", "", "compression", "low_logprob"]
    assert dropped == 0
    kept, dropped = filter_segments(rows, AsrConfig(filter_action="off", min_avg_logprob=-2.0))
    assert len(kept) == 5 and dropped == 0 and all(r["quality_flags"] == "" for r in kept)
    with pytest.raises(ValueError):
        AsrConfig(filter_action="keep")


def test_repeats_and_empty_rows_are_always_dropped():
    from pipeline.stages.asr import filter_segments

    texts = ["Thank you.", "thank you!", "Thank you", "Yes.", "No.", "Yes, no.", "...", "", "Okay.", "Yes."]
    for action in ("drop", "mark", "off"):
        kept, dropped = filter_segments(_rows(texts), AsrConfig(filter_action=action))
        # "thank you!" repeats the row before; "Yes, no." the two before joined; "..." and "" have no words;
        # the last "Yes." is not an immediate repeat (Okay. comes between)
        assert [r["text"] for r in kept] == ["Thank you.", "Yes.", "No.", "Okay.", "Yes."]
        assert dropped == 5


@pytest.mark.parametrize("prev_segments", [1, 2, 3])
def test_prev_text_never_equals_the_rows_text(prev_segments):
    """Through the join that builds prev_text: raw decoder rows with repeats give rows whose prev_text is their own
    text (the defect); the stage's rows never do."""
    from pipeline.join import JoinParams, join_video
    from pipeline.stages.asr import filter_segments

    texts = ["Thank you.", "Thank you.", "Thank you.", "Right.", "So.", "Right. So.", "Right.", "So.",
             "Right so", "Next one.", "Bye."]

    def joined(rows):
        inputs = {"asr": {"segments": [{**r, "segment_idx": i} for i, r in enumerate(rows)]}}
        out, _ = join_video("v", inputs, JoinParams(prev_segments=prev_segments), 0, {})
        return out

    raw = joined(_rows(texts))
    assert any(r["prev_text"] == r["text"] for r in raw)
    kept, _ = filter_segments(_rows(texts), AsrConfig())
    rows = joined(kept)
    assert [r["text"] for r in rows] == ["Thank you.", "Right.", "So.", "Right.", "So.", "Next one.", "Bye."]
    assert all(r["prev_text"] != r["text"] for r in rows)
    assert rows[0]["prev_text"] == "" and rows[1]["prev_text"].endswith("Thank you.")


@pytest.mark.parametrize("override", ["stage.filter_action=keep", "stage.split=words"])
def test_bad_segmentation_or_filter_setting_is_a_one_line_error(tmp_path, override):
    from conftest import run_cli

    manifest = tmp_path / "m.txt"
    manifest.write_text("a /nonexistent.mp3\n")
    proc = run_cli("stage=asr", f"run_dir={tmp_path / 'run'}", f"input={manifest}", "models=tiny", override,
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "expected one of" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_cli_runs_the_dataclass_defaults(tmp_path):
    """conf/stage/asr.yaml only names its schema: `python -m pipeline stage=asr` runs AsrConfig's defaults, the
    segmentation and filter settings included (with their types)."""
    import dataclasses

    from omegaconf import OmegaConf

    from pipeline.config import compose

    composed = OmegaConf.to_container(compose(["stage=asr", f"run_dir={tmp_path}"]).stage)
    cfg = AsrConfig()
    assert composed == dataclasses.asdict(cfg)
    for key in ("split", "max_segment_s", "max_pause_s", "filter_action", "no_speech_threshold",
                "logprob_threshold", "min_avg_logprob", "compression_ratio_threshold"):
        assert key in composed and type(composed[key]) is type(getattr(cfg, key)), key
