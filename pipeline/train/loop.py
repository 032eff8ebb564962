"""The training loop, top to bottom: distributed setup -> model -> FSDP2 -> optimizer -> resume -> steps
(forward, z-loss, backward, clip, step, metrics, eval, checkpoint).

Generic in the data source and the prompt: pretraining feeds (prev_text -> text), VQA feeds (question -> answer)
through the same `BatchSource` interface (see `pipeline.train.data`).

Runs as one process without torchrun (a one-rank process group) or under torchrun (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import importlib
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pipeline.modalities import DEFAULT_MODEL_MODALITIES
from pipeline.models.vpt import (CONFIG_FILE, VPT, VPTConfig, build_vpt, check_modalities, lm_losses,
                                 load_exported)
from pipeline.train.checkpoint import Checkpointer
from pipeline.train.data import BatchSource, InputBuilder, Prefetcher, build_source, to_device
from pipeline.train.metrics import (ActivationNorms, MetricsWriter, Throughput, count_params, flop_params,
                                    grad_norms, mfu, train_flops)

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group, or make a one-rank group so one code path (FSDP2, DCP) serves both."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    else:
        local_rank = 0
        if use_cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine down to `min_lr_ratio` at `max_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype forward/backward run in: `auto` is bf16 on GPU and fp32 on CPU (bf16 on CPU runs, slowly)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def shard_model(model: VPT, device: torch.device, activation_checkpointing: bool, precision: str = "auto") -> None:
    """FSDP2: each transformer block is one sharding unit, then the root (embeddings, projectors, heads).

    Mixed precision: fp32 master weights and optimizer state; blocks compute in `compute_dtype`; gradients are
    reduced in fp32."""
    if activation_checkpointing:
        # HF's wrapper recomputes each block in backward; parameter names (and checkpoints) stay the same
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dtype = compute_dtype(precision, device)
    mp = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32
          else MixedPrecisionPolicy())
    for _, block in model.blocks():
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def make_optimizer(model: torch.nn.Module, optim_cfg: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW; no weight decay on vectors (norm scales, biases)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim_cfg["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim_cfg["lr"], betas=tuple(optim_cfg["betas"]), eps=optim_cfg["eps"])


def set_base_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Change the schedule's peak LR in place (e.g. on resume, to roll back past a loss spike with a lower LR)."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    return t.tolist()


def token_weighted_losses(logits: torch.Tensor, labels: torch.Tensor, z_loss_coef: float, device: torch.device,
                          extra: list[float] = ()) -> tuple[torch.Tensor, float, float, list[float]]:
    """(loss to backpropagate on this rank, cross-entropy, z-loss, `extra` summed over ranks).

    The cross-entropy and z-loss are means over the target tokens of ALL ranks, so a rank with fewer target
    tokens (shorter answers, padding samples with `sample_mask` False, whose labels are all -100) weighs by its
    tokens, not as a whole rank: this rank's loss is its token sum x world_size / all ranks' tokens, and the
    gradient average of FSDP (a mean over ranks) makes that the gradient of the global token mean. One
    all-reduce (of 3 + len(extra) numbers) before backward."""
    ce, z, n = lm_losses(logits, labels)
    world = dist.get_world_size()
    n_local = float(n)
    ce_sum, z_sum, n_all, *rest = all_reduce_sum(
        [float(ce.detach()) * n_local, float(z.detach()) * n_local, n_local, *extra], device)
    share = n_local * world / n_all if n_all else 0.0
    loss = (ce + z_loss_coef * z) * share
    return loss, (ce_sum / n_all if n_all else float("nan")), (z_sum / n_all if n_all else float("nan")), rest


@torch.no_grad()
def evaluate(model: VPT, source: BatchSource, builder: InputBuilder, device: torch.device, max_steps: int,
             prefetch: int = 0) -> float:
    """Token-weighted cross-entropy over (at most `max_steps` batches of) the held-out split, all ranks; padding
    samples (`sample_mask` False) have no labels and do not count.

    Every forward all-gathers weights from every rank, so the ranks agree before each batch that they all have
    one: a source yielding more batches on one rank fails here with a message instead of hanging."""
    model.eval()
    world = dist.get_world_size()
    ce_sum, n_sum = 0.0, 0.0
    batches = Prefetcher(source.batches(0, 0), prefetch, fn=builder, pin_memory=device.type == "cuda")
    try:
        for i in itertools.count():
            inputs = next(batches, None) if not (max_steps and i >= max_steps) else None
            have = int(all_reduce_sum([float(inputs is not None)], device)[0])
            if have == 0:
                break
            if have != world:
                raise RuntimeError(f"eval batch {i}: only {have} of {world} ranks have one; a data source must "
                                   "yield the same number of batches on every rank (pad with `sample_mask`)")
            inputs = to_device(inputs, device)
            ce, _, n = lm_losses(model(inputs), inputs["labels"])
            ce_sum += float(ce) * float(n)
            n_sum += float(n)
    finally:
        batches.close()
    model.train()
    ce_sum, n_sum = all_reduce_sum([ce_sum, n_sum], device)
    return ce_sum / n_sum if n_sum else float("nan")  # nan: the held-out split is empty


# the model keys an exported model fixes (its weights depend on them); the others only switch inputs and lengths
ARCHITECTURE_KEYS = ("backbone", "d_clip", "d_audio", "projector", "time_features", "max_time_s", "modalities")


def check_checkpoint_modalities(root: Path, model_cfg: VPTConfig) -> None:
    """A checkpoint directory written for other modalities is refused by name before anything is loaded."""
    path = root / CONFIG_FILE
    if path.exists():
        saved = json.loads(path.read_text()).get("modalities", list(DEFAULT_MODEL_MODALITIES))
        check_modalities(saved, model_cfg.modalities, f"the checkpoints in {root}")


def input_overrides(model_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_cfg.items() if k not in ARCHITECTURE_KEYS}


def load_object(spec: str) -> Any:
    """"package.module:name" -> that object."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class BatchStream:
    """Endless batches over epochs from a resumable position (epoch, step within the epoch), each passed through
    `prepare` (e.g. the `InputBuilder`). With `prefetch` > 0 the source's reading and collation and `prepare`
    run in a background thread up to `prefetch` batches ahead (`Prefetcher`); the position (and so every
    checkpoint) is that of the batches handed out by `next()`, not of those read ahead."""

    def __init__(self, source: BatchSource, epoch: int = 0, step_in_epoch: int = 0,
                 prepare: Callable[[dict], Any] | None = None, prefetch: int = 0, pin_memory: bool = False):
        self.source, self.epoch, self.step_in_epoch = source, epoch, step_in_epoch
        self.prepare = prepare or (lambda b: b)
        self._feed = Prefetcher(self._positions(), prefetch, fn=lambda x: (x[0], x[1], self.prepare(x[2])),
                                pin_memory=pin_memory)

    def _positions(self) -> Iterator[tuple[int, int, dict]]:
        epoch, step = self.epoch, self.step_in_epoch
        empty = 0
        while True:
            for batch in self.source.batches(epoch, step):
                step += 1
                empty = 0
                yield epoch, step, batch
            empty += 1
            if empty == 2:
                raise RuntimeError(f"the data source yielded no batch for epoch {epoch}: is its split empty? "
                                   "(few videos: check the split fractions, e.g. data.loader.split_fractions)")
            epoch, step = epoch + 1, 0

    def next(self) -> Any:
        self.epoch, self.step_in_epoch, out = next(self._feed)
        return out

    def close(self) -> None:
        self._feed.close()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "source": self.source.state_dict()}


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train per `cfg` (the composed `conf/train/pretrain.yaml`, as a plain dict). Returns a summary.

    Optional keys for finetuning (see `conf/train/vqa.yaml`): `init_from`, an exported model directory to start
    from (its architecture wins over `cfg["model"]`, whose input switches and lengths still apply), and
    `model_hook`, "package.module:function" called as function(model, cfg) -> model before sharding.
    """
    tcfg, ocfg, ccfg = cfg["train"], cfg["optim"], cfg["checkpoint"]
    run_dir = Path(cfg["run_dir"])

    # ---- distributed + data
    d = init_distributed(cfg["device"])
    train_source = build_source(cfg["data"], "train", d.rank, d.world_size)
    eval_source = build_source(cfg["data"], "eval", d.rank, d.world_size) if tcfg["eval_every"] else None

    # ---- model (same seed on every rank: FSDP keeps each rank's shard of identical initial weights)
    torch.manual_seed(cfg["seed"])
    if cfg.get("init_from"):     # finetuning: weights, tokenizer and architecture of an exported model
        model, tokenizer = load_exported(Path(cfg["init_from"]), **input_overrides(cfg["model"]))
        model_cfg = model.cfg
        if cfg["model"].get("modalities") is not None:
            check_modalities(model_cfg.modalities, list(cfg["model"]["modalities"]),
                             f"the exported model {cfg['init_from']}")
    else:
        model_cfg = VPTConfig.from_dict(dict(cfg["model"]))
        texts = train_source.tokenizer_texts() if hasattr(train_source, "tokenizer_texts") else ()
        if d.rank == 0:      # one rank builds a tiny backbone; the others then load it from the cache
            model, tokenizer = build_vpt(model_cfg, Path(cfg["cache_dir"]), texts)
        dist.barrier()
        if d.rank != 0:
            model, tokenizer = build_vpt(model_cfg, Path(cfg["cache_dir"]), texts)
    if cfg.get("model_hook"):    # e.g. LoRA adapters; runs before sharding, so FSDP sees the final modules
        model = load_object(cfg["model_hook"])(model, cfg)
    model.to(d.device)
    n_params, flop_weights = count_params(model), flop_params(model)
    shard_model(model, d.device, tcfg["activation_checkpointing"], cfg.get("precision", "auto"))
    builder = InputBuilder(tokenizer, model_cfg)

    # ---- optimizer, schedule, checkpoints
    optimizer = make_optimizer(model, ocfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(ocfg["warmup_steps"], tcfg["max_steps"], ocfg["min_lr_ratio"]))
    ckpt = Checkpointer(Path(ccfg["dir"]), ccfg["keep_last"], d.rank, d.world_size)
    if tcfg["resume"] or tcfg.get("resume_from") is not None:
        check_checkpoint_modalities(Path(ccfg["dir"]), model_cfg)
    ckpt.write_static(model_cfg, model.backbone.config, tokenizer)
    step, position = 0, (0, 0)
    torch.manual_seed(cfg["seed"] + 1000 * (d.rank + 1))      # dropout differs per rank
    # resume_from: roll back to an earlier checkpoint (past a loss spike); the newer ones are moved aside
    if tcfg.get("resume_from") is not None:
        latest = ckpt.roll_back(tcfg["resume_from"], tcfg.get("resume_lr"))
    else:
        latest = ckpt.latest() if tcfg["resume"] else None
    if latest is not None:
        state = ckpt.load(latest, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        position = (int(state["data"]["epoch"]), int(state["data"]["step_in_epoch"]))
        # the stream's position is that of the consumed batches (the source's own may be read ahead)
        try:
            train_source.load_state_dict({**state["data"]["source"], "epoch": position[0], "step": position[1]})
        except ValueError as exc:       # e.g. data.loader settings changed mid-epoch: one line, exit 2
            if d.rank == 0:
                print(f"error: cannot resume from {latest}: {exc}", file=sys.stderr, flush=True)
            dist.destroy_process_group()
            raise SystemExit(2) from None
        if tcfg.get("resume_lr") is not None:
            set_base_lr(optimizer, scheduler, float(tcfg["resume_lr"]))
        if d.rank == 0:
            log.info(f"resumed from {latest} at step {step}")

    prefetch = int(cfg["data"].get("prefetch", 0) or 0)
    stream = BatchStream(train_source, *position, prepare=builder, prefetch=prefetch,
                         pin_memory=d.device.type == "cuda")

    # ---- metrics
    writer = MetricsWriter(run_dir, d.rank, tensorboard=cfg["logging"]["tensorboard"],
                           wandb=cfg["logging"]["wandb"], run_name=run_dir.name, config=cfg)
    act_norms = ActivationNorms(model.blocks())
    norm_groups = dict(model.blocks()) | {f"{name}_proj": proj for name, proj in model.proj.items()}
    meter = Throughput()
    summary: dict[str, Any] = {"start_step": step, "params": n_params}
    eval_loss = None

    # ---- steps
    model.train()
    while step < tcfg["max_steps"]:
        t_wait = time.perf_counter()
        inputs = to_device(stream.next(), d.device)
        input_wait = time.perf_counter() - t_wait      # the step waited this long for its input (prefetch hides it)
        log_detail = (step + 1) % tcfg["log_every"] == 0
        act_norms.enabled = log_detail

        logits = model(inputs)
        counts = builder.token_counts(inputs)         # padding samples count nothing
        loss, ce_mean, z_mean, totals = token_weighted_losses(logits, inputs["labels"], tcfg["z_loss_coef"],
                                                              d.device, [float(v) for v in counts.values()])
        loss.backward()

        detail = grad_norms(norm_groups, d.device, d.world_size) if log_detail else {}
        total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
        total_norm = total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        counts = dict(zip(counts, map(int, totals)))          # all ranks' positions, per part
        meter.add(counts["encoder"] + counts["decoder"], train_flops(flop_weights, counts))
        scalars = {"loss": ce_mean, "z_loss": z_mean,
                   "grad_norm": float(total_norm), "lr": scheduler.get_last_lr()[0], "epoch": stream.epoch,
                   "input_wait_ms": 1000 * input_wait}
        if log_detail:
            tokens_per_s, flops_per_s = meter.rate()
            scalars |= {"tokens_per_s": tokens_per_s,
                        "mfu": mfu(flops_per_s, tcfg["peak_flops_per_device"], d.world_size)}
            scalars |= detail | act_norms.collect()
            if d.rank == 0:
                log.info(f"step {step} loss {scalars['loss']:.4f} z {scalars['z_loss']:.2f} "
                         f"gnorm {scalars['grad_norm']:.3f} lr {scalars['lr']:.2e} tok/s {tokens_per_s:.0f}")

        eval_now = eval_source is not None and step % tcfg["eval_every"] == 0
        if eval_now:
            with meter.paused():        # tokens/s and MFU measure training steps only
                eval_loss = evaluate(model, eval_source, builder, d.device, tcfg["eval_steps"], prefetch)
            if math.isnan(eval_loss):
                eval_now, eval_loss = False, None
                if d.rank == 0:
                    log.info(f"step {step} eval skipped: the held-out split has no batches")
            else:
                scalars["eval_loss"] = eval_loss
                if d.rank == 0:
                    log.info(f"step {step} eval_loss {eval_loss:.4f}")
        writer.write(step, scalars)

        if ccfg["every"] and (step % ccfg["every"] == 0 or step == tcfg["max_steps"]):
            with meter.paused():
                ckpt.save(step, model, optimizer,
                          {"step": step, "scheduler": scheduler.state_dict(), "data": stream.state_dict()},
                          eval_loss=eval_loss if eval_now else None)
        if tcfg.get("debug_kill_at_step") and step == tcfg["debug_kill_at_step"]:
            os.kill(os.getpid(), signal.SIGKILL)      # a crash test: die without any cleanup
        summary["loss"] = scalars["loss"]

    # ---- done
    stream.close()
    act_norms.remove()
    writer.close()
    latest, best = ckpt.latest(), ckpt.best()     # None with checkpoint.every=0
    summary |= {"step": step, "eval_loss": eval_loss, "checkpoint": str(latest) if latest else None,
                "best": str(best) if best else None}
    dist.barrier()
    dist.destroy_process_group()
    return summary
