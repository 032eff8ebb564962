"""The data schema, in one place: joined rows (Arrow/Parquet), their Deep Lake columns, and the batch contract.

The columns and their Deep Lake mapping are generated from the modality list (`pipeline.modalities`): the
built-in modalities give exactly the columns below, in this order; a registered expert adds its own after them.

One row = one ASR segment (or, for a video without speech, one fixed window) of one video, keyed
(video_id, segment_idx), with everything the model sees for that span:

    video_id, segment_idx, start, end (seconds)   is_speech (False for windows)   text, words, prev_text
    frame_idx, frame_pts, frame_kind, frame_shot, frames (JPEG bytes)      -- the frames of [start, end)
    clip (n_frames x D, float16; row k = clip_frame_idx[k] = frame_idx[k]), clip_frame_idx, clip_pts, clip_model
    audio (D_audio float16, the embedding of exactly [start, end)), has_audio, audio_labels, audio_scores
    scene_graphs (per frame: frame_idx, pts, text, objects+relations as JSON), scene_text ("; "-joined texts)
    flags ("no_frames", "nearest_frame", "no_audio"... comma-separated), shard, provenance (JSON)
    content_id   the video's content identity from the download stage (`youtube:<id>`, `sha256:<file hash>`):
                 what the loader splits by, so duplicates of one content stay in one split ("": unknown; rows of
                 datasets made before the column existed read None; both fall back to video_id)

Time origin: every time is seconds on the container's timeline. Frame PTS are stream PTS; ASR/audio times index
`pipeline.audio.load_audio` samples, which start at time 0 (an audio track that starts late is preceded by
silence), so the two are joined as they are.

Batch contract (what `pipeline.loader` yields and `pipeline.train.data` consumes), B samples per batch:

    video_id: list[str]          segment_idx: LongTensor[B]
    text: list[str]              (target)          prev_text: list[str]
    clip: FloatTensor[B, F, D_clip] zero-padded, F <= max_frames;   clip_mask: BoolTensor[B, F]
    frame_time: FloatTensor[B, F] frame PTS minus segment start (seconds)
    audio: FloatTensor[B, D_audio];   audio_mask: BoolTensor[B]
    scene_text: list[str]        scene-graph texts of the segment's frames joined with "; "
    sample_mask: BoolTensor[B]   False for padding samples: repeated rows that give every rank the same number
                                 of equally sized batches (a split that does not divide by the ranks); losses,
                                 token counts, metrics and predictions leave them out
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from . import modalities

KEY = ("video_id", "segment_idx")
TABLE = "rows"                       # ingest's per-shard output table

FLAG_NO_FRAMES = "no_frames"         # no frame inside the span, none near enough either
FLAG_NEAREST = "nearest_frame"       # no frame inside the span: the nearest one within tolerance stands in
FLAG_NO_AUDIO = "no_audio"           # the audio stage has no row for this span
FLAG_NO_AUDIO_STREAM = "no_audio_stream"   # the video has no audio stream at all (visual-only row, has_audio false)
FLAG_NO_CLIP = "no_clip"             # some frames of the span have no CLIP embedding

WORD = modalities.WORD
SCENE = modalities.SCENE

# The row schema of the built-in modalities (generated from `pipeline.modalities`); `row_schema()` is the
# current one, with any registered expert's columns after these.
ROW_SCHEMA = modalities.row_schema()
COLUMNS = tuple(ROW_SCHEMA.names)


def row_schema() -> pa.Schema:
    """The row schema of every registered modality (`ROW_SCHEMA` plus registered experts' columns)."""
    return modalities.row_schema()


def flags_of(row: dict) -> set[str]:
    return {f for f in (row.get("flags") or "").split(",") if f}


def deeplake_columns() -> dict[str, Any]:
    """Deep Lake 4 column types of the dataset, in ROW_SCHEMA order.

    Frames are handed over as the JPEG bytes the frames stage wrote (a Sequence of jpg Images accepts encoded
    bytes, so ingest never decodes them; readers get decoded HxWx3 uint8 arrays). Lists of text that may be empty are kept in Dict columns (Deep Lake 4.7 rejects an
    empty Sequence(Text)). The frame keys of every modality are stored (frame_idx, clip_frame_idx, each scene
    graph's frame_idx) so that the dataset itself can be checked; a dataset made before clip_frame_idx existed
    gets the column on its next ingest write, with None for its old rows (re-ingest to have them checked).
    """
    return modalities.deeplake_columns()


# Arrow -> numpy cells live in `cells` (below this module and `modalities`); their old names stay here.
from .cells import clip_cells as _clip_cells  # noqa: E402,F401
from .cells import clip_matrix  # noqa: E402,F401
from .cells import column_array as _combined  # noqa: E402,F401
from .cells import list_cells as _list_cells  # noqa: E402,F401


def to_deeplake_columns(table: pa.Table) -> dict[str, list]:
    """A `rows` table (ROW_SCHEMA) -> column lists for one batched `ds.append`.

    Numeric list columns (frame keys, PTS, CLIP, audio) become numpy arrays cut column-wise from the Arrow
    buffers: no Python object per number (converting them row by row was most of the write's time)."""
    n = table.num_rows
    out: dict[str, list] = {}
    for col in modalities.stored():
        if col.convert is None:
            out[col.name] = table.column(col.name).to_pylist()
        elif isinstance(col.convert, str) and col.convert.startswith("list:"):
            out[col.name] = modalities.list_cells(table, col.name, col.convert[len("list:"):])
        else:
            out[col.name] = modalities.resolve(col.convert)(table)
    assert all(len(v) == n for v in out.values())
    return out


def dict_value(value: Any) -> Any:
    """A Deep Lake Dict cell -> plain Python."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value
