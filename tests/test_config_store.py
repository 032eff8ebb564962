"""One config system: every config is a dataclass registered in Hydra's ConfigStore, the yaml files name their
schema, and composition itself refuses unknown keys and wrong types. Every entry point answers --help and turns a
bad key or value into one error line and exit status 2 before anything is written."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli, task
from pipeline import config as run_config
from pipeline.errors import ConfigError
from pipeline.stages import STAGES, get_stage
from pipeline.train import config as train_config

REPO = Path(__file__).resolve().parents[1]


def one_error_line(captured) -> str:
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_python_m_pipeline_help_and_stage_help_exit_0():
    r = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "pipeline", "stage=frames", "launcher=slurm", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    listed = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("  ") and " = " in ln}
    # every key of the stage's dataclass, with its type, default and the note written beside the field
    for key, type_name in run_config.schema_types(get_stage("frames").Config).items():
        assert f"  stage.{key}  {type_name} = " in listed[f"stage.{key}"] + " ", key
    assert "# cut detection runs on frames scaled to this width" in listed["stage.detect_width"]
    assert listed["launcher.array_parallelism"].startswith("  launcher.array_parallelism  int = 64")
    assert "run_dir" in listed and "cluster.gpus_per_node" in listed


@pytest.mark.parametrize("arg,says", [
    ("stage.workers=x", "error: stage.workers: Value 'x' of type 'str' could not be converted to Integer"),
    ("stage.resources.mem_gb=lots", "error: stage.resources.mem_gb: Value 'lots'"),
    ("stage.wrokers=2", "error: unknown config key 'stage.wrokers'"),
    ("+stage.wrokers=2", "unknown config key wrokers"),
    ("launcher.workers=two", "error: launcher.workers: Value 'two'"),
    ("cluster.gpus_per_node=x", "error: cluster.gpus_per_node:"),
    ("items_per_shard=abc", "error: items_per_shard:"),
    ("retry_failed=perhaps", "error: retry_failed:"),
    ("num_shard=3", "error: unknown config key 'num_shard'"),
    ("stage=frame", "error: unknown stage 'frame'"),
])
def test_pipeline_bad_key_or_type_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, arg, says):
    run = tmp_path / "run"
    manifest = tmp_path / "videos.txt"
    manifest.write_text("a.mp4\n")
    assert cli.main(["stage=frames", f"run_dir={run}", f"input={manifest}", arg]) == 2
    captured = capsys.readouterr()
    assert says in one_error_line(captured)
    assert captured.out == ""
    assert not run.exists()


def test_task_usage_error_and_bad_config_are_one_line_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    assert task.main([f"run_dir={run}", "stage=frames"]) == 2            # no shard=
    assert "usage: python -m pipeline.task" in one_error_line(capsys.readouterr())
    for arg, says in (("stage.workers=x", "stage.workers: Value 'x'"), ("stage.nope=1", "'stage.nope'")):
        assert task.main(["stage=frames", f"run_dir={run}", "shard=0", arg]) == 2
        assert says in one_error_line(capsys.readouterr())
    assert not run.exists()


def test_composition_itself_refuses_a_bad_type_or_key_not_only_the_later_validation():
    run_config.register(["frames"])
    cfg = run_config.hydra_compose("config", ["stage=frames", "run_dir=x"], "hint")
    assert type(cfg.stage._metadata.object_type) is type and cfg.stage._metadata.object_type is get_stage(
        "frames").Config
    with pytest.raises(ConfigError, match=r"^stage.workers: Value 'x'"):
        run_config.hydra_compose("config", ["stage=frames", "run_dir=x", "stage.workers=x"], "hint")
    with pytest.raises(ConfigError, match=r"^unknown config key 'stage.wrokers' \(hint\)$"):
        run_config.hydra_compose("config", ["stage=frames", "run_dir=x", "stage.wrokers=1"], "hint")
    train_config.register()
    with pytest.raises(ConfigError, match=r"^optim.lr: Value 'abc'"):
        run_config.hydra_compose("train/pretrain", ["optim.lr=abc"], "hint")


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    monkeypatch.setattr(run_config, "CONF_DIR", conf)
    return conf


@pytest.mark.parametrize("line,says", [
    ("threshhold: 20.0", "conf/stage/frames.yaml: unknown config key 'stage.threshhold'"),
    ("threshold: high", "conf/stage/frames.yaml: stage.threshold: Value 'high'"),
])
def test_a_yaml_that_sets_a_key_its_schema_lacks_or_a_wrong_type_is_refused(conf_copy, tmp_path, line, says):
    with open(conf_copy / "stage" / "frames.yaml", "a") as fh:
        fh.write(line + "\n")
    with pytest.raises(ConfigError) as err:
        run_config.compose(["stage=frames", f"run_dir={tmp_path / 'run'}"])
    assert says in str(err.value) and "\n" not in str(err.value)


def test_every_stage_composes_to_its_own_dataclass_and_keeps_its_config_hash(tmp_path):
    """The stage node is the registered dataclass; the hash of an unchanged config does not depend on how
    it was composed (the plain-dict round trip a Slurm task does gives the same hash)."""
    for stage in STAGES:
        cfg = run_config.compose([f"stage={stage}", f"run_dir={tmp_path}"])
        assert cfg.stage._metadata.object_type is get_stage(stage).Config
        again = run_config.from_container(run_config.OmegaConf.to_container(cfg, resolve=True))
        assert run_config.stage_config_hash(again) == run_config.stage_config_hash(cfg)
