"""The official VQAv2 accuracy metric, the majority-answer baselines and the results file format.

`vqa_accuracy` reproduces the per-question loop of `VQAEval.evaluate` in the official evaluation script,
GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` at commit a013f0043c1e ("Fixed processing
answers bug", March 2021, the current master), including its quirks, because VQAv2 numbers are computed with
exactly that code (`metric="current"`, the default). Per question:

1. Every ground-truth answer and the prediction: ``.replace('\\n', ' ').replace('\\t', ' ').strip()``
   (`clean_whitespace`).
2. ONLY when these cleaned ground-truth answers hold more than one distinct string, each of them AND the
   prediction go through `process_punctuation` and then `process_digit_article` (lower-casing, number words to
   digits, articles dropped, contractions); this chain is `normalize_answer`. When all the annotators wrote the
   same string, nothing is normalised: the prediction must equal it exactly (after whitespace cleaning). So
   "t-shirt" against ten "t-shirt" scores 1.0, "Yes" against ten "yes" scores 0, "two" against ten "2"
   scores 0, while "Yes" against 9 x "yes" + "no" scores 1.0 and "the red" against 3 x "Red." + 7 x "blue"
   scores 0.9.
3. For each of the annotators (ten in VQAv2), the accuracy against the others is ``min(1, matches / 3)``;
   the question's accuracy is the mean of these values (the "10 choose 9" average). So 1 match scores 0.3,
   2 matches 0.6, 3 matches 0.9 and 4 or more 1.0.

`metric="legacy"` (config `vqa.metric=legacy`) is the loop as it was from 2016 to March 2021 (commit 458a8b2),
which numbers published before then were computed with: the prediction is ALWAYS whitespace-cleaned and fully
normalised; the ground-truth answers are taken as written (no whitespace cleaning, never
`process_digit_article`) and, only when the raw answers differ, go through `process_punctuation` alone. There
"Yes" scores 1.0 against ten "yes", but "t-shirt" scores 0 against ten "t-shirt" (the prediction became
"t shirt") and "cat" scores 0.3 against ["Cat.", "cat"] + 8 x "dog" ("Cat." keeps its capital).

Quirks of `process_punctuation` kept on purpose (changing them changes the score):
- the period regex ``(?!<=\\d)(\\.)(?!\\d)`` was meant as a look-behind but is a look-ahead for the text
  "<=digit", so it strips every period NOT FOLLOWED by a digit: "3." -> "3", "2.5" stays, "mr.x" -> "mrx".
  The script also passes ``re.UNICODE`` (= 32) as the positional `count` of ``sub``, so at most 32 periods go.
- one comma between two digits anywhere in the text ("1,000") turns replacement-by-space into deletion for
  EVERY punctuation mark of that text; so does a mark followed or preceded by a space in the text.
- ``'`` and ``:`` are not punctuation (contractions like "don't" survive); it never strips or lower-cases.
- contraction keys with capitals ("Im") can never match because the text is lower-cased first.

The official script removes the held-out annotator by dict inequality (answers have distinct answer_ids);
here the held-out annotator is removed by position, which is the same thing. `tests/reference/` holds both
official files; the tests score generated cases with them and compare.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.atomic import write_text

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")
_MAX_PERIODS_STRIPPED = re.UNICODE  # the official script's accidental `count` argument (= 32)

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

ANSWER_TYPES = ("yes/no", "number", "other")
METRICS = ("current", "legacy")  # official vqaEval.py since March 2021 (a013f00) | 2016 to March 2021 (458a8b2)


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip (the official script's first step)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: drop or space out punctuation, then strip periods."""
    delete_marks = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The test reads the ORIGINAL text, the replacement acts on the running output (as upstream).
        if delete_marks or (mark + " " in text or " " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_STRIPPED)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, drop articles, contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Whitespace cleaning + punctuation + digits/articles/contractions: the official normalisation of an
    answer (applied by the metric only when the annotators' answers differ, see the module docstring)."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"vqa.metric must be one of {', '.join(METRICS)}, not {metric!r}")
    return metric


def _credit(prediction: str, gts: list[str]) -> float:
    """Mean over annotators of min(1, matches among the others / 3)."""
    matches_total = sum(answer == prediction for answer in gts)
    per_annotator = [min(1.0, (matches_total - (held_out == prediction)) / 3) for held_out in gts]
    return sum(per_annotator) / len(per_annotator)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], metric: str = "current") -> float:
    """Official VQA accuracy of one prediction against the annotators' answers (10 in VQAv2), in [0, 1].

    `metric="current"`: both sides whitespace-cleaned; both fully normalised (`normalize_answer`) only when the
    cleaned answers are not all the same string. `metric="legacy"` (pre-March-2021 script): the prediction always
    fully normalised, the answers as written, punctuation-processed only when they differ.
    """
    check_metric(metric)
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    if metric == "legacy":
        pred = normalize_answer(prediction)
        gts = list(gt_answers)
        if len(set(gts)) > 1:
            gts = [process_punctuation(answer) for answer in gts]
        return _credit(pred, gts)
    pred = clean_whitespace(prediction)
    gts = [clean_whitespace(answer) for answer in gt_answers]
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(answer)) for answer in gts]
        pred = process_digit_article(process_punctuation(pred))
    return _credit(pred, gts)


# --------------------------------------------------------------------------- files and whole-set evaluation


def _load_json(source: str | Path | Mapping[str, Any] | Sequence[Any]) -> Any:
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8") as handle:
            return json.load(handle)
    return source


def load_annotations(source: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
    """Annotations from a VQAv2 annotations file/dict (`{"annotations": [...]}`) or an already-loaded list."""
    data = _load_json(source)
    annotations = data["annotations"] if isinstance(data, Mapping) else data
    return [dict(annotation) for annotation in annotations]


def load_questions(source: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
    """Questions from a VQAv2 questions file/dict (`{"questions": [...]}`) or an already-loaded list."""
    data = _load_json(source)
    questions = data["questions"] if isinstance(data, Mapping) else data
    return [dict(question) for question in questions]


def write_results(path: str | Path, predictions: Iterable[tuple[int, str]]) -> Path:
    """Write predictions in the official results format: a JSON list of {"question_id": int, "answer": str}."""
    results = [{"question_id": int(question_id), "answer": str(answer)} for question_id, answer in predictions]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results))
    return path


def load_results(source: str | Path | Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """question_id -> answer from a results file or list; duplicate question ids are an error."""
    results = _load_json(source)
    answers: dict[int, str] = {}
    for row in results:
        question_id = int(row["question_id"])
        if question_id in answers:
            raise ValueError(f"results: question_id {question_id} appears twice")
        if not isinstance(row["answer"], str):
            raise ValueError(f"results: answer of question_id {question_id} is not a string")
        answers[question_id] = row["answer"]
    return answers


def _percent(values: Sequence[float], ndigits: int) -> float:
    return round(100.0 * sum(values) / len(values), ndigits)


def evaluate(
    results: str | Path | Sequence[Mapping[str, Any]],
    questions_json: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    annotations_json: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    ndigits: int = 2,
    require_all: bool = True,
    metric: str = "current",
) -> dict[str, Any]:
    """Score results against VQAv2 annotations, like the official `VQAEval.evaluate`.

    Accuracies are PERCENT (0-100) rounded to `ndigits` decimals, as the official script reports them:
    ``{"overall", "per_answer_type": {"yes/no", "number", "other"}, "per_question_type": {...},
    "per_question": {question_id: percent}, "n_questions"}``.

    As the official `loadRes`, the results must cover exactly the annotated questions (`require_all=False`
    scores only the annotated questions present in the results). `questions_json`, if given, must list the
    same question ids as the annotations (a mismatched pair of files is an error, not a silent subset).
    `metric`: "current" (the official script today) or "legacy" (before March 2021), see `vqa_accuracy`.
    """
    check_metric(metric)
    answers = load_results(results)
    annotations = {int(annotation["question_id"]): annotation for annotation in load_annotations(annotations_json)}
    if questions_json is not None:
        question_ids = {int(question["question_id"]) for question in load_questions(questions_json)}
        if question_ids != set(annotations):
            raise ValueError("questions and annotations files do not list the same question ids")
    unknown = set(answers) - set(annotations)
    if unknown:
        raise ValueError(f"results hold {len(unknown)} question ids absent from the annotations, "
                         f"e.g. {sorted(unknown)[:5]}")
    missing = set(annotations) - set(answers)
    if missing and require_all:
        raise ValueError(f"results lack {len(missing)} annotated questions, e.g. {sorted(missing)[:5]}")
    scored_ids = [question_id for question_id in annotations if question_id in answers]
    if not scored_ids:
        raise ValueError("no question to score")

    per_question: dict[int, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for question_id in scored_ids:
        annotation = annotations[question_id]
        accuracy = vqa_accuracy(answers[question_id], [gt["answer"] for gt in annotation["answers"]], metric)
        per_question[question_id] = accuracy
        by_answer_type[annotation["answer_type"]].append(accuracy)
        by_question_type[annotation.get("question_type", "")].append(accuracy)
    return {
        "overall": _percent(list(per_question.values()), ndigits),
        "per_answer_type": {kind: _percent(values, ndigits) for kind, values in sorted(by_answer_type.items())},
        "per_question_type": {kind: _percent(values, ndigits) for kind, values in sorted(by_question_type.items())},
        "per_question": {question_id: round(100.0 * value, ndigits) for question_id, value in per_question.items()},
        "n_questions": len(scored_ids),
    }


# --------------------------------------------------------------------------- majority-answer baselines


def _most_common(counter: Counter) -> str:
    # Ties broken alphabetically so the baseline does not depend on annotation order.
    best = max(counter.values())
    return min(answer for answer, count in counter.items() if count == best)


def majority_baseline(
    train_annotations: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    eval_annotations: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    ndigits: int = 2,
    metric: str = "current",
) -> dict[str, Any]:
    """Accuracy (percent, official metric) of answering from training-answer statistics alone.

    Answers are counted on the training `multiple_choice_answer` (the annotators' most frequent answer):
    - "global": always the most common training answer (the thesis' "always yes" baseline);
    - "per_answer_type": the most common training answer of the eval question's answer type (uses the
      ground-truth answer type, so it is an upper bound for a type-aware prior);
    - "per_question_type": the same per question type (the "prior per question type" of the VQA paper);
      a question type unseen in training falls back to the global answer.
    Each entry holds the answer(s) used and the `evaluate` dict without per-question scores.
    """
    train = load_annotations(train_annotations)
    evaluation = load_annotations(eval_annotations)
    if not train or not evaluation:
        raise ValueError("majority_baseline needs non-empty train and eval annotations")

    overall = Counter(annotation["multiple_choice_answer"] for annotation in train)
    by_answer_type: dict[str, Counter] = defaultdict(Counter)
    by_question_type: dict[str, Counter] = defaultdict(Counter)
    for annotation in train:
        by_answer_type[annotation["answer_type"]][annotation["multiple_choice_answer"]] += 1
        by_question_type[annotation.get("question_type", "")][annotation["multiple_choice_answer"]] += 1
    global_answer = _most_common(overall)
    answer_type_answers = {kind: _most_common(counts) for kind, counts in by_answer_type.items()}
    question_type_answers = {kind: _most_common(counts) for kind, counts in by_question_type.items()}

    def score(predict) -> dict[str, Any]:
        results = [{"question_id": annotation["question_id"], "answer": predict(annotation)}
                   for annotation in evaluation]
        scores = evaluate(results, None, evaluation, ndigits=ndigits, metric=metric)
        scores.pop("per_question")
        return scores

    return {
        "global": {"answer": global_answer, **score(lambda annotation: global_answer)},
        "per_answer_type": {
            "answers": answer_type_answers,
            **score(lambda annotation: answer_type_answers.get(annotation["answer_type"], global_answer)),
        },
        "per_question_type": {
            "answers": question_type_answers,
            **score(lambda annotation: question_type_answers.get(annotation.get("question_type", ""),
                                                                 global_answer)),
        },
    }
