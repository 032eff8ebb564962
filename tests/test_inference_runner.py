"""The shared inference runner on a real local Ray: overlap of preprocessing and model, backpressure, failures."""
from __future__ import annotations

import functools
import sys
import time

import pytest

from pipeline.inference.runner import (FixedLatencyModel, ItemFailure, RunnerConfig, ensure_ray,
                                       fixed_latency_preprocess, local_ray_cpus, model_actor_count,
                                       run_inference)
from pipeline.stages.base import ItemResult, WorkItem


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    import ray
    from ray import cloudpickle

    # Ray workers cannot import this test module: ship its functions by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = ensure_ray(num_cpus=3)   # one Ray for the module: the runner reuses it
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
