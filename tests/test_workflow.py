"""Workflow files: validation, dependency order, clear errors."""
from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.workflow import load, order

REPO_WORKFLOWS = ["workflows/demo.yaml", "workflows/yt1b.yaml"]


def _write(tmp_path, text: str):
    p = tmp_path / "wf.yaml"
    p.write_text(text)
    return p


def test_order_and_overrides(tmp_path):
    p = _write(tmp_path, """
run_dir: /tmp/r
overrides: [models=tiny]
steps:
  clip: {stage: clip, after: [frames]}
  download: {stage: download}
  frames: {stage: frames, after: [download]}
  train: {module: pipeline.train, args: ["run_dir=${run_dir}/pretrain"], after: [clip]}
""")
    wf = load(p, ["run_dir=/tmp/other"])
    assert order(wf) == ["download", "frames", "clip", "train"]
    assert wf.steps.train.args == ["run_dir=/tmp/other/pretrain"]  # interpolation after overrides


@pytest.mark.parametrize("body,message", [
    ("run_dir: x\nsteps:\n  a: {stage: download, after: [b]}\n  b: {stage: frames, after: [a]}\n", "cycle"),
    ("run_dir: x\nsteps:\n  a: {stage: download, after: [nope]}\n", "not a step"),
    ("run_dir: x\nsteps:\n  a: {stage: download, module: m}\n", "exactly one"),
    ("run_dir: x\nsteps:\n  a: {stage: download, colour: red}\n", "unknown keys"),
    ("steps: {}\n", "missing key 'run_dir'"),
    ("run_dir: x\nlauncher: pbs\nsteps: {}\n", "launcher must be"),
])
def test_bad_workflows(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load(_write(tmp_path, body), [])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml", [])
