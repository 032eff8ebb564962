"""Object detector through transformers (`AutoModelForObjectDetection` + `AutoImageProcessor`).

Any closed-vocabulary detection checkpoint works by hub name or local directory: DETR (`facebook/detr-resnet-50`,
the default), Conditional/Deformable DETR, YOLOS (`hustvl/yolos-small`), RT-DETR. Label names come from the
checkpoint's `config.id2label`.

`models=tiny` builds a DETR of the same class with a small randomly initialised ResNet backbone (no timm, no
pretrained download) and COCO's 80 label names, saves it with its image processor under
`cache_dir/tiny/detector` and loads it through the same `from_pretrained` path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import temp_path

Box = tuple[float, float, float, float]


@dataclass
class SceneObject:
    """One detection: what the detector returns and the node of a scene graph (`pipeline.scenegraph`)."""
    label: str
    score: float
    box: Box                                    # normalised x0, y0, x1, y1


DEFAULT_CHECKPOINT = "facebook/detr-resnet-50"

COCO_LABELS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
# DETR's COCO head keeps the 91 original category ids; the unused ones are named "N/A"
_IGNORED_LABELS = {"n/a", "na", "no object", ""}


def tiny_detector_dir(cache_dir: str | Path, seed: int = 0) -> Path:
    """Build (once, under a file lock) a tiny random DETR + image processor, saved in the hub layout."""
    from filelock import FileLock

    out = Path(cache_dir).expanduser() / "tiny" / "detector"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / ".detector.lock")):
        if (out / "config.json").exists():
            return out
        import torch
        from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

        torch.manual_seed(seed)
        backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                layer_type="basic", out_features=["stage4"])
        config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=25,
                            id2label=dict(enumerate(COCO_LABELS)),
                            label2id={name: i for i, name in enumerate(COCO_LABELS)})
        model = DetrForObjectDetection(config).eval()
        # small inputs keep the tiny model cheap; the real DETR processor uses 800/1333
        processor = DetrImageProcessor(size={"shortest_edge": 224, "longest_edge": 384})
        with temp_path(out) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    return out


def resolve_dtype(device: str, precision: str):
    import torch

    if precision == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class ObjectDetector:
    """Batched detection: RGB uint8 images in, per image a list of SceneObject (normalised boxes) out."""

    def __init__(self, model: Any, processor: Any, device: str = "cpu", dtype: Any = None,
                 score_threshold: float = 0.5, max_objects: int = 20):
        import torch

        self.device = device
        self.dtype = dtype or torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.processor = processor
        self.score_threshold = score_threshold
        self.max_objects = max_objects
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Any]]:
        import torch

        if not images:
            return []
        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        for name in ("logits", "pred_boxes"):
            if getattr(outputs, name, None) is not None:
                setattr(outputs, name, getattr(outputs, name).float())
        sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        results = self.processor.post_process_object_detection(outputs, threshold=self.score_threshold,
                                                               target_sizes=sizes)
        out = []
        for (h, w), res in zip(sizes, results):
            objects = []
            order = torch.argsort(res["scores"], descending=True)
            for k in order.tolist():
                label = self.id2label.get(int(res["labels"][k]), str(int(res["labels"][k])))
                if label.lower() in _IGNORED_LABELS:
                    continue
                x0, y0, x1, y1 = res["boxes"][k].tolist()
                box = (_clip(x0 / w), _clip(y0 / h), _clip(x1 / w), _clip(y1 / h))
                objects.append(SceneObject(label, float(res["scores"][k]), box))
                if len(objects) >= self.max_objects:
                    break
            out.append(objects)
        return out


def _clip(v: float) -> float:
    return float(min(1.0, max(0.0, v)))


def load_detector(checkpoint: str = DEFAULT_CHECKPOINT, models: str = "real", cache_dir: str | Path | None = None,
                  device: str = "cpu", precision: str = "auto", score_threshold: float = 0.5,
                  max_objects: int = 20) -> ObjectDetector:
    """The configured checkpoint (hub name or directory), or with models=tiny the locally built tiny DETR."""
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    if models == "tiny":
        if cache_dir is None:
            raise ValueError("models=tiny needs a cache_dir to build the tiny detector in")
        checkpoint = str(tiny_detector_dir(cache_dir))
    model = AutoModelForObjectDetection.from_pretrained(checkpoint)
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    return ObjectDetector(model, processor, device=device, dtype=resolve_dtype(device, precision),
                          score_threshold=score_threshold, max_objects=max_objects)
