"""VQA image features, made once per image set and reused while the model and the image files are unchanged.

- CLIP embeddings (`embed_images`): the open_clip model's own eval transform and image tower
  (`pipeline.models.clip`: `image_transform`, `ImageEncoder`), the same code the clip stage runs on video frames;
  the tiny random CLIP with `models=tiny`.
- Scene-graph texts (`scene_graph_texts`, with `vqa.scene_graph=true`): the scenegraph stage's decoding, backend
  and serialisation (`pipeline.scenegraph`: `decode_frame`, `backend_class`, `frame_graphs`, the `text` column);
  the tiny random detector with `models=tiny`.
- Feature statistics (`feature_stats`): the per-dimension shift and scale fitted on the training images.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import temp_path, write_text
from pipeline.eval.vqa_data import load_image

EMBEDDINGS_FILE = "clip_embeddings.pt"
SCENE_TEXT_FILE = "scene_text.json"


def device_of(cfg: dict[str, Any]) -> str:
    """cuda when asked (`device=cuda|auto`) and present, else cpu."""
    return "cuda" if cfg["device"] in ("cuda", "auto") and torch.cuda.is_available() else "cpu"


def clip_model(cfg: dict[str, Any]) -> tuple[str, str]:
    """(open_clip model name, pretrained tag or path) as the clip stage resolves them (tiny built if needed)."""
    from pipeline.models.clip import resolve

    c = cfg["vqa"]["clip"]
    return resolve(c["model"], c["pretrained"], cfg["models"], Path(cfg["cache_dir"]))


def _fingerprint(model: str, pretrained: str, normalize: bool, images: dict[int, Path]) -> str:
    h = hashlib.sha256(f"{model}|{Path(pretrained).name}|{normalize}".encode())
    for image_id in sorted(images):
        st = images[image_id].stat()
        h.update(f"|{image_id}:{images[image_id].name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def embed_images(images: dict[int, Path], cfg: dict[str, Any], out_file: Path) -> Path:
    """CLIP embeddings of `images` (image_id -> file) with the model's eval transform and image tower.

    Saves {"image_ids": LongTensor[N], "embeddings": float16 [N, D], "model", "fingerprint"}; an existing file
    with the same fingerprint (model, weights name, normalisation, image files) is reused as is.
    """
    from pipeline.models.clip import ImageEncoder, image_transform

    c = cfg["vqa"]["clip"]
    model, pretrained = clip_model(cfg)
    fingerprint = _fingerprint(model, pretrained, bool(c["normalize"]), images)
    if out_file.exists() and torch.load(out_file, weights_only=True)["fingerprint"] == fingerprint:
        return out_file
    encoder = ImageEncoder(model, pretrained, device=device_of(cfg), precision=c["precision"],
                           normalize=bool(c["normalize"]), frames_per_forward=int(c["frames_per_forward"]))
    transform = image_transform(model, pretrained)
    ids = sorted(images)
    chunks = []
    for start in range(0, len(ids), encoder.frames_per_forward):
        chunk = ids[start:start + encoder.frames_per_forward]
        embeddings, _ = encoder.encode(torch.stack([transform(load_image(images[i])) for i in chunk]))
        chunks.append(torch.from_numpy(embeddings))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with temp_path(out_file) as tmp:
        torch.save({"image_ids": torch.tensor(ids, dtype=torch.long), "embeddings": torch.cat(chunks),
                    "model": f"{model}/{Path(pretrained).name}", "fingerprint": fingerprint}, tmp)
    return out_file


def load_embeddings(path: Path) -> dict[int, torch.Tensor]:
    data = torch.load(path, weights_only=True)
    return dict(zip(data["image_ids"].tolist(), data["embeddings"].float()))


def scene_graph_texts(images: dict[int, Path], cfg: dict[str, Any], out_file: Path) -> Path:
    """The scene-graph text of every image of `images` (image_id -> file), made as the scenegraph stage makes
    it for a video frame: the same decoding and downscaling (`decode_frame`), backend (`vqa.scenegraph.backend`,
    by default the detector + relation rules; the tiny random detector with `models=tiny`) and serialisation
    (`frame_graphs`, the `text` column).

    Saves {"texts": {image_id: text}, "fingerprint"}; an existing file with the same fingerprint (settings,
    models, image files) is reused as is.
    """
    from pipeline.scenegraph.frames import decode_frame, frame_graphs
    from pipeline.scenegraph.relations import backend_class

    s = cfg["vqa"]["scenegraph"]
    h = hashlib.sha256(json.dumps({"scenegraph": s, "models": cfg["models"]}, sort_keys=True).encode())
    for image_id in sorted(images):
        st = images[image_id].stat()
        h.update(f"|{image_id}:{images[image_id].name}:{st.st_size}:{st.st_mtime_ns}".encode())
    fingerprint = h.hexdigest()
    if out_file.exists() and json.loads(out_file.read_text()).get("fingerprint") == fingerprint:
        return out_file
    backend = backend_class(str(s["backend"]))(
        checkpoint=str(s["checkpoint"]), models=cfg["models"], cache_dir=str(cfg["cache_dir"]), device=device_of(cfg),
        precision=str(s["precision"]), score_threshold=float(s["score_threshold"]), max_objects=int(s["max_objects"]),
        max_relations=int(s["max_relations"]), batch_frames=int(s["batch_frames"]))
    ids = sorted(images)
    texts: dict[str, str] = {}
    step = max(1, int(s["batch_frames"]))
    for start in range(0, len(ids), step):        # a chunk at a time: decoded images are not all held at once
        chunk = ids[start:start + step]
        graphs = frame_graphs(backend, [decode_frame(images[i].read_bytes(), int(s["max_side"])) for i in chunk])
        texts.update((str(i), g["text"]) for i, g in zip(chunk, graphs))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_text(out_file, json.dumps({"texts": texts, "fingerprint": fingerprint}))
    return out_file


def load_scene_texts(path: Path) -> dict[int, str]:
    return {int(i): t for i, t in json.loads(Path(path).read_text())["texts"].items()}


def feature_stats(embeddings: dict[int, torch.Tensor], train_image_ids: set[int], mode: str,
                  out_file: Path) -> Path:
    """Per-dimension (shift, scale) applied to every image embedding, fitted on the TRAINING images only.

    none: (0, 1). standardize: z-scores. A random tiny CLIP maps all images to nearly the same unit vector
    (mean pairwise cosine ~0.999 on the synthetic set): the colour/side signal lives in differences of ~0.003
    per dimension, which a freshly initialised projector cannot pick up in a few hundred steps; z-scoring brings
    them to unit scale. Real CLIP embeddings are spread out; `none` feeds them exactly as the clip stage stores
    them for video frames (e.g. to keep the input distribution a pretrained projector saw).
    """
    train = torch.stack([embeddings[i] for i in sorted(train_image_ids)])
    if mode == "none":
        shift, scale = torch.zeros(train.shape[1]), torch.ones(train.shape[1])
    elif mode == "standardize":
        shift, scale = train.mean(0), train.std(0).clamp(min=1e-6)
    else:
        raise ValueError(f"vqa.feature_norm must be none or standardize, not {mode!r}")
    with temp_path(out_file) as tmp:
        torch.save({"mode": mode, "shift": shift, "scale": scale}, tmp)
    return out_file
