"""Ray workers end with their task: a SIGKILL of the task's whole process group (preemption, an outside kill) leaves
no Ray process behind (its workers run in process groups of their own, out of that kill's reach)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import textwrap

import psutil

from conftest import REPO

DRIVER = textwrap.dedent("""
    import json, os, sys, time
    from pipeline.inference.runner import ensure_ray
    ensure_ray(2)
    import ray

    @ray.remote
    def where(i):
        time.sleep(0.3)
        return os.getpid()

    print(json.dumps(sorted(set(ray.get([where.remote(i) for i in range(4)])))), flush=True)
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


def test_group_kill_of_a_ray_task_leaves_no_ray_process():
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        workers = json.loads(proc.stdout.readline())
        assert workers, "no Ray worker ran"
        assert any(os.getpgid(w) != proc.pid for w in workers)  # out of reach of the group kill by themselves
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while (_session(proc.pid) or any(psutil.pid_exists(w) for w in workers)) and time.time() < deadline:
            time.sleep(0.1)
        left = [(p.pid, p.name()) for p in _session(proc.pid)]
        assert left == [] and not any(psutil.pid_exists(w) for w in workers), left
    finally:
        for p in _session(proc.pid):
            p.kill()
