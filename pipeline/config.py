"""Composing and validating run configs (Hydra compose API + structured dataclass schemas).

Everything is validated before anything runs, is submitted or is written: unknown stage/launcher/cluster, unknown
key, wrong type, missing input. Errors surface as `ConfigError` with one line of text.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class LocalLauncherConfig:
    name: str = "local"
    workers: int = 2


@dataclass
class SlurmLauncherConfig:
    name: str = "slurm"
    wait: bool = True
    array_parallelism: int = 64
    max_array_size: Optional[int] = None
    dependency: Optional[str] = None
    poll_seconds: float = 2.0
    preflight_timeout_s: float = 20.0   # sinfo/squeue must answer within this before anything is written


LAUNCHERS = {"local": LocalLauncherConfig, "slurm": SlurmLauncherConfig}


@dataclass
class ClusterConfig:
    name: str = "generic"
    partition: Optional[str] = None
    gpu_partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_gpu: int = 8
    mem_gb_per_gpu: float = 60
    max_timeout_min: int = 2880
    setup: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    stage: Any = MISSING
    launcher: Any = MISSING
    cluster: Any = MISSING
    run_dir: str = MISSING
    input: Optional[str] = None
    num_shards: Optional[int] = None
    items_per_shard: int = 64
    shards: Optional[list[int]] = None
    retry_failed: bool = False
    models: str = "real"
    cache_dir: str = "~/.cache/vpt-pipeline"
    device: str = "auto"
    on_leased_shard: str = "wait"   # a shard another live launch is running: wait for it, or skip it
    lease_ttl_s: float = 120.0      # a lease whose heartbeat is older than this (owner on another host) is stale
    min_free_gb: float = 1.0        # launch preflight: free space needed on the run dir's filesystem


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_group_choices(overrides: list[str]) -> None:
    from .stages import available  # local import: the registry imports nothing heavy

    for ov in overrides:
        m = re.match(r"^(stage|launcher|cluster)=(.*)$", ov)
        if not m:
            continue
        group, choice = m.groups()
        options = available() if group == "stage" else _group_options(group)
        if choice not in options or not (CONF_DIR / group / f"{choice}.yaml").exists():
            raise ConfigError(f"unknown {group} {choice!r}; choose one of: {', '.join(options)}")


def compose(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with command-line overrides and validate every part against its schema."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _check_group_choices(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="vpt"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as exc:  # Hydra's override/parse errors
        text = f"{exc} {exc.__cause__ or ''}"
        m = re.search(r"Could not override '([^']+)'", text)
        if m and "not in struct" in text:
            raise ConfigError(f"unknown config key {m.group(1)!r} (see conf/ for the keys)") from None
        raise ConfigError(_one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    return validate(cfg)


def validate(cfg: DictConfig) -> DictConfig:
    from .stages import get_stage

    try:
        OmegaConf.resolve(cfg)
        stage_name = cfg.stage.get("name") if isinstance(cfg.get("stage"), DictConfig) else None
        stage_cls = get_stage(stage_name)
        launcher_name = cfg.launcher.get("name")
        if launcher_name not in LAUNCHERS:
            raise ConfigError(f"unknown launcher {launcher_name!r}; choose one of: {', '.join(LAUNCHERS)}")
        top = OmegaConf.merge(OmegaConf.structured(RunConfig), {k: v for k, v in cfg.items()
                                                                 if k not in ("stage", "launcher", "cluster")})
        top.stage = _typed(stage_cls.Config, cfg.stage, f"stage {stage_name}")
        top.launcher = _typed(LAUNCHERS[launcher_name], cfg.launcher, f"launcher {launcher_name}")
        top.cluster = _typed(ClusterConfig, cfg.cluster, "cluster")
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(_config_error_text(exc)) from None
    if top.run_dir in (None, "", "???"):
        raise ConfigError("run_dir is required: run_dir=<directory for this run>")
    if top.models not in ("real", "tiny"):
        raise ConfigError(f"models must be 'real' or 'tiny', got {top.models!r}")
    if top.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {top.device!r}")
    if top.num_shards is not None and top.num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {top.num_shards}")
    if top.on_leased_shard not in ("wait", "skip"):
        raise ConfigError(f"on_leased_shard must be wait or skip, got {top.on_leased_shard!r}")
    if top.lease_ttl_s <= 0:
        raise ConfigError(f"lease_ttl_s must be > 0, got {top.lease_ttl_s}")
    if top.items_per_shard < 1:
        raise ConfigError(f"items_per_shard must be >= 1, got {top.items_per_shard}")
    if top.input is not None and not Path(top.input).exists():
        raise ConfigError(f"input manifest not found: {top.input}")
    _check_model_actors(top)
    OmegaConf.set_readonly(top, True)
    return top


def _check_model_actors(top: DictConfig) -> None:
    """Model stages on Slurm GPUs: the runner's actors must fit in what the task asks for, else they never start."""
    runner = top.stage.get("runner")
    if runner is None:
        return
    if runner.num_model_actors < 0:
        raise ConfigError(f"stage.runner.num_model_actors must be >= 0 (0 = one per GPU), got {runner.num_model_actors}")
    gpus = top.stage.resources.gpus * top.stage.resources.nodes
    if top.launcher.name == "slurm" and gpus > 0 and runner.num_model_actors * runner.num_gpus_per_actor > gpus:
        raise ConfigError(f"stage.runner.num_model_actors={runner.num_model_actors} x num_gpus_per_actor="
                          f"{runner.num_gpus_per_actor} needs more GPUs than the task asks for (stage.resources: "
                          f"gpus {top.stage.resources.gpus} x nodes {top.stage.resources.nodes}); "
                          "0 = one actor per GPU")


def _typed(schema: type, node: Any, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{what}: {_config_error_text(exc)}") from None


def _config_error_text(exc: OmegaConfBaseException) -> str:
    text = _one_line(exc)
    key = getattr(exc, "full_key", None)
    if "Key '" in text and "not in" in text:
        return f"unknown config key {key or ''}: {text}"
    return f"{key}: {text}" if key and key not in text else text


def stage_config_hash(cfg: DictConfig) -> str:
    """Identifies the stage settings a shard was produced with (recorded in its marker and provenance)."""
    body = json.dumps(OmegaConf.to_container(cfg.stage, resolve=True), sort_keys=True, default=str)
    return hashlib.sha1(f"{body}|models={cfg.models}".encode()).hexdigest()[:12]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def from_container(container: dict) -> DictConfig:
    """Rebuild a validated config inside a task (Slurm/local worker) from its plain-dict form."""
    return validate(OmegaConf.create(container))
