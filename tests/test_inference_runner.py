"""The shared inference runner on a real local Ray: overlap of preprocessing and model, backpressure, failures."""
from __future__ import annotations

import functools
import os
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from pipeline.inference import gpu_stats
from pipeline.inference import host as host_mod
from pipeline.inference.runner import (FixedLatencyModel, ItemFailure, RunnerConfig, ensure_ray,
                                       fixed_latency_preprocess, gpu_used_mb, local_ray_cpus, model_actor_count,
                                       run_inference, visible_gpus)
from pipeline.stages.base import ItemResult, WorkItem


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    import ray
    from ray import cloudpickle

    # Ray workers cannot import this test module: ship its functions by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Ray frees released objects in batches once a second by default; freeing them promptly lets the
    # object-store measurement below see what the runner holds rather than Ray's release lag.
    old = os.environ.get("RAY_free_objects_period_milliseconds")
    os.environ["RAY_free_objects_period_milliseconds"] = "20"
    try:
        started = ensure_ray(num_cpus=3)   # one Ray for the module: the runner reuses it
    finally:
        if old is None:
            os.environ.pop("RAY_free_objects_period_milliseconds")
        else:
            os.environ["RAY_free_objects_period_milliseconds"] = old
    yield
    if started:
        ray.shutdown()


def _items(n: int) -> list[WorkItem]:
    return [WorkItem(f"v{i:03d}", "", i) for i in range(n)]


def _ok(item, output) -> ItemResult:
    return ItemResult(item.video_id, rows={"t": [{"video_id": item.video_id, "out": output}]})


def _run(items, cfg, prep_s=0.1, model_s=0.1, payload_bytes=100):
    run = run_inference(items, functools.partial(fixed_latency_preprocess, seconds=prep_s,
                                                 payload_bytes=payload_bytes),
                        functools.partial(FixedLatencyModel, model_s), _ok, cfg)
    return list(run), run.stats


def test_preprocessing_overlaps_the_model():
    # strictly sequential (one item in flight): the model idles while the next item is preprocessed -> ~0.5
    seq_results, seq = _run(_items(12), RunnerConfig(batch_size=1, max_in_flight=1))
    par_results, par = _run(_items(12), RunnerConfig(batch_size=1, max_in_flight=8))
    assert sorted(r.video_id for r in par_results) == [f"v{i:03d}" for i in range(12)]
    assert all(r.status == "ok" and r.rows["t"][0]["out"] == 100 for r in par_results + seq_results)
    assert seq.model_busy_fraction < 0.65
    assert par.model_busy_fraction > seq.model_busy_fraction + 0.2
    assert par.batches == 12 and par.items == 12 and par.ok == 12


def test_batches_are_formed():
    results, stats = _run(_items(16), RunnerConfig(batch_size=4, max_in_flight=16, num_cpus_preprocess=2),
                          prep_s=0.01, model_s=0.05)
    assert len(results) == 16
    assert stats.batches < 16            # several items per predict call


def test_slow_consumer_bounds_in_flight_work():
    cfg = RunnerConfig(batch_size=2, max_in_flight=4)
    run = run_inference(_items(20), functools.partial(fixed_latency_preprocess, seconds=0.0, payload_bytes=1 << 20),
                        functools.partial(FixedLatencyModel, 0.0), _ok, cfg)
    consumed = 0
    for _ in run:
        consumed += 1
        # a slow consumer: intake never runs more than max_in_flight items ahead of it
        assert run.stats.items_started - consumed <= cfg.max_in_flight - 1
        time.sleep(0.05)
    assert consumed == 20
    assert run.stats.peak_in_flight <= cfg.max_in_flight


MB = 1 << 20
PAYLOAD = 25 * MB


def _large_payload(item):
    return np.full(PAYLOAD, item.index % 251, dtype=np.uint8)  # written, so its pages are real


class _SummaryModel:
    """Returns one small number per payload, so only the payloads themselves weigh on the object store."""

    def __init__(self, seconds_per_batch: float):
        self.seconds_per_batch = seconds_per_batch

    def predict(self, payloads: list) -> list:
        time.sleep(self.seconds_per_batch)
        return [int(p[0]) for p in payloads]


class _MemorySampler:
    """Peaks of the Ray object store's used bytes (all nodes) and of this driver's RSS, sampled in a thread."""

    def __init__(self, every_s: float = 0.01):
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.reply = get_memory_info_reply
        self.every_s = every_s
        self.proc = psutil.Process()
        self.rss0 = self.proc.memory_info().rss
        self.peak_store = self.peak_rss = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def store_used(self) -> int:
        return self.reply(self.state).store_stats.object_store_bytes_used

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.peak_store = max(self.peak_store, self.store_used())
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss - self.rss0)
            self.samples += 1
            time.sleep(self.every_s)

    def __enter__(self):
        deadline = time.time() + 10  # objects of an earlier test may still be on their way out
        while self.store_used() > PAYLOAD // 2 and time.time() < deadline:
            time.sleep(0.05)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _measured_run(n_items: int, cfg: RunnerConfig, model_s: float, consumer_s: float) -> _MemorySampler:
    with _MemorySampler() as mem:
        run = run_inference(_items(n_items), _large_payload, functools.partial(_SummaryModel, model_s), _ok, cfg)
        results = []
        for res in run:
            results.append(res)
            time.sleep(consumer_s)
    assert [r.status for r in results] == ["ok"] * n_items
    assert sorted(r.rows["t"][0]["out"] for r in results) == sorted(i % 251 for i in range(n_items))
    assert mem.samples > 20
    return mem


@pytest.mark.parametrize("model_s,consumer_s", [(0.0, 0.15), (0.3, 0.0)], ids=["slow-consumer", "slow-model"])
def test_memory_stays_bounded_by_max_in_flight_for_large_payloads(model_s, consumer_s):
    """24 items of 25 MB (600 MB in all) through max_in_flight=4: the object store never holds much more than
    4 payloads (preprocessing is far faster than the consumer or the model, so without the bound it would
    hold them all), and the driver never fetches a payload."""
    n, cfg = 24, RunnerConfig(batch_size=2, max_in_flight=4, num_cpus_preprocess=2)
    bound = (cfg.max_in_flight + 1) * PAYLOAD  # slack: one payload
    mem = _measured_run(n, cfg, model_s, consumer_s)
    assert PAYLOAD <= mem.peak_store <= bound, f"object store peak {mem.peak_store / MB:.0f} MB"
    assert mem.peak_rss < 2 * PAYLOAD, f"driver RSS grew by {mem.peak_rss / MB:.0f} MB"


def test_memory_measurement_sees_an_unbounded_intake():
    """The control: the same run with the bound lifted keeps far more than 4 payloads in the object store, so
    the measurement above would catch payloads that pile up."""
    n = 24
    mem = _measured_run(n, RunnerConfig(batch_size=2, max_in_flight=n, num_cpus_preprocess=2), 0.0, 0.15)
    assert mem.peak_store > 3 * 5 * PAYLOAD, f"object store peak {mem.peak_store / MB:.0f} MB"


def _flaky_preprocess(item):
    if item.index % 3 == 0:
        raise ItemFailure("corrupt: test input")
    if item.index % 3 == 1:
        raise ValueError("boom")
    return b"abc"


def test_bad_items_fail_alone():
    run = run_inference(_items(9), _flaky_preprocess, functools.partial(FixedLatencyModel, 0.0), _ok,
                        RunnerConfig(batch_size=2))
    by_id = {r.video_id: r for r in run}
    assert len(by_id) == 9
    assert by_id["v000"].status == "failed" and by_id["v000"].reason == "corrupt: test input"
    assert by_id["v001"].status == "failed" and by_id["v001"].reason.startswith("error: ValueError: boom")
    assert by_id["v002"].status == "ok" and by_id["v002"].rows["t"][0]["out"] == 3
    assert run.stats.failed == 6 and run.stats.ok == 3


def test_inline_backend_same_results():
    results, stats = _run(_items(6), RunnerConfig(batch_size=2, backend="inline"), prep_s=0.0, model_s=0.0)
    assert sorted(r.video_id for r in results) == [f"v{i:03d}" for i in range(6)]
    assert stats.backend == "inline" and stats.ok == 6


def test_model_actor_count_auto_is_one_per_gpu_and_refuses_what_cannot_be_placed():
    assert model_actor_count(RunnerConfig(num_model_actors=0), "cpu", 0) == 1
    assert model_actor_count(RunnerConfig(num_model_actors=3), "cpu", 0) == 3
    assert model_actor_count(RunnerConfig(num_model_actors=0), "cuda", 8) == 8  # e.g. 2 nodes x 4 GPUs
    assert model_actor_count(RunnerConfig(num_model_actors=0, num_gpus_per_actor=0.5), "cuda", 4) == 8
    assert model_actor_count(RunnerConfig(num_model_actors=2), "cuda", 4) == 2
    for cfg, gpus in [(RunnerConfig(num_model_actors=8), 4), (RunnerConfig(num_model_actors=0), 0)]:
        with pytest.raises(ValueError, match="needs more GPUs"):
            model_actor_count(cfg, "cuda", gpus)


def test_a_local_ray_has_a_cpu_for_every_actor_and_the_preprocessing():
    """Sized for one actor, 4 GPU actors (one CPU each) would take every CPU and starve preprocessing forever."""
    assert local_ray_cpus(RunnerConfig(num_model_actors=0, num_cpus_preprocess=2), "cuda", 4) == 6
    assert local_ray_cpus(RunnerConfig(num_model_actors=0, num_cpus_preprocess=1), "cpu", 0) == 2
    assert local_ray_cpus(RunnerConfig(num_model_actors=3, num_cpus_preprocess=1), "cpu", 0) == 4
    assert local_ray_cpus(RunnerConfig(num_model_actors=8), "cuda", 4) == 2  # refused later, with its message


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({}) == ["0"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3"}) == ["3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8f6b3c1e-aaaa"}) == ["GPU-8f6b3c1e-aaaa"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]


def test_nvml_memory_is_none_without_a_gpu(monkeypatch, tmp_path):
    """No pynvml and no nvidia-smi (or one that fails): None, never an exception."""
    monkeypatch.setattr(gpu_stats, "_pynvml", False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_used_mb(["0"]) is None
    assert gpu_used_mb([]) is None
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    assert gpu_used_mb(["0"]) is None
    smi.write_text("#!/bin/sh\necho '[N/A]'\n")
    assert gpu_used_mb(["0"]) is None


def test_nvml_memory_from_nvidia_smi(monkeypatch, tmp_path):
    """Without pynvml the figure comes from nvidia-smi for the visible devices only (MiB, summed)."""
    monkeypatch.setattr(gpu_stats, "_pynvml", False)
    monkeypatch.setenv("PATH", str(tmp_path))
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\nprintf '1500\\n250\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_used_mb() == 1750.0
    assert "--id=2,3" in (tmp_path / "args").read_text()
    assert gpu_used_mb(allow_smi=False) is None  # rate-limited: no process start


def test_cpu_runs_report_no_nvml_figure():
    _, stats = _run(_items(2), RunnerConfig(batch_size=2, backend="inline"), prep_s=0.0, model_s=0.0)
    assert stats.peak_gpu_mem_mb_nvml is None
    out = stats.as_dict()
    assert "runner_peak_gpu_mem_mb_nvml" not in out and out["runner_peak_gpu_mem_mb"] == 0.0


def test_a_cuda_model_host_records_the_nvml_peak(monkeypatch):
    """On cuda the host samples after load, after every batch and for its stats, and keeps the peak."""
    readings = iter([900.0, 1400.0, 1100.0])
    monkeypatch.setattr(host_mod, "gpu_used_mb", lambda allow_smi=True: next(readings))
    host = host_mod.ModelHost(functools.partial(FixedLatencyModel, 0.0), device="cuda")
    host.predict(b"ab")
    stats = host.stats()
    assert stats["gpu_nvml_mb"] == 1400.0
    cpu_host = host_mod.ModelHost(functools.partial(FixedLatencyModel, 0.0), device="cpu")
    cpu_host.predict(b"ab")
    assert cpu_host.stats()["gpu_nvml_mb"] is None
