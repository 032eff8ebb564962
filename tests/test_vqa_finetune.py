"""VQA finetuning end to end on CPU (tiny random CLIP + tiny VPT, synthetic shapes set): full finetuning from the
plain backbone beats the majority baseline by 30+ points on held-out images; LoRA finetuning from a pretraining
checkpoint runs and trains only adapters + projections, and its checkpoints export (adapters merged) to a plain
model; `vqa.scene_graph` feeds each image's scene-graph text; results are in the official format; two ranks with
an uneven eval split finish. Plus the batch source contract and `init_from` resolution."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.eval.synthetic_vqa import make_synthetic_vqa
from pipeline.eval.vqa_data import load_vqa, split_examples
from pipeline.eval.vqa_finetune import VQASource, feature_stats, resolve_init
from pipeline.models.vpt import VPT, VPTConfig, load_exported
from pipeline.train.data import InputBuilder, SyntheticConfig, SyntheticSource

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logging.tensorboard=false", "train.log_every=50"]


def run_module(module: str, args: list[str], cache_dir: Path, nproc: int = 0,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m module` (nproc=0) or `torchrun --standalone --nproc_per_node=nproc -m module`."""
    env = dict(os.environ, VPT_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1" if nproc else "2",
               TOKENIZERS_PARALLELISM="false")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    cmd = [sys.executable, *launcher, "-m", module, *args, *QUIET]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)      # torchrun's workers too: a hung rank must not outlive the test
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (a hung rank?)\n{out[-3000:]}{err[-3000:]}")
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def eval_question_ids(vqa_dir: Path) -> list[int]:
    questions = json.loads((vqa_dir / "split" / "eval_questions.json").read_text())["questions"]
    return [q["question_id"] for q in questions]


def assert_official_results(vqa_dir: Path) -> list[dict]:
    results = json.loads((vqa_dir / "results.json").read_text())
    assert isinstance(results, list)
    assert all(set(r) == {"question_id", "answer"} for r in results)
    assert all(type(r["question_id"]) is int and type(r["answer"]) is str for r in results)
    assert sorted(r["question_id"] for r in results) == sorted(eval_question_ids(vqa_dir))
    return results


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, cache_dir) -> Path:
    """A few steps of pretraining (the demo's first step), checkpointed but not exported."""
    run = tmp_path_factory.mktemp("pretrain")
    run_module("pipeline.train", [f"run_dir={run}", "train.max_steps=4", "checkpoint.every=4",
                                  "train.eval_every=0", "data.batch_size=4"], cache_dir)
    return run


def test_full_finetune_beats_the_majority_baseline_by_30_points(tmp_path, cache_dir):
    run = tmp_path / "vqa"
    r = run_module("pipeline.eval.vqa_finetune", [
        f"run_dir={run}", "models=tiny", "vqa.synthetic.n_images=200", "train.max_steps=200",
        "train.eval_every=0", "checkpoint.every=200"], cache_dir)
    metrics = json.loads((run / "vqa" / "metrics.json").read_text())
    line = f"VQA accuracy {metrics['accuracy']:.2f}% vs majority baseline {metrics['majority_baseline']:.2f}%"
    assert line in r.stdout
    assert metrics["accuracy"] >= metrics["majority_baseline"] + 30, metrics
    # it reads the images, not only the question: colour questions are far above their 1-in-6 prior
    assert metrics["per_question_type"]["what color is the"] > 60, metrics["per_question_type"]
    assert set(metrics["per_answer_type"]) == {"yes/no", "other"}
    assert metrics["init_from"] is None and metrics["finetune_mode"] == "full"
    assert metrics["scene_graph"] is False and not (run / "vqa" / "scene_text.json").exists()

    results = assert_official_results(run / "vqa")
    assert metrics["n_eval_questions"] == len(results) > 100
    # the held-out images were never trained on
    train_images = {q["image_id"] for q in json.loads((run / "vqa/split/train_questions.json").read_text())["questions"]}
    eval_images = {q["image_id"] for q in json.loads((run / "vqa/split/eval_questions.json").read_text())["questions"]}
    assert train_images and eval_images and not train_images & eval_images


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache_dir, pretrain_run) -> tuple[Path, str]:
    """(run dir, stdout) of a short LoRA finetune from the pretraining checkpoint."""
    run = tmp_path_factory.mktemp("vqa-lora")
    r = run_module("pipeline.eval.vqa_finetune", [
        f"run_dir={run}", f"init_from={pretrain_run / 'checkpoints'}", "models=tiny", "finetune.mode=lora",
        "vqa.synthetic.n_images=30", "train.max_steps=20", "train.eval_every=10", "checkpoint.every=10"],
        cache_dir)
    return run, r.stdout


def test_lora_finetune_from_a_pretraining_checkpoint(lora_run):
    run, stdout = lora_run
    assert "VQA accuracy" in stdout
    metrics = json.loads((run / "vqa" / "metrics.json").read_text())
    assert metrics["finetune_mode"] == "lora" and metrics["train"]["step"] == 20
    assert_official_results(run / "vqa")

    # the start was the pretraining checkpoint, exported; the result is a plain VPT with the adapters merged
    init, _ = load_exported(Path(metrics["init_from"]))
    tuned, _ = load_exported(Path(metrics["model_dir"]))
    init_sd, tuned_sd = init.state_dict(), tuned.state_dict()
    assert set(init_sd) == set(tuned_sd)
    # frozen: the token embeddings (no adapter); changed: an adapted attention matrix and the image projection
    assert torch.equal(init_sd["backbone.shared.weight"], tuned_sd["backbone.shared.weight"])
    assert not torch.equal(init_sd["backbone.encoder.block.0.layer.0.SelfAttention.q.weight"],
                           tuned_sd["backbone.encoder.block.0.layer.0.SelfAttention.q.weight"])
    assert not torch.equal(init_sd["proj.clip.weight"], tuned_sd["proj.clip.weight"])


def test_a_lora_checkpoint_exports_as_the_merged_plain_model(lora_run, tmp_path):
    """`export_hf` / `resolve_init` on a LoRA-finetuned checkpoint: the checkpoint records its adapters, the export
    merges them (no LoRA keys left) and reloads with exactly the logits of the checkpoint's model merged by hand."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from peft import get_peft_model
    from transformers import AutoConfig, T5ForConditionalGeneration

    from pipeline.eval.vqa_finetune import lora_config
    from pipeline.train.__main__ import compose
    from pipeline.train.checkpoint import complete_checkpoints, export_hf, saved_adapters

    run, _ = lora_run
    root = run / "checkpoints"
    step_dir = complete_checkpoints(root)[-1][1]
    assert json.loads((step_dir / "meta.json").read_text())["adapters"] == {"backbone": "LORA"}
    exported, tokenizer = load_exported(export_hf(root, tmp_path / "export"))
    assert not any("lora" in k or "base_layer" in k for k in exported.state_dict())

    cfg = VPTConfig.from_dict(json.loads((root / "vpt_config.json").read_text()))
    by_hand = VPT(cfg, T5ForConditionalGeneration(AutoConfig.from_pretrained(root / "backbone")))
    by_hand.backbone = get_peft_model(by_hand.backbone, saved_adapters(step_dir)["backbone"])
    state = {"model": by_hand.state_dict()}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    by_hand.load_state_dict(state["model"])
    assert any(v.abs().sum() > 0 for k, v in state["model"].items() if "lora_B" in k)    # the adapters trained
    inputs = InputBuilder(tokenizer, cfg)(next(SyntheticSource(SyntheticConfig(), "eval", batch_size=4).batches(0)))
    with torch.no_grad():
        unmerged = by_hand.eval()(inputs)
        by_hand.backbone = by_hand.backbone.merge_and_unload()
        merged = by_hand.eval()(inputs)
        assert torch.equal(exported.eval()(inputs), merged)
        assert torch.allclose(merged, unmerged, atol=1e-4)
        # a LoRA finetuning run dir as init_from, and the run's own export, give the same model
        for model_dir in (resolve_init(str(run), tmp_path / "init"), run / "vqa" / "model"):
            assert torch.equal(load_exported(model_dir)[0].eval()(inputs), merged)

    # a checkpoint without the adapter record: refused, or exported with the finetune config given instead
    legacy = tmp_path / "legacy"
    shutil.copytree(root, legacy)
    legacy_step = legacy / step_dir.name
    shutil.rmtree(legacy_step / "adapters")
    meta = json.loads((legacy_step / "meta.json").read_text())
    (legacy_step / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "adapters"}))
    with pytest.raises(ValueError, match="LoRA"):
        export_hf(legacy_step, tmp_path / "refused")
    given = {"backbone": lora_config(compose(["finetune.mode=lora"], "train/vqa"))}
    with torch.no_grad():
        assert torch.equal(load_exported(export_hf(legacy_step, tmp_path / "given", given))[0].eval()(inputs), merged)


def test_scene_graph_option_feeds_each_image_s_scene_graph_text(tmp_path, cache_dir):
    """`vqa.scene_graph=true` (tiny detector, every query kept so the texts are not empty): each image goes once
    through the scene-graph code (the stage's decoding, detector + relation rules, serialiser), the samples carry
    that text as scene_text, a short finetune runs, and the texts are reused while nothing changed."""
    from pipeline.eval.vqa_data import index_images
    from pipeline.eval.vqa_finetune import build_source, check_vqa, load_scene_texts, scene_graph_texts
    from pipeline.scenegraph import DetectorRulesBackend, to_text
    from pipeline.scenegraph.frames import decode_frame
    from pipeline.train.__main__ import compose

    run = tmp_path / "vqa-sg"
    sg = ["vqa.scene_graph=true", "vqa.scenegraph.score_threshold=0.0", "vqa.scenegraph.max_objects=3",
          "vqa.scenegraph.batch_frames=4"]
    run_module("pipeline.eval.vqa_finetune", [
        f"run_dir={run}", "models=tiny", "device=cpu", "vqa.synthetic.n_images=12", "data.batch_size=4",
        "train.max_steps=4", "train.eval_every=0", "checkpoint.every=4", *sg], cache_dir)
    metrics = json.loads((run / "vqa" / "metrics.json").read_text())
    assert metrics["scene_graph"] is True and metrics["train"]["step"] == 4
    data = json.loads((run / "vqa" / "prepared.json").read_text())["data"]
    texts = load_scene_texts(Path(data["scene_text"]))

    images = index_images(run / "vqa" / "data" / "images")
    ids = sorted(images)
    backend = DetectorRulesBackend("facebook/detr-resnet-50", models="tiny", cache_dir=str(cache_dir), device="cpu",
                                   score_threshold=0.0, max_objects=3, batch_frames=4)
    graphs = backend.predict_frames([decode_frame(images[i].read_bytes(), 800) for i in ids])
    assert texts == {i: to_text(g) for i, g in zip(ids, graphs)}
    assert all(texts.values())

    by_question = {}
    for split in ("train", "eval"):
        source = build_source({"vqa": data | {"d_audio": 2048, "seed": 0}, "batch_size": 4}, split, 0, 1)
        by_question |= {e.question_id: e.image_id for e in source.examples}
        for batch in source.batches(0):
            for qid, scene_text in zip(batch["question_id"].tolist(), batch["scene_text"]):
                assert scene_text == texts[by_question[qid]]

    # texts the model would never see are refused up front
    assert "use_scene_graph" in check_vqa(compose(["vqa.scene_graph=true", "model.use_scene_graph=false"], "train/vqa"))
    assert check_vqa(compose(["vqa.scene_graph=true"], "train/vqa")) == ""

    # made once: the same settings and images reuse the file; another setting remakes it
    cfg = compose([f"run_dir={run}", "models=tiny", "device=cpu", *sg], "train/vqa") | {"cache_dir": str(cache_dir)}
    out = Path(data["scene_text"])
    before = out.stat().st_mtime_ns
    assert scene_graph_texts(images, cfg, out) == out and out.stat().st_mtime_ns == before
    cfg["vqa"]["scenegraph"]["max_objects"] = 1
    scene_graph_texts(images, cfg, out)
    assert out.stat().st_mtime_ns != before
    assert all(t and ";" not in t for t in load_scene_texts(out).values())     # one object each now


def test_init_from_accepts_an_export_a_checkpoint_or_a_run_dir(tmp_path, pretrain_run):
    root = pretrain_run / "checkpoints"
    step_dir = max(root.glob("step-*"))
    from_run = resolve_init(str(pretrain_run), tmp_path / "a")
    from_step = resolve_init(str(step_dir), tmp_path / "b")
    assert from_run == tmp_path / "a" and from_step == tmp_path / "b"
    assert resolve_init(str(from_run), tmp_path / "c") == from_run       # an export is used as is
    assert resolve_init(None, tmp_path / "d") is None
    a, _ = load_exported(from_run)
    b, _ = load_exported(from_step)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        resolve_init(str(tmp_path / "empty"), tmp_path / "e")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    s = make_synthetic_vqa(tmp_path_factory.mktemp("vqa-small"), n_images=20, seed=3)
    examples = load_vqa(s.questions_json, s.annotations_json, s.image_dir)
    g = torch.Generator().manual_seed(0)
    embeddings = {e.image_id: torch.randn(16, generator=g) for e in examples}   # unit test: fake features
    return examples, embeddings


def test_batches_follow_the_training_contract(small_set):
    examples, embeddings = small_set
    source = VQASource(examples, embeddings, "train", batch_size=4, seed=1, d_audio=8)
    batch = next(source.batches(0))
    by_question = {e.question_id: e for e in examples}
    assert batch["clip"].shape == (4, 1, 16) and batch["clip_mask"].all()
    assert batch["audio"].shape == (4, 8) and not batch["audio_mask"].any()
    assert batch["scene_text"] == [""] * 4          # no scene graphs unless given
    for i, qid in enumerate(batch["question_id"].tolist()):
        e = by_question[qid]
        assert batch["prev_text"][i] == e.question and batch["text"][i] == e.multiple_choice_answer
        assert torch.equal(batch["clip"][i, 0], embeddings[e.image_id])
    # one epoch: every question at most once; epochs differ in order; resuming mid-epoch continues it
    epoch0 = [q for b in source.batches(0) for q in b["question_id"].tolist()]
    assert len(epoch0) == len(set(epoch0)) == source.steps_per_epoch() * 4
    assert epoch0 != [q for b in source.batches(1) for q in b["question_id"].tolist()]
    assert [q for b in source.batches(0, 2) for q in b["question_id"].tolist()] == epoch0[8:]
    # two ranks share a step without overlap; the eval split covers every question exactly once
    ranks = [[q for b in VQASource(examples, embeddings, "train", 4, r, 2, seed=1, d_audio=8).batches(0)
              for q in b["question_id"].tolist()] for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    evaluated = [q for r in (0, 1) for b in VQASource(examples, embeddings, "eval", 4, r, 2, d_audio=8).batches(0)
                 for q, real in zip(b["question_id"].tolist(), b["sample_mask"].tolist()) if real]
    assert sorted(evaluated) == sorted(by_question)


@pytest.mark.parametrize("n,world,batch", [(9, 2, 4), (9, 2, 5), (5, 4, 1), (2, 3, 2), (0, 2, 3)])
def test_eval_batches_are_even_over_ranks_and_padding_is_masked(small_set, n, world, batch):
    """Every rank yields the same number of eval batches (FSDP forwards run in lockstep); padding rows repeat a
    question, carry no label and give no prediction; the real rows cover every question exactly once."""
    from pipeline.eval.vqa_finetune import predict

    examples, embeddings = small_set
    sources = [VQASource(examples[:n], embeddings, "eval", batch, r, world, d_audio=8) for r in range(world)]
    per_rank = [list(s.batches(0)) for s in sources]
    assert len({len(b) for b in per_rank}) == 1
    real = [q for bs in per_rank for b in bs for q, m in zip(b["question_id"].tolist(), b["sample_mask"].tolist())
            if m]
    assert sorted(real) == sorted(e.question_id for e in examples[:n])

    from pipeline.models.t5 import train_tokenizer
    from pipeline.models.vpt import VPTConfig
    from pipeline.train.data import InputBuilder

    tokenizer = train_tokenizer([e.question for e in examples] + ["red blue left right yes no"], vocab_size=120)
    builder = InputBuilder(tokenizer, VPTConfig(d_clip=16, d_audio=8))
    for b in (b for bs in per_rank for b in bs):
        labels = builder(b)["labels"]
        assert (labels[~b["sample_mask"]] == -100).all() and (labels[b["sample_mask"]] != -100).any(1).all()

    class Echo:             # a stand-in model: "generates" the first prompt token
        cfg = builder.cfg

        def eval(self):
            return self

        def to(self, device):
            return self

        def generate(self, inputs, **kw):
            return inputs["prompt_ids"][:, :1]

    predicted = [q for r in range(world) for q, _ in predict(Echo(), tokenizer, sources[r], torch.device("cpu"), 2)]
    assert sorted(predicted) == sorted(real)


def test_two_ranks_with_an_uneven_eval_split_finish_and_predict_every_question_once(tmp_path, cache_dir):
    """An odd number of eval questions, a batch size at which rank 0 had one eval batch more than rank 1: that
    extra FSDP forward used to wait forever on an all-gather rank 1 never joined."""
    data = make_synthetic_vqa(tmp_path / "data", n_images=40, seed=0)
    _, evaluation = split_examples(load_vqa(data.questions_json, data.annotations_json, data.image_dir), 0.2, 0)
    if len(evaluation) % 2 == 0:      # drop one eval question: an odd count
        drop = evaluation.pop().question_id
        for f, key in ((data.questions_json, "questions"), (data.annotations_json, "annotations")):
            d = json.loads(f.read_text())
            d[key] = [x for x in d[key] if x["question_id"] != drop]
            f.write_text(json.dumps(d))
    n, batch = len(evaluation), len(evaluation) // 2
    assert -(-((n + 1) // 2) // batch) == 2 and -(-(n // 2) // batch) == 1     # 2 vs 1 eval batches per rank
    run = tmp_path / "vqa"
    run_module("pipeline.eval.vqa_finetune", [
        f"run_dir={run}", f"dataset={data.root}", "models=tiny", "device=cpu", f"data.batch_size={batch}",
        "train.max_steps=4", "train.eval_every=2", "train.eval_steps=0", "checkpoint.every=4"],
        cache_dir, nproc=2, timeout=420)
    metrics = json.loads((run / "vqa" / "metrics.json").read_text())
    assert metrics["train"]["step"] == 4 and metrics["train"]["eval_loss"] > 0
    results = assert_official_results(run / "vqa")       # every eval question exactly once
    assert len(results) == metrics["n_eval_questions"] == n


def test_feature_statistics_come_from_training_images_only(small_set, tmp_path):
    examples, embeddings = small_set
    train, evaluation = split_examples(examples, 0.3, seed=0)
    assert train and evaluation
    train_ids = {e.image_id for e in train}
    stats = torch.load(feature_stats(embeddings, train_ids, "standardize", tmp_path / "s.pt"))
    z = torch.stack([(embeddings[i] - stats["shift"]) / stats["scale"] for i in sorted(train_ids)])
    assert torch.allclose(z.mean(0), torch.zeros(16), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones(16), atol=1e-4)
    plain = torch.load(feature_stats(embeddings, train_ids, "none", tmp_path / "n.pt"))
    assert torch.equal(plain["shift"], torch.zeros(16)) and torch.equal(plain["scale"], torch.ones(16))


def test_image_features_are_open_clip_s_own_embeddings_and_the_clip_stage_s(tmp_path, cache_dir):
    """The VQA CLIP features of an image are open_clip's `encode_image` of its eval transform (L2-normalised, stored
    as float16), and the clip stage's model gives the same numbers for the same pixels: one image encoder for both."""
    import open_clip

    from pipeline.eval.vqa_data import index_images, load_image
    from pipeline.eval.vqa_features import clip_model, embed_images, load_embeddings
    from pipeline.stages.clip import ClipConfig, ClipEmbedder
    from pipeline.train.__main__ import compose

    s = make_synthetic_vqa(tmp_path / "set", n_images=5, seed=1)
    images = index_images(s.image_dir)
    cfg = compose([f"run_dir={tmp_path}", "models=tiny", "device=cpu", "vqa.clip.frames_per_forward=2"],
                  "train/vqa") | {"cache_dir": str(cache_dir)}
    features = load_embeddings(embed_images(images, cfg, tmp_path / "emb.pt"))
    assert sorted(features) == sorted(images)

    name, pretrained = clip_model(cfg)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model.eval()
    pixels = torch.stack([preprocess(load_image(images[i])) for i in sorted(images)])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).to(torch.float16).float()
    got = torch.stack([features[i] for i in sorted(images)])
    assert torch.allclose(got, expected, atol=2e-3)
    assert len({tuple(r.tolist()) for r in got}) == len(images)     # distinct images, distinct features

    stage = ClipEmbedder(ClipConfig(frames_per_forward=3), name, pretrained, "cpu")
    (out,) = stage.predict([{"frame_idx": list(range(len(images))), "pts": [0.0] * len(images), "pixels": pixels}])
    assert torch.equal(torch.from_numpy(out["embedding"]).float(), got)
