"""The Ray backend: Ray tasks for preprocessing, one Ray actor per model replica (in a SPREAD placement group on
a multi-node cluster); `ensure_ray` connects to RAY_ADDRESS, reuses this process's Ray or starts a local one with
a reaper that ends its workers with the process."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Callable

from ..stages.base import error_reason
from .base import ModelUnavailable, RunnerConfig, model_actor_count
from .gpu_stats import local_gpu_count
from .host import ModelHost, run_preprocess

PLACEMENT_TIMEOUT_S = 300  # replicas that cannot be placed by then (resources the job lacks) fail the task


def local_ray_cpus(cfg: RunnerConfig, device: str, local_gpus: int) -> int:
    """CPUs for a Ray started here: the preprocessing tasks plus one per model actor. The actor count must be the
    one `model_actor_count` will choose (one per GPU by default): sized for fewer, the actors take every CPU and the
    preprocessing tasks never run."""
    try:
        actors = model_actor_count(cfg, device, local_gpus)
    except ValueError:
        actors = 1  # refused later, with its message, once Ray reports the cluster's GPUs
    return max(1, cfg.num_cpus_preprocess) + actors


class RayBackend:
    """Ray tasks for preprocessing, one Ray actor per model replica."""

    def __init__(self, cfg: RunnerConfig, model_factory: Callable[[], Any], device: str):
        import ray

        self.ray = ray
        self.actors: list = []
        self.started_ray = ensure_ray(num_cpus=local_ray_cpus(cfg, device, local_gpu_count(device)))
        try:
            self.n_actors = model_actor_count(cfg, device, ray.cluster_resources().get("GPU", 0.0))
        except ValueError:
            self.close()
            raise
        gpus = cfg.num_gpus_per_actor if device == "cuda" else 0
        self.prep_task = ray.remote(num_cpus=1, max_retries=0, num_returns=2)(run_preprocess)
        host_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(ModelHost)
        self.placement = self._spread_placement(gpus)
        self.actors = [host_cls.options(scheduling_strategy=self._bundle(i)).remote(model_factory, device)
                       for i in range(self.n_actors)]
        # both sides need the function once; put it in the object store instead of pickling it per item
        self.fn_refs: dict[int, Any] = {}

    def _spread_placement(self, gpus: float):
        """On a multi-node cluster, reserve one bundle per replica spread over the nodes before any preprocessing
        task runs: a plain SPREAD hint loses to prep tasks that already fill a node, leaving replicas doubled up."""
        from ray.util.placement_group import placement_group, remove_placement_group

        if sum(1 for n in self.ray.nodes() if n["Alive"]) < 2:
            return None
        bundle = {"CPU": 1.0, **({"GPU": float(gpus)} if gpus else {})}
        pg = placement_group([bundle] * self.n_actors, strategy="SPREAD")
        ready, _ = self.ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(pg)
            self.close()
            raise RuntimeError(f"cannot place {self.n_actors} model replicas of {bundle} on the Ray cluster "
                               f"({self.ray.cluster_resources()}) within {PLACEMENT_TIMEOUT_S} s")
        return pg

    def _bundle(self, index: int) -> Any:
        if self.placement is None:
            return "DEFAULT"
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=index)

    def preprocess(self, fn: Callable, item: Any) -> tuple[Any, Any]:
        ref = self.fn_refs.get(id(fn))
        if ref is None:
            ref = self.fn_refs[id(fn)] = self.ray.put(fn)
        status_ref, payload_ref = self.prep_task.remote(ref, item)
        return status_ref, payload_ref

    def status(self, handle: Any) -> Any:
        return self.ray.get(handle)

    def predict(self, actor: int, payload_handles: list):
        return self.actors[actor].predict.remote(*payload_handles)  # refs as args: resolved in the actor

    def wait(self, handles: list, timeout: float | None) -> list:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        return done

    def get(self, handle: Any) -> Any:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayActorError as exc:
            raise ModelUnavailable(f"model actor died: {error_reason(exc)}") from exc

    def actor_stats(self) -> list[dict]:
        return self.ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if getattr(self, "placement", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)
            self.placement = None
        if self.started_ray:
            self.ray.shutdown()


def ensure_ray(num_cpus: int) -> bool:
    """Connect to RAY_ADDRESS, reuse this process's Ray, or start a local one. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")      # else Ray writes an auth token to ~/.ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        start_ray_reaper()  # first: a kill during ray.init must not leave the workers it was starting
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return True


# Ray's own processes (gcs, raylet, agents) die with the process that started them (PR_SET_PDEATHSIG), but its
# workers are the raylet's children in process groups of their own: a kill of the task's process group does not
# reach them, and one that was starting at that moment can linger as `ray::IDLE`. The reaper, in a session of its
# own (so that the same kill spares it), follows what the task started and ends it when the task is gone.
_REAPER = r"""
import os, re, signal, sys, time
import psutil
signal.signal(signal.SIGINT, signal.SIG_IGN)
driver = int(sys.argv[1])
ours = re.compile(r"session_[0-9_-]+_%d(?![0-9])" % driver)  # Ray's session dir is named after its starter

def is_ray(p):
    if p.pid == os.getpid():  # this reaper: a child of the task, and its own source names "/ray/"
        return False
    try:
        cmd = " ".join(p.cmdline())
        return p.name() in ("raylet", "gcs_server") or cmd.startswith("ray::") or "/ray/" in cmd
    except psutil.Error:
        return False

try:
    task = psutil.Process(driver)
    session = os.getsid(driver)
except (psutil.Error, OSError):
    sys.exit(0)
known, raylets = {}, {}
while True:
    try:
        if task.status() == psutil.STATUS_ZOMBIE:
            break
    except psutil.NoSuchProcess:
        break
    except psutil.Error:
        pass
    try:
        for c in task.children(recursive=True):
            if c.pid not in known and is_ray(c):
                try:
                    known[c.pid] = c.create_time()
                    if c.name() == "raylet":
                        raylets[c.pid] = known[c.pid]
                except psutil.Error:
                    pass
    except psutil.Error:
        pass
    time.sleep(0.25)
first = min(raylets.values(), default=None)
for _ in range(40):  # workers the raylet was starting at the moment of the kill show up a little later
    victims = []
    for p in psutil.process_iter():
        try:
            if known.get(p.pid) == p.create_time():
                victims.append(p)
            elif raylets and int(p.environ().get("RAY_RAYLET_PID", 0)) in raylets:
                victims.append(p)
            elif ours.search(" ".join(p.cmdline())):  # gcs, log monitor, agents of this task's Ray
                victims.append(p)
            elif (first is not None and p.name() == "raylet" and p.ppid() == 1 and os.getsid(p.pid) == session
                  and p.create_time() >= first):  # forked by our raylet, not yet a worker: orphaned with it
                victims.append(p)
        except (psutil.Error, ValueError, OSError):
            continue
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    time.sleep(0.5)
"""
_reaper: subprocess.Popen | None = None


def start_ray_reaper() -> None:
    """Once per process that starts a local Ray: its workers end with it, however it ends."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return
    try:
        _reaper = subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid())], start_new_session=True,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        _reaper = None
