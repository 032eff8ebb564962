"""VQA finetuning and evaluation: `python -m pipeline.eval.vqa_finetune [key=value ...]` (conf/train/vqa.yaml).

1. Data: the synthetic shapes set (`dataset=synthetic`, written under `<run_dir>/vqa/data`) or official VQAv2
   files (`vqa.questions=... vqa.annotations=... vqa.image_dir=...`, or `dataset=<dir>` holding
   questions.json, annotations.json and images/), split by image into `<run_dir>/vqa/split/`.
2. Image features (`pipeline.eval.vqa_features`): every image goes through the open_clip model's eval transform
   and image tower (`pipeline.models.clip.ImageEncoder`, the code the clip stage runs on video frames), the tiny
   random CLIP with `models=tiny`, once, into `<run_dir>/vqa/clip_embeddings.pt` (reused while the model and the
   image files are unchanged). With `vqa.scene_graph=true` also through the scenegraph stage's decoding, backend
   and serialisation (`pipeline.scenegraph.frames`, settings `vqa.scenegraph`, the tiny random detector with
   `models=tiny`), once, into `<run_dir>/vqa/scene_text.json` (reused likewise).
3. Finetuning on the pretraining loop (`pipeline.train.loop.train`, same FSDP2/DCP checkpoints, torchrun or
   `run_on=slurm`): `build_source` (`pipeline.eval.vqa_source`) feeds question -> answer with the image as a
   one-frame clip (audio masked out; the image's scene-graph text as scene_text, "" without `vqa.scene_graph`).
   `init_from` = an export (`python -m pipeline.train export`), a checkpoint step directory, a checkpoint root
   or a pretraining (or finetuning) run directory (the latest complete checkpoint, exported here to
   `<run_dir>/vqa/init`, LoRA adapters merged); no `init_from` = the plain backbone (the ablation).
   `finetune.mode=full` trains everything, `lora` trains LoRA adapters (peft) on the backbone plus the VPT
   projections, and merges the adapters into the exported model afterwards (`pipeline.eval.vqa_model`).
4. Evaluation (rank 0): greedy answers for the held-out questions in the official results format
   (`<run_dir>/vqa/results.json`), the official accuracy overall / per answer type / per question type, and
   the majority-answer baselines, in `<run_dir>/vqa/metrics.json`; one line printed:
   "VQA accuracy X% vs majority baseline Y% ...".
5. Contamination (rank 0): the eval images against the pretraining frames (`vqa.contamination`, perceptual
   hashes of `pipeline.eval.contamination`): near-duplicate count, closest pairs, the eval questions affected
   and the accuracy without them, under "contamination" in metrics.json ({"checked": false, "reason"} when no
   frames were found).

This module holds the data preparation, the contamination check, the run and the command; every name it held
before the split stays importable from here.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from pipeline.atomic import write_text
from pipeline.eval.vqa import METRICS, evaluate, load_annotations, majority_baseline, write_results
from pipeline.eval.vqa_data import VQAExample, load_vqa, write_split
from pipeline.eval.vqa_features import (EMBEDDINGS_FILE, SCENE_TEXT_FILE, clip_model, device_of,  # noqa: F401
                                        embed_images, feature_stats, load_embeddings, load_scene_texts,
                                        scene_graph_texts)
from pipeline.eval.vqa_model import (apply_finetune, export_finetuned, lora_config, predict,  # noqa: F401
                                     resolve_init)
from pipeline.eval.vqa_source import VQASource, build_source  # noqa: F401
from pipeline.models.vpt import CONFIG_FILE, load_exported
from pipeline.train.checkpoint import META, complete_checkpoints

log = logging.getLogger("pipeline.eval.vqa_finetune")     # by name: also when run as __main__


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
        write_text(made, json.dumps(params))
    return root / "questions.json", root / "annotations.json", root / "images"


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
        write_text(marker, json.dumps({"key": key, "data": data}))
    return data


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
    log.info("VQA data and features ready under %s (%.1f s)", out, times["prepare_s"])

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

    log.info("finetuned in %.1f s; evaluating on rank 0", times["finetune_s"])
    t0 = time.perf_counter()
    model_dir = export_finetuned(Path(summary["checkpoint"]), out / "model", cfg)
    model, tokenizer = load_exported(model_dir)
    v = cfg["data"]["vqa"]
    shutil.copy(v["feature_stats"], model_dir / "feature_stats.pt")    # inputs of the exported model: features so scaled
    source = build_source(cfg["data"] | {"batch_size": int(cfg["vqa"]["eval_batch_size"])}, "eval", 0, 1)
    device = torch.device(device_of(cfg))
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
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
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
    from pipeline.logs import configure
    from pipeline.train.__main__ import check, rank
    from pipeline.train.config import compose, usage, wants_help

    configure(rank=rank())          # rank 0 logs at INFO, the other ranks warnings and errors

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
