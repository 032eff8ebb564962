"""The training and VQA entry points validate their config before anything runs and answer --help."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.eval import vqa_finetune
from pipeline.train import __main__ as train_main
from pipeline.train.config import CONF_DIR, SCHEMAS, compose

REPO = Path(__file__).resolve().parents[1]
ENTRY = {"train/pretrain": train_main.main, "train/vqa": vqa_finetune.main}


def yaml_values(path: Path) -> dict:
    """A yaml file's own settings (its defaults list aside)."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    return raw


def plain_hydra(overrides: list[str], config_name: str) -> dict:
    """Without Hydra: the schema's dataclass defaults, the chosen model yaml, the entry point's yaml, then the
    command line, merged by OmegaConf alone and resolved. What the entry points must return."""
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "vpt_tiny")
    cfg = OmegaConf.merge(OmegaConf.structured(SCHEMAS[config_name]),
                          {"model": yaml_values(CONF_DIR / "model" / f"{model}.yaml")},
                          yaml_values(CONF_DIR / f"{config_name}.yaml"),
                          OmegaConf.from_dotlist([o for o in overrides if not o.startswith("model=")]))
    return OmegaConf.to_container(cfg, resolve=True)


def leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


@pytest.mark.parametrize("module,config_name", [("pipeline.train", "train/pretrain"),
                                                ("pipeline.eval.vqa_finetune", "train/vqa")])
def test_help_prints_every_key_with_its_default_and_exits_0(module, config_name):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr == ""
    assert r.stdout.startswith(f"usage: python -m {module} ")
    assert "examples:" in r.stdout
    listed = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("  ") and " = " in ln}
    for key, value in leaves(plain_hydra([], config_name)).items():
        assert key in listed, key
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and key != "cache_dir":
            shown = listed[key].split(" = ", 1)[1].split()[0]
            assert shown in (str(value), f"${{model.{key.split('.')[-1]}}}", "${run_dir}/checkpoints"), key


def test_help_shows_the_chosen_model_group():
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "model=vpt_flan_t5_large", "-h"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "model.backbone  str = google/flan-t5-large" in out.stdout


@pytest.mark.parametrize("config_name", ["train/pretrain", "train/vqa"])
@pytest.mark.parametrize("arg,says", [
    ("optim.lr=abc", "optim.lr"),                    # wrong type
    ("train.max_steps=1.5", "train.max_steps"),
    ("data.loader.shuffle=maybe", "data.loader.shuffle"),
    ("model.d_clip=wide", "model.d_clip"),
    ("optim.learning_rate=1e-3", "optim.learning_rate"),   # no such key (Hydra refuses it)
    ("+optim.learning_rate=1e-3", "optim.learning_rate"),  # no such key in the schema (appended)
    ("+trian.max_steps=5", "trian"),
    ("model=vpt_huge", "vpt_huge"),                  # no such model yaml
    ("model.projector=conv", "model.projector"),     # not one of the choices
    ("optim.lr==1", "optim.lr==1"),                  # not an override at all
])
def test_a_bad_key_type_or_choice_is_one_line_and_exit_2_before_anything_is_written(tmp_path, capsys, config_name,
                                                                                    arg, says):
    run = tmp_path / "run"
    assert ENTRY[config_name]([f"run_dir={run}", arg]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], captured.err
    assert captured.out == ""
    assert not run.exists()


def test_a_bad_type_from_the_command_line_of_a_real_process(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "pipeline.train", f"run_dir={run}", "optim.lr=abc"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        "error: optim.lr: Value 'abc' of type 'str' could not be converted to Float"]
    assert not run.exists()


@pytest.mark.parametrize("config_name,overrides", [
    ("train/pretrain", []),
    ("train/pretrain", ["model=vpt_flan_t5_large", "optim.lr=3e-4", "train.resume_from=800", "data.prefetch=0",
                        "slurm.cluster=a40", "data.loader.split_fractions=[0.8,0.1,0.1]"]),
    ("train/vqa", []),
    ("train/vqa", ["finetune.mode=lora", "vqa.metric=legacy", "vqa.contamination.frames=none", "models=tiny"]),
])
def test_the_validated_config_is_the_plain_dict_the_yaml_files_compose_to(config_name, overrides):
    """What the training loop and the VQA run receive: a plain dict (no OmegaConf nodes) equal to the dataclass
    defaults + the yaml files' settings + the command line merged without Hydra, for overrides of every kind."""
    got = compose(overrides, config_name)
    assert got == plain_hydra(overrides, config_name)
    assert type(got) is dict and all(type(v) in (dict, list, str, int, float, bool, type(None))
                                     for v in leaves(got).values())
    assert type(got["optim"]["betas"]) is list and type(got["data"]) is dict


def test_values_are_converted_to_their_declared_types():
    cfg = compose(["optim.lr=1", "slurm.mem_gb=16", "seed=7", "train.eval_every=0"])
    assert cfg["optim"]["lr"] == 1.0 and type(cfg["optim"]["lr"]) is float
    assert type(cfg["slurm"]["mem_gb"]) is float and cfg["seed"] == 7 and cfg["train"]["eval_every"] == 0
    # interpolations follow the model group and overrides
    assert compose(["model=vpt_flan_t5_large"])["data"]["synthetic"]["d_clip"] == 768
    assert compose(["run_dir=/x/y"])["checkpoint"]["dir"] == "/x/y/checkpoints"
