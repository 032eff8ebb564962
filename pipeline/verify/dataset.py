"""The dataset-level check: the committed Deep Lake dataset holds exactly the listed shards' rows, once each,
and every row passes the row checks (each modality reads its own stored columns: `Modality.from_dataset`)."""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import modalities
from ..schema import dict_value
from .checks import Tolerances, Violation, check_row

log = logging.getLogger(__name__)


def clip_from_dataset(values: dict[str, Any], row: dict) -> dict:
    """CLIP: the count of stored embeddings and their stored frame keys (rows ingested before clip_frame_idx
    existed use the frames' keys; `verify_dataset` counts them apart)."""
    clip = np.asarray(values["clip"])
    stored = row.get("clip_frame_idx_stored")
    return {"clip_frame_idx": [int(x) for x in (stored if stored is not None else row["frame_idx"])],
            "clip_pts": row["frame_pts"],    # not stored: the keys are, and the shard check compared the pts
            "n_clip": clip.shape[0] if clip.ndim == 2 and clip.size else 0}


def audio_from_dataset(values: dict[str, Any], row: dict) -> dict:
    a0, a1 = float(values["audio_start"]), float(values["audio_end"])
    return {"has_audio": not math.isnan(a0), "audio_start": a0, "audio_end": a1}


def scenegraph_from_dataset(values: dict[str, Any], row: dict) -> dict:
    return {"scene_graphs": list((dict_value(values["scene_graphs"]) or {}).get("frames") or [])}


def _column_names(ds) -> set[str]:
    return {c.name for c in ds.schema.columns}


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices as [a, b) runs of consecutive rows."""
    out: list[tuple[int, int]] = []
    for i in rows:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _read(ds, column: str, rows: list[int] | None, n: int) -> list:
    """Column values of `rows` (sorted; None: all n rows) as a list, read as contiguous slices (a shard's rows
    are appended together, and slices cost Deep Lake far less than lists of rows)."""
    runs = [(0, n)] if rows is None else _runs(rows)
    out: list = []
    for a, b in runs:
        if b > a:
            out.extend(ds[column][a:b])
    return out


def _image_counts(ds, rows: list[int], frame_counts: list[int]) -> list[int]:
    """Stored JPEGs per row, without decoding: encoded bytes of the rows that have frames (Deep Lake 4.7's
    get_bytes refuses an empty sequence), decoded (nothing to decode) for the rows that have none."""
    out = [0] * len(rows)
    have = [k for k, c in enumerate(frame_counts) if c]
    empty = [k for k, c in enumerate(frame_counts) if not c]
    if have:
        for k, b in zip(have, ds["frames"].get_bytes([rows[k] for k in have])):
            out[k] = len(b)
    if empty:
        for k, imgs in zip(empty, ds["frames"][[rows[k] for k in empty]]):
            out[k] = len(imgs)
    return out


def check_rows(ds: Any, index: list[int], tol: Tolerances) -> list[Violation]:
    """The row checks of the dataset's rows `index` (sorted) as stored: each modality rebuilds its part of the
    row from its own columns (`Modality.from_dataset`), the JPEGs counted in the images column. Ingest's probe
    child runs them on the rows each commit added (`pipeline.dataset_health`), `verify_dataset` on its rows."""
    if not index:
        return []
    n = len(ds)
    have = _column_names(ds)
    row_keys = [(str(v), int(i)) for v, i in zip(_read(ds, "video_id", index, n), _read(ds, "segment_idx", index, n))]
    clip_keys = _read(ds, "clip_frame_idx", index, n) if "clip_frame_idx" in have else [None] * len(index)
    extra_cols = [c for m in modalities.all_modalities() for c in m.dataset_columns if c in have]
    builders = [modalities.resolve(m.from_dataset) for m in modalities.all_modalities()
                if m.from_dataset is not None and all(c in have for c in m.dataset_columns)]
    cols = {c: _read(ds, c, index, n) for c in dict.fromkeys(("start", "end", "frame_idx", "frame_pts", "flags",
                                                              "is_speech", *extra_cols))}
    n_jpeg = _image_counts(ds, index, [len(p) for p in cols["frame_pts"]])
    out: list[Violation] = []
    for k, key in enumerate(row_keys):
        fpts = [float(x) for x in cols["frame_pts"][k]]
        row = {"start": float(cols["start"][k]), "end": float(cols["end"][k]),
               "frame_idx": [int(x) for x in cols["frame_idx"][k]], "frame_pts": fpts, "n_jpeg": n_jpeg[k],
               "flags": str(cols["flags"][k] or ""), "is_speech": bool(cols["is_speech"][k]),
               "clip_frame_idx_stored": clip_keys[k]}
        values = {c: cols[c][k] for c in extra_cols}
        for build in builders:
            row.update(build(values, row))
        for what in check_row(row, tol):
            out.append(Violation(key[0], key[1], f"dataset: {what}"))
    return out


def check_new_rows(ds: Any, from_row: int, tol: dict[str, Any]) -> list[str]:
    """`check_rows` of the rows from `from_row` on, as text: the check ingest's writer has its probe child run on
    each commit's head (`pipeline.dataset_health`, called by name there)."""
    n = len(ds)
    return [str(v) for v in check_rows(ds, list(range(max(0, min(from_row, n)), n)), Tolerances(**tol))]


NEW_ROWS_CHECK = "pipeline.verify.dataset:check_new_rows"


def verify_dataset(run_dir: Path, cfg: Any, shard_keys: dict[int, set[tuple[str, int]]],
                   tol: Tolerances, shards: Iterable[int] | None = None, ds: Any = None) -> list[Violation]:
    """The committed dataset holds exactly the rows of the shards it lists, once each, and they are aligned.

    Keys and shard listing are checked over the whole dataset; the per-row checks over the rows of `shards`
    (None: every row), which is what ingest passes after committing them. `ds`: an open handle with nothing
    uncommitted (ingest's writer: a second handle on the dataset in the writing process is avoided).
    """
    from ..dataset.view import exists, group_violations, open_read_only, repair
    from ..dataset.layout import dataset_url

    if ds is None:
        url = dataset_url(cfg, run_dir)
        if not exists(url):
            return []
        # an unreadable head (a disk that filled during a commit) is rolled back to the last good version
        repair(Path(run_dir), url, log.warning)
        ds = open_read_only(url)    # one dataset, or every shard group's as one (pipeline.dataset)
    # each group holds only its shards; the checks below run over the union (every key once)
    out: list[Violation] = [Violation("dataset", None, what) for what in group_violations(ds)]
    listed = set(int(s) for s in (ds.metadata["ingested_shards"] if "ingested_shards" in ds.metadata.keys()
                                  else []))
    n = len(ds)
    video_ids, seg_idx, row_shard = (_read(ds, c, None, n) for c in ("video_id", "segment_idx", "shard"))
    row_keys = [(str(v), int(i)) for v, i in zip(video_ids, seg_idx)]
    keys: dict[tuple[str, int], int] = defaultdict(int)
    by_shard: dict[int, set[tuple[str, int]]] = defaultdict(set)
    for key, s in zip(row_keys, row_shard):
        keys[key] += 1
        by_shard[int(s)].add(key)
    wanted = None if shards is None else set(shards)
    rows = list(range(n)) if wanted is None else [i for i in range(n) if int(row_shard[i]) in wanted]
    # over every row (small int lists): rows ingested before the column existed did not keep their CLIP keys
    clip_keys = _read(ds, "clip_frame_idx", None, n) if "clip_frame_idx" in _column_names(ds) else [None] * n
    without_clip_keys = sum(k is None for k in clip_keys)
    out.extend(check_rows(ds, rows, tol))
    if without_clip_keys:
        out.append(Violation("dataset", None, f"{without_clip_keys} rows have no clip_frame_idx (ingested before "
                                              f"the column existed): re-ingest to check their CLIP keys"))
    for key, count in keys.items():
        if count > 1:
            out.append(Violation(key[0], key[1], f"dataset: {count} copies"))
    # A listed shard may have no rows when its rows table is empty (e.g. every video of it failed upstream).
    unlisted = set(by_shard) - listed
    rowless = {s for s in listed - set(by_shard) if shard_keys.get(s) != set()}
    if unlisted or rowless:
        out.append(Violation("dataset", None, f"metadata lists shards {sorted(listed)}, rows come from "
                                              f"{sorted(by_shard)}"))
    for shard in sorted(listed):
        want = shard_keys.get(shard)
        if want is not None and by_shard.get(shard, set()) != want:
            missing, extra = want - by_shard.get(shard, set()), by_shard.get(shard, set()) - want
            out.append(Violation("dataset", None, f"shard {shard}: {len(missing)} rows missing, {len(extra)} "
                                                  f"extra vs its rows.parquet"))
    return out


