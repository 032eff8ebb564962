"""No model input of a sample derives from its own target text, through the real data path: upstream stage outputs ->
ingest (join + Deep Lake write) -> `pipeline.loader` -> `InputBuilder` -> `VPT.encode`.

Two datasets are ingested from the same upstream outputs, except that one ASR segment's text is changed. Every
sample except two must come out identical; the changed segment differs in its labels only, and the segment after
it in its prompt (prev_text) only.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import T5ForConditionalGeneration

from benchmarks.ingest_bench import ingest_config, make_upstream, run_ingest_shards
from pipeline.loader import DeepLakeSource, LoaderConfig
from pipeline.models.t5 import tiny_t5_config, train_tokenizer
from pipeline.models.vpt import VPT, VPTConfig
from pipeline.shards import ShardStore
from pipeline.stages.ingest import write_dataset
from pipeline.train.data import InputBuilder

VIDEO, SEGMENT = "vid0000", 3
NEW_TEXT = "a completely different sentence about cooking rice"
ENCODER_KEYS = ("clip", "clip_mask", "frame_time", "audio", "audio_mask", "scene_ids", "scene_mask")
PROMPT_KEYS = ("prompt_ids", "prompt_mask")
LABEL_KEYS = ("labels", "decoder_attention_mask")


def ingest(run, edit: bool) -> str:
    """A dataset from `make_upstream`'s outputs; with `edit`, segment (VIDEO, SEGMENT) says NEW_TEXT."""
    make_upstream(run, n_videos=3, num_shards=1, seed=5, no_speech_every=0)
    if edit:
        path = ShardStore(run, "asr", 0).table_path("segments")
        table = pq.read_table(path)
        rows = table.to_pylist()
        (row,) = [r for r in rows if (r["video_id"], r["segment_idx"]) == (VIDEO, SEGMENT)]
        assert row["text"] != NEW_TEXT
        row["text"] = NEW_TEXT
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    cfg = ingest_config(run)
    run_ingest_shards(cfg)
    return write_dataset(cfg, log=lambda s: None)["dataset"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """(original, edited): (video_id, segment_idx) -> (raw sample batch, model inputs), one sample per batch so
    that no padding width couples two samples."""
    root = tmp_path_factory.mktemp("leakage")
    urls = [ingest(root / name, edit) for name, edit in (("original", False), ("edited", True))]
    cfg = LoaderConfig(batch_size=1, max_frames=64, split_fractions=(1.0, 0.0, 0.0), shuffle=False)
    batches = [list(DeepLakeSource(url, cfg).batches(0)) for url in urls]
    texts = [t for bs in batches for b in bs for t in b["text"] + b["prev_text"] + b["scene_text"]]
    tokenizer = train_tokenizer(texts, vocab_size=150)
    builder = InputBuilder(tokenizer, VPTConfig(backbone="tiny", d_clip=16, d_audio=32, max_frames=64))
    out = [{(b["video_id"][0], int(b["segment_idx"][0])): (b, builder(b)) for b in bs} for bs in batches]
    return out, builder


def test_only_the_edited_segment_and_its_successor_change(samples):
    (original, edited), _ = samples
    assert original.keys() == edited.keys() and len(original) > 10
    nxt = (VIDEO, SEGMENT + 1)
    assert (VIDEO, SEGMENT) in original and nxt in original       # a speech segment with a speech successor
    changed = {}
    for key in original:
        (raw_a, a), (raw_b, b) = original[key], edited[key]
        changed[key] = {k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])}
        changed[key] |= {k for k in ("text", "prev_text", "scene_text") if raw_a[k] != raw_b[k]}
    assert changed[(VIDEO, SEGMENT)] == {"text", *LABEL_KEYS}        # the target: labels only, no input
    assert changed[nxt] <= {"prev_text", *PROMPT_KEYS} and "prompt_ids" in changed[nxt]     # the next prompt
    assert edited[nxt][0]["prev_text"] == [NEW_TEXT]
    assert all(not c for key, c in changed.items() if key not in ((VIDEO, SEGMENT), nxt)), changed
    # and the edited segment's own prompt is the text before it, not its own
    assert NEW_TEXT not in edited[(VIDEO, SEGMENT)][0]["prev_text"][0]


def test_the_encoder_never_sees_the_target(samples):
    """The encoder output of the edited segment is identical (bit for bit) with either target text, although its
    labels differ, so the target is not an encoder input even where `encode` is handed the whole input dict."""
    (original, edited), builder = samples
    torch.manual_seed(0)
    model = VPT(builder.cfg, T5ForConditionalGeneration(tiny_t5_config(len(builder.tokenizer)))).eval()
    a, b = original[(VIDEO, SEGMENT)][1], edited[(VIDEO, SEGMENT)][1]
    assert a["labels"].shape != b["labels"].shape or not torch.equal(a["labels"], b["labels"])
    with torch.no_grad():
        (ea, ma), (eb, mb) = model.encode(a), model.encode(b)
    assert torch.equal(ea, eb) and torch.equal(ma, mb)
    # the prompt does reach the encoder: the successor's encoding changes with the edited text
    with torch.no_grad():
        na, nb = (model.encode(s[(VIDEO, SEGMENT + 1)][1])[0] for s in (original, edited))
    assert na.shape != nb.shape or not torch.equal(na, nb)
