"""VQA finetuning and evaluation: `python -m pipeline.eval.vqa_finetune [key=value ...]` (conf/train/vqa.yaml).

1. Data: the synthetic shapes set (`dataset=synthetic`, written under `<run_dir>/vqa/data`) or official VQAv2
   files (`vqa.questions=... vqa.annotations=... vqa.image_dir=...`, or `dataset=<dir>` holding
   questions.json, annotations.json and images/), split by image into `<run_dir>/vqa/split/`.
2. Image features: every image goes through the clip stage's own transform and embedder
   (`pipeline.stages.clip`), the tiny random CLIP with `models=tiny`, once, into
   `<run_dir>/vqa/clip_embeddings.pt` (reused while the model and the image files are unchanged). With
   `vqa.scene_graph=true` also through the scenegraph stage's model and serialisation
   (`pipeline.stages.scenegraph`, settings `vqa.scenegraph`, the tiny random detector with `models=tiny`), once,
   into `<run_dir>/vqa/scene_text.json` (reused likewise).
3. Finetuning on the pretraining loop (`pipeline.train.loop.train`, same FSDP2/DCP checkpoints, torchrun or
   `run_on=slurm`): this module's `build_source` feeds question -> answer with the image as a one-frame clip
   (audio masked out; the image's scene-graph text as scene_text, "" without `vqa.scene_graph`). `init_from` =
   an export (`python -m pipeline.train export`), a checkpoint step directory, a checkpoint root or a
   pretraining (or finetuning) run directory (the latest complete checkpoint, exported here to
   `<run_dir>/vqa/init`, LoRA adapters merged); no `init_from` = the plain backbone (the ablation).
   `finetune.mode=full` trains everything, `lora` trains LoRA adapters (peft) on the backbone plus the VPT
   projections, and merges the adapters into the exported model afterwards.
4. Evaluation (rank 0): greedy answers for the held-out questions in the official results format
   (`<run_dir>/vqa/results.json`), the official accuracy overall / per answer type / per question type, and
   the majority-answer baselines, in `<run_dir>/vqa/metrics.json`; one line printed:
   "VQA accuracy X% vs majority baseline Y% ...".
5. Contamination (rank 0): the eval images against the pretraining frames (`vqa.contamination`, perceptual
   hashes of `pipeline.eval.contamination`): near-duplicate count, closest pairs, the eval questions affected
   and the accuracy without them, under "contamination" in metrics.json ({"checked": false, "reason"} when no
   frames were found).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from pipeline.atomic import temp_path, write_text
from pipeline.eval.vqa import METRICS, evaluate, load_annotations, majority_baseline, write_results
from pipeline.eval.vqa_data import VQAExample, load_image, load_vqa, write_split
from pipeline.models.vpt import CONFIG_FILE, HEADS_FILE, load_exported
from pipeline.train.checkpoint import META, complete_checkpoints, export_hf
from pipeline.train.data import InputBuilder, collate, to_device

EMBEDDINGS_FILE = "clip_embeddings.pt"
SCENE_TEXT_FILE = "scene_text.json"


def vqa_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg["run_dir"]) / "vqa"


# ---------------------------------------------------------------------------------------------- data


def dataset_files(cfg: dict[str, Any]) -> tuple[Path, Path, Path]:
    """(questions json, annotations json, image dir) of the configured VQAv2-format set, made if synthetic."""
    v = cfg["vqa"]
    if v.get("questions"):
        return Path(v["questions"]), Path(v["annotations"]), Path(v["image_dir"])
    if cfg["dataset"] != "synthetic":
        root = Path(cfg["dataset"])
        return root / "questions.json", root / "annotations.json", root / "images"
    from pipeline.eval.synthetic_vqa import make_synthetic_vqa

    s = v["synthetic"]
    root = vqa_dir(cfg) / "data"
    made = root / "made.json"     # the parameters the set under `root` was made with
    params = {"n_images": int(s["n_images"]), "seed": int(s["seed"]), "question_types": list(s["question_types"])}
    if not made.exists() or json.loads(made.read_text()) != params:
        made.unlink(missing_ok=True)
        make_synthetic_vqa(root, **params)
        made.write_text(json.dumps(params))
    return root / "questions.json", root / "annotations.json", root / "images"


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
    """CLIP embeddings of `images` (image_id -> file) with the clip stage's transform and embedder.

    Saves {"image_ids": LongTensor[N], "embeddings": float16 [N, D], "model", "fingerprint"}; an existing file
    with the same fingerprint (model, weights name, normalisation, image files) is reused as is.
    """
    from pipeline.models.clip import image_transform
    from pipeline.stages.clip import ClipConfig, ClipEmbedder

    c = cfg["vqa"]["clip"]
    model, pretrained = clip_model(cfg)
    fingerprint = _fingerprint(model, pretrained, bool(c["normalize"]), images)
    if out_file.exists() and torch.load(out_file, weights_only=True)["fingerprint"] == fingerprint:
        return out_file
    device = "cuda" if cfg["device"] in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    stage_cfg = ClipConfig(model=c["model"], pretrained=c["pretrained"], precision=c["precision"],
                           normalize=bool(c["normalize"]), frames_per_forward=int(c["frames_per_forward"]))
    embedder = ClipEmbedder(stage_cfg, model, pretrained, device)
    transform = image_transform(model, pretrained)
    ids = sorted(images)
    chunks = []
    for start in range(0, len(ids), stage_cfg.frames_per_forward):
        chunk = ids[start:start + stage_cfg.frames_per_forward]
        pixels = torch.stack([transform(load_image(images[i])) for i in chunk])
        out = embedder.predict([{"frame_idx": chunk, "pts": [0.0] * len(chunk), "pixels": pixels}])
        chunks.append(torch.from_numpy(out[0]["embedding"]))
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
    it for a video frame: the stage's decoding and downscaling (`decode_frame`), its runner model
    (`SceneGraphModel`: the configured backend, by default the detector + relation rules; the tiny random
    detector with `models=tiny`) and its serialisation (the `text` column).

    Saves {"texts": {image_id: text}, "fingerprint"}; an existing file with the same fingerprint (settings,
    models, image files) is reused as is.
    """
    from pipeline.stages.scenegraph import SceneGraphModel, decode_frame

    s = cfg["vqa"]["scenegraph"]
    h = hashlib.sha256(json.dumps({"scenegraph": s, "models": cfg["models"]}, sort_keys=True).encode())
    for image_id in sorted(images):
        st = images[image_id].stat()
        h.update(f"|{image_id}:{images[image_id].name}:{st.st_size}:{st.st_mtime_ns}".encode())
    fingerprint = h.hexdigest()
    if out_file.exists() and json.loads(out_file.read_text()).get("fingerprint") == fingerprint:
        return out_file
    device = "cuda" if cfg["device"] in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    model = SceneGraphModel(backend=str(s["backend"]), checkpoint=str(s["checkpoint"]), models=cfg["models"],
                            cache_dir=str(cfg["cache_dir"]), device=device, precision=str(s["precision"]),
                            score_threshold=float(s["score_threshold"]), max_objects=int(s["max_objects"]),
                            max_relations=int(s["max_relations"]), batch_frames=int(s["batch_frames"]))
    ids = sorted(images)
    texts: dict[str, str] = {}
    step = max(1, int(s["batch_frames"]))
    for start in range(0, len(ids), step):        # a chunk at a time: decoded images are not all held at once
        chunk = ids[start:start + step]
        payload = {"frames": [(i, 0.0) for i in chunk],
                   "images": [decode_frame(images[i].read_bytes(), int(s["max_side"])) for i in chunk]}
        (out,) = model.predict([payload])
        texts.update((str(i), g["text"]) for i, g in zip(chunk, out["graphs"]))
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
    torch.save({"mode": mode, "shift": shift, "scale": scale}, out_file)
    return out_file


def prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """Split by image (`<run_dir>/vqa/split/{train,eval}_{questions,annotations}.json`), CLIP embeddings,
    feature statistics and, with `vqa.scene_graph`, the scene-graph texts: once for all ranks (under a file lock
    the first rank does it and leaves `prepared.json`; the others, and later runs with the same settings and
    files, reuse it).
    Returns the `data.vqa` block `build_source` reads."""
    out = vqa_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    v = cfg["vqa"]
    with FileLock(str(out / "prepare.lock")):
        questions, annotations, image_dir = dataset_files(cfg)
        key = {"files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in (questions, annotations)],
               "vqa": {k: v[k] for k in ("eval_fraction", "split_seed", "clip", "feature_norm")},
               "clip_model": list(clip_model(cfg))}
        if v.get("scene_graph"):      # only then: a run without it keeps the key (and reuse) it always had
            key["scene_graph"] = {"scenegraph": v["scenegraph"], "models": cfg["models"]}
        marker = out / "prepared.json"
        if marker.exists() and json.loads(marker.read_text())["key"] == key:
            return json.loads(marker.read_text())["data"]
        paths = write_split(questions, annotations, out / "split", float(v["eval_fraction"]), int(v["split_seed"]))
        paths["image_dir"] = image_dir
        images, train_ids = {}, set()
        for side in ("train", "eval"):
            for e in load_vqa(paths[f"{side}_questions"], paths[f"{side}_annotations"], paths["image_dir"]):
                images[e.image_id] = e.image_path
                if side == "train":
                    train_ids.add(e.image_id)
        embeddings = embed_images(images, cfg, out / EMBEDDINGS_FILE)
        stats = feature_stats(load_embeddings(embeddings), train_ids, v["feature_norm"], out / "feature_stats.pt")
        data = {k: str(x) for k, x in paths.items()} | {"embeddings": str(embeddings), "feature_stats": str(stats)}
        if v.get("scene_graph"):
            data["scene_text"] = str(scene_graph_texts(images, cfg, out / SCENE_TEXT_FILE))
        marker.write_text(json.dumps({"key": key, "data": data}))
    return data


# ---------------------------------------------------------------------------------------------- batch source


class VQASource:
    """Question -> answer batches (the `BatchSource` protocol of `pipeline.train.data`).

    A sample is one question: prev_text = the question, text = the annotators' majority answer, clip = the
    image's CLIP embedding as a single frame at time 0, audio zeros with audio_mask False, scene_text = the
    image's scene-graph text (`scene_texts`, see `scene_graph_texts`), "" without scene graphs.
    Training batches are reshuffled every epoch (seeded) and dropped at the end so every rank takes the same
    number of steps; eval batches cover every question once, in file order, split over the ranks, and every
    rank yields the same number of them (an extra forward on one rank would wait forever on FSDP's all-gather):
    a rank short of questions repeats some, marked False in `sample_mask` (no loss, no prediction).
    """

    def __init__(self, examples: list[VQAExample], embeddings: dict[int, torch.Tensor], split: str, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, d_audio: int = 2048,
                 scene_texts: dict[int, str] | None = None):
        missing = {e.image_id for e in examples} - set(embeddings)
        if missing:
            raise ValueError(f"no CLIP embedding for {len(missing)} images, e.g. {sorted(missing)[:5]}")
        missing = ({e.image_id for e in examples} - set(scene_texts)) if scene_texts is not None else set()
        if missing:
            raise ValueError(f"no scene-graph text for {len(missing)} images, e.g. {sorted(missing)[:5]}")
        self.examples, self.embeddings, self.split = examples, embeddings, split
        self.scene_texts = scene_texts
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.d_audio = seed, d_audio

    def tokenizer_texts(self) -> list[str]:
        return [e.question for e in self.examples] + sorted({e.multiple_choice_answer or "" for e in self.examples})

    def steps_per_epoch(self) -> int:
        return len(self.examples) // (self.batch_size * self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"split": self.split, "num_samples": len(self.examples), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_samples") != len(self.examples) or state.get("seed") != self.seed:
            raise ValueError(f"the VQA data changed since the checkpoint: {state} vs {self.state_dict()}")

    def sample(self, e: VQAExample) -> dict[str, Any]:
        return {
            "video_id": f"image-{e.image_id}", "segment_idx": 0, "question_id": e.question_id,
            "text": e.multiple_choice_answer or "", "prev_text": e.question,
            "clip": self.embeddings[e.image_id].unsqueeze(0), "clip_mask": torch.ones(1, dtype=torch.bool),
            "frame_time": torch.zeros(1), "audio": torch.zeros(self.d_audio), "audio_mask": False,
            "scene_text": self.scene_texts[e.image_id] if self.scene_texts is not None else "",
        }

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        if self.split != "train":
            mine = self.examples[self.rank::self.world_size]
            per_rank = -(-len(self.examples) // self.world_size)       # the longest rank's share
            for lo in range(start_step * self.batch_size, per_rank, self.batch_size):
                idx = range(lo, min(lo + self.batch_size, per_rank))
                # padding repeats a real question of this batch when it has one: a longer filler would widen the
                # padded prompt and move the real questions' encoder positions (and so their answers)
                filler = mine[lo] if lo < len(mine) else self.examples[lo % len(self.examples)]
                batch = collate([self.sample(mine[i] if i < len(mine) else filler) for i in idx])
                batch["sample_mask"] = torch.tensor([i < len(mine) for i in idx], dtype=torch.bool)
                yield batch
            return
        order = torch.randperm(len(self.examples),
                               generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        global_batch = self.batch_size * self.world_size
        for step in range(start_step, self.steps_per_epoch()):
            lo = step * global_batch + self.rank * self.batch_size
            yield collate([self.sample(self.examples[i]) for i in order[lo:lo + self.batch_size]])


def build_source(data_cfg: dict[str, Any], split: str, rank: int, world_size: int) -> VQASource:
    """`data.source: pipeline.eval.vqa_finetune:build_source`; `data.vqa` is filled in by `prepare`."""
    v = data_cfg["vqa"]
    examples = load_vqa(v[f"{split}_questions"], v[f"{split}_annotations"], v["image_dir"])
    stats = torch.load(v["feature_stats"], weights_only=True)
    embeddings = {i: (x - stats["shift"]) / stats["scale"] for i, x in load_embeddings(Path(v["embeddings"])).items()}
    scene_texts = load_scene_texts(Path(v["scene_text"])) if v.get("scene_text") else None
    return VQASource(examples, embeddings, split, int(data_cfg["batch_size"]),
                     rank, world_size, seed=int(v.get("seed", 0)), d_audio=int(v["d_audio"]), scene_texts=scene_texts)


# ---------------------------------------------------------------------------------------------- model


def lora_config(cfg: dict[str, Any]):
    """The peft `LoraConfig` of `finetune.lora`."""
    from peft import LoraConfig

    lora = cfg["finetune"]["lora"]
    return LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=list(lora["target_modules"]), bias="none")


def apply_finetune(model, cfg: dict[str, Any]):
    """`model_hook` of the loop: `finetune.mode=full` leaves the model as is; `lora` freezes the backbone and
    adds LoRA adapters to it (the VPT projections and type/time embeddings stay fully trainable)."""
    f = cfg["finetune"]
    if f["mode"] == "full":
        return model
    if f["mode"] != "lora":
        raise ValueError(f"finetune.mode must be full or lora, not {f['mode']!r}")
    from peft import get_peft_model

    model.backbone = get_peft_model(model.backbone, lora_config(cfg))
    return model


def export_finetuned(step_dir: Path, out_dir: Path, cfg: dict[str, Any]) -> Path:
    """A finetuning checkpoint -> an exported plain VPT (LoRA adapters merged into the backbone: `export_hf`
    finds them in the checkpoint; `finetune.lora` describes them for a checkpoint saved without that record)."""
    fallback = {"backbone": lora_config(cfg)} if cfg["finetune"]["mode"] == "lora" else None
    return export_hf(step_dir, out_dir, adapters=fallback)


def resolve_init(init_from: str | None, out_dir: Path) -> Path | None:
    """An exported model directory for `init_from`: as given if it is one, else the checkpoint (a step
    directory, a checkpoint root or a pretraining or finetuning run directory with checkpoints/: its latest
    complete one) exported to `out_dir` (redone only when the source checkpoint changes; LoRA adapters of a
    LoRA-finetuned checkpoint merged, see `export_hf`)."""
    if not init_from:
        return None
    src = Path(init_from)
    if (src / HEADS_FILE).exists():
        return src
    if (src / META).exists():
        step_dir = src
    else:
        root = src / "checkpoints" if (src / "checkpoints").is_dir() else src
        done = complete_checkpoints(root)
        if not done:
            raise FileNotFoundError(f"init_from={init_from}: neither an exported model nor a checkpoint directory "
                                    f"with a complete checkpoint")
        step_dir = done[-1][1]
    marker = out_dir / "exported_from.json"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):     # every rank asks; the first exports
        if not (marker.exists() and json.loads(marker.read_text()).get("checkpoint") == str(step_dir.resolve())):
            export_hf(step_dir, out_dir)
            marker.write_text(json.dumps({"checkpoint": str(step_dir.resolve())}))
    return out_dir


@torch.no_grad()
def predict(model, tokenizer, source: VQASource, device: torch.device, max_new_tokens: int) -> list[tuple[int, str]]:
    """Greedy answers (question_id, answer) for every question of `source` (padding rows left out)."""
    model.eval().to(device)
    builder = InputBuilder(tokenizer, model.cfg)
    out = []
    for batch in source.batches(0):
        inputs = to_device(builder.encoder_inputs(batch), device)
        ids = model.generate(inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        answers = tokenizer.batch_decode(ids, skip_special_tokens=True)
        real = batch.get("sample_mask", torch.ones(len(answers), dtype=torch.bool)).tolist()
        out += [(int(q), a.strip()) for q, a, r in zip(batch["question_id"].tolist(), answers, real) if r]
    return out


# ---------------------------------------------------------------------------------------------- contamination


def pretraining_run_dir(init_from: str | None) -> Path | None:
    """The pretraining run directory behind `init_from` (a run dir, checkpoint root or step dir); None for an
    export or no `init_from` (an export does not record where it came from)."""
    if not init_from:
        return None
    src = Path(init_from)
    if (src / "checkpoints").is_dir():
        return src
    if (src / META).exists():           # a step dir: <run>/checkpoints/step-N
        return src.parent.parent
    if complete_checkpoints(src):       # a checkpoint root
        return src.parent
    return None


def contamination_frames(cfg: dict[str, Any]) -> tuple[Path | None, str]:
    """(frames to check the eval images against, how they were found) for `vqa.contamination.frames`.

    auto: the frames stage output (`frames/shard-*/frames.parquet`) in the init_from pretraining run dir, or in
    the pipeline run dir above it (`<run>/pretrain` beside `<run>/frames`, as the workflows lay it out)."""
    from pipeline.eval.contamination import frame_files

    setting = cfg["vqa"].get("contamination", {}).get("frames", "auto")
    if setting in (None, "none", False):
        return None, "vqa.contamination.frames=none"
    if setting != "auto":
        if not frame_files(setting):
            raise FileNotFoundError(f"vqa.contamination.frames={setting}: no frames.parquet there")
        return Path(setting), "vqa.contamination.frames"
    run = pretraining_run_dir(cfg.get("init_from"))
    if run is None:
        return None, "no pretraining run to take frames from (init_from is empty or an export)"
    for candidate in (run / "frames", run.parent / "frames"):
        if frame_files(candidate):
            return candidate, f"frames of the init_from pretraining run {run}"
    return None, f"no frames.parquet under {run / 'frames'} or {run.parent / 'frames'}"


def contamination_check(frames: Path | None, found: str, eval_examples: list[VQAExample],
                        per_question: dict[int, float], cfg: dict[str, Any]) -> dict[str, Any]:
    """The near-duplicate report of the eval images against `frames` (see `pipeline.eval.contamination`), with
    the eval questions on contaminated images and the accuracy without them."""
    from pipeline.eval.contamination import contamination_report, iter_parquet_frames

    if frames is None:
        return {"checked": False, "reason": found}
    c = cfg["vqa"].get("contamination", {})
    images = {e.image_id: e.image_path for e in eval_examples}
    report = contamination_report(images, iter_parquet_frames(frames), int(c.get("max_hamming", 8)),
                                  method=c.get("method", "both"), max_listed=int(c.get("max_listed", 20)))
    dirty = set(report["contaminated_eval_ids"])
    affected = {e.question_id for e in eval_examples if e.image_id in dirty}
    clean = [v for q, v in per_question.items() if q not in affected]
    return {"checked": True, "frames": str(frames), "found": found, **report,
            "n_eval_questions_affected": len(affected),
            "accuracy_without_contaminated": round(sum(clean) / len(clean), 2) if clean else None}


# ---------------------------------------------------------------------------------------------- the run


def _effective_model_cfg(cfg: dict[str, Any], init_dir: Path | None) -> dict[str, Any]:
    if init_dir is None:
        return dict(cfg["model"])
    from pipeline.train.loop import input_overrides

    return json.loads((init_dir / CONFIG_FILE).read_text()) | input_overrides(cfg["model"])


def check_vqa(cfg: dict[str, Any]) -> str:
    """What would make a VQA run fail only after finetuning; "" if nothing."""
    from pipeline.eval.contamination import frame_files

    if not cfg["checkpoint"]["every"]:
        return ("checkpoint.every=0 saves no checkpoint, but VQA evaluation exports the finetuned model from its "
                "last one: set checkpoint.every > 0")
    if cfg["vqa"].get("scene_graph") and not cfg["model"].get("use_scene_graph", True):
        return ("vqa.scene_graph=true makes scene-graph texts that model.use_scene_graph=false never feeds: "
                "switch one of them")
    metric = cfg["vqa"].get("metric", "current")
    if metric not in METRICS:
        return f"vqa.metric must be one of {', '.join(METRICS)}, not {metric!r}"
    frames = cfg["vqa"].get("contamination", {}).get("frames", "auto")
    if frames not in (None, False, "auto", "none") and not frame_files(frames):
        return f"vqa.contamination.frames={frames}: no frames.parquet there"
    return ""


def run(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Prepare, finetune, evaluate (see the module docstring). Returns the metrics on rank 0, else None."""
    bad = check_vqa(cfg)
    if bad:
        raise ValueError(bad)
    frames, frames_found = contamination_frames(cfg)      # found before finetuning, hashed after it
    times: dict[str, float] = {}
    out = vqa_dir(cfg)
    t0 = time.perf_counter()
    cfg = dict(cfg)
    cfg["data"] = dict(cfg["data"]) | {"vqa": prepare(cfg)}
    times["prepare_s"] = time.perf_counter() - t0

    init_dir = resolve_init(cfg.get("init_from"), out / "init")
    cfg["init_from"] = str(init_dir) if init_dir else None
    model_cfg = _effective_model_cfg(cfg, init_dir)
    d_clip = next(iter(load_embeddings(Path(cfg["data"]["vqa"]["embeddings"])).values())).numel()
    if int(model_cfg["d_clip"]) != d_clip:
        raise ValueError(f"the model takes {model_cfg['d_clip']}-d CLIP features but {clip_model(cfg)[0]} gives "
                         f"{d_clip}-d: pick a matching model / models=tiny|real")
    cfg["data"]["vqa"] |= {"d_audio": int(model_cfg["d_audio"]), "seed": int(cfg["seed"])}

    t0 = time.perf_counter()
    if cfg.get("run_on") == "slurm":
        from pipeline.train.launch import submit

        summary = submit(cfg).results()[0]
    else:
        from pipeline.train.loop import train

        summary = train(cfg)
    times["finetune_s"] = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:
        return None

    t0 = time.perf_counter()
    model_dir = export_finetuned(Path(summary["checkpoint"]), out / "model", cfg)
    model, tokenizer = load_exported(model_dir)
    v = cfg["data"]["vqa"]
    shutil.copy(v["feature_stats"], model_dir / "feature_stats.pt")    # inputs of the exported model: features so scaled
    source = build_source(cfg["data"] | {"batch_size": int(cfg["vqa"]["eval_batch_size"])}, "eval", 0, 1)
    device = torch.device("cuda" if cfg["device"] in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    predictions = predict(model, tokenizer, source, device, int(cfg["vqa"]["max_new_tokens"]))
    results = write_results(out / "results.json", predictions)
    metric = cfg["vqa"].get("metric", "current")
    scores = evaluate(results, v["eval_questions"], v["eval_annotations"], metric=metric)
    baselines = majority_baseline(v["train_annotations"], v["eval_annotations"], metric=metric)
    times["evaluate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eval_examples = load_vqa(v["eval_questions"], v["eval_annotations"], v["image_dir"])
    contamination = contamination_check(frames, frames_found, eval_examples, scores["per_question"], cfg)
    times["contamination_s"] = time.perf_counter() - t0

    from pipeline.machine import describe

    scores.pop("per_question")
    metrics = {
        "accuracy": scores["overall"],
        "metric": metric,
        "majority_baseline": baselines["global"]["overall"],
        "majority_answer": baselines["global"]["answer"],
        "per_question_type_prior": baselines["per_question_type"]["overall"],
        "margin": round(scores["overall"] - baselines["global"]["overall"], 2),
        "per_answer_type": scores["per_answer_type"],
        "per_question_type": scores["per_question_type"],
        "n_eval_questions": scores["n_questions"],
        "n_train_questions": len(load_annotations(v["train_annotations"])),
        "baselines": baselines,
        "contamination": contamination,
        "finetune_mode": cfg["finetune"]["mode"],
        "init_from": cfg["init_from"],
        "clip_model": clip_model(cfg)[0],
        "feature_norm": cfg["vqa"]["feature_norm"],
        "scene_graph": bool(cfg["vqa"].get("scene_graph")),
        "train": {k: summary.get(k) for k in ("step", "loss", "eval_loss", "params", "checkpoint")},
        "time_s": {k: round(x, 1) for k, x in times.items()},
        "machine": describe(),
        "results_file": str(results),
        "model_dir": str(model_dir),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"VQA accuracy {metrics['accuracy']:.2f}% vs majority baseline {metrics['majority_baseline']:.2f}% "
          f"(always {metrics['majority_answer']!r}; per-question-type prior {metrics['per_question_type_prior']:.2f}%)"
          f" on {metrics['n_eval_questions']} held-out questions; {out / 'metrics.json'}", flush=True)
    if contamination["checked"]:
        print(f"contamination: {contamination['n_contaminated_eval_images']} of {contamination['n_eval_images']} "
              f"eval images near-duplicate {contamination['n_frames']} pretraining frames", flush=True)
    return metrics


def main(argv: list[str]) -> int:
    """`python -m pipeline.eval.vqa_finetune [--help] [KEY=VALUE ...]` (conf/train/vqa.yaml, schema
    `pipeline.train.config.VQAConfig`): a bad key, type or setting is one error line and exit 2."""
    from pipeline.errors import ConfigError
    from pipeline.train.__main__ import check
    from pipeline.train.config import compose, usage, wants_help

    try:
        if wants_help(argv):
            print(usage("train/vqa", [a for a in argv if a not in ("-h", "--help")]))
            return 0
        cfg = compose(argv, "train/vqa")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bad = check(cfg) or check_vqa(cfg)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
