"""VQAv2-format reading, the image-disjoint split and the synthetic VQA set."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.eval.synthetic_vqa import DEFAULT_QUESTION_TYPES, make_synthetic_vqa
from pipeline.eval.vqa import evaluate, majority_baseline, normalize_answer
from pipeline.eval.vqa_data import (
    VQAExample,
    index_images,
    load_vqa,
    split_examples,
    split_image_ids,
    write_split,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_vqa(tmp_path_factory.mktemp("synthetic"), n_images=120, seed=3)


def test_synthetic_set_is_valid_vqav2(synthetic):
    questions = json.loads(synthetic.questions_json.read_text())
    annotations = json.loads(synthetic.annotations_json.read_text())
    assert questions["task_type"] == "Open-Ended"
    assert len(questions["questions"]) == len(annotations["annotations"]) == synthetic.n_questions > 0
    by_id = {a["question_id"]: a for a in annotations["annotations"]}
    assert len(by_id) == synthetic.n_questions  # unique question ids
    for question in questions["questions"]:
        assert set(question) == {"image_id", "question", "question_id"}
        annotation = by_id[question["question_id"]]
        assert annotation["image_id"] == question["image_id"]
        assert set(annotation) == {"question_id", "image_id", "question_type", "answer_type",
                                   "multiple_choice_answer", "answers"}
        assert annotation["answer_type"] in ("yes/no", "number", "other")
        assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
        assert all(set(a) == {"answer", "answer_confidence", "answer_id"} for a in annotation["answers"])
        normalised = Counter(normalize_answer(a["answer"]) for a in annotation["answers"])
        assert normalised.most_common(1)[0][0] == annotation["multiple_choice_answer"]
    image_ids = {q["image_id"] for q in questions["questions"]}
    assert image_ids == set(range(1, 121))
    for image_id in image_ids:
        with Image.open(synthetic.image_dir / f"{image_id}.png") as image:
            assert image.size == (96, 96) and image.mode == "RGB"


def test_synthetic_answers_are_noisy_but_normalise(synthetic):
    annotations = json.loads(synthetic.annotations_json.read_text())["annotations"]
    raw_distinct = sum(len({a["answer"] for a in ann["answers"]}) > 1 for ann in annotations)
    assert raw_distinct > len(annotations) // 2  # the noise makes normalisation matter
    # Answering the canonical answer scores (almost) 100 with the official metric, the raw majority does not
    canonical = [{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]} for a in annotations]
    assert evaluate(canonical, synthetic.questions_json, synthetic.annotations_json)["overall"] > 99.0
    kinds = Counter(a["answer_type"] for a in annotations)
    assert set(kinds) == {"other", "yes/no"}  # colour and position are "other"
    assert kinds["other"] == 2 * kinds["yes/no"] == 2 * 120


def test_synthetic_set_is_deterministic_and_question_types_selectable(tmp_path, synthetic):
    again = make_synthetic_vqa(tmp_path / "again", n_images=120, seed=3)
    assert again.annotations_json.read_text() == synthetic.annotations_json.read_text()
    assert (again.image_dir / "7.png").read_bytes() == (synthetic.image_dir / "7.png").read_bytes()

    counting = make_synthetic_vqa(tmp_path / "count", n_images=40, seed=0, question_types=["count", "shape"])
    annotations = json.loads(counting.annotations_json.read_text())["annotations"]
    numbers = [a for a in annotations if a["answer_type"] == "number"]
    assert len(numbers) == 40 and {a["multiple_choice_answer"] for a in numbers} <= {"1", "2", "3", "4"}
    assert len({a["multiple_choice_answer"] for a in numbers}) > 1
    shapes = {a["multiple_choice_answer"] for a in annotations if a["question_type"] == "what"}
    assert shapes <= {"circle", "square", "triangle"} and shapes
    with pytest.raises(ValueError):
        make_synthetic_vqa(tmp_path / "bad", n_images=2, question_types=["smell"])


def test_majority_baseline_on_synthetic_leaves_room(synthetic, tmp_path):
    paths = write_split(synthetic.questions_json, synthetic.annotations_json, tmp_path / "split", 0.25, seed=0)
    baselines = majority_baseline(paths["train_annotations"], paths["eval_annotations"])
    assert baselines["global"]["overall"] < 30.0
    assert baselines["per_answer_type"]["overall"] < 45.0
    assert DEFAULT_QUESTION_TYPES == ("color", "position", "yesno")


def test_load_vqa_joins_questions_annotations_images(synthetic):
    examples = load_vqa(synthetic.questions_json, synthetic.annotations_json, synthetic.image_dir)
    assert len(examples) == synthetic.n_questions
    first = examples[0]
    assert isinstance(first, VQAExample)
    assert first.image_path == synthetic.image_dir / f"{first.image_id}.png" and first.image_path.exists()
    assert len(first.answers) == 10 and first.question.endswith("?")
    assert first.answer_type in ("yes/no", "other") and first.multiple_choice_answer


def test_coco_image_names_and_missing_images(tmp_path):
    image_dir = tmp_path / "val2014"
    image_dir.mkdir()
    for image_id in (42, 458752):
        Image.new("RGB", (8, 8)).save(image_dir / f"COCO_val2014_{image_id:012d}.jpg")
    (image_dir / "notes.txt").write_text("not an image")
    assert index_images(image_dir) == {42: image_dir / "COCO_val2014_000000000042.jpg",
                                       458752: image_dir / "COCO_val2014_000000458752.jpg"}
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What?", "question_id": 42000},
        {"image_id": 458752, "question": "Why?", "question_id": 458752000},
        {"image_id": 7, "question": "Who?", "question_id": 7000},
    ]}
    with pytest.raises(FileNotFoundError):
        load_vqa(questions, None, image_dir)
    kept = load_vqa(questions, None, image_dir, missing_images="skip")
    assert [e.question_id for e in kept] == [42000, 458752000]
    assert kept[1].answers == () and kept[1].answer_type is None
    assert load_vqa(questions, None, image_dir, missing_images="keep")[2].image_path is None


def test_split_never_shares_an_image(synthetic):
    examples = load_vqa(synthetic.questions_json, synthetic.annotations_json, synthetic.image_dir)
    train, held_out = split_examples(examples, eval_fraction=0.2, seed=1)
    train_images, eval_images = {e.image_id for e in train}, {e.image_id for e in held_out}
    assert not train_images & eval_images
    assert len(train) + len(held_out) == len(examples)
    assert 10 <= len(eval_images) <= 40  # about 20 % of 120 images
    assert split_examples(examples, 0.2, seed=1) == (train, held_out)          # deterministic
    assert split_examples(examples, 0.2, seed=2) != (train, held_out)          # seed matters
    # An image's side does not depend on which other images are split with it
    train_ids, eval_ids = split_image_ids(range(1, 121), 0.2, seed=1)
    assert eval_ids == eval_images and split_image_ids([5], 0.2, 1)[1] == ({5} & eval_ids)


def test_write_split_files(synthetic, tmp_path):
    paths = write_split(synthetic.questions_json, synthetic.annotations_json, tmp_path, 0.3, seed=0)
    train_q = json.loads(paths["train_questions"].read_text())["questions"]
    eval_q = json.loads(paths["eval_questions"].read_text())["questions"]
    eval_a = json.loads(paths["eval_annotations"].read_text())["annotations"]
    assert not {q["image_id"] for q in train_q} & {q["image_id"] for q in eval_q}
    assert len(train_q) + len(eval_q) == synthetic.n_questions
    assert {q["question_id"] for q in eval_q} == {a["question_id"] for a in eval_a}
    assert json.loads(paths["eval_questions"].read_text())["task_type"] == "Open-Ended"


def test_cli_writes_a_set(tmp_path):
    subprocess.run([sys.executable, "-m", "pipeline.eval.synthetic_vqa", "--out", str(tmp_path / "set"),
                    "--n-images", "5", "--question-types", "color,count"], check=True, cwd=REPO)
    questions = json.loads((tmp_path / "set" / "questions.json").read_text())["questions"]
    assert len(list((tmp_path / "set" / "images").glob("*.png"))) == 5
    assert any(q["question"] == "How many shapes are there?" for q in questions)
