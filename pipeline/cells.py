"""Arrow columns -> numpy cells, one per row, each owning its memory (what Deep Lake's native writer and the
loader are handed). Below both `schema` and `modalities`: it imports nothing from the package."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def clip_matrix(rows: list | None) -> np.ndarray:
    """list<list<float16>> (one list per frame) -> float16 [n_frames, D]."""
    if not rows:
        return np.zeros((0, 0), np.float16)
    return np.asarray(rows, dtype=np.float16)


def column_array(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def list_cells(arr: pa.Array, dtype: Any) -> list[np.ndarray]:
    """list<number> array -> one numpy vector per row (a null row -> empty). Each cell owns its memory: the
    native writer never sees views sharing one Arrow buffer."""
    offsets = arr.offsets.to_numpy()                     # absolute positions in arr.values (slices included)
    values = arr.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    empty = values[:0]
    return [values[a:b].copy() if ok else empty.copy() for a, b, ok in zip(offsets[:-1], offsets[1:], valid)]


def clip_cells(arr: pa.Array) -> list[np.ndarray]:
    """list<list<float16>> array -> one float16 [n_frames, D] matrix per row ([0, 0] when it has none)."""
    outer = arr.offsets.to_numpy()
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    inner_arr = arr.values
    inner = inner_arr.offsets.to_numpy()
    values = inner_arr.values.to_numpy(zero_copy_only=False).astype(np.float16, copy=False)
    out = []
    for i, (a, b, ok) in enumerate(zip(outer[:-1], outer[1:], valid)):
        n = int(b - a)
        if not ok or n == 0:
            out.append(np.zeros((0, 0), np.float16))
            continue
        lengths = np.diff(inner[a:b + 1])
        if inner_arr.null_count or (lengths != lengths[0]).any() or not lengths[0]:
            out.append(clip_matrix(arr[i].as_py()))     # ragged or null frames: the row-wise path decides
            continue
        out.append(values[inner[a]:inner[b]].reshape(n, int(lengths[0])).copy())
    return out
