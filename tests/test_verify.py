"""The alignment verifier, one violation type per test: each corrupts one thing and the verifier names the row.

Runs are built like tests/test_ingest.py's (`benchmarks.ingest_bench.make_upstream`, same fixtures); the join,
the verifier, the engine and Deep Lake are the real ones.
"""
from __future__ import annotations

from pathlib import Path

import deeplake
import pyarrow as pa
import pytest
from test_ingest import SHARDS, run, speech_video, upstream_template  # noqa: F401  (fixtures)

from benchmarks.ingest_bench import ingest_config, run_ingest_shards
from pipeline.atomic import write_parquet
from pipeline.schema import FLAG_NEAREST, TABLE
from pipeline.shards import ShardStore
from pipeline.stages.audio import plan_spans
from pipeline.stages.ingest import dataset_url, write_dataset
from pipeline.verify import verify_run

FRAME_COLUMNS = ("frame_idx", "frame_pts", "frame_kind", "frame_shot", "frames", "clip", "clip_frame_idx",
                 "clip_pts", "scene_graphs")
QUIET = {"log": lambda s: None}


def rewrite(run: Path, stage: str, shard: int, table: str, edit) -> None:
    """Replace a shard's table by `edit(rows)` (rows as dicts), keeping its schema."""
    store = ShardStore(run, stage, shard)
    t = store.read_table(table)
    write_parquet(store.table_path(table), pa.Table.from_pylist(edit(t.to_pylist()), schema=t.schema))


def ledger(run: Path) -> dict[str, dict]:
    return {r["video_id"]: r for s in range(SHARDS) for r in ShardStore(run, "ingest", s).read_ledger()}


def a_row(run: Path, shard: int, min_frames: int = 2) -> dict:
    """A speech row of the shard with at least `min_frames` frames inside its span (no flags)."""
    return next(r for r in ShardStore(run, "ingest", shard).read_table(TABLE).to_pylist()
                if r["is_speech"] and not r["flags"] and len(r["frame_idx"]) >= min_frames)


def edit_row(run: Path, shard: int, key: tuple[str, int], edit) -> None:
    def apply(rows):
        for r in rows:
            if (r["video_id"], r["segment_idx"]) == key:
                edit(r)
        return rows
    rewrite(run, "ingest", shard, TABLE, apply)


def drop_last_frame(r: dict) -> None:
    """Every modality of the row loses its last frame alike: the row stays self-consistent."""
    for c in FRAME_COLUMNS:
        r[c] = r[c][:-1]


def names_only(violations, key: tuple[str, int | None], what: str) -> None:
    assert violations, "no violation"
    assert {(v.video_id, v.segment_idx) for v in violations} == {key}, violations
    assert any(what in v.what for v in violations), violations


# ------------------------------------------------------------------------------------------------- frames


def test_row_missing_a_frame_of_its_span_is_named(run):
    run_ingest_shards(ingest_config(run))
    row = a_row(run, 0)
    key = (row["video_id"], row["segment_idx"])
    edit_row(run, 0, key, drop_last_frame)
    names_only(verify_run(run, check_dataset=False), key, f"frames missing [{row['frame_idx'][-1]}]")


def test_row_with_a_frame_of_another_span_is_named(run):
    run_ingest_shards(ingest_config(run))
    row = a_row(run, 0)
    key = (row["video_id"], row["segment_idx"])
    stranger = next(r for r in ShardStore(run, "ingest", 0).read_table(TABLE).to_pylist()
                    if r["video_id"] == key[0] and r["segment_idx"] == key[1] + 1)

    def add(r):
        for c in FRAME_COLUMNS:
            r[c] = r[c] + stranger[c][-1:]
    edit_row(run, 0, key, add)
    names_only(verify_run(run, check_dataset=False), key, f"extra [{stranger['frame_idx'][-1]}]")


# ------------------------------------------------------------------------------------------------- counts


def _n_frames_plus_one(run, shard, vid):
    rewrite(run, "frames", shard, "videos",
            lambda rows: [{**r, "n_frames": r["n_frames"] + 1} if r["video_id"] == vid else r for r in rows])
    return "videos.n_frames says"


def _n_segments_minus_one(run, shard, vid):
    rewrite(run, "asr", shard, "videos",
            lambda rows: [{**r, "n_segments": r["n_segments"] - 1} if r["video_id"] == vid else r for r in rows])
    return "videos.n_segments says"


def _duplicated_frame_row(run, shard, vid):
    # the same frame twice: CLIP and scene-graph keys still equal the frames' as sets, one row short each
    def dup(rows):
        k = next(i for i, r in enumerate(rows) if r["video_id"] == vid and r["frame_idx"] == 3)
        return rows[:k + 1] + [rows[k]] + rows[k + 1:]
    rewrite(run, "frames", shard, "frames", dup)
    rewrite(run, "frames", shard, "videos",
            lambda rows: [{**r, "n_frames": r["n_frames"] + 1} if r["video_id"] == vid else r for r in rows])
    return "frames: duplicate frame_idx"


@pytest.mark.parametrize("corrupt", [_n_frames_plus_one, _n_segments_minus_one, _duplicated_frame_row],
                         ids=["frames-n_frames", "asr-n_segments", "duplicated-frame-row"])
def test_counts_against_stage_ledgers(run, corrupt):
    vid = speech_video(run, 1)
    what = corrupt(run, 1, vid)
    run_ingest_shards(ingest_config(run))
    bad = ledger(run)[vid]
    assert bad["status"] == "failed" and what in bad["reason"], bad
    assert all(r["status"] == "ok" for v, r in ledger(run).items() if v != vid)
    violations = verify_run(run, check_dataset=False)
    assert {v.video_id for v in violations} == {vid} and any(what in v.what for v in violations), violations


def test_clip_rows_per_frame_are_counted(run):
    vid = speech_video(run, 1)
    n = sum(r["video_id"] == vid for r in ShardStore(run, "frames", 1).read_table("frames").to_pylist())
    _duplicated_frame_row(run, 1, vid)
    run_ingest_shards(ingest_config(run))
    whats = [v.what for v in verify_run(run, check_dataset=False) if v.video_id == vid]
    for stage in ("clip", "scenegraph"):
        assert f"{stage}: {n} rows for {n + 1} sampled frames" in whats, whats


# ------------------------------------------------------------------------------------------------- prev_text


def test_prev_text_is_checked_when_a_segment_was_dropped(run):
    settings = ("stage.nearest_frame_tolerance_s=0.0", "stage.keep_no_frames=false")
    run_ingest_shards(ingest_config(run, *settings))
    (run / "ingest" / "config.yaml").write_text("stage:\n  nearest_frame_tolerance_s: 0.0\n  keep_no_frames: false\n")
    assert verify_run(run, check_dataset=False) == []
    vid = next(v for v, r in ledger(run).items() if "dropped_no_frames=2" in r["note"])
    shard = next(s for s in range(SHARDS)
                 if any(r["video_id"] == vid for r in ShardStore(run, "ingest", s).read_ledger()))
    texts = {r["segment_idx"]: r["text"] for r in ShardStore(run, "ingest", shard).read_table(TABLE).to_pylist()
             if r["video_id"] == vid}
    assert 2 not in texts
    # what a check from the rows alone would expect: the text of the row before, not of the dropped segment
    edit_row(run, shard, (vid, 3), lambda r: r.update(prev_text=texts[1]))
    names_only(verify_run(run, check_dataset=False), (vid, 3), "prev_text")


# ------------------------------------------------------------------------------------------------- windows


def quiet_video(run: Path, shard: int) -> str:
    return next(r["video_id"] for r in ShardStore(run, "asr", shard).read_table("videos").to_pylist()
                if not r["n_segments"])


def set_windows(run: Path, shard: int, vid: str, spans: list[tuple[int, float, float]]) -> None:
    def edit(rows):
        mine = [r for r in rows if r["video_id"] == vid]
        new = [{**mine[0], "segment_idx": i, "start": a, "end": b, "model_seconds": b - a} for i, a, b in spans]
        return [r for r in rows if r["video_id"] != vid] + new
    rewrite(run, "audio", shard, "audio", edit)


def set_duration(run: Path, shard: int, vid: str, duration: float) -> None:
    rewrite(run, "asr", shard, "videos",
            lambda rows: [{**r, "duration": duration} if r["video_id"] == vid else r for r in rows])


def test_no_speech_windows_are_the_audio_stages(run):
    """The audio stage's decode is 20.99 s (two windows, the sliver joins the last); the ASR's is 21.0 s, which
    would plan three. The join takes the audio stage's windows, so the video is ingested, not refused."""
    shard = 0
    vid = quiet_video(run, shard)
    set_duration(run, shard, vid, 21.0)
    spans = [(s.segment_idx, s.start, s.end) for s in plan_spans([], 20.99, 10.0)]
    assert len(spans) == 2
    set_windows(run, shard, vid, spans)
    run_ingest_shards(ingest_config(run))
    assert ledger(run)[vid]["status"] == "ok", ledger(run)[vid]
    rows = sorted((r["segment_idx"], r["start"], r["end"], r["audio_start"], r["audio_end"])
                  for r in ShardStore(run, "ingest", shard).read_table(TABLE).to_pylist() if r["video_id"] == vid)
    assert rows == [(i, a, b, a, b) for i, a, b in spans]
    assert verify_run(run, check_dataset=False) == []


@pytest.mark.parametrize("case", ["gap", "short-of-the-duration"])
def test_audio_windows_that_do_not_tile_the_video_are_refused(run, case):
    shard = 0
    vid = quiet_video(run, shard)
    if case == "gap":
        set_windows(run, shard, vid, [(0, 0.0, 10.0), (1, 10.5, 20.0), (2, 20.0, 24.0)])
        key, what = (vid, 1), "audio window starts at 10.500"
    else:
        set_duration(run, shard, vid, 30.0)        # the audio stage's windows stop at 24 s
        key, what = (vid, 2), "audio windows end at 24.000"
    run_ingest_shards(ingest_config(run))
    bad = ledger(run)[vid]
    assert bad["status"] == "failed" and what in bad["reason"], bad
    violations = verify_run(run, check_dataset=False)
    assert {v.video_id for v in violations} == {vid}
    assert any(what in v.what and (v.video_id, v.segment_idx) == key for v in violations), violations


# ------------------------------------------------------------------------------------------------- ingest gate


def test_ingest_does_not_commit_a_shard_that_fails_verification(run):
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    store = ShardStore(run, "ingest", 1)
    original = store.read_table(TABLE)
    row = a_row(run, 1)
    key = (row["video_id"], row["segment_idx"])
    edit_row(run, 1, key, drop_last_frame)
    lines = []
    result = write_dataset(cfg, log=lines.append)
    assert result["shards_written"] == [0, 2] and list(result["shards_refused"]) == [1], result
    assert any(f"{key[0]} {key[1]}: frames missing" in v for v in result["shards_refused"][1]), result
    assert any("shard 1 NOT committed" in line and key[0] in line for line in lines), lines
    assert result["tag"] is None and result["dataset_violations"] == []
    ds = deeplake.open_read_only(result["dataset"])
    assert sorted(int(s) for s in ds.metadata["ingested_shards"]) == [0, 2]
    assert 1 not in {int(s) for s in ds["shard"][0:len(ds)]}
    # repaired: committed, checked and tagged on the next write
    write_parquet(store.table_path(TABLE), original)
    again = write_dataset(cfg, **QUIET)
    assert again["shards_written"] == [1] and not again["shards_refused"] and again["tag"]
    assert again["dataset_violations"] == [] and verify_run(run) == []


def test_ingest_commits_a_shard_with_a_refused_video(run):
    """A video ingest refused (its ledger says why) does not hold back the shard's other rows."""
    shard, vid = 1, speech_video(run, 1)
    _n_frames_plus_one(run, shard, vid)
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    result = write_dataset(cfg, **QUIET)
    assert result["shards_written"] == [0, 1, 2] and not result["shards_refused"] and result["tag"]
    assert {v.video_id for v in verify_run(run)} == {vid}


# ------------------------------------------------------------------------------------------------- dataset


def _reverse_clip_keys(ds, i):
    ds["clip_frame_idx"][i] = ds["clip_frame_idx"][i][::-1].copy()
    return "dataset: clip frame_idx"


def _swap_scene_graphs(ds, i):
    frames = ds["scene_graphs"][i].to_dict()["frames"]
    frames[0]["frame_idx"], frames[1]["frame_idx"] = frames[1]["frame_idx"], frames[0]["frame_idx"]
    ds["scene_graphs"][i] = {"frames": frames}
    return "dataset: scene graph frame_idx"


def _shift_frame_keys(ds, i):
    ds["frame_idx"][i] = ds["frame_idx"][i] + 100
    return "dataset: clip frame_idx"


def _drop_a_clip_embedding(ds, i):
    ds["clip"][i] = ds["clip"][i][:-1].copy()
    return "clip embeddings for"


@pytest.mark.parametrize("corrupt", [_reverse_clip_keys, _swap_scene_graphs, _shift_frame_keys,
                                     _drop_a_clip_embedding],
                         ids=["clip-keys", "scene-graph-keys", "frame-keys", "clip-embeddings"])
def test_dataset_check_compares_the_stored_frame_keys(run, corrupt):
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    url = write_dataset(cfg, **QUIET)["dataset"]
    assert verify_run(run) == []
    ds = deeplake.open(url)
    n = len(ds)
    pts = ds["frame_pts"][0:n]
    i = next(k for k in range(n) if len(pts[k]) >= 2)
    key = (str(ds["video_id"][i]), int(ds["segment_idx"][i]))
    what = corrupt(ds, i)
    ds.commit("corrupt one row")
    names_only(verify_run(run), key, what)


def test_dataset_made_before_clip_keys_reads_and_asks_for_a_reingest(run):
    """A dataset without clip_frame_idx (made before it existed): the loader reads it, the writer adds the
    column, and the verifier says its rows need a re-ingest instead of passing them."""
    from pipeline.loader import DeepLakeSource, LoaderConfig
    from pipeline.schema import ROW_SCHEMA, deeplake_columns, to_deeplake_columns
    from pipeline.shards import concat_tables
    from pipeline.stages.ingest import FINGERPRINTS, marker_digest, read_rows

    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    url = dataset_url(cfg.stage, run)
    ds = deeplake.create(url)
    for name, dtype in deeplake_columns().items():
        if name != "clip_frame_idx":
            ds.add_column(name, dtype)
    table = concat_tables(ShardStore(run, "ingest", s).read_table(TABLE) for s in range(SHARDS)).cast(ROW_SCHEMA)
    ds.append({k: v for k, v in to_deeplake_columns(table).items() if k != "clip_frame_idx"})
    ds.metadata["ingested_shards"] = list(range(SHARDS))
    ds.metadata[FINGERPRINTS] = {str(s): {"marker": marker_digest(ShardStore(run, "ingest", s)),
                                          "rows": read_rows(ShardStore(run, "ingest", s))[1],
                                          "num_rows": ShardStore(run, "ingest", s).read_table(TABLE).num_rows}
                                 for s in range(SHARDS)}
    ds.commit("old layout")
    loader = LoaderConfig(batch_size=4, split_fractions=(1.0, 0.0, 0.0), shuffle=False)
    assert sum(len(b["video_id"]) for b in DeepLakeSource(url, loader).batches(0)) == table.num_rows
    result = write_dataset(cfg, **QUIET)
    assert result["commits"] == 0 and result["tag"] is None
    assert any("re-ingest" in v for v in result["dataset_violations"]), result
    assert "clip_frame_idx" in {c.name for c in deeplake.open_read_only(url).schema.columns}
    assert sum(len(b["video_id"]) for b in DeepLakeSource(url, loader).batches(0)) == table.num_rows
    violations = verify_run(run)
    assert [v.video_id for v in violations] == ["dataset"] and "re-ingest" in violations[0].what


def test_nearest_frame_rows_verify_in_the_dataset(run):
    """Rows flagged nearest_frame (one borrowed frame) pass the dataset's key and image-count checks."""
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    url = write_dataset(cfg, **QUIET)["dataset"]
    ds = deeplake.open_read_only(url)
    assert any(FLAG_NEAREST in (f or "") for f in ds["flags"][0:len(ds)])
    assert verify_run(run) == []


@pytest.mark.parametrize("window_s", [0.25, 0.5, 0.8, 1.0, 2.5, 10.0])
def test_the_audio_stages_windows_verify_for_any_window_size(window_s):
    """The audio stage's windows of a video without speech pass the verifier's tiling check for windows shorter
    than a second too, and they cover [0, duration) without a gap (the oracle: their own ends, summed)."""
    from pipeline.join import JoinParams
    from pipeline.verify import Tolerances, check_windows

    for duration in (0.3, 0.9, 1.0, 2.6, 3.2, 7.05, 24.0, 25.3):
        spans = plan_spans([], duration, window_s)
        assert spans[0].start == 0.0 and spans[-1].end == duration
        assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
        inputs = {"asr": {"segments": [], "videos": [{"duration": duration}]},
                  "audio": {"audio": [{"segment_idx": s.segment_idx, "start": s.start, "end": s.end,
                                       "source": s.source} for s in spans]}}
        assert check_windows("v", inputs, JoinParams(), Tolerances()) == [], (window_s, duration, spans)
