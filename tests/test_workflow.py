"""Workflow files: validation, dependency order, clear errors."""
from __future__ import annotations

from pathlib import Path

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


def test_bad_override_in_last_step_fails_before_anything_runs(tmp_path, capsys):
    from pipeline.workflow import main

    videos = tmp_path / "videos.txt"
    videos.write_text(f"a {tmp_path / 'a.mp4'}\n")
    run = tmp_path / "run"
    p = _write(tmp_path, f"""
run_dir: {run}
steps:
  download: {{stage: download, overrides: ["input={videos}"]}}
  frames: {{stage: frames, after: [download], overrides: [stage.no_such_key=1]}}
""")
    assert main([str(p), "launcher=local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: step frames: unknown config key"), err
    assert not run.exists()  # the download step never ran: no geometry, no shard outputs


def test_a_stage_step_before_a_stage_it_reads_fails_up_front(tmp_path, capsys):
    """ingest reads scenegraph's outputs: a workflow whose ingest step does not come after the scenegraph step
    (directly or through other steps) is refused before anything runs; one that does, through clip, passes."""
    from pipeline.stages import get_stage
    from pipeline.workflow import check_upstream_order, main

    assert "scenegraph" in get_stage("ingest").upstream and "frames" in get_stage("scenegraph").upstream
    body = """
run_dir: {run}
steps:
  download: {{stage: download}}
  frames: {{stage: frames, after: [download]}}
  scenegraph: {{stage: scenegraph, after: [frames]}}
  clip: {{stage: clip, after: [{clip_after}]}}
  ingest: {{stage: ingest, after: [clip]}}
"""
    run = tmp_path / "run"
    bad = load(_write(tmp_path, body.format(run=run, clip_after="frames")), [])
    with pytest.raises(ConfigError, match="step ingest: stage ingest reads the outputs of stage scenegraph, but the "
                                          "step does not come after step scenegraph"):
        check_upstream_order(bad)
    assert main([str(tmp_path / "wf.yaml"), "launcher=local"]) == 2
    assert "does not come after step scenegraph" in capsys.readouterr().err
    assert not run.exists()
    # ingest also reads asr and audio: steps the workflow does not have are not waited for (run elsewhere before)
    check_upstream_order(load(_write(tmp_path, body.format(run=run, clip_after="frames, scenegraph")), []))


def test_missing_command_module_fails_up_front(tmp_path):
    from pipeline.workflow import check_steps

    wf = load(_write(tmp_path, "run_dir: x\nsteps:\n  train: {module: pipeline.no_such_module}\n"), [])
    with pytest.raises(ConfigError, match="step train: module 'pipeline.no_such_module' not found"):
        check_steps(wf)


def test_command_step_gets_the_cluster_profile(tmp_path):
    from pipeline.workflow import command_cluster, command_parameters

    p = _write(tmp_path, """
run_dir: /tmp/r
cluster: a40
overrides: [cluster.account=proj42, cluster.qos=high, cluster.constraint=a40,
            "cluster.setup=['module load cuda/12.4']", models=tiny]
steps:
  train: {module: pipeline.train, resources: {cpus: 16, gpus: 4, mem_gb: 240, timeout_min: 99999}}
  small: {module: pipeline.report, resources: {cpus: 1, mem_gb: 2, partition: debug}}
""")
    wf = load(p, [])
    cluster = command_cluster(wf)
    params = command_parameters("train", wf.steps.train, cluster, ["11", "12"])
    assert params["slurm_account"] == "proj42" and params["slurm_qos"] == "high"
    assert params["slurm_constraint"] == "a40" and params["slurm_setup"] == ["module load cuda/12.4"]
    assert params["slurm_additional_parameters"] == {"dependency": "afterany:11:12"}
    assert params["gpus_per_node"] == 4 and params["slurm_partition"] == "gpuA40x4"  # the profile's GPU partition
    assert params["timeout_min"] == 2880  # capped at the profile's max_timeout_min
    assert params["name"] == "vpt-train" and "slurm_array_parallelism" not in params
    small = command_parameters("small", wf.steps.small, cluster, [])
    assert small["slurm_partition"] == "debug" and small["cpus_per_task"] == 1 and small["mem_gb"] == 2
    assert "slurm_additional_parameters" not in small and small["slurm_account"] == "proj42"


def _squeue(monkeypatch, answers: list[tuple[int, str, str]]) -> list[list[str]]:
    """Replace squeue with canned (returncode, stdout, stderr) answers; the last one repeats."""
    import subprocess

    import pipeline.workflow as workflow

    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        rc, out, err = answers[min(len(calls), len(answers)) - 1]
        return subprocess.CompletedProcess(cmd, rc, out, err)

    monkeypatch.setattr(workflow.subprocess, "run", fake_run)
    return calls


def test_wait_for_gives_up_when_squeue_keeps_failing(monkeypatch):
    from pipeline.workflow import WaitError, wait_for

    calls = _squeue(monkeypatch, [(1, "", "slurm_load_jobs error: Unable to contact slurm controller")])
    with pytest.raises(WaitError, match="squeue failed 5 times in a row .*Unable to contact"):
        wait_for(["7"], poll_s=0, max_failures=5)
    assert len(calls) == 5


def test_wait_for_rides_out_transient_failures(monkeypatch):
    from pipeline.workflow import wait_for

    calls = _squeue(monkeypatch, [(1, "", "timeout"), (0, "7\n", ""), (1, "", "timeout"), (1, "", "timeout"),
                                  (0, "", "")])
    wait_for(["7"], poll_s=0, max_failures=3)  # never 3 failures in a row
    assert len(calls) == 5


def test_wait_for_returns_once_slurm_forgot_the_jobs(monkeypatch):
    from pipeline.workflow import wait_for

    _squeue(monkeypatch, [(1, "", "slurm_load_jobs error: Invalid job id specified")])
    wait_for(["7"], poll_s=0, max_failures=1)


def test_incomplete_shards_fail_the_workflow(tmp_path, capsys):
    from omegaconf import OmegaConf

    from pipeline.atomic import write_json
    from pipeline.shards import ShardStore
    from pipeline.workflow import report_failures, slurm_failures

    run = tmp_path / "run"
    p = _write(tmp_path, f"""
name: t
run_dir: {run}
steps:
  download: {{stage: download}}
  frames: {{stage: frames, after: [download]}}
  train: {{module: pipeline.train, after: [frames]}}
""")
    wf = load(p, [])
    write_json(run / "geometry.json", {"num_shards": 3})
    for shard in range(3):
        ShardStore(run, "download", shard).finalize([], {}, {}, {})  # failed items would still be complete shards
    ShardStore(run, "frames", 1).finalize([], {}, {}, {})
    cfgs = {s: OmegaConf.create({"shards": None, "stage": {"name": s}}) for s in ("download", "frames")}
    failed = slurm_failures(wf, cfgs)
    assert failed == {"frames": [0, 2], "train": []}
    assert report_failures(wf, failed) == 1
    assert "steps with failures: frames (shards 0, 2); train" in capsys.readouterr().err
    assert report_failures(wf, {}) == 0


@pytest.mark.parametrize("path", REPO_WORKFLOWS)
def test_repo_workflows_validate(path, tmp_path, monkeypatch):
    """Every step of the shipped workflows composes, on the launcher each names (sbatch faked: nothing is run)."""
    import pipeline.launchers.slurm as slurm
    import pipeline.workflow as workflow

    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    videos = tmp_path / "videos.txt"
    videos.write_text("a https://example.com/a.mp4\n")
    wf = load(Path(__file__).resolve().parents[1] / path, [f"run_dir={tmp_path}", f"input={videos}"])
    cfgs = workflow.check_steps(wf)
    assert set(cfgs) == {n for n, s in wf.steps.items() if "stage" in s}
