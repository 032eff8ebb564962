"""The shared inference runner: CPU preprocessing in parallel with model actors, batched, with backpressure.

Every model stage (asr, clip, audio, scenegraph) runs its shard through `run_inference`:

    run = run_inference(items, preprocess_fn, model_factory, postprocess_fn, cfg.runner, device=ctx.device)
    for result in run:          # ItemResults, in completion order, as soon as each is done
        yield result
    stats = run.stats.as_dict()  # items/s, model-busy fraction, peak memory...

- `preprocess_fn(item) -> payload` runs on CPU workers (Ray tasks; `num_cpus_preprocess` at a time). It may
  raise (the item becomes a failed result, reason from `pipeline.stages.base.error_reason` or the exception's
  own "category: detail" text if it is a `ItemFailure`) or return `Done(item_result)` to skip the model.
- `model_factory() -> model` is called once inside each model actor (it must be picklable: a module-level
  class or a functools.partial). The model has `predict(payloads: list) -> list` with one output per payload;
  an output that is an Exception instance fails just that item. Each actor owns `num_gpus_per_actor` GPUs
  when `device == "cuda"` (Ray sets CUDA_VISIBLE_DEVICES), none on CPU.
- `postprocess_fn(item, output) -> ItemResult` runs in the driver.

Backpressure: at most `max_in_flight` items are between "taken from `items`" and "yielded to the consumer"
(preprocessing, queued payloads, inside the model, waiting to be consumed), so a slow consumer stops intake
instead of growing memory: payloads alive at once (Ray object store) stay at about `max_in_flight` x payload
size (Ray itself frees released objects in batches, by default once a second, which can add what one second
of throughput holds). Each actor gets a second batch queued behind the running one, so it never waits
for the driver between batches.

GPU memory: `peak_gpu_mem_mb` is torch's allocator peak (0 for a model that allocates outside torch, e.g.
CTranslate2 in faster-whisper); on cuda `peak_gpu_mem_mb_nvml` is the peak NVML-reported use of the actors'
GPUs (pynvml if installed, else nvidia-smi; whole-device figures), absent on CPU.

Ray: connects to the cluster at `RAY_ADDRESS` if set (multi-node jobs), reuses a Ray already initialised in
this process, else starts a local one sized for this run and shuts it down afterwards. On a multi-node cluster the
replicas sit in a SPREAD placement group (one bundle each, spread over the nodes). Actors are killed at
the end either way (actors holding CPUs would starve later Ray Data work). `backend="inline"` runs the same
scheduling with threads and in-process models, for the smallest cases.
"""
from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

from ..stages.base import ItemResult, error_reason

PLACEMENT_TIMEOUT_S = 300  # replicas that cannot be placed by then (resources the job lacks) fail the task


@dataclass
class RunnerConfig:
    batch_size: int = 8                 # items per predict() call
    num_model_actors: int = 0           # model replicas; 0 = one per `num_gpus_per_actor` GPUs of the cluster (CPU: 1)
    num_gpus_per_actor: float = 1.0     # used only when the device is cuda
    num_cpus_preprocess: int = 1        # preprocessing tasks running at once
    max_in_flight: int = 32             # items taken but not yet consumed (the memory bound)
    backend: str = "ray"                # ray | inline (threads, in-process model)


class ItemFailure(Exception):
    """A per-item failure whose message is already the recorded reason ("category: detail")."""


@dataclass
class Done:
    """Returned by a preprocess_fn to finish an item without the model (e.g. nothing to embed)."""
    result: ItemResult


@dataclass
class RunnerStats:
    items: int = 0
    ok: int = 0
    failed: int = 0
    wall_s: float = 0.0
    items_per_s: float = 0.0
    model_busy_s: float = 0.0           # summed over actors: time inside predict()
    model_window_s: float = 0.0         # summed over actors: from model loaded to last predict done
    model_busy_fraction: float = 0.0    # busy / window: the accelerator "realization"
    model_load_s: float = 0.0
    batches: int = 0
    peak_rss_mb_driver: float = 0.0
    peak_rss_mb_model: float = 0.0      # max over model actors (includes the model weights)
    peak_gpu_mem_mb: float = 0.0        # torch's allocator peak: 0 for models that do not allocate through torch
    peak_gpu_mem_mb_nvml: float | None = None  # max over actors of NVML "used" on their GPUs (cuda only)
    items_started: int = 0              # live: items taken from the input so far
    peak_in_flight: int = 0             # never above RunnerConfig.max_in_flight
    backend: str = ""
    model_nodes: list[str] = field(default_factory=list)  # the nodes the model actors ran on (Slurm names)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("items_started")
        if out["peak_gpu_mem_mb_nvml"] is None:  # no GPU was asked: CPU runs keep their stats as they were
            out.pop("peak_gpu_mem_mb_nvml")
        return {f"runner_{k}" if not k.startswith("model_") else k: v for k, v in out.items()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


NVIDIA_SMI_EVERY_S = 10.0  # nvidia-smi is a process start: sample at most this often (pynvml: every batch)


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """This process's GPUs as NVML names them (indices or GPU-/MIG- UUIDs), from CUDA_VISIBLE_DEVICES (which
    Ray sets per actor); all unset means device 0, the one torch and CTranslate2 use by default."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return ["0"]
    ids = []
    for part in (p.strip() for p in value.split(",")):
        if not part or part.startswith("-"):
            break  # CUDA ignores a negative id and everything after it
        ids.append(part)
    return ids


_pynvml: Any = None  # the initialised module, False once it proved unusable here


def _nvml_used_mb_pynvml(ids: list[str]) -> float | None:
    global _pynvml
    if _pynvml is None:  # initialised once per process: nvmlInit is too slow to repeat every batch
        try:
            import pynvml

            pynvml.nvmlInit()
            _pynvml = pynvml
        except Exception:  # noqa: BLE001 - not installed, no driver, no GPU
            _pynvml = False
    if not _pynvml:
        return None
    try:
        total = 0
        for dev in ids:
            handle = (_pynvml.nvmlDeviceGetHandleByIndex(int(dev)) if dev.isdigit()
                      else _pynvml.nvmlDeviceGetHandleByUUID(dev))
            total += _pynvml.nvmlDeviceGetMemoryInfo(handle).used
        return total / 2**20
    except Exception:  # noqa: BLE001 - e.g. an id NVML does not know
        return None


def _nvml_used_mb_smi(ids: list[str]) -> float | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--id={','.join(ids)}"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        values = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return sum(values) if values else None  # nvidia-smi reports MiB


def gpu_used_mb(ids: list[str] | None = None, allow_smi: bool = True) -> float | None:
    """NVML-reported used memory (MiB) of this process's GPUs, or None where none can be asked.

    Whole-device figures: unlike torch's allocator peak they count every framework (CTranslate2 included), its
    caches and the CUDA context, and also other processes on the same GPU (fractional GPUs per actor)."""
    ids = visible_gpus() if ids is None else ids
    if not ids:
        return None
    used = _nvml_used_mb_pynvml(ids)
    if used is None and allow_smi:
        used = _nvml_used_mb_smi(ids)
    return used


class _ModelHost:
    """Owns one model: loads it, times predict(), reports busy time and memory."""

    def __init__(self, model_factory: Callable[[], Any], device: str = "cpu"):
        t0 = time.perf_counter()
        self.model = model_factory()
        self.load_s = time.perf_counter() - t0
        self.t_ready = time.perf_counter()
        self.t_last = self.t_ready
        self.busy_s = 0.0
        self.batches = 0
        self.on_gpu = device == "cuda"
        self.nvml_peak_mb: float | None = None
        self.t_smi = -float("inf")
        self._sample_gpu()

    def _sample_gpu(self, final: bool = False) -> None:
        """NVML reports current use, not a peak: sample after load and every batch (nvidia-smi: rate-limited)."""
        if not self.on_gpu:
            return
        now = time.perf_counter()
        allow_smi = final or now - self.t_smi >= NVIDIA_SMI_EVERY_S
        if allow_smi:
            self.t_smi = now
        used = gpu_used_mb(allow_smi=allow_smi)
        if used is not None:
            self.nvml_peak_mb = max(self.nvml_peak_mb or 0.0, used)

    def predict(self, *payloads: Any) -> list[Any]:
        t0 = time.perf_counter()
        try:
            outputs = list(self.model.predict(list(payloads)))
            if len(outputs) != len(payloads):
                raise RuntimeError(f"predict returned {len(outputs)} outputs for {len(payloads)} inputs")
        finally:
            self.t_last = time.perf_counter()
            self.busy_s += self.t_last - t0
            self.batches += 1
        self._sample_gpu()
        return outputs

    def stats(self) -> dict[str, float]:
        gpu_mb = 0.0
        torch = sys.modules.get("torch")   # only a model that uses torch has GPU memory worth reporting
        try:
            if torch is not None and torch.cuda.is_available():
                gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        except Exception:  # noqa: BLE001 - stats are best effort
            pass
        self._sample_gpu(final=True)
        return {"load_s": self.load_s, "busy_s": self.busy_s, "window_s": self.t_last - self.t_ready,
                "batches": self.batches, "rss_mb": _peak_rss_mb(), "gpu_mb": gpu_mb, "gpu_nvml_mb": self.nvml_peak_mb,
                "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname()}

    def ready(self) -> bool:
        return True


def _run_preprocess(preprocess_fn: Callable[[Any], Any], item: Any) -> tuple[Any, Any]:
    """Runs on a CPU worker -> (status, payload); status None = go to the model, else `_Failed` or `Done`.

    Failures come back as values so one bad item never fails a batch. Status and payload are separate
    objects so the driver only ever fetches the small status, never the payload.
    """
    try:
        out = preprocess_fn(item)
    except ItemFailure as exc:
        return _Failed(str(exc)), None
    except Exception as exc:  # noqa: BLE001 - a bad input is that item's failure
        return _Failed(error_reason(exc), traceback.format_exc()), None
    return (out, None) if isinstance(out, Done) else (None, out)


@dataclass
class _Failed:
    reason: str
    trace: str = ""


def model_actor_count(cfg: RunnerConfig, device: str, cluster_gpus: float) -> int:
    """How many model actors to start: `num_model_actors`, or for 0 ("auto") one per `num_gpus_per_actor` GPUs of
    the cluster (1 on CPU). Asking for more GPUs than the cluster has is an error here, not a run that waits forever
    for actors Ray cannot place."""
    if device != "cuda":
        return max(1, cfg.num_model_actors)
    if cfg.num_gpus_per_actor <= 0:
        raise ValueError("runner.num_gpus_per_actor must be > 0 on cuda")
    n = cfg.num_model_actors if cfg.num_model_actors > 0 else int(cluster_gpus // cfg.num_gpus_per_actor + 1e-9)
    if n < 1 or n * cfg.num_gpus_per_actor > cluster_gpus + 1e-9:
        raise ValueError(f"runner.num_model_actors={cfg.num_model_actors} x num_gpus_per_actor={cfg.num_gpus_per_actor}"
                         f" needs more GPUs than the {cluster_gpus:g} this job has (0 = one actor per GPU)")
    return n


def local_ray_cpus(cfg: RunnerConfig, device: str, local_gpus: int) -> int:
    """CPUs for a Ray started here: the preprocessing tasks plus one per model actor. The actor count must be the
    one `model_actor_count` will choose (one per GPU by default): sized for fewer, the actors take every CPU and the
    preprocessing tasks never run."""
    try:
        actors = model_actor_count(cfg, device, local_gpus)
    except ValueError:
        actors = 1  # refused later, with its message, once Ray reports the cluster's GPUs
    return max(1, cfg.num_cpus_preprocess) + actors


def _local_gpu_count(device: str) -> int:
    if device != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


class ModelUnavailable(RuntimeError):
    """The model could not be loaded or its actor died: a shard-level error, not an item's."""


class _InlineBackend:
    """Threads for preprocessing, models in-process (each on its own single thread, like an actor)."""

    def __init__(self, cfg: RunnerConfig, model_factory: Callable[[], Any], device: str):
        self.n_actors = model_actor_count(cfg, device, _local_gpu_count(device))
        self.prep_pool = ThreadPoolExecutor(max(1, cfg.num_cpus_preprocess), thread_name_prefix="preprocess")
        self.model_pools = [ThreadPoolExecutor(1, thread_name_prefix=f"model{i}") for i in range(self.n_actors)]
        self.hosts = [pool.submit(_ModelHost, model_factory, device) for pool in self.model_pools]

    def preprocess(self, fn: Callable, item: Any) -> tuple[Future, Future]:
        fut = self.prep_pool.submit(_run_preprocess, fn, item)
        return fut, fut

    def predict(self, actor: int, payload_handles: list[Future]) -> Future:
        payloads = [h.result()[1] for h in payload_handles]
        return self.model_pools[actor].submit(self._predict, actor, payloads)

    def _predict(self, actor: int, payloads: list) -> list:
        try:
            host = self.hosts[actor].result()
        except Exception as exc:
            raise ModelUnavailable(f"model failed to load: {error_reason(exc)}") from exc
        return host.predict(*payloads)

    def status(self, handle: Future) -> Any:
        return handle.result()[0]

    def wait(self, handles: list[Future], timeout: float | None) -> list[Future]:
        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def get(self, handle: Future) -> Any:
        return handle.result()

    def actor_stats(self) -> list[dict]:
        return [h.result().stats() for h in self.hosts]

    def close(self) -> None:
        self.prep_pool.shutdown(wait=True, cancel_futures=True)
        for pool in self.model_pools:
            pool.shutdown(wait=True)
        self.hosts = []


class _RayBackend:
    """Ray tasks for preprocessing, one Ray actor per model replica."""

    def __init__(self, cfg: RunnerConfig, model_factory: Callable[[], Any], device: str):
        import ray

        self.ray = ray
        self.actors: list = []
        self.started_ray = ensure_ray(num_cpus=local_ray_cpus(cfg, device, _local_gpu_count(device)))
        try:
            self.n_actors = model_actor_count(cfg, device, ray.cluster_resources().get("GPU", 0.0))
        except ValueError:
            self.close()
            raise
        gpus = cfg.num_gpus_per_actor if device == "cuda" else 0
        self.prep_task = ray.remote(num_cpus=1, max_retries=0, num_returns=2)(_run_preprocess)
        host_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(_ModelHost)
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


class _Queues:
    """Where each taken item is: preprocessing -> ready -> predicting -> finished (ItemResults to hand over)."""

    def __init__(self, source: Iterator[Any], n_actors: int):
        self.source = source
        self.exhausted = False
        self.preprocessing: dict[Any, tuple] = {}          # status handle -> (item, payload handle)
        self.ready: deque[tuple[Any, Any]] = deque()       # (item, payload handle) waiting for a batch
        self.predicting: dict[Any, tuple[int, list]] = {}  # handle -> (actor, [(item, payload handle)])
        self.actor_load = [0] * n_actors
        self.finished: deque[ItemResult] = deque()
        self.in_flight = 0                                  # taken from `source`, not yet handed over


class InferenceRun:
    """Iterate for ItemResults; `stats` is live during iteration and final after it."""

    def __init__(self, items: Iterable[Any], preprocess_fn: Callable[[Any], Any],
                 model_factory: Callable[[], Any], postprocess_fn: Callable[[Any, Any], ItemResult],
                 cfg: RunnerConfig, device: str = "cpu", log: Callable[[str], None] | None = None):
        if cfg.backend not in ("ray", "inline"):
            raise ValueError(f"runner.backend must be 'ray' or 'inline', not {cfg.backend!r}")
        if cfg.batch_size < 1 or cfg.max_in_flight < 1:
            raise ValueError("runner.batch_size and runner.max_in_flight must be >= 1")
        self.items, self.preprocess_fn = items, preprocess_fn
        self.model_factory, self.postprocess_fn = model_factory, postprocess_fn
        self.cfg, self.device, self.log = cfg, device, log or (lambda msg: None)
        self.stats = RunnerStats(backend=cfg.backend)

    def __iter__(self) -> Iterator[ItemResult]:
        cfg, stats = self.cfg, self.stats
        backend_cls = _RayBackend if cfg.backend == "ray" else _InlineBackend
        t0 = time.perf_counter()
        backend = backend_cls(cfg, self.model_factory, self.device)
        q = _Queues(iter(self.items), backend.n_actors)
        try:
            # Payload handles live only in `q` (the steps are methods, so none lingers in this frame while it is
            # suspended at `yield`): an item's payload is freed once its batch is done, and max_in_flight bounds
            # the payloads alive at once.
            while True:
                self._take(backend, q)
                self._dispatch(backend, q)
                # hand over what is done; the consumer's pace is the backpressure
                while q.finished:
                    result = q.finished.popleft()
                    q.in_flight -= 1
                    yield result
                if not q.preprocessing and not q.predicting and not q.ready and q.exhausted:
                    break
                if q.preprocessing or q.predicting:
                    self._collect(backend, q)
        finally:
            try:
                self._collect_actor_stats(backend)
            except Exception as exc:  # noqa: BLE001 - stats must not mask the real error
                self.log(f"runner: could not collect model stats: {error_reason(exc)}")
            backend.close()
            stats.wall_s = time.perf_counter() - t0
            stats.items_per_s = stats.items / stats.wall_s if stats.wall_s > 0 else 0.0
            stats.peak_rss_mb_driver = _peak_rss_mb()

    def _take(self, backend: Any, q: "_Queues") -> None:
        """Intake, bounded by max_in_flight; only a small preprocessing queue runs ahead of the workers."""
        cfg, stats = self.cfg, self.stats
        while (not q.exhausted and q.in_flight < cfg.max_in_flight
               and len(q.preprocessing) < 2 * max(1, cfg.num_cpus_preprocess) + cfg.batch_size):
            try:
                item = next(q.source)
            except StopIteration:
                q.exhausted = True
                break
            status_handle, payload_handle = backend.preprocess(self.preprocess_fn, item)
            q.preprocessing[status_handle] = (item, payload_handle)
            q.in_flight += 1
            stats.items_started += 1
            stats.peak_in_flight = max(stats.peak_in_flight, q.in_flight)

    def _dispatch(self, backend: Any, q: "_Queues") -> None:
        """A full batch to any actor with < 2 queued, or a partial one to an idle actor when waiting would not
        fill it (so the accelerator never idles for want of a full batch)."""
        more_coming = bool(q.preprocessing) or not q.exhausted
        for actor in sorted(range(len(q.actor_load)), key=lambda a: q.actor_load[a]):
            if not q.ready or q.actor_load[actor] >= 2:
                continue
            if len(q.ready) < self.cfg.batch_size and q.actor_load[actor] > 0 and more_coming:
                continue
            batch = [q.ready.popleft() for _ in range(min(self.cfg.batch_size, len(q.ready)))]
            q.predicting[backend.predict(actor, [h for _, h in batch])] = (actor, batch)
            q.actor_load[actor] += 1

    def _collect(self, backend: Any, q: "_Queues") -> None:
        """Wait for at least one preprocessing task or batch to finish and route what finished."""
        for handle in backend.wait(list(q.preprocessing) + list(q.predicting), timeout=None):
            if handle in q.preprocessing:
                item, payload_handle = q.preprocessing.pop(handle)
                try:
                    status = backend.status(handle)
                except Exception as exc:  # noqa: BLE001 - e.g. the worker crashed on this input
                    status = _Failed(error_reason(getattr(exc, "cause", None) or exc))
                if isinstance(status, _Failed):
                    if status.trace:
                        self.log(f"{_item_id(item)}: {status.reason}\n{status.trace}")
                    q.finished.append(self._finish(ItemResult.failed(_item_id(item), status.reason)))
                elif isinstance(status, Done):
                    q.finished.append(self._finish(status.result))
                else:
                    q.ready.append((item, payload_handle))
            else:
                actor, batch = q.predicting.pop(handle)
                q.actor_load[actor] -= 1
                q.finished.extend(self._batch_results(backend, handle, batch))

    def _batch_results(self, backend: Any, handle: Any, batch: list) -> list[ItemResult]:
        try:
            outputs = backend.get(handle)
        except ModelUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its items, not the shard
            cause = getattr(exc, "cause", None) or exc
            self.log(f"runner: predict failed for {len(batch)} items: {error_reason(cause)}")
            return [self._finish(ItemResult.failed(_item_id(item), error_reason(cause))) for item, _ in batch]
        results = []
        for (item, _), output in zip(batch, outputs):
            if isinstance(output, ItemFailure):
                res = ItemResult.failed(_item_id(item), str(output))
            elif isinstance(output, Exception):
                res = ItemResult.failed(_item_id(item), error_reason(output))
            else:
                try:
                    res = self.postprocess_fn(item, output)
                except Exception as exc:  # noqa: BLE001
                    self.log(f"{_item_id(item)}: {error_reason(exc)}\n{traceback.format_exc()}")
                    res = ItemResult.failed(_item_id(item), error_reason(exc))
            results.append(self._finish(res))
        return results

    def _finish(self, res: ItemResult) -> ItemResult:
        self.stats.items += 1
        if res.status == "ok":
            self.stats.ok += 1
        elif res.status == "failed":
            self.stats.failed += 1
        return res

    def _collect_actor_stats(self, backend: Any) -> None:
        per_actor = backend.actor_stats()
        s = self.stats
        s.model_busy_s = sum(a["busy_s"] for a in per_actor)
        s.model_window_s = sum(a["window_s"] for a in per_actor)
        s.model_busy_fraction = s.model_busy_s / s.model_window_s if s.model_window_s > 0 else 0.0
        s.model_load_s = max((a["load_s"] for a in per_actor), default=0.0)
        s.batches = sum(a["batches"] for a in per_actor)
        s.peak_rss_mb_model = max((a["rss_mb"] for a in per_actor), default=0.0)
        s.peak_gpu_mem_mb = max((a["gpu_mb"] for a in per_actor), default=0.0)
        nvml = [a["gpu_nvml_mb"] for a in per_actor if a.get("gpu_nvml_mb") is not None]
        s.peak_gpu_mem_mb_nvml = max(nvml) if nvml else None
        s.model_nodes = sorted({a["node"] for a in per_actor})


def _item_id(item: Any) -> str:
    return str(getattr(item, "video_id", item))


def run_inference(items: Iterable[Any], preprocess_fn: Callable[[Any], Any], model_factory: Callable[[], Any],
                  postprocess_fn: Callable[[Any, Any], ItemResult], runner_cfg: RunnerConfig,
                  device: str = "cpu", log: Callable[[str], None] | None = None) -> InferenceRun:
    """Run items through preprocess -> batched model -> postprocess; iterate the result for ItemResults."""
    return InferenceRun(items, preprocess_fn, model_factory, postprocess_fn, runner_cfg, device, log)


class FixedLatencyModel:
    """A stand-in model that takes a fixed time per batch: measures the runner itself (tests, benchmark)."""

    def __init__(self, seconds_per_batch: float):
        self.seconds_per_batch = seconds_per_batch

    def predict(self, payloads: list) -> list:
        time.sleep(self.seconds_per_batch)
        return [len(p) if isinstance(p, (bytes, bytearray)) else p for p in payloads]


def fixed_latency_preprocess(item: Any, seconds: float = 0.0, payload_bytes: int = 0) -> Any:
    """A stand-in preprocessing step: sleeps, then returns `payload_bytes` bytes (or the item)."""
    time.sleep(seconds)
    return bytes(payload_bytes) if payload_bytes else item
