"""One config system: dataclass schemas registered in Hydra's ConfigStore, yaml files that only override.

Every config a command composes is a dataclass: the run (`RunConfig`), each stage (`Stage.Config`, e.g.
`FramesConfig`), the launchers, the cluster profiles, and the training and VQA configs
(`pipeline.train.config`). `register()` stores them in Hydra's ConfigStore under `schema/...`; each yaml in conf/
names its schema first in its defaults list (`- /schema/stage/frames@_here_`) and then sets only what differs
from the dataclass defaults. So composition itself refuses a key the schema lacks or a value of the wrong type,
and the defaults live in one place. Everything is validated before anything runs, is submitted or is written:
unknown stage/launcher/cluster, unknown key, wrong type, missing input. Errors surface as `ConfigError` with one
line of text (the commands print it and exit 2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class LocalLauncherConfig:
    """conf/launcher/local.yaml: shards run in a local process pool (the default; used by the demo)."""
    name: str = "local"
    workers: int = 2                    # shards run in parallel


@dataclass
class SlurmLauncherConfig:
    """conf/launcher/slurm.yaml: one Slurm array job per stage over the incomplete shards (submitit)."""
    name: str = "slurm"
    wait: bool = True                   # block until the arrays finish (false: submit, print job ids, return)
    array_parallelism: int = 64         # the array's % throttle: at most this many tasks at once
    max_array_size: Optional[int] = None   # null = ask the cluster (scontrol show config: MaxArraySize)
    dependency: Optional[str] = None    # e.g. afterany:1234 (workflows set this)
    poll_seconds: float = 2.0
    preflight_timeout_s: float = 20.0   # sinfo/squeue must answer within this before anything is written


LAUNCHERS = {"local": LocalLauncherConfig, "slurm": SlurmLauncherConfig}


@dataclass
class ClusterConfig:
    """conf/cluster/*.yaml: where and how array tasks run (a profile per site: generic, a40, a100...)."""
    name: str = "generic"
    partition: Optional[str] = None
    gpu_partition: Optional[str] = None  # used for stages whose resources ask for GPUs (null = partition)
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: int = 0              # GPUs per node on GPU partitions (multi-node jobs use nodes x this)
    cpus_per_gpu: int = 8
    mem_gb_per_gpu: float = 60
    max_timeout_min: int = 2880
    setup: list[str] = field(default_factory=list)       # shell lines run before each task ("module load cuda")
    additional: dict[str, Any] = field(default_factory=dict)   # extra sbatch options, e.g. {"exclusive": true}


@dataclass
class RunConfig:
    """conf/config.yaml: the run; `stage`, `launcher` and `cluster` are the chosen group members."""
    stage: Any = MISSING
    launcher: Any = MISSING
    cluster: Any = MISSING
    run_dir: str = MISSING              # everything of a run lives here: manifest, shard outputs, ledgers, logs
    input: Optional[str] = None         # manifest (.txt or .parquet); needed on the first launch of a run_dir only
    num_shards: Optional[int] = None    # pinned on first launch; null = ceil(items / items_per_shard)
    items_per_shard: int = 64
    shards: Optional[list[int]] = None  # run only these shard ids (list), e.g. shards=[0,3]
    retry_failed: bool = False          # re-do only the failed items of completed shards
    models: str = "real"                # real: the named checkpoints; tiny: tiny random models built locally
    cache_dir: str = "~/.cache/vpt-pipeline"
    device: str = "auto"                # auto | cpu | cuda
    on_leased_shard: str = "wait"       # a shard another live launch is running: wait for it, or skip it
    lease_ttl_s: float = 120.0          # a lease whose heartbeat is older than this (owner on another host) is stale
    min_free_gb: float = 1.0            # launch preflight: free space needed on the run dir's filesystem


# ------------------------------------------------------------------------------------------------ ConfigStore


def store(group: str, name: str, node: type) -> None:
    """Register one schema in Hydra's ConfigStore (idempotent: a later store of the same name replaces it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=group, name=name, node=node)


def stage_yaml(name: str) -> Optional[Path]:
    """The yaml a stage's settings start from: `conf/stage/<name>.yaml`; for a stage of another package without
    one, the yaml beside its module (`toyexpert/brightness.py` -> `toyexpert/brightness.yaml`); None when neither
    exists (its schema's defaults)."""
    import importlib.util

    from .stages import STAGES

    own = CONF_DIR / "stage" / f"{name}.yaml"
    if own.exists() or name not in STAGES:
        return own if own.exists() else None
    spec = importlib.util.find_spec(STAGES[name])
    beside = Path(spec.origin).with_suffix(".yaml") if spec is not None and spec.origin else None
    return beside if beside is not None and beside.exists() else None


def register(stages: typing.Iterable[str] = ()) -> None:
    """The run, launcher and cluster schemas, and those of the named stages, as `schema/...` in the ConfigStore.

    Stage schemas live in their stage modules, so only the stages a composition picks are imported. A stage without
    a yaml in conf/stage/ (one registered from another package, `pipeline.stages.register`) gets its `stage=<name>`
    choice here: its schema with the yaml beside its module on top (`stage_yaml`)."""
    from .stages import get_stage

    store("schema", "run", RunConfig)
    store("schema", "cluster", ClusterConfig)
    for name, schema in LAUNCHERS.items():
        store("schema/launcher", name, schema)
    for name in stages:
        schema = get_stage(name).Config
        store("schema/stage", name, schema)
        path = stage_yaml(name)
        if path is None or path.parent != CONF_DIR / "stage":
            node = OmegaConf.structured(schema)
            if path is not None:
                try:
                    own = OmegaConf.load(path)
                    own.pop("defaults", None)       # written like conf/stage's yamls: it names the schema, applied here
                    node = OmegaConf.merge(node, own)
                except OmegaConfBaseException as exc:
                    raise ConfigError(f"{path}: {_config_error_text(exc)}") from None
            store("stage", name, node)


# ------------------------------------------------------------------------------------------------ composition


def _one_line(exc: BaseException) -> str:
    msg = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
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
        if choice not in options or (group != "stage" and not (CONF_DIR / group / f"{choice}.yaml").exists()):
            raise ConfigError(f"unknown {group} {choice!r}; choose one of: {', '.join(options)}")


def default_choice(group: str, config_name: str = "config") -> Optional[str]:
    """The member of `group` that conf/<config_name>.yaml's defaults list picks."""
    for entry in OmegaConf.load(CONF_DIR / f"{config_name}.yaml").get("defaults", []):
        if isinstance(entry, DictConfig) and group in entry:
            return str(entry[group])
    return None


def chosen(group: str, overrides: list[str], config_name: str = "config") -> Optional[str]:
    picked = [o.split("=", 1)[1] for o in overrides if re.match(rf"^\+*{group}=", o)]
    return picked[-1] if picked else default_choice(group, config_name)


def hydra_error_text(exc: BaseException, hint: str) -> str:
    """One line for a Hydra composition error: unknown key, wrong type, unknown group member, unparsable text."""
    cause = exc.__cause__ or exc.__context__
    text = f"{exc} {cause or ''}"
    m = re.search(r"Could not (?:override|append to) '([^']+)'", text)
    if m and ("not in" in text or "Key '" in text or "Could not append" in text):
        return f"unknown config key {m.group(1)!r} ({hint})"
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        options = _group_options(m.group(1))
        return f"unknown {m.group(1)} {m.group(2)!r}; choose one of: {', '.join(options)}"
    if type(exc).__name__ == "OverrideParseException" or "mismatched input" in text or "no viable" in text:
        return f"cannot parse the overrides ({_one_line(exc)}); write KEY=VALUE ({hint})"
    m = re.match(r"In '([^']+)': \w+ raised while composing config:\n(.*)\n(?:.*\n)*?\s*full_key: (\S+)", str(exc))
    if m:   # a yaml file's own value of the wrong type, or a key its schema lacks
        where, text, key = m.groups()
        what = f"unknown config key {key!r}" if "Key '" in text and "not in" in text else f"{key}: {text.strip()}"
        return f"conf/{where}.yaml: {what}"
    if isinstance(cause, OmegaConfBaseException):
        where = re.search(r"Error merging '([^']+)'", str(exc))
        body = _config_error_text(cause, hint)
        return f"conf/{where.group(1)}.yaml: {body}" if where and not where.group(1).startswith("schema") else body
    return _one_line(exc)


def hydra_compose(config_name: str, overrides: list[str], hint: str) -> DictConfig:
    """Hydra's compose over conf/ (schemas must be registered); ConfigError of one line on any error."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="vpt"):
            return _compose(config_name=config_name, overrides=list(overrides))
    except Exception as exc:  # noqa: BLE001 - Hydra's override/parse/validation errors: one line
        raise ConfigError(hydra_error_text(exc, hint)) from None
    finally:
        GlobalHydra.instance().clear()


STAGE_HINT = "`python -m pipeline stage=<name> --help` lists the keys"


def compose(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with command-line overrides onto the registered schemas; validate every part."""
    _check_group_choices(overrides)
    stage = chosen("stage", overrides)
    register([stage] if stage else [])
    return validate(hydra_compose("config", overrides, STAGE_HINT))


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
        OmegaConf.resolve(top)
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
    """`node` merged onto `schema` as plain values (a node already typed by Hydra may carry `+key=` additions)."""
    try:
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=False)
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{what}: {_config_error_text(exc)}") from None


def _config_error_text(exc: OmegaConfBaseException, hint: str = "") -> str:
    text = _one_line(exc)
    key = getattr(exc, "full_key", None)
    if "Key '" in text and "not in" in text:
        return f"unknown config key {key or ''}: {text}" + (f" ({hint})" if hint else "")
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
    if origin in (list, typing.List):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin in (dict, typing.Dict):
        return "dict"
    if isinstance(tp, type) and issubclass(tp, __import__("enum").Enum):
        return "|".join(m.name for m in tp)
    return getattr(tp, "__name__", str(tp))


def _nested(tp: Any) -> Optional[type]:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
    return tp if dataclasses.is_dataclass(tp) else None


def schema_types(schema: type, prefix: str = "") -> dict[str, str]:
    """Dotted key -> type name of every leaf setting of a schema dataclass."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        sub = _nested(hints[f.name])
        out |= schema_types(sub, f"{prefix}{f.name}.") if sub else {f"{prefix}{f.name}": _type_name(hints[f.name])}
    return out


def _comment_notes(lines: list[str], key_re: str, prefix: str) -> dict[str, str]:
    """key -> the comment beside it, continued by the comment-only lines right below indented deeper than it;
    without one, the comment lines right above it."""
    notes: dict[str, str] = {}
    last, indent, above = "", 0, []
    for line in lines:
        m = re.match(key_re, line)
        if not m:
            c = re.match(r"^(\s+)#\s?(.*)$", line)
            if c and last and len(c.group(1)) > indent:
                notes[last] = f"{notes[last]} {c.group(2).strip()}".strip()
            else:
                last = ""
                above = above + [c.group(2).strip()] if c else []
            continue
        last = ""
        at = _comment_at(line, m.end(1))
        key = prefix + m.group(1).strip()
        if at is not None:
            notes[key], last, indent = line[at + 1:].strip(), key, len(line) - len(line.lstrip())
        elif above:
            notes[key] = " ".join(above)
        above = []
    return notes


def _comment_at(line: str, start: int) -> Optional[int]:
    """Index of the `#` starting a trailing comment (outside quotes), or None."""
    quote = ""
    for i in range(start, len(line)):
        ch = line[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return i
    return None


def field_notes(schema: type, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the comment written beside the field in its dataclass (base classes included)."""
    notes: dict[str, str] = {}
    for klass in reversed([k for k in schema.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        notes |= _comment_notes(lines[1:], r"^\s+(\w+)\s*:[^=]*=", prefix)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        sub = _nested(hints[f.name])
        if sub:
            notes |= field_notes(sub, f"{prefix}{f.name}.")
    return notes


def yaml_notes(path: Path, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the comment written beside it (and on the comment lines continuing it) in a yaml file."""
    notes: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last, column = "", 0
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):(.*)$", line)
        if not m:
            c = re.match(r"^(\s+)#\s?(.*)$", line)
            if c and last and len(c.group(1)) >= column:
                notes[last] = f"{notes[last]} {c.group(2).strip()}".strip()
            else:
                last = ""
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        dotted = prefix + ".".join(k for _, k in stack)
        last = ""
        at = _comment_at(line, m.end(2) + 1)
        if at is not None and dotted != prefix + "defaults":
            notes[dotted], last, column = line[at + 1:].strip(), dotted, at
    return notes


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: d}


def settings_lines(values: dict, types: dict[str, str], notes: dict[str, str],
                   choices: Optional[dict[str, tuple]] = None, prefix: str = "") -> list[str]:
    """`  KEY  TYPE = VALUE  [choices]  # note` for every leaf setting."""
    lines = []
    for key, value in flatten(values).items():
        if value is not None and hasattr(value, "name") and hasattr(value, "value"):   # an Enum member
            value = value.name
        shown = json.dumps(value) if value is None or isinstance(value, (bool, list)) else str(value)
        choice = f"  [{' | '.join(choices[key])}]" if choices and key in choices else ""
        note = notes.get(key, "")
        lines.append(f"  {prefix}{key}  {types.get(key, '')} = {shown}{choice}" + (f"  # {note}" if note else ""))
    return lines


def stage_usage(overrides: list[str]) -> str:
    """`python -m pipeline stage=<name> --help`: every key of the run, the stage, the launcher and the cluster,
    with its type, the value this command line composes to, and its note."""
    _check_group_choices(overrides)
    stage = chosen("stage", overrides) or "download"
    register([stage])
    from .stages import get_stage

    cfg = hydra_compose("config", [o for o in overrides if not o.startswith("run_dir=")] + ["run_dir=RUN_DIR"],
                        STAGE_HINT)
    values = OmegaConf.to_container(cfg, resolve=False)
    launcher, cluster = cfg.launcher.name, chosen("cluster", overrides) or "generic"
    own = stage_yaml(stage)
    where = ("the defaults of " + get_stage(stage).Config.__name__ if own is None else
             str(own.relative_to(CONF_DIR.parent)) if own.is_relative_to(CONF_DIR.parent) else str(own))
    out = [f"usage: python -m pipeline stage={stage} run_dir=<dir> [KEY=VALUE ...]   (conf/config.yaml, "
           f"{where}, conf/launcher/{launcher}.yaml, conf/cluster/{cluster}.yaml)",
           "A key that does not exist or a value of the wrong type is refused with one error line and exit status 2",
           "before anything is written. Settings (KEY  TYPE = VALUE  # note):"]
    sections = [("", RunConfig, CONF_DIR / "config.yaml", {k: v for k, v in values.items()
                                                           if k not in ("stage", "launcher", "cluster")}),
                ("stage.", get_stage(stage).Config, own, values["stage"]),
                ("launcher.", LAUNCHERS[launcher], CONF_DIR / "launcher" / f"{launcher}.yaml", values["launcher"]),
                ("cluster.", ClusterConfig, CONF_DIR / "cluster" / f"{cluster}.yaml", values["cluster"])]
    for prefix, schema, path, part in sections:
        notes = field_notes(schema) | (yaml_notes(path) if path is not None else {})
        out += [""] + settings_lines(part, schema_types(schema), notes, prefix=prefix)
    return "\n".join(out)
