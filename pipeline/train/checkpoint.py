"""Sharded training checkpoints (torch.distributed.checkpoint) and export to a Hugging Face-format model.

Layout of a checkpoint root:

    vpt_config.json, backbone/        model config + backbone config and tokenizer (written once, small)
    step-00001000/                    one checkpoint: DCP shards of {"model", "optim"},
        train_state-rank<r>.pt        per rank: step, scheduler, data position, RNG states
        adapters/<module>/            peft config of each adapter-wrapped submodule (LoRA finetuning), so that
                                      `export_hf` rebuilds the same modules and merges the adapters
        meta.json                     written last, after every rank finished: marks the checkpoint complete
                                      ("adapters": {module: peft type} when there are any)
    rolled_back/to-step-00000800-<time>/step-00001000/   checkpoints newer than a `train.resume_from` target,
                                      moved aside (not deleted: the diverged run stays inspectable)
    rollback.json                     the last rollback applied (so a requeued job does not apply it again)
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pipeline.atomic import write_text
from pipeline.models.vpt import CONFIG_FILE, VPT, VPTConfig, save_exported

from .layout import META, complete_checkpoints, step_dir_name  # noqa: F401 - re-exported

ADAPTERS = "adapters"


def peft_modules(model: torch.nn.Module) -> dict[str, Any]:
    """name -> peft `PeftModel` of every adapter-wrapped submodule of `model` (e.g. "backbone" under LoRA)."""
    if "peft" not in sys.modules:     # nothing is wrapped unless peft was imported; don't import it for nothing
        return {}
    from peft import PeftModel

    return {name: m for name, m in model.named_modules() if isinstance(m, PeftModel)}


def saved_adapters(step_dir: Path) -> dict[str, Any]:
    """name -> peft config of the adapters a checkpoint was saved with (see `Checkpointer.save`); {} if none."""
    names = json.loads((Path(step_dir) / META).read_text()).get("adapters") or {}
    if not names:
        return {}
    from peft import PeftConfig

    out = {}
    for name in names:
        config_dir = Path(step_dir) / ADAPTERS / name
        if not (config_dir / "adapter_config.json").exists():    # from_pretrained would try the hub instead
            raise FileNotFoundError(f"{step_dir}: meta.json lists adapters on {name!r} but {config_dir} is missing")
        out[name] = PeftConfig.from_pretrained(str(config_dir))
    return out


def _has_adapter_weights(step_dir: Path) -> bool:
    keys = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    return any(".lora_" in k for k in keys)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, root: Path, keep_last: int, rank: int, world_size: int):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    def write_static(self, model_cfg: VPTConfig, backbone_config, tokenizer) -> None:
        """Model config, backbone config and tokenizer: what `export_hf` needs to rebuild the model."""
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / CONFIG_FILE).write_text(json.dumps(asdict(model_cfg), indent=2))
            backbone_config.save_pretrained(self.root / "backbone")
            tokenizer.save_pretrained(self.root / "backbone")
        _barrier()

    def latest(self) -> Path | None:
        done = complete_checkpoints(self.root)
        return done[-1][1] if done else None

    def find(self, target: int | str) -> Path:
        """The complete checkpoint of this root that `target` names: a step number, a step directory name
        (step-00000800) or its path."""
        done = complete_checkpoints(self.root)
        if isinstance(target, int) or str(target).isdigit():
            path = self.root / step_dir_name(int(target))
        else:
            path = Path(target) if Path(target).exists() else self.root / Path(target).name
        if not any(d.resolve() == path.resolve() for _, d, _ in done):
            raise ValueError(f"train.resume_from={target}: not a complete checkpoint in {self.root} "
                             f"(complete: {', '.join(str(s) for s, _, _ in done) or 'none'})")
        return path

    def roll_back(self, target: int | str, resume_lr: float | None) -> Path:
        """The checkpoint to resume from for `train.resume_from=target`: that one, after moving every newer
        checkpoint to `rolled_back/` so that `latest()` (later resumes, exports, pruning) continues from it.

        A rollback is applied once: when `rollback.json` records the same target and `resume_lr`, this is a
        relaunch of the rolled-back run (e.g. a Slurm requeue), which continues from `latest()` instead of
        discarding its own progress. (Rolling back to the same step with the same LR again would replay the
        same steps.)"""
        path = self.find(target)
        record = {"to": path.name, "resume_lr": resume_lr}
        marker = self.root / "rollback.json"
        applied = marker.exists() and {k: json.loads(marker.read_text()).get(k) for k in record} == record
        _barrier()      # every rank has read the marker before rank 0 rewrites it
        if self.rank == 0 and not applied:
            step = int(json.loads((path / META).read_text())["step"])
            newer = [d for s, d, _ in complete_checkpoints(self.root) if s > step]
            aside = self.root / "rolled_back" / f"to-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            for d in newer:
                aside.mkdir(parents=True, exist_ok=True)
                shutil.move(str(d), str(aside / d.name))
            marker.write_text(json.dumps(record | {"moved_aside": [d.name for d in newer],
                                                   "to_dir": str(aside) if newer else None, "time": time.time()}))
            print(f"rolled back to {path}: {len(newer)} newer checkpoint(s) moved to {aside}" if newer
                  else f"rolling back to {path}: it is the latest checkpoint", flush=True)
        _barrier()
        return self.latest() if applied else path

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             train_state: dict[str, Any], eval_loss: float | None = None) -> Path:
        path = self.root / step_dir_name(step)
        if self.rank == 0 and path.exists():      # an incomplete leftover of a killed save
            shutil.rmtree(path)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        torch.save(train_state | {"rng": rng_state()}, path / f"train_state-rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            meta = {"step": step, "eval_loss": eval_loss, "world_size": self.world_size}
            adapters = {name: m.peft_config[m.active_adapter] for name, m in peft_modules(model).items()}
            for name, config in adapters.items():
                config.save_pretrained(str(path / ADAPTERS / name))
            if adapters:
                meta["adapters"] = {name: str(getattr(c.peft_type, "value", c.peft_type))
                                    for name, c in adapters.items()}
            write_text(path / META, json.dumps(meta))      # last: the checkpoint is complete once it exists
            self.prune()
        _barrier()
        return path

    def prune(self) -> None:
        """Keep the last `keep_last` checkpoints and the best one (lowest eval loss)."""
        done = complete_checkpoints(self.root)
        keep = {d for _, d, _ in done[-self.keep_last:]} if self.keep_last > 0 else set()
        scored = [(m["eval_loss"], d) for _, d, m in done if m.get("eval_loss") is not None]
        if scored:
            keep.add(min(scored, key=lambda x: x[0])[1])
        for _, d, _ in done:
            if d not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def best(self) -> Path | None:
        scored = [(m["eval_loss"], d) for _, d, m in complete_checkpoints(self.root) if m.get("eval_loss") is not None]
        return min(scored, key=lambda x: x[0])[1] if scored else None

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load model + optimizer shards (any world size) and return this rank's train state (RNG restored)."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        own = Path(path) / f"train_state-rank{self.rank}.pt"
        # resuming on another world size: step/scheduler/data position are global, RNG is reseeded by the caller
        train_state = torch.load(own if own.exists() else Path(path) / "train_state-rank0.pt", weights_only=False)
        if own.exists():
            set_rng_state(train_state["rng"])
        train_state["rng_restored"] = own.exists()
        return train_state


def _resolve_checkpoint(checkpoint_dir: Path) -> tuple[Path, Path]:
    """(root, step dir) for a checkpoint root (its latest complete checkpoint) or one step directory."""
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / META).exists():
        return checkpoint_dir.parent, checkpoint_dir
    done = complete_checkpoints(checkpoint_dir)
    if not done:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir}")
    return checkpoint_dir, done[-1][1]


def export_hf(checkpoint_dir: Path, out_dir: Path, adapters: dict[str, Any] | None = None) -> Path:
    """Consolidate a sharded checkpoint (a root = its latest, or a step dir) into a Hugging Face-format model
    directory that `pipeline.models.vpt.load_exported` reloads. Runs in one process, no process group.

    A LoRA-finetuned checkpoint is rebuilt with the adapters it was saved with (`adapters/` of the step dir),
    loaded, and exported with them merged into the weights (peft `merge_and_unload`): a plain VPT.
    `adapters` (module name -> peft config) stands in for that record on a checkpoint that lacks it."""
    from transformers import AutoConfig, AutoTokenizer, T5ForConditionalGeneration

    root, step_dir = _resolve_checkpoint(checkpoint_dir)
    cfg = VPTConfig.from_dict(json.loads((root / CONFIG_FILE).read_text()))
    backbone = T5ForConditionalGeneration(AutoConfig.from_pretrained(root / "backbone"))
    tokenizer = AutoTokenizer.from_pretrained(root / "backbone")
    model = VPT(cfg, backbone)
    wrapped = saved_adapters(step_dir) or dict(adapters or {})
    if not wrapped and _has_adapter_weights(step_dir):
        raise ValueError(f"{step_dir} holds LoRA weights but no record of their config ({ADAPTERS}/): pass "
                         "`adapters` (module name -> peft config, e.g. the finetune run's LoraConfig)")
    if wrapped:
        from peft import get_peft_model

        for name, config in wrapped.items():
            # the base is this checkpoint's backbone, not the directory the finetuning once loaded it from
            config = copy.copy(config)
            config.base_model_name_or_path = None
            _set_submodule(model, name, get_peft_model(model.get_submodule(name), config))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    model.load_state_dict(state["model"])
    for name in wrapped:
        _set_submodule(model, name, model.get_submodule(name).merge_and_unload())
    return save_exported(model, tokenizer, Path(out_dir))


def _set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
