"""Scene graphs: relation rules on hand-made boxes, text form, and the stage on real decoded frames."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.scenegraph import PREDICATES, SceneGraph, SceneObject, relate, to_columns, to_text
from pipeline.scenegraph.relations import backend_class, first_match
from pipeline.scenegraph.serialize import from_columns


def obj(label: str, box, score: float = 0.9) -> SceneObject:
    return SceneObject(label, score, tuple(box))


# (subject, subject box, object, object box, expected predicate); y grows downwards
RULE_CASES = [
    ("person", (0.30, 0.10, 0.60, 0.95), "cup", (0.50, 0.45, 0.56, 0.55), "holding"),
    ("person", (0.40, 0.20, 0.60, 0.75), "horse", (0.30, 0.45, 0.75, 0.95), "riding"),
    ("cup", (0.45, 0.42, 0.52, 0.52), "dining table", (0.20, 0.50, 0.90, 0.95), "on"),
    ("dog", (0.30, 0.40, 0.60, 0.95), "car", (0.20, 0.20, 0.90, 0.70), "in front of"),
    ("car", (0.20, 0.20, 0.90, 0.70), "dog", (0.30, 0.40, 0.60, 0.95), "behind"),
    ("clock", (0.40, 0.05, 0.55, 0.20), "tv", (0.35, 0.40, 0.65, 0.70), "above"),
    ("sports ball", (0.40, 0.80, 0.50, 0.90), "bench", (0.30, 0.30, 0.70, 0.60), "below"),
    ("person", (0.10, 0.20, 0.30, 0.90), "dog", (0.35, 0.50, 0.55, 0.90), "next to"),
]


@pytest.mark.parametrize("sl, s, ol, o, predicate", RULE_CASES, ids=[c[4] for c in RULE_CASES])
def test_each_rule_on_hand_made_boxes(sl, s, ol, o, predicate):
    match = first_match(sl, s, ol, o)
    assert match is not None and match[0] == predicate
    assert 0 < match[1] <= 1
    # the pair as a graph: one relation, subject/object the right way round whatever the detection order
    for objects in ([obj(sl, s), obj(ol, o)], [obj(ol, o), obj(sl, s)]):
        rels = relate(objects)
        assert len(rels) == 1
        r = rels[0]
        if predicate in ("behind", "below"):   # the mirror reads from the smaller box / the person
            continue
        assert (objects[r.subject].label, r.predicate, objects[r.object].label) == (sl, predicate, ol)
        assert r.score == pytest.approx(0.81 * match[1])


def test_every_predicate_has_a_case():
    assert {c[4] for c in RULE_CASES} == set(PREDICATES)


def test_no_relation_for_distant_objects_and_categories_matter():
    assert first_match("cup", (0.0, 0.0, 0.05, 0.05), "car", (0.9, 0.9, 1.0, 1.0)) is None
    # a car inside a person's box is not held: holding needs a hand-held category
    person, car = (0.30, 0.10, 0.60, 0.95), (0.50, 0.45, 0.56, 0.55)
    assert first_match("person", person, "car", car)[0] != "holding"


def test_mirrored_predicates_pick_the_reading_direction():
    # the clock is the smaller box: "clock above tv" rather than "tv below clock"
    rels = relate([obj("tv", (0.35, 0.40, 0.65, 0.70)), obj("clock", (0.40, 0.05, 0.55, 0.20))])
    assert [(r.subject, r.predicate, r.object) for r in rels] == [(1, "above", 0)]


def test_text_and_columns_round_trip():
    objects = [obj("person", (0.30, 0.10, 0.60, 0.95), 0.99), obj("cup", (0.45, 0.42, 0.52, 0.52), 0.9),
               obj("dining table", (0.20, 0.50, 0.90, 0.95), 0.8), obj("person", (0.0, 0.0, 0.05, 0.05), 0.7)]
    graph = SceneGraph(objects, relate(objects))
    text = to_text(graph)
    assert "person 1 holding cup" in text.split("; ")
    assert text.split("; ")[-1] == "person 2"          # unrelated objects are listed bare, at the end
    cols = to_columns(graph)
    assert cols["text"] == text
    assert all(r["subject_label"] == objects[r["subject"]].label for r in cols["relations"])
    back = from_columns(cols)
    assert to_text(back) == text
    assert to_text(SceneGraph()) == ""


def test_backend_lookup():
    assert backend_class("detector_rules").__name__ == "DetectorRulesBackend"
    with pytest.raises(ValueError):
        backend_class("no_such_backend")
    with pytest.raises(TypeError):
        backend_class("pipeline.scenegraph.relations:SceneObject")


@pytest.fixture(scope="module")
def frame_rows(shared_media):
    """Frames rows as the frames stage writes them, decoded here with PyAV from a real video."""
    from pipeline.video import decode_at, encode_jpeg, probe

    info = probe(shared_media / "fades.mp4")
    frames = decode_at(info, [0.25 + 0.75 * i for i in range(12)], backend="pyav")
    return [{"video_id": "fades", "frame_idx": i, "pts": pts, "jpeg": encode_jpeg(im),
             "width": im.shape[1], "height": im.shape[0]} for i, (pts, im) in enumerate(frames)]


def run_stage(rows_by_video: dict, cache_dir: Path, tmp_path: Path, **knobs):
    from pipeline.inference.runner import RunnerConfig
    from pipeline.stages.base import RunContext, WorkItem
    from pipeline.stages.scenegraph import SceneGraphConfig, SceneGraphStage

    cfg = SceneGraphConfig(runner=RunnerConfig(batch_size=2, max_in_flight=4, backend="inline"), **knobs)
    ctx = RunContext(run_dir=tmp_path, shard=0, models="tiny", cache_dir=cache_dir, device="cpu")
    items = [WorkItem(vid, vid, n, {"frames": {"frames": rows}}) for n, (vid, rows) in enumerate(rows_by_video.items())]
    stage = SceneGraphStage(cfg, ctx)
    results = {r.video_id: r for r in stage.process(items)}
    return results, stage.shard_stats()


def test_stage_row_for_every_frame_joins_back(frame_rows, cache_dir, tmp_path):
    import pyarrow as pa

    from pipeline.stages.scenegraph import SCENEGRAPH_SCHEMA

    bad = [dict(frame_rows[0], video_id="bad", jpeg=b"\xff\xd8 not a jpeg")]
    results, stats = run_stage({"fades": frame_rows, "bad": bad, "empty": []}, cache_dir, tmp_path,
                               score_threshold=0.0, max_objects=4, batch_frames=5)
    assert results["fades"].status == "ok"
    rows = results["fades"].rows["scenegraph"]
    table = pa.Table.from_pylist(rows, schema=SCENEGRAPH_SCHEMA)    # the declared schema holds them
    frames_by_key = {(r["video_id"], r["frame_idx"]): r for r in frame_rows}
    assert {(r["video_id"], r["frame_idx"]) for r in table.to_pylist()} == set(frames_by_key)
    for r in rows:
        assert r["pts"] == frames_by_key[(r["video_id"], r["frame_idx"])]["pts"]
        assert 0 < len(r["objects"]) <= 4                             # threshold 0: capped by max_objects
        assert all(0.0 <= v <= 1.0 for o in r["objects"] for v in o["box"])
        assert r["text"]
    assert results["bad"].status == "failed" and results["bad"].reason.startswith("corrupt:")
    assert results["empty"].status == "ok" and results["empty"].note == "no_frames"
    assert stats["runner_batches"] >= 1 and 0 < stats["model_busy_fraction"] <= 1


def test_stage_keeps_frames_without_detections(frame_rows, cache_dir, tmp_path):
    results, _ = run_stage({"fades": frame_rows[:3]}, cache_dir, tmp_path, score_threshold=0.99)
    rows = results["fades"].rows["scenegraph"]
    assert [r["frame_idx"] for r in rows] == [0, 1, 2]
    assert all(r["objects"] == [] and r["relations"] == [] and r["text"] == "" for r in rows)


@pytest.mark.skipif(importlib.util.find_spec("pipeline.stages.frames") is None, reason="frames stage not built yet")
def test_cli_scenegraph_row_for_every_sampled_frame(shared_media, cache_dir, tmp_path):
    """download -> frames -> scenegraph through `python -m pipeline` (local launcher, Ray runner, tiny models)."""
    import pyarrow.parquet as pq
    from conftest import run_cli

    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"fades {shared_media / 'fades.mp4'}\ncounter {shared_media / 'counter.mp4'}\n")
    run_dir = tmp_path / "run"
    for stage in ("download", "frames", "scenegraph"):
        run_cli(f"stage={stage}", "launcher=local", f"run_dir={run_dir}", f"input={manifest}", "models=tiny",
                env={"VPT_CACHE_DIR": str(cache_dir)})
    frames = pq.read_table(run_dir / "frames" / "shard-00000" / "frames.parquet", columns=["video_id", "frame_idx", "pts"])
    graphs = pq.read_table(run_dir / "scenegraph" / "shard-00000" / "scenegraph.parquet")
    frame_keys = {(r["video_id"], r["frame_idx"]): r["pts"] for r in frames.to_pylist()}
    graph_keys = {(r["video_id"], r["frame_idx"]): r["pts"] for r in graphs.to_pylist()}
    assert frame_keys and graph_keys == frame_keys
