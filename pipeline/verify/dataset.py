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
from .checks import Tolerances, Violation, row_checker

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


def _check_columns(have: set[str]) -> tuple[list[str], list[str], list]:
    """The columns the row checks read besides keys and images (those present), the modalities' own among them,
    and the modality builders."""
    extra = [c for m in modalities.all_modalities() for c in m.dataset_columns if c in have]
    builders = [modalities.resolve(m.from_dataset) for m in modalities.all_modalities()
                if m.from_dataset is not None and all(c in have for c in m.dataset_columns)]
    return list(dict.fromkeys(("start", "end", "frame_idx", "frame_pts", "flags", "is_speech", *extra))), extra, \
        builders


def _check_values(cols: dict[str, list], n_jpeg: list[int], tol: Tolerances) -> list[Violation]:
    """The row checks of rows given as column values (`cols`: keys, the check's columns, `clip_frame_idx` when
    stored) and their stored JPEG counts."""
    _, extra_cols, builders = _check_columns(set(cols))
    clip_keys = cols.get("clip_frame_idx") or [None] * len(n_jpeg)
    check_row = row_checker(tol)
    out: list[Violation] = []
    for k, (video_id, seg) in enumerate(zip(cols["video_id"], cols["segment_idx"])):
        fpts = [float(x) for x in cols["frame_pts"][k]]
        row = {"start": float(cols["start"][k]), "end": float(cols["end"][k]),
               "frame_idx": [int(x) for x in cols["frame_idx"][k]], "frame_pts": fpts, "n_jpeg": n_jpeg[k],
               "flags": str(cols["flags"][k] or ""), "is_speech": bool(cols["is_speech"][k]),
               "clip_frame_idx_stored": clip_keys[k]}
        values = {c: cols[c][k] for c in extra_cols}
        for build in builders:
            row.update(build(values, row))
        for what in check_row(row):
            out.append(Violation(str(video_id), int(seg), f"dataset: {what}"))
    return out


def check_rows(ds: Any, index: list[int], tol: Tolerances) -> list[Violation]:
    """The row checks of the dataset's rows `index` (sorted) as stored: each modality rebuilds its part of the
    row from its own columns (`Modality.from_dataset`), the JPEGs counted in the images column. `verify_dataset`
    runs them on its rows; ingest's probe child on the rows each commit added, as it reads them
    (`check_read_rows`)."""
    if not index:
        return []
    n = len(ds)
    have = _column_names(ds)
    names, _, _ = _check_columns(have)
    wanted = ["video_id", "segment_idx", *names] + (["clip_frame_idx"] if "clip_frame_idx" in have else [])
    cols = {c: _read(ds, c, index, n) for c in dict.fromkeys(wanted)}
    return _check_values(cols, _image_counts(ds, index, [len(p) for p in cols["frame_pts"]]), tol)


def check_read_rows(rows: range, values: dict[str, list], tol: dict[str, Any]) -> list[str]:
    """`check_rows` of rows a reader already holds (`values`: every column's values of `rows`, the images column
    as its stored bytes, one per JPEG), as text: the check ingest's writer has its probe child run on each block
    of the rows a commit added, as the probe reads them (`pipeline.dataset_health`, called by name there)."""
    if not len(rows):
        return []
    n_jpeg = [len(v) for v in values["frames"]]
    return [str(v) for v in _check_values({c: list(v) for c, v in values.items()}, n_jpeg, Tolerances(**tol))]


NEW_ROWS_CHECK = "pipeline.verify.dataset:check_read_rows"


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


