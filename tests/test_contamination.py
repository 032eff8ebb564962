"""Perceptual-hash contamination check: real duplicates are found, different images are not matched; a VQA run
reports its eval images found among the pretraining frames in metrics.json."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.eval.contamination import (
    contamination_report,
    dhash,
    find_near_duplicates,
    hamming,
    image_hashes,
    iter_parquet_frames,
    phash,
)
from pipeline.eval.synthetic_vqa import make_synthetic_vqa


def _jpeg(image: Image.Image, quality: int = 90, size: tuple[int, int] | None = None) -> bytes:
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """80 different synthetic images (shapes of all kinds, single and several per image)."""
    synthetic = make_synthetic_vqa(tmp_path_factory.mktemp("contamination"), n_images=80, seed=11,
                                   question_types=["color", "shape", "count"])
    return {image_id: Image.open(synthetic.image_dir / f"{image_id}.png").convert("RGB") for image_id in range(1, 81)}


def test_hash_basics(images):
    image = images[1]
    assert phash(image) == phash(image.copy()) and dhash(image) == dhash(image.copy())
    assert phash(image).dtype == np.uint64
    assert image_hashes(_jpeg(image)) == (phash(Image.open(io.BytesIO(_jpeg(image)))),
                                          dhash(Image.open(io.BytesIO(_jpeg(image)))))
    assert hamming(np.uint64(0), np.uint64(2**64 - 1)) == 64
    assert list(hamming(np.array([0b1011], dtype=np.uint64), np.array([0, 1], dtype=np.uint64))) == [3, 2]
    # A left-right mirror is a different picture to these hashes
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert hamming(phash(image), phash(mirrored)) > 8


def test_finds_exact_and_degraded_duplicates_and_nothing_else(images):
    eval_images = {f"eval-{i}": images[i] for i in range(1, 41)}
    # Frames: 40 other images, plus an exact copy of eval-3 and a resized (16:9, 4x) recompressed eval-7
    frames = [(("video-other", i), _jpeg(images[i])) for i in range(41, 81)]
    frames.append((("video-a", 0), _jpeg(images[3], quality=95)))
    frames.append((("video-b", 5), _jpeg(images[7], quality=60, size=(384, 216))))
    frames.append((("video-c", 1), _jpeg(images[7], quality=40, size=(48, 48))))

    matches = find_near_duplicates(eval_images, frames, max_hamming=8, batch_size=16)
    found = {(eval_id, key) for eval_id, key, _ in matches}
    assert found == {("eval-3", ("video-a", 0)), ("eval-7", ("video-b", 5)), ("eval-7", ("video-c", 1))}
    distances = {key: distance for _, key, distance in matches}
    assert distances[("video-a", 0)] <= 2
    assert [d for _, _, d in matches] == sorted(d for _, _, d in matches)


def test_no_false_positive_among_different_images(images):
    eval_images = {i: images[i] for i in range(1, 41)}
    frames = [(i, _jpeg(images[i])) for i in range(41, 81)]
    assert find_near_duplicates(eval_images, frames, max_hamming=8) == []
    # Why the default asks both hashes: on pHash alone, two flat images with a same-coloured square at the
    # same place (30 and 46) collide; their dHashes (which see the background shading) differ by far more.
    phash_only = find_near_duplicates(eval_images, frames, max_hamming=8, method="phash")
    assert (30, 46) in {(eval_id, key) for eval_id, key, _ in phash_only}
    assert hamming(dhash(images[30]), dhash(images[46])) > 16


def test_report_reads_frames_parquet_and_skips_corrupt_frames(images, tmp_path):
    shard = tmp_path / "run" / "frames" / "shard-00000"
    shard.mkdir(parents=True)
    rows = {"video_id": [], "frame_idx": [], "jpeg": [], "t": []}
    for frame_idx, image_id in enumerate([50, 51, 2, 52, 9]):
        rows["video_id"].append("vid1")
        rows["frame_idx"].append(frame_idx)
        rows["jpeg"].append(_jpeg(images[image_id], size=(160, 90)))
        rows["t"].append(frame_idx * 0.5)
    rows["video_id"].append("vid2")
    rows["frame_idx"].append(0)
    rows["jpeg"].append(b"not a jpeg")
    rows["t"].append(0.0)
    pq.write_table(pa.table(rows), shard / "frames.parquet")

    frames = list(iter_parquet_frames(tmp_path / "run", batch_rows=2))
    assert [key for key, _ in frames][:2] == [("vid1", 0), ("vid1", 1)] and len(frames) == 6

    eval_images = {i: images[i] for i in range(1, 11)}
    report = contamination_report(eval_images, iter_parquet_frames(tmp_path / "run"), max_hamming=8)
    assert report["n_eval_images"] == 10 and report["n_frames"] == 6
    assert report["n_contaminated_eval_images"] == 2 and report["contaminated_fraction"] == 0.2
    assert {(p["eval_id"], p["frame_key"]) for p in report["pairs"]} == {(2, ("vid1", 2)), (9, ("vid1", 4))}
    assert report["n_pairs"] == 2 and report["n_videos"] == 1
    assert sum(report["distance_histogram"].values()) == 2


def test_eval_images_given_as_paths(images, tmp_path):
    path = tmp_path / "eval.jpg"
    images[4].save(path, quality=90)
    matches = find_near_duplicates({"e": path}, [("k", _jpeg(images[4], size=(200, 200)))], max_hamming=8)
    assert [(eval_id, key) for eval_id, key, _ in matches] == [("e", "k")]
    with pytest.raises(ValueError):
        find_near_duplicates({"e": path}, [], method="sha")


# ------------------------------------------------------------------------------------------ in the VQA run


def _frames_parquet(path, jpegs: list[tuple[str, int, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"video_id": [v for v, _, _ in jpegs], "frame_idx": [i for _, i, _ in jpegs],
                             "jpeg": [j for _, _, j in jpegs]}), path)


def test_vqa_run_finds_the_pretraining_frames(tmp_path):
    from pipeline.eval.vqa_finetune import contamination_frames

    run = tmp_path / "r1" / "pretrain"
    step = run / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text('{"step": 4}')
    cfg = {"vqa": {"contamination": {"frames": "auto"}}}
    for init_from in (run, run / "checkpoints", step):          # a run dir, a checkpoint root, a step dir
        assert contamination_frames(cfg | {"init_from": str(init_from)})[0] is None    # no frames yet
    _frames_parquet(tmp_path / "r1" / "frames" / "shard-00000" / "frames.parquet", [("v", 0, b"x")])
    for init_from in (run, run / "checkpoints", step):          # a pipeline run: <run>/pretrain beside <run>/frames
        assert contamination_frames(cfg | {"init_from": str(init_from)})[0] == tmp_path / "r1" / "frames"
    _frames_parquet(run / "frames" / "shard-00000" / "frames.parquet", [("v", 0, b"x")])
    assert contamination_frames(cfg | {"init_from": str(step)})[0] == run / "frames"    # the run's own first
    assert contamination_frames(cfg | {"init_from": None})[0] is None
    assert contamination_frames({"vqa": {"contamination": {"frames": "none"}}, "init_from": str(run)})[0] is None
    explicit = {"vqa": {"contamination": {"frames": str(tmp_path / "r1" / "frames")}}, "init_from": None}
    assert contamination_frames(explicit)[0] == tmp_path / "r1" / "frames"
    with pytest.raises(FileNotFoundError, match="no frames.parquet"):
        contamination_frames({"vqa": {"contamination": {"frames": str(tmp_path / "nothing")}}, "init_from": None})


def test_vqa_metrics_report_eval_images_seen_in_pretraining_frames(tmp_path, cache_dir):
    """A pipeline run (r1/frames, r1/pretrain) whose frames hold two of the VQA eval images (resized to 16:9 and
    recompressed) and three training images: metrics.json names exactly those two eval images."""
    from pipeline.eval.vqa_data import load_vqa, split_examples
    from test_vqa_finetune import run_module

    data = make_synthetic_vqa(tmp_path / "data", n_images=30, seed=0)
    train, evaluation = split_examples(load_vqa(data.questions_json, data.annotations_json, data.image_dir), 0.2, 0)
    eval_ids = sorted({e.image_id for e in evaluation})
    seen, train_ids = eval_ids[:2], sorted({e.image_id for e in train})[:3]
    image = lambda i: Image.open(data.image_dir / f"{i}.png").convert("RGB")   # noqa: E731
    _frames_parquet(tmp_path / "r1" / "frames" / "shard-00000" / "frames.parquet",
                    [("vidA", k, _jpeg(image(i), quality=80, size=(320, 180))) for k, i in enumerate(seen + train_ids)]
                    + [("vidB", 0, b"not a jpeg")])
    pretrain = tmp_path / "r1" / "pretrain"
    run_module("pipeline.train", [f"run_dir={pretrain}", "train.max_steps=2", "checkpoint.every=2",
                                  "train.eval_every=0", "data.batch_size=4"], cache_dir)
    vqa = tmp_path / "r1" / "vqa"
    r = run_module("pipeline.eval.vqa_finetune", [
        f"run_dir={vqa}", f"init_from={pretrain}", f"dataset={data.root}", "models=tiny", "train.max_steps=2",
        "train.eval_every=0", "checkpoint.every=2"], cache_dir)
    report = json.loads((vqa / "vqa" / "metrics.json").read_text())["contamination"]
    assert report["checked"] and report["frames"] == str(tmp_path / "r1" / "frames")
    assert report["n_eval_images"] == len(eval_ids) and report["n_frames"] == 6
    assert report["contaminated_eval_ids"] == seen and report["n_contaminated_eval_images"] == 2
    assert {p["eval_id"] for p in report["pairs"]} == set(seen)
    assert {tuple(p["frame_key"]) for p in report["pairs"]} == {("vidA", 0), ("vidA", 1)}
    assert report["n_eval_questions_affected"] == sum(e.image_id in seen for e in evaluation)
    assert report["accuracy_without_contaminated"] is not None
    assert f"contamination: 2 of {len(eval_ids)} eval images" in r.stdout
