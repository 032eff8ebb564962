"""The modalities, declared once: what each expert contributes to a row, the dataset, the batch and the model.

Per modality (`Modality`): the stage that produces it and the tables ingest reads from that stage, its
alignment key (one row per sampled frame, per segment, or per video), its row columns with their Arrow types,
the Deep Lake columns they are stored in, which of them are bulky (the verifier counts them and reads nothing
else), how the join attaches it to a span, its checks, the dataset columns the loader reads, how they are
collated into the batch, and the encoder input it feeds. Everything else is generated from this list:

- the row schema and the Deep Lake mapping (`pipeline.schema.row_schema`, `deeplake_columns`,
  `to_deeplake_columns`);
- ingest's `upstream` (`upstream()`, read live by `IngestStage.upstream`) and so the stage order
  (`pipeline.stages.stage_order`, a topological sort of the stages' `upstream` graphs);
- the join's per-modality attachment (`pipeline.join.join_video`) and the verifier's per-modality checks
  (`pipeline.verify`);
- the loader's columns and collation (`pipeline.loader`), the model inputs (`pipeline.train.data.InputBuilder`)
  and the VPT's input projectors, an `nn.ModuleDict` keyed by modality name (`pipeline.models.vpt`), whose
  names the model config records (`VPTConfig.modalities`), so a checkpoint names its modalities.

The frames (`frames`) and speech segments (`asr`) are the spine every row is built on (the join plans spans
from the segments and picks each span's frames by PTS itself); the experts hang off them by key.

A new expert is one stage module + one yaml + one `register(Modality(...))` (and `pipeline.stages.register`
for its stage), from any package: nothing here needs editing. `registered(...)` registers for a `with` block
and restores the registry after it; `VPT_MODALITIES=package.module` has every process of a run load such a
registering module when it imports this one. Functions are given as callables or as "package.module:name" strings
(resolved on first use, so that this module imports nothing heavy).
"""
from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Union

import numpy as np
import pyarrow as pa

from . import cells

FRAME, SEGMENT, VIDEO = "frame", "segment", "video"      # alignment keys
KEY_COLUMN = {FRAME: "frame_idx", SEGMENT: "segment_idx", VIDEO: None}

Ref = Union[str, Callable[..., Any], None]


def resolve(ref: Ref) -> Callable[..., Any] | None:
    """A callable, or "package.module:name" -> that object."""
    if ref is None or callable(ref):
        return ref
    module, _, name = str(ref).partition(":")
    return getattr(importlib.import_module(module), name)


def _deeplake_type(spec: str) -> Any:
    """"Text", "Int64", "Array(Float16, 2)", "Sequence(Image(jpg))", "Dict"... -> a deeplake type."""
    from deeplake import types

    if spec.startswith("Array("):
        inner, dims = spec[len("Array("):-1].split(",")
        return types.Array(getattr(types, inner.strip())(), dimensions=int(dims))
    if spec == "Sequence(Image(jpg))":
        return types.Sequence(types.Image(sample_compression="jpg"))
    return getattr(types, spec)()


@dataclass(frozen=True)
class Column:
    """One row column (Arrow)."""
    name: str
    arrow: pa.DataType


@dataclass(frozen=True)
class Stored:
    """One Deep Lake column: its type (see `_deeplake_type`) and how it is built from a `rows` table.

    `convert`: None stores the row column of the same name as it is (`to_pylist`); "list:<numpy dtype>" a list of
    numbers as one numpy vector per row (cut from the Arrow buffers); else a function (pa.Table -> list)."""
    name: str
    dtype: str
    convert: Ref = None


@dataclass(frozen=True)
class Encoder:
    """The encoder input a modality feeds (`pipeline.models.vpt.VPT.encode`).

    kind: "frames" (a sequence of frame vectors [B, F, D] + mask [B, F] + frame times [B, F]: projector, type
    embedding and time features), "sequence" ([B, N, D] + mask [B, N]: projector + type embedding), "vector"
    ([B, D] + mask [B]: one position) or "text" (a batch text column, tokenised, cut to `max_tokens` keeping its
    start or end: backbone token embeddings + type embedding).
    inputs: the model-input keys: (value, mask[, time]); for text (ids, mask).
    text: the batch column a text input is tokenised from. width: the expert's vector width, an int or the name
    of a `VPTConfig` field. switch: the `VPTConfig` flag that turns the input off. count: the `token_counts` key
    of its positions (None: counted in "encoder" only)."""
    kind: str
    inputs: tuple[str, ...]
    width: Union[int, str] = 0
    switch: str | None = None
    text: str | None = None
    max_tokens: str | None = None
    keep: str = "start"
    count: str | None = None

    @property
    def projected(self) -> bool:
        return self.kind in ("frames", "sequence", "vector")


@dataclass(frozen=True)
class Modality:
    """See the module docstring. `attach(span) -> (row columns, flags)` (`pipeline.join.Span`);
    `check_row(row, tol) -> [problem]`; `check_keys(video_id, inputs, params, modality) -> [Violation]`
    (default for frame-keyed modalities: one row per sampled frame); `from_dataset(values) -> row fields` for the
    dataset-level row check (values: `dataset_columns` of one dataset row); `collate(samples, source) -> batch
    entries` (`pipeline.loader.DeepLakeSource`)."""
    name: str
    stage: str | None
    tables: tuple[str, ...] = ()          # the stage's tables ingest reads per item
    table: str | None = None              # the one holding the keyed rows
    key: str = VIDEO
    columns: tuple[Column, ...] = ()
    stored: tuple[Stored, ...] = ()
    bulky: Mapping[str, str | None] = field(default_factory=dict)   # row column -> its count column (None: drop)
    heavy: frozenset[str] = frozenset()   # upstream columns no check reads (left unread by the verifier)
    one_per_key: bool = True              # frame-keyed: exactly one row per sampled frame (counted, keys checked)
    attach: Ref = None
    check_row: Ref = None
    check_keys: Ref = None
    dataset_columns: tuple[str, ...] = ()
    from_dataset: Ref = None
    read: tuple[str, ...] = ()            # dataset columns the loader reads
    collate: Ref = None
    encoder: Encoder | None = None

    def __post_init__(self):
        if self.key not in KEY_COLUMN:
            raise ValueError(f"modality {self.name}: key must be one of {sorted(KEY_COLUMN)}, got {self.key!r}")
        if self.encoder is not None and self.encoder.kind not in ("frames", "sequence", "vector", "text"):
            raise ValueError(f"modality {self.name}: unknown encoder kind {self.encoder.kind!r}")


# ----------------------------------------------------------------------------------------------- the spine

WORD = pa.struct([("word", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
                  ("probability", pa.float64())])
SCENE = pa.struct([("frame_idx", pa.int64()), ("pts", pa.float64()), ("text", pa.string()),
                   ("graph", pa.string())])      # graph: {"objects": [...], "relations": [...]} as JSON

HEAD = (Column("video_id", pa.string()), Column("segment_idx", pa.int64()), Column("start", pa.float64()),
        Column("end", pa.float64()), Column("is_speech", pa.bool_()))
TAIL = (Column("flags", pa.string()), Column("shard", pa.int64()), Column("provenance", pa.string()),
        Column("content_id", pa.string()))


def _nan_for_none(name: str) -> Callable[[pa.Table], list]:
    def convert(table: pa.Table) -> list:
        return [math.nan if x is None else x for x in table.column(name).to_pylist()]
    return convert


def _dict_of(**parts: str) -> Callable[[pa.Table], list]:
    """Deep Lake Dict cells {key: row column's value or []} (Deep Lake 4.7 rejects an empty Sequence(Text))."""
    def convert(table: pa.Table) -> list:
        cols = {k: table.column(c).to_pylist() for k, c in parts.items()}
        return [{k: cols[k][i] or [] for k in parts} for i in range(table.num_rows)]
    return convert


def _provenance(table: pa.Table) -> list:
    # one JSON string per video, repeated on each of its rows: parsed once (Deep Lake copies each cell it appends)
    parsed: dict[str, Any] = {}
    return [(parsed[p] if p in parsed else parsed.setdefault(p, json.loads(p))) if p else {}
            for p in table.column("provenance").to_pylist()]


def _content_id(table: pa.Table) -> list:
    if "content_id" not in table.column_names:
        return [""] * table.num_rows
    return [c or "" for c in table.column("content_id").to_pylist()]


def _frames(table: pa.Table) -> list:
    return [x if x is not None else [] for x in table.column("frames").to_pylist()]


def _clip(table: pa.Table) -> list:
    return cells.clip_cells(cells.column_array(table, "clip"))


HEAD_STORED = (Stored("video_id", "Text"), Stored("segment_idx", "Int64"), Stored("start", "Float64"),
               Stored("end", "Float64"), Stored("is_speech", "Bool"))
TAIL_STORED = (Stored("flags", "Text"), Stored("shard", "Int64"), Stored("provenance", "Dict", _provenance),
               Stored("content_id", "Text", _content_id))    # split key; added to older datasets

# The download stage's per-video table (duration, content_id) is read by the join for every video.
SPINE_UPSTREAM = {"download": ("videos",)}

BUILTIN: tuple[Modality, ...] = (
    Modality(
        "asr", "asr", ("segments", "videos"), "segments", SEGMENT,
        columns=(Column("text", pa.string()), Column("words", pa.list_(WORD)), Column("prev_text", pa.string())),
        stored=(Stored("text", "Text"), Stored("words", "Dict", _dict_of(words="words")),
                Stored("prev_text", "Text")),
        bulky={"words": None}, read=("text", "prev_text"), collate="pipeline.loader:collate_text",
        encoder=Encoder("text", ("prompt_ids", "prompt_mask"), switch="use_prompt", text="prev_text",
                        max_tokens="max_prompt_tokens", keep="end")),
    Modality(
        "frames", "frames", ("frames", "videos"), "frames", FRAME,
        columns=(Column("frame_idx", pa.list_(pa.int64())), Column("frame_pts", pa.list_(pa.float64())),
                 Column("frame_kind", pa.list_(pa.string())), Column("frame_shot", pa.list_(pa.int64())),
                 Column("frames", pa.list_(pa.binary()))),
        stored=(Stored("frame_idx", "Array(Int64, 1)", "list:int64"),
                Stored("frame_pts", "Array(Float64, 1)", "list:float64"),
                Stored("frame_info", "Dict", _dict_of(kind="frame_kind", shot="frame_shot")),
                Stored("frames", "Sequence(Image(jpg))", _frames)),
        bulky={"frames": "n_jpeg"}, heavy=frozenset({"jpeg"}), check_row="pipeline.verify.checks:check_frame_row"),
    Modality(
        "clip", "clip", ("clip",), "clip", FRAME,
        columns=(Column("clip", pa.list_(pa.list_(pa.float16()))), Column("clip_frame_idx", pa.list_(pa.int64())),
                 Column("clip_pts", pa.list_(pa.float64())), Column("clip_model", pa.string())),
        stored=(Stored("clip", "Array(Float16, 2)", _clip),                  # ragged n_frames x D
                Stored("clip_frame_idx", "Array(Int64, 1)", "list:int64"),  # the frame of each clip row
                Stored("clip_model", "Text")),
        bulky={"clip": "n_clip"}, heavy=frozenset({"embedding"}),
        attach="pipeline.join:attach_clip", check_row="pipeline.verify.checks:check_clip_row",
        dataset_columns=("clip",), from_dataset="pipeline.verify.dataset:clip_from_dataset",
        read=("clip", "frame_pts"), collate="pipeline.loader:collate_clip",
        encoder=Encoder("frames", ("clip", "clip_mask", "frame_time"), width="d_clip", switch="use_frames",
                        count="frames")),
    Modality(
        "audio", "audio", ("audio", "videos"), "audio", SEGMENT,
        columns=(Column("audio", pa.list_(pa.float16())), Column("has_audio", pa.bool_()),
                 Column("audio_start", pa.float64()), Column("audio_end", pa.float64()),
                 Column("audio_labels", pa.list_(pa.string())), Column("audio_scores", pa.list_(pa.float32()))),
        stored=(Stored("audio", "Array(Float16, 1)", "list:float16"),      # empty when has_audio is False
                Stored("has_audio", "Bool"),
                Stored("audio_start", "Float64", _nan_for_none("audio_start")),   # NaN: no audio row
                Stored("audio_end", "Float64", _nan_for_none("audio_end")),
                Stored("audio_tags", "Dict", _dict_of(labels="audio_labels", scores="audio_scores"))),
        bulky={"audio": None}, heavy=frozenset({"embedding"}),
        attach="pipeline.join:attach_audio", check_row="pipeline.verify.checks:check_audio_row",
        check_keys="pipeline.verify.checks:check_audio_keys",
        dataset_columns=("audio_start", "audio_end"), from_dataset="pipeline.verify.dataset:audio_from_dataset",
        read=("audio", "has_audio"), collate="pipeline.loader:collate_audio",
        encoder=Encoder("vector", ("audio", "audio_mask"), width="d_audio", switch="use_audio", count="audio")),
    Modality(
        "scenegraph", "scenegraph", ("scenegraph",), "scenegraph", FRAME,
        columns=(Column("scene_graphs", pa.list_(SCENE)), Column("scene_text", pa.string())),
        stored=(Stored("scene_graphs", "Dict", _dict_of(frames="scene_graphs")), Stored("scene_text", "Text")),
        attach="pipeline.join:attach_scenegraph", check_row="pipeline.verify.checks:check_scenegraph_row",
        dataset_columns=("scene_graphs",), from_dataset="pipeline.verify.dataset:scenegraph_from_dataset",
        read=("scene_text",), collate="pipeline.loader:collate_scene_text",
        encoder=Encoder("text", ("scene_ids", "scene_mask"), switch="use_scene_graph", text="scene_text",
                        max_tokens="max_scene_tokens", keep="start")),
)

# The encoder inputs of the current model, in encoder order (frames, audio, scene graph, prompt).
DEFAULT_MODEL_MODALITIES = ("clip", "audio", "scenegraph", "asr")

_registry: dict[str, Modality] = {m.name: m for m in BUILTIN}


# ------------------------------------------------------------------------------------------------ registry


def register(modality: Modality) -> Modality:
    """Add an expert (after the built-in ones: their columns keep their places). A name already taken is an error."""
    if modality.name in _registry:
        raise ValueError(f"modality {modality.name!r} is already registered")
    taken = {c.name for c in columns()} | {s.name for m in _registry.values() for s in m.stored} | \
        {s.name for s in HEAD_STORED + TAIL_STORED}
    clash = sorted(({c.name for c in modality.columns} | {s.name for s in modality.stored}) & taken)
    if clash:
        raise ValueError(f"modality {modality.name!r}: columns {clash} already exist")
    _registry[modality.name] = modality
    return modality


def unregister(name: str) -> None:
    if name in {m.name for m in BUILTIN}:
        raise ValueError(f"modality {name!r} is built in")
    _registry.pop(name, None)


@contextmanager
def registered(*mods: Modality) -> Iterator[tuple[Modality, ...]]:
    """Register `mods` for a `with` block; the registry is restored afterwards (also on error)."""
    saved = dict(_registry)
    try:
        for m in mods:
            register(m)
        yield mods
    finally:
        _registry.clear()
        _registry.update(saved)


def load(spec: str) -> None:
    """Import "package.module" (which calls `register`) or call "package.module:function"."""
    if ":" in spec:
        resolve(spec)()
    else:
        importlib.import_module(spec)


def all_modalities() -> tuple[Modality, ...]:
    return tuple(_registry.values())


def get(name: str) -> Modality:
    if name not in _registry:
        raise ValueError(f"unknown modality {name!r}; registered: {', '.join(_registry)}")
    return _registry[name]


def experts() -> tuple[Modality, ...]:
    """Modalities the join attaches by key (everything but the spine)."""
    return tuple(m for m in _registry.values() if m.attach is not None)


def extras() -> tuple[Modality, ...]:
    """Registered beyond the built-in ones."""
    builtin = {m.name for m in BUILTIN}
    return tuple(m for m in _registry.values() if m.name not in builtin)


# ------------------------------------------------------------------------------------------------ generated


def columns() -> tuple[Column, ...]:
    """Row columns in schema order: key + span, the built-in modalities', flags..content_id, then extras'."""
    builtin = [c for m in BUILTIN for c in m.columns]
    return tuple([*HEAD, *builtin, *TAIL, *(c for m in extras() for c in m.columns)])


def row_schema() -> pa.Schema:
    return pa.schema([(c.name, c.arrow) for c in columns()])


def stored() -> tuple[Stored, ...]:
    builtin = [s for m in BUILTIN for s in m.stored]
    return tuple([*HEAD_STORED, *builtin, *TAIL_STORED, *(s for m in extras() for s in m.stored)])


def deeplake_columns() -> dict[str, Any]:
    return {s.name: _deeplake_type(s.dtype) for s in stored()}


def upstream() -> dict[str, tuple[str, ...]]:
    """Stage -> tables ingest reads per item: the spine's download table and every modality's tables."""
    out = dict(SPINE_UPSTREAM)
    for m in _registry.values():
        if m.stage is not None:
            out[m.stage] = tuple(dict.fromkeys(out.get(m.stage, ()) + m.tables))
    return out


def heavy_upstream_columns() -> frozenset[str]:
    return frozenset().union(*(m.heavy for m in _registry.values()))


def bulky_columns() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for m in _registry.values():
        out.update(m.bulky)
    return out


def loader_columns() -> tuple[str, ...]:
    """Dataset columns the loader reads: key + start, then each modality's."""
    cols = ["video_id", "segment_idx", "start"]
    for m in _registry.values():
        cols.extend(c for c in m.read if c not in cols)
    return tuple(cols)


def encoders(names: tuple[str, ...] | list[str]) -> list[tuple[str, Encoder]]:
    """(name, encoder) of the model's modalities, in the model's order; an unknown name is a ValueError."""
    out = []
    for name in names:
        m = get(name)
        if m.encoder is None:
            raise ValueError(f"modality {name!r} feeds no encoder input")
        out.append((name, m.encoder))
    return out


class LiveMapping(Mapping):
    """A read-only mapping recomputed on every access (a class attribute that follows the registry)."""

    def __init__(self, fn: Callable[[], Mapping]):
        self._fn = fn

    def __getitem__(self, key):
        return self._fn()[key]

    def __iter__(self):
        return iter(self._fn())

    def __len__(self) -> int:
        return len(self._fn())

    def __repr__(self) -> str:
        return repr(dict(self._fn()))


def list_cells(table: pa.Table, name: str, dtype: Any) -> list[np.ndarray]:
    return cells.list_cells(cells.column_array(table, name), np.dtype(dtype))


# ------------------------------------------------------------------------------------------------ plug-ins

from .plugins import PLUGINS_ENV, named  # noqa: E402,F401  (PLUGINS_ENV: importable from here as before)


def load_plugins(spec: str | None = None) -> list[str]:
    """Load the experts named in `VPT_MODALITIES` (comma-separated "package.module" or "package.module:function",
    each registering its modality and stage), so that every process of a run (Slurm tasks, training ranks) has
    the same modalities. Runs once, when this module is first imported."""
    names = named() if spec is None else [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        load(name)
    return names


load_plugins()
