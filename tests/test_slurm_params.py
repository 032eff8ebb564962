"""One builder of sbatch parameters (`pipeline.launchers.sbatch.slurm_params`) for stage arrays, finish jobs,
workflow command steps and training jobs, checked against the three builders it replaced.

The reference builders below are the code as it was before (the stage launcher's `executor_parameters` and
`submit_finish`, `workflow.command_parameters`, `train.launch.executor_parameters`), copied unchanged except that
the training one takes its cluster profile as an argument. Over a grid of real composed configs (every shipped
cluster profile, CPU and GPU stages, multi-node stages, account/QoS/constraint/setup/extra options, dependencies,
explicit and profile-filled training values) every caller's parameters equal the old ones.

Two differences are intended and tested on their own: training loads its cluster profile over the same schema as
the stages (`ClusterConfig`), so a profile that leaves `mem_gb_per_gpu` or `max_timeout_min` to the schema gets
the schema's values (before: 8 GB per GPU and no time cap, unlike the stages on the same profile); and a finish
job with no extra sbatch options carries no empty `slurm_additional_parameters` (submitit's default is the same
empty dict).
"""
from __future__ import annotations

import functools
import itertools
from typing import Any

import pytest
from omegaconf import OmegaConf

from pipeline.config import compose
from pipeline.launchers.sbatch import slurm_params
from pipeline.launchers.slurm import executor_parameters, finish_parameters
from pipeline.train.launch import cluster_profile
from pipeline.train.launch import executor_parameters as train_parameters
from pipeline.workflow import command_parameters


# ------------------------------------------------------------------ the builders as they were (reference)
def old_stage_parameters(cfg) -> dict:
    res, cl = cfg.stage.resources, cfg.cluster
    gpus = int(res.gpus)
    params = {
        "name": f"vpt-{cfg.stage.name}",
        "timeout_min": min(int(res.timeout_min), int(cl.max_timeout_min)),
        "nodes": int(res.nodes),
        "tasks_per_node": 1,
        "cpus_per_task": int(max(res.cpus, gpus * cl.cpus_per_gpu if gpus else res.cpus)),
        "mem_gb": float(max(res.mem_gb, gpus * cl.mem_gb_per_gpu if gpus else res.mem_gb)),
        "slurm_array_parallelism": int(cfg.launcher.array_parallelism),
    }
    if gpus:
        params["gpus_per_node"] = gpus
    partition = (cl.gpu_partition or cl.partition) if gpus else cl.partition
    if partition:
        params["slurm_partition"] = partition
    if cl.account:
        params["slurm_account"] = cl.account
    if cl.qos:
        params["slurm_qos"] = cl.qos
    if cl.constraint:
        params["slurm_constraint"] = cl.constraint
    if cl.setup:
        params["slurm_setup"] = list(cl.setup)
    extra = dict(cl.additional or {})
    if cfg.launcher.dependency:
        extra["dependency"] = cfg.launcher.dependency
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def old_finish_parameters(cfg, after_job_ids: list[str]) -> dict:
    """make_executor(cfg) then update_parameters(...) in the old submit_finish: the later values replace."""
    extra = dict(old_stage_parameters(cfg).get("slurm_additional_parameters", {}))
    extra.pop("dependency", None)
    if after_job_ids:
        extra["dependency"] = "afterany:" + ":".join(after_job_ids)
    return {**old_stage_parameters(cfg), "name": f"vpt-{cfg.stage.name}-finish", "slurm_array_parallelism": 1,
            "nodes": 1, "slurm_additional_parameters": extra}


def old_command_parameters(name, step, cluster, upstream) -> dict:
    res = step.get("resources", {})
    cfg = OmegaConf.create({
        "stage": {"name": name, "resources": {"cpus": res.get("cpus", 2), "gpus": res.get("gpus", 0),
                                              "mem_gb": res.get("mem_gb", 8),
                                              "timeout_min": res.get("timeout_min", 240), "nodes": 1}},
        "cluster": cluster,
        "launcher": {"array_parallelism": 1, "dependency": f"afterany:{':'.join(upstream)}" if upstream else None},
    })
    params = old_stage_parameters(cfg)
    del params["slurm_array_parallelism"]
    if res.get("partition"):
        params["slurm_partition"] = res.partition
    return params


def old_train_parameters(sl: dict[str, Any], prof: dict[str, Any]) -> dict[str, Any]:
    gpus = int(sl["gpus_per_node"] if sl.get("gpus_per_node") is not None else prof.get("gpus_per_node", 0))
    tasks = int(sl["tasks_per_node"] if sl.get("tasks_per_node") is not None else max(1, gpus))
    cpus = sl.get("cpus_per_task")
    cpus = int(cpus if cpus is not None else (prof.get("cpus_per_gpu", 2) if gpus else 2))
    mem = sl.get("mem_gb")
    mem = float(mem if mem is not None else (prof.get("mem_gb_per_gpu", 8) * gpus if gpus else 8))
    timeout = int(sl["timeout_min"])
    if prof.get("max_timeout_min"):
        timeout = min(timeout, int(prof["max_timeout_min"]))
    params: dict[str, Any] = {"name": "vpt-train", "nodes": int(sl["nodes"]), "tasks_per_node": tasks,
                              "cpus_per_task": cpus, "mem_gb": mem, "timeout_min": timeout}
    if gpus:
        params["gpus_per_node"] = gpus
    partition = sl.get("partition") or ((prof.get("gpu_partition") or prof.get("partition")) if gpus
                                        else prof.get("partition"))
    if partition:
        params["slurm_partition"] = partition
    for key in ("account", "qos", "constraint"):
        value = sl.get(key) or prof.get(key)
        if value:
            params[f"slurm_{key}"] = value
    if prof.get("setup"):
        params["slurm_setup"] = list(prof["setup"])
    if prof.get("additional"):
        params["slurm_additional_parameters"] = dict(prof["additional"])
    return params


# ------------------------------------------------------------------ the grid
PROFILES = ["generic", "a40", "a100"]
SITE = [[], ["cluster.account=proj42", "cluster.qos=high", "cluster.constraint=ib",
             "cluster.setup=['module load cuda/12.4']", "+cluster.additional.exclusive=true",
             "cluster.partition=cpuq", "cluster.max_timeout_min=600"]]
STAGES = [
    ["stage=download"],
    ["stage=frames", "stage.resources.cpus=3", "stage.resources.mem_gb=5.5", "stage.resources.timeout_min=9999",
     "launcher.dependency=afterany:101:102"],
    ["stage=clip", "stage.resources.gpus=1"],
    ["stage=asr", "stage.resources.gpus=2", "stage.resources.cpus=64", "stage.resources.mem_gb=500",
     "stage.resources.nodes=3", "launcher.dependency=afterany:101"],
    ["stage=scenegraph", "stage.resources.gpus=4", "launcher.array_parallelism=7"],
]
STAGE_GRID = list(itertools.product(PROFILES, SITE, STAGES))


@functools.lru_cache(maxsize=None)
def _compose(*overrides: str):
    """A composed config (nothing is written: run_dir is only named), once per set of overrides."""
    return compose(["run_dir=/nonexistent/run", "launcher=slurm", *overrides])


def _cluster(profile: str, site: list[str]):
    return _compose(f"cluster={profile}", *site).cluster


def _no_empty(params: dict) -> dict:
    return {k: v for k, v in params.items() if v != {}}


@pytest.mark.parametrize("profile, site, stage", STAGE_GRID)
def test_stage_array_and_finish_parameters_are_unchanged(profile, site, stage):
    cfg = _compose(f"cluster={profile}", *site, *stage)
    assert executor_parameters(cfg) == old_stage_parameters(cfg)
    for after in ([], ["7"], ["7", "8"]):
        assert finish_parameters(cfg, after) == _no_empty(old_finish_parameters(cfg, after))


COMMAND_STEPS = [
    {},
    {"resources": {"cpus": 16, "gpus": 4, "mem_gb": 240, "timeout_min": 99999}},
    {"resources": {"cpus": 1, "mem_gb": 2, "partition": "debug"}},
    {"resources": {"gpus": 1, "partition": "gpu-debug"}},
    {"resources": {"cpus": 40, "gpus": 2, "mem_gb": 10.5}},
]


@pytest.mark.parametrize("profile, site, step, upstream",
                         list(itertools.product(PROFILES, SITE, COMMAND_STEPS, [[], ["11", "12"]])))
def test_workflow_command_step_parameters_are_unchanged(profile, site, step, upstream):
    cluster = _cluster(profile, site)
    step = OmegaConf.create({"module": "pipeline.train", **step})
    assert command_parameters("train", step, cluster, upstream) == \
        old_command_parameters("train", step, cluster, upstream)


TRAIN = [
    {},
    {"nodes": 2},
    {"gpus_per_node": 2},
    {"gpus_per_node": 2, "tasks_per_node": 2, "mem_gb": 100, "partition": "debug", "timeout_min": 99999},
    {"cpus_per_task": 4, "account": "mine", "qos": "low"},
    {"gpus_per_node": 0, "tasks_per_node": 3, "cpus_per_task": 5},
    {"tasks_per_node": 8, "gpus_per_node": 4, "mem_gb": 12.5},
    {"tasks_per_node": 2, "gpus_per_node": 4},   # fewer ranks than GPUs: still one GPU's share per rank
]


@pytest.mark.parametrize("profile, site, values", list(itertools.product([None, *PROFILES], SITE, TRAIN)))
def test_training_parameters_are_unchanged(profile, site, values, monkeypatch):
    import pipeline.train.launch as launch

    sl = {"cluster": profile, "nodes": 1, "tasks_per_node": None, "gpus_per_node": None, "cpus_per_task": None,
          "mem_gb": None, "timeout_min": 240, "partition": None, "account": None, "qos": None, **values}
    prof = cluster_profile(profile)
    if profile and site:  # a site's own profile: the shipped one with the same edits as in the stage grid
        prof = OmegaConf.to_container(_cluster(profile, site))
        monkeypatch.setattr(launch, "cluster_profile", lambda name: prof)
    assert train_parameters(sl) == old_train_parameters(sl, prof)


@pytest.mark.parametrize("profile", PROFILES)
def test_training_sees_the_cluster_profile_the_stages_see(profile):
    """The profile training loads is the one the stages compose: the yaml over the ClusterConfig schema."""
    stage_view = OmegaConf.to_container(_cluster(profile, []))
    assert cluster_profile(profile) == stage_view
    gpu = train_parameters({"cluster": profile, "nodes": 1, "gpus_per_node": 2, "timeout_min": 99999})
    assert gpu["mem_gb"] == 2 * stage_view["mem_gb_per_gpu"] and gpu["timeout_min"] == stage_view["max_timeout_min"]


def test_gpu_share_raises_a_stage_request_and_fills_a_training_one():
    cluster = {"cpus_per_gpu": 16, "mem_gb_per_gpu": 60, "gpu_partition": "gpu", "partition": "cpu"}
    stage = slurm_params({"cpus": 4, "gpus": 2, "mem_gb": 10, "timeout_min": 60}, cluster, name="s")
    assert (stage["cpus_per_task"], stage["mem_gb"], stage["slurm_partition"]) == (32, 120.0, "gpu")
    train = slurm_params({"cpus": 4, "gpus": 2, "mem_gb": None, "timeout_min": 60, "tasks_per_node": 2}, cluster,
                         name="t", gpu_share="default")
    assert (train["cpus_per_task"], train["mem_gb"], train["tasks_per_node"]) == (4, 120.0, 2)
    cpu = slurm_params({"timeout_min": 60}, None, "afterok:5", name="c", gpu_share="default")
    assert (cpu["cpus_per_task"], cpu["mem_gb"], cpu["slurm_additional_parameters"]) == (2, 8.0, {"dependency": "afterok:5"})
    with pytest.raises(ValueError):
        slurm_params({"timeout_min": 60}, None, name="x")  # a stage request must say what it needs


def test_the_finish_job_goes_out_with_its_own_parameters(monkeypatch):
    """Through the launcher interface: the finish job waits on the given arrays (not on the stage's own
    dependency), runs on one node, under its own name, with the stage's sizes and the profile's partition."""
    from types import SimpleNamespace

    import pipeline.launchers.slurm as slurm
    from pipeline.launchers import get_launcher

    seen: dict = {"params": {}}

    class RecordingExecutor:
        def __init__(self, folder, cluster):
            seen["folder"] = folder

        def update_parameters(self, **params):
            seen["params"].update(params)

        def submit(self, fn, payload, *args):
            seen["fn"], seen["payload"], seen["args"] = fn, payload, args
            return SimpleNamespace(job_id="42")

    monkeypatch.setattr(slurm.submitit, "AutoExecutor", RecordingExecutor)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    cfg = _compose("cluster=a40", "stage=ingest", "stage.resources.cpus=3", "stage.resources.nodes=2",
                   "launcher.dependency=afterany:9", "cluster.account=proj42")
    assert get_launcher("slurm").submit_finish(cfg, ["7", "8"]) == "42"
    p = seen["params"]
    assert p["name"] == "vpt-ingest-finish" and p["nodes"] == 1 and p["slurm_array_parallelism"] == 1
    assert p["slurm_additional_parameters"] == {"dependency": "afterany:7:8"}
    assert p["cpus_per_task"] == 3 and p["slurm_partition"] == "cpu" and p["slurm_account"] == "proj42"
    assert seen["fn"] is slurm.finish_stage and seen["payload"]["stage"]["name"] == "ingest"
    assert seen["args"] == ("pipeline.dataset:prestart_writer_probes",)     # the stage's finish prelude
    assert seen["folder"].endswith("ingest/logs/slurm")


def test_an_unknown_launcher_is_a_config_error():
    from pipeline.errors import ConfigError
    from pipeline.launchers import get_launcher

    with pytest.raises(ConfigError, match="unknown launcher 'pbs'"):
        get_launcher("pbs")


def test_a_finish_prelude_runs_first_and_its_failure_only_warns(tmp_path, monkeypatch, caplog):
    """`run_prelude` calls the stage's "module:function"; one that cannot be imported or raises is logged, never
    fatal (a prelude only starts work early that the finish step would otherwise do itself)."""
    import logging

    from pipeline.stages import get_stage, run_prelude

    (tmp_path / "prelude_probe.py").write_text("calls = []\ndef start():\n    calls.append(1)\n"
                                               "def broken():\n    raise OSError('no fork today')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import prelude_probe

    run_prelude("prelude_probe:start")
    run_prelude(None)
    assert prelude_probe.calls == [1]
    with caplog.at_level(logging.WARNING):
        run_prelude("prelude_probe:broken")
        run_prelude("no_such_module_anywhere:start")
    assert "prelude_probe:broken failed (OSError: no fork today)" in caplog.text
    assert "no_such_module_anywhere:start failed (ModuleNotFoundError" in caplog.text
    assert get_stage("ingest").finish_prelude == "pipeline.dataset:prestart_writer_probes"
    assert get_stage("frames").finish_prelude is None
