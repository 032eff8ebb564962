"""The modality list (`pipeline.modalities`) and what is generated from it: the row schema and Deep Lake columns of
the existing datasets stay as they are, the stage order comes from the upstream graph, the registry is restored,
and a VPT names its modalities: weights of other modalities are refused, weights of the earlier layout load."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from pipeline import modalities, stages
from pipeline.errors import ConfigError
from pipeline.models.vpt import VPT, VPTConfig, save_exported

WORD = pa.struct([("word", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
                  ("probability", pa.float64())])
SCENE = pa.struct([("frame_idx", pa.int64()), ("pts", pa.float64()), ("text", pa.string()), ("graph", pa.string())])
# The rows tables and datasets written so far have exactly these columns, in this order: the contract with them.
WRITTEN_ROWS = pa.schema([
    ("video_id", pa.string()), ("segment_idx", pa.int64()),
    ("start", pa.float64()), ("end", pa.float64()), ("is_speech", pa.bool_()),
    ("text", pa.string()), ("words", pa.list_(WORD)), ("prev_text", pa.string()),
    ("frame_idx", pa.list_(pa.int64())), ("frame_pts", pa.list_(pa.float64())),
    ("frame_kind", pa.list_(pa.string())), ("frame_shot", pa.list_(pa.int64())),
    ("frames", pa.list_(pa.binary())),
    ("clip", pa.list_(pa.list_(pa.float16()))), ("clip_frame_idx", pa.list_(pa.int64())),
    ("clip_pts", pa.list_(pa.float64())), ("clip_model", pa.string()),
    ("audio", pa.list_(pa.float16())), ("has_audio", pa.bool_()),
    ("audio_start", pa.float64()), ("audio_end", pa.float64()),
    ("audio_labels", pa.list_(pa.string())), ("audio_scores", pa.list_(pa.float32())),
    ("scene_graphs", pa.list_(SCENE)), ("scene_text", pa.string()),
    ("flags", pa.string()), ("shard", pa.int64()), ("provenance", pa.string()), ("content_id", pa.string()),
])
WRITTEN_DATASET = ["video_id", "segment_idx", "start", "end", "is_speech", "text", "words", "prev_text", "frame_idx",
                   "frame_pts", "frame_info", "frames", "clip", "clip_frame_idx", "clip_model", "audio", "has_audio",
                   "audio_start", "audio_end", "audio_tags", "scene_graphs", "scene_text", "flags", "shard",
                   "provenance", "content_id"]


def test_the_generated_row_schema_and_dataset_columns_are_those_already_written():
    from pipeline.schema import ROW_SCHEMA, deeplake_columns, row_schema

    assert ROW_SCHEMA.equals(WRITTEN_ROWS) and row_schema().equals(WRITTEN_ROWS)
    assert list(deeplake_columns()) == WRITTEN_DATASET
    from pipeline.loader import COLUMNS, columns

    assert columns() == COLUMNS


def test_ingest_reads_every_modality_stage():
    from pipeline.stages.ingest import IngestStage

    assert dict(IngestStage.upstream) == {"download": ("videos",), "asr": ("segments", "videos"),
                                          "frames": ("frames", "videos"), "clip": ("clip",),
                                          "audio": ("audio", "videos"), "scenegraph": ("scenegraph",)}


def test_stage_order_is_a_topological_order_of_the_upstream_graph():
    order = stages.stage_order()
    assert order == list(stages.STAGES)
    for name in order:
        for up in stages.get_stage(name).upstream:
            assert order.index(up) < order.index(name), (up, name)


def test_a_cycle_or_an_unknown_upstream_stage_is_one_config_error(tmp_path, monkeypatch):
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, up in (("a", "b"), ("b", "a"), ("c", "nowhere")):
        (pkg / f"{name}.py").write_text(f"class S:\n    upstream = {{'{up}': ('t',)}}\nSTAGE = S\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="cycle"):
        stages.stage_order({"a": "cyc.a", "b": "cyc.b"})
    with pytest.raises(ConfigError, match="unregistered stage"):
        stages.stage_order({"c": "cyc.c"})
    before = dict(stages.STAGES)
    with pytest.raises(ConfigError):
        with stages.registered(c="cyc.c"):
            pass
    assert stages.STAGES == before


def test_registering_a_taken_name_or_column_is_refused_and_the_registry_restored():
    before = modalities.all_modalities()
    with pytest.raises(ValueError, match="already registered"):
        modalities.register(modalities.Modality("clip", "x"))
    clash = modalities.Modality("dup", "dup", columns=(modalities.Column("scene_text", pa.string()),))
    with pytest.raises(ValueError, match="already exist"):
        modalities.register(clash)
    ok = modalities.Modality("extra", "extra", columns=(modalities.Column("extra_value", pa.float32()),))
    with pytest.raises(RuntimeError):
        with modalities.registered(ok):
            assert modalities.row_schema().names[-1] == "extra_value"
            raise RuntimeError("inside")
    assert modalities.all_modalities() == before


def _backbone():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(1)
    return T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                               num_heads=2, decoder_start_token_id=0))


def _inputs(d_clip=8, d_audio=5):
    g = torch.Generator().manual_seed(3)
    return {"clip": torch.randn(2, 3, d_clip, generator=g), "clip_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(),
            "frame_time": torch.rand(2, 3, generator=g), "audio": torch.randn(2, d_audio, generator=g),
            "audio_mask": torch.tensor([True, False]), "scene_ids": torch.randint(0, 40, (2, 4), generator=g),
            "scene_mask": torch.ones(2, 4).bool(), "prompt_ids": torch.randint(0, 40, (2, 3), generator=g),
            "prompt_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()}


def test_projectors_are_keyed_by_modality_and_weights_of_the_earlier_layout_load():
    cfg = VPTConfig(backbone="x", d_clip=8, d_audio=5, time_features=4)
    model = VPT(cfg, _backbone()).eval()
    assert set(model.proj) == {"clip", "audio"} and model.type_embed.weight.shape[0] == 4
    # weights saved when the projectors were attributes (frame_proj, audio_proj) and the type table had 4 rows
    legacy = {k.replace("proj.clip.", "frame_proj.").replace("proj.audio.", "audio_proj."): v
              for k, v in model.state_dict().items()}
    assert "frame_proj.weight" in legacy and "audio_proj.weight" in legacy
    fresh = VPT(cfg, _backbone()).eval()
    torch.nn.init.zeros_(fresh.proj["clip"].weight)
    fresh.load_state_dict(legacy)
    assert torch.equal(fresh.encode(_inputs())[0], model.encode(_inputs())[0])


def test_weights_or_an_export_of_other_modalities_are_refused_by_name(tmp_path):
    from pipeline.models.vpt import load_exported

    full = VPT(VPTConfig(backbone="x", d_clip=8, d_audio=5, time_features=4), _backbone())
    no_audio = VPT(VPTConfig(backbone="x", d_clip=8, d_audio=5, time_features=4,
                             modalities=["clip", "scenegraph", "asr"]), _backbone())
    with pytest.raises(ValueError, match=r"modalities \['audio', 'clip'\].*\['clip'\]"):
        no_audio.load_state_dict(full.state_dict())

    class Tok:
        def save_pretrained(self, path):
            pass

    out = save_exported(full, Tok(), tmp_path / "export")
    assert json.loads((out / "vpt_config.json").read_text())["modalities"] == ["clip", "audio", "scenegraph", "asr"]
    with pytest.raises(ValueError, match="was made with modalities .*, but the model config names"):
        load_exported(out, modalities=["clip", "scenegraph", "asr"])
    with pytest.raises(ValueError, match="unknown modality 'sonar'"):
        VPT(VPTConfig(backbone="x", d_clip=8, d_audio=5, modalities=["clip", "sonar"]), _backbone())


def test_a_training_run_refuses_checkpoints_of_other_modalities(tmp_path):
    from pipeline.train.loop import check_checkpoint_modalities

    (tmp_path / "vpt_config.json").write_text(json.dumps({"modalities": ["clip", "audio"]}))
    with pytest.raises(ValueError, match=r"checkpoints in .* was made with modalities \['clip', 'audio'\]"):
        check_checkpoint_modalities(tmp_path, VPTConfig())
    (tmp_path / "vpt_config.json").write_text(json.dumps({"backbone": "tiny"}))     # written before the field
    check_checkpoint_modalities(tmp_path, VPTConfig())


def test_switches_and_token_counts_follow_the_encoders():
    from pipeline.train.data import InputBuilder

    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[2 + len(w) for w in t.split()] for t in texts]}

    cfg = VPTConfig(backbone="x", d_clip=8, d_audio=5, max_frames=2, use_audio=False)
    batch = {"clip": torch.ones(2, 3, 8), "clip_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]).bool(),
             "frame_time": torch.zeros(2, 3), "audio": torch.ones(2, 5), "audio_mask": torch.tensor([True, True]),
             "scene_text": ["a b", ""], "prev_text": ["x", "y z w"], "text": ["t", "u v"]}
    builder = InputBuilder(Tok(), cfg)
    inputs = builder(batch)
    assert list(inputs)[:9] == ["clip", "clip_mask", "frame_time", "audio", "audio_mask", "scene_ids", "scene_mask",
                                "prompt_ids", "prompt_mask"]
    assert inputs["clip"].shape == (2, 2, 8)          # max_frames, evenly spaced: frames 0 and 2
    counts = builder.token_counts(inputs)
    # frames 2 + 1 (after the cut), audio off, scene tokens 2+1 and 0+1, prompt 1+1 and 3+1, targets 1+1 and 2+1
    assert counts == {"encoder": 3 + 4 + 6, "frames": 3, "audio": 0, "decoder": 5}
