"""The Video Pre-trained Transformer: expert embeddings + prompt text -> T5 encoder; the T5 decoder predicts the text.

Encoder input (one row per sample): one part per modality of `VPTConfig.modalities`, in that order, each with
its own mask; what each part is comes from the modality's `Encoder` (`pipeline.modalities`). The default:

    [frame_1 .. frame_F]   clip: CLIP embeddings -> projector + type embedding + frame-time features
    [audio]                audio: PANNs embedding -> projector + type embedding
    [scene-graph tokens]   scenegraph: backbone token embeddings + type embedding
    [prompt tokens]        asr: the *preceding* text (or a VQA question): backbone token embeddings + type embedding

Projectors are an `nn.ModuleDict` keyed by modality name (`proj.clip`, `proj.audio`, ...); the type embedding
has one row per modality, in the config's order. The config (saved with every checkpoint and export) names the
modalities, so a checkpoint of other modalities is refused by name; weights saved before the projectors were
keyed by name (`frame_proj`, `audio_proj`) load as `proj.clip` / `proj.audio`.

The target text only ever reaches the model as `labels` (decoder side). `encode` has no access to it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import modalities
from pipeline.train.config import ModelConfig

FRAME, AUDIO, SCENE, PROMPT = range(4)   # type-embedding rows of the default modalities (clip, audio, scenegraph, asr)
# names of the projectors before they were keyed by modality (weights saved then load under the new names)
LEGACY_PROJECTORS = {"frame_proj.": "proj.clip.", "audio_proj.": "proj.audio."}


@dataclass
class VPTConfig(ModelConfig):
    """The model's settings: the fields (with their defaults and notes) are `pipeline.train.config.ModelConfig`,
    the `model` config group's schema, defined once; this class adds the model's methods."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VPTConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown VPT config keys: {sorted(unknown)}")
        d = dict(d)
        if "modalities" in d:
            d["modalities"] = [str(m) for m in d["modalities"]]
        return cls(**d)

    def width(self, enc: "modalities.Encoder") -> int:
        """An encoder input's expert width: a fixed number, or a config field (d_clip, d_audio)."""
        return int(getattr(self, enc.width) if isinstance(enc.width, str) else enc.width)

    def uses(self, enc: "modalities.Encoder") -> bool:
        return enc.switch is None or bool(getattr(self, enc.switch))


def check_modalities(saved: list[str] | tuple[str, ...], wanted: list[str] | tuple[str, ...], what: str) -> None:
    """A checkpoint's modalities must be the config's (same names, same order): else a one-line ValueError."""
    if list(saved) != list(wanted):
        raise ValueError(f"{what} was made with modalities {list(saved)}, but the model config names "
                         f"{list(wanted)}: set model.modalities to match, or train a new model")


def make_projector(kind: str, d_in: int, d_model: int) -> nn.Module:
    """Maps an expert embedding (d_in) to the backbone width (d_model).

    `linear` with d_in == d_model is the identity (no weights): the embedding is fed as is, already at the
    backbone's width. `identity` requires equal widths; `mlp` always has its two layers."""
    if kind == "identity" or (kind == "linear" and d_in == d_model):
        if d_in != d_model:
            raise ValueError(f"identity projector needs d_in == d_model, got {d_in} != {d_model}")
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(d_in, d_model)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_model), nn.GELU(), nn.Linear(d_model, d_model))
    raise ValueError(f"unknown projector {kind!r} (linear | mlp | identity)")


def time_features(t: torch.Tensor, n: int, max_period: float) -> torch.Tensor:
    """Sinusoidal features [..., n] of times in seconds, periods from ~0.5 s to `max_period`."""
    half = n // 2
    periods = torch.logspace(math.log10(0.5), math.log10(max_period), half, device=t.device, dtype=torch.float32)
    angles = 2 * math.pi * t.float().unsqueeze(-1) / periods
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class VPT(nn.Module):
    def __init__(self, cfg: VPTConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        d = backbone.config.d_model
        self.encoders = modalities.encoders(cfg.modalities)     # [(name, Encoder)], in encoder order
        self.proj = nn.ModuleDict({name: make_projector(cfg.projector, cfg.width(enc), d)
                                   for name, enc in self.encoders if enc.projected})
        self.time_proj = nn.Linear(cfg.time_features, d)
        self.type_embed = nn.Embedding(len(self.encoders), d)    # row k: the k-th of cfg.modalities
        nn.init.normal_(self.type_embed.weight, std=0.02)
        self._register_load_state_dict_pre_hook(self._legacy_keys)

    @property
    def frame_proj(self) -> nn.Module:
        return self.proj["clip"]

    @property
    def audio_proj(self) -> nn.Module:
        return self.proj["audio"]

    @property
    def d_model(self) -> int:
        return self.backbone.config.d_model

    def _legacy_keys(self, state_dict, prefix, *args) -> None:
        """Weights saved with `frame_proj` / `audio_proj` load as `proj.clip` / `proj.audio`; projector weights of
        modalities this model does not have (or the reverse) are refused by name."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for old, new in LEGACY_PROJECTORS.items():
                if rest.startswith(old):
                    state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
        saved = {k[len(prefix) + 5:].split(".")[0] for k in state_dict if k.startswith(prefix + "proj.")}
        mine = set(self.proj.keys())
        if saved and saved != mine:
            raise ValueError(f"the weights have projectors for modalities {sorted(saved)}, this model for "
                             f"{sorted(mine)} (model.modalities {self.cfg.modalities})")
        rows = state_dict.get(prefix + "type_embed.weight")
        if rows is not None and rows.shape[0] != len(self.encoders):
            raise ValueError(f"the weights have {rows.shape[0]} modality type embeddings, this model "
                             f"{len(self.encoders)} (model.modalities {self.cfg.modalities})")

    def encode(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds [B, L, d], attention_mask [B, L]) from the encoder-side inputs only (never the target)."""
        cfg = self.cfg
        tok_embed = self.backbone.get_input_embeddings()
        dtype = tok_embed.weight.dtype
        parts: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        for k, (name, enc) in enumerate(self.encoders):
            if not cfg.uses(enc):
                continue
            kind_embed = self.type_embed.weight[k]
            if enc.kind == "text":
                ids, mask = enc.inputs
                parts.append(tok_embed(inputs[ids]) + kind_embed)
                masks.append(inputs[mask])
                continue
            value, mask = enc.inputs[0], enc.inputs[1]
            x = self.proj[name](inputs[value].to(dtype))
            if enc.kind == "vector":
                parts.append(x.unsqueeze(1) + kind_embed)
                masks.append(inputs[mask].unsqueeze(1))
                continue
            x = x + kind_embed
            if enc.kind == "frames":
                x = x + self.time_proj(time_features(inputs[enc.inputs[2]], cfg.time_features,
                                                     cfg.max_time_s).to(dtype))
            parts.append(x)
            masks.append(inputs[mask])
        if not parts:
            raise ValueError("every encoder input is switched off")
        mask = torch.cat([m.bool() for m in masks], dim=1)
        # a sample whose every position is masked (e.g. no frames, no audio, empty texts) would give NaN
        # attention; let it attend to its first position, which carries only the type embedding
        empty = ~mask.any(dim=1)
        if empty.any():
            mask = mask.clone()
            mask[empty, 0] = True
        return torch.cat(parts, dim=1), mask.long()

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder logits [B, T, vocab] for `inputs["labels"]` (teacher forcing; -100 = ignored)."""
        embeds, mask = self.encode(inputs)
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask, labels=inputs["labels"],
                            decoder_attention_mask=inputs.get("decoder_attention_mask"), use_cache=False)
        return out.logits

    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor], **kw) -> torch.Tensor:
        embeds, mask = self.encode(inputs)
        return self.backbone.generate(inputs_embeds=embeds, attention_mask=mask, **kw)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every transformer block: the units of sharding, checkpointing and norm logging."""
        blocks = [(f"encoder.{i}", b) for i, b in enumerate(self.backbone.encoder.block)]
        return blocks + [(f"decoder.{i}", b) for i, b in enumerate(self.backbone.decoder.block)]


def lm_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross-entropy, z-loss, number of target tokens); both losses are means over target tokens.

    z-loss = mean(logsumexp(logits)^2): keeps the softmax normaliser near 1 (a divergence early warning).
    """
    valid = labels != -100
    n = valid.sum()
    logits = logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    z = torch.logsumexp(logits, dim=-1)
    z_loss = (z.square() * valid).sum()
    denom = n.clamp(min=1)
    return ce / denom, z_loss / denom, n


def build_vpt(cfg: VPTConfig, cache_dir: Path | None = None, texts=()) -> tuple[VPT, Any]:
    """(VPT, tokenizer) with the backbone loaded by name (see `pipeline.models.t5.load_t5`)."""
    from pipeline.models.t5 import load_t5

    # building a tiny backbone the first time draws random weights, loading it from the cache draws none: the global
    # RNG is left as it was either way, so the heads (and everything seeded after) do not depend on the cache
    with torch.random.fork_rng(devices=[]):
        backbone, tokenizer = load_t5(cfg.backbone, cache_dir, texts)
    return VPT(cfg, backbone), tokenizer


HEADS_FILE = "vpt_heads.pt"
CONFIG_FILE = "vpt_config.json"


def save_exported(model: VPT, tokenizer, out_dir: Path) -> Path:
    """Consolidated Hugging Face layout: `backbone/` (save_pretrained + tokenizer), projector weights, config."""
    out_dir = Path(out_dir)
    (out_dir / "backbone").mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out_dir / "backbone")
    tokenizer.save_pretrained(out_dir / "backbone")
    heads = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    torch.save(heads, out_dir / HEADS_FILE)
    cfg = asdict(model.cfg) | {"backbone": "backbone"}     # relative: the directory moves as a whole
    (out_dir / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return out_dir


def load_exported(out_dir: Path, **overrides) -> tuple[VPT, Any]:
    """(VPT, tokenizer) from an `export_hf` / `save_exported` directory, e.g. to start finetuning."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    out_dir = Path(out_dir)
    saved = json.loads((out_dir / CONFIG_FILE).read_text())
    if "modalities" in overrides:
        check_modalities(saved.get("modalities", modalities.DEFAULT_MODEL_MODALITIES), overrides["modalities"],
                         f"the exported model {out_dir}")
    cfg = VPTConfig.from_dict(saved | overrides)
    path = out_dir / cfg.backbone
    backbone = T5ForConditionalGeneration.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg.backbone = str(path)
    model = VPT(cfg, backbone)
    missing, unexpected = model.load_state_dict(torch.load(out_dir / HEADS_FILE, weights_only=True), strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"exported heads do not match the model: missing {missing}, unexpected {unexpected}")
    return model, tokenizer
