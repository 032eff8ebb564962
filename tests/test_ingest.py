"""Ingest: keyed join, the alignment verifier refusing misaligned videos, and the crash-safe Deep Lake writer.

Upstream outputs are built in the engine's own shard layout (`benchmarks.ingest_bench.make_upstream`); the join,
the verifier, the engine and Deep Lake are the real ones.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import deeplake
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import REPO, run_cli

from benchmarks.ingest_bench import ingest_config, make_upstream, run_ingest_shards
from pipeline.atomic import write_parquet
from pipeline.join import JoinParams, windows
from pipeline.schema import FLAG_NEAREST, TABLE
from pipeline.shards import ShardStore, concat_tables
from pipeline.stages.ingest import dataset_url, write_dataset
from pipeline.verify import verify_run

SHARDS = 3


@pytest.fixture(scope="module")
def upstream_template(tmp_path_factory) -> Path:
    return make_upstream(tmp_path_factory.mktemp("upstream") / "run", n_videos=9, num_shards=SHARDS)


@pytest.fixture
def run(upstream_template, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(upstream_template, dst)
    return dst


def all_rows(run: Path, columns: list[str] | None = None) -> pa.Table:
    tables = [ShardStore(run, "ingest", s).read_table(TABLE) for s in range(SHARDS)]
    t = concat_tables(tables)
    return t.select(columns) if columns else t


def upstream_table(run: Path, stage: str, table: str) -> tuple[int, pa.Table]:
    """(shard, table) of the first shard whose upstream table has a speech video."""
    for s in range(SHARDS):
        t = ShardStore(run, stage, s).read_table(table)
        if t is not None and t.num_rows:
            return s, t
    raise AssertionError("no upstream rows")


def speech_video(run: Path, shard: int) -> str:
    seg = ShardStore(run, "asr", shard).read_table("segments")
    return sorted(set(seg.column("video_id").to_pylist()))[0]


def test_join_rows_are_keyed_and_verified(run):
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    ledger = [r for s in range(SHARDS) for r in ShardStore(run, "ingest", s).read_ledger()]
    assert len(ledger) == 9 and all(r["status"] == "ok" for r in ledger), ledger
    rows = all_rows(run).to_pylist()
    asr = concat_tables(ShardStore(run, "asr", s).read_table("segments") for s in range(SHARDS)).to_pylist()
    asr_keys = {(r["video_id"], r["segment_idx"]): r for r in asr}
    speech = [r for r in rows if r["is_speech"]]
    assert {(r["video_id"], r["segment_idx"]) for r in speech} == set(asr_keys)
    for r in speech:
        src = asr_keys[(r["video_id"], r["segment_idx"])]
        assert (r["start"], r["end"], r["text"]) == (src["start"], src["end"], src["text"])
        assert (r["audio_start"], r["audio_end"]) == (r["start"], r["end"])
        if FLAG_NEAREST not in r["flags"]:
            assert r["frame_pts"] and all(r["start"] - 0.001 <= p < r["end"] for p in r["frame_pts"])
        assert r["clip_frame_idx"] == r["frame_idx"] and [s["frame_idx"] for s in r["scene_graphs"]] == r["frame_idx"]
        assert len(r["clip"]) == len(r["frames"]) == len(r["frame_idx"])
        prev = asr_keys.get((r["video_id"], r["segment_idx"] - 1))
        assert r["prev_text"] == (prev["text"] if prev else "") and r["prev_text"] != r["text"]
    # the short segment between two frames borrows the nearest one
    assert any(FLAG_NEAREST in r["flags"] and len(r["frame_idx"]) == 1 for r in speech)
    # videos without speech: windows over the duration, keyed 0.., matching the audio stage's spans
    quiet = sorted({r["video_id"] for r in rows if not r["is_speech"]})
    assert quiet
    for vid in quiet:
        mine = sorted((r for r in rows if r["video_id"] == vid), key=lambda r: r["segment_idx"])
        assert [(r["segment_idx"], r["start"], r["end"]) for r in mine] == windows(24.0, 10.0)
        assert all(r["text"] == "" and r["prev_text"] == "" and r["has_audio"] for r in mine)
    prov = rows[0]["provenance"]
    assert '"config_hash": "clip-cfg"' in prov and "ViT-B-32/tiny" in prov
    assert verify_run(run) == []


def test_join_does_not_depend_on_upstream_row_order(upstream_template, tmp_path):
    """Every upstream table's rows shuffled (keys intact): the joined rows are exactly the unshuffled join."""
    import numpy as np

    from pipeline.stages.ingest import IngestStage

    plain, shuffled = tmp_path / "plain", tmp_path / "shuffled"
    shutil.copytree(upstream_template, plain)
    shutil.copytree(upstream_template, shuffled)
    rng = np.random.default_rng(7)
    moved = 0
    for stage, tables in IngestStage.upstream.items():
        for name in tables:
            for s in range(SHARDS):
                store = ShardStore(shuffled, stage, s)
                t = store.read_table(name)
                if t is None or t.num_rows < 2:
                    continue
                order = rng.permutation(t.num_rows)
                moved += int((order != np.arange(t.num_rows)).sum())
                write_parquet(store.table_path(name), t.take(pa.array(order)))
    assert moved
    run_ingest_shards(ingest_config(plain))
    run_ingest_shards(ingest_config(shuffled))
    want, got = all_rows(plain).to_pylist(), all_rows(shuffled).to_pylist()
    assert len(got) == len(want) > 0
    assert got == want
    assert verify_run(shuffled, check_dataset=False) == []


def test_scenegraph_backend_must_return_one_graph_per_frame():
    """Graphs are paired with frames by position: a backend returning a different count is refused."""
    import numpy as np

    from pipeline.scenegraph.relations import SceneGraph
    from pipeline.stages.scenegraph import SceneGraphModel

    class Backend:
        def __init__(self, short: bool):
            self.short = short

        def predict_frames(self, images):
            return [SceneGraph() for _ in images[: len(images) - self.short]]

    images = [np.zeros((4, 4, 3), np.uint8)] * 3
    payloads = [{"frames": [(0, 0.25), (1, 1.25)], "images": images[:2]},
                {"frames": [(0, 0.25)], "images": images[2:]}]
    model = SceneGraphModel.__new__(SceneGraphModel)     # skip loading a real backend
    model.backend = Backend(short=False)
    assert [len(out["graphs"]) for out in model.predict(payloads)] == [2, 1]
    model.backend = Backend(short=True)
    with pytest.raises(RuntimeError, match="returned 2 graphs for 3 frames"):
        model.predict(payloads)


def _shuffle_audio(run):
    shard, t = upstream_table(run, "audio", "audio")
    vid = speech_video(run, shard)
    mask = pc.equal(t.column("video_id"), vid)
    idx = t.column("segment_idx").to_pylist()
    mine = [i for i, m in enumerate(mask.to_pylist()) if m]
    rolled = idx[:]
    for a, b in zip(mine, mine[1:] + mine[:1]):     # segment_idx rotated within the video: spans now disagree
        rolled[a] = idx[b]
    t = t.set_column(t.schema.get_field_index("segment_idx"), "segment_idx", pa.array(rolled, pa.int64()))
    write_parquet(ShardStore(run, "audio", shard).table_path("audio"), t)
    return vid, "audio span"


def _drop_clip(run):
    shard, t = upstream_table(run, "clip", "clip")
    vid = speech_video(run, shard)
    rows = t.to_pylist()
    victim = next(i for i, r in enumerate(rows) if r["video_id"] == vid and r["frame_idx"] == 4)
    write_parquet(ShardStore(run, "clip", shard).table_path("clip"), pa.concat_tables([t.slice(0, victim),
                                                                                      t.slice(victim + 1)]))
    return vid, "clip frame_idx"


def _shuffle_scenegraph(run):
    shard, t = upstream_table(run, "scenegraph", "scenegraph")
    vid = speech_video(run, shard)
    fidx = t.column("frame_idx").to_pylist()
    vids = t.column("video_id").to_pylist()
    mine = [i for i, v in enumerate(vids) if v == vid]
    for a, b in zip(mine[::2], mine[1::2]):          # neighbours swap frame_idx: paired with the wrong footage
        fidx[a], fidx[b] = fidx[b], fidx[a]
    t = t.set_column(t.schema.get_field_index("frame_idx"), "frame_idx", pa.array(fidx, t.schema.field("frame_idx").type))
    write_parquet(ShardStore(run, "scenegraph", shard).table_path("scenegraph"), t)
    return vid, "scene graph pts"


def _drop_audio(run):
    shard, t = upstream_table(run, "audio", "audio")
    vid = speech_video(run, shard)
    rows = t.to_pylist()
    victim = next(i for i, r in enumerate(rows) if r["video_id"] == vid and r["segment_idx"] == 1)
    write_parquet(ShardStore(run, "audio", shard).table_path("audio"), pa.concat_tables([t.slice(0, victim),
                                                                                        t.slice(victim + 1)]))
    return vid, "no audio row", 1


def _drop_scenegraph(run):
    shard, t = upstream_table(run, "scenegraph", "scenegraph")
    vid = speech_video(run, shard)
    segments = [r for r in ShardStore(run, "asr", shard).read_table("segments").to_pylist() if r["video_id"] == vid]
    rows = t.to_pylist()
    # a frame inside a speech segment, so that segment's row is the one named
    victim, seg = next((i, s["segment_idx"]) for s in segments for i, r in enumerate(rows)
                       if r["video_id"] == vid and s["start"] <= r["pts"] < s["end"])
    write_parquet(ShardStore(run, "scenegraph", shard).table_path("scenegraph"),
                  pa.concat_tables([t.slice(0, victim), t.slice(victim + 1)]))
    return vid, "scene graph frame_idx", seg


@pytest.mark.parametrize("corrupt", [_shuffle_audio, _drop_clip, _shuffle_scenegraph, _drop_audio, _drop_scenegraph],
                         ids=["shuffled-audio", "dropped-clip-row", "shuffled-scenegraph", "dropped-audio-row",
                              "dropped-scenegraph-row"])
def test_verifier_names_bad_rows_and_ingest_refuses(run, corrupt):
    vid, what, *segment = corrupt(run)       # segment: the row the verifier must name, where the test knows it
    run_ingest_shards(ingest_config(run))
    ledger = {r["video_id"]: r for s in range(SHARDS) for r in ShardStore(run, "ingest", s).read_ledger()}
    bad = ledger[vid]
    assert bad["status"] == "failed" and bad["reason"].startswith("misaligned: ") and vid in bad["reason"]
    assert what in bad["reason"], bad["reason"]
    assert all(r["status"] == "ok" for v, r in ledger.items() if v != vid)
    rows = all_rows(run, ["video_id"]).column("video_id").to_pylist()
    assert vid not in rows and len(set(rows)) == 8              # refused: none of its rows written
    violations = verify_run(run, check_dataset=False)
    assert violations and {v.video_id for v in violations} == {vid}
    assert any(what in v.what and v.segment_idx is not None for v in violations), violations
    if segment:
        assert any(what in v.what and v.segment_idx == segment[0] for v in violations), violations
    # the CLI exits non-zero and lists (video_id segment_idx: what)
    proc = run_cli(f"run_dir={run}", "dataset=false", module="pipeline.verify", check=False)
    assert proc.returncode == 1 and vid in proc.stdout, proc.stdout + proc.stderr


def dataset_keys(url: str) -> list[tuple[str, int]]:
    ds = deeplake.open_read_only(url)
    n = len(ds)
    return list(zip(ds["video_id"][0:n], [int(x) for x in ds["segment_idx"][0:n]])) if n else []


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    from benchmarks.ingest_bench import ingest_config
    from pipeline.stages.ingest import write_dataset
    cfg = ingest_config({run!r}, "stage.shards_per_commit=1", "stage.append_batch_rows=4")
    def die(shard):
        if shard == 1:          # shard 0 is committed, shard 1 appended but not committed
            os.kill(os.getpid(), 9)
    write_dataset(cfg, after_append=die)
""")


def test_kill9_during_write_then_rerun_has_every_row_once(run):
    cfg = ingest_config(run, "stage.shards_per_commit=1", "stage.append_batch_rows=4")
    run_ingest_shards(cfg)
    url = dataset_url(cfg.stage, run)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(repo=str(REPO), run=str(run))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    shard0 = {(r["video_id"], r["segment_idx"]) for r in
              ShardStore(run, "ingest", 0).read_table(TABLE).select(["video_id", "segment_idx"]).to_pylist()}
    after_crash = dataset_keys(url)
    assert sorted(after_crash) == sorted(shard0)                  # exactly the committed shard
    crashed = deeplake.open_read_only(url)
    assert list(crashed.metadata["ingested_shards"]) == [0]
    del crashed
    result = write_dataset(cfg, log=lambda s: None)
    assert result["shards_written"] == [1, 2] and result["tag"]
    keys = dataset_keys(url)
    expected = all_rows(run, ["video_id", "segment_idx"]).to_pylist()
    assert len(keys) == len(set(keys)) == len(expected)
    assert set(keys) == {(r["video_id"], r["segment_idx"]) for r in expected}
    again = write_dataset(cfg, log=lambda s: None)             # nothing left: no duplicates, no new tag
    assert again["shards_written"] == [] and again["rows"] == len(expected) and again["tag"] is None
    ds = deeplake.open_read_only(url)
    assert list(ds.tags.names()) == [result["tag"]]
    assert [h.message for h in ds.history][-2:] == ["ingest shards [1]", "ingest shards [2]"]
    assert verify_run(run) == []


READER_SCRIPT = textwrap.dedent("""
    import json, os, sys, deeplake
    ds = deeplake.open_read_only(sys.argv[1])
    print(json.dumps([len(ds), sorted(int(s) for s in ds.metadata["ingested_shards"])]), flush=True)
    os._exit(0)
""")


def test_reader_during_ingest_sees_only_committed_rows(run):
    cfg = ingest_config(run, "stage.shards_per_commit=1")
    run_ingest_shards(cfg)
    url = dataset_url(cfg.stage, run)
    sizes = [ShardStore(run, "ingest", s).read_table(TABLE).num_rows for s in range(SHARDS)]
    seen = []

    def open_reader(shard: int) -> None:     # called after the shard's rows are appended, before its commit
        # The reader is another process, as readers are (and fewer Deep Lake handles live in the test process:
        # Deep Lake 4.7's native object teardown aborts a process now and then, "double free detected in tcache 2")
        proc = subprocess.run([sys.executable, "-c", READER_SCRIPT, url], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        n, shards = json.loads(proc.stdout.strip().splitlines()[-1])
        seen.append((shard, n, shards))

    write_dataset(cfg, log=lambda s: None, after_append=open_reader)
    assert seen == [(s, sum(sizes[:s]), list(range(s))) for s in range(SHARDS)]
    assert len(deeplake.open_read_only(url)) == sum(sizes)


def test_ingest_cli_joins_writes_and_tags(run):
    proc = run_cli("stage=ingest", f"run_dir={run}", "launcher=local", "models=tiny", timeout=300)
    url = dataset_url({"dataset_path": None}, run)
    ds = deeplake.open_read_only(url)
    assert len(ds) == all_rows(run, ["video_id"]).num_rows > 0
    assert sorted(int(s) for s in ds.metadata["ingested_shards"]) == list(range(SHARDS))
    assert len(list(ds.tags.names())) == 1, proc.stdout
    assert run_cli(f"run_dir={run}", module="pipeline.verify", check=False).returncode == 0
    # frames are the frames stage's JPEGs, decoded by Deep Lake
    assert ds["frames"][0][0].shape == (16, 16, 3)


def test_keep_no_frames_false_drops_and_records(run):
    cfg = ingest_config(run, "stage.nearest_frame_tolerance_s=0.0", "stage.keep_no_frames=false")
    run_ingest_shards(cfg)
    ledger = [r for s in range(SHARDS) for r in ShardStore(run, "ingest", s).read_ledger()]
    assert all(r["status"] == "ok" for r in ledger)
    dropped = [r for r in ledger if "dropped_no_frames=2" in r["note"]]
    assert dropped
    keys = {(r["video_id"], r["segment_idx"]) for r in all_rows(run, ["video_id", "segment_idx"]).to_pylist()}
    assert all((r["video_id"], 2) not in keys for r in dropped)
    (run / "ingest").mkdir(exist_ok=True)
    (run / "ingest" / "config.yaml").write_text("stage:\n  nearest_frame_tolerance_s: 0.0\n  keep_no_frames: false\n")
    assert verify_run(run, check_dataset=False) == []


def test_join_params_match_config():
    params = JoinParams.from_config({"window_s": 5, "keep_no_speech": False, "frame_tolerance_s": 0.01,
                                     "nearest_frame_tolerance_s": 1, "keep_no_frames": True, "prev_segments": 2})
    assert params.window_s == 5.0 and params.prev_segments == 2 and not params.keep_no_speech
    assert windows(20.5, 10.0) == [(0, 0.0, 10.0), (1, 10.0, 20.5)]      # a sliver joins the last window
