"""Training metrics: tokens/s, MFU estimate (encoder-decoder FLOPs, `train_flops`), per-layer gradient and
activation norms, and the writers (TensorBoard + a JSONL file on rank 0; Weights & Biases when asked for and
installed)."""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Parameters of the whole (unsharded) model; DTensor shards count with their global size."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class FlopParams:
    """Matmul weights (`nn.Linear`, embeddings and norms excluded) by where they apply once per position."""
    encoder: int    # T5 encoder: at every encoder position
    decoder: int    # T5 decoder + lm_head: at every target token
    frames: int     # frame and frame-time projectors: at every frame
    audio: int      # audio projector: at every audio position
    others: tuple[tuple[str, int], ...] = ()   # (token_counts key, projector weights) of other projected inputs


def _linear_weights(*modules: nn.Module) -> int:
    return sum(m.weight.numel() for module in modules for m in module.modules() if isinstance(m, nn.Linear))


def flop_params(model: nn.Module) -> FlopParams:
    """The `FlopParams` of a VPT, counted before sharding (after sharding DTensors count globally too)."""
    bb = model.backbone
    per_input: dict[str, int] = {}
    for name, enc in model.encoders:
        if enc.projected:
            extra = (model.time_proj,) if enc.kind == "frames" else ()
            key = enc.count or name
            per_input[key] = per_input.get(key, 0) + _linear_weights(model.proj[name], *extra)
    frames, audio = per_input.pop("frames", 0), per_input.pop("audio", 0)
    return FlopParams(encoder=_linear_weights(bb.encoder), decoder=_linear_weights(bb.decoder, bb.lm_head),
                      frames=frames, audio=audio, others=tuple(sorted(per_input.items())))


def train_flops(p: FlopParams, counts: dict[str, int]) -> float:
    """FLOPs of one training step (forward + backward = 3 x the forward's 2 per weight and position):

        6 * (N_enc * encoder_positions + (N_dec + N_lm_head) * target_tokens
             + N_frame_proj * frames + N_audio_proj * audio_positions)

    with N_* the matmul weights of `FlopParams`; `counts` as `InputBuilder.token_counts`. An encoder weight
    runs at encoder positions only and a decoder weight at target tokens only, so the 6 * N_total * all_tokens
    rule overcounts an encoder-decoder about twice. Attention scores (QK^T, AV) are left out: with flan-t5-large
    at the full lengths (~290 encoder positions, d_model 1024) they add ~5%. Frozen weights (LoRA) still count
    their weight gradients, so LoRA MFU is an upper bound."""
    return 6.0 * (p.encoder * counts["encoder"] + p.decoder * counts["decoder"]
                  + p.frames * counts["frames"] + p.audio * counts["audio"]
                  + sum(n * counts.get(key, 0) for key, n in p.others))


def mfu(flops_per_s: float, peak_flops_per_device: float, world_size: int) -> float:
    """Model FLOPs utilisation: achieved `train_flops` per second over the peak of all devices."""
    if not peak_flops_per_device:
        return float("nan")
    return flops_per_s / (peak_flops_per_device * world_size)


class Throughput:
    """Tokens/s and FLOP/s over the training time since the last `rate()` call (all ranks' totals, summed by
    the caller). Time spent inside `paused()` (eval, checkpoint saves) is not training time and not counted."""

    def __init__(self):
        self.tokens = 0
        self.flops = 0.0
        self.start = time.perf_counter()
        self.excluded = 0.0

    def add(self, tokens: int, flops: float = 0.0) -> None:
        self.tokens += tokens
        self.flops += flops

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0

    def rate(self) -> tuple[float, float]:
        """(tokens/s, FLOP/s), then starts a new window."""
        now = time.perf_counter()
        seconds = max(now - self.start - self.excluded, 1e-9)
        rates = self.tokens / seconds, self.flops / seconds
        self.tokens, self.flops, self.start, self.excluded = 0, 0.0, now, 0.0
        return rates


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def grad_norms(groups: dict[str, nn.Module], device: torch.device, world_size: int) -> dict[str, float]:
    """L2 norm of the gradients of each named module (e.g. each transformer block), over all ranks' shards."""
    names = list(groups)
    sq = []
    for name in names:
        total = torch.zeros((), dtype=torch.float32)
        for p in groups[name].parameters():
            if p.grad is not None:
                total += _local(p.grad).float().square().sum().cpu()
        sq.append(total)
    sq_t = torch.stack(sq) if sq else torch.zeros(0)
    if world_size > 1:
        sq_t = sq_t.to(device)
        dist.all_reduce(sq_t)
    return {f"grad_norm/{n}": float(v) for n, v in zip(names, sq_t.sqrt().cpu())}


class ActivationNorms:
    """Forward hooks recording the RMS of each block's output hidden states, on the steps that log them."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        self.enabled = False
        self.values: dict[str, float] = {}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in blocks]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if not self.enabled:
                return
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            hidden = _local(hidden).detach().float()
            self.values[f"act_rms/{name}"] = float(hidden.square().mean().sqrt())
        return hook

    def collect(self) -> dict[str, float]:
        values, self.values = self.values, {}
        return values

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class MetricsWriter:
    """Scalars to TensorBoard (`<log_dir>/tb`), `<log_dir>/metrics.jsonl` and optionally W&B; rank 0 only."""

    def __init__(self, log_dir: Path, rank: int, tensorboard: bool = True, wandb: bool = False,
                 run_name: str = "", config: dict[str, Any] | None = None):
        self.rank = rank
        self.tb = self.wandb = None
        self.jsonl = None
        if rank != 0:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(log_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(log_dir / "tb"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                log.warning("wandb is not installed; logging to TensorBoard only")
            else:
                self.wandb = wandb_lib.init(name=run_name or None, config=config or {}, dir=str(log_dir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.rank != 0:
            return
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
