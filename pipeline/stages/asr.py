"""asr: faster-whisper (CTranslate2) speech recognition with word timestamps, on the shared inference runner.

CPU workers decode each video's audio to 16 kHz mono; model actors run Whisper (`BatchedInferencePipeline`
over the VAD speech chunks when `batch_size > 1`, the sequential `WhisperModel.transcribe` otherwise).

Segmentation (`split: sentence`, the default, needs `word_timestamps`): the batched pipeline decodes each VAD
chunk (up to 30 s) as one unit of text without timestamp tokens, which keeps all of its text (with timestamp
tokens it drops the unfinished sentence at the end of each chunk); the words of all decoded units are then
re-cut, in time order, into sentences by their word timestamps: a cut after a word ending a sentence (. ? !,
not after a title such as "Dr." or an initial), at a pause longer than `max_pause_s`, and inside a sentence longer
than `max_segment_s` at its longest pause. The sequential path's Whisper segments are re-cut the same way, so
both paths give sentence-sized rows with the same text. `split: none` keeps the decoder's segments (batched:
with timestamp tokens then, as without words there is nothing to cut on).

Quality (per row): no_speech_prob, avg_logprob and compression_ratio are the decoder's, of the decoded window(s)
the row's words came from (the worst when a sentence spans two). Filter (`filter_action`):
- `no_speech_prob > no_speech_threshold` and `avg_logprob < logprob_threshold` -> "no_speech" (Whisper's own
  silence rule: a confident decode is kept despite a high no_speech_prob);
- `avg_logprob < min_avg_logprob` -> "low_logprob" (off by default: null);
- `compression_ratio > compression_ratio_threshold` -> "compression" (a decoder caught in a loop);
these are dropped (`drop`, the default; counted in videos.n_dropped) or kept with the reasons in
`quality_flags` (`mark`); `off` skips them. Always dropped: rows without any word character ("empty") and
immediate repeats ("repeat": the row's words, case and punctuation aside, equal those of the row before it or of
the last k rows before it joined), so a row's prev_text (the preceding rows' text) never equals its own text.
Tables:
- `segments` (video_id, segment_idx): start, end, text (as decoded: original case and punctuation), words
  (list of {word, start, end, probability}, each inside [start, end]), no_speech_prob, avg_logprob,
  compression_ratio, quality_flags ("" or comma-separated reasons, `mark` only), language, language_probability.
  segment_idx runs 0..n-1 over the rows kept.
- `videos` (video_id): language, language_probability, n_segments, has_speech, duration, n_dropped.
Times are clamped to the audio's duration. A video without speech is ok with note "no_speech"; one without an
audio stream is ok with note "no_audio" (no segments, `duration` where its media ends: it gets windows downstream);
undecodable media is failed ("corrupt: ...").
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

import pyarrow as pa

from ..inference.runner import InferenceRun, ItemFailure, RunnerConfig, run_inference
from .base import ItemResult, Resources, Stage, StageConfig, WorkItem

class Split(str, Enum):
    """Typed so that the config checks the value (a bad one is a one-line config error); compares equal to its name."""
    sentence = "sentence"
    none = "none"


class FilterAction(str, Enum):
    drop = "drop"
    mark = "mark"
    off = "off"


@dataclass
class AsrConfig(StageConfig):
    name: str = "asr"
    model: str = "medium"           # size name (tiny..large-v3) or a local CTranslate2 directory
    compute_type: str = "auto"      # auto: int8 on CPU, float16 on GPU; or any CTranslate2 compute type
    beam_size: int = 5
    batch_size: int = 8             # speech chunks per forward (BatchedInferencePipeline); 1 = sequential
    vad_filter: bool = True         # Silero VAD: decode only speech (and find videos without any)
    language: Optional[str] = None  # null = detect per video
    temperature: float = 0.0        # greedy/beam at a fixed temperature (no fallback schedule)
    word_timestamps: bool = True
    cpu_threads: int = 0            # CTranslate2 intra-op threads on CPU (0 = its default)
    # segmentation
    split: Split = Split.sentence   # sentence: re-cut the decoded words into sentences; none: decoder segments
    max_segment_s: float = 15.0     # a longer sentence is cut at its longest pause between words
    max_pause_s: float = 3.0        # a longer pause between two words always ends a segment
    # hallucination filter
    filter_action: FilterAction = FilterAction.drop  # drop | mark (quality_flags) | off; empty rows and repeats
                                                     # are always dropped
    no_speech_threshold: Optional[float] = 0.6   # with logprob_threshold: Whisper's silence rule
    logprob_threshold: Optional[float] = -1.0
    min_avg_logprob: Optional[float] = None      # alone: low-confidence decodes (null = off)
    compression_ratio_threshold: Optional[float] = 2.4
    runner: RunnerConfig = field(default_factory=lambda: RunnerConfig(batch_size=1, max_in_flight=8))
    resources: Resources = field(default_factory=lambda: Resources(cpus=4, gpus=0, mem_gb=16))

    def __post_init__(self):
        self.split = Split(self.split)                       # ValueError for anything else
        self.filter_action = FilterAction(self.filter_action)
        if self.max_segment_s <= 0 or self.max_pause_s <= 0:
            raise ValueError("asr.max_segment_s and asr.max_pause_s must be > 0")


class WhisperTranscriber:
    """The model side (one per actor): audio arrays in, segment dicts out."""

    def __init__(self, cfg: AsrConfig, model_path: str, device: str):
        from faster_whisper import BatchedInferencePipeline

        from ..models.whisper import load_whisper

        self.cfg = cfg
        self.model = load_whisper(model_path, device=device, compute_type=cfg.compute_type,
                                  cpu_threads=cfg.cpu_threads)
        self.batched = BatchedInferencePipeline(self.model) if cfg.batch_size > 1 else None

    def predict(self, payloads: list[dict]) -> list[Any]:
        outputs: list[Any] = []
        for payload in payloads:
            try:
                outputs.append(self.transcribe(payload["audio"]))
            except Exception as exc:  # noqa: BLE001 - one bad input fails only its item
                outputs.append(exc)
        return outputs

    def transcribe(self, audio) -> dict:
        cfg = self.cfg
        resplit = cfg.split == "sentence" and cfg.word_timestamps
        kwargs = dict(language=cfg.language, beam_size=cfg.beam_size, temperature=cfg.temperature,
                      word_timestamps=cfg.word_timestamps, vad_filter=cfg.vad_filter)
        if self.batched is not None:
            if not cfg.vad_filter:  # without VAD the batched pipeline needs explicit 30 s windows
                kwargs["clip_timestamps"] = _fixed_windows(len(audio) / 16000, 30.0)
            # Re-cut on words: decode each chunk whole, without timestamp tokens (with them, the batched pipeline
            # drops the text after the last complete timestamp pair of each chunk). Else timestamp tokens.
            segments, info = self.batched.transcribe(audio, batch_size=cfg.batch_size, without_timestamps=resplit,
                                                     **kwargs)
        else:
            segments, info = self.model.transcribe(audio, **kwargs)
        duration = len(audio) / 16000

        def clamp(t: float) -> float:  # decoded timestamps can overshoot the end of the audio
            return min(max(float(t), 0.0), duration)

        units = []
        for seg in segments:
            units.append({
                "start": clamp(seg.start), "end": clamp(seg.end), "text": seg.text.strip(),
                "words": [{"word": w.word, "start": clamp(w.start), "end": clamp(w.end),
                           "probability": float(w.probability)} for w in (seg.words or [])],
                "no_speech_prob": float(seg.no_speech_prob), "avg_logprob": float(seg.avg_logprob),
                "compression_ratio": float(seg.compression_ratio),
            })
        rows = split_sentences(units, cfg.max_segment_s, cfg.max_pause_s) if resplit else units
        rows, n_dropped = filter_segments(rows, cfg)
        return {"segments": rows, "language": info.language, "duration": duration, "n_dropped": n_dropped,
                "language_probability": float(info.language_probability)}


# --- segmentation --------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.?!。？！…]+[\"'”’»)\]]*$")
# Words ending in "." that do not end a sentence: titles before a name, common abbreviations, initials.
_NOT_AN_END = re.compile(r"^(mr|mrs|ms|dr|prof|st|mt|vs|cf|e\.g|i\.e|[a-z])\.$", re.IGNORECASE)
_CLAUSE_END = re.compile(r"[,;:—–-][\"'”’»)\]]*$")


def ends_sentence(word: str) -> bool:
    w = word.strip()
    return bool(_SENTENCE_END.search(w)) and not _NOT_AN_END.match(w)


def split_sentences(units: list[dict], max_segment_s: float, max_pause_s: float) -> list[dict]:
    """Re-cut decoded segments ("units": text, words, quality fields) into sentence-sized rows by their words.

    The words of all units are taken in time order and cut after a sentence end, at a pause > max_pause_s, and
    (recursively) inside a run longer than max_segment_s at its longest pause (a pause after a clause mark counts
    0.3 s more). A row's text is its words joined; its quality fields are the worst of the units it draws from.
    A unit without words (nothing aligned) is kept as it is.
    """
    tagged = []   # (word, unit index), in time order
    rows_without_words = []
    for k, unit in enumerate(units):
        if unit["words"]:
            tagged.extend((w, k) for w in unit["words"])
        elif unit["text"]:
            rows_without_words.append(dict(unit))
    tagged.sort(key=lambda wk: (wk[0]["start"], wk[0]["end"]))
    runs: list[list[tuple[dict, int]]] = []
    current: list[tuple[dict, int]] = []
    for i, (w, k) in enumerate(tagged):
        if current and w["start"] - current[-1][0]["end"] > max_pause_s:
            runs.append(current)
            current = []
        current.append((w, k))
        if ends_sentence(w["word"]):
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    pieces = [p for run in runs for p in _cut_long(run, max_segment_s)]
    rows = []
    for piece in pieces:
        words = [w for w, _ in piece]
        srcs = [units[k] for k in sorted({k for _, k in piece})]
        rows.append({
            "start": words[0]["start"], "end": max(w["end"] for w in words),
            "text": "".join(w["word"] for w in words).strip(), "words": words,
            "no_speech_prob": max(u["no_speech_prob"] for u in srcs),
            "avg_logprob": min(u["avg_logprob"] for u in srcs),
            "compression_ratio": max(u["compression_ratio"] for u in srcs),
        })
    return sorted(rows + rows_without_words, key=lambda r: (r["start"], r["end"]))


def _cut_long(run: list[tuple[dict, int]], max_segment_s: float) -> list[list[tuple[dict, int]]]:
    if len(run) < 2 or run[-1][0]["end"] - run[0][0]["start"] <= max_segment_s:
        return [run]

    def score(i: int) -> float:  # cut before word i
        prev = run[i - 1][0]
        return run[i][0]["start"] - prev["end"] + (0.3 if _CLAUSE_END.search(prev["word"].strip()) else 0.0)

    best = max(range(1, len(run)), key=lambda i: (score(i), -abs(i - len(run) / 2)))
    return _cut_long(run[:best], max_segment_s) + _cut_long(run[best:], max_segment_s)


# --- hallucination filter ------------------------------------------------------------------------------------

def normalized_words(text: str) -> tuple[str, ...]:
    """Words without case or punctuation: normalized_words(a + " " + b) == normalized_words(a) + normalized_words(b)."""
    return tuple(re.findall(r"\w+", text.lower()))


def quality_reasons(row: dict, cfg: AsrConfig) -> list[str]:
    reasons = []
    if (cfg.no_speech_threshold is not None and cfg.logprob_threshold is not None
            and row["no_speech_prob"] > cfg.no_speech_threshold and row["avg_logprob"] < cfg.logprob_threshold):
        reasons.append("no_speech")
    if cfg.min_avg_logprob is not None and row["avg_logprob"] < cfg.min_avg_logprob:
        reasons.append("low_logprob")
    if cfg.compression_ratio_threshold is not None and row["compression_ratio"] > cfg.compression_ratio_threshold:
        reasons.append("compression")
    return reasons


def filter_segments(rows: list[dict], cfg: AsrConfig) -> tuple[list[dict], int]:
    """Rows kept (each with quality_flags) and how many were dropped (see the module docstring)."""
    kept: list[dict] = []
    kept_words: list[tuple[str, ...]] = []
    for row in rows:
        words = normalized_words(row["text"])
        reasons = quality_reasons(row, cfg) if cfg.filter_action != "off" else []
        if not words or _repeats(words, kept_words) or (reasons and cfg.filter_action == "drop"):
            continue
        kept.append({**row, "quality_flags": ",".join(reasons)})
        kept_words.append(words)
    return kept, len(rows) - len(kept)


def _repeats(words: tuple[str, ...], before: list[tuple[str, ...]]) -> bool:
    """words equals the concatenation of the last k rows' words, for some k >= 1."""
    tail: tuple[str, ...] = ()
    for prev in reversed(before):
        tail = prev + tail
        if len(tail) > len(words):
            return False
        if tail == words:
            return True
    return False


def _fixed_windows(duration: float, seconds: float) -> list[dict]:
    """Consecutive windows covering the audio, in seconds (BatchedInferencePipeline's clip_timestamps unit)."""
    return [{"start": i * seconds, "end": min((i + 1) * seconds, duration)}
            for i in range(math.ceil(duration / seconds))]


def load_audio_payload(item: WorkItem) -> dict:
    """CPU side: the video's audio as 16 kHz mono float32."""
    from ..audio import AudioDecodeError, NoAudioStream, load_audio

    rows = item.rows("download", "videos")
    if not rows or not rows[0].get("path"):
        raise ItemFailure("no_input: download row has no media path")
    try:
        audio = load_audio(rows[0]["path"])
    except NoAudioStream:       # visual-only video: ok without speech, windows over the whole media
        from ..inference.runner import Done
        from .audio import media_end_s

        return Done(ItemResult(item.video_id, note="no_audio", rows={"videos": [{
            "video_id": item.video_id, "language": None, "language_probability": None, "n_segments": 0,
            "has_speech": False, "duration": media_end_s(rows[0]["path"])}]}))
    except AudioDecodeError as exc:
        raise ItemFailure(str(exc)) from exc
    return {"audio": audio}


def to_result(item: WorkItem, out: dict) -> ItemResult:
    segments = []
    for idx, seg in enumerate(out["segments"]):
        segments.append({"video_id": item.video_id, "segment_idx": idx, **seg,
                         "language": out["language"], "language_probability": out["language_probability"]})
    video = {"video_id": item.video_id, "language": out["language"],
             "language_probability": out["language_probability"], "n_segments": len(segments),
             "has_speech": bool(segments), "duration": out["duration"], "n_dropped": out["n_dropped"]}
    return ItemResult(item.video_id, rows={"segments": segments, "videos": [video]},
                      note="" if segments else "no_speech")


_WORD = pa.struct([("word", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
                   ("probability", pa.float64())])


class AsrStage(Stage):
    name = "asr"
    Config = AsrConfig
    upstream = {"download": ("videos",)}
    tables = {"segments": ("video_id", "segment_idx"), "videos": ("video_id",)}
    schemas = {
        "segments": pa.schema([
            ("video_id", pa.string()), ("segment_idx", pa.int32()), ("start", pa.float64()),
            ("end", pa.float64()), ("text", pa.string()), ("words", pa.list_(_WORD)),
            ("no_speech_prob", pa.float64()), ("avg_logprob", pa.float64()), ("compression_ratio", pa.float64()),
            ("quality_flags", pa.string()), ("language", pa.string()), ("language_probability", pa.float64()),
        ]),
        "videos": pa.schema([
            ("video_id", pa.string()), ("language", pa.string()), ("language_probability", pa.float64()),
            ("n_segments", pa.int32()), ("has_speech", pa.bool_()), ("duration", pa.float64()),
            ("n_dropped", pa.int32()),
        ]),
    }

    def __init__(self, cfg: AsrConfig, ctx):
        super().__init__(cfg, ctx)
        self.run: InferenceRun | None = None

    def model_factory(self):
        from ..models.whisper import model_path

        # resolve (and build, for tiny) in the driver once, so actors only load
        path = model_path(self.cfg.model, self.ctx.models, self.ctx.cache_dir)
        return functools.partial(WhisperTranscriber, self.cfg, path, self.ctx.device)

    def process(self, items):
        self.run = run_inference(items, load_audio_payload, self.model_factory(), to_result,
                                 self.cfg.runner, device=self.ctx.device, log=self.ctx.log)
        yield from self.run

    def shard_stats(self) -> dict[str, Any]:
        return self.run.stats.as_dict() if self.run is not None else {}


STAGE = AsrStage
