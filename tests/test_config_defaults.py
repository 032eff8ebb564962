"""The dataclasses are the schema (keys, types) and the only defaults; the yaml files name their schema and set
only what differs from it, so unit tests (dataclass defaults) and the CLI (yaml) run the same settings and a
default cannot drift between two copies."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import LAUNCHERS, ClusterConfig, RunConfig, compose
from pipeline.stages import STAGES, get_stage
from pipeline.train import config as train_config

CONF = Path(__file__).resolve().parents[1] / "conf"
ENV = ("VPT_CACHE_DIR", "VPT_COOKIES_FILE", "VPT_PROXY", "VPT_PANNS_CHECKPOINT")
# yaml settings that read the environment: they differ from the dataclass default on purpose
FROM_ENV = {("config", "cache_dir"), ("stage/download", "cookies_file"), ("stage/download", "proxy"),
            ("stage/audio", "checkpoint")}


@pytest.fixture
def no_env(monkeypatch):
    """yaml values that read the environment (`${oc.env:VAR,default}`) resolve to their written default."""
    for var in ENV:
        monkeypatch.delenv(var, raising=False)


def leaves(d, prefix=""):
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out |= leaves(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: d}


def yaml_values(path: Path, resolve: bool = True) -> dict:
    """A yaml file's own settings, its defaults list aside."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    schema = raw.pop("defaults", None)
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=resolve) if schema is not None else raw


def defaults(schema: type) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)


def schema_entry(path: Path) -> str:
    return OmegaConf.to_container(OmegaConf.load(path)).get("defaults", [None])[0]


def restated(name: str, values: dict, schema_defaults: dict) -> list[str]:
    """Settings a yaml writes that the schema lacks or that equal its default (a second copy of a default)."""
    y, d = (leaves(values) if values else {}), leaves(schema_defaults)
    out = [f"{k}: not in the schema" for k in y.keys() - d.keys()]
    out += [f"{k}: {y[k]!r} restates the dataclass default" for k in y.keys() & d.keys()
            if y[k] == d[k] and (type(y[k]) is bool) == (type(d[k]) is bool) and (name, k) not in FROM_ENV]
    return sorted(out)


YAMLS = ([("config", RunConfig, "/schema/run@_here_")]
         + [(f"stage/{s}", None, f"/schema/stage/{s}@_here_") for s in STAGES]
         + [(f"launcher/{n}", c, f"/schema/launcher/{n}@_here_") for n, c in LAUNCHERS.items()]
         + [(f"cluster/{p.stem}", ClusterConfig, "/schema/cluster@_here_") for p in sorted((CONF / "cluster").glob("*.yaml"))]
         + [(f"train/{n}", s, f"/schema/train/{n}@_here_") for n, s in (("pretrain", train_config.PretrainConfig),
                                                                       ("vqa", train_config.VQAConfig))])


@pytest.mark.parametrize("name,schema,entry", YAMLS, ids=[y[0] for y in YAMLS])
def test_every_yaml_names_its_schema_and_sets_only_what_differs_from_it(name, schema, entry):
    path = CONF / f"{name}.yaml"
    assert schema_entry(path) == entry
    schema = schema or get_stage(name.split("/")[1]).Config
    values = yaml_values(path, resolve=False)
    values.pop("model", None) if name.startswith("train/") else None
    assert restated(name, values, defaults(schema)) == []


def test_every_model_yaml_names_the_model_schema_and_sets_every_key_with_its_type():
    """The model group's members describe whole architectures (so every key is written), on the schema."""
    for path in (CONF / "model").glob("*.yaml"):
        assert schema_entry(path) == "/schema/model@_here_"
        raw = yaml_values(path)
        assert sorted(raw) == sorted(f.name for f in dataclasses.fields(train_config.ModelConfig)), path
        assert OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(train_config.ModelConfig), raw)) == raw


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_composed_stage_is_the_dataclass_defaults_plus_the_yaml(no_env, stage, tmp_path):
    """What `python -m pipeline stage=<name>` runs with: the dataclass defaults, then the yaml's few settings
    (merged here by OmegaConf alone, without Hydra), for the stage, the launcher, the cluster and the run."""
    cfg = OmegaConf.to_container(compose([f"stage={stage}", f"run_dir={tmp_path}"]), resolve=True)
    want_stage = OmegaConf.merge(OmegaConf.structured(get_stage(stage).Config), yaml_values(CONF / "stage" / f"{stage}.yaml"))
    assert cfg["stage"] == OmegaConf.to_container(want_stage, resolve=True)
    assert cfg["launcher"] == defaults(LAUNCHERS["local"])
    assert cfg["cluster"] == defaults(ClusterConfig)
    run = {k: v for k, v in cfg.items() if k not in ("stage", "launcher", "cluster")}
    want_run = {k: v for k, v in defaults(RunConfig).items() if k not in ("stage", "launcher", "cluster")}
    assert run == want_run | yaml_values(CONF / "config.yaml") | {"run_dir": str(tmp_path)}


def test_the_drifted_defaults_are_the_ones_the_cli_ran_with():
    """download asked Slurm for 4 GB in the yaml and 8 in the dataclass; audio and scenegraph ran 2 decoding
    workers from the CLI and 1 in unit tests."""
    assert get_stage("download").Config().resources.mem_gb == 4
    assert get_stage("audio").Config().runner.num_cpus_preprocess == 2
    assert get_stage("scenegraph").Config().runner.num_cpus_preprocess == 2


def test_every_launcher_has_its_yaml():
    assert sorted(p.stem for p in (CONF / "launcher").glob("*.yaml")) == sorted(LAUNCHERS)


@pytest.mark.parametrize("path", sorted((CONF / "cluster").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_cluster_profile_is_named_like_its_file_and_survives_the_typed_merge(path):
    """Profiles (a40, a100...) override values: each value survives the typed merge unchanged (no key the schema
    lacks, no value of another type), and the profile is named like its file."""
    raw = yaml_values(path)
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ClusterConfig), raw))
    assert merged["name"] == path.stem
    assert {k: merged[k] for k in raw} == raw


def field_types(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _same(a, b) -> bool:
    norm = {tuple: list, typing.Tuple: list}
    a, b = (norm.get(typing.get_origin(t), typing.get_origin(t)) or t for t in (a, b))
    return a == b


def test_schema_sections_match_the_dataclasses_that_consume_them():
    """model.* is VPTConfig, data.synthetic.* SyntheticConfig, data.loader.* the loader's LoaderConfig;
    vqa.clip and vqa.scenegraph are the clip and scenegraph stages' settings (same names, types, defaults)."""
    from pipeline.loader import LoaderConfig
    from pipeline.models.vpt import VPTConfig
    from pipeline.train.data import SyntheticConfig

    # defined once: the model's config adds methods, no field of its own; the synthetic source's is the schema
    assert issubclass(VPTConfig, train_config.ModelConfig) and not VPTConfig.__dict__.get("__annotations__")
    assert dataclasses.asdict(VPTConfig()) == defaults(train_config.ModelConfig)
    assert SyntheticConfig is train_config.SyntheticDataConfig
    loader = field_types(LoaderConfig)
    settings = field_types(train_config.LoaderSettings)
    assert set(loader) - set(settings) <= {"batch_size", "d_clip", "d_audio"}   # data.batch_size; from the data
    assert all(_same(settings[k], loader[k]) for k in settings), (settings, loader)
    assert defaults(train_config.LoaderSettings) == {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in dataclasses.asdict(LoaderConfig()).items()
                                                     if k in settings}
    for section, stage in ((train_config.VQAClipConfig, "clip"), (train_config.VQASceneGraphConfig, "scenegraph")):
        stage_cfg = get_stage(stage).Config
        assert set(field_types(section).items()) <= set(field_types(stage_cfg).items()), stage
        stage_defaults = dataclasses.asdict(stage_cfg())
        assert {k: stage_defaults[k] for k in defaults(section)} == defaults(section), stage
