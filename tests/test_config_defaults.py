"""The dataclasses are the schema (types) and their defaults equal the yaml files that document them, so unit
tests (dataclass defaults) and the CLI (yaml) run the same settings."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from pipeline.config import LAUNCHERS, ClusterConfig
from pipeline.stages import STAGES, get_stage
from pipeline.train import config as train_config

CONF = Path(__file__).resolve().parents[1] / "conf"
ENV = ("VPT_CACHE_DIR", "VPT_COOKIES_FILE", "VPT_PROXY", "VPT_PANNS_CHECKPOINT")


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


def differences(yaml_values: dict, defaults: dict) -> list[str]:
    y, d = leaves(yaml_values), leaves(defaults)
    out = [f"{k}: only in the yaml" for k in y.keys() - d.keys()]
    out += [f"{k}: only in the dataclass (undocumented)" for k in d.keys() - y.keys()]
    out += [f"{k}: yaml {y[k]!r} != dataclass {d[k]!r}" for k in y.keys() & d.keys()
            if y[k] != d[k] or (type(y[k]) is bool) != (type(d[k]) is bool)]
    return sorted(out)


def yaml_values(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def defaults(schema: type) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_yaml_is_the_stage_dataclass_defaults(no_env, stage):
    assert differences(yaml_values(CONF / "stage" / f"{stage}.yaml"), defaults(get_stage(stage).Config)) == []


def test_the_drifted_defaults_are_the_ones_the_cli_ran_with():
    """download asked Slurm for 4 GB in the yaml and 8 in the dataclass; audio and scenegraph ran 2 decoding
    workers from the CLI and 1 in unit tests."""
    assert get_stage("download").Config().resources.mem_gb == 4
    assert get_stage("audio").Config().runner.num_cpus_preprocess == 2
    assert get_stage("scenegraph").Config().runner.num_cpus_preprocess == 2


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_yaml_is_the_launcher_dataclass_defaults(name):
    assert differences(yaml_values(CONF / "launcher" / f"{name}.yaml"), defaults(LAUNCHERS[name])) == []
    assert sorted(p.stem for p in (CONF / "launcher").glob("*.yaml")) == sorted(LAUNCHERS)


def test_generic_cluster_yaml_is_the_cluster_dataclass_defaults():
    assert differences(yaml_values(CONF / "cluster" / "generic.yaml"), defaults(ClusterConfig)) == []


@pytest.mark.parametrize("path", sorted((CONF / "cluster").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_cluster_profile_sets_every_key_with_the_dataclass_types(path):
    """Profiles (a40, a100...) override values: every key of the schema, named like their file, and each value
    survives the typed merge unchanged (no key the schema lacks, no value of another type)."""
    raw = yaml_values(path)
    assert raw["name"] == path.stem
    assert sorted(raw) == sorted(f.name for f in dataclasses.fields(ClusterConfig))
    assert OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ClusterConfig), raw)) == raw


def plain_hydra(config_name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(hydra_compose(config_name=config_name), resolve=False)


@pytest.mark.parametrize("config_name,schema", [("train/pretrain", train_config.PretrainConfig),
                                                ("train/vqa", train_config.VQAConfig)])
def test_training_yaml_is_the_training_schema_defaults(config_name, schema):
    """Composed by Hydra alone (no schema), interpolations unresolved, the yaml equals the dataclass defaults."""
    assert differences(plain_hydra(config_name), defaults(schema)) == []


def test_model_yaml_files_set_every_model_key_with_its_type():
    assert differences(yaml_values(CONF / "model" / "vpt_tiny.yaml"), defaults(train_config.ModelConfig)) == []
    for path in (CONF / "model").glob("*.yaml"):
        raw = yaml_values(path)
        assert sorted(raw) == sorted(f.name for f in dataclasses.fields(train_config.ModelConfig)), path
        assert OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(train_config.ModelConfig), raw)) == raw


def field_types(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _same(a, b) -> bool:
    norm = {tuple: list, typing.Tuple: list}
    a, b = (norm.get(typing.get_origin(t), typing.get_origin(t)) or t for t in (a, b))
    return a == b


def test_schema_sections_match_the_dataclasses_that_consume_them():
    """model.* becomes VPTConfig, data.synthetic.* SyntheticConfig, data.loader.* the loader's LoaderConfig;
    vqa.clip and vqa.scenegraph are the clip and scenegraph stages' settings (same names, types, defaults)."""
    from pipeline.loader import LoaderConfig
    from pipeline.models.vpt import VPTConfig
    from pipeline.train.data import SyntheticConfig

    assert field_types(train_config.ModelConfig) == field_types(VPTConfig)
    assert field_types(train_config.SyntheticDataConfig) == field_types(SyntheticConfig)
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
