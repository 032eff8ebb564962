"""asr: faster-whisper (CTranslate2) speech recognition with word timestamps, on the shared inference runner.

CPU workers decode each video's audio to 16 kHz mono; model actors run Whisper (`BatchedInferencePipeline`
over the VAD speech chunks when `batch_size > 1`, the sequential `WhisperModel.transcribe` otherwise).
Tables:
- `segments` (video_id, segment_idx): start, end, text (as decoded: original case and punctuation), words
  (list of {word, start, end, probability}), language, language_probability, no_speech_prob, avg_logprob.
- `videos` (video_id): language, language_probability, n_segments, has_speech, duration.
Times are clamped to the audio's duration. A video without speech is ok with note "no_speech"; no audio stream / undecodable media is failed
("no_audio: ..." / "corrupt: ...").
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa

from ..inference.runner import InferenceRun, ItemFailure, RunnerConfig, run_inference
from .base import ItemResult, Resources, Stage, StageConfig, WorkItem


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
    runner: RunnerConfig = field(default_factory=lambda: RunnerConfig(batch_size=1, max_in_flight=8))
    resources: Resources = field(default_factory=lambda: Resources(cpus=4, gpus=0, mem_gb=16))


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
        kwargs = dict(language=cfg.language, beam_size=cfg.beam_size, temperature=cfg.temperature,
                      word_timestamps=cfg.word_timestamps, vad_filter=cfg.vad_filter)
        if self.batched is not None:
            if not cfg.vad_filter:  # without VAD the batched pipeline needs explicit 30 s windows
                kwargs["clip_timestamps"] = _fixed_windows(len(audio) / 16000, 30.0)
            # no timestamp tokens: one segment per VAD chunk (faster-whisper's batched default); word
            # timestamps still place the text inside it
            segments, info = self.batched.transcribe(audio, batch_size=cfg.batch_size, without_timestamps=True,
                                                     **kwargs)
        else:
            segments, info = self.model.transcribe(audio, **kwargs)
        duration = len(audio) / 16000

        def clamp(t: float) -> float:  # decoded timestamps can overshoot the end of the audio
            return min(max(float(t), 0.0), duration)

        rows = []
        for seg in segments:
            rows.append({
                "start": clamp(seg.start), "end": clamp(seg.end), "text": seg.text.strip(),
                "words": [{"word": w.word, "start": clamp(w.start), "end": clamp(w.end),
                           "probability": float(w.probability)} for w in (seg.words or [])],
                "no_speech_prob": float(seg.no_speech_prob), "avg_logprob": float(seg.avg_logprob),
            })
        return {"segments": rows, "language": info.language, "duration": duration,
                "language_probability": float(info.language_probability)}


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
    except (NoAudioStream, AudioDecodeError) as exc:
        raise ItemFailure(str(exc)) from exc
    return {"audio": audio}


def to_result(item: WorkItem, out: dict) -> ItemResult:
    segments = []
    for idx, seg in enumerate(out["segments"]):
        segments.append({"video_id": item.video_id, "segment_idx": idx, **seg,
                         "language": out["language"], "language_probability": out["language_probability"]})
    video = {"video_id": item.video_id, "language": out["language"],
             "language_probability": out["language_probability"], "n_segments": len(segments),
             "has_speech": bool(segments), "duration": out["duration"]}
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
            ("no_speech_prob", pa.float64()), ("avg_logprob", pa.float64()), ("language", pa.string()),
            ("language_probability", pa.float64()),
        ]),
        "videos": pa.schema([
            ("video_id", pa.string()), ("language", pa.string()), ("language_probability", pa.float64()),
            ("n_segments", pa.int32()), ("has_speech", pa.bool_()), ("duration", pa.float64()),
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
