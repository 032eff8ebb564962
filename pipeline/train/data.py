"""Batches -> model inputs, the batch-source interface the training loop consumes, and a synthetic source.

A batch is a dict of B samples (one sample = one ASR segment of one video, or one VQA question):

    video_id: list[str]          segment_idx: LongTensor[B]
    text: list[str]              the TARGET (words spoken in the segment / the answer)
    prev_text: list[str]         the directly preceding segment text ("" for the first) / the question
    clip: FloatTensor[B, F, D_clip]   zero-padded frame embeddings;  clip_mask: BoolTensor[B, F]
    frame_time: FloatTensor[B, F]     frame PTS relative to the segment start, seconds
    audio: FloatTensor[B, D_audio];   audio_mask: BoolTensor[B]
    scene_text: list[str]        scene-graph serialisation, e.g. "person holding cup; cup on table"
    sample_mask: BoolTensor[B]   optional; False marks a padding sample (a repeat that evens out the ranks):
                                 no loss, no token count, no metric, no prediction

`Prefetcher` runs a batch source (reading, collation) and the `InputBuilder` (tokenisation) in a background
thread, a bounded number of batches ahead of the training step (`data.prefetch`).
"""
from __future__ import annotations

import hashlib
import importlib
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch

from pipeline import modalities
from pipeline.models.vpt import VPTConfig
from pipeline.train.config import SyntheticConfig  # noqa: F401 - data.synthetic's schema, defined once


@runtime_checkable
class BatchSource(Protocol):
    """What the loop trains on. The loop keeps the position (epoch, step within the epoch) in its checkpoints,
    together with `state_dict()`; on resume it calls `load_state_dict` and then `batches(epoch, start_step)`.

    A source is built for one rank (`rank`, `world_size`) and yields that rank's share of each global step.
    `batches(epoch, start_step)` yields the batches of `epoch` from step `start_step` on, and ends with the epoch.

    Every rank must yield the same number of batches, for the eval split too: each batch is one FSDP forward,
    whose all-gathers wait for every rank. A source whose split does not divide evenly pads the short ranks'
    batches with repeated samples and marks them in `sample_mask` (BoolTensor[B], False = padding): padding
    rows get no labels (no loss, no eval loss) and no prediction.
    """

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_source(data_cfg: dict[str, Any], split: str, rank: int, world_size: int) -> BatchSource:
    """`data_cfg.source`: "synthetic", or "package.module:factory" called as
    factory(data_cfg, split=split, rank=rank, world_size=world_size)."""
    source = data_cfg["source"]
    if source == "synthetic":
        return SyntheticSource(SyntheticConfig(**dict(data_cfg.get("synthetic", {}))), split=split,
                               batch_size=int(data_cfg["batch_size"]), rank=rank, world_size=world_size)
    module, _, name = source.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(data_cfg, split=split, rank=rank, world_size=world_size)


# ---------------------------------------------------------------------------------------------- model inputs


class InputBuilder:
    """Tokenises and pads a batch into the tensors `VPT.forward` takes.

    Encoder-side tensors come from prev_text, scene_text, clip and audio only; `text` becomes `labels` alone.
    """

    def __init__(self, tokenizer, cfg: VPTConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self._lock = threading.Lock()     # a prefetch thread and the eval loop may tokenise at the same time

    def _ids(self, texts: list[str], max_len: int, keep: str) -> list[list[int]]:
        with self._lock:
            ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        room = max(max_len - 1, 0)
        # the prompt keeps its end (the words right before the segment); everything else keeps its start
        cut = [(x[-room:] if room else []) if keep == "end" else x[:room] for x in ids]
        return [x + [self.eos_id] for x in cut]

    def _pad(self, seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), value, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = True
        return ids, mask

    def encoder_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The model inputs of every modality of the model config (`pipeline.modalities` encoders), in order."""
        cfg = self.cfg
        out: dict[str, torch.Tensor] = {}
        for _, enc in modalities.encoders(cfg.modalities):
            if enc.kind == "text":
                ids, mask = enc.inputs
                out[ids], out[mask] = self._pad(
                    self._ids(batch[enc.text], int(getattr(cfg, enc.max_tokens)), keep=enc.keep), self.pad_id)
            elif enc.kind == "vector":
                value, mask = enc.inputs
                out[value], out[mask] = batch[value].float(), batch[mask].bool()
            else:
                seq = [batch[k] for k in enc.inputs]
                if seq[0].shape[1] > cfg.max_frames:     # evenly spaced frames, keeps the whole segment's span
                    idx = torch.linspace(0, seq[0].shape[1] - 1, cfg.max_frames).round().long()
                    seq = [t[:, idx] for t in seq]
                for k, t in zip(enc.inputs, seq):
                    out[k] = t.bool() if k == enc.inputs[1] else t.float()
        return out

    def labels(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self._pad(self._ids(texts, self.cfg.max_target_tokens, keep="start"), self.pad_id)
        return ids.masked_fill(~mask, -100), mask

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.encoder_inputs(batch)
        out["labels"], out["decoder_attention_mask"] = self.labels(batch["text"])
        if "sample_mask" in batch:      # padding rows (evening out the ranks) must not count in any loss
            out["sample_mask"] = batch["sample_mask"].bool()
            out["labels"][~out["sample_mask"]] = -100
        return out

    def token_counts(self, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
        """Positions in use: `encoder` (every encoder part in use), of them `frames` and `audio` (and each
        projected input's own count key), and `decoder` (target tokens). The tokens/s figure is encoder +
        decoder; MFU weighs each by its own FLOPs. Padding samples (`sample_mask` False) count nothing."""
        cfg = self.cfg
        real = inputs.get("sample_mask")
        if real is None:
            some = inputs["labels"] if "labels" in inputs else inputs[
                modalities.encoders(cfg.modalities)[0][1].inputs[1]]
            real = torch.ones(some.shape[0], dtype=torch.bool, device=some.device)

        def used(mask: torch.Tensor) -> int:
            return int(mask[real].sum())

        counts = {"encoder": 0, "frames": 0, "audio": 0}
        for name, enc in modalities.encoders(cfg.modalities):
            n = used(inputs[enc.inputs[1]]) if cfg.uses(enc) else 0
            counts["encoder"] += n
            if enc.projected:
                counts[enc.count or name] = n
        counts["decoder"] = int((inputs["labels"] != -100).sum())
        return counts

    def token_count(self, inputs: dict[str, torch.Tensor]) -> int:
        """Encoder positions in use + target tokens (the tokens of the tokens/s figure)."""
        counts = self.token_counts(inputs)
        return counts["encoder"] + counts["decoder"]


def to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


class Prefetcher:
    """Iterates `items` in a background thread, at most `depth` items ahead of the consumer, applying `fn` to
    each there (e.g. the Deep Lake reads and collation of a source's generator plus tokenisation). Order and
    values are those of plain iteration; an exception in the thread is raised by `__next__`. depth 0 iterates
    in the caller's thread.

    The thread runs while the consumer computes (torch, tokenizers and Deep Lake release the GIL in their native
    code), so the input work of the next batches overlaps the training step. `close()` stops it (it is a
    daemon thread, so a process that exits without closing does not wait for it)."""

    _END = object()

    def __init__(self, items: Iterable[Any], depth: int = 2, fn: Callable[[Any], Any] | None = None,
                 pin_memory: bool = False):
        self.fn = fn or (lambda x: x)
        self.depth, self.pin_memory = int(depth), pin_memory
        self._items = iter(items)
        self._stop = threading.Event()
        self._done = False
        if self.depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
            self._thread.start()

    def _prepare(self, item: Any) -> Any:
        out = self.fn(item)
        if self.pin_memory:
            out = _pinned(out)
        return out

    def _put(self, value: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(("item", self._prepare(item))):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(("error", exc))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if self.depth <= 0:
            try:
                return self._prepare(next(self._items))
            except StopIteration:
                self._done = True
                raise
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._done = True
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._done = True
        if self.depth > 0 and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)


def _pinned(value: Any) -> Any:
    """Tensors (also inside dicts and tuples) in page-locked memory, for asynchronous host-to-GPU copies."""
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {k: _pinned(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_pinned(v) for v in value)
    return value


# ---------------------------------------------------------------------------------------------- synthetic data

CONCEPT_WORDS = ["apple", "river", "guitar", "bicycle", "kitchen", "mountain", "window", "garden",
                 "camera", "pencil", "rocket", "violin", "tiger", "ocean", "ladder", "candle"]
SCENE_OBJECTS = ["cup", "table", "chair", "lamp", "book", "phone", "bag", "shoe"]


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


class SyntheticSource:
    """Deterministic batches in the loader's exact form; train and eval use disjoint videos.

    Each video is a sequence of concepts with no concept repeated back to back; a segment's target is its
    concept word and its prev_text is the previous segment's word, so prev_text never contains the target.
    Scene text and audio are noise (independent of the concept).
    """

    def __init__(self, cfg: SyntheticConfig, split: str = "train", batch_size: int = 8, rank: int = 0,
                 world_size: int = 1):
        if cfg.num_concepts > len(CONCEPT_WORDS):
            raise ValueError(f"at most {len(CONCEPT_WORDS)} concepts")
        self.cfg, self.split, self.batch_size, self.rank, self.world_size = cfg, split, batch_size, rank, world_size
        g = torch.Generator().manual_seed(_seed(cfg.seed, "concepts"))
        vectors = torch.randn(cfg.num_concepts, cfg.d_clip, generator=g)
        self.concept_clip = vectors / vectors.norm(dim=1, keepdim=True)
        self.words = CONCEPT_WORDS[:cfg.num_concepts]
        self.num_videos = cfg.train_videos if split == "train" else cfg.eval_videos
        self.num_samples = self.num_videos * cfg.segments_per_video

    def tokenizer_texts(self) -> list[str]:
        return [" ".join(self.words), " ".join(SCENE_OBJECTS), "person holding on next to"]

    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.cfg.seed, "num_samples": self.num_samples, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.cfg.seed or state.get("num_samples") != self.num_samples:
            raise ValueError(f"synthetic source changed since the checkpoint: {state} vs {self.state_dict()}")

    def video_concepts(self, video: int) -> list[int]:
        g = torch.Generator().manual_seed(_seed(self.cfg.seed, self.split, "video", video))
        ks = [int(torch.randint(self.cfg.num_concepts, (1,), generator=g))]
        for _ in range(self.cfg.segments_per_video - 1):     # never the same concept twice in a row
            step = int(torch.randint(1, self.cfg.num_concepts, (1,), generator=g))
            ks.append((ks[-1] + step) % self.cfg.num_concepts)
        return ks

    def sample(self, index: int) -> dict[str, Any]:
        cfg = self.cfg
        video, seg = divmod(index, cfg.segments_per_video)
        ks = self.video_concepts(video)
        k = ks[seg]
        g = torch.Generator().manual_seed(_seed(cfg.seed, self.split, "sample", index))
        n_frames = int(torch.randint(1, cfg.max_frames + 1, (1,), generator=g))
        clip = torch.zeros(cfg.max_frames, cfg.d_clip)
        clip[:n_frames] = self.concept_clip[k] + cfg.frame_noise * torch.randn(n_frames, cfg.d_clip, generator=g) \
            / cfg.d_clip ** 0.5
        frame_time = torch.zeros(cfg.max_frames)
        frame_time[:n_frames] = torch.sort(torch.rand(n_frames, generator=g) * 5.0).values
        objs = torch.randint(len(SCENE_OBJECTS), (2,), generator=g).tolist()
        return {
            "video_id": f"{self.split}-video-{video:05d}", "segment_idx": seg, "text": self.words[k],
            "prev_text": self.words[ks[seg - 1]] if seg > 0 else "",
            "clip": clip, "clip_mask": torch.arange(cfg.max_frames) < n_frames, "frame_time": frame_time,
            "audio": torch.randn(cfg.d_audio, generator=g), "audio_mask": bool(torch.rand(1, generator=g) < 0.8),
            "scene_text": f"person holding {SCENE_OBJECTS[objs[0]]}; {SCENE_OBJECTS[objs[0]]} on "
                          f"{SCENE_OBJECTS[objs[1]]}",
        }

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
            _seed(self.cfg.seed, self.split, "epoch", epoch))).tolist()
        global_batch = self.batch_size * self.world_size
        for step in range(start_step, self.steps_per_epoch()):
            lo = step * global_batch + self.rank * self.batch_size
            yield collate([self.sample(i) for i in order[lo:lo + self.batch_size]])


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples (as `SyntheticSource.sample` returns them) -> one batch dict of the contract above."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            out[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out
