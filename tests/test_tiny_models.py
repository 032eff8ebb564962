"""Tiny random models built locally go through the same loading code as real checkpoints."""
from __future__ import annotations

import numpy as np

from pipeline.models import clip as clip_models
from pipeline.models import whisper as whisper_models


def test_tiny_whisper_is_a_complete_faster_whisper_model(cache_dir):
    path = whisper_models.model_path("medium", "tiny", cache_dir)
    files = {p.name for p in (cache_dir / "tiny" / "whisper").iterdir()}
    # tokenizer.json in the CT2 dir is what keeps faster-whisper off the hub
    assert {"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"} <= files
    mtime = (cache_dir / "tiny" / "whisper" / "model.bin").stat().st_mtime_ns
    assert whisper_models.model_path("medium", "tiny", cache_dir) == path          # cached, not rebuilt
    assert (cache_dir / "tiny" / "whisper" / "model.bin").stat().st_mtime_ns == mtime

    model = whisper_models.load_whisper(path, device="cpu", compute_type="auto")
    tok = model.hf_tokenizer
    notimestamps = tok.token_to_id("<|notimestamps|>")
    assert tok.token_to_id("<|0.00|>") == notimestamps + 1                          # timestamp_begin
    assert tok.token_to_id("<|30.00|>") == notimestamps + 1501
    # one second of a tone decodes end to end (garbage text, real machinery)
    audio = (0.1 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    segments, info = model.transcribe(audio, beam_size=1, temperature=0.0, vad_filter=False)
    list(segments)
    assert info.duration == 1.0 and info.language in whisper_models.LANGUAGES  # detected: the model is multilingual
    assert model.model.is_multilingual


def test_compute_type_follows_device():
    assert whisper_models.resolve_compute_type("auto", "cpu") == "int8"
    assert whisper_models.resolve_compute_type("auto", "cuda") == "float16"
    assert whisper_models.resolve_compute_type("int8_float16", "cuda") == "int8_float16"
    assert clip_models.resolve_precision("auto", "cpu") == "fp32"
    assert clip_models.resolve_precision("auto", "cuda") == "fp16"


def test_tiny_clip_loads_its_saved_weights(cache_dir):
    import torch

    name, pretrained = clip_models.resolve("ViT-L-14-336", "openai", "tiny", cache_dir)
    assert name == clip_models.TINY_MODEL and pretrained.endswith(".pt")
    saved = torch.load(pretrained, weights_only=True)
    model = clip_models.load_clip(name, pretrained)
    loaded = model.state_dict()
    key = "visual.conv1.weight"
    assert torch.equal(loaded[key], saved[key])          # weights came from the file, not a fresh init
    assert model.visual.output_dim == clip_models.TINY_CONFIG["embed_dim"]
    # real names resolve to themselves: users with weights take the same path
    assert clip_models.resolve("ViT-L-14-336", "openai", "real", cache_dir) == ("ViT-L-14-336", "openai")
    assert whisper_models.model_path("medium", "real", cache_dir) == "medium"
