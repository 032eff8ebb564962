"""Typed schemas of the training and VQA configs, and the composition every training entry point uses.

`conf/train/pretrain.yaml` (`python -m pipeline.train`) and `conf/train/vqa.yaml`
(`python -m pipeline.eval.vqa_finetune`, which extends it), with the `model` group of `conf/model/*.yaml`, are
composed with Hydra and then merged onto the dataclasses below (`OmegaConf.structured`), as the stage configs
are (`pipeline.config`). So a key that no schema has, or a value of the wrong type (`optim.lr=abc`), is a
`ConfigError` of one line before anything runs. The result is the plain dict the training loop and the VQA
run consume (`OmegaConf.to_container`).

The dataclass defaults equal the yaml values (tests/test_config_defaults.py holds them together): the
yaml files are where the knobs are documented, the dataclasses what they are allowed to be.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import II, SI, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


# ------------------------------------------------------------------------------------------------- model group


@dataclass
class ModelConfig:
    """conf/model/*.yaml (the fields of `pipeline.models.vpt.VPTConfig`); defaults: conf/model/vpt_tiny.yaml."""
    backbone: str = "tiny"
    d_clip: int = 128
    d_audio: int = 2048
    projector: str = "linear"
    use_frames: bool = True
    use_audio: bool = True
    use_scene_graph: bool = True
    use_prompt: bool = True
    max_frames: int = 16
    max_scene_tokens: int = 48
    max_prompt_tokens: int = 48
    max_target_tokens: int = 32
    time_features: int = 16
    max_time_s: float = 60.0


# ---------------------------------------------------------------------------------------- conf/train/pretrain


@dataclass
class SlurmConfig:
    cluster: Optional[str] = None
    nodes: int = 1
    tasks_per_node: Optional[int] = None
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    timeout_min: int = 240
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    wait: bool = True


@dataclass
class LoaderSettings:
    """data.loader: the `pipeline.loader.LoaderConfig` fields a Deep Lake source takes (batch_size aside)."""
    split_fractions: List[float] = field(default_factory=lambda: [0.98, 0.01, 0.01])
    seed: int = 0
    shuffle: bool = True
    block_rows: int = 64
    shuffle_buffer_rows: int = 1024
    drop_last: bool = False
    max_frames: int = 8


@dataclass
class SyntheticDataConfig:
    """data.synthetic: the fields of `pipeline.train.data.SyntheticConfig`."""
    num_concepts: int = 8
    d_clip: int = II("model.d_clip")
    d_audio: int = II("model.d_audio")
    max_frames: int = 8
    segments_per_video: int = 6
    train_videos: int = 64
    eval_videos: int = 8
    frame_noise: float = 0.3
    seed: int = 1234


@dataclass
class DataConfig:
    source: str = "synthetic"
    batch_size: int = 8
    path: Optional[str] = None
    prefetch: int = 2
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass
class OptimConfig:
    lr: float = 1.0e-3
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class TrainLoopConfig:
    max_steps: int = 200
    grad_clip: float = 1.0
    z_loss_coef: float = 0.0
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 50
    eval_steps: int = 20
    peak_flops_per_device: float = 1.0e12
    resume: bool = True
    resume_lr: Optional[float] = None
    resume_from: Any = None              # a step number or a step directory
    debug_kill_at_step: Optional[int] = None


@dataclass
class CheckpointConfig:
    dir: str = SI("${run_dir}/checkpoints")
    every: int = 50
    keep_last: int = 2


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False


@dataclass
class PretrainConfig:
    """conf/train/pretrain.yaml."""
    model: ModelConfig = field(default_factory=ModelConfig)
    run_dir: str = "runs/pretrain"
    cache_dir: str = SI("${oc.env:VPT_CACHE_DIR,${oc.env:HOME}/.cache/vpt-pipeline}")
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    run_on: str = "local"
    init_from: Optional[str] = None
    model_hook: Optional[str] = None
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------------------- conf/train/vqa


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q", "k", "v", "o", "wi_0", "wi_1", "wo"])


@dataclass
class FinetuneConfig:
    mode: str = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class VQASyntheticConfig:
    n_images: int = 300
    seed: int = 0
    question_types: List[str] = field(default_factory=lambda: ["color", "position", "yesno"])


@dataclass
class VQAClipConfig:
    model: str = "ViT-L-14-336"
    pretrained: str = "openai"
    precision: str = "auto"
    normalize: bool = True
    frames_per_forward: int = 64


@dataclass
class VQASceneGraphConfig:
    backend: str = "detector_rules"
    checkpoint: str = "facebook/detr-resnet-50"
    score_threshold: float = 0.5
    max_objects: int = 20
    max_relations: int = 20
    max_side: int = 800
    batch_frames: int = 16
    precision: str = "auto"


@dataclass
class ContaminationConfig:
    frames: Any = "auto"                 # auto | none | a frames dir, run dir or frames.parquet
    max_hamming: int = 8
    method: str = "both"
    max_listed: int = 20


@dataclass
class VQASettings:
    questions: Optional[str] = None
    annotations: Optional[str] = None
    image_dir: Optional[str] = None
    synthetic: VQASyntheticConfig = field(default_factory=VQASyntheticConfig)
    eval_fraction: float = 0.2
    split_seed: int = 0
    clip: VQAClipConfig = field(default_factory=VQAClipConfig)
    scene_graph: bool = False
    scenegraph: VQASceneGraphConfig = field(default_factory=VQASceneGraphConfig)
    feature_norm: str = "standardize"
    metric: str = "current"
    eval_batch_size: int = 64
    max_new_tokens: int = 8
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)


@dataclass
class VQAConfig(PretrainConfig):
    """conf/train/vqa.yaml: pretraining's config with the VQA keys and defaults."""
    run_dir: str = "runs/vqa"
    models: str = "real"
    init_from: Optional[str] = None
    model_hook: Optional[str] = "pipeline.eval.vqa_finetune:apply_finetune"
    dataset: str = "synthetic"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    vqa: VQASettings = field(default_factory=VQASettings)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="pipeline.eval.vqa_finetune:build_source",
                                                                 batch_size=32))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3.0e-3, warmup_steps=20))
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(max_steps=300, log_every=25,
                                                                           eval_every=100, eval_steps=0))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=100, keep_last=1))


SCHEMAS: dict[str, type] = {"train/pretrain": PretrainConfig, "train/vqa": VQAConfig}

# Settings with a fixed set of values (checked after the types).
CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "bf16", "fp32"),
    "run_on": ("local", "slurm"),
    "model.projector": ("linear", "mlp", "identity"),
    "models": ("real", "tiny"),
    "finetune.mode": ("full", "lora"),
    "vqa.feature_norm": ("none", "standardize"),
    "vqa.metric": ("current", "legacy"),
    "vqa.contamination.method": ("both", "phash", "dhash"),
}

ENTRY_POINTS = {
    "train/pretrain": {
        "prog": "python -m pipeline.train",
        "what": "VPT pretraining (conf/train/pretrain.yaml), also under torchrun or on Slurm (run_on=slurm).",
        "more": ["python -m pipeline.train export CHECKPOINT_DIR OUT_DIR   (a Hugging Face-format model)",
                 "torchrun --nproc_per_node=N -m pipeline.train [KEY=VALUE ...]"],
        "examples": ["python -m pipeline.train run_dir=runs/pt train.max_steps=1000 optim.lr=3e-4",
                     "python -m pipeline.train data.source=pipeline.loader:build_source data.path=runs/x/dataset",
                     "python -m pipeline.train model=vpt_flan_t5_large run_on=slurm slurm.cluster=a100 "
                     "slurm.nodes=2",
                     "python -m pipeline.train train.resume_from=800 train.resume_lr=1e-4"],
    },
    "train/vqa": {
        "prog": "python -m pipeline.eval.vqa_finetune",
        "what": "VQA finetuning + evaluation (conf/train/vqa.yaml: pretraining's keys, plus finetune.*, vqa.* and "
                "the ones below), also under torchrun or on Slurm (run_on=slurm).",
        "more": ["torchrun --nproc_per_node=N -m pipeline.eval.vqa_finetune [KEY=VALUE ...]"],
        "examples": ["python -m pipeline.eval.vqa_finetune run_dir=runs/vqa init_from=runs/pt models=tiny",
                     "python -m pipeline.eval.vqa_finetune run_dir=runs/vqa init_from=runs/pt/export "
                     "finetune.mode=lora vqa.metric=legacy",
                     "python -m pipeline.eval.vqa_finetune dataset=data/vqa_subset vqa.scene_graph=true"],
    },
}


# ------------------------------------------------------------------------------------------------ composition


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _hydra_error_text(exc: BaseException, config_name: str) -> str:
    text = f"{exc} {exc.__cause__ or ''}"
    m = re.search(r"Could not override '([^']+)'", text)
    if m and ("not in struct" in text or "Could not append" in text or "Key '" in text):
        return f"unknown config key {m.group(1)!r} (`{ENTRY_POINTS[config_name]['prog']} --help` lists the keys)"
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        options = sorted(p.stem for p in (CONF_DIR / m.group(1)).glob("*.yaml"))
        return f"unknown {m.group(1)} {m.group(2)!r}; choose one of: {', '.join(options)}"
    if type(exc).__name__ == "OverrideParseException" or "mismatched input" in text or "no viable" in text:
        return (f"cannot parse the overrides ({_one_line(exc)}); write KEY=VALUE, e.g. optim.lr=3e-4 "
                f"(`{ENTRY_POINTS[config_name]['prog']} --help`)")
    return _one_line(exc)


def _omegaconf_error_text(exc: OmegaConfBaseException, config_name: str) -> str:
    key = getattr(exc, "full_key", None) or ""
    text = _one_line(exc)
    if "not in" in text and "Key '" in text:
        return f"unknown config key {key!r} (`{ENTRY_POINTS[config_name]['prog']} --help` lists the keys)"
    return f"{key}: {text}" if key and key not in text else text


def _hydra_compose(overrides: list[str], config_name: str) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except Exception as exc:  # noqa: BLE001 - Hydra's override/parse/missing-config errors: one line
        raise ConfigError(_hydra_error_text(exc, config_name)) from None
    finally:
        GlobalHydra.instance().clear()


def typed(overrides: list[str], config_name: str = "train/pretrain") -> DictConfig:
    """The composed config merged onto its schema (unresolved: interpolations kept); ConfigError if invalid."""
    if config_name not in SCHEMAS:
        raise ConfigError(f"unknown training config {config_name!r}; choose one of: {', '.join(SCHEMAS)}")
    cfg = _hydra_compose(overrides, config_name)
    try:
        return OmegaConf.merge(OmegaConf.structured(SCHEMAS[config_name]), cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_error_text(exc, config_name)) from None


def compose(overrides: list[str], config_name: str = "train/pretrain") -> dict[str, Any]:
    """The resolved, validated config as a plain dict (`model=vpt_flan_t5_large` picks
    conf/model/vpt_flan_t5_large.yaml). Raises ConfigError (one line) on a bad key, type or choice."""
    cfg = typed(overrides, config_name)
    try:
        out = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_error_text(exc, config_name)) from None
    for key, allowed in CHOICES.items():
        node: Any = out
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, not {node!r}")
    return out


# ------------------------------------------------------------------------------------------------------ --help


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union:
        return f"{_type_name(args[0])}|null" if len(args) == 1 else "|".join(_type_name(a) for a in args)
    if origin in (list, List):
        return f"list[{_type_name(args[0])}]" if args else "list"
    return getattr(tp, "__name__", str(tp))


def schema_types(schema: type, prefix: str = "") -> dict[str, str]:
    """Dotted key -> type name of every leaf setting of a schema dataclass."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= schema_types(tp, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = _type_name(tp)
    return out


def yaml_notes(path: Path, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the comment written beside it (and on the comment lines continuing it) in a yaml file."""
    notes: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last, column = "", 0            # the key whose note a comment-only line may continue, and that note's column
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):(.*)$", line)
        if not m:
            c = re.match(r"^(\s+)#\s?(.*)$", line)
            if c and last and len(c.group(1)) >= column:   # aligned under the note above: it continues it
                notes[last] = f"{notes[last]} {c.group(2).strip()}".strip()
            else:
                last = ""
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        dotted = prefix + ".".join(k for _, k in stack)
        last = ""
        if " #" in rest or rest.strip().startswith("#"):
            at = line.index("#", len(line) - len(rest))
            notes[dotted], last, column = line[at + 1:].strip(), dotted, at
    return notes


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: d}


def usage(config_name: str, overrides: list[str] = ()) -> str:
    """The --help text: how to call the entry point, every key with its type, default and note, examples."""
    ep = ENTRY_POINTS[config_name]
    cfg = OmegaConf.to_container(typed(list(overrides), config_name), resolve=False)
    types = schema_types(SCHEMAS[config_name])
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "vpt_tiny")
    notes = yaml_notes(CONF_DIR / "model" / f"{model}.yaml", "model.")
    notes |= yaml_notes(CONF_DIR / "train" / "pretrain.yaml")
    if config_name != "train/pretrain":
        notes |= yaml_notes(CONF_DIR / f"{config_name}.yaml")
    models = ", ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
    lines = [f"usage: {ep['prog']} [--help] [KEY=VALUE ...]"]
    lines += [f"       {m}" for m in ep["more"]]
    lines += ["", ep["what"],
              "Each KEY=VALUE overrides one setting below (Hydra syntax; lists as [a,b]; null for none);",
              f"model=NAME picks conf/model/NAME.yaml ({models}). A key that does not exist, a value of the wrong",
              "type or choice is refused with one error line and exit status 2 before anything runs.",
              "", "settings (KEY  TYPE = DEFAULT  note):"]
    for key, value in _flatten(cfg).items():
        shown = json.dumps(value) if value is None or isinstance(value, (bool, list)) else str(value)
        choice = f"  [{' | '.join(CHOICES[key])}]" if key in CHOICES else ""
        note = notes.get(key, "")
        lines.append(f"  {key}  {types.get(key, '')} = {shown}{choice}" + (f"  # {note}" if note else ""))
    lines += ["", "examples:"] + [f"  {e}" for e in ep["examples"]]
    return "\n".join(lines)
