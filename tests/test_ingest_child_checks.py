"""The dataset-level row checks of the rows a commit added run in the probe child (`dataset_health`), while the
writer goes on; the writer checks the rows itself when the child's results are missing.

Oracles: one row corrupted here in the committed dataset (the child must name exactly it), and a child stopped
here before it could answer (the writer must then not take an empty answer for a clean one).
"""
from __future__ import annotations

import os
import signal
from dataclasses import asdict

import deeplake
from test_ingest import run, upstream_template  # noqa: F401  (fixtures)
import pytest
from test_verify import _drop_a_clip_embedding, _reverse_clip_keys, _shift_frame_keys, _swap_scene_graphs

from benchmarks.ingest_bench import ingest_config, run_ingest_shards
from pipeline import dataset_health as health
from pipeline.dataset import writer
from pipeline.stages.ingest import write_dataset
from pipeline.verify.checks import Tolerances
from pipeline.verify.dataset import NEW_ROWS_CHECK, check_rows

QUIET = {"log": lambda s: None}


def _corrupted_dataset(run, corrupt, rows):
    """A written dataset with one row (the first of `rows(n)` with 2+ frames) corrupted by `corrupt` and
    committed: (cfg, url, rows in it, the row, its "video_id segment_idx", what the check must say)."""
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    url = write_dataset(cfg, **QUIET)["dataset"]
    ds = deeplake.open(url)
    n = len(ds)
    pts = ds["frame_pts"][0:n]
    i = next(k for k in rows(n) if len(pts[k]) >= 2)
    key = f"{ds['video_id'][i]} {int(ds['segment_idx'][i])}"
    what = corrupt(ds, i)
    ds.commit("corrupt one row")
    return cfg, url, n, i, key, what


def test_the_probe_child_names_the_corrupted_row_of_the_rows_it_checks(run):
    cfg, url, n, i, key, what = _corrupted_dataset(run, _reverse_clip_keys, lambda n: range(n // 2, n))
    check = {"call": NEW_ROWS_CHECK, "kwargs": {"tol": asdict(Tolerances.from_config(cfg.stage))}}
    with health.warm_probes():
        assert health.probe_later(url, 0, check=check)().ok
        assert health.probe_later(url, i + 1, check=check)().ok       # rows before from_row are not checked
        found = health.row_checks()
    assert found is not None and len(found) >= 1, found
    assert all(v.startswith(key + ":") for v in found) and any(what in v for v in found), found
    with health.warm_probes():
        assert health.probe_later(url, i + 1, check=check)().ok
        assert health.row_checks() == []


def _drop_a_jpeg(ds, i):
    ds["frames"][i] = list(ds["frames"][i])[:-1]
    return "1 images"


@pytest.mark.parametrize("corrupt", [_reverse_clip_keys, _swap_scene_graphs, _shift_frame_keys,
                                     _drop_a_clip_embedding, _drop_a_jpeg],
                         ids=["clip-keys", "scene-graph-keys", "frame-keys", "clip-embeddings", "jpegs"])
def test_the_childs_check_of_rows_as_read_finds_what_the_check_of_stored_rows_finds(run, corrupt):
    """The child checks the values its probe read, a block at a time; `check_rows` reads the stored rows
    itself. On a dataset with one row corrupted here, both name that row, with the same violations."""
    cfg, url, n, _, key, what = _corrupted_dataset(run, corrupt, lambda n: range(n - 1, 0, -1))
    tol = Tolerances.from_config(cfg.stage)
    stored = [str(v) for v in check_rows(deeplake.open_read_only(url), list(range(n)), tol)]
    with health.warm_probes():
        assert health.probe_later(url, 0, check={"call": NEW_ROWS_CHECK, "kwargs": {"tol": asdict(tol)}})().ok
        found = health.row_checks()
    assert found == stored, (found, stored)
    assert found and all(v.startswith(key + ":") for v in found) and any(what in v for v in found), found


def test_a_child_that_never_answers_leaves_no_clean_answer(run, tmp_path):
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    url = write_dataset(cfg, **QUIET)["dataset"]
    with health.warm_probes():
        child = health._warm.proc.pid
        os.kill(child, signal.SIGSTOP)      # it reads nothing of the request below
        verdict = health.probe_later(url, 0, check={"call": NEW_ROWS_CHECK,
                                                    "kwargs": {"tol": asdict(Tolerances.from_config(cfg.stage))}})
        os.kill(child, signal.SIGKILL)
        assert not verdict().ok
        assert health.row_checks() is None


def test_the_writer_checks_rows_itself_only_without_the_childs_results(run, monkeypatch):
    cfg = ingest_config(run, "stage.shards_per_commit=1")
    run_ingest_shards(cfg)
    calls: list = []
    real = writer.verify_dataset

    def recording(*args, **kwargs):
        calls.append(sorted(kwargs["shards"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "verify_dataset", recording)
    first = write_dataset(cfg, **QUIET)
    assert first["tag"] and first["dataset_violations"] == [] and calls == [[]], (first, calls)

    # the same write again into a fresh dataset, with the child's results lost: the writer checks the rows
    calls.clear()
    monkeypatch.setattr(health, "row_checks", lambda timeout_s=0: None)
    again = write_dataset(ingest_config(run, "stage.shards_per_commit=1",
                                        f"stage.dataset_path={run / 'dataset-again'}"), **QUIET)
    assert again["tag"] and again["dataset_violations"] == [], again
    assert calls == [[], sorted(again["shards_written"])], calls
