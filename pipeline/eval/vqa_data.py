"""VQAv2-format data: official questions/annotations JSON + an image directory, and an image-disjoint split.

Files read (the official VQAv2 layout):
- questions: ``{"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}, ...]}``
- annotations: ``{"annotations": [{"question_id", "image_id", "question_type", "answer_type",
  "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"} x 10]}, ...]}``
- images: COCO names ``COCO_<split>_<12-digit image id>.jpg`` or plain ``<image_id>.jpg|.jpeg|.png``
  (the synthetic set). The directory is listed once and indexed by the id in the file name.

The train/eval split is by image: a question goes where its image goes, so no image is in both. The side of
an image is a stable hash of (seed, image id), independent of the order and number of other images and of
the Python process (no `hash()` randomisation).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.eval.vqa import load_annotations, load_questions

_IMAGE_NAME = re.compile(r"^(?:COCO_[A-Za-z0-9]+_)?(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


@dataclass(frozen=True)
class VQAExample:
    question_id: int
    image_id: int
    image_path: Path | None
    question: str
    answers: tuple[str, ...]  # the annotators' raw answers (10 in VQAv2); empty for unannotated test questions
    answer_type: str | None
    multiple_choice_answer: str | None


def index_images(image_dir: str | Path) -> dict[int, Path]:
    """image_id -> path for every COCO-named or plain-id-named image in `image_dir` (not recursive)."""
    image_dir = Path(image_dir)
    index: dict[int, Path] = {}
    with os.scandir(image_dir) as entries:
        for entry in entries:
            match = _IMAGE_NAME.match(entry.name)
            if match is None or not entry.is_file():
                continue
            image_id = int(match.group(1))
            if image_id in index:
                raise ValueError(f"two images for image_id {image_id}: {index[image_id].name} and {entry.name}")
            index[image_id] = image_dir / entry.name
    return index


def load_vqa(
    questions_json: str | Path | Mapping[str, Any],
    annotations_json: str | Path | Mapping[str, Any] | None,
    image_dir: str | Path | None,
    *,
    missing_images: str = "error",
) -> list[VQAExample]:
    """Join questions, annotations (None for the unannotated test split) and images into examples.

    `missing_images`: "error" raises on a question whose image is absent, "skip" drops such questions,
    "keep" keeps them with `image_path=None` (text-only use). With `image_dir=None` no image is looked up.
    Examples come in the order of the questions file.
    """
    if missing_images not in ("error", "skip", "keep"):
        raise ValueError(f"missing_images must be error|skip|keep, not {missing_images!r}")
    questions = load_questions(questions_json)
    annotations = {}
    if annotations_json is not None:
        annotations = {int(a["question_id"]): a for a in load_annotations(annotations_json)}
        unannotated = [q["question_id"] for q in questions if int(q["question_id"]) not in annotations]
        if unannotated:
            raise ValueError(f"{len(unannotated)} questions have no annotation, e.g. {unannotated[:5]}")
    images = index_images(image_dir) if image_dir is not None else {}

    examples = []
    for question in questions:
        question_id, image_id = int(question["question_id"]), int(question["image_id"])
        image_path = images.get(image_id)
        if image_path is None and image_dir is not None:
            if missing_images == "error":
                raise FileNotFoundError(f"no image for image_id {image_id} (question {question_id}) in {image_dir}")
            if missing_images == "skip":
                continue
        annotation = annotations.get(question_id)
        if annotation is not None and int(annotation["image_id"]) != image_id:
            raise ValueError(f"question {question_id}: image_id {image_id} in questions, "
                             f"{annotation['image_id']} in annotations")
        examples.append(VQAExample(
            question_id=question_id,
            image_id=image_id,
            image_path=image_path,
            question=question["question"],
            answers=tuple(a["answer"] for a in annotation["answers"]) if annotation else (),
            answer_type=annotation["answer_type"] if annotation else None,
            multiple_choice_answer=annotation["multiple_choice_answer"] if annotation else None,
        ))
    return examples


def load_image(path: str | Path) -> Image.Image:
    """An RGB PIL image, decoded now (the file is closed on return)."""
    with Image.open(path) as image:
        return image.convert("RGB")


# --------------------------------------------------------------------------- image-disjoint split


def is_eval_image(image_id: int, eval_fraction: float, seed: int = 0) -> bool:
    """Whether `image_id` falls on the eval side: a stable hash of (seed, image_id) below `eval_fraction`."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], not {eval_fraction}")
    digest = hashlib.blake2b(f"{seed}:{int(image_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


def split_image_ids(image_ids: Iterable[int], eval_fraction: float = 0.2, seed: int = 0) -> tuple[set[int], set[int]]:
    """(train image ids, eval image ids), disjoint."""
    train, evaluation = set(), set()
    for image_id in image_ids:
        (evaluation if is_eval_image(image_id, eval_fraction, seed) else train).add(int(image_id))
    return train, evaluation


def split_examples(
    examples: Sequence[VQAExample], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[VQAExample], list[VQAExample]]:
    """(train, eval) examples; all questions about one image land on the same side."""
    train = [e for e in examples if not is_eval_image(e.image_id, eval_fraction, seed)]
    evaluation = [e for e in examples if is_eval_image(e.image_id, eval_fraction, seed)]
    return train, evaluation


def subset_vqa_json(
    questions_json: str | Path | Mapping[str, Any],
    annotations_json: str | Path | Mapping[str, Any],
    question_ids: Iterable[int],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(questions dict, annotations dict) restricted to `question_ids`, top-level metadata kept.

    Use it to write the eval split as its own official-format pair, so `pipeline.eval.vqa.evaluate` (or the
    official script) scores exactly the held-out questions.
    """
    keep = {int(question_id) for question_id in question_ids}
    questions = _as_dict(questions_json)
    annotations = _as_dict(annotations_json)
    return (
        {**questions, "questions": [q for q in questions["questions"] if int(q["question_id"]) in keep]},
        {**annotations, "annotations": [a for a in annotations["annotations"] if int(a["question_id"]) in keep]},
    )


def write_split(
    questions_json: str | Path | Mapping[str, Any],
    annotations_json: str | Path | Mapping[str, Any],
    out_dir: str | Path,
    eval_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Path]:
    """Write `{train,eval}_questions.json` and `{train,eval}_annotations.json` split by image into `out_dir`."""
    questions, annotations = _as_dict(questions_json), _as_dict(annotations_json)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for side in ("train", "eval"):
        wanted_eval = side == "eval"
        ids = [q["question_id"] for q in questions["questions"]
               if is_eval_image(q["image_id"], eval_fraction, seed) == wanted_eval]
        side_questions, side_annotations = subset_vqa_json(questions, annotations, ids)
        for kind, data in (("questions", side_questions), ("annotations", side_annotations)):
            path = out_dir / f"{side}_{kind}.json"
            path.write_text(json.dumps(data), encoding="utf-8")
            paths[f"{side}_{kind}"] = path
    return paths


def _as_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8") as handle:
            return json.load(handle)
    return dict(source)
