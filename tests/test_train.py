"""Training end to end (CPU, gloo, tiny model): the loss falls on a learnable signal, a SIGKILLed 2-process run
resumes onto the uninterrupted loss curve, checkpoints export to a reloadable Hugging Face-format model, and the
bf16 mixed-precision path (the GPU default) runs. Plus the checkpoint manager (keep last N + best, rollback with
`train.resume_from`) and the MFU formula."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.models.vpt import VPT, VPTConfig, lm_losses, load_exported
from pipeline.train import metrics
from pipeline.train.checkpoint import Checkpointer, complete_checkpoints, export_hf
from pipeline.train.data import InputBuilder, SyntheticConfig, SyntheticSource

REPO = Path(__file__).resolve().parents[1]
COMMON = ["data.batch_size=8", "train.log_every=4", "logging.tensorboard=true"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vpt-cache")


def run_train(run_dir: Path, cache_dir: Path, overrides: list[str], nproc: int = 0) -> subprocess.CompletedProcess:
    """`python -m pipeline.train` (nproc=0) or `torchrun --standalone --nproc_per_node=N -m pipeline.train`."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipeline.train"]
    else:
        cmd = [sys.executable, "-m", "pipeline.train"]
    env = dict(os.environ, VPT_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd + [f"run_dir={run_dir}", *COMMON, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> training loss (the last record of a step wins: a resumed run rewrites the steps it redoes)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def eval_loss(model: VPT, tokenizer, batch) -> float:
    inputs = InputBuilder(tokenizer, model.cfg)(batch)
    with torch.no_grad():
        return float(lm_losses(model(inputs), inputs["labels"])[0])


def test_single_process_loss_falls_by_reading_the_frames(tmp_path, cache_dir):
    run = tmp_path / "run"
    r = run_train(run, cache_dir, ["train.max_steps=120", "optim.lr=3e-3", "optim.warmup_steps=10",
                                   "train.eval_every=60", "train.eval_steps=4", "checkpoint.every=60"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    curve = losses(run)
    assert sorted(curve) == list(range(1, 121))
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(111, 121)) / 10
    assert last < 0.3 * first, (first, last)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    detail = [x for x in records if "tokens_per_s" in x]
    assert detail and all(x["tokens_per_s"] > 0 and x["mfu"] > 0 for x in detail)
    assert any(k.startswith("grad_norm/encoder.0") for k in detail[-1])
    assert any(k.startswith("act_rms/decoder.1") for k in detail[-1])
    assert all("z_loss" in x for x in records) and "eval_loss" in records[-1]
    assert list((run / "tb").glob("events.*"))

    # the held-out loss depends on the frames: giving each sample another sample's frames makes it worse
    model, tokenizer = load_exported(export_hf(run / "checkpoints", tmp_path / "export"))
    model.eval()
    batch = next(SyntheticSource(SyntheticConfig(), split="eval", batch_size=24).batches(0))
    swapped = dict(batch, clip=batch["clip"].roll(1, 0), clip_mask=batch["clip_mask"].roll(1, 0),
                   frame_time=batch["frame_time"].roll(1, 0))
    same_text = [i for i in range(24) if batch["text"][i] == batch["text"][i - 1]]
    assert len(same_text) < 12
    assert eval_loss(model, tokenizer, batch) < 0.8 * eval_loss(model, tokenizer, swapped)


def test_two_process_kill_and_resume_matches_the_uninterrupted_run(tmp_path, cache_dir):
    args = ["train.max_steps=16", "checkpoint.every=4", "checkpoint.keep_last=2", "train.eval_every=8",
            "train.eval_steps=2"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    r = run_train(whole, cache_dir, args, nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    killed = run_train(broken, cache_dir, args + ["train.debug_kill_at_step=10"], nproc=2)
    assert killed.returncode != 0
    assert max(losses(broken)) == 10
    assert [s for s, _, _ in complete_checkpoints(broken / "checkpoints")][-1] == 8

    resumed = run_train(broken, cache_dir, args, nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 8" in resumed.stderr      # (logged)
    a, b = losses(whole), losses(broken)
    assert sorted(b) == list(range(1, 17))
    for step in range(9, 17):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a[step], b[step])
    assert a[16] != a[9]      # the comparison covers a moving curve

    # keep last 2 + best by eval loss (evals at 8 and 16; test_keep_last_n_plus_the_best has an older best)
    kept = [s for s, _, _ in complete_checkpoints(whole / "checkpoints")]
    evals = losses(whole, "eval_loss")
    assert sorted(evals) == [8, 16]
    assert kept == sorted({12, 16, min(evals, key=evals.get)})

    # a checkpoint sharded over 2 ranks exports and reloads with identical logits
    assert_export_matches_checkpoint(whole / "checkpoints", tmp_path / "export", last_step=16)


def assert_export_matches_checkpoint(checkpoints: Path, out: Path, last_step: int) -> VPT:
    """`export_hf` of the latest checkpoint reloads (`load_exported`) with exactly the logits of the model the
    DCP shards load into directly, and differs from a fresh initialisation. Returns the exported model."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, T5ForConditionalGeneration

    from pipeline.train.checkpoint import _resolve_checkpoint  # the same root/step resolution

    exported, tokenizer = load_exported(export_hf(checkpoints, out))
    exported.eval()
    root, step_dir = _resolve_checkpoint(checkpoints)
    assert step_dir.name == f"step-{last_step:08d}"
    cfg = VPTConfig.from_dict(json.loads((root / "vpt_config.json").read_text()))
    direct = VPT(cfg, T5ForConditionalGeneration(AutoConfig.from_pretrained(root / "backbone")))
    state = {"model": direct.state_dict()}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    direct.load_state_dict(state["model"])
    direct.eval()
    batch = next(SyntheticSource(SyntheticConfig(), split="eval", batch_size=4).batches(0))
    inputs = InputBuilder(tokenizer, cfg)(batch)
    with torch.no_grad():
        assert torch.equal(exported(inputs), direct(inputs))
    fresh = VPT(cfg, T5ForConditionalGeneration(AutoConfig.from_pretrained(root / "backbone"))).eval()
    with torch.no_grad():
        assert not torch.allclose(exported(inputs), fresh(inputs))
    return exported


def test_activation_checkpointing_and_the_mlp_projector_train_on_two_gloo_ranks(tmp_path, cache_dir):
    """`train.activation_checkpointing=true` (blocks recomputed in backward under FSDP2) with `model.projector=mlp`:
    the loss falls, the checkpoint exports to the same logits, and a resume picks it up."""
    run = tmp_path / "run"
    args = ["train.activation_checkpointing=true", "model.projector=mlp", "device=cpu", "optim.lr=3e-3",
            "optim.warmup_steps=4", "train.eval_every=0", "checkpoint.every=32"]
    r = run_train(run, cache_dir, args + ["train.max_steps=32"], nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    curve = losses(run)
    assert sorted(curve) == list(range(1, 33))
    first, last = sum(curve[s] for s in range(1, 5)) / 4, sum(curve[s] for s in range(29, 33)) / 4
    assert last < 0.3 * first, (first, last)

    exported = assert_export_matches_checkpoint(run / "checkpoints", tmp_path / "export", last_step=32)
    assert exported.cfg.projector == "mlp" and isinstance(exported.frame_proj, torch.nn.Sequential)
    assert any(k.startswith("proj.clip.2.") for k in exported.state_dict())

    r = run_train(run, cache_dir, args + ["train.max_steps=34"], nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "at step 32" in r.stderr and sorted(losses(run)) == list(range(1, 35))
    assert losses(run)[34] < 0.3 * first


def test_activation_checkpointing_recomputes_the_blocks_in_backward(cache_dir):
    """The switch really reaches the sharded blocks: with it, a block's forward runs again during backward."""
    import torch.distributed as dist

    from pipeline.models.vpt import build_vpt
    from pipeline.train.loop import shard_model

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        calls = {}
        for on in (False, True):
            model, tokenizer = build_vpt(VPTConfig(backbone="tiny", d_clip=128, projector="mlp"), cache_dir)
            counter = [0]
            model.backbone.encoder.block[0].layer[0].register_forward_hook(
                lambda *_: counter.__setitem__(0, counter[0] + 1))
            shard_model(model, torch.device("cpu"), activation_checkpointing=on)
            model.train()
            inputs = InputBuilder(tokenizer, model.cfg)(next(SyntheticSource(SyntheticConfig(), "train", 2).batches(0)))
            lm_losses(model(inputs), inputs["labels"])[0].backward()
            calls[on] = counter[0]
    finally:
        dist.destroy_process_group()
    assert calls == {False: 1, True: 2}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_keep_last_n_plus_the_best(tmp_path):
    """The best checkpoint survives when it is older than the last N, and goes once a newer one beats it."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    for step, loss in [(1, 3.0), (2, 1.0), (3, None), (4, 2.0), (5, 2.5)]:
        ckpt.save(step, model, optimizer, {"step": step}, eval_loss=loss)
    assert [s for s, _, _ in complete_checkpoints(tmp_path)] == [2, 4, 5]
    assert ckpt.best() == tmp_path / "step-00000002" and ckpt.latest() == tmp_path / "step-00000005"
    ckpt.save(6, model, optimizer, {"step": 6}, eval_loss=0.5)
    assert [s for s, _, _ in complete_checkpoints(tmp_path)] == [5, 6]


def _fake_checkpoints(root: Path, steps: list[int]) -> None:
    for step in steps:
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "meta.json").write_text(json.dumps({"step": step, "eval_loss": None}))


def test_rollback_moves_newer_checkpoints_aside_once(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoints(root, [2, 4, 6, 8])
    ckpt = Checkpointer(root, keep_last=10, rank=0, world_size=1)
    assert ckpt.find(4) == ckpt.find("step-00000004") == ckpt.find(str(root / "step-00000004"))
    with pytest.raises(ValueError, match=r"resume_from=5: not a complete checkpoint .*complete: 2, 4, 6, 8"):
        ckpt.find(5)
    assert ckpt.roll_back(4, 1e-5) == root / "step-00000004"
    assert ckpt.latest() == root / "step-00000004"
    (aside,) = (root / "rolled_back").iterdir()
    assert aside.name.startswith("to-step-00000004-")
    assert sorted(d.name for d in aside.iterdir()) == ["step-00000006", "step-00000008"]
    # the rolled-back run saves 6 again; a relaunch with the same settings (a requeue) keeps that progress
    _fake_checkpoints(root, [6])
    assert ckpt.roll_back(4, 1e-5) == root / "step-00000006"
    assert [s for s, _, _ in complete_checkpoints(root)] == [2, 4, 6]
    # a new rollback (another LR) is applied again
    assert ckpt.roll_back(2, 1e-6) == root / "step-00000002" and ckpt.latest() == root / "step-00000002"


def test_resume_from_an_earlier_checkpoint_with_a_lower_lr(tmp_path, cache_dir):
    """Rolling back past a (pretend) loss spike: resume at step 4 of 8 with a lower LR; 6 and 8 move aside."""
    run = tmp_path / "run"
    base = ["train.max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=10", "train.eval_every=0",
            "optim.warmup_steps=1"]
    r = run_train(run, cache_dir, base)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = losses(run, "lr")
    r = run_train(run, cache_dir, base + ["train.resume_from=4", "train.resume_lr=1e-5"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000004'} at step 4" in r.stderr
    (aside,) = (run / "checkpoints" / "rolled_back").iterdir()
    assert sorted(d.name for d in aside.iterdir()) == ["step-00000006", "step-00000008"]
    assert [s for s, _, _ in complete_checkpoints(run / "checkpoints")] == [2, 4, 6, 8]   # saved anew
    lrs = losses(run, "lr")
    assert lrs[4] == first[4] > 1e-4 and all(lrs[s] <= 1e-5 < first[s] for s in (5, 6, 7, 8))


def test_resume_can_override_the_learning_rate(tmp_path, cache_dir):
    run = tmp_path / "run"
    base = ["train.max_steps=6", "checkpoint.every=3", "train.eval_every=0", "optim.warmup_steps=1"]
    assert run_train(run, cache_dir, base + ["train.debug_kill_at_step=4"]).returncode != 0
    r = run_train(run, cache_dir, base + ["train.resume_lr=1e-5"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lrs = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        lrs[rec["step"]] = rec["lr"]
    assert lrs[3] > 1e-4 and all(lrs[s] <= 1e-5 for s in (4, 5, 6))


def test_bf16_mixed_precision_runs_on_two_gloo_ranks_with_fp32_master_weights(tmp_path, cache_dir):
    """The GPU default (bf16 compute, fp32 weights and gradient reduction) on CPU: same code path, so it is exercised
    without a GPU. Step 1 sees the same weights and data in both runs: close losses, but not equal ones (the bf16
    compute really ran)."""
    args = ["train.max_steps=12", "checkpoint.every=12", "train.eval_every=0", "device=cpu", "optim.lr=3e-3",
            "optim.warmup_steps=2"]
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    for run, precision in ((fp32, "fp32"), (bf16, "bf16")):
        r = run_train(run, cache_dir, args + [f"precision={precision}"], nproc=2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = losses(fp32), losses(bf16)
    assert sorted(b) == list(range(1, 13))
    assert a[1] != b[1] and b[1] == pytest.approx(a[1], rel=0.02)
    assert b[12] < 0.3 * b[1]  # and it learns (35 -> 3 here)
    import torch.distributed.checkpoint as dcp

    step_dir = complete_checkpoints(bf16 / "checkpoints")[-1][1]
    saved = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    dtypes = {(key.split(".")[0], md.properties.dtype) for key, md in saved.items() if hasattr(md, "properties")}
    assert dtypes == {("model", torch.float32), ("optim", torch.float32)}  # fp32 master weights and Adam moments


@pytest.mark.parametrize("module,arg", [("pipeline.train", "precision=fp16"), ("pipeline.train", "run_on=pbs"),
                                        ("pipeline.eval.vqa_finetune", "device=tpu"),
                                        ("pipeline.eval.vqa_finetune", "checkpoint.every=0"),
                                        ("pipeline.eval.vqa_finetune", "vqa.contamination.frames=/nonexistent")])
def test_bad_training_config_fails_before_anything_runs(tmp_path, module, arg):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", module, f"run_dir={run}", arg], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and arg.split("=")[0] in lines[0], r.stderr
    assert not run.exists()  # nothing written, nothing submitted


def test_mfu_counts_encoder_and_decoder_weights_at_their_own_tokens():
    """A T5 small enough to count by hand: d_model 8, 2 heads x d_kv 4, d_ff 16 (relu), 1 + 1 layers, vocab 10."""
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=10, d_model=8, d_kv=4, num_heads=2, d_ff=16, num_layers=1,
                                             num_decoder_layers=1, feed_forward_proj="relu",
                                             tie_word_embeddings=False))
    model = VPT(VPTConfig(backbone="x", d_clip=4, d_audio=3, time_features=2), t5)
    attention, ff = 4 * 8 * 8, 2 * 8 * 16                     # q, k, v, o; wi, wo
    p = metrics.flop_params(model)
    assert p == metrics.FlopParams(encoder=attention + ff, decoder=2 * attention + ff + 10 * 8,   # + cross, lm_head
                                   frames=4 * 8 + 2 * 8, audio=3 * 8)
    counts = {"encoder": 100, "frames": 5, "audio": 1, "decoder": 10}
    flops = metrics.train_flops(p, counts)
    assert flops == 6 * (512 * 100 + 848 * 10 + 48 * 5 + 24 * 1)
    old = 6 * metrics.count_params(model) * (counts["encoder"] + counts["decoder"])    # 6 * N_total * all tokens
    assert old > 1.9 * flops
    assert metrics.mfu(flops, peak_flops_per_device=flops / 4, world_size=2) == pytest.approx(2.0)


def test_tokens_per_s_leaves_out_paused_time(monkeypatch):
    clock = iter([0.0, 1.0, 9.0, 10.0, 12.0])      # start, pause, resume, rate; the next window's rate
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = metrics.Throughput()
    meter.add(100, 1e6)
    with meter.paused():     # 8 s of eval / checkpointing
        pass
    assert meter.rate() == (50.0, 5e5)        # 100 tokens over the 2 s of training
    meter.add(10)
    assert meter.rate() == (5.0, 0.0)


def test_two_ranks_train_and_eval_on_a_real_dataset_and_refuse_a_changed_loader_mid_epoch(tmp_path, cache_dir):
    """pipeline.loader under torchrun (2 gloo ranks, FSDP2, prefetch): a validation split of a single video (fewer
    rows than two full batches) still gives a finite eval loss; a checkpoint taken mid-epoch does not resume with
    another data.loader.block_rows (one-line error, exit 2; resuming with the same settings is
    test_two_process_kill_and_resume_matches_the_uninterrupted_run's)."""
    from benchmarks.ingest_bench import ingest_config, make_upstream, run_ingest_shards
    from pipeline.stages.ingest import write_dataset

    up = make_upstream(tmp_path / "up", n_videos=12, num_shards=2, seed=3)
    cfg = ingest_config(up)
    run_ingest_shards(cfg)
    url = write_dataset(cfg, log=lambda s: None)["dataset"]
    run = tmp_path / "run"
    args = ["data.source=pipeline.loader:build_source", f"data.path={url}", "data.batch_size=4",
            "data.loader.split_fractions=[0.9,0.05,0.05]", "data.loader.block_rows=4", "model.d_clip=16",
            "model.d_audio=32", "train.eval_every=2", "train.eval_steps=0", "checkpoint.every=4"]
    r = run_train(run, cache_dir, args + ["train.max_steps=4"], nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    evals = losses(run, "eval_loss")
    assert sorted(evals) == [2, 4] and all(v == v and v > 0 for v in evals.values())
    changed = run_train(run, cache_dir, args[:-1] + ["checkpoint.every=4", "train.max_steps=6",
                                                     "data.loader.block_rows=8"], nproc=2)
    assert changed.returncode == 2 or "exitcode  : 2" in changed.stderr, changed.stderr[-2000:]
    assert "loader settings changed in the middle of epoch 0 (step 4 of 9): block_rows 4 -> 8" in changed.stderr
