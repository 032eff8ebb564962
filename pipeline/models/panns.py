"""PANNs Cnn14 audio tagger (Kong et al. 2020), built here so that nothing downloads at import time.

The module and parameter names are exactly those of the published `models.py` of audioset_tagging_cnn, so the
released checkpoint (`Cnn14_mAP=0.431.pth`, weights under `checkpoint["model"]`) loads with `strict=True`:

    model = load_cnn14("/models/Cnn14_mAP=0.431.pth")

`panns_inference` is deliberately not used: importing it runs `wget` for the label CSV. The 527 AudioSet labels
ship with this package (`audioset_labels.csv`, the canonical `class_labels_indices.csv`).

`models=tiny` builds the same class with narrower convolution blocks (`channels`), random weights and the same
2048-d embedding and 527 outputs, saves it as a checkpoint of the published layout under the cache and loads it
through the same path as a real checkpoint.
"""
from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchlibrosa.augmentation import SpecAugmentation
from torchlibrosa.stft import LogmelFilterBank, Spectrogram

from ..atomic import temp_path

SAMPLE_RATE = 32000
WINDOW_SIZE = 1024
HOP_SIZE = 320
MEL_BINS = 64
FMIN = 50
FMAX = 14000
CLASSES_NUM = 527
EMBEDDING_SIZE = 2048
PUBLISHED_CHANNELS = (64, 128, 256, 512, 1024, 2048)
TINY_CHANNELS = (8, 16, 32, 64, 128, 256)
# Five 2x2 average pools halve the time axis five times: fewer than 32 STFT frames leave nothing to pool.
# 1 s (100 frames) keeps a margin and stays far below the 10 s clips the model was trained on.
MIN_SECONDS = 1.0


@lru_cache(maxsize=1)
def audioset_labels() -> tuple[str, ...]:
    """The 527 AudioSet display names in model output order."""
    text = resources.files("pipeline.models").joinpath("audioset_labels.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    if [int(r["index"]) for r in rows] != list(range(CLASSES_NUM)):
        raise RuntimeError("audioset_labels.csv must list indices 0..526 in order")
    return tuple(r["display_name"] for r in rows)


def init_layer(layer: nn.Module) -> None:
    nn.init.xavier_uniform_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        layer.bias.data.fill_(0.0)


def init_bn(bn: nn.Module) -> None:
    bn.bias.data.fill_(0.0)
    bn.weight.data.fill_(1.0)


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1),
                               bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1),
                               bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        init_layer(self.conv1)
        init_layer(self.conv2)
        init_bn(self.bn1)
        init_bn(self.bn2)

    def forward(self, x: torch.Tensor, pool_size=(2, 2), pool_type: str = "avg") -> torch.Tensor:
        x = F.relu_(self.bn1(self.conv1(x)))
        x = F.relu_(self.bn2(self.conv2(x)))
        if pool_type == "max":
            return F.max_pool2d(x, kernel_size=pool_size)
        if pool_type == "avg":
            return F.avg_pool2d(x, kernel_size=pool_size)
        if pool_type == "avg+max":
            return F.avg_pool2d(x, kernel_size=pool_size) + F.max_pool2d(x, kernel_size=pool_size)
        raise ValueError(f"unknown pool_type {pool_type!r}")


class Cnn14(nn.Module):
    """Cnn14 of PANNs. `channels` and `embedding_size` default to the published network (81 M parameters)."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, window_size: int = WINDOW_SIZE, hop_size: int = HOP_SIZE,
                 mel_bins: int = MEL_BINS, fmin: int = FMIN, fmax: int = FMAX, classes_num: int = CLASSES_NUM,
                 channels: Sequence[int] = PUBLISHED_CHANNELS, embedding_size: int = EMBEDDING_SIZE):
        super().__init__()
        if len(channels) != 6:
            raise ValueError("Cnn14 has six convolution blocks: give six channel widths")
        self.sample_rate = sample_rate
        self.hop_size = hop_size
        self.spectrogram_extractor = Spectrogram(n_fft=window_size, hop_length=hop_size, win_length=window_size,
                                                 window="hann", center=True, pad_mode="reflect",
                                                 freeze_parameters=True)
        self.logmel_extractor = LogmelFilterBank(sr=sample_rate, n_fft=window_size, n_mels=mel_bins, fmin=fmin,
                                                 fmax=fmax, ref=1.0, amin=1e-10, top_db=None,
                                                 freeze_parameters=True)
        self.spec_augmenter = SpecAugmentation(time_drop_width=64, time_stripes_num=2, freq_drop_width=8,
                                               freq_stripes_num=2)
        self.bn0 = nn.BatchNorm2d(mel_bins)
        widths = [1, *channels]
        for n in range(6):
            setattr(self, f"conv_block{n + 1}", ConvBlock(widths[n], widths[n + 1]))
        self.fc1 = nn.Linear(channels[-1], embedding_size, bias=True)
        self.fc_audioset = nn.Linear(embedding_size, classes_num, bias=True)
        init_bn(self.bn0)
        init_layer(self.fc1)
        init_layer(self.fc_audioset)

    @property
    def min_samples(self) -> int:
        return int(MIN_SECONDS * self.sample_rate)

    def forward(self, input: torch.Tensor, mixup_lambda=None) -> dict[str, torch.Tensor]:  # noqa: A002
        """input: (batch, samples) at `sample_rate` -> clipwise_output (batch, 527) in [0,1], embedding (batch, 2048)."""
        x = self.spectrogram_extractor(input)        # (batch, 1, time, freq)
        x = self.logmel_extractor(x)                 # (batch, 1, time, mel)
        x = x.transpose(1, 3)
        x = self.bn0(x)
        x = x.transpose(1, 3)
        if self.training:
            x = self.spec_augmenter(x)
        for n in range(1, 7):
            pool = (1, 1) if n == 6 else (2, 2)
            x = getattr(self, f"conv_block{n}")(x, pool_size=pool, pool_type="avg")
            x = F.dropout(x, p=0.2, training=self.training)
        x = torch.mean(x, dim=3)
        x1, _ = torch.max(x, dim=2)
        x2 = torch.mean(x, dim=2)
        x = x1 + x2
        x = F.dropout(x, p=0.5, training=self.training)
        x = F.relu_(self.fc1(x))
        embedding = F.dropout(x, p=0.5, training=self.training)
        clipwise_output = torch.sigmoid(self.fc_audioset(x))
        return {"clipwise_output": clipwise_output, "embedding": embedding}


def load_cnn14(checkpoint: str | Path, channels: Sequence[int] = PUBLISHED_CHANNELS,
               map_location: str = "cpu") -> Cnn14:
    """A Cnn14 with the weights of a PANNs checkpoint file (`{"model": state_dict}`, or a bare state dict)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"PANNs checkpoint not found: {path} (download Cnn14_mAP=0.431.pth from "
                                f"https://zenodo.org/record/3987831 and set the stage's checkpoint path)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    state = state.get("model", state)
    model = Cnn14(channels=channels)
    model.load_state_dict(state, strict=True)
    return model.eval()


def tiny_checkpoint(cache_dir: Path, seed: int = 0) -> Path:
    """Build (once, under a file lock) a random narrow Cnn14 saved in the published checkpoint layout."""
    from filelock import FileLock

    out_dir = Path(cache_dir) / "tiny" / "panns"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "Cnn14_tiny.pth"
    with FileLock(str(out_dir / ".build.lock")):
        if not path.exists():
            torch.manual_seed(seed)
            model = Cnn14(channels=TINY_CHANNELS)
            with temp_path(path) as tmp:
                torch.save({"model": model.state_dict(), "channels": list(TINY_CHANNELS)}, tmp)
    return path


def load_tiny_cnn14(cache_dir: Path) -> Cnn14:
    return load_cnn14(tiny_checkpoint(cache_dir), channels=TINY_CHANNELS)


def topk_labels(probs: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
    """Per row of (batch, 527) clipwise probabilities: the k best (label, score), best first."""
    labels = audioset_labels()
    scores, idx = torch.topk(probs.float(), k=min(k, probs.shape[-1]), dim=-1)
    return [[(labels[i], float(s)) for s, i in zip(row_s.tolist(), row_i.tolist())]
            for row_s, row_i in zip(scores, idx)]
