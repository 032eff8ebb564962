"""PyTorch-facing batches over the ingested Deep Lake dataset: video splits, block shuffling, ranks, resume.

The interface matches `pipeline.train.data.BatchSource`:

    class BatchSource(Protocol):
        def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]: ...   # this rank's batches
        def state_dict(self) -> dict: ...
        def load_state_dict(self, state: dict) -> None: ...

Each batch follows the contract in `pipeline.schema` (video_id, segment_idx, text, prev_text, clip, clip_mask,
frame_time, audio, audio_mask, scene_text). A row whose CLIP embeddings do not number its frames is an error
(ValueError naming the row), never truncated. Use it from training with
`data.source: pipeline.loader:build_source` and `data.path: <dataset URL>`.

- Splits by video: a video's split is a stable hash of its video_id against `split_fractions` (train, val,
  test), so a video's segments never land in two splits, whatever the dataset order or size.
- Block shuffling: Deep Lake re-opens chunk files on single-row reads (`ds[i]`, ~2.4 opens per sample) but
  costs ~0.004 per sample on contiguous slices. So an epoch reads blocks of `block_rows` contiguous rows of the
  split (column slices), in an order permuted by (seed, epoch), and mixes them through an in-memory buffer of
  `shuffle_buffer_rows` rows (random pops, seeded by seed, epoch, rank).
- Ranks: the epoch's blocks are dealt round-robin to ranks (disjoint rows); every rank yields the same number
  of batches (the smallest rank's full batches), so collective steps stay in lockstep.
- Resume: the order of an epoch is computed from row indices alone, so `batches(epoch, start_step)` yields
  exactly the batches from `start_step` on, reading only the blocks that hold them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

SPLITS = ("train", "val", "test")
COLUMNS = ("video_id", "segment_idx", "start", "text", "prev_text", "clip", "frame_pts", "audio", "has_audio",
           "scene_text")


@dataclass
class LoaderConfig:
    batch_size: int = 8                 # per rank
    max_frames: int = 8                 # frames per sample at most (evenly spaced over the segment)
    split_fractions: tuple[float, float, float] = (0.98, 0.01, 0.01)   # train, val, test by video
    seed: int = 0
    shuffle: bool = True
    block_rows: int = 64                # contiguous rows per read
    shuffle_buffer_rows: int = 1024     # rows mixed in memory
    drop_last: bool = False             # False: a last, smaller batch (every rank still gets the same step count)
    d_clip: int | None = None           # None: from the data
    d_audio: int | None = None


def _text(value: Any) -> str:
    return "" if value is None else str(value)       # Deep Lake returns None for an empty text cell


def split_of(video_id: str, fractions: tuple[float, float, float]) -> str:
    """Stable across machines and runs: sha1 of the video id -> a point in [0, 1). Salted, so that the split does
    not share bits with the shard assignment (also sha1 of the id)."""
    x = int.from_bytes(hashlib.sha1(f"split:{video_id}".encode()).digest()[:8], "big") / 2**64
    total = sum(fractions)
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac / total
        if x < edge:
            return name
    return SPLITS[-1]


def _seed(*parts: Any) -> list[int]:
    return [int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")]


@dataclass
class EpochPlan:
    blocks: list[tuple[int, int]]       # this rank's blocks (row ranges), in load order
    order: list[int]                    # this rank's rows in emission order
    steps: int                          # batches every rank yields
    entered_at: dict[int, int] = field(default_factory=dict)   # row -> index of its block in `blocks`
    rows: int = 0                       # rows every rank yields this epoch (the smallest rank's share)


class DeepLakeSource:
    """One rank's view of one split of the dataset (see the module docstring)."""

    def __init__(self, url: str, cfg: LoaderConfig | None = None, split: str = "train", rank: int = 0,
                 world_size: int = 1, version: str | None = None):
        import deeplake

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.url, self.cfg, self.split, self.rank, self.world_size = url, cfg or LoaderConfig(), split, rank, world_size
        ds = deeplake.open_read_only(url)
        if version is not None and ds.version != version:
            ds = ds.history[version].open()
        self.ds = ds
        self.version = ds.version
        n = len(ds)
        video_ids = ds["video_id"][0:n] if n else []
        keep = np.array([split_of(v, tuple(self.cfg.split_fractions)) == split for v in video_ids], dtype=bool)
        self.rows = np.flatnonzero(keep)
        self.blocks = self._blocks(self.rows, self.cfg.block_rows)
        self.position = {"epoch": 0, "step": 0}
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
    def plan(self, epoch: int) -> EpochPlan:
        cfg = self.cfg
        n_blocks = len(self.blocks)
        perm = (np.random.default_rng(_seed(cfg.seed, "blocks", epoch)).permutation(n_blocks) if cfg.shuffle
                else np.arange(n_blocks))
        sizes = [sum(self.blocks[i][1] - self.blocks[i][0] for i in perm[r::self.world_size])
                 for r in range(self.world_size)]
        per_rank = min(sizes) if sizes else 0
        steps = per_rank // cfg.batch_size if cfg.drop_last else -(-per_rank // cfg.batch_size)
        mine = [self.blocks[i] for i in perm[self.rank::self.world_size]]
        entered = {row: k for k, (a, b) in enumerate(mine) for row in range(a, b)}
        if not cfg.shuffle:
            order = [row for a, b in mine for row in range(a, b)]
        else:
            rng = np.random.default_rng(_seed(cfg.seed, "buffer", epoch, self.rank))
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
        return EpochPlan(mine, order, steps, entered, per_rank)

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return self.plan(epoch).steps

    # -- reading -----------------------------------------------------------------------------------------
    def read_block(self, a: int, b: int) -> dict[int, dict[str, Any]]:
        """Rows [a, b) as samples, one column slice per column."""
        cols = {c: self.ds[c][a:b] for c in COLUMNS}
        out = {}
        for k in range(b - a):
            out[a + k] = {c: cols[c][k] for c in COLUMNS}
        return out

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        plan = self.plan(epoch)
        bs = self.cfg.batch_size
        last = min(plan.steps * bs, plan.rows)
        wanted = plan.order[start_step * bs: last]
        needed_blocks = sorted({plan.entered_at[r] for r in wanted})
        pending = iter(needed_blocks)
        loaded: dict[int, dict[str, Any]] = {}
        wanted_set = set(wanted)
        for step in range(start_step, plan.steps):
            ids = plan.order[step * bs:min((step + 1) * bs, last)]
            for r in ids:
                while r not in loaded:     # blocks load in plan order; a row appears once its block entered
                    k = next(pending)
                    a, b = plan.blocks[k]
                    loaded.update({i: s for i, s in self.read_block(a, b).items() if i in wanted_set})
            samples = [loaded.pop(r) for r in ids]
            self.position = {"epoch": epoch, "step": step + 1}
            yield self.collate(samples)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        clips, times = [], []
        for s in samples:
            clip = np.asarray(s["clip"], dtype=np.float32)
            pts = np.asarray(s["frame_pts"], dtype=np.float64)
            n = clip.shape[0] if clip.ndim == 2 and clip.size else 0
            if n != len(pts):   # pairing them by position would put embeddings on the wrong frames' times
                raise ValueError(f"dataset {self.url} row ({s['video_id']!r}, {int(s['segment_idx'])}): {n} CLIP "
                                 f"embeddings for {len(pts)} frames; the row is misaligned (check the run with "
                                 f"`python -m pipeline verify run_dir=...`)")
            if not n:
                clip, pts = np.zeros((0, self.d_clip or 0), np.float32), pts[:0]
            if n > cfg.max_frames:        # evenly spaced frames keep the whole span
                idx = np.linspace(0, n - 1, cfg.max_frames).round().astype(int)
                clip, pts = clip[idx], pts[idx]
            if n and self.d_clip is None:
                self.d_clip = clip.shape[1]
            clips.append(clip)
            times.append((pts - float(s["start"])).astype(np.float32))
        for s in samples:
            if self.d_audio is None and bool(s["has_audio"]) and len(s["audio"]):
                self.d_audio = len(s["audio"])
        B = len(samples)
        F = max(1, max(len(c) for c in clips))
        d_clip, d_audio = self.d_clip or 1, self.d_audio or 1
        clip_t = torch.zeros(B, F, d_clip)
        mask = torch.zeros(B, F, dtype=torch.bool)
        ftime = torch.zeros(B, F)
        audio = torch.zeros(B, d_audio)
        audio_mask = torch.zeros(B, dtype=torch.bool)
        for i, (c, t, s) in enumerate(zip(clips, times, samples)):
            if len(c):
                clip_t[i, :len(c)] = torch.from_numpy(c)
                mask[i, :len(c)] = True
                ftime[i, :len(t)] = torch.from_numpy(t)
            if bool(s["has_audio"]) and len(s["audio"]):
                audio[i] = torch.from_numpy(np.asarray(s["audio"], dtype=np.float32))
                audio_mask[i] = True
        return {
            "video_id": [str(s["video_id"]) for s in samples],
            "segment_idx": torch.tensor([int(s["segment_idx"]) for s in samples], dtype=torch.long),
            "text": [_text(s["text"]) for s in samples], "prev_text": [_text(s["prev_text"]) for s in samples],
            "clip": clip_t, "clip_mask": mask, "frame_time": ftime, "audio": audio, "audio_mask": audio_mask,
            "scene_text": [_text(s["scene_text"]) for s in samples],
        }

    # -- position ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**self.position, "seed": self.cfg.seed, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "num_rows": len(self.rows), "dataset_version": self.version,
                "batch_size": self.cfg.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "split", "world_size", "batch_size", "num_rows"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state does not match this loader: {key} {state.get(key)!r} != "
                                 f"{mine[key]!r} (the order of a resumed epoch would differ)")
        if state.get("dataset_version") not in (None, self.version):
            raise ValueError(f"dataset version {self.version} differs from the checkpoint's "
                             f"{state['dataset_version']}: open it with version=...")
        self.position = {"epoch": int(state["epoch"]), "step": int(state["step"])}

    def resume(self) -> Iterator[dict[str, Any]]:
        """The remaining batches of the epoch at the current position."""
        return self.batches(self.position["epoch"], self.position["step"])


def build_source(data_cfg: Any, split: str = "train", rank: int = 0, world_size: int = 1) -> DeepLakeSource:
    """Factory for `pipeline.train.data.build_source`: `data.source: pipeline.loader:build_source`.

    Reads `data.path` (dataset URL), `data.batch_size`, and the LoaderConfig fields from `data.loader`
    (optional); split "eval" means "val".
    """
    get = (lambda k, d=None: data_cfg.get(k, d))
    if not get("path"):
        raise ValueError("data.path must name the Deep Lake dataset (URL or path)")
    extra = dict(get("loader", {}) or {})
    if "split_fractions" in extra:
        extra["split_fractions"] = tuple(extra["split_fractions"])
    cfg = LoaderConfig(batch_size=int(get("batch_size", 8)), **extra)
    url = str(get("path"))
    if "://" not in url:
        from pathlib import Path

        url = f"file://{Path(url).resolve()}"
    return DeepLakeSource(url, cfg, split={"eval": "val"}.get(split, split), rank=rank, world_size=world_size)
