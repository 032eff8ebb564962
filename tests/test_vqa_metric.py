"""The official VQAv2 accuracy: each normalisation rule, which side it applies to and when, partial credit, for
the current official script (a013f00, 2021) and the legacy one (458a8b2, 2016); both checked against the official
files themselves (tests/reference/) on generated questions; whole-set scoring."""

import copy
import json
import random
import re
import warnings
from pathlib import Path

import pytest

from pipeline.eval.vqa import (
    METRICS,
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


# --------------------------------------------------------------------------- current: nothing is normalised when
# the annotators agree, both sides fully normalised when they differ


def test_t_shirt_example():
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 1.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10, metric="legacy") == 0.0  # legacy: prediction -> "t shirt"


@pytest.mark.parametrize("prediction, gt, expected", [
    ("yes", "yes", 1.0),
    (" yes\n", "yes", 1.0),              # newlines/tabs to spaces, stripped
    ("\tyes", "yes", 1.0),
    ("yes", " yes\t", 1.0),              # ...on the ground truth too
    ("Yes", "yes", 0.0),                  # no lower-casing
    ("yes!", "yes", 0.0),                 # no punctuation processing
    ("yes.", "yes", 0.0),
    ("yes.", "yes.", 1.0),
    ("two", "2", 0.0),                    # no number words
    ("two", "two", 1.0),
    ("the left", "left", 0.0),            # no articles
    ("the red", "the red", 1.0),
    ("dont", "dont", 1.0),                # no contractions
    ("dont", "don't", 0.0),
    ("t-shirt", "t-shirt", 1.0),
    ("Yes", "Yes", 1.0),
])
def test_identical_answers_are_compared_as_written(prediction, gt, expected):
    assert vqa_accuracy(prediction, [gt] * 10) == expected


def test_differing_answers_normalise_both_sides():
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0                      # lower-cased
    assert vqa_accuracy("yes!", ["yes"] * 9 + ["no"]) == 1.0                     # punctuation
    assert vqa_accuracy("yes", ["yes!"] * 9 + ["no"]) == 1.0                     # ...on the answers too
    assert vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0                         # number words
    assert vqa_accuracy("2", ["two"] * 8 + ["2"] * 2) == 1.0                     # ...on the answers too
    assert vqa_accuracy("the red", ["Red."] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("red", ["the red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)  # articles dropped
    assert vqa_accuracy("don't", ["dont"] * 9 + ["no"]) == 1.0                   # contractions
    assert vqa_accuracy("cat", ["Cat.", "cat"] + ["dog"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0          # both -> "t shirt"
    assert vqa_accuracy("t-shirt", ["t shirt"] * 9 + ["shirt"]) == 1.0
    assert vqa_accuracy("1000", ["1,000"] * 9 + ["many"]) == 1.0                 # comma between digits deleted


def test_agreement_is_decided_after_whitespace_cleaning():
    # "yes" and "yes " are one answer once stripped: identical, so "Yes" is not lower-cased and scores 0
    assert vqa_accuracy("Yes", ["yes"] * 5 + ["yes "] * 5) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 5 + ["yes."] * 5) == 1.0  # differ -> normalised


def test_normalize_answer_is_the_full_chain():
    assert normalize_answer("\tThe Two, dogs!\n") == "2 dogs"


# --------------------------------------------------------------------------- legacy (2016-2021): the prediction
# always normalised, the ground truth as written or punctuation-only when the answers differ


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
    ("t-shirt", "t-shirt", 0.0),         # the prediction became "t shirt"
])
def test_legacy_prediction_is_always_normalised(prediction, gt, expected):
    # Ten identical answers: the ground truth is not processed at all, only the prediction is
    assert vqa_accuracy(prediction, [gt] * 10, metric="legacy") == expected


def test_legacy_identical_gt_answers_are_not_processed_at_all():
    def legacy(prediction, gts):
        return vqa_accuracy(prediction, gts, metric="legacy")

    assert legacy("yes", ["yes."] * 10) == 0.0         # no punctuation processing
    assert legacy("yes.", ["yes."] * 10) == 0.0        # ...but the prediction lost its period
    assert legacy("Yes", ["Yes"] * 10) == 0.0          # not lower-cased (the prediction is)
    assert legacy("yes", [" yes"] * 10) == 0.0         # not stripped
    assert legacy("yes", ["yes\n"] * 10) == 0.0
    assert legacy("two", ["two"] * 10) == 0.0          # the prediction became "2"
    assert legacy("the red", ["the red"] * 10) == 0.0  # the prediction became "red"
    assert legacy("dont", ["dont"] * 10) == 0.0        # the prediction became "don't"


def test_legacy_differing_gt_answers_get_punctuation_only():
    def legacy(prediction, gts):
        return vqa_accuracy(prediction, gts, metric="legacy")

    assert legacy("yes", ["yes."] * 9 + ["no"]) == 1.0                     # period stripped
    assert legacy("1000", ["1,000"] * 9 + ["many"]) == 1.0                 # comma deleted
    assert legacy("cat", ["Cat.", "cat"] + ["dog"] * 8) == pytest.approx(0.3)  # keeps its capital
    assert legacy("RED!", ["Red"] * 8 + ["red."] * 2) == pytest.approx(0.6)
    assert legacy("red", ["the red"] * 2 + ["blue"] * 8) == 0.0             # keeps its article
    assert legacy("2", ["two"] * 8 + ["2"] * 2) == pytest.approx(0.6)      # number words stay
    assert legacy("two", ["two"] * 5 + ["2"] * 5) == 1.0
    assert legacy("don't", ["dont"] * 9 + ["no"]) == 0.0                   # no contractions
    assert legacy("yes", ["yes!"] * 9 + ["no"]) == 0.0                     # "yes!" -> "yes "


def test_legacy_gt_whitespace_is_neither_cleaned_nor_stripped():
    # Raw strings decide whether the answers differ: "yes " is another answer, and punctuation keeps the space
    assert vqa_accuracy("yes", ["yes"] * 2 + ["yes "] * 8, metric="legacy") == pytest.approx(0.6)
    assert vqa_accuracy("yes", ["yes"] * 9 + ["yes \t"], metric="legacy") == 1.0
    assert vqa_accuracy("yes", ["yes\n"] * 9 + ["yes"], metric="legacy") == pytest.approx(0.3)


def test_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="vqa.metric"):
        vqa_accuracy("yes", ["yes"], metric="2017")
    with pytest.raises(ValueError, match="vqa.metric"):
        evaluate([{"question_id": 1, "answer": "yes"}], None, [_annotation(1, "yes/no", ["yes"])], metric="x")


# --------------------------------------------------------------------------- min(1, n/3) averaged over 10 choose 9


@pytest.mark.parametrize("metric", METRICS)
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
def test_partial_credit(n_matching, expected, metric):
    gts = ["cat"] * n_matching + ["dog"] * (10 - n_matching)
    assert vqa_accuracy("cat", gts, metric=metric) == pytest.approx(expected)


def test_partial_credit_counts_normalised_matches():
    gts = ["cat", "cat.", "Cat", "a cat"] + ["dog"] * 6
    assert vqa_accuracy("cat", gts) == 1.0                                      # all four -> "cat"
    assert vqa_accuracy("cat", gts, metric="legacy") == pytest.approx(0.6)    # "Cat", "a cat" do not match
    assert vqa_accuracy("cat", ["cat", "cat.", "cat!"] + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("cat", ["cat", "cat.", "cat!"] + ["dog"] * 7, metric="legacy") == pytest.approx(0.6)


# --------------------------------------------------------------------------- the official files as the oracle

REFERENCE = Path(__file__).parent / "reference"
OFFICIAL_FILES = {"current": "vqaEval_a013f00.py", "legacy": "vqaEval_458a8b2.py"}


def _official_vqaeval(metric):
    """The official `VQAEval` class, run from the unmodified file (its two Python 2 prints made calls)."""
    path = REFERENCE / OFFICIAL_FILES[metric]
    source, n = re.subn(r'^(\s*)print "([^"\n]*)"$', r'\1print("\2")', path.read_text(), flags=re.M)
    assert n == 2, "not the expected official file"
    namespace = {"__name__": f"official_vqaeval_{metric}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "\d" in a non-raw string
        exec(compile(source, str(path), "exec"), namespace)
    return namespace["VQAEval"]


class _OfficialAnnotations:
    """What `VQAEval` reads of the official `VQA` helper: `getQuesIds()` and `qa` (question id -> annotation)."""

    def __init__(self, annotations):
        self.qa = {a["question_id"]: copy.deepcopy(a) for a in annotations}  # VQAEval edits the answers in place

    def getQuesIds(self):  # noqa: N802 (the official name)
        return list(self.qa)


class _OfficialResults:
    def __init__(self, results):
        self.qa = {r["question_id"]: dict(r) for r in results}


def _run_official(metric, annotations, results, ndigits):
    vqa_eval = _official_vqaeval(metric)(_OfficialAnnotations(annotations), _OfficialResults(results), n=ndigits)
    vqa_eval.evaluate()
    return vqa_eval


def test_reference_files_are_the_named_commits():
    current = (REFERENCE / OFFICIAL_FILES["current"]).read_text()
    legacy = (REFERENCE / OFFICIAL_FILES["legacy"]).read_text()
    assert "resAns = self.processDigitArticle(resAns)" in current and "if len(set(gtAnswers)) > 1:" in current
    assert current.index("if len(set(gtAnswers)) > 1:") < current.index("resAns = self.processPunctuation(resAns)")
    assert legacy.index("resAns      = self.processPunctuation(resAns)") < legacy.index("if len(set(gtAnswers)) > 1:")


_POOL = ["yes", "Yes", "YES", "yes.", "yes!", "yes ", " yes", "yes\n", "\tyes", "no", "No.",
         "2", "two", "Two", "2.", "2.5", "1,000", "1000", "10", "ten", "none", "0",
         "red", "Red", "the red", "The red.", "red/blue", "red blue", "red, blue",
         "left", "the left", "on the left", "dont", "don't", "Im", "a", "", " ", "cat", "Cat.", "cat!", "a cat",
         "t-shirt", "T-Shirt", "t shirt", "tshirt", "black and white", "black & white", "3:30", "mr.x"]


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


def _generated_set(seed, n):
    rng = random.Random(seed)
    annotations, results = [], []
    for i in range(n):
        prediction, answers = _random_case(rng)
        kind = rng.choice(["yes/no", "number", "other"])
        annotations.append(_annotation(1000 + i, kind, answers, rng.choice(["what", "is the", "how many"])))
        results.append({"question_id": 1000 + i, "answer": prediction})
    return annotations, results


@pytest.mark.parametrize("metric", METRICS)
def test_matches_the_official_script(metric, capsys):
    annotations, results = _generated_set(seed=0, n=3000)
    official = _run_official(metric, annotations, results, ndigits=10)
    seen = set()
    for annotation, result in zip(annotations, results):
        ours = vqa_accuracy(result["answer"], [a["answer"] for a in annotation["answers"]], metric=metric)
        expected = official.evalQA[annotation["question_id"]]
        assert round(100 * ours, 10) == expected, (metric, result["answer"], annotation["answers"])
        seen.add(round(expected, 6))
    assert {0.0, 30.0, 60.0, 90.0, 100.0} <= seen  # the generated cases reach every partial-credit level

    # The whole-set figures, rounded as the official script reports them
    official = _run_official(metric, annotations, results, ndigits=2)
    scores = evaluate(results, None, annotations, metric=metric)
    assert scores["overall"] == official.accuracy["overall"]
    assert scores["per_answer_type"] == official.accuracy["perAnswerType"]
    assert scores["per_question_type"] == official.accuracy["perQuestionType"]
    assert scores["per_question"] == official.evalQA


def test_the_two_official_versions_disagree_on_generated_cases(capsys):
    # The oracle comparison above is not vacuous: the two scripts score many of these cases differently
    annotations, results = _generated_set(seed=1, n=500)
    current = _run_official("current", annotations, results, ndigits=10).evalQA
    legacy = _run_official("legacy", annotations, results, ndigits=10).evalQA
    differ = [qid for qid in current if current[qid] != legacy[qid]]
    assert len(differ) > 50
    t_shirt = [_annotation(1, "other", ["t-shirt"] * 10)]
    answer = [{"question_id": 1, "answer": "t-shirt"}]
    assert _run_official("current", t_shirt, answer, 2).evalQA == {1: 100.0}
    assert _run_official("legacy", t_shirt, answer, 2).evalQA == {1: 0.0}


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
    # q10: ten identical "yes", nothing normalised: "Yes" does not match -> 0; q20: 2 matches -> 60;
    # q30: answers differ, "The red." -> "red", 1 match -> 30
    assert scores["per_question"] == {10: 0.0, 20: 60.0, 30: 30.0}
    assert scores["overall"] == 30.0
    assert scores["per_answer_type"] == {"number": 60.0, "other": 30.0, "yes/no": 0.0}
    assert scores["per_question_type"]["how many"] == 60.0
    assert scores["n_questions"] == 3

    legacy = evaluate(results_path, questions_path, annotations_path, metric="legacy")
    # legacy: the prediction is always normalised, so "Yes" -> "yes" matches all ten -> 100
    assert legacy["per_question"] == {10: 100.0, 20: 60.0, 30: 30.0}
    assert legacy["overall"] == pytest.approx(63.33)

    predictions = [{"question_id": 10, "answer": "yes!"}, {"question_id": 20, "answer": "three"},
                   {"question_id": 30, "answer": "blue"}]
    # current: "yes!" is not "yes" (identical answers); "three" -> "3" with 8 matches (answers differ)
    assert evaluate(predictions, questions_path, annotations_path)["per_question"] == {10: 0.0, 20: 100.0, 30: 100.0}
    # legacy: "yes!" -> "yes"
    assert evaluate(predictions, questions_path, annotations_path, metric="legacy")["overall"] == 100.0


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


def test_vqa_metric_setting_is_checked_before_anything_runs(tmp_path, capsys):
    from pipeline.eval.vqa_finetune import check_vqa, main
    from pipeline.train.__main__ import compose

    run_dir = tmp_path / "vqa"
    assert main([f"run_dir={run_dir}", "models=tiny", "vqa.metric=2017"]) == 2
    assert "vqa.metric must be one of current, legacy" in capsys.readouterr().err
    assert not run_dir.exists()
    for metric in METRICS:
        assert check_vqa(compose([f"run_dir={run_dir}", f"vqa.metric={metric}"], "train/vqa")) == ""
    assert compose([f"run_dir={run_dir}"], "train/vqa")["vqa"]["metric"] == "current"
