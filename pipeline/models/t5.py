"""T5 backbones by name: real checkpoints (`google/flan-t5-large`, t5-v1_1, t5, or a local path) for users, and
`tiny` (a 2-layer random T5 with a locally trained Unigram tokenizer) for tests and the demo.

Every backbone, tiny ones included, is loaded through the same `from_pretrained(dir)` path.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from ..atomic import temp_path

DEFAULT_BACKBONE = "google/flan-t5-large"
TINY = "tiny"

# Randomly initialised backbones with the dimensions of real ones, for throughput measurements without weights.
RANDOM_DIMS = {
    "random-small": dict(d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6, d_kv=64),
    "random-base": dict(d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64),
    "random-large": dict(d_model=1024, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16, d_kv=64),
}

# A small English corpus so the tiny tokenizer splits ordinary speech into sensible pieces.
_BUILTIN_CORPUS = """
the quick brown fox jumps over the lazy dog
so today we are going to show you how to cook a simple meal at home
first you take the onion and cut it into small pieces then put it in the pan
a person is holding a cup and the cup is on the table
the man is riding a bike down the street next to a red car
she opens the door and walks into the kitchen to make some coffee
what is the woman doing in the video she is playing the guitar
how many people are in the room there are three people sitting on the sofa
welcome back to my channel in this video i will explain the basics of machine learning
the weather is nice and the children are playing in the park with a ball
now let me show you the next step which is to mix the flour with water and eggs
he picks up the phone looks at the screen and puts it back on the desk
this is a very important point so please pay attention to what happens next
thank you for watching and do not forget to subscribe and like the video
a dog runs across the grass and catches the frisbee in the air
we can see a mountain a lake and some trees in the background
the teacher writes on the board while the students take notes
after that you should wait for about ten minutes until it is ready
yes no maybe one two three four five six seven eight nine ten
""".strip().splitlines()

_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]   # T5's ids 0, 1, 2 (pad doubles as decoder start)


def is_tiny(name: str) -> bool:
    return name == TINY or name.startswith("tiny")


def tiny_t5_config(vocab_size: int, d_model: int = 64, num_layers: int = 2):
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=num_layers,
        num_decoder_layers=num_layers, num_heads=4, relative_attention_num_buckets=16,
        relative_attention_max_distance=64, dropout_rate=0.1, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """A T5-style Unigram tokenizer (Metaspace pre-tokenizer, </s> appended) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%$")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL_TOKENS, unk_token="<unk>",
                                      initial_alphabet=alphabet, shrinking_factor=0.75)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)


def build_tiny_t5(cache_dir: Path, texts: Iterable[str] = (), d_model: int = 64, num_layers: int = 2,
                  seed: int = 0) -> Path:
    """Build (once, under a file lock) a tiny random T5 + tokenizer under `cache_dir/tiny/t5[-<hash>]`."""
    from filelock import FileLock

    texts = [t for t in texts if t]
    tag = ""
    if texts or d_model != 64 or num_layers != 2:
        digest = hashlib.sha1("\n".join(texts + [str(d_model), str(num_layers)]).encode()).hexdigest()[:10]
        tag = f"-{digest}"
    out = Path(cache_dir) / "tiny" / f"t5{tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists() and (out / "tokenizer.json").exists():
            return out
        import torch
        from transformers import T5ForConditionalGeneration

        tokenizer = train_tokenizer(_BUILTIN_CORPUS * 4 + texts)
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer), d_model, num_layers))
        with temp_path(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out


def resolve_backbone(name: str, cache_dir: Path | None = None, texts: Iterable[str] = ()) -> str:
    """The directory or hub name `from_pretrained` should load for backbone `name`."""
    if is_tiny(name):
        if cache_dir is None:
            raise ValueError("the tiny backbone needs a cache_dir to be built in")
        return str(build_tiny_t5(Path(cache_dir), texts))
    return name


def load_t5(name: str = DEFAULT_BACKBONE, cache_dir: Path | None = None, texts: Iterable[str] = ()):
    """(T5ForConditionalGeneration, tokenizer) for a backbone name, local path, `tiny` or `random-<size>`."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    if name in RANDOM_DIMS:
        # real-size random init; the tiny tokenizer stands in (vocab size does not matter for throughput)
        tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(TINY, cache_dir))
        cfg = T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **RANDOM_DIMS[name])
        return T5ForConditionalGeneration(cfg), tokenizer
    path = resolve_backbone(name, cache_dir, texts)
    model = T5ForConditionalGeneration.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
