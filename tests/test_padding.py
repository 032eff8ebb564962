"""Padding samples (`sample_mask` False: rows repeated so that every rank has the same batches) change nothing:
not the training loss or its gradient over 2 real gloo ranks, not the eval loss, not the token counts behind
tokens/s and MFU. Oracle: the same real samples without padding, on one process."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.models.vpt import VPTConfig, build_vpt, lm_losses
from pipeline.train.data import InputBuilder, SyntheticConfig, SyntheticSource

CFG = VPTConfig(backbone="tiny", d_clip=128)


def take(batch: dict, idx: list[int], real: list[bool] | None = None) -> dict:
    """Samples `idx` of a collated batch (repeats allowed), with a sample_mask (all True unless `real`)."""
    out = {k: (v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx]) for k, v in batch.items()
           if k != "sample_mask"}
    out["sample_mask"] = torch.tensor(real if real is not None else [True] * len(idx), dtype=torch.bool)
    return out


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory):
    cache = tmp_path_factory.mktemp("vpt-cache")
    torch.manual_seed(0)
    model, tokenizer = build_vpt(CFG, cache)
    weights = tmp_path_factory.mktemp("w") / "model.pt"
    torch.save(model.state_dict(), weights)
    batch = next(SyntheticSource(SyntheticConfig(), split="eval", batch_size=6).batches(0))
    return model.eval(), tokenizer, batch, cache, weights


def _rank(rank: int, world: int, init: str, cache: str, weights: str, batches: str, out: str) -> None:
    from pipeline.train.loop import token_weighted_losses

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model, tokenizer = build_vpt(CFG, Path(cache))
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        builder = InputBuilder(tokenizer, model.cfg)
        inputs = builder(torch.load(batches, weights_only=False)[rank])
        counts = builder.token_counts(inputs)
        loss, ce, z, totals = token_weighted_losses(model(inputs), inputs["labels"], 0.0, torch.device("cpu"),
                                                    [float(v) for v in counts.values()])
        loss.backward()
        grads = []
        for p in model.parameters():          # what FSDP's reduce-scatter does: the mean over ranks
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            grads.append(g / world)
        if rank == 0:
            torch.save({"ce": ce, "grads": grads, "counts": dict(zip(counts, totals))}, out)
    finally:
        dist.destroy_process_group()


def test_padding_changes_neither_loss_nor_gradient_over_two_ranks(model_and_batch, tmp_path):
    """Rank 0 holds 4 real samples; rank 1 holds 1 real sample and 3 repeats of it marked as padding. The
    logged loss is the token mean of the 5 real samples and the averaged gradient is that of their loss, as in
    one process on an unpadded batch of the 5."""
    model, tokenizer, batch, cache, weights = model_and_batch
    per_rank = [take(batch, [0, 1, 2, 3]), take(batch, [4, 4, 4, 4], [True, False, False, False])]
    torch.save(per_rank, tmp_path / "batches.pt")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(cache), str(weights), str(tmp_path / "batches.pt"),
                          str(tmp_path / "out.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "out.pt", weights_only=False)

    # oracle: the token mean of the real samples, each rank's real samples as one unpadded batch, in one process
    builder = InputBuilder(tokenizer, model.cfg)
    real = [builder(take(batch, [0, 1, 2, 3])), builder(take(batch, [4]))]
    model.zero_grad()
    sums = [lm_losses(model(x), x["labels"]) for x in real]
    n_all = sum(float(n) for _, _, n in sums)
    ce = sum(c * float(n) for c, _, n in sums) / n_all
    ce.backward()
    assert got["ce"] == pytest.approx(float(ce.detach()), rel=1e-5)
    for g, p in zip(got["grads"], model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)
    want = {k: sum(builder.token_counts(x)[k] for x in real) for k in builder.token_counts(real[0])}
    assert {k: int(v) for k, v in got["counts"].items()} == want
    # the test is sensitive: the mean of the two ranks' own means (a per-rank mean) is another loss
    assert sum(float(c) for c, _, _ in sums) / 2 != pytest.approx(float(ce.detach()), rel=1e-3)


def test_padding_changes_neither_eval_loss_nor_token_counts(model_and_batch):
    """`evaluate` (one process) over a source whose batches carry padding gives the loss of the real samples."""
    from pipeline.train.loop import evaluate

    model, tokenizer, batch, _, _ = model_and_batch

    class Source:
        def __init__(self, batches):
            self.list = batches

        def batches(self, epoch, start_step=0):
            return iter(self.list[start_step:])

    plain = Source([take(batch, [0, 1, 2]), take(batch, [3, 4, 5])])
    # padding repeats a row of its own batch, as the loader's does: the padded widths stay those of the real rows
    # (VPT's encoder sees the parts at padded offsets, so a longer filler would move the real rows' positions)
    padded = Source([take(batch, [0, 1, 2, 0, 0], [True, True, True, False, False]),
                     take(batch, [3, 4, 5, 5, 3], [True, True, True, False, False])])
    builder = InputBuilder(tokenizer, model.cfg)
    assert dist.is_available()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        want = evaluate(model, plain, builder, torch.device("cpu"), 0)
        got = evaluate(model, padded, builder, torch.device("cpu"), 0, prefetch=2)
    finally:
        dist.destroy_process_group()
    assert got == pytest.approx(want, rel=1e-6)
    for a, b in zip(plain.list, padded.list):
        assert builder.token_counts(builder(a)) == builder.token_counts(builder(b))
    with_pad_counted = builder.token_counts(builder({k: v for k, v in padded.list[0].items() if k != "sample_mask"}))
    assert with_pad_counted["encoder"] > builder.token_counts(builder(plain.list[0]))["encoder"]


def test_vqa_eval_padding_repeats_a_question_of_its_own_batch():
    """A VQA eval rank one question short pads its last batch with a question of that batch (so the padded
    prompt width, and the real questions' answers, are those without padding), marked False."""
    from pipeline.eval.vqa_data import VQAExample
    from pipeline.eval.vqa_finetune import VQASource

    examples = [VQAExample(q, q, None, "what " + "very long " * (q % 4) + "?", ("a",) * 10, "other", "a")
                for q in range(7)]
    embeddings = {e.image_id: torch.zeros(4) for e in examples}
    seen = []
    for rank in range(2):
        for b in VQASource(examples, embeddings, "eval", batch_size=2, rank=rank, world_size=2, d_audio=4).batches(0):
            real = b["sample_mask"].tolist()
            seen += [q for q, m in zip(b["question_id"].tolist(), real) if m]
            fake = [p for p, m in zip(b["prev_text"], real) if not m]
            assert all(p in [x for x, m in zip(b["prev_text"], real) if m] for p in fake)
    assert sorted(seen) == list(range(7))
