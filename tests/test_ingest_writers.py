"""Many Deep Lake writers at once: one dataset per shard group, each written by one process, read as one dataset.

Real processes and real Deep Lake on disk. The oracle is the ingest shards' own rows tables (what the join
produced): after concurrent writers, a kill -9 of one of them at an injected or random point, and a re-run, the
dataset read through `pipeline.dataset.open_read_only` and through the training loader holds every (video_id,
segment_idx) key of those tables exactly once and nothing else, and `verify` is clean.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO

from benchmarks.ingest_bench import ingest_config, make_upstream
from pipeline.dataset import GROUP_PREFIX, open_read_only, read_layout
from pipeline.engine import run_shard
from pipeline.loader import DeepLakeSource, LoaderConfig
from pipeline.schema import TABLE
from pipeline.shards import ShardStore
from pipeline.stages.ingest import dataset_url, write_dataset
from pipeline.verify import verify_run

SHARDS, PER_GROUP = 4, 2            # 2 groups of 2 shards: 2 writers (one per shard: 4 writers)
GROUPS = SHARDS // PER_GROUP
SETTINGS = (f"stage.shards_per_group={PER_GROUP}", "stage.shards_per_commit=1")
QUIET = {"log": lambda s: None}


@pytest.fixture(scope="module")
def joined(tmp_path_factory) -> Path:
    """Upstream outputs of 9 videos in 4 shards (1 to 5 videos each), joined (every ingest shard complete), no
    dataset yet."""
    run = make_upstream(tmp_path_factory.mktemp("writers") / "run", n_videos=9, num_shards=SHARDS, seed=5,
                        seconds=12.0)
    cfg = ingest_config(run, *SETTINGS)
    for shard in range(SHARDS):
        run_shard(cfg, shard)
    assert all(shard_keys(run, [s]) for s in range(SHARDS))
    return run


@pytest.fixture
def run(joined, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(joined, dst)
    return dst


def shard_keys(run: Path, shards) -> list[tuple[str, int]]:
    """The oracle: keys of the shards' rows tables, as the join wrote them."""
    out = []
    for s in shards:
        t = ShardStore(run, "ingest", s).read_table(TABLE)
        if t is not None:
            out.extend(zip(t.column("video_id").to_pylist(), t.column("segment_idx").to_pylist()))
    return out


def view_keys(run: Path) -> list[tuple[str, int]]:
    ds = open_read_only(run)
    n = len(ds)
    return list(zip((str(v) for v in ds["video_id"][0:n]), (int(i) for i in ds["segment_idx"][0:n]))) if n else []


def loader_keys(run: Path) -> list[tuple[str, int]]:
    """Every key the training loader yields over its three splits (one epoch each)."""
    keys = []
    for split in ("train", "val", "test"):
        src = DeepLakeSource(dataset_url(ingest_config(run).stage, run),
                             LoaderConfig(batch_size=5, max_frames=4, block_rows=4, shuffle_buffer_rows=8), split)
        for b in src.batches(0):
            keys.extend((v, int(i)) for v, i, m in zip(b["video_id"], b["segment_idx"], b["sample_mask"]) if m)
    return keys


def assert_exactly(run: Path, keys: list[tuple[str, int]], shards) -> None:
    want = shard_keys(run, shards)
    assert len(want) == len(set(want)) and (want or not list(shards)), "the oracle has duplicate or no keys"
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} duplicate rows"
    assert set(keys) == set(want), (f"missing {sorted(set(want) - set(keys))[:5]}, "
                                    f"extra {sorted(set(keys) - set(want))[:5]}")


def listed_shards(run: Path) -> list[int]:
    return sorted(int(s) for s in open_read_only(run).metadata["ingested_shards"])


def test_groups_written_by_concurrent_processes_read_as_one_dataset(run):
    """One group per shard, four writer processes at once."""
    cfg = ingest_config(run, "stage.shards_per_group=1", "stage.shards_per_commit=1", "stage.writers=4")
    result = write_dataset(cfg, **QUIET)
    root = Path(dataset_url(cfg.stage, run)[len("file://"):])
    assert sorted(p.name for p in root.iterdir() if (p / "_deeplake_log").is_dir()) == \
        [f"{GROUP_PREFIX}{g}" for g in range(SHARDS)]
    assert read_layout(dataset_url(cfg.stage, run)).num_groups == SHARDS
    assert len(result["groups"]) == SHARDS and len(result["tag"]) == SHARDS      # every group complete: tagged
    assert result["shards_written"] == list(range(SHARDS)) and not result["dataset_violations"]
    # each writer process (`python -m pipeline.dataset`) started its probe child before its imports
    assert all(r["probe_child_prestarted"] for r in result["groups"]), result["groups"]
    assert_exactly(run, view_keys(run), range(SHARDS))
    assert_exactly(run, loader_keys(run), range(SHARDS))
    assert verify_run(run) == []
    # each group holds exactly its own shards' rows
    for g, part in enumerate(open_read_only(run).groups):
        n = len(part)
        assert {int(s) for s in part["shard"][0:n]} == {g}
    # global row order = the groups in order = the shards' rows tables concatenated in shard order: slices that
    # cross group boundaries, row lists and frame bytes read through the view equal those tables
    tables = [ShardStore(run, "ingest", s).read_table(TABLE) for s in range(SHARDS)]
    want = [(v, i) for t in tables for v, i in zip(t.column("video_id").to_pylist(),
                                                     t.column("segment_idx").to_pylist())]
    frames = [f for t in tables for f in t.column("frames").to_pylist()]
    view = open_read_only(run)
    assert len(view) == len(want)
    for a in range(0, len(want), 5):
        for b in (a, a + 1, a + 7, a + 19, len(want)):
            got = list(zip((str(v) for v in view["video_id"][a:b]), (int(i) for i in view["segment_idx"][a:b])))
            assert got == want[a:min(b, len(want))], (a, b)
    rows = random.Random(0).sample(range(len(want)), 15)
    assert [(str(v), int(i)) for v, i in zip(view["video_id"][rows], view["segment_idx"][rows])] == \
        [want[r] for r in rows]
    with_frames = [r for r in rows if frames[r]]
    assert [list(b) for b in view["frames"].get_bytes(with_frames)] == [frames[r] for r in with_frames]
    assert (str(view["video_id"][len(want) - 1]), int(view["segment_idx"][-1])) == want[-1]
    again = write_dataset(cfg, **QUIET)
    assert again["commits"] == 0 and again["tag"] is None and again["rows"] == result["rows"]
    # a checkpoint's dataset version (every group's) opens those versions again, after a group moved on
    url = dataset_url(cfg.stage, run)
    pinned = DeepLakeSource(url, LoaderConfig(split_fractions=(1.0, 0.0, 0.0)), "train")
    import deeplake

    from pipeline.schema import to_deeplake_columns

    moved = deeplake.open(read_layout(url).group_url(0))
    moved.append(to_deeplake_columns(tables[0].slice(0, 1)))     # a row the pinned versions do not have
    moved.commit("a later row")
    again = DeepLakeSource(url, LoaderConfig(split_fractions=(1.0, 0.0, 0.0)), "train", version=pinned.version)
    assert again.version == pinned.version and len(again) == len(want)
    assert len(DeepLakeSource(url, LoaderConfig(split_fractions=(1.0, 0.0, 0.0)), "train")) == len(want) + 1


WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from benchmarks.ingest_bench import ingest_config
    from pipeline.stages.ingest import write_dataset
    cfg = ingest_config({run!r}, *{settings!r})
    point, victim_shard = {point!r}, {shard!r}

    def at(where):
        def hook(arg):
            shards = arg if isinstance(arg, list) else [arg]
            if where == point and victim_shard in shards:
                os.kill(os.getpid(), 9)
            time.sleep({pause!r})           # keeps the writers overlapping
        return hook

    open({ready!r}, "w").close()
    while not os.path.exists({go!r}):
        time.sleep(0.01)
    write_dataset(cfg, log=lambda s: None, group={group!r}, before_append=at("before_append"),
                  after_append=at("after_append"), after_commit=at("after_commit"))
""")


def start_writers(run: Path, tmp_path: Path, point: str | None, shard: int, pause: float = 0.05):
    """One writer process per group, released together; the writer of `shard`'s group dies at `point`."""
    go = tmp_path / "go"
    procs = []
    for g in range(GROUPS):
        ready = tmp_path / f"ready{g}"
        script = WRITER.format(repo=str(REPO), run=str(run), settings=SETTINGS, point=point, shard=shard,
                               pause=pause, ready=str(ready), go=str(go), group=g)
        procs.append((ready, subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)))
    deadline = time.time() + 120
    while not all(ready.exists() for ready, _ in procs) and time.time() < deadline:
        time.sleep(0.02)
    go.touch()
    return [proc for _, proc in procs]


def finish(procs, timeout: float = 180) -> list[int]:
    codes = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode in (0, -9), err[-2000:]
        codes.append(proc.returncode)
    return codes


@pytest.mark.parametrize("point,writers", [("before_append", 1), ("after_append", 1), ("after_commit", 2)])
def test_kill_of_one_concurrent_writer_then_rerun_gives_every_row_once(run, tmp_path, point, writers):
    """Shard 1 is the second shard of group 0: its writer dies at `point` with shard 0 committed, while the
    writer of group 1 goes on. The re-run writes every group (`writers` at once: 2 = child processes)."""
    codes = finish(start_writers(run, tmp_path, point, shard=1))
    assert codes == [-9, 0], codes
    # After the kill: the committed state only, each row once, exactly the listed shards' rows.
    listed = listed_shards(run)
    committed = point == "after_commit"       # the commit landed; the probe and the last-good save did not
    assert listed == ([0, 1, 2, 3] if committed else [0, 2, 3]), listed
    assert_exactly(run, view_keys(run), listed)
    # The re-run completes group 0 and touches nothing else.
    result = write_dataset(ingest_config(run, *SETTINGS, f"stage.writers={writers}"), **QUIET)
    assert result["shards_written"] == ([] if committed else [1]), result
    assert listed_shards(run) == list(range(SHARDS))
    assert_exactly(run, view_keys(run), range(SHARDS))
    assert_exactly(run, loader_keys(run), range(SHARDS))
    assert verify_run(run) == []


def test_kill_at_a_random_moment_then_rerun_gives_every_row_once(run, tmp_path):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")               # shown with a failure: the victim and the moment it was killed
    rng = random.Random(seed)
    victim = rng.randrange(GROUPS)
    procs = start_writers(run, tmp_path, None, shard=-1, pause=0.1)
    time.sleep(rng.uniform(0.0, 2.0))
    procs[victim].kill()
    finish(procs)
    listed = listed_shards(run)
    assert_exactly(run, view_keys(run), listed)
    write_dataset(ingest_config(run, *SETTINGS, "stage.writers=1"), **QUIET)
    assert_exactly(run, view_keys(run), range(SHARDS))
    assert_exactly(run, loader_keys(run), range(SHARDS))
    assert verify_run(run) == []


def test_a_verify_catches_a_row_in_the_wrong_group(run):
    """verify checks each group (rows of a shard live only in its group) besides the union of keys."""
    import deeplake

    from pipeline.schema import to_deeplake_columns

    cfg = ingest_config(run, *SETTINGS, "stage.writers=1")
    write_dataset(cfg, **QUIET)
    layout = read_layout(dataset_url(cfg.stage, run))
    stray = ShardStore(run, "ingest", 0).read_table(TABLE).slice(0, 1)     # a row of group 0 ...
    ds = deeplake.open(layout.group_url(1))                                 # ... appended to group 1
    ds.append(to_deeplake_columns(stray.select(list(stray.column_names))))
    ds.commit("a stray row")
    problems = [str(v) for v in verify_run(run)]
    assert any("group 1" in p and "[0]" in p for p in problems), problems
    assert any("2 copies" in p for p in problems), problems


def test_one_group_is_the_single_dataset_of_before(run):
    """Runs whose shards fit in one group keep the one-dataset layout (no catalogue): readers see it as before."""
    cfg = ingest_config(run)            # default shards_per_group >= 4
    result = write_dataset(cfg, **QUIET)
    root = Path(result["dataset"][len("file://"):])
    assert (root / "_deeplake_log").is_dir() and not (root / "catalogue.json").exists()
    assert isinstance(result["tag"], str)
    assert_exactly(run, view_keys(run), range(SHARDS))


def test_the_catalogue_is_pinned_once(run):
    """A later writer configured with another group size uses the pinned one."""
    write_dataset(ingest_config(run, *SETTINGS), group=0, **QUIET)
    cat = json.loads((Path(dataset_url(ingest_config(run).stage, run)[len("file://"):]) / "catalogue.json").read_text())
    assert cat == {"num_shards": SHARDS, "shards_per_group": PER_GROUP}
    lines = []
    write_dataset(ingest_config(run, "stage.shards_per_group=3", "stage.writers=1"), log=lines.append)
    assert any("pinned to shards_per_group=2" in line for line in lines), lines
    assert_exactly(run, view_keys(run), range(SHARDS))
    assert verify_run(run) == []


def test_a_group_is_up_to_date_only_when_its_writer_would_do_nothing(run):
    """`group_up_to_date` (what a re-run's submitter reads, no Deep Lake): no dataset yet, a group not written, a
    shard re-finalized since (new marker), an untagged head or a commit not yet probed all say 'run the writer';
    once the writer has run again the group is up to date, and the other group never stopped being."""
    import deeplake

    from pipeline import dataset_health as health
    from pipeline.atomic import read_json, write_json
    from pipeline.dataset.writer import group_up_to_date, run_layout
    from pipeline.shards import MARKER

    cfg = ingest_config(run, *SETTINGS, "stage.writers=1")
    layout = run_layout(cfg, **QUIET)
    assert [group_up_to_date(cfg, layout, g) for g in range(GROUPS)] == [False, False]
    write_dataset(cfg, group=0, **QUIET)
    assert [group_up_to_date(cfg, layout, g) for g in range(GROUPS)] == [True, False]
    write_dataset(cfg, **QUIET)
    assert [group_up_to_date(cfg, layout, g) for g in range(GROUPS)] == [True, True]
    store = ShardStore(run, "ingest", 2)        # group 1: re-finalized, same rows
    write_json(store.dir / MARKER, {**read_json(store.dir / MARKER), "time": time.time() + 1})
    assert [group_up_to_date(cfg, layout, g) for g in range(GROUPS)] == [True, False]
    assert write_dataset(cfg, group=1, **QUIET)["rows_written"] == 0
    assert group_up_to_date(cfg, layout, 1)
    ds = health.held(deeplake.open(layout.group_url(1)))     # a commit no writer probed (and no tag on it)
    ds.metadata["note"] = "by hand"
    ds.commit("by hand")
    assert not group_up_to_date(cfg, layout, 1) and group_up_to_date(cfg, layout, 0)
    write_dataset(cfg, group=1, **QUIET)         # probes and saves that head, then tags it
    assert group_up_to_date(cfg, layout, 1)
    assert_exactly(run, view_keys(run), range(SHARDS))
