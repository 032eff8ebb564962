"""faster-whisper models: real ones by size name or local CTranslate2 directory, and a tiny random one.

Real: `load_whisper("medium", ...)` lets faster-whisper resolve the size name (its hub download) or a local
CTranslate2 directory. Tiny (`models=tiny`): a 2-layer random transformers Whisper with its own byte-level BPE
tokenizer carrying Whisper's special tokens, converted to CTranslate2 once and cached under
`<cache_dir>/tiny/whisper`. It produces garbage text but exercises the exact same decoding, VAD, batching and
word-timestamp code as the real model.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

TINY_NAME = "whisper"
TINY_SEED = 0
# The special tokens of Whisper's tokenizer, in the order faster-whisper's Tokenizer expects them; the
# timestamp tokens must directly follow <|notimestamps|> (timestamp_begin = no_timestamps + 1).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>",
    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
] + [f"<|{i * 0.02:.2f}|>" for i in range(1501)]


def resolve_compute_type(compute_type: str, device: str) -> str:
    """`auto` -> int8 on CPU, float16 on GPU; anything else is passed to CTranslate2 as is."""
    if compute_type != "auto":
        return compute_type
    return "float16" if device == "cuda" else "int8"


def model_path(model: str, models: str, cache_dir: Path) -> str:
    """What `WhisperModel` should load: the tiny model's directory, or the configured size name / path."""
    if models == "tiny":
        return str(build_tiny_whisper(Path(cache_dir) / "tiny" / TINY_NAME))
    return model


def load_whisper(model: str, device: str = "cpu", compute_type: str = "auto", cpu_threads: int = 0,
                 num_workers: int = 1):
    """A `faster_whisper.WhisperModel` from a size name ("medium", "large-v3"...) or a CTranslate2 directory."""
    from faster_whisper import WhisperModel

    return WhisperModel(model, device=device, compute_type=resolve_compute_type(compute_type, device),
                        cpu_threads=cpu_threads, num_workers=num_workers)


def build_tiny_whisper(out_dir: Path) -> Path:
    """Build (once, under a file lock) and return the tiny CTranslate2 Whisper directory."""
    from filelock import FileLock

    out_dir = Path(out_dir)
    marker = out_dir / "model.bin"
    if marker.exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if marker.exists():
            return out_dir
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
            hf_dir, ct2_dir = Path(tmp) / "hf", Path(tmp) / "ct2"
            _save_tiny_transformers_whisper(hf_dir)
            _convert_to_ct2(hf_dir, ct2_dir)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            ct2_dir.rename(out_dir)  # same filesystem: the directory appears complete or not at all
    return out_dir


def _train_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "the quick brown fox jumps over the lazy dog.", "Hello, world! How are you today?",
        "University lecture on science, history and music.", "one two three four five six seven eight",
        "We are going to talk about video, speech and language.", "Yes. No. Maybe? Okay!",
    ] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _save_tiny_transformers_whisper(hf_dir: Path) -> None:
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration)

    hf_dir.mkdir(parents=True)
    tok = _train_tokenizer()
    tok.save(str(hf_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS[:8]}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    cfg = WhisperConfig(
        vocab_size=tok.get_vocab_size(), num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot,
    )
    torch.manual_seed(TINY_SEED)
    model = WhisperForConditionalGeneration(cfg)
    _spread_random_weights(model, first_special=ids["<|endoftext|>"], eot=eot)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"], max_length=448, is_multilingual=False,
        suppress_tokens=[], begin_suppress_tokens=[eot],
    )
    model.save_pretrained(hf_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(hf_dir)
    # tokenizer_config is read by the converter to find special tokens
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "tokenizer_class": "WhisperTokenizerFast",
    }))


def _spread_random_weights(model, first_special: int, eot: int, std: float = 0.3) -> None:
    """Make the random model emit varied ordinary tokens (and so words) instead of repeating a special token.

    With the default 0.02 init, greedy decoding repeats one token forever; a wider init varies the output by
    position, and zeroed special-token embeddings (end-of-text excepted) keep the decoder on text tokens.
    """
    import torch

    gen = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
        emb = model.model.decoder.embed_tokens.weight
        keep = emb[eot].clone()
        emb[first_special:] = 0
        emb[eot] = keep


def _convert_to_ct2(hf_dir: Path, ct2_dir: Path) -> None:
    from ctranslate2.converters import TransformersConverter

    # tokenizer.json must sit in the CT2 dir, else faster-whisper fetches one from the hub
    TransformersConverter(str(hf_dir), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(
        str(ct2_dir), quantization="int8", force=True)
