"""Ray workers end with their task: a SIGKILL of the task's whole process group (preemption, an outside kill) leaves
no Ray process behind.

Ray's workers run in process groups of their own, out of that kill's reach. An idle worker that is running notices
its raylet's death and exits by itself within a second or two; the one that lingers is a worker the raylet was
starting at the moment of the kill (on a loaded node, Python start-up takes seconds): once it gets going, it waits
for a GCS and a raylet that are gone, long after the task. The test makes that moment deterministic: a
`sitecustomize` on the workers' path holds a worker that starts after a flag file exists for a few seconds (a slow
start), the driver asks for a fresh worker, and the task's group is killed while that worker is starting. The Ray
reaper (`pipeline.inference.runner.start_ray_reaper`) must end it; without the reaper it outlives the task (the
control test, `-m slow`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import REPO

SLOW_START_S = 3.0   # a worker start-up on a busy node
GRACE_S = 10.0       # after the kill, every process of the task's session must be gone within this

SITECUSTOMIZE = textwrap.dedent("""
    import os, sys, time
    _flag = os.environ.get("SLOW_WORKER_FLAG")
    if _flag and sys.argv and sys.argv[0].endswith("default_worker.py") and os.path.exists(_flag):
        with open(f"{_flag}.{os.getpid()}", "w") as f:
            f.write("starting")
        time.sleep(float(os.environ["SLOW_WORKER_S"]))
""")

DRIVER = textwrap.dedent("""
    import json, os, sys, time
    import pipeline.inference.runner as runner
    if os.environ.get("WITHOUT_RAY_REAPER"):  # the control: what the kill leaves without the reaper
        runner.ensure_ray.__globals__["start_ray_reaper"] = lambda: None
    runner.ensure_ray(2)
    import ray

    @ray.remote
    def where(i):
        time.sleep(0.3)
        return os.getpid()

    print(json.dumps(sorted(set(ray.get([where.remote(i) for i in range(4)])))), flush=True)
    sys.stdin.readline()
    # another runtime env: no idle worker fits, the raylet starts a fresh one
    pending = where.options(runtime_env={"env_vars": {"FRESH_WORKER": "1"}}).remote(0)
    time.sleep(600)
""")


def _session(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.Error:
            continue
    return out


def _group_kill_while_a_worker_starts(tmp_path, reaper: bool) -> dict:
    """Kill -9 the group of a task that runs Ray while the raylet starts a worker; what is left after GRACE_S."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    flag = tmp_path / "slow-start"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "SLOW_WORKER_FLAG": str(flag), "SLOW_WORKER_S": str(SLOW_START_S)}
    if not reaper:
        env["WITHOUT_RAY_REAPER"] = "1"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, start_new_session=True, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        idle = json.loads(proc.stdout.readline())  # workers that ran tasks, idle now
        assert idle, "no Ray worker ran"
        assert all(os.getpgid(w) != proc.pid for w in idle)  # out of reach of the group kill by themselves
        flag.write_text("slow")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.time() + 60
        while not (starting := [int(p.name.rsplit(".", 1)[1]) for p in tmp_path.glob("slow-start.*")]):
            assert time.time() < deadline and proc.poll() is None, "the raylet started no worker"
            time.sleep(0.05)
        assert psutil.Process(starting[0]).ppid() != proc.pid and os.getpgid(starting[0]) != proc.pid
        idle_now = [int(line.split()[0]) for line in _describe(_session(proc.pid)) if " ray::IDLE" in line]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        killed_at = time.time()
        watched = set(idle) | set(starting) | set(idle_now)
        while (_session(proc.pid) or any(psutil.pid_exists(w) for w in watched)) and time.time() < killed_at + GRACE_S:
            time.sleep(0.1)
        return {"left": _describe(_session(proc.pid)), "starting": starting, "idle_before_kill": idle_now,
                "watched_alive": sorted(w for w in watched if psutil.pid_exists(w))}
    finally:
        for p in _session(proc.pid):
            p.kill()


def test_group_kill_of_a_ray_task_leaves_no_ray_process(tmp_path):
    got = _group_kill_while_a_worker_starts(tmp_path, reaper=True)
    assert got["idle_before_kill"], got  # idle workers started before the task died were there, and went with it
    assert got["left"] == [] and got["watched_alive"] == [], got


@pytest.mark.slow
def test_without_the_reaper_a_starting_worker_outlives_the_task(tmp_path):
    """The control: the construction above does reproduce the defect the reaper is there for."""
    got = _group_kill_while_a_worker_starts(tmp_path, reaper=False)
    assert any(str(pid) in line for pid in got["starting"] for line in got["left"]), got
