"""Typed schemas of the training and VQA configs, and the composition every training entry point uses.

The dataclasses below are registered in Hydra's ConfigStore (`register()`: `schema/train/pretrain`,
`schema/train/vqa`, `schema/model`). `conf/train/pretrain.yaml` (`python -m pipeline.train`) and
`conf/train/vqa.yaml` (`python -m pipeline.eval.vqa_finetune`) name their schema first in their defaults list,
pick a member of the `model` group (`conf/model/*.yaml`) and set only what differs from the dataclass defaults.
So composition itself refuses a key that no schema has, or a value of the wrong type (`optim.lr=abc`): a
`ConfigError` of one line before anything runs. The result is the plain dict the training loop and the VQA run
consume (`OmegaConf.to_container`). The notes `--help` prints are the comments beside the fields below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import II, SI, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import (CONF_DIR, _one_line, field_notes, hydra_compose, schema_types,  # noqa: F401
                             settings_lines, store, wants_help, yaml_notes)
from pipeline.errors import ConfigError


# ------------------------------------------------------------------------------------------------- model group


def _default_modalities() -> List[str]:
    from pipeline.modalities import DEFAULT_MODEL_MODALITIES   # numpy/pyarrow: only when a config is built

    return list(DEFAULT_MODEL_MODALITIES)


@dataclass
class ModelConfig:
    """The VPT's settings, defined once: the `model` group's schema (conf/model/*.yaml, each of which sets every
    key) and the fields of `pipeline.models.vpt.VPTConfig`, which adds only methods. Defaults: Flan-T5-large."""
    backbone: str = "google/flan-t5-large"   # tiny (a 2-layer random T5 built locally), a hub name or a directory
    d_clip: int = 768                   # CLIP embedding width of the frames
    d_audio: int = 2048                 # PANNs Cnn14 embedding width
    projector: str = "linear"           # linear | mlp | identity (identity needs dims equal to the backbone
                                        # width); linear is the identity for an input already as wide as the backbone
    use_frames: bool = True
    use_audio: bool = True
    use_scene_graph: bool = True
    use_prompt: bool = True             # prev_text (pretraining) / question (VQA)
    max_frames: int = 32
    max_scene_tokens: int = 128
    max_prompt_tokens: int = 128
    max_target_tokens: int = 64
    time_features: int = 16             # sinusoidal features of the frame time (seconds)
    max_time_s: float = 60.0            # longest period of the time features
    modalities: List[str] = field(default_factory=_default_modalities)   # the encoder inputs, in encoder order:
                                        # names of `pipeline.modalities` modalities that feed one


# ---------------------------------------------------------------------------------------- conf/train/pretrain


@dataclass
class SlurmConfig:
    """slurm: run_on=slurm; requeued on timeout/preemption, resumed from the last checkpoint."""
    cluster: Optional[str] = None       # a profile of conf/cluster (generic, a40, a100, ...): fills every null below
    nodes: int = 1
    tasks_per_node: Optional[int] = None   # ranks per node; null = the profile's gpus_per_node (1 without GPUs)
    gpus_per_node: Optional[int] = None    # null = the profile's gpus_per_node (0 without a profile)
    cpus_per_task: Optional[int] = None    # null = the profile's cpus_per_gpu on GPU nodes, else 2
    mem_gb: Optional[float] = None      # per node; null = mem_gb_per_gpu x GPUs on GPU nodes, else 8
    timeout_min: int = 240              # capped at the profile's max_timeout_min
    partition: Optional[str] = None     # null = the profile's gpu_partition (GPU jobs) or partition
    account: Optional[str] = None
    qos: Optional[str] = None
    wait: bool = True


@dataclass
class LoaderSettings:
    """data.loader: the `pipeline.loader.LoaderConfig` fields a Deep Lake source takes (batch_size aside)."""
    split_fractions: List[float] = field(default_factory=lambda: [0.98, 0.01, 0.01])   # train, val, test, by
                                        # content identity (content_id, else video_id)
    seed: int = 0
    shuffle: bool = True
    block_rows: int = 64                # contiguous rows per Deep Lake read
    shuffle_buffer_rows: int = 1024     # rows mixed in memory
    drop_last: bool = False             # false: every row once per epoch (short ranks padded, sample_mask False)
    max_frames: int = 8


@dataclass
class SyntheticConfig:
    """A learnable signal: the spoken word of a segment is the concept whose CLIP vector its frames show
    (`pipeline.train.data.SyntheticSource`; data.synthetic)."""
    num_concepts: int = 8
    d_clip: int = 128
    d_audio: int = 2048
    max_frames: int = 8
    segments_per_video: int = 6
    train_videos: int = 64
    eval_videos: int = 8
    frame_noise: float = 0.3
    seed: int = 1234


SyntheticDataConfig = SyntheticConfig     # data.synthetic's schema (the name it had before)


@dataclass
class DataConfig:
    source: str = "synthetic"           # synthetic | package.module:factory(data_cfg, split=, rank=, world_size=)
    batch_size: int = 8                 # per rank
    path: Optional[str] = None          # the dataset, for a real source
    prefetch: int = 2                   # batches read, collated and tokenised ahead in a background thread (0 = inline)
    loader: LoaderSettings = field(default_factory=LoaderSettings)   # pipeline.loader:build_source
    synthetic: SyntheticConfig = field(default_factory=lambda: SyntheticConfig(d_clip=II("model.d_clip"),
                                                                               d_audio=II("model.d_audio")))


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
    z_loss_coef: float = 0.0            # z-loss is always logged; >0 also adds it to the loss (e.g. 1e-4)
    activation_checkpointing: bool = False
    log_every: int = 10                 # tokens/s, MFU, per-layer grad and activation norms
    eval_every: int = 50                # 0 = no eval
    eval_steps: int = 20                # batches per rank per eval (0 = the whole held-out split)
    peak_flops_per_device: float = 1.0e12   # for the MFU estimate: e.g. 989e12 (H100 bf16 dense), 312e12 (A100)
    resume: bool = True                 # continue from the latest complete checkpoint in checkpoint.dir
    resume_lr: Optional[float] = None   # on resume, replace the schedule's peak LR (roll back past a loss spike)
    resume_from: Any = None             # a step (800) or step dir: resume from that checkpoint, moving newer ones
                                        # to checkpoint.dir/rolled_back/ (applied once; a requeue continues it)
    debug_kill_at_step: Optional[int] = None   # SIGKILL every rank after this step (crash/resume tests)


@dataclass
class CheckpointConfig:
    dir: str = SI("${run_dir}/checkpoints")
    every: int = 50                     # steps; also saved at max_steps; 0 = never (benchmarks; VQA refuses it)
    keep_last: int = 2                  # plus the best by eval loss


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False


@dataclass
class PretrainConfig:
    """conf/train/pretrain.yaml."""
    model: ModelConfig = field(default_factory=ModelConfig)
    run_dir: str = "runs/pretrain"      # metrics.jsonl, tb/ (TensorBoard), checkpoints/
    cache_dir: str = SI("${oc.env:VPT_CACHE_DIR,${oc.env:HOME}/.cache/vpt-pipeline}")
    device: str = "auto"                # auto | cpu | cuda (bf16 mixed precision on cuda, fp32 on cpu)
    precision: str = "auto"             # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32: FSDP2 param dtype; grads
                                        # reduce in fp32
    seed: int = 0
    run_on: str = "local"               # local: this process (or torchrun) | slurm: submit slurm.nodes x
                                        # tasks_per_node ranks
    init_from: Optional[str] = None     # start from an exported model (`python -m pipeline.train export`): its
                                        # weights, tokenizer and architecture (model.* input switches and lengths
                                        # still apply)
    model_hook: Optional[str] = None    # package.module:function(model, cfg) -> model, applied before sharding
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
    target_modules: List[str] = field(default_factory=lambda: ["q", "k", "v", "o", "wi_0", "wi_1", "wo"])  # T5
                                        # attention + gated-GELU feed-forward projections


@dataclass
class FinetuneConfig:
    mode: str = "full"                  # full | lora (peft adapters on the backbone; VPT projections stay trainable)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class VQASyntheticConfig:
    n_images: int = 300
    seed: int = 0
    question_types: List[str] = field(default_factory=lambda: ["color", "position", "yesno"])   # what a tiny CLIP
                                        # embedding carries: the shape's colour and side survive pooling, shape and
                                        # count do not (see pipeline/eval/synthetic_vqa.py)


@dataclass
class VQAClipConfig:
    """vqa.clip: the clip stage's model and embedding (conf/stage/clip.yaml)."""
    model: str = "ViT-L-14-336"
    pretrained: str = "openai"
    precision: str = "auto"
    normalize: bool = True
    frames_per_forward: int = 64


@dataclass
class VQASceneGraphConfig:
    """vqa.scenegraph: the scenegraph stage's settings (conf/stage/scenegraph.yaml)."""
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
    """vqa.contamination: eval images vs pretraining frames (perceptual hashes) -> metrics.json."""
    frames: Any = "auto"                # auto: the frames stage output of the init_from pretraining run (<run>/frames,
                                        # or <run>/../frames when it is a pipeline run's pretrain/), if any | a frames
                                        # dir, run dir or frames.parquet | none (skip)
    max_hamming: int = 8
    method: str = "both"                # both | phash | dhash (see pipeline/eval/contamination.py)
    max_listed: int = 20                # closest pairs listed in metrics.json


@dataclass
class VQASettings:
    questions: Optional[str] = None     # official VQAv2 files instead of `dataset` (all three), e.g.
    annotations: Optional[str] = None   # v2_OpenEnded_mscoco_train2014_questions.json, v2_mscoco_train2014_annotations.json,
    image_dir: Optional[str] = None     # train2014/ (split by image below)
    synthetic: VQASyntheticConfig = field(default_factory=VQASyntheticConfig)
    eval_fraction: float = 0.2          # of the images (with all their questions) held out
    split_seed: int = 0
    clip: VQAClipConfig = field(default_factory=VQAClipConfig)
    scene_graph: bool = False           # true: each image's scene-graph text (the scenegraph stage's detector +
                                        # relation rules + serialisation, once, into <run_dir>/vqa/scene_text.json)
                                        # as scene_text
    scenegraph: VQASceneGraphConfig = field(default_factory=VQASceneGraphConfig)
    feature_norm: str = "standardize"   # none | standardize: z-score CLIP features with train-image statistics (the
                                        # tiny random CLIP maps every image to nearly one vector; see feature_stats)
    metric: str = "current"             # current: the official vqaEval.py of today (GT-Vision-Lab/VQA a013f00, March
                                        # 2021) | legacy: its 2016-2021 version, for numbers published before
    eval_batch_size: int = 64
    max_new_tokens: int = 8             # greedy answer length cap (VQA answers are 1-3 words)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)


@dataclass
class VQAConfig(PretrainConfig):
    """conf/train/vqa.yaml: pretraining's config with the VQA keys and defaults."""
    run_dir: str = "runs/vqa"           # checkpoints/, metrics.jsonl, tb/ of the finetuning; vqa/ (data, results)
    models: str = "real"                # CLIP for the images: real = vqa.clip.model/pretrained; tiny = the tiny one
    init_from: Optional[str] = None     # an export, a checkpoint (step dir or root) or a pretraining run dir; null =
                                        # the plain backbone
    model_hook: Optional[str] = "pipeline.eval.vqa_finetune:apply_finetune"   # applies finetune.mode before sharding
    dataset: str = "synthetic"          # synthetic (made under <run_dir>/vqa/data) | a dir with questions.json,
                                        # annotations.json, images/
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


def register() -> None:
    """The training schemas as `schema/train/pretrain`, `schema/train/vqa` and `schema/model` in the ConfigStore
    (conf/train/*.yaml and conf/model/*.yaml name them first in their defaults lists)."""
    store("schema", "model", ModelConfig)
    for name, schema in SCHEMAS.items():
        store("schema/train", name.split("/", 1)[1], schema)


def _hint(config_name: str) -> str:
    return f"`{ENTRY_POINTS[config_name]['prog']} --help` lists the keys"


def _omegaconf_error_text(exc: OmegaConfBaseException, config_name: str) -> str:
    key = getattr(exc, "full_key", None) or ""
    text = _one_line(exc)
    if "not in" in text and "Key '" in text:
        return f"unknown config key {key!r} ({_hint(config_name)})"
    return f"{key}: {text}" if key and key not in text else text


def typed(overrides: list[str], config_name: str = "train/pretrain") -> DictConfig:
    """The composed config on its schema (unresolved: interpolations kept); ConfigError (one line) if invalid.

    Hydra composes the yaml files onto the registered schema, so a key the schema lacks or a value of the wrong
    type is refused by the composition itself; keys added with `+key=` are refused by the merge below."""
    if config_name not in SCHEMAS:
        raise ConfigError(f"unknown training config {config_name!r}; choose one of: {', '.join(SCHEMAS)}")
    register()
    cfg = hydra_compose(config_name, list(overrides), _hint(config_name))
    try:
        return OmegaConf.merge(OmegaConf.structured(SCHEMAS[config_name]), OmegaConf.to_container(cfg))
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


def usage(config_name: str, overrides: list[str] = ()) -> str:
    """The --help text: how to call the entry point, every key with its type, default and note, examples."""
    ep = ENTRY_POINTS[config_name]
    cfg = OmegaConf.to_container(typed(list(overrides), config_name), resolve=False)
    schema = SCHEMAS[config_name]
    types = schema_types(schema)
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "vpt_tiny")
    notes = field_notes(schema) | yaml_notes(CONF_DIR / "model" / f"{model}.yaml", "model.")
    notes |= yaml_notes(CONF_DIR / f"{config_name}.yaml")
    models = ", ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
    lines = [f"usage: {ep['prog']} [--help] [KEY=VALUE ...]"]
    lines += [f"       {m}" for m in ep["more"]]
    lines += ["", ep["what"],
              "Each KEY=VALUE overrides one setting below (Hydra syntax; lists as [a,b]; null for none);",
              f"model=NAME picks conf/model/NAME.yaml ({models}). A key that does not exist, a value of the wrong",
              "type or choice is refused with one error line and exit status 2 before anything runs.",
              "", "settings (KEY  TYPE = DEFAULT  note):"]
    lines += settings_lines(cfg, types, notes, CHOICES)
    lines += ["", "examples:"] + [f"  {e}" for e in ep["examples"]]
    return "\n".join(lines)
