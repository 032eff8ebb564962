"""The official VQAv2 accuracy: each normalisation rule, when it applies, partial credit, whole-set scoring."""

import json

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


# --------------------------------------------------------------------------- when normalisation applies


def test_identical_answers_get_no_normalisation():
    gts = ["yes"] * 10
    assert vqa_accuracy("yes", gts) == 1.0
    assert vqa_accuracy("Yes", gts) == 0.0     # not even lower-casing
    assert vqa_accuracy("yes!", gts) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", gts) == 1.0  # whitespace cleaning always applies


def test_whitespace_is_cleaned_before_counting_distinct_answers():
    gts = ["yes"] * 9 + ["yes \t"]  # one distinct answer once stripped
    assert vqa_accuracy("Yes", gts) == 0.0


def test_distinct_answers_normalise_answers_and_prediction():
    assert vqa_accuracy("RED!", ["Red"] * 5 + ["red."] * 5) == 1.0
    assert vqa_accuracy("2", ["two"] * 6 + ["2"] * 4) == 1.0
    assert vqa_accuracy("the left", ["left"] * 9 + ["right"]) == 1.0
    assert vqa_accuracy("dont know", ["don't know"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 9 + ["many"]) == 1.0


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


def test_partial_credit_counts_normalised_matches():
    # "Cat." and "cat" both normalise to "cat": 2 matches -> 0.6
    assert vqa_accuracy("cat", ["Cat.", "cat"] + ["dog"] * 8) == pytest.approx(0.6)


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
    results_path = write_results(tmp_path / "results.json", [(10, "Yes"), (20, "2"), (30, "red")])
    scores = evaluate(results_path, questions_path, annotations_path)
    # q10: one distinct gt answer, "Yes" is not lower-cased -> 0; q20: 2 matches -> 60; q30: 1 match -> 30
    assert scores["per_question"] == {10: 0.0, 20: 60.0, 30: 30.0}
    assert scores["overall"] == 30.0
    assert scores["per_answer_type"] == {"number": 60.0, "other": 30.0, "yes/no": 0.0}
    assert scores["per_question_type"]["how many"] == 60.0
    assert scores["n_questions"] == 3

    scores = evaluate([{"question_id": 10, "answer": "yes"}, {"question_id": 20, "answer": "three"},
                       {"question_id": 30, "answer": "blue"}], questions_path, annotations_path)
    # q20 has 2 distinct gt answers, so "three" -> "3" with 8 matches -> 100
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
