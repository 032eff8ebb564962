"""clip: open_clip image embedding per sampled frame, on the shared inference runner.

CPU workers decode each video's JPEG frames (rows of the frames stage) and apply the model's own eval
transform (RGB, short side resized, center crop: no aspect squashing); model actors embed them in chunks of
`frames_per_forward`. Table `clip` keyed (video_id, frame_idx): pts, embedding (L2-normalised when
`normalize`, stored as list<float16> of length embed_dim), model ("<name>/<pretrained tag or file name>"),
and with `patch_tokens: true` the vision transformer's patch tokens (flattened list<float16>, shape in
`patch_shape` = [tokens, width]).
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..inference.runner import Done, InferenceRun, ItemFailure, RunnerConfig, run_inference
from .base import ItemResult, Resources, Stage, StageConfig, WorkItem


@dataclass
class ClipConfig(StageConfig):
    name: str = "clip"
    model: str = "ViT-L-14-336"     # open_clip model name
    pretrained: str = "openai"      # open_clip pretrained tag or a local checkpoint path
    precision: str = "auto"         # auto: fp32 on CPU, fp16 on GPU; or fp32 / fp16 / bf16
    normalize: bool = True          # store L2-normalised embeddings
    patch_tokens: bool = False      # also store the patch tokens (large: tokens x width per frame)
    frames_per_forward: int = 64    # images per model forward
    image_column: str = "jpeg"      # column of the frames table holding the encoded image
    runner: RunnerConfig = field(default_factory=lambda: RunnerConfig(batch_size=4, max_in_flight=8))
    resources: Resources = field(default_factory=lambda: Resources(cpus=4, gpus=0, mem_gb=16))


def preprocess_frames(item: WorkItem, model: str, pretrained: str, image_column: str) -> Any:
    """CPU side: decode + transform each frame -> {"frame_idx", "pts", "pixels": float32 [N, 3, S, S]}."""
    import torch
    from PIL import Image

    from ..models.clip import image_transform

    rows = sorted(item.rows("frames", "frames"), key=lambda r: r["frame_idx"])
    if not rows:
        return Done(ItemResult(item.video_id, note="no_frames"))
    transform = image_transform(model, pretrained)
    pixels = []
    for row in rows:
        data = row.get(image_column)
        if not data:
            raise ItemFailure(f"no_input: frame {row['frame_idx']} has no {image_column!r} bytes")
        try:
            with Image.open(io.BytesIO(data)) as img:
                pixels.append(transform(img.convert("RGB")))
        except OSError as exc:
            raise ItemFailure(f"corrupt: frame {row['frame_idx']}: {exc}") from exc
    return {"frame_idx": [int(r["frame_idx"]) for r in rows], "pts": [float(r["pts"]) for r in rows],
            "pixels": torch.stack(pixels)}


class ClipEmbedder:
    """The model side (one per actor): frame tensors in, float16 embeddings out (`models.clip.ImageEncoder`)."""

    def __init__(self, cfg: ClipConfig, model: str, pretrained: str, device: str):
        from ..models.clip import ImageEncoder

        self.cfg, self.device = cfg, device
        self.encoder = ImageEncoder(model, pretrained, device=device, precision=cfg.precision,
                                    normalize=cfg.normalize, patch_tokens=cfg.patch_tokens,
                                    frames_per_forward=cfg.frames_per_forward)

    def predict(self, payloads: list[dict]) -> list[dict]:
        import torch

        emb, tok = self.encoder.encode(torch.cat([p["pixels"] for p in payloads]))
        outputs, at = [], 0
        for p in payloads:
            n = len(p["frame_idx"])
            outputs.append({"frame_idx": p["frame_idx"], "pts": p["pts"], "embedding": emb[at:at + n],
                            "patch_tokens": tok[at:at + n] if tok is not None else None})
            at += n
        return outputs


class ClipStage(Stage):
    name = "clip"
    Config = ClipConfig
    upstream = {"frames": ("frames",)}
    tables = {"clip": ("video_id", "frame_idx")}
    schemas = {"clip": pa.schema([
        ("video_id", pa.string()), ("frame_idx", pa.int64()), ("pts", pa.float64()),
        ("embedding", pa.list_(pa.float16())), ("model", pa.string()),
        ("patch_tokens", pa.list_(pa.float16())), ("patch_shape", pa.list_(pa.int32())),
    ])}

    def __init__(self, cfg: ClipConfig, ctx):
        super().__init__(cfg, ctx)
        self.run: InferenceRun | None = None
        from ..models.clip import resolve

        # resolve (and build, for tiny) in the driver once, so workers and actors only load
        self.model_name, self.pretrained = resolve(cfg.model, cfg.pretrained, ctx.models, ctx.cache_dir)
        tag = Path(self.pretrained).name if Path(self.pretrained).exists() else self.pretrained
        self.model_label = f"{self.model_name}/{tag}"

    def process(self, items):
        cfg = self.cfg
        preprocess = functools.partial(preprocess_frames, model=self.model_name, pretrained=self.pretrained,
                                       image_column=cfg.image_column)
        factory = functools.partial(ClipEmbedder, cfg, self.model_name, self.pretrained, self.ctx.device)
        self.run = run_inference(items, preprocess, factory, self.to_result, cfg.runner,
                                 device=self.ctx.device, log=self.ctx.log)
        yield from self.run

    def to_result(self, item: WorkItem, out: dict) -> ItemResult:
        rows = []
        for i, (frame_idx, pts) in enumerate(zip(out["frame_idx"], out["pts"])):
            row = {"video_id": item.video_id, "frame_idx": frame_idx, "pts": pts,
                   "embedding": out["embedding"][i].tolist(), "model": self.model_label,
                   "patch_tokens": None, "patch_shape": None}
            if out["patch_tokens"] is not None:
                tokens = out["patch_tokens"][i]
                row["patch_tokens"] = tokens.reshape(-1).tolist()
                row["patch_shape"] = list(tokens.shape)
            rows.append(row)
        return ItemResult(item.video_id, rows={"clip": rows})

    def shard_stats(self) -> dict[str, Any]:
        return self.run.stats.as_dict() if self.run is not None else {}


STAGE = ClipStage
