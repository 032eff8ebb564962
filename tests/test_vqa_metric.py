"""The official VQAv2 accuracy: each normalisation rule, which side it applies to and when, partial credit,
an oracle transcription of the official loop, whole-set scoring."""

import json
import random

import pytest

from pipeline.eval.vqa import (
    evaluate,
    majority_baseline,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    write_results,
)


# --------------------------------------------------------------------------- punctuation


@pytest.mark.parametrize("text, expected", [
    ("x/y", "x y"),            # a mark not touching a space becomes a space
    ("x , y", "x  y"),         # a mark next to a space in the text is deleted
    ("what?", "what "),        # '?' is punctuation
    ("1,000", "1000"),         # a comma between digits: every mark is deleted, not spaced
    ("1,000 x/y", "1000 xy"),  # ...including the other marks of the same text
    ("x,y", "x y"),            # a comma between letters is only spaced
    ("(a)-[b]", " a   b "),
    ("don't", "don't"),        # the apostrophe is not in the punctuation list
    ("10:30", "10:30"),        # nor is the colon
])
def test_punctuation_marks(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("yes.", "yes"),
    ("3.", "3"),       # the period regex's "look-behind" is really a look-ahead: a period after a digit goes
    ("2.5", "2.5"),    # a period followed by a digit stays
    ("mr.x", "mrx"),
    (".5", ".5"),
])
def test_period_strip(text, expected):
    assert process_punctuation(text) == expected


def test_period_strip_stops_after_32_periods():
    # The official script passes re.UNICODE (32) positionally as `count`.
    assert process_punctuation("." * 40) == "." * 8


# --------------------------------------------------------------------------- digits, articles, contractions, case


@pytest.mark.parametrize("text, expected", [
    ("two", "2"), ("none", "0"), ("zero", "0"), ("ten", "10"), ("eleven", "eleven"), ("Two dogs", "2 dogs"),
])
def test_number_words(text, expected):
    assert process_digit_article(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("the left", "left"), ("a cat", "cat"), ("an apple", "apple"), ("The  Red  one", "red 1"),
    ("theater", "theater"), ("a", ""),
])
def test_articles_and_case(text, expected):
    assert process_digit_article(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("dont", "don't"), ("Whats up", "what's up"), ("cant", "can't"), ("youre", "you're"),
    ("Im", "im"),  # capitalised keys of the official map never match: the text is lower-cased first
])
def test_contractions(text, expected):
    assert process_digit_article(text) == expected


def test_full_normalisation_chain():
    assert normalize_answer("\tThe Two, dogs!\n") == "2 dogs"


# --------------------------------------------------------------------------- the prediction: always normalised


@pytest.mark.parametrize("prediction, gt, expected", [
    ("yes", "yes", 1.0),
    ("Yes", "yes", 1.0),                 # lower-cased
    ("YES", "yes", 1.0),
    (" yes\n", "yes", 1.0),              # newlines/tabs to spaces, stripped
    ("\tyes", "yes", 1.0),
    ("yes!", "yes", 1.0),                # punctuation: "yes " then split/joined
    ("yes.", "yes", 1.0),                # period strip
    ("two", "2", 1.0),                   # number words
    ("Ten", "10", 1.0),
    ("the left", "left", 1.0),           # articles
    ("A cat", "cat", 1.0),
    ("dont know", "don't know", 1.0),    # contractions
    ("1,000", "1000", 1.0),              # comma between digits deleted
    ("black/white", "black white", 1.0),
    ("eleven", "11", 0.0),               # only none/zero..ten are number words
])
def test_prediction_is_always_normalised(prediction, gt, expected):
    # Ten identical answers: the ground truth is not processed at all, only the prediction is
    assert vqa_accuracy(prediction, [gt] * 10) == expected


# --------------------------------------------------------------------------- the ground truth: as written, or
# punctuation only when the answers differ


def test_identical_gt_answers_are_not_processed_at_all():
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0         # no punctuation processing
    assert vqa_accuracy("yes.", ["yes."] * 10) == 0.0        # ...but the prediction lost its period
    assert vqa_accuracy("Yes", ["Yes"] * 10) == 0.0          # not lower-cased (the prediction is)
    assert vqa_accuracy("yes", [" yes"] * 10) == 0.0         # not stripped
    assert vqa_accuracy("yes", ["yes\n"] * 10) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 0.0          # the prediction became "2"
    assert vqa_accuracy("the red", ["the red"] * 10) == 0.0  # the prediction became "red"
    assert vqa_accuracy("dont", ["dont"] * 10) == 0.0        # the prediction became "don't"


def test_differing_gt_answers_get_punctuation_only():
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0                     # period stripped
    assert vqa_accuracy("1000", ["1,000"] * 9 + ["many"]) == 1.0                 # comma deleted
    assert vqa_accuracy("cat", ["Cat.", "cat"] + ["dog"] * 8) == pytest.approx(0.3)  # keeps its capital
    assert vqa_accuracy("RED!", ["Red"] * 8 + ["red."] * 2) == pytest.approx(0.6)
    assert vqa_accuracy("red", ["the red"] * 2 + ["blue"] * 8) == 0.0             # keeps its article
    assert vqa_accuracy("2", ["two"] * 8 + ["2"] * 2) == pytest.approx(0.6)      # number words stay
    assert vqa_accuracy("two", ["two"] * 5 + ["2"] * 5) == 1.0
    assert vqa_accuracy("don't", ["dont"] * 9 + ["no"]) == 0.0                   # no contractions
    assert vqa_accuracy("yes", ["yes!"] * 9 + ["no"]) == 0.0                     # "yes!" -> "yes "


def test_gt_whitespace_is_neither_cleaned_nor_stripped():
    # Raw strings decide whether the answers differ: "yes " is another answer, and punctuation keeps the space
    assert vqa_accuracy("yes", ["yes"] * 2 + ["yes "] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("yes", ["yes"] * 9 + ["yes \t"]) == 1.0
    assert vqa_accuracy("yes", ["yes\n"] * 9 + ["yes"]) == pytest.approx(0.3)  # only the last one matches


# --------------------------------------------------------------------------- min(1, n/3) averaged over 10 choose 9


@pytest.mark.parametrize("n_matching, expected", [
    (0, 0.0),
    # 1 match: leaving out the matching annotator gives 0, each of the 9 others 1/3 -> 9 * (1/3) / 10
    (1, 0.3),
    # 2 matches: 2 * (1/3) + 8 * (2/3) = 6, / 10
    (2, 0.6),
    # 3 matches: 3 * (2/3) + 7 * 1 = 9, / 10
    (3, 0.9),
    # 4 matches: 3 matching among any 9 -> every term is 1
    (4, 1.0),
    (10, 1.0),
])
def test_partial_credit(n_matching, expected):
    gts = ["cat"] * n_matching + ["dog"] * (10 - n_matching)
    assert vqa_accuracy("cat", gts) == pytest.approx(expected)


def test_partial_credit_counts_punctuation_matches_only():
    # "cat." -> "cat" matches, "Cat" does not (no lower-casing), "a cat" does not (no article removal)
    assert vqa_accuracy("cat", ["cat", "cat.", "Cat", "a cat"] + ["dog"] * 6) == pytest.approx(0.6)
    assert vqa_accuracy("cat", ["cat", "cat.", "cat!"] + ["dog"] * 7) == pytest.approx(0.6)  # "cat!" -> "cat "


# --------------------------------------------------------------------------- reference oracle


def _official_per_question(prediction, answer_dicts):
    """A straight transcription of the official per-question loop, kept independent of `vqa_accuracy`.

    Works on annotation dicts and drops the held-out annotator by dict inequality, as the official code does.
    """
    answer = prediction.replace("\n", " ")
    answer = answer.replace("\t", " ")
    answer = answer.strip()
    answer = process_punctuation(answer)
    answer = process_digit_article(answer)
    answer_dicts = [dict(d) for d in answer_dicts]
    raw = [d["answer"] for d in answer_dicts]
    if len(set(raw)) > 1:
        for d in answer_dicts:
            d["answer"] = process_punctuation(d["answer"])
    scores = []
    for left_out in answer_dicts:
        others = [d for d in answer_dicts if d != left_out]
        matching = [d for d in others if d["answer"] == answer]
        scores.append(min(1, float(len(matching)) / 3))
    return float(sum(scores)) / len(scores)


_POOL = ["yes", "Yes", "YES", "yes.", "yes!", "yes ", " yes", "yes\n", "no", "No.",
         "2", "two", "Two", "2.", "2.5", "1,000", "1000", "10", "ten",
         "red", "Red", "the red", "The red.", "red/blue", "red blue", "red, blue",
         "left", "the left", "on the left", "dont", "don't", "Im", "a", "", "cat", "Cat.", "cat!", "a cat"]


def _random_case(rng):
    values = rng.sample(_POOL, rng.choice([1, 1, 2, 2, 3, 4]))  # few distinct values -> many matches
    answers = [rng.choice(values) for _ in range(rng.choice([10, 10, 10, 3, 1]))]
    if rng.random() < 0.5:
        prediction = rng.choice(values)
    else:
        prediction = rng.choice(_POOL)
    if rng.random() < 0.3:
        prediction = rng.choice(["", " ", "\t", "\n"]) + prediction + rng.choice(["", " ", "\t", "\n"])
    return prediction, answers


def test_matches_a_transcription_of_the_official_loop():
    rng = random.Random(0)
    seen = set()
    for _ in range(3000):
        prediction, answers = _random_case(rng)
        dicts = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]
        expected = _official_per_question(prediction, dicts)
        assert vqa_accuracy(prediction, answers) == expected, (prediction, answers)
        seen.add(round(expected, 6))
    assert {0.0, 0.3, 0.6, 0.9, 1.0} <= seen  # the generated cases reach every partial-credit level


def test_empty_ground_truth_is_an_error():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# --------------------------------------------------------------------------- whole-set evaluation, baselines, files


def _annotation(question_id, answer_type, answers, question_type="what", multiple_choice=None):
    return {
        "question_id": question_id, "image_id": question_id // 10, "question_type": question_type,
        "answer_type": answer_type, "multiple_choice_answer": multiple_choice or answers[0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


@pytest.fixture
def tiny_vqa(tmp_path):
    annotations = [
        _annotation(10, "yes/no", ["yes"] * 10, "is the"),
        _annotation(20, "number", ["2"] * 2 + ["3"] * 8, "how many", "3"),
        _annotation(30, "other", ["red"] + ["blue"] * 9, "what color is the", "blue"),
    ]
    questions = [{"image_id": a["image_id"], "question": "q?", "question_id": a["question_id"]} for a in annotations]
    questions_path, annotations_path = tmp_path / "questions.json", tmp_path / "annotations.json"
    questions_path.write_text(json.dumps({"questions": questions}))
    annotations_path.write_text(json.dumps({"annotations": annotations}))
    return questions_path, annotations_path


def test_evaluate_tiny_set(tiny_vqa, tmp_path):
    questions_path, annotations_path = tiny_vqa
    results_path = write_results(tmp_path / "results.json", [(10, "Yes"), (20, "2"), (30, "The red.")])
    scores = evaluate(results_path, questions_path, annotations_path)
    # q10: "Yes" is lower-cased -> 100; q20: 2 matches -> 60; q30: "The red." -> "red", 1 match -> 30
    assert scores["per_question"] == {10: 100.0, 20: 60.0, 30: 30.0}
    assert scores["overall"] == pytest.approx(63.33)
    assert scores["per_answer_type"] == {"number": 60.0, "other": 30.0, "yes/no": 100.0}
    assert scores["per_question_type"]["how many"] == 60.0
    assert scores["n_questions"] == 3

    scores = evaluate([{"question_id": 10, "answer": "yes!"}, {"question_id": 20, "answer": "three"},
                       {"question_id": 30, "answer": "blue"}], questions_path, annotations_path)
    # the prediction is always normalised: "yes!" -> "yes", "three" -> "3" with 8 matches
    assert scores["overall"] == 100.0


def test_evaluate_rejects_incomplete_or_foreign_results(tiny_vqa):
    questions_path, annotations_path = tiny_vqa
    with pytest.raises(ValueError, match="lack"):
        evaluate([{"question_id": 10, "answer": "yes"}], questions_path, annotations_path)
    with pytest.raises(ValueError, match="absent"):
        evaluate([{"question_id": 10, "answer": "yes"}, {"question_id": 99, "answer": "x"}], None, annotations_path,
                 require_all=False)
    with pytest.raises(ValueError, match="twice"):
        evaluate([{"question_id": 10, "answer": "yes"}] * 2, None, annotations_path, require_all=False)
    partial = evaluate([{"question_id": 20, "answer": "3"}], None, annotations_path, require_all=False)
    assert partial["n_questions"] == 1 and partial["overall"] == 100.0


def test_results_file_is_the_official_format(tmp_path):
    import numpy as np

    path = write_results(tmp_path / "out" / "results.json", [(np.int64(458752000), "yes"), (7, "2")])
    results = json.loads(path.read_text())
    assert results == [{"question_id": 458752000, "answer": "yes"}, {"question_id": 7, "answer": "2"}]
    assert all(type(r["question_id"]) is int and type(r["answer"]) is str for r in results)
    assert not list(path.parent.glob("*.tmp"))


def test_majority_baselines():
    train = [
        _annotation(1, "yes/no", ["yes"] * 10, "is the"),
        _annotation(2, "yes/no", ["yes"] * 10, "is the"),
        _annotation(3, "yes/no", ["no"] * 10, "is there a"),
        _annotation(4, "number", ["2"] * 10, "how many"),
        _annotation(5, "other", ["red"] * 10, "what color is the"),
    ]
    evaluation = [
        _annotation(6, "yes/no", ["yes"] * 10, "is the"),
        _annotation(7, "yes/no", ["no"] * 10, "is there a"),
        _annotation(8, "number", ["2"] * 10, "how many"),
        _annotation(9, "other", ["blue"] * 10, "what shape"),
    ]
    baselines = majority_baseline({"annotations": train}, evaluation)
    assert baselines["global"]["answer"] == "yes"
    assert baselines["global"]["overall"] == 25.0                       # only q6
    assert baselines["global"]["per_answer_type"] == {"number": 0.0, "other": 0.0, "yes/no": 50.0}
    assert baselines["per_answer_type"]["answers"] == {"yes/no": "yes", "number": "2", "other": "red"}
    assert baselines["per_answer_type"]["overall"] == 50.0              # q6 and q8
    # per question type: "is there a" -> "no" gets q7 too; unseen "what shape" falls back to "yes"
    assert baselines["per_question_type"]["overall"] == 75.0
    assert "per_question" not in baselines["global"]
