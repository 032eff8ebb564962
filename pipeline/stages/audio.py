"""audio: PANNs Cnn14 audio events per speech segment (or per fixed window when a video has no speech).

For every ASR segment of a video the stage embeds exactly the segment's time span; a video without ASR
segments is cut into consecutive `window_s` windows (the last one shorter). Each span gives one row of table
`audio`, keyed (video_id, segment_idx), with the span's start/end copied unchanged from the segment (or
window), a 2048-d float16 embedding and the top-k AudioSet labels with their scores.

Audio is decoded at 32 kHz mono by the same `load_audio` as the ASR stage (sample 0 at the container's time 0),
so segment times index the same samples. Padding (zeros, as PANNs itself zero-pads AudioSet clips shorter than 10 s in training): a span
shorter than `min_span_s` (the network needs >= 32 STFT frames; 1 s keeps a margin) is padded up to it, and
every span is padded up to a multiple of `pad_multiple_s` so that spans of equal padded length batch together
and each span's result does not depend on which other spans share its batch. `model_seconds` records the
length actually fed to the network; span audio past the end of the file is zeros too.

A video without an audio stream is ok with no `audio` rows and note "no_audio"; table `videos` (video_id,
has_audio) records per video whether it has an audio stream, so that ingest gives a visual-only video rows with
has_audio false instead of treating its missing audio rows as lost.

Runs on the shared inference runner: CPU workers decode and cut the audio, model actors run Cnn14 on batches
of spans from several videos at once.

Determinism: which spans share a network call depends on the order videos finish decoding (Ray scheduling), and
on CPU a span computed alone (batch of 1) differs from the same span in any larger batch by ~1e-9 (float32:
another matmul path), while every batch of 2 or more gives bit-identical results whatever its size, the span's
position or its companions, and whatever the intra-op thread count. A span alone in its call is therefore run
with an all-zero companion, so on one machine (CPU, fp32) two runs give bit-identical outputs. On GPU with
autocast (bf16/fp16) results are only reproducible within the precision's own rounding.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from ..inference.runner import Done, ItemFailure, RunnerConfig, run_inference
from ..join import windows
from .base import ItemResult, Resources, Stage, StageConfig, WorkItem

SAMPLE_RATE = 32000
EMBEDDING_SIZE = 2048


@dataclass
class AudioConfig(StageConfig):
    name: str = "audio"
    checkpoint: str = "~/.cache/vpt-pipeline/panns/Cnn14_mAP=0.431.pth"   # models=real: PANNs checkpoint file
    window_s: float = 10.0            # windows for videos without speech
    min_span_s: float = 1.0           # shorter spans are zero-padded to this
    pad_multiple_s: float = 1.0       # spans are zero-padded to a multiple of this (0: exact lengths)
    top_k: int = 5
    max_forward_seconds: float = 160.0   # padded audio per network call (memory bound)
    precision: str = "auto"           # auto (fp32 on CPU, bf16 autocast on GPU) | fp32 | bf16 | fp16
    runner: RunnerConfig = field(default_factory=lambda: RunnerConfig(batch_size=4, max_in_flight=8,
                                                                            num_cpus_preprocess=2))
    resources: Resources = field(default_factory=lambda: Resources(cpus=4, gpus=0, mem_gb=16))


@dataclass
class Span:
    segment_idx: int
    start: float
    end: float
    source: str                       # "asr_segment" | "window"


def plan_spans(segments: list[dict], duration: float, window_s: float) -> list[Span]:
    """The ASR segments' spans as they are; without segments, consecutive windows covering `duration`."""
    if segments:
        return [Span(int(s["segment_idx"]), float(s["start"]), float(s["end"]), "asr_segment")
                for s in sorted(segments, key=lambda s: int(s["segment_idx"]))]
    return [Span(i, a, b, "window") for i, a, b in windows(duration, window_s)]


def padded_samples(span: Span, min_span_s: float, pad_multiple_s: float, sample_rate: int = SAMPLE_RATE) -> int:
    n = max(0, round((span.end - span.start) * sample_rate))
    n = max(n, round(min_span_s * sample_rate))
    if pad_multiple_s > 0:
        step = round(pad_multiple_s * sample_rate)
        n = math.ceil(n / step) * step
    return n


def cut_span(audio: np.ndarray, span: Span, n_samples: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Samples [start, end) of the span, zero-padded at the end to n_samples."""
    a = max(0, round(span.start * sample_rate))
    b = max(a, round(span.end * sample_rate))
    piece = audio[a:min(b, len(audio))]
    out = np.zeros(n_samples, dtype=np.float32)
    out[:min(len(piece), n_samples)] = piece[:n_samples]
    return out


def _media_path(item: WorkItem) -> str:
    rows = item.rows("download", "videos")
    path = rows[0].get("path") if rows else None
    if not path:
        raise ItemFailure("error: no media path in the download stage's videos row")
    return path


def media_end_s(path: str) -> float | None:
    """Where the media ends on the container's timeline (seconds): the latest stream end, else the container's
    duration; None when neither is known. The span windows of a video without an audio stream cover."""
    import av

    with av.open(str(path)) as container:
        ends = [float(((s.start_time or 0) + s.duration) * s.time_base) for s in container.streams
                if s.duration is not None and s.time_base is not None]
        if ends:
            return max(ends)
        if container.duration:
            return (container.duration + max(0, container.start_time or 0)) / 1e6
    return None


def no_audio_result(video_id: str) -> ItemResult:
    """A video without an audio stream: ok, no audio rows, recorded as such (note and `videos.has_audio`)."""
    return ItemResult(video_id, rows={"videos": [{"video_id": video_id, "has_audio": False}]}, note="no_audio")


def prepare_item(item: WorkItem, window_s: float, min_span_s: float, pad_multiple_s: float) -> dict | Done:
    """CPU side: decode the audio at 32 kHz and cut every span (runs in a runner preprocessing worker)."""
    from ..audio import NoAudioStream, load_audio

    path = _media_path(item)
    segments = item.rows("asr", "segments")
    try:
        audio = load_audio(path, sample_rate=SAMPLE_RATE,
                           max_seconds=max((float(s["end"]) for s in segments), default=None))
    except NoAudioStream:
        return Done(no_audio_result(item.video_id))
    except Exception as exc:  # AudioDecodeError already reads "category: detail"
        raise ItemFailure(str(exc)[:500]) from None
    spans = plan_spans(segments, len(audio) / SAMPLE_RATE, window_s)
    waves = [cut_span(audio, s, padded_samples(s, min_span_s, pad_multiple_s)) for s in spans]
    described = [{**asdict(s), "model_seconds": len(w) / SAMPLE_RATE} for s, w in zip(spans, waves)]
    return {"spans": described, "waves": waves, "has_speech": bool(segments)}


class AudioTagger:
    """Runner model: Cnn14 over the spans of several videos, spans of equal padded length batched together."""

    def __init__(self, checkpoint: str, models: str, cache_dir: str, device: str, precision: str,
                 top_k: int, max_forward_seconds: float):
        import torch

        from ..models import panns

        self.torch, self.panns = torch, panns
        if models == "tiny":
            model = panns.load_tiny_cnn14(cache_dir)
        else:
            model = panns.load_cnn14(checkpoint)
        self.device = device
        self.model = model.to(device).eval()
        self.autocast_dtype = None
        if device == "cuda" and precision in ("auto", "bf16"):
            self.autocast_dtype = torch.bfloat16
        elif device == "cuda" and precision == "fp16":
            self.autocast_dtype = torch.float16
        self.top_k = top_k
        self.max_forward_samples = int(max_forward_seconds * SAMPLE_RATE)

    def _forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(batch).to(self.device)
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=self.autocast_dtype or torch.float32,
                                                    enabled=self.autocast_dtype is not None):
            out = self.model(x)
        return out["embedding"].float().cpu().numpy(), out["clipwise_output"].float().cpu().numpy()

    def predict(self, payloads: list[dict]) -> list[dict]:
        waves = [(p, k, w) for p, payload in enumerate(payloads) for k, w in enumerate(payload["waves"])]
        embeddings = [np.zeros((len(p["waves"]), EMBEDDING_SIZE), np.float16) for p in payloads]
        probs = [np.zeros((len(p["waves"]), 527), np.float32) for p in payloads]
        by_length: dict[int, list[tuple[int, int, np.ndarray]]] = {}
        for entry in waves:
            by_length.setdefault(len(entry[2]), []).append(entry)
        for length, group in sorted(by_length.items()):
            per_call = max(1, self.max_forward_samples // max(1, length))
            for start in range(0, len(group), per_call):
                chunk = group[start:start + per_call]
                batch = [w for _, _, w in chunk]
                if len(batch) == 1:     # alone, a span takes another numeric path: a zero companion (see above)
                    batch.append(np.zeros_like(batch[0]))
                emb, prob = self._forward(np.stack(batch))
                for (p, k, _), e, pr in zip(chunk, emb, prob):
                    embeddings[p][k] = e.astype(np.float16)
                    probs[p][k] = pr
        labels = self.panns.audioset_labels()
        outputs = []
        for payload, emb, prob in zip(payloads, embeddings, probs):
            top = np.argsort(-prob, axis=1, kind="stable")[:, :self.top_k]
            outputs.append({"spans": payload["spans"], "has_speech": payload["has_speech"],
                            "embedding": emb,
                            "labels": [[labels[i] for i in row] for row in top],
                            "scores": [[float(prob[n, i]) for i in row] for n, row in enumerate(top)]})
        return outputs


VIDEOS_SCHEMA = pa.schema([("video_id", pa.string()), ("has_audio", pa.bool_())])
AUDIO_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("segment_idx", pa.int64()), ("start", pa.float64()), ("end", pa.float64()),
    ("source", pa.string()), ("model_seconds", pa.float64()),
    ("embedding", pa.list_(pa.float16())), ("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
])


class AudioStage(Stage):
    name = "audio"
    Config = AudioConfig
    upstream = {"download": ("videos",), "asr": ("segments", "videos")}
    tables = {"audio": ("video_id", "segment_idx"), "videos": ("video_id",)}
    schemas = {"audio": AUDIO_SCHEMA, "videos": VIDEOS_SCHEMA}

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__(cfg, ctx)
        self._stats: dict[str, Any] = {}

    def process(self, items: Iterable[WorkItem]) -> Iterator[ItemResult]:
        cfg, ctx = self.cfg, self.ctx
        prepare = partial(prepare_item, window_s=float(cfg.window_s), min_span_s=float(cfg.min_span_s),
                          pad_multiple_s=float(cfg.pad_multiple_s))
        factory = partial(AudioTagger, checkpoint=str(cfg.checkpoint), models=ctx.models,
                          cache_dir=str(ctx.cache_dir), device=ctx.device, precision=str(cfg.precision),
                          top_k=int(cfg.top_k), max_forward_seconds=float(cfg.max_forward_seconds))
        run = run_inference(items, prepare, factory, self.postprocess, cfg.runner,
                            device=ctx.device, log=ctx.log)
        yield from run
        self._stats = run.stats.as_dict()

    @staticmethod
    def postprocess(item: WorkItem, output: dict) -> ItemResult:
        rows = []
        for n, span in enumerate(output["spans"]):
            rows.append({"video_id": item.video_id, "segment_idx": span["segment_idx"], "start": span["start"],
                         "end": span["end"], "source": span["source"],
                         "model_seconds": span["model_seconds"],
                         "embedding": output["embedding"][n], "labels": output["labels"][n],
                         "scores": output["scores"][n]})
        note = "" if output["has_speech"] else "no_speech_windows"
        return ItemResult(item.video_id, rows={"audio": rows,
                                               "videos": [{"video_id": item.video_id, "has_audio": True}]}, note=note)

    def shard_stats(self) -> dict[str, Any]:
        return dict(self._stats)


STAGE = AudioStage
