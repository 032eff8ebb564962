"""open_clip image encoders: real ones by model name + pretrained tag (or local checkpoint), and a tiny random one.

Real: `load_clip("ViT-L-14-336", "openai")` (the thesis' model) goes through open_clip's own download/cache.
Tiny (`models=tiny`): a registered 2-layer config (`vpt-tiny-clip`) with random weights saved once under
`<cache_dir>/tiny/clip/` and loaded with `pretrained=<that .pt>` — the same call as for real weights.
The image transform is open_clip's eval transform (RGB, resize the short side, center crop: no squashing),
buildable without the model so CPU workers can preprocess while the model runs elsewhere.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..atomic import temp_path, write_text

REAL_MODEL = "ViT-L-14-336"
REAL_PRETRAINED = "openai"
TINY_MODEL = "vpt-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def resolve(model: str, pretrained: str, models: str, cache_dir: Path) -> tuple[str, str]:
    """(model name, pretrained tag or path) to load; for `models=tiny`, builds the tiny model if needed."""
    if models == "tiny":
        return TINY_MODEL, str(build_tiny_clip(Path(cache_dir) / "tiny" / "clip"))
    return model, pretrained


def register_tiny_config(tiny_dir: Path) -> None:
    """Make `vpt-tiny-clip` known to open_clip in this process (every worker/actor that uses it)."""
    import open_clip

    path = Path(tiny_dir) / f"{TINY_MODEL}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(TINY_CONFIG, indent=1))
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(path)


def build_tiny_clip(tiny_dir: Path) -> Path:
    """Random weights for the tiny config, saved once (under a file lock); returns the .pt path."""
    import open_clip
    import torch
    from filelock import FileLock

    tiny_dir = Path(tiny_dir)
    weights = tiny_dir / f"{TINY_MODEL}.pt"
    tiny_dir.mkdir(parents=True, exist_ok=True)
    register_tiny_config(tiny_dir)
    if weights.exists():
        return weights
    with FileLock(str(weights) + ".lock"):
        if not weights.exists():
            torch.manual_seed(0)
            model = open_clip.create_model(TINY_MODEL, pretrained=None)
            with temp_path(weights) as tmp:
                torch.save(model.state_dict(), tmp)
    return weights


def _tiny_dir_of(pretrained: str) -> Path | None:
    path = Path(pretrained)
    return path.parent if path.name == f"{TINY_MODEL}.pt" else None


def _ensure_known(model: str, pretrained: str) -> None:
    if model == TINY_MODEL:
        tiny_dir = _tiny_dir_of(pretrained)
        if tiny_dir is None:
            raise ValueError(f"{TINY_MODEL} needs pretrained=<dir>/{TINY_MODEL}.pt")
        register_tiny_config(tiny_dir)


def resolve_precision(precision: str, device: str) -> str:
    """`auto` -> fp32 on CPU, fp16 on GPU; or any open_clip precision (fp32, fp16, bf16, amp...)."""
    if precision != "auto":
        return precision
    return "fp16" if device == "cuda" else "fp32"


def load_clip(model: str, pretrained: str, device: str = "cpu", precision: str = "auto"):
    """The open_clip model (eval mode) with its weights: a pretrained tag ("openai") or a local checkpoint."""
    import open_clip

    _ensure_known(model, pretrained)
    clip_model = open_clip.create_model(model, pretrained=pretrained, device=device,
                                        precision=resolve_precision(precision, device))
    return clip_model.eval()


@lru_cache(maxsize=4)
def image_transform(model: str, pretrained: str):
    """open_clip's eval transform for this model + weights, without building the model."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    _ensure_known(model, pretrained)
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model!r}")
    pre: dict[str, Any] = {"size": cfg["vision_cfg"]["image_size"]}
    tagged = open_clip.get_pretrained_cfg(model, pretrained) if not Path(pretrained).exists() else {}
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if tagged.get(key) is not None:
            pre[key] = tagged[key]
    return image_transform_v2(PreprocessCfg(**pre), is_train=False)


class ImageEncoder:
    """The image tower of an open_clip model: pixel tensors (from `image_transform`) in, float16 embeddings out.

    Embeds in chunks of `frames_per_forward` images; `normalize` L2-normalises the pooled embedding (in fp32);
    `patch_tokens` also returns the vision transformer's patch tokens. Used by the clip stage for video frames and
    by the VQA features for still images, so both get the same numbers for the same pixels."""

    def __init__(self, model: str, pretrained: str, device: str = "cpu", precision: str = "auto",
                 normalize: bool = True, patch_tokens: bool = False, frames_per_forward: int = 64):
        self.device, self.normalize, self.patch_tokens = device, normalize, patch_tokens
        self.frames_per_forward = frames_per_forward
        self.model = load_clip(model, pretrained, device=device, precision=precision)
        self.model.visual.output_tokens = patch_tokens
        self.dtype = next(self.model.parameters()).dtype

    def encode(self, pixels) -> tuple[Any, Any]:
        """float32 [N, 3, S, S] -> (float16 numpy [N, D] embeddings, float16 numpy patch tokens or None)."""
        import torch

        embeddings, tokens = [], []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.frames_per_forward):
                chunk = pixels[start:start + self.frames_per_forward].to(self.device, self.dtype)
                out = self.model.visual(chunk)
                pooled, toks = out if self.patch_tokens else (out, None)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                embeddings.append(pooled.to(torch.float16).cpu())
                if toks is not None:
                    tokens.append(toks.to(torch.float16).cpu())
        return torch.cat(embeddings).numpy(), (torch.cat(tokens).numpy() if tokens else None)
