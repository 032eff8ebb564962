"""VQA batches for the training loop: question -> answer with the image as a one-frame clip (`VQASource`), built
from the prepared split and features by `build_source` (`data.source` of conf/train/vqa.yaml)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.eval.vqa_data import VQAExample, load_vqa
from pipeline.eval.vqa_features import load_embeddings, load_scene_texts
from pipeline.train.data import collate


class VQASource:
    """Question -> answer batches (the `BatchSource` protocol of `pipeline.train.data`).

    A sample is one question: prev_text = the question, text = the annotators' majority answer, clip = the
    image's CLIP embedding as a single frame at time 0, audio zeros with audio_mask False, scene_text = the
    image's scene-graph text (`scene_texts`, see `scene_graph_texts`), "" without scene graphs.
    Training batches are reshuffled every epoch (seeded) and dropped at the end so every rank takes the same
    number of steps; eval batches cover every question once, in file order, split over the ranks, and every
    rank yields the same number of them (an extra forward on one rank would wait forever on FSDP's all-gather):
    a rank short of questions repeats some, marked False in `sample_mask` (no loss, no prediction).
    """

    def __init__(self, examples: list[VQAExample], embeddings: dict[int, torch.Tensor], split: str, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, d_audio: int = 2048,
                 scene_texts: dict[int, str] | None = None):
        missing = {e.image_id for e in examples} - set(embeddings)
        if missing:
            raise ValueError(f"no CLIP embedding for {len(missing)} images, e.g. {sorted(missing)[:5]}")
        missing = ({e.image_id for e in examples} - set(scene_texts)) if scene_texts is not None else set()
        if missing:
            raise ValueError(f"no scene-graph text for {len(missing)} images, e.g. {sorted(missing)[:5]}")
        self.examples, self.embeddings, self.split = examples, embeddings, split
        self.scene_texts = scene_texts
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.d_audio = seed, d_audio

    def tokenizer_texts(self) -> list[str]:
        return [e.question for e in self.examples] + sorted({e.multiple_choice_answer or "" for e in self.examples})

    def steps_per_epoch(self) -> int:
        return len(self.examples) // (self.batch_size * self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"split": self.split, "num_samples": len(self.examples), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_samples") != len(self.examples) or state.get("seed") != self.seed:
            raise ValueError(f"the VQA data changed since the checkpoint: {state} vs {self.state_dict()}")

    def sample(self, e: VQAExample) -> dict[str, Any]:
        return {
            "video_id": f"image-{e.image_id}", "segment_idx": 0, "question_id": e.question_id,
            "text": e.multiple_choice_answer or "", "prev_text": e.question,
            "clip": self.embeddings[e.image_id].unsqueeze(0), "clip_mask": torch.ones(1, dtype=torch.bool),
            "frame_time": torch.zeros(1), "audio": torch.zeros(self.d_audio), "audio_mask": False,
            "scene_text": self.scene_texts[e.image_id] if self.scene_texts is not None else "",
        }

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        if self.split != "train":
            mine = self.examples[self.rank::self.world_size]
            per_rank = -(-len(self.examples) // self.world_size)       # the longest rank's share
            for lo in range(start_step * self.batch_size, per_rank, self.batch_size):
                idx = range(lo, min(lo + self.batch_size, per_rank))
                # padding repeats a real question of this batch when it has one: a longer filler would widen the
                # padded prompt and move the real questions' encoder positions (and so their answers)
                filler = mine[lo] if lo < len(mine) else self.examples[lo % len(self.examples)]
                batch = collate([self.sample(mine[i] if i < len(mine) else filler) for i in idx])
                batch["sample_mask"] = torch.tensor([i < len(mine) for i in idx], dtype=torch.bool)
                yield batch
            return
        order = torch.randperm(len(self.examples),
                               generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        global_batch = self.batch_size * self.world_size
        for step in range(start_step, self.steps_per_epoch()):
            lo = step * global_batch + self.rank * self.batch_size
            yield collate([self.sample(self.examples[i]) for i in order[lo:lo + self.batch_size]])


def build_source(data_cfg: dict[str, Any], split: str, rank: int, world_size: int) -> VQASource:
    """`data.source: pipeline.eval.vqa_finetune:build_source`; `data.vqa` is filled in by `prepare`."""
    v = data_cfg["vqa"]
    examples = load_vqa(v[f"{split}_questions"], v[f"{split}_annotations"], v["image_dir"])
    stats = torch.load(v["feature_stats"], weights_only=True)
    embeddings = {i: (x - stats["shift"]) / stats["scale"] for i, x in load_embeddings(Path(v["embeddings"])).items()}
    scene_texts = load_scene_texts(Path(v["scene_text"])) if v.get("scene_text") else None
    return VQASource(examples, embeddings, split, int(data_cfg["batch_size"]),
                     rank, world_size, seed=int(v.get("seed", 0)), d_audio=int(v["d_audio"]), scene_texts=scene_texts)
