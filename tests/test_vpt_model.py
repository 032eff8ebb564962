"""The VPT model: encoder inputs never depend on the target text; ablation switches; projectors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.models.vpt import VPTConfig, build_vpt, make_projector
from pipeline.train.data import InputBuilder, SyntheticConfig, SyntheticSource

CFG = VPTConfig(backbone="tiny", d_clip=128, d_audio=2048, max_frames=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model, tokenizer = build_vpt(CFG, tmp_path_factory.mktemp("cache"))
    return model.eval(), tokenizer


def _batch(n=6, split="train"):
    return next(SyntheticSource(SyntheticConfig(), split=split, batch_size=n).batches(0, 0))


def test_encoder_inputs_do_not_depend_on_the_target_text(tiny):
    model, tokenizer = tiny
    builder = InputBuilder(tokenizer, CFG)
    batch = _batch()
    perturbed = dict(batch, text=[t[::-1] + " extra words entirely different" for t in batch["text"]])
    a, b = builder(batch), builder(perturbed)
    assert not torch.equal(a["labels"], b["labels"])
    for key in a:
        if key not in ("labels", "decoder_attention_mask"):
            assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        emb_a, mask_a = model.encode(a)
        emb_b, mask_b = model.encode(b)
    assert torch.equal(emb_a, emb_b) and torch.equal(mask_a, mask_b)


def test_synthetic_prev_text_never_holds_its_own_target():
    for split in ("train", "eval"):
        source = SyntheticSource(SyntheticConfig(), split=split, batch_size=8)
        seen = 0
        for batch in source.batches(0, 0):
            for text, prev, seg in zip(batch["text"], batch["prev_text"], batch["segment_idx"].tolist()):
                assert text and text not in prev and prev not in text or prev == ""
                assert (prev == "") == (seg == 0)
                seen += 1
        assert seen == source.steps_per_epoch() * 8


def test_train_and_eval_splits_hold_different_videos():
    train = {v for b in SyntheticSource(SyntheticConfig(), "train", 8).batches(0) for v in b["video_id"]}
    held_out = {v for b in SyntheticSource(SyntheticConfig(), "eval", 8).batches(0) for v in b["video_id"]}
    assert train and held_out and not train & held_out


def test_ranks_read_disjoint_samples_and_resume_mid_epoch_matches():
    cfg = SyntheticConfig()
    ranks = [SyntheticSource(cfg, "train", 4, rank=r, world_size=2) for r in range(2)]
    keys = [{(v, s) for b in src.batches(3) for v, s in zip(b["video_id"], b["segment_idx"].tolist())}
            for src in ranks]
    assert keys[0] and not keys[0] & keys[1]
    full = list(ranks[0].batches(3, 0))
    resumed = list(ranks[0].batches(3, 5))
    assert [b["video_id"] for b in full[5:]] == [b["video_id"] for b in resumed]
    assert torch.equal(full[5]["clip"], resumed[0]["clip"])


def test_ablation_switches_drop_their_positions(tiny):
    model, tokenizer = tiny
    batch = _batch()
    inputs = InputBuilder(tokenizer, CFG)(batch)
    lengths = {}
    for switch in ("use_frames", "use_audio", "use_scene_graph", "use_prompt"):
        model.cfg = dataclasses.replace(CFG, **{switch: False})
        with torch.no_grad():
            lengths[switch] = model.encode(inputs)[0].shape[1]
            assert torch.isfinite(model(inputs)).all()
    model.cfg = CFG
    with torch.no_grad():
        full = model.encode(inputs)[0].shape[1]
    assert full - lengths["use_frames"] == inputs["clip"].shape[1]
    assert full - lengths["use_audio"] == 1
    assert full - lengths["use_scene_graph"] == inputs["scene_ids"].shape[1]
    assert full - lengths["use_prompt"] == inputs["prompt_ids"].shape[1]


def test_frames_move_the_encoder_output_only_through_unmasked_positions(tiny):
    model, tokenizer = tiny
    inputs = InputBuilder(tokenizer, CFG)(_batch())
    padded = ~inputs["clip_mask"]
    assert padded.any()
    changed = dict(inputs, clip=inputs["clip"].masked_fill(padded.unsqueeze(-1), 7.0))
    with torch.no_grad():
        enc = model.backbone.encoder
        a = enc(inputs_embeds=model.encode(inputs)[0], attention_mask=model.encode(inputs)[1]).last_hidden_state
        b = enc(inputs_embeds=model.encode(changed)[0], attention_mask=model.encode(changed)[1]).last_hidden_state
    keep = model.encode(inputs)[1].bool()
    assert torch.allclose(a[keep], b[keep], atol=1e-5)


def test_projectors():
    assert isinstance(make_projector("identity", 64, 64), torch.nn.Identity)
    with pytest.raises(ValueError):
        make_projector("identity", 128, 64)
    mlp = make_projector("mlp", 128, 64)
    assert mlp(torch.zeros(2, 128)).shape == (2, 64)
    # linear: the identity when the widths match, a matrix otherwise; mlp keeps its layers either way
    assert isinstance(make_projector("linear", 64, 64), torch.nn.Identity)
    assert isinstance(make_projector("linear", 128, 64), torch.nn.Linear)
    assert isinstance(make_projector("mlp", 64, 64), torch.nn.Sequential)


def test_linear_projector_feeds_embeddings_as_is_when_they_match_the_backbone_width(tiny):
    """A VPT whose CLIP width equals d_model: no frame_proj weights, the frame positions carry the embedding
    itself (plus the type and time embeddings)."""
    from pipeline.models.vpt import FRAME, VPT, time_features

    model, tokenizer = tiny
    d = model.d_model
    cfg = dataclasses.replace(CFG, d_clip=d)
    matched = VPT(cfg, model.backbone).eval()
    assert isinstance(matched.frame_proj, torch.nn.Identity)
    assert not any(k.startswith("frame_proj.") for k in matched.state_dict())
    assert isinstance(matched.audio_proj, torch.nn.Linear)          # 2048 -> d still projects
    batch = _batch(2)
    batch["clip"] = torch.randn(*batch["clip"].shape[:2], d)
    inputs = InputBuilder(tokenizer, cfg)(batch)
    with torch.no_grad():
        embeds, _ = matched.encode(inputs)
        t = time_features(inputs["frame_time"], cfg.time_features, cfg.max_time_s)
        expected = inputs["clip"] + matched.type_embed.weight[FRAME] + matched.time_proj(t)
    assert torch.allclose(embeds[:, :inputs["clip"].shape[1]], expected, atol=1e-6)


def test_prompt_keeps_its_end_and_targets_are_padded_with_ignore_index(tiny):
    _, tokenizer = tiny
    cfg = dataclasses.replace(CFG, max_prompt_tokens=4)
    builder = InputBuilder(tokenizer, cfg)
    batch = dict(_batch(2), prev_text=["one two three four five six seven eight nine ten", ""])
    inputs = builder(batch)
    ids = inputs["prompt_ids"][0][inputs["prompt_mask"][0]].tolist()
    assert len(ids) == 4 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]).strip().endswith("ten")
    assert inputs["prompt_mask"][1].sum() == 1                     # "" -> just </s>
    labels = inputs["labels"]
    assert ((labels == -100) == ~inputs["decoder_attention_mask"]).all()
