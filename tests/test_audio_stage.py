"""audio stage: PANNs Cnn14 over exactly the ASR segment spans (or fixed windows), on real media."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models import panns
from pipeline.stages.audio import (AUDIO_SCHEMA, AudioConfig, AudioStage, Span, cut_span, padded_samples,
                                   plan_spans)

SR = panns.SAMPLE_RATE


def test_labels_ship_with_the_package():
    labels = panns.audioset_labels()
    assert len(labels) == 527
    assert (labels[0], labels[137], labels[526]) == ("Speech", "Music", "Field recording")


def test_published_cnn14_layout():
    model = panns.Cnn14()
    keys = model.state_dict().keys()
    assert sum(p.numel() for p in model.parameters()) == 81_837_071     # 81.8 M, as published
    assert {"spectrogram_extractor.stft.conv_real.weight", "logmel_extractor.melW", "bn0.running_mean",
            "conv_block6.conv2.weight", "fc1.weight", "fc_audioset.bias"} <= set(keys)
    assert model.fc1.in_features == 2048 and model.fc_audioset.out_features == 527


def test_checkpoint_loads_by_path(tmp_path):
    path = panns.tiny_checkpoint(tmp_path)
    assert torch.load(path, weights_only=True)["model"].keys() == panns.Cnn14(channels=panns.TINY_CHANNELS).state_dict().keys()
    model = panns.load_cnn14(path, channels=panns.TINY_CHANNELS)
    with torch.inference_mode():
        out = model(torch.zeros(2, SR))
    assert out["embedding"].shape == (2, 2048) and out["clipwise_output"].shape == (2, 527)
    with pytest.raises(FileNotFoundError):
        panns.load_cnn14(tmp_path / "Cnn14_mAP=0.431.pth")


def test_span_planning_and_padding():
    segs = [{"segment_idx": 1, "start": 2.5, "end": 4.0}, {"segment_idx": 0, "start": 0.0, "end": 2.5}]
    assert [(s.segment_idx, s.start, s.end) for s in plan_spans(segs, 30.0, 10.0)] == [(0, 0.0, 2.5), (1, 2.5, 4.0)]
    windows = plan_spans([], 25.0, 10.0)
    assert [(s.start, s.end) for s in windows] == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert [(s.start, s.end) for s in plan_spans([], 20.3, 10.0)] == [(0.0, 10.0), (10.0, 20.3)]  # no sliver
    short = Span(0, 1.0, 1.2, "asr_segment")
    assert padded_samples(short, 1.0, 1.0) == SR                         # padded up to the model minimum
    assert padded_samples(Span(0, 0.0, 2.5, "x"), 1.0, 1.0) == 3 * SR    # to a multiple of pad_multiple_s
    audio = np.arange(3 * SR, dtype=np.float32)
    piece = cut_span(audio, Span(0, 1.0, 1.5, "x"), SR)
    assert piece[0] == SR and piece[SR // 2 - 1] == 1.5 * SR - 1 and not piece[SR // 2:].any()


@pytest.fixture(scope="module")
def media(shared_media, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audio-media")
    speech = root / "speech30.mp4"   # real speech, trimmed to 30 s
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(shared_media / "speech_cuts_1080p.mp4"), "-t", "30",
                    "-c", "copy", str(speech)], check=True)
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    return {"speech": speech, "silent_video": shared_media / "counter.mp4", "corrupt": corrupt}


def item(video_id, path, segments=None):
    from pipeline.stages.base import WorkItem

    segments = [{"video_id": video_id, **s} for s in segments or []]
    return WorkItem(video_id, str(path), 0, {"download": {"videos": [{"video_id": video_id, "path": str(path)}]},
                                             "asr": {"segments": segments,
                                                     "videos": [{"video_id": video_id, "has_speech": bool(segments)}]}})


def run_stage(items, cache_dir, tmp_path, **knobs):
    from pipeline.inference.runner import RunnerConfig
    from pipeline.stages.base import RunContext

    cfg = AudioConfig(runner=RunnerConfig(batch_size=2, max_in_flight=4, backend="inline"), **knobs)
    ctx = RunContext(run_dir=tmp_path, shard=0, models="tiny", cache_dir=cache_dir, device="cpu")
    stage = AudioStage(cfg, ctx)
    return {r.video_id: r for r in stage.process(items)}, stage.shard_stats()


SEGMENTS = [{"segment_idx": 0, "start": 0.0, "end": 3.24, "text": "a"},
            {"segment_idx": 1, "start": 3.24, "end": 3.61, "text": "b"},      # shorter than the model minimum
            {"segment_idx": 2, "start": 5.5, "end": 17.125, "text": "c"},
            {"segment_idx": 3, "start": 28.0, "end": 31.5, "text": "d"}]      # runs past the end of the file


def test_spans_equal_asr_segments_and_windows(media, cache_dir, tmp_path):
    import pyarrow as pa

    results, stats = run_stage([item("speech", media["speech"], SEGMENTS), item("nospeech", media["speech"])],
                               cache_dir, tmp_path, top_k=3, window_s=10.0)
    rows = results["speech"].rows["audio"]
    pa.Table.from_pylist(rows, schema=AUDIO_SCHEMA)                      # the declared schema holds them
    assert [(r["segment_idx"], r["start"], r["end"]) for r in rows] == \
        [(s["segment_idx"], s["start"], s["end"]) for s in SEGMENTS]    # exactly the spans claimed
    assert [r["model_seconds"] for r in rows] == [4.0, 1.0, 12.0, 4.0]
    labels = set(panns.audioset_labels())
    for r in rows:
        assert r["source"] == "asr_segment"
        assert r["embedding"].dtype == np.float16 and r["embedding"].shape == (2048,)
        assert len(r["labels"]) == 3 and set(r["labels"]) <= labels
        assert r["scores"] == sorted(r["scores"], reverse=True) and all(0 <= s <= 1 for s in r["scores"])
    assert not np.array_equal(rows[0]["embedding"], rows[2]["embedding"])   # different audio, different embedding

    windows = results["nospeech"].rows["audio"]
    assert results["nospeech"].note == "no_speech_windows"
    assert all(r["source"] == "window" for r in windows)
    assert windows[0]["start"] == 0.0 and windows[-1]["end"] == pytest.approx(30.0, abs=0.05)
    assert all(a["end"] == b["start"] for a, b in zip(windows, windows[1:]))     # contiguous, no gaps
    assert all(r["end"] - r["start"] <= 10.0 + 1.0 for r in windows)
    assert stats["runner_batches"] >= 1 and 0 < stats["model_busy_fraction"] <= 1


def test_result_does_not_depend_on_batch_companions(media, cache_dir, tmp_path):
    """Span 0 (4 s) alone in its network call, then batched with span 3 (also padded to 4 s): bit-identical."""
    alone, _ = run_stage([item("speech", media["speech"], SEGMENTS[:1])], cache_dir, tmp_path)
    together, _ = run_stage([item("speech", media["speech"], SEGMENTS)], cache_dir, tmp_path)
    a, b = alone["speech"].rows["audio"][0], together["speech"].rows["audio"][0]
    assert a["embedding"].tobytes() == b["embedding"].tobytes()
    assert (a["labels"], a["scores"]) == (b["labels"], b["scores"])


def test_two_runs_with_different_batching_give_identical_outputs(media, cache_dir, tmp_path):
    """Run to run, which videos share a predict() call varies (decode order under Ray); here it is forced to
    differ (one video per call vs four), and every output is bit-identical."""
    items = lambda: [item("speech", media["speech"], SEGMENTS), item("first", media["speech"], SEGMENTS[:1]),
                     item("short", media["speech"], SEGMENTS[1:2]), item("nospeech", media["speech"])]

    def outputs(batch_size: int, max_in_flight: int):
        from pipeline.inference.runner import RunnerConfig

        cfg = AudioConfig(runner=RunnerConfig(batch_size=batch_size, max_in_flight=max_in_flight, backend="inline"))
        from pipeline.stages.base import RunContext

        ctx = RunContext(run_dir=tmp_path, shard=0, models="tiny", cache_dir=cache_dir, device="cpu")
        results = {r.video_id: r for r in AudioStage(cfg, ctx).process(items())}
        return {(vid, r["segment_idx"]): (r["start"], r["end"], r["model_seconds"], r["embedding"].tobytes(),
                                          r["labels"], r["scores"])
                for vid, res in results.items() for r in res.rows["audio"]}

    one, four = outputs(1, 1), outputs(4, 8)
    assert len(one) == 4 + 1 + 1 + 3 and one.keys() == four.keys()
    assert one == four


def test_bad_input_is_a_recorded_failure(media, cache_dir, tmp_path):
    results, _ = run_stage([item("silent", media["silent_video"]), item("corrupt", media["corrupt"]),
                            item("missing", media["corrupt"].with_name("missing.mp4")),
                            item("fine", media["speech"], SEGMENTS[:1])], cache_dir, tmp_path)
    # no audio stream (counter.mp4 has only a video stream): ok, no span rows, recorded as such
    assert results["silent"].status == "ok" and results["silent"].note == "no_audio"
    assert results["silent"].rows == {"videos": [{"video_id": "silent", "has_audio": False}]}
    assert results["corrupt"].status == "failed" and results["corrupt"].reason.startswith("corrupt:")
    assert results["missing"].status == "failed" and results["missing"].reason.startswith("corrupt:")
    assert results["fine"].status == "ok" and len(results["fine"].rows["audio"]) == 1
    assert results["fine"].rows["videos"] == [{"video_id": "fine", "has_audio": True}]


def test_cli_audio_after_asr_joins_segments_by_key(media, cache_dir, tmp_path):
    """download -> asr -> audio through `python -m pipeline` (local launcher, Ray runner, tiny models)."""
    import pyarrow.parquet as pq
    from conftest import run_cli

    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"speech {media['speech']}\nsilent {media['silent_video']}\n")
    run_dir = tmp_path / "run"
    env = {"VPT_CACHE_DIR": str(cache_dir)}
    for stage in ("download", "asr", "audio"):
        run_cli(f"stage={stage}", "launcher=local", f"run_dir={run_dir}", f"input={manifest}", "models=tiny",
                env=env)
    shard = run_dir / "audio" / "shard-00000"
    assert (shard / "_SUCCESS").exists()
    audio = pq.read_table(shard / "audio.parquet").to_pylist()
    segments = pq.read_table(run_dir / "asr" / "shard-00000" / "segments.parquet").to_pylist()
    spans = {(r["video_id"], r["segment_idx"]): (r["start"], r["end"]) for r in audio}
    if segments:   # the tiny ASR model may or may not emit segments: each one must have its exact span here
        assert {(s["video_id"], s["segment_idx"]): (s["start"], s["end"]) for s in segments
                if s["video_id"] == "speech"}.items() <= spans.items()
    assert any(vid == "speech" for vid, _ in spans)
    ledger = {r["video_id"]: r for r in pq.read_table(shard / "ledger.parquet").to_pylist()}
    assert ledger["speech"]["status"] == "ok"
    assert ledger["silent"]["status"] == "ok" and ledger["silent"]["note"] == "no_audio"
    videos = {r["video_id"]: r["has_audio"] for r in pq.read_table(shard / "videos.parquet").to_pylist()}
    assert videos == {"speech": True, "silent": False}
