"""PyTorch-facing batches over the ingested Deep Lake dataset: content splits, block shuffling, ranks, resume.

The interface matches `pipeline.train.data.BatchSource`:

    class BatchSource(Protocol):
        def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]: ...   # this rank's batches
        def state_dict(self) -> dict: ...
        def load_state_dict(self, state: dict) -> None: ...

Each batch follows the contract in `pipeline.schema` (video_id, segment_idx, text, prev_text, clip, clip_mask,
frame_time, audio, audio_mask, scene_text, sample_mask; a registered modality adds its `collate`'s entries). A row whose CLIP embeddings do not number its frames is
an error (ValueError naming the row), never truncated. Use it from training with
`data.source: pipeline.loader:build_source` and `data.path: <dataset URL>`.

- Splits by content: a row's split is a stable hash of its video's `content_id` (the download stage's identity of
  the media: `youtube:<id>` for a site video, `sha256:<hex>` of the file otherwise; see
  `pipeline.stages.download`) against `split_fractions` (train, val, test). So every row of one video, and every
  video with the same content under another id (the same URL twice, a copied file), lands in one split, whatever
  the dataset order or size. Rows without a content id (datasets made before the column existed) use their
  video_id.
- Block shuffling: Deep Lake re-opens chunk files on single-row reads (`ds[i]`, ~2.4 opens per sample) but
  costs ~0.004 per sample on contiguous slices. So an epoch reads blocks of `block_rows` contiguous rows of the
  split (column slices), in an order permuted by (seed, epoch), and mixes them through an in-memory buffer of
  `shuffle_buffer_rows` rows (random pops, seeded by seed, epoch, rank).
- Ranks, every row exactly once: the epoch's rows, in block order, are cut into `world_size` consecutive
  ranges whose sizes differ by at most one row (a block may be shared by two neighbouring ranks), so the ranks
  read disjoint rows and together every row of the split once. Every rank yields the same number of batches
  (ceil(ceil(rows / world_size) / batch_size)); a rank one row short (or, in a split smaller than the world,
  with no row at all) fills its last batch with a repeated row marked False in `sample_mask`, which the losses,
  the token counts and the metrics leave out. `drop_last=True` instead yields only full batches (then up to
  world_size * batch_size rows of an epoch are not seen).
- Resume: the order of an epoch is computed from row indices and the settings alone, so
  `batches(epoch, start_step)` yields exactly the batches from `start_step` on, reading only the blocks that
  hold them. `state_dict()` records the settings the order depends on; `load_state_dict` refuses, with a
  one-line ValueError, a changed setting in the middle of an epoch (the rows already seen could not be told
  apart), and at an epoch boundary plans the next epoch with the new settings (each epoch is planned whole).
  A different set of rows (another dataset version, split or split fractions) is always refused.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from . import modalities

SPLITS = ("train", "val", "test")
# the dataset columns read (key + start, then each modality's `read`, `pipeline.modalities`); COLUMNS: the
# built-in modalities', `columns()` the current ones
COLUMNS = ("video_id", "segment_idx", "start", "text", "prev_text", "clip", "frame_pts", "audio", "has_audio",
           "scene_text")


def columns() -> tuple[str, ...]:
    return modalities.loader_columns()
PLAN_VERSION = 2        # the epoch-order algorithm; a checkpoint of another one cannot resume mid-epoch
# settings that decide the order of an epoch: may change at an epoch boundary, never inside an epoch
ORDER_KEYS = ("seed", "shuffle", "block_rows", "shuffle_buffer_rows", "world_size", "batch_size", "drop_last",
              "plan_version")
# what decides the rows themselves: never changes on resume
ROWS_KEYS = ("split", "split_fractions", "num_rows", "rows_digest")


@dataclass
class LoaderConfig:
    batch_size: int = 8                 # per rank
    max_frames: int = 8                 # frames per sample at most (evenly spaced over the segment)
    split_fractions: tuple[float, float, float] = (0.98, 0.01, 0.01)   # train, val, test by content
    seed: int = 0
    shuffle: bool = True
    block_rows: int = 64                # contiguous rows per read
    shuffle_buffer_rows: int = 1024     # rows mixed in memory
    drop_last: bool = False             # False: every row once, short ranks padded (sample_mask False)
    d_clip: int | None = None           # None: from the data
    d_audio: int | None = None

    def __post_init__(self):
        if int(self.batch_size) < 1 or int(self.block_rows) < 1 or int(self.shuffle_buffer_rows) < 1:
            raise ValueError(f"loader batch_size, block_rows and shuffle_buffer_rows must be >= 1, got "
                             f"{self.batch_size}, {self.block_rows}, {self.shuffle_buffer_rows}")
        if len(tuple(self.split_fractions)) != 3 or min(self.split_fractions) < 0 or not sum(self.split_fractions):
            raise ValueError(f"split_fractions must be 3 non-negative numbers (train, val, test), not all 0: "
                             f"{self.split_fractions}")


def _text(value: Any) -> str:
    return "" if value is None else str(value)       # Deep Lake returns None for an empty text cell


def split_of(key: str, fractions: tuple[float, float, float]) -> str:
    """Stable across machines and runs: sha1 of the split key (a content id, or a video id) -> a point in
    [0, 1). Salted, so that the split does not share bits with the shard assignment (sha1 of the video id)."""
    x = int.from_bytes(hashlib.sha1(f"split:{key}".encode()).digest()[:8], "big") / 2**64
    total = sum(fractions)
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac / total
        if x < edge:
            return name
    return SPLITS[-1]


def split_key(video_id: Any, content_id: Any = None) -> str:
    """What a row's split is decided by: its content id, or its video id when it has none."""
    return str(content_id) if content_id not in (None, "") else str(video_id)


def _seed(*parts: Any) -> list[int]:
    return [int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")]


@dataclass
class EpochPlan:
    blocks: list[tuple[int, int]]       # this rank's pieces of blocks (row ranges), in load order
    order: list[int]                    # this rank's rows in emission order
    steps: int                          # batches every rank yields
    entered_at: dict[int, int] = field(default_factory=dict)   # row -> index of its piece in `blocks`
    rows: int = 0                       # rows this rank yields this epoch (len(order), or less with drop_last)
    sizes: list[int] = field(default_factory=list)             # batch size at each step, the same on every rank


class DeepLakeSource:
    """One rank's view of one split of the dataset (see the module docstring)."""

    def __init__(self, url: str, cfg: LoaderConfig | None = None, split: str = "train", rank: int = 0,
                 world_size: int = 1, version: str | None = None):
        from .dataset import open_read_only

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.url, self.cfg, self.split, self.rank, self.world_size = url, cfg or LoaderConfig(), split, rank, world_size
        ds = open_read_only(url, version)   # one dataset, or every shard group's as one (pipeline.dataset)
        self.ds = ds
        self.version = ds.version
        n = len(ds)
        video_ids = ds["video_id"][0:n] if n else []
        has_content = "content_id" in {c.name for c in ds.schema.columns}
        content_ids = ds["content_id"][0:n] if n and has_content else [None] * len(video_ids)
        fractions = tuple(float(f) for f in self.cfg.split_fractions)
        memo: dict[str, str] = {}
        keep = np.zeros(n, dtype=bool)
        for i, (v, c) in enumerate(zip(video_ids, content_ids)):
            key = split_key(v, c)
            if key not in memo:
                memo[key] = split_of(key, fractions)
            keep[i] = memo[key] == split
        self.rows = np.flatnonzero(keep)
        self.rows_digest = hashlib.sha1(self.rows.astype(np.int64).tobytes()).hexdigest()
        self.blocks = self._blocks(self.rows, self.cfg.block_rows)
        self.position = {"epoch": 0, "step": 0}
        self._finished: set[int] = set()        # epochs a checkpoint finished under other settings
        self.d_clip, self.d_audio = self.cfg.d_clip, self.cfg.d_audio

    @staticmethod
    def _blocks(rows: np.ndarray, block_rows: int) -> list[tuple[int, int]]:
        """Runs of contiguous row indices, cut into pieces of at most block_rows: [(a, b), ...]."""
        out: list[tuple[int, int]] = []
        if len(rows) == 0:
            return out
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(rows, breaks):
            a, b = int(run[0]), int(run[-1]) + 1
            for s in range(a, b, block_rows):
                out.append((s, min(s + block_rows, b)))
        return out

    def __len__(self) -> int:
        return len(self.rows)

    # -- order -------------------------------------------------------------------------------------------
    @staticmethod
    def _steps(num_rows: int, world_size: int, batch_size: int, drop_last: bool) -> int:
        if drop_last:
            return (num_rows // world_size) // batch_size
        return -(-(-(-num_rows // world_size)) // batch_size)

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Batches every rank yields per epoch (the same for every epoch)."""
        return self._steps(len(self.rows), self.world_size, self.cfg.batch_size, self.cfg.drop_last)

    def plan(self, epoch: int) -> EpochPlan:
        cfg, W, r = self.cfg, self.world_size, self.rank
        n_blocks, n = len(self.blocks), len(self.rows)
        perm = (np.random.default_rng(_seed(cfg.seed, "blocks", epoch)).permutation(n_blocks) if cfg.shuffle
                else np.arange(n_blocks))
        lengths = np.array([self.blocks[i][1] - self.blocks[i][0] for i in perm], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])          # block k holds epoch positions [s_k, s_k+1)
        lo, hi = (r * n) // W, ((r + 1) * n) // W                  # this rank's positions: sizes differ by <= 1
        mine: list[tuple[int, int]] = []
        for k in range(int(np.searchsorted(starts, lo, side="right")) - 1 if n else 0, n_blocks):
            if starts[k] >= hi:
                break
            a, _ = self.blocks[perm[k]]
            a0, b0 = max(lo, starts[k]) - starts[k], min(hi, starts[k + 1]) - starts[k]
            if b0 > a0:
                mine.append((int(a + a0), int(a + b0)))
        entered = {row: k for k, (a, b) in enumerate(mine) for row in range(a, b)}
        if not cfg.shuffle:
            order = [row for a, b in mine for row in range(a, b)]
        else:
            rng = np.random.default_rng(_seed(cfg.seed, "buffer", epoch, r))
            buf: list[int] = []
            order = []
            for a, b in mine:
                buf.extend(range(a, b))
                while len(buf) >= cfg.shuffle_buffer_rows:
                    j = int(rng.integers(len(buf)))
                    buf[j], buf[-1] = buf[-1], buf[j]
                    order.append(buf.pop())
            while buf:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                order.append(buf.pop())
        steps = self.steps_per_epoch()
        bs = cfg.batch_size
        if cfg.drop_last:
            sizes = [bs] * steps
        else:
            longest = -(-n // W)                                    # the longest rank's rows
            sizes = [min(bs, longest - s * bs) for s in range(steps)]
        return EpochPlan(mine, order, steps, entered, min(len(order), sum(sizes)), sizes)

    # -- reading -----------------------------------------------------------------------------------------
    def read_block(self, a: int, b: int) -> dict[int, dict[str, Any]]:
        """Rows [a, b) as samples, one column slice per column."""
        names = columns()
        cols = {c: self.ds[c][a:b] for c in names}
        out = {}
        for k in range(b - a):
            out[a + k] = {c: cols[c][k] for c in names}
        return out

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        if epoch in self._finished:     # a checkpoint taken at the end of this epoch, under other settings
            return
        plan = self.plan(epoch)
        bs = self.cfg.batch_size
        last = plan.rows
        wanted = plan.order[start_step * bs: last]
        needed_blocks = sorted({plan.entered_at[r] for r in wanted})
        pending = iter(needed_blocks)
        loaded: dict[int, dict[str, Any]] = {}
        wanted_set = set(wanted)
        for step in range(start_step, plan.steps):
            ids = plan.order[step * bs:min(step * bs + plan.sizes[step], last)]
            for r in ids:
                while r not in loaded:     # blocks load in plan order; a row appears once its block entered
                    k = next(pending)
                    a, b = plan.blocks[k]
                    loaded.update({i: s for i, s in self.read_block(a, b).items() if i in wanted_set})
            samples = [loaded.pop(r) for r in ids]
            pad = plan.sizes[step] - len(samples)
            if pad:           # this rank is one row short (or has none): repeat a row, masked out
                samples += [samples[0] if samples else self._filler()] * pad
            batch = self.collate(samples)
            batch["sample_mask"] = torch.arange(len(samples)) < len(samples) - pad
            self.position = {"epoch": epoch, "step": step + 1}
            yield batch

    def _filler(self) -> dict[str, Any]:
        """A row of the split for a rank that has none this epoch (a split smaller than the world)."""
        row = int(self.rows[self.rank % len(self.rows)])
        return self.read_block(row, row + 1)[row]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Samples -> one batch of the contract in `pipeline.schema`: the key, then each modality's entries
        (its `collate`, `pipeline.modalities`), then sample_mask."""
        out: dict[str, Any] = {
            "video_id": [str(s["video_id"]) for s in samples],
            "segment_idx": torch.tensor([int(s["segment_idx"]) for s in samples], dtype=torch.long),
        }
        for mod in modalities.all_modalities():
            if mod.collate is not None:
                out.update(modalities.resolve(mod.collate)(samples, self))
        out["sample_mask"] = torch.ones(len(samples), dtype=torch.bool)
        return out

    # -- position ----------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What the rows and the order of an epoch depend on (besides the epoch number)."""
        cfg = self.cfg
        return {"seed": cfg.seed, "shuffle": bool(cfg.shuffle), "block_rows": int(cfg.block_rows),
                "shuffle_buffer_rows": int(cfg.shuffle_buffer_rows), "world_size": self.world_size,
                "batch_size": int(cfg.batch_size), "drop_last": bool(cfg.drop_last), "plan_version": PLAN_VERSION,
                "split": self.split, "split_fractions": [float(f) for f in cfg.split_fractions],
                "num_rows": len(self.rows), "rows_digest": self.rows_digest}

    def state_dict(self) -> dict[str, Any]:
        return {**self.position, **self.settings(), "rank": self.rank, "dataset_version": self.version,
                "epoch_steps": self.steps_per_epoch()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the position (epoch, step) of a checkpoint; see the module docstring for changed settings."""
        mine = self.settings()
        if state.get("dataset_version") not in (None, self.version):
            raise ValueError(f"dataset version {self.version} differs from the checkpoint's "
                             f"{state['dataset_version']}: open it with version=...")
        for key in ROWS_KEYS:
            if key in state and state[key] != mine[key]:
                raise ValueError(f"loader state does not match this loader: {key} {state.get(key)!r} != "
                                 f"{mine[key]!r} (the split holds other rows than the checkpoint's)")
        epoch, step = int(state["epoch"]), int(state["step"])
        changed = [k for k in ORDER_KEYS if state.get(k) != mine[k]]
        if changed and step > 0:
            old_steps = state.get("epoch_steps")
            if old_steps is None or step < int(old_steps):
                shown = ", ".join(f"{k} {state.get(k)!r} -> {mine[k]!r}" for k in changed)
                raise ValueError(f"loader settings changed in the middle of epoch {epoch} (step {step} of "
                                 f"{old_steps}): {shown}; resume with the checkpoint's settings, or from a "
                                 f"checkpoint at an epoch boundary")
            self._finished.add(epoch)      # that epoch is complete: the next one is planned with these settings
        self.position = {"epoch": epoch, "step": step}

    def resume(self) -> Iterator[dict[str, Any]]:
        """The remaining batches of the epoch at the current position."""
        return self.batches(self.position["epoch"], self.position["step"])


# ------------------------------------------------------------------------------------ per-modality collation


def collate_text(samples: list[dict[str, Any]], source: DeepLakeSource) -> dict[str, Any]:
    """asr: the target text and the preceding text."""
    return {"text": [_text(s["text"]) for s in samples], "prev_text": [_text(s["prev_text"]) for s in samples]}


def collate_scene_text(samples: list[dict[str, Any]], source: DeepLakeSource) -> dict[str, Any]:
    return {"scene_text": [_text(s["scene_text"]) for s in samples]}


def collate_clip(samples: list[dict[str, Any]], source: DeepLakeSource) -> dict[str, Any]:
    """clip: [B, F, D] embeddings (at most max_frames, evenly spaced), their mask and frame times."""
    cfg = source.cfg
    clips, times = [], []
    for s in samples:
        clip = np.asarray(s["clip"], dtype=np.float32)
        pts = np.asarray(s["frame_pts"], dtype=np.float64)
        n = clip.shape[0] if clip.ndim == 2 and clip.size else 0
        if n != len(pts):   # pairing them by position would put embeddings on the wrong frames' times
            raise ValueError(f"dataset {source.url} row ({s['video_id']!r}, {int(s['segment_idx'])}): {n} CLIP "
                             f"embeddings for {len(pts)} frames; the row is misaligned (check the run with "
                             f"`python -m pipeline verify run_dir=...`)")
        if not n:
            clip, pts = np.zeros((0, source.d_clip or 0), np.float32), pts[:0]
        if n > cfg.max_frames:        # evenly spaced frames keep the whole span
            idx = np.linspace(0, n - 1, cfg.max_frames).round().astype(int)
            clip, pts = clip[idx], pts[idx]
        if n and source.d_clip is None:
            source.d_clip = clip.shape[1]
        clips.append(clip)
        times.append((pts - float(s["start"])).astype(np.float32))
    B = len(samples)
    F = max(1, max(len(c) for c in clips))
    clip_t = torch.zeros(B, F, source.d_clip or 1)
    mask = torch.zeros(B, F, dtype=torch.bool)
    ftime = torch.zeros(B, F)
    for i, (c, t) in enumerate(zip(clips, times)):
        if len(c):
            clip_t[i, :len(c)] = torch.from_numpy(c)
            mask[i, :len(c)] = True
            ftime[i, :len(t)] = torch.from_numpy(t)
    return {"clip": clip_t, "clip_mask": mask, "frame_time": ftime}


def collate_audio(samples: list[dict[str, Any]], source: DeepLakeSource) -> dict[str, Any]:
    """audio: [B, D] embeddings and whether each sample has one."""
    for s in samples:
        if source.d_audio is None and bool(s["has_audio"]) and len(s["audio"]):
            source.d_audio = len(s["audio"])
    B = len(samples)
    audio = torch.zeros(B, source.d_audio or 1)
    audio_mask = torch.zeros(B, dtype=torch.bool)
    for i, s in enumerate(samples):
        if bool(s["has_audio"]) and len(s["audio"]):
            audio[i] = torch.from_numpy(np.asarray(s["audio"], dtype=np.float32))
            audio_mask[i] = True
    return {"audio": audio, "audio_mask": audio_mask}


def collate_frame_values(name: str, samples: list[dict[str, Any]], max_frames: int) -> dict[str, torch.Tensor]:
    """A per-frame column (one number or vector per frame of the row) -> [B, F, D] + mask [B, F], at most
    max_frames evenly spaced frames (the same frames `collate_clip` keeps): for an expert's `collate`."""
    values = []
    for s in samples:
        v = np.array(s[name] if s[name] is not None else [], dtype=np.float32)
        v = v.reshape(len(v), -1) if v.size else np.zeros((0, 1), np.float32)
        if len(v) > max_frames:
            v = v[np.linspace(0, len(v) - 1, max_frames).round().astype(int)]
        values.append(v)
    width = max((v.shape[1] for v in values if len(v)), default=1)
    F = max(1, max(len(v) for v in values))
    out = torch.zeros(len(samples), F, width)
    mask = torch.zeros(len(samples), F, dtype=torch.bool)
    for i, v in enumerate(values):
        if len(v):
            out[i, :len(v)] = torch.from_numpy(v)
            mask[i, :len(v)] = True
    return {name: out, f"{name}_mask": mask}


def build_source(data_cfg: Any, split: str = "train", rank: int = 0, world_size: int = 1) -> DeepLakeSource:
    """Factory for `pipeline.train.data.build_source`: `data.source: pipeline.loader:build_source`.

    Reads `data.path` (dataset URL), `data.batch_size`, and the LoaderConfig fields from `data.loader`
    (optional); split "eval" means "val".
    """
    get = (lambda k, d=None: data_cfg.get(k, d))
    if not get("path"):
        raise ValueError("data.path must name the Deep Lake dataset (URL or path)")
    extra = dict(get("loader", {}) or {})
    known = set(LoaderConfig.__dataclass_fields__) - {"batch_size"}     # data.batch_size sets that one
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"unknown data.loader keys {unknown}; known: {sorted(known)}")
    if "split_fractions" in extra:
        extra["split_fractions"] = tuple(extra["split_fractions"])
    cfg = LoaderConfig(batch_size=int(get("batch_size", 8)), **extra)
    url = str(get("path"))
    if "://" not in url:
        from pathlib import Path

        url = f"file://{Path(url).resolve()}"
    return DeepLakeSource(url, cfg, split={"eval": "val"}.get(split, split), rank=rank, world_size=world_size)
