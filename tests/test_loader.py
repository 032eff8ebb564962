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
    """The row keys of the real samples (sample_mask True) of `batches`, in order."""
    return [(v, int(i)) for b in batches for v, i, m in zip(b["video_id"], b["segment_idx"], b["sample_mask"]) if m]


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


# ---------------------------------------------------------------------------------------------- every row once

UNEVEN = (0.5, 0.3, 0.2)


def split_keys(source: dict, fractions) -> dict[str, set]:
    """The oracle: each row's split from sha1 of its video id (rows of this dataset have no content id)."""
    out = {s: set() for s in ("train", "val", "test")}
    for key in source:
        out[split_of(key[0], fractions)].add(key)
    return out


def one_epoch(url, cfg, split, world_size, epoch=1, stop_at=None):
    """Every rank's batches of `epoch`; with `stop_at`, each rank stops after that many steps, is checkpointed
    (state_dict), and a fresh source resumes it (load_state_dict + resume) to the end of the epoch."""
    per_rank = []
    for rank in range(world_size):
        src = DeepLakeSource(url, cfg, split, rank=rank, world_size=world_size)
        if stop_at is None:
            per_rank.append(list(src.batches(epoch)))
            continue
        it = src.batches(epoch)
        head = [next(it) for _ in range(stop_at)]
        state = src.state_dict()
        resumed = DeepLakeSource(url, cfg, split, rank=rank, world_size=world_size)
        resumed.load_state_dict(state)
        per_rank.append(head + list(resumed.resume()))
    return per_rank


def assert_every_row_once(per_rank, want: set, batch_size: int):
    counts: dict = {}
    for batches in per_rank:
        for key in keys_of(batches):
            counts[key] = counts.get(key, 0) + 1
    assert set(counts) == want and set(counts.values()) <= {1}, \
        (len(want), len(counts), sorted(k for k, c in counts.items() if c > 1)[:5])
    steps = {len(b) for b in per_rank}
    assert len(steps) == 1, steps                                 # ranks in lockstep
    n_steps = steps.pop()
    longest = -(-len(want) // len(per_rank))
    assert n_steps == -(-longest // batch_size)
    for step in range(n_steps):                                   # the same batch size on every rank at a step
        sizes = {len(b[step]["video_id"]) for b in per_rank}
        assert len(sizes) == 1 and 0 < sizes.pop() <= batch_size
    for batches in per_rank:
        for b in batches:
            assert b["sample_mask"].dtype == torch.bool and b["sample_mask"].shape == (len(b["video_id"]),)


@pytest.mark.parametrize("world_size", range(1, 17))
def test_every_row_exactly_once_per_epoch_over_all_ranks(dataset, world_size):
    """Counted over all ranks, every row of each split (uneven sizes: 50/30/20 %) is yielded exactly once per
    epoch, for shuffled and sequential orders, several block sizes and batch sizes, also when each rank is
    checkpointed mid-epoch and resumed by a fresh source. Oracle: the split of each row from sha1 of its id."""
    url, source = dataset
    want = split_keys(source, UNEVEN)
    assert sorted(len(v) for v in want.values()) != [len(source) / 3] * 3 and all(want.values())
    for split in ("train", "val", "test"):
        for shuffle in (True, False):
            for block_rows, batch_size in ((1, 1), (5, 3), (64, 4)):
                cfg = LoaderConfig(batch_size=batch_size, block_rows=block_rows, shuffle_buffer_rows=7,
                                   shuffle=shuffle, split_fractions=UNEVEN, seed=world_size)
                whole = one_epoch(url, cfg, split, world_size)
                assert_every_row_once(whole, want[split], batch_size)
                steps = len(whole[0])
                if steps >= 2 and block_rows == 5:
                    resumed = one_epoch(url, cfg, split, world_size, stop_at=steps // 2)
                    assert_every_row_once(resumed, want[split], batch_size)
                    assert [keys_of(b) for b in resumed] == [keys_of(b) for b in whole]


def test_a_split_smaller_than_the_world_pads_every_empty_rank(dataset):
    """16 ranks over a split of fewer rows: every rank still has one batch (eval loss is defined), the ranks
    without a row of their own carry only padding, and the real rows are each there once."""
    url, source = dataset
    val = split_keys(source, (0.9, 0.05, 0.05))["val"]
    assert 0 < len(val) < 16
    per_rank = one_epoch(url, LoaderConfig(batch_size=4, split_fractions=(0.9, 0.05, 0.05)), "val", 16)
    assert_every_row_once(per_rank, val, 4)
    assert sum(1 for b in per_rank if not b[0]["sample_mask"].any()) == 16 - len(val)


def test_padding_samples_are_real_rows_marked_false(dataset):
    url, source = dataset
    cfg = LoaderConfig(batch_size=4, split_fractions=ALL_TRAIN, shuffle=False)
    per_rank = one_epoch(url, cfg, "train", 3)      # 76 rows: 26 + 25 + 25, the short ranks pad once
    padded = [b[-1] for b in per_rank if not b[-1]["sample_mask"].all()]
    assert len(padded) == 3 - len(source) % 3
    for b in padded:
        fake = [i for i, m in enumerate(b["sample_mask"].tolist()) if not m]
        assert fake and all((b["video_id"][i], int(b["segment_idx"][i])) in source for i in fake)


# ---------------------------------------------------------------------------------------------- changed settings


@pytest.mark.parametrize("change", [{"block_rows": 8}, {"shuffle_buffer_rows": 16}, {"shuffle": False},
                                    {"world_size": 3}, {"batch_size": 2}, {"seed": 9}])
def test_changed_loader_settings_mid_epoch_are_refused_in_one_line(dataset, change):
    url, _ = dataset
    base = dict(batch_size=3, block_rows=4, shuffle_buffer_rows=8, split_fractions=ALL_TRAIN, seed=1)
    src = DeepLakeSource(url, LoaderConfig(**base), rank=0, world_size=2)
    it = src.batches(1)
    next(it), next(it)
    state = src.state_dict()
    world = change.get("world_size", 2)
    cfg = LoaderConfig(**{**base, **{k: v for k, v in change.items() if k != "world_size"}})
    other = DeepLakeSource(url, cfg, rank=0, world_size=world)
    with pytest.raises(ValueError) as err:
        other.load_state_dict(state)
    msg = str(err.value)
    assert "\n" not in msg and "middle of epoch 1" in msg and next(iter(change)) in msg


def test_changed_settings_at_an_epoch_boundary_replan_the_next_epoch(dataset):
    """A checkpoint at the end of an epoch resumes under new settings (another world size, block size): the
    finished epoch yields nothing more and the next one holds every row once under the new plan."""
    url, source = dataset
    old = LoaderConfig(batch_size=4, block_rows=4, shuffle_buffer_rows=8, split_fractions=ALL_TRAIN)
    new = LoaderConfig(batch_size=3, block_rows=16, shuffle_buffer_rows=8, split_fractions=ALL_TRAIN)
    states = []
    for rank in range(2):
        src = DeepLakeSource(url, old, rank=rank, world_size=2)
        list(src.batches(1))
        states.append(src.state_dict())
    assert states[0]["step"] == states[0]["epoch_steps"]
    resumed = []
    for rank in range(3):
        src = DeepLakeSource(url, new, rank=rank, world_size=3)
        src.load_state_dict(states[0])
        assert list(src.resume()) == []                # epoch 1 is complete
        resumed.append(list(src.batches(2)))
    assert_every_row_once(resumed, set(source), 3)
    start = DeepLakeSource(url, new, rank=0, world_size=3)     # at step 0 any settings are fine
    start.load_state_dict({**states[0], "step": 0})
    assert keys_of(start.resume()) == keys_of(DeepLakeSource(url, new, rank=0, world_size=3).batches(1))


def test_another_split_or_dataset_is_always_refused(dataset):
    url, _ = dataset
    src = DeepLakeSource(url, LoaderConfig(batch_size=3, split_fractions=UNEVEN), "train")
    state = src.state_dict()
    for kwargs in ({"split": "val"}, {}):
        cfg = LoaderConfig(batch_size=3, split_fractions=UNEVEN if kwargs else (0.6, 0.2, 0.2))
        with pytest.raises(ValueError, match="split"):
            DeepLakeSource(url, cfg, **kwargs).load_state_dict({**state, "step": 0})


def test_prefetching_stream_checkpoints_the_batches_it_handed_out(dataset):
    """The training loop's stream reads ahead in a thread (data.prefetch) but its position, the one saved in
    checkpoints, is that of the batches handed out: a stream resumed there continues exactly, across epochs."""
    from pipeline.train.loop import BatchStream

    url, _ = dataset
    cfg = LoaderConfig(batch_size=3, split_fractions=ALL_TRAIN, block_rows=4, shuffle_buffer_rows=8)
    ref = DeepLakeSource(url, cfg, rank=1, world_size=2)
    reference = keys_of(list(ref.batches(0)) + list(ref.batches(1)))
    steps = ref.steps_per_epoch()
    stream = BatchStream(DeepLakeSource(url, cfg, rank=1, world_size=2), prefetch=3)
    head = [stream.next() for _ in range(4)]
    state = stream.state_dict()
    stream.close()
    assert (state["epoch"], state["step_in_epoch"]) == (0, 4)
    src = DeepLakeSource(url, cfg, rank=1, world_size=2)
    src.load_state_dict({**state["source"], "epoch": 0, "step": 4})
    resumed = BatchStream(src, 0, 4, prefetch=2)
    rest = [resumed.next() for _ in range(2 * steps - 4)]
    assert (resumed.epoch, resumed.step_in_epoch) == (1, steps)
    resumed.close()
    assert keys_of(head + rest) == reference
