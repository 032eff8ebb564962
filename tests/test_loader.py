"""Loader over a real ingested Deep Lake dataset: batch contract, values by key, splits, shuffling, resume, ranks."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from benchmarks.ingest_bench import ingest_config, make_upstream, run_ingest_shards
from pipeline.loader import DeepLakeSource, LoaderConfig, build_source, split_of
from pipeline.schema import TABLE
from pipeline.shards import ShardStore, concat_tables
from pipeline.stages.ingest import write_dataset
from pipeline.train.data import BatchSource

ALL_TRAIN = (1.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, dict]:
    run = make_upstream(tmp_path_factory.mktemp("loader") / "run", n_videos=12, num_shards=2, seed=3)
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    url = write_dataset(cfg, log=lambda s: None)["dataset"]
    rows = concat_tables(ShardStore(run, "ingest", s).read_table(TABLE) for s in range(2)).to_pylist()
    return url, {(r["video_id"], r["segment_idx"]): r for r in rows}


def keys_of(batches) -> list[tuple[str, int]]:
    return [(v, int(i)) for b in batches for v, i in zip(b["video_id"], b["segment_idx"])]


def test_batches_follow_contract_and_equal_source_rows(dataset):
    url, source = dataset
    src = DeepLakeSource(url, LoaderConfig(batch_size=4, max_frames=64, split_fractions=ALL_TRAIN, drop_last=True),
                         "train")
    assert isinstance(src, BatchSource)
    batches = list(src.batches(0))
    assert len(batches) == len(source) // 4
    for b in batches:
        B, F, D = b["clip"].shape
        assert B == 4 and D == 16 and b["audio"].shape == (4, 32)
        assert b["segment_idx"].dtype == torch.long and b["clip"].dtype == torch.float32
        assert b["clip_mask"].dtype == torch.bool and b["clip_mask"].shape == (B, F) == b["frame_time"].shape
        assert b["audio_mask"].dtype == torch.bool and b["audio_mask"].shape == (B,)
        for i, key in enumerate(zip(b["video_id"], b["segment_idx"].tolist())):
            row = source[key]
            n = len(row["frame_idx"])
            assert b["text"][i] == row["text"] and b["prev_text"][i] == row["prev_text"]
            assert b["scene_text"][i] == row["scene_text"] == "; ".join(s["text"] for s in row["scene_graphs"])
            assert int(b["clip_mask"][i].sum()) == n and not b["clip_mask"][i, n:].any()
            want = torch.tensor(np.asarray(row["clip"], np.float16).astype(np.float32)).reshape(n, -1)
            assert torch.equal(b["clip"][i, :n], want) and not b["clip"][i, n:].any()
            assert torch.allclose(b["frame_time"][i, :n],
                                  torch.tensor([p - row["start"] for p in row["frame_pts"]], dtype=torch.float32))
            assert bool(b["audio_mask"][i]) == row["has_audio"]
            assert torch.equal(b["audio"][i], torch.tensor(np.asarray(row["audio"], np.float16).astype(np.float32)))
    few = next(DeepLakeSource(url, LoaderConfig(batch_size=8, max_frames=2, split_fractions=ALL_TRAIN)).batches(0))
    assert few["clip"].shape[1] <= 2 and (few["frame_time"][:, 1] >= few["frame_time"][:, 0]).all()


def test_last_partial_batch_unless_drop_last(dataset):
    url, source = dataset
    bs = len(source) - 1 if len(source) % 2 == 0 else len(source) - 2   # one full batch + a remainder
    keep = list(DeepLakeSource(url, LoaderConfig(batch_size=bs, split_fractions=ALL_TRAIN)).batches(0))
    assert [len(b["video_id"]) for b in keep] == [bs, len(source) - bs]
    assert sorted(keys_of(keep)) == sorted(source)                 # every row exactly once
    drop = list(DeepLakeSource(url, LoaderConfig(batch_size=bs, split_fractions=ALL_TRAIN, drop_last=True)).batches(0))
    assert [len(b["video_id"]) for b in drop] == [bs]
    tiny = DeepLakeSource(url, LoaderConfig(batch_size=len(source) + 5, split_fractions=ALL_TRAIN))
    assert tiny.steps_per_epoch() == 1    # a split smaller than one batch still trains


def test_splits_never_share_a_video(dataset):
    url, source = dataset
    fractions = (0.5, 0.25, 0.25)
    seen = {}
    for split in ("train", "val", "test"):
        src = DeepLakeSource(url, LoaderConfig(batch_size=1, split_fractions=fractions, shuffle=False), split)
        seen[split] = keys_of(src.batches(0))
        assert {split_of(v, fractions) for v, _ in seen[split]} <= {split}
    videos = {s: {v for v, _ in k} for s, k in seen.items()}
    assert all(videos[s] for s in videos)                      # 12 videos: each split gets some
    assert not (videos["train"] & videos["val"]) and not (videos["train"] & videos["test"]) \
        and not (videos["val"] & videos["test"])
    every = seen["train"] + seen["val"] + seen["test"]
    assert sorted(every) == sorted(source)                      # batch 1: every row exactly once
    assert split_of("vid0001", fractions) == split_of("vid0001", fractions)


def test_shuffle_is_deterministic_per_seed_and_epoch(dataset):
    url, source = dataset
    cfg = LoaderConfig(batch_size=1, split_fractions=ALL_TRAIN, block_rows=4, shuffle_buffer_rows=16, seed=7)
    a, b = DeepLakeSource(url, cfg), DeepLakeSource(url, cfg)
    e0, e0_again, e1 = keys_of(a.batches(0)), keys_of(b.batches(0)), keys_of(a.batches(1))
    assert e0 == e0_again and e0 != e1
    assert sorted(e0) == sorted(e1) == sorted(source)
    sequential = keys_of(DeepLakeSource(url, LoaderConfig(batch_size=1, split_fractions=ALL_TRAIN,
                                                          shuffle=False)).batches(0))
    assert e0 != sequential and sorted(sequential) == sorted(source)


def test_resume_yields_exactly_the_remaining_batches(dataset):
    url, _ = dataset
    cfg = LoaderConfig(batch_size=3, split_fractions=ALL_TRAIN, block_rows=4, shuffle_buffer_rows=8, seed=1)
    full = DeepLakeSource(url, cfg)
    reference = list(full.batches(2))
    first = DeepLakeSource(url, cfg)
    it = first.batches(2)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    assert (state["epoch"], state["step"]) == (2, 5)
    resumed = DeepLakeSource(url, cfg)
    resumed.load_state_dict(state)
    rest = list(resumed.resume())
    assert keys_of(rest) == keys_of(reference[5:])
    assert all(torch.equal(x["clip"], y["clip"]) for x, y in zip(rest, reference[5:]))
    other = DeepLakeSource(url, LoaderConfig(batch_size=3, split_fractions=ALL_TRAIN, seed=2))
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_with_equal_batch_counts(dataset, world_size):
    url, source = dataset
    cfg = LoaderConfig(batch_size=2, split_fractions=ALL_TRAIN, block_rows=4, shuffle_buffer_rows=8)
    per_rank = [keys_of(DeepLakeSource(url, cfg, rank=r, world_size=world_size).batches(1))
                for r in range(world_size)]
    assert len({len(k) for k in per_rank}) == 1 and per_rank[0]
    flat = [k for ks in per_rank for k in ks]
    assert len(flat) == len(set(flat)) and set(flat) <= set(source)


def test_build_source_factory(dataset):
    url, _ = dataset
    src = build_source({"source": "pipeline.loader:build_source", "batch_size": 2, "path": url,
                        "loader": {"split_fractions": [1, 0, 0], "max_frames": 4}}, split="train", rank=0,
                       world_size=1)
    batch = next(src.batches(0))
    assert len(batch["video_id"]) == 2 and batch["clip"].shape[1] <= 4


def test_row_with_fewer_clip_embeddings_than_frames_is_an_error(dataset, tmp_path):
    """CLIP rows are paired with frame times by position: a row whose counts differ is refused, not truncated."""
    import pyarrow as pa

    from pipeline.schema import ROW_SCHEMA, to_deeplake_columns
    from pipeline.stages.ingest import open_or_create

    _, source = dataset
    rows = sorted(source.values(), key=lambda r: (r["video_id"], r["segment_idx"]))[:6]
    bad = next(r for r in rows if len(r["frame_idx"]) >= 2)
    bad = {**bad, "clip": bad["clip"][:-1], "clip_frame_idx": bad["clip_frame_idx"][:-1]}
    rows = [bad if (r["video_id"], r["segment_idx"]) == (bad["video_id"], bad["segment_idx"]) else r for r in rows]
    url = f"file://{tmp_path / 'bad'}"
    ds = open_or_create(url)
    ds.append(to_deeplake_columns(pa.Table.from_pylist(rows, schema=ROW_SCHEMA)))
    ds.commit("one misaligned row")
    src = DeepLakeSource(url, LoaderConfig(batch_size=len(rows), split_fractions=ALL_TRAIN, shuffle=False))
    n = len(bad["frame_idx"])
    with pytest.raises(ValueError, match=rf"\('{bad['video_id']}', {bad['segment_idx']}\): {n - 1} CLIP embeddings "
                                         rf"for {n} frames"):
        next(src.batches(0))
