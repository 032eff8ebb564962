"""A new expert added from outside the package: a stage module + a yaml + one modality entry, in a temporary
package, registered without editing `pipeline/`. It runs through the real engine (its stage), ingest (join,
verifier, Deep Lake), the loader and one training step of a tiny VPT.

The expert: the mean brightness of every sampled frame (the mean of its decoded RGB values / 255), per frame.
Oracle: the JPEGs the dataset itself stores, decoded by Deep Lake and averaged with numpy, row by row.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from benchmarks.ingest_bench import ingest_config, make_upstream, run_ingest_shards

STAGE_MODULE = '''
"""brightness: the mean brightness (0..1) of every sampled frame."""
import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.stages.base import ItemResult, Resources, Stage, StageConfig


@dataclass
class BrightnessConfig(StageConfig):
    name: str = "brightness"
    resources: Resources = field(default_factory=lambda: Resources(cpus=1, gpus=0, mem_gb=1))


class BrightnessStage(Stage):
    name = "brightness"
    Config = BrightnessConfig
    upstream = {"frames": ("frames",)}
    tables = {"brightness": ("video_id", "frame_idx")}
    schemas = {"brightness": pa.schema([("video_id", pa.string()), ("frame_idx", pa.int64()),
                                        ("pts", pa.float64()), ("brightness", pa.float32())])}

    def process_item(self, item):
        rows = []
        for f in item.rows("frames", "frames"):
            rgb = np.asarray(Image.open(io.BytesIO(f["jpeg"])).convert("RGB"), dtype=np.float64)
            rows.append({"video_id": item.video_id, "frame_idx": int(f["frame_idx"]), "pts": float(f["pts"]),
                         "brightness": float(rgb.mean() / 255.0)})
        return ItemResult(item.video_id, rows={"brightness": rows})


STAGE = BrightnessStage
'''

STAGE_YAML = '''
# brightness: per-frame mean brightness (a toy expert)
name: brightness
flush_every: 16
resources: {cpus: 1, gpus: 0, mem_gb: 1}
'''

MODALITY_MODULE = '''
"""The brightness modality: one value per sampled frame, fed to the model as a frame sequence of width 1."""
import pyarrow as pa

from pipeline.loader import collate_frame_values
from pipeline.modalities import FRAME, Column, Encoder, Modality, Stored


def attach(span):
    return {"brightness": [float(r["brightness"]) for r in span.keyed]}, []


def check_row(row, tol):
    n, want = len(row.get("brightness") or []), len(row.get("frame_idx") or [])
    return [] if n == want else [f"{n} brightness values for {want} frames"]


def from_dataset(values, row):
    return {"brightness": [float(x) for x in values["brightness"]]}


def collate(samples, source):
    return collate_frame_values("brightness", samples, source.cfg.max_frames)


MODALITY = Modality(
    "brightness", "brightness", ("brightness",), "brightness", FRAME,
    columns=(Column("brightness", pa.list_(pa.float32())),),
    stored=(Stored("brightness", "Array(Float32, 1)", "list:float32"),),
    attach=attach, check_row=check_row, dataset_columns=("brightness",), from_dataset=from_dataset,
    read=("brightness",), collate=collate,
    encoder=Encoder("sequence", ("brightness", "brightness_mask"), width=1))
'''

PLUGIN_MODULE = '''
"""Registers the toy expert (for VPT_MODALITIES=toyexpert.plugin)."""
from pipeline import modalities, stages
from toyexpert.modality import MODALITY

modalities.register(MODALITY)
stages.register("brightness", "toyexpert.brightness")
'''


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    pkg = tmp_path / "plugins" / "toyexpert"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "brightness.py").write_text(STAGE_MODULE)
    (pkg / "brightness.yaml").write_text(STAGE_YAML)
    (pkg / "modality.py").write_text(MODALITY_MODULE)
    (pkg / "plugin.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(pkg.parent))
    yield pkg
    for name in [m for m in sys.modules if m == "toyexpert" or m.startswith("toyexpert.")]:
        del sys.modules[name]


def stage_config(run: Path, yaml_path: Path):
    """The toy stage's config: its yaml on the run-level keys of a composed config, validated as every stage's."""
    from omegaconf import OmegaConf

    from pipeline.config import compose, from_container

    base = OmegaConf.to_container(compose(["stage=frames", f"run_dir={run}", "models=tiny"]), resolve=True)
    base["stage"] = OmegaConf.to_container(OmegaConf.load(yaml_path))
    return from_container(base)


def test_toy_expert_through_ingest_verify_loader_and_a_training_step(toy_package, tmp_path, cache_dir):
    import torch

    from pipeline import modalities, stages
    from pipeline.engine import run_shard
    from pipeline.loader import DeepLakeSource, LoaderConfig
    from pipeline.manifest import load_items
    from pipeline.models.vpt import VPTConfig, build_vpt, lm_losses
    from pipeline.schema import row_schema
    from pipeline.shards import ShardStore
    from pipeline.dataset import open_read_only
    from pipeline.stages.ingest import IngestStage, write_dataset
    from pipeline.train.data import InputBuilder
    from pipeline.verify import verify_run
    from toyexpert.modality import MODALITY

    run = make_upstream(tmp_path / "run", n_videos=4, num_shards=2, seconds=8.0, image_size=24)
    builtin_schema = row_schema()
    with modalities.registered(MODALITY), stages.registered(brightness="toyexpert.brightness"):
        # generated from the one entry: stage order, ingest's upstream, the row schema, the Deep Lake columns
        assert stages.stage_order() == list(stages.STAGES)
        assert list(stages.STAGES).index("brightness") > list(stages.STAGES).index("frames")
        assert list(stages.STAGES)[-1] == "ingest"
        assert IngestStage.upstream["brightness"] == ("brightness",)
        assert row_schema().names == builtin_schema.names + ["brightness"]

        cfg = stage_config(run, toy_package / "brightness.yaml")
        shards = sorted({i.shard for i in load_items(run)})
        for shard in shards:
            run_shard(cfg, shard)
        run_ingest_shards(ingest_config(run))
        result = write_dataset(ingest_config(run))
        assert result["shards_refused"] == {} and result["dataset_violations"] == [], result
        assert verify_run(run) == []

        # the dataset's brightness against the dataset's own frames, decoded by Deep Lake, averaged here
        ds = open_read_only(run)
        n = len(ds)
        frames_in = sum(ShardStore(run, "frames", s).read_table("frames").num_rows for s in shards)
        assert n > 0
        seen_frames = 0
        stored = {}
        for i in range(n):
            images = ds["frames"][i]
            values = np.asarray(ds["brightness"][i], dtype=np.float64)
            oracle = np.array([np.asarray(img, dtype=np.float64).mean() / 255.0 for img in images])
            assert len(values) == len(oracle) == len(ds["frame_idx"][i])
            np.testing.assert_allclose(values, oracle, atol=1.5 / 255)
            seen_frames += len(values)
            stored[(str(ds["video_id"][i]), int(ds["segment_idx"][i]))] = values
        assert seen_frames >= frames_in * 0.5   # (spans cover the frames; a frame at a boundary may be in two rows)
        assert len({v for vals in stored.values() for v in np.round(vals, 4)}) > 3   # not a constant

        # the verifier's checks of the new modality: a frame without its row is named
        victim = ShardStore(run, "brightness", shards[0])
        table = victim.read_table("brightness")
        from pipeline.atomic import write_parquet

        write_parquet(victim.table_path("brightness"), table.slice(1))
        problems = [str(v) for v in verify_run(run, check_dataset=False)]
        assert any("brightness: " in p and "sampled frames" in p for p in problems), problems[:5]
        assert any("brightness frame_idx != frames'" in p for p in problems), problems[:5]
        write_parquet(victim.table_path("brightness"), table)

        # the loader collates it: [B, F, 1] + mask, the stored values in frame order
        src = DeepLakeSource(str(run),
                             LoaderConfig(batch_size=4, split_fractions=(1.0, 0.0, 0.0), max_frames=64))
        batch = next(iter(src.batches(0)))
        assert batch["brightness"].shape[:2] == batch["brightness_mask"].shape and batch["brightness"].shape[2] == 1
        for k, (vid, seg) in enumerate(zip(batch["video_id"], batch["segment_idx"].tolist())):
            want = stored[(vid, seg)]
            got = batch["brightness"][k, batch["brightness_mask"][k], 0].numpy()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

        # one training step of a tiny VPT that takes it: a projector keyed by its name, which gets gradient
        cfg_model = VPTConfig(backbone="tiny", d_clip=16, d_audio=32, max_frames=64,
                              modalities=["clip", "audio", "scenegraph", "asr", "brightness"])
        torch.manual_seed(0)
        model, tokenizer = build_vpt(cfg_model, cache_dir)
        assert set(model.proj) == {"clip", "audio", "brightness"}
        inputs = InputBuilder(tokenizer, cfg_model)(batch)
        assert torch.equal(inputs["brightness_mask"], batch["brightness_mask"])
        before = model.proj["brightness"].weight.detach().clone()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ce, _, _ = lm_losses(model(inputs), inputs["labels"])
        ce.backward()
        grad = model.proj["brightness"].weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0
        optimizer.step()
        assert not torch.equal(before, model.proj["brightness"].weight)
        # without the brightness positions the encoder output differs: the values reach the model
        with torch.no_grad():
            emb, _ = model.encode(inputs)
            changed = dict(inputs, brightness=inputs["brightness"] + 0.5)
            emb2, _ = model.encode(changed)
        assert not torch.equal(emb, emb2)
    # the registries are restored
    assert "brightness" not in {m.name for m in modalities.all_modalities()}
    assert "brightness" not in stages.STAGES and row_schema().names == builtin_schema.names
    assert "brightness" not in IngestStage.upstream


def test_a_plugin_named_in_the_environment_registers_in_every_process(toy_package):
    code = textwrap.dedent("""
        from pipeline import modalities, stages
        from pipeline.schema import row_schema
        from pipeline.stages.ingest import IngestStage
        print(",".join(stages.STAGES), row_schema().names[-1], IngestStage.upstream["brightness"])
    """)
    env = dict(os.environ, VPT_MODALITIES="toyexpert.plugin",
               PYTHONPATH=os.pathsep.join([str(toy_package.parent), str(REPO)]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["download,frames,asr,clip,audio,scenegraph,brightness,ingest", "brightness",
                                  "('brightness',)"], out.stdout


def test_a_plugin_stage_runs_from_the_command_line(toy_package, tmp_path):
    """`python -m pipeline stage=brightness` with the plugin named in VPT_MODALITIES: the stage's settings come from
    the yaml beside its module (flush_every 5 there, 16 in the schema), `--help` says so, a key its schema lacks
    is refused, and the run completes every shard with a brightness row per frame the frames stage kept."""
    from conftest import run_cli

    from pipeline.shards import ShardStore

    run = make_upstream(tmp_path / "run", n_videos=3, num_shards=2, seconds=6.0, image_size=24)
    env = {"VPT_MODALITIES": "toyexpert.plugin", "PYTHONPATH": os.pathsep.join([str(toy_package.parent), str(REPO)])}
    yaml = toy_package / "brightness.yaml"
    own = STAGE_YAML.replace("flush_every: 16", "flush_every: 5")
    assert own != STAGE_YAML
    yaml.write_text(own)

    def flush_every() -> str:
        usage = run_cli("stage=brightness", "--help", env=env).stdout
        line = next(ln for ln in usage.splitlines() if ln.strip().startswith("stage.flush_every"))
        return line.split("=")[1].split()[0]

    usage = run_cli("stage=brightness", "--help", env=env).stdout
    assert str(toy_package / "brightness.yaml") in usage.splitlines()[0]
    assert flush_every() == "5"
    bad = run_cli("stage=brightness", f"run_dir={run}", "stage.colour=red", env=env, check=False)
    assert bad.returncode == 2 and "colour" in bad.stderr and not (run / "brightness").exists()
    unknown = run_cli("stage=brightness", f"run_dir={run}", check=False)      # without the plugin: not a stage
    assert unknown.returncode == 2 and "unknown stage 'brightness'" in unknown.stderr
    typo = run_cli("stage=brightness", f"run_dir={run}", env={**env, "VPT_MODALITIES": "toyexpert.plugins"},
                   check=False)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == \
        ["error: VPT_MODALITIES=toyexpert.plugins: No module named 'toyexpert.plugins'"], typo.stderr
    # a yaml written like conf/stage's (its schema named in a defaults list) is read the same; a key its schema
    # lacks is one error line naming the file
    yaml.write_text("defaults:\n  - /schema/stage/brightness@_here_\n  - _self_\n" + own)
    assert flush_every() == "5"
    yaml.write_text(own + "colour: red\n")
    wrong = run_cli("stage=brightness", f"run_dir={run}", env=env, check=False)
    assert wrong.returncode == 2 and str(yaml) in wrong.stderr and "colour" in wrong.stderr, wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and not (run / "brightness").exists()
    yaml.write_text(own)
    run_cli("stage=brightness", f"run_dir={run}", "models=tiny", env=env)

    def keys(stage: str, table: str) -> list[tuple[str, int]]:     # every shard's (video, frame) keys
        got = [ShardStore(run, stage, s).read_table(table) for s in range(2)]
        return sorted((v, int(i)) for t in got if t is not None
                      for v, i in zip(t.column("video_id").to_pylist(), t.column("frame_idx").to_pylist()))

    assert all(ShardStore(run, "brightness", s).is_complete() for s in range(2))
    assert keys("brightness", "brightness") == keys("frames", "frames") and len(keys("frames", "frames")) > 3
