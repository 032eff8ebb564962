"""The model side of VQA finetuning: `finetune.mode` (full or LoRA adapters), the model to start from
(`init_from`: an export, or a checkpoint exported here), the finetuned export, and greedy answers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from pipeline.eval.vqa_source import VQASource
from pipeline.models.vpt import HEADS_FILE
from pipeline.train.checkpoint import META, complete_checkpoints, export_hf
from pipeline.train.data import InputBuilder, to_device


def lora_config(cfg: dict[str, Any]):
    """The peft `LoraConfig` of `finetune.lora`."""
    from peft import LoraConfig

    lora = cfg["finetune"]["lora"]
    return LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=list(lora["target_modules"]), bias="none")


def apply_finetune(model, cfg: dict[str, Any]):
    """`model_hook` of the loop: `finetune.mode=full` leaves the model as is; `lora` freezes the backbone and
    adds LoRA adapters to it (the VPT projections and type/time embeddings stay fully trainable)."""
    f = cfg["finetune"]
    if f["mode"] == "full":
        return model
    if f["mode"] != "lora":
        raise ValueError(f"finetune.mode must be full or lora, not {f['mode']!r}")
    from peft import get_peft_model

    model.backbone = get_peft_model(model.backbone, lora_config(cfg))
    return model


def export_finetuned(step_dir: Path, out_dir: Path, cfg: dict[str, Any]) -> Path:
    """A finetuning checkpoint -> an exported plain VPT (LoRA adapters merged into the backbone: `export_hf`
    finds them in the checkpoint; `finetune.lora` describes them for a checkpoint saved without that record)."""
    fallback = {"backbone": lora_config(cfg)} if cfg["finetune"]["mode"] == "lora" else None
    return export_hf(step_dir, out_dir, adapters=fallback)


def resolve_init(init_from: str | None, out_dir: Path) -> Path | None:
    """An exported model directory for `init_from`: as given if it is one, else the checkpoint (a step
    directory, a checkpoint root or a pretraining or finetuning run directory with checkpoints/: its latest
    complete one) exported to `out_dir` (redone only when the source checkpoint changes; LoRA adapters of a
    LoRA-finetuned checkpoint merged, see `export_hf`)."""
    if not init_from:
        return None
    src = Path(init_from)
    if (src / HEADS_FILE).exists():
        return src
    if (src / META).exists():
        step_dir = src
    else:
        root = src / "checkpoints" if (src / "checkpoints").is_dir() else src
        done = complete_checkpoints(root)
        if not done:
            raise FileNotFoundError(f"init_from={init_from}: neither an exported model nor a checkpoint directory "
                                    f"with a complete checkpoint")
        step_dir = done[-1][1]
    marker = out_dir / "exported_from.json"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):     # every rank asks; the first exports
        if not (marker.exists() and json.loads(marker.read_text()).get("checkpoint") == str(step_dir.resolve())):
            export_hf(step_dir, out_dir)
            marker.write_text(json.dumps({"checkpoint": str(step_dir.resolve())}))
    return out_dir


@torch.no_grad()
def predict(model, tokenizer, source: VQASource, device: torch.device, max_new_tokens: int) -> list[tuple[int, str]]:
    """Greedy answers (question_id, answer) for every question of `source` (padding rows left out)."""
    model.eval().to(device)
    builder = InputBuilder(tokenizer, model.cfg)
    out = []
    for batch in source.batches(0):
        inputs = to_device(builder.encoder_inputs(batch), device)
        ids = model.generate(inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        answers = tokenizer.batch_decode(ids, skip_special_tokens=True)
        real = batch.get("sample_mask", torch.ones(len(answers), dtype=torch.bool)).tolist()
        out += [(int(q), a.strip()) for q, a, r in zip(batch["question_id"].tolist(), answers, real) if r]
    return out
