"""One read-only view of a run's dataset, whatever its layout (`pipeline.dataset.layout`).

`open_read_only(run_dir_or_url)` returns the Deep Lake dataset itself for a single-dataset layout, and a
`GroupedView` over the committed head of every group for a catalogue of groups: global row i is row i - offset[g]
of group g (groups in order, offset[g] = rows of the groups before it), so every row is seen exactly once. A column
slice `view[col][a:b]` reads one contiguous slice per group it spans (the access pattern Deep Lake is fast at);
`view[col][i]`, `view[col][rows]` and `view[col].get_bytes(rows)` map rows to their groups. `len`, `schema`,
`metadata` (the union of the groups' shard lists and fingerprints), `version` (the groups' versions; `history[
version].open()` opens those again) are those of one dataset. A group the catalogue implies but no writer has
created yet holds no rows.
"""
from __future__ import annotations

import bisect
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .. import dataset_health as health
from .layout import Layout, dataset_url, read_layout

_log = logging.getLogger(__name__)

VERSION_PREFIX = "groups:"


def _url_of(run_dir_or_url: str | Path) -> tuple[str, Path | None]:
    """(dataset URL, run_dir or None): a run directory (it has geometry.json) resolves through its ingest config."""
    text = str(run_dir_or_url)
    if "://" not in text and (Path(text) / "geometry.json").exists():
        from ..stages.ingest_config import ingest_settings

        return dataset_url(ingest_settings(Path(text)), text), Path(text)
    return (text if "://" in text else f"file://{Path(text).resolve()}"), None


def exists(run_dir_or_url: str | Path) -> bool:
    """Whether a dataset was written there (the one dataset, or at least one group of a catalogue)."""
    layout = read_layout(_url_of(run_dir_or_url)[0])
    if layout is None or not layout.grouped:
        return layout is not None
    return any(health.exists(health.local_dir(layout.group_url(g))) for g in layout.groups())


def layout_of(run_dir_or_url: str | Path) -> Layout | None:
    return read_layout(_url_of(run_dir_or_url)[0])


def repair(run_dir: str | Path, run_dir_or_url: str | Path | None = None,
           log: Callable[[str], None] = _log.warning) -> None:
    """Roll any group's unreadable head back to its last good version (under that group's writer lock)."""
    from .lock import writer_lock

    url = _url_of(run_dir_or_url if run_dir_or_url is not None else run_dir)[0]
    layout = read_layout(url)
    if layout is None:
        return
    import deeplake

    for g in layout.groups():
        gurl = layout.group_url(g)
        if layout.grouped and not deeplake.exists(gurl):
            continue
        with writer_lock(Path(run_dir), log, layout.lock_name(g)):
            health.ensure_readable(gurl, log)


def open_read_only(run_dir_or_url: str | Path, version: str | None = None):
    """The run's dataset as one read-only dataset (see the module docstring). FileNotFoundError when none."""
    import deeplake

    url = _url_of(run_dir_or_url)[0]
    layout = read_layout(url)
    if layout is None:
        raise FileNotFoundError(f"no dataset at {url}")
    if not layout.grouped:
        ds = health.held(deeplake.open_read_only(url))
        if version is not None and ds.version != version:
            ds = ds.history[version].open()
        return ds
    view = GroupedView(layout, _parse_version(version) if version else None)
    if not view.groups:
        raise FileNotFoundError(f"no group of {url} has been written yet")
    return view


def _parse_version(version: str) -> dict[int, str]:
    if not version.startswith(VERSION_PREFIX):
        raise ValueError(f"not a version of a grouped dataset: {version!r}")
    return {int(g): v for g, v in json.loads(version[len(VERSION_PREFIX):]).items()}


class _Metadata:
    """The union of the groups' metadata: shard lists concatenated, fingerprints merged."""

    def __init__(self, parts: list[Any]):
        self.values: dict[str, Any] = {}
        for meta in parts:
            for key in meta.keys():
                value = meta[key]
                if key == "ingested_shards":
                    self.values[key] = sorted({*self.values.get(key, []), *(int(s) for s in value)})
                elif key == "ingested_fingerprints":
                    self.values[key] = {**self.values.get(key, {}), **dict(value)}
                else:
                    self.values.setdefault(key, value)

    def keys(self):
        return self.values.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


class _History:
    def __init__(self, layout: Layout):
        self.layout = layout

    def __getitem__(self, version: str) -> Any:
        view = GroupedView(self.layout, _parse_version(version))

        class _Entry:
            def open(self_inner):
                return view
        return _Entry()


def _slice(ds: Any, name: str, a: int, b: int) -> Any:
    """Rows [a, b) of a column: a slice, or for a Sequence/Image column a list of rows (slicing one segfaults
    Deep Lake 4.7.4 now and then, see `dataset_health.sequence_or_image`)."""
    if b > a and health.sequence_or_image(ds.schema[name].dtype):
        return ds[name][list(range(a, b))]
    return ds[name][a:b]


def _concat(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts) and len({p.shape[1:] for p in parts}) == 1 \
            and len({p.dtype for p in parts}) == 1:
        return np.concatenate(parts)
    out: list = []
    for p in parts:
        out.extend(list(p))
    return out


class _Column:
    def __init__(self, view: "GroupedView", name: str):
        self.view, self.name = view, name

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: Any) -> Any:
        v = self.view
        if isinstance(index, (int, np.integer)):
            g, i = v.locate(int(index))
            return v.groups[g][self.name][i]
        if isinstance(index, slice):
            a, b, step = index.indices(len(v))
            if step != 1:
                return self[list(range(a, b, step))]
            parts = [_slice(v.groups[g], self.name, lo, hi) for g, lo, hi in v.spans(a, b)]
            if not parts:
                return v.groups[0][self.name][0:0] if v.groups else []
            return _concat(parts)
        return self._rows(list(index), lambda ds, rows: ds[self.name][rows])

    def get_bytes(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            g, i = self.view.locate(int(index))
            return self.view.groups[g][self.name].get_bytes(i)
        return self._rows(list(index), lambda ds, rows: ds[self.name].get_bytes(rows))

    def _rows(self, rows: list[int], read: Callable[[Any, list[int]], Iterable]) -> list:
        """Rows in the order asked, read with one call per group."""
        by_group: dict[int, list[tuple[int, int]]] = {}
        for k, row in enumerate(rows):
            g, i = self.view.locate(int(row))
            by_group.setdefault(g, []).append((k, i))
        out: list = [None] * len(rows)
        for g, pairs in by_group.items():
            for (k, _), value in zip(pairs, read(self.view.groups[g], [i for _, i in pairs])):
                out[k] = value
        return out


class GroupedView:
    """Read-only view of every group of a catalogue as one dataset (see the module docstring)."""

    def __init__(self, layout: Layout, versions: dict[int, str] | None = None):
        import deeplake

        self.layout = layout
        self.urls: list[str] = []
        self.groups: list[Any] = []
        self.group_ids: list[int] = []
        for g in layout.groups():
            url = layout.group_url(g)
            if not deeplake.exists(url):
                continue
            ds = health.held(deeplake.open_read_only(url))
            want = (versions or {}).get(g)
            if want is not None and ds.version != want:
                ds = ds.history[want].open()
            self.groups.append(ds)
            self.group_ids.append(g)
            self.urls.append(url)
        if versions is not None and set(versions) != set(self.group_ids):
            raise ValueError(f"version names groups {sorted(versions)}, the dataset has {self.group_ids}")
        sizes = [len(ds) for ds in self.groups]
        self.offsets = [0, *np.cumsum(sizes).tolist()]
        self.history = _History(layout)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, row: int) -> tuple[int, int]:
        """Global row -> (index into self.groups, row within that group)."""
        n = len(self)
        if row < 0:
            row += n
        if not 0 <= row < n:
            raise IndexError(f"row {row} out of range ({n} rows)")
        k = bisect.bisect_right(self.offsets, row) - 1
        return k, row - int(self.offsets[k])

    def spans(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """[(group index, local a, local b)] covering global rows [a, b)."""
        out = []
        for k in range(len(self.groups)):
            lo, hi = max(a, self.offsets[k]), min(b, self.offsets[k + 1])
            if hi > lo:
                out.append((k, int(lo - self.offsets[k]), int(hi - self.offsets[k])))
        return out

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if self.groups and key not in {c.name for c in self.groups[0].schema.columns}:
                raise KeyError(key)
            return _Column(self, key)
        if isinstance(key, (int, np.integer)):
            g, i = self.locate(int(key))
            return self.groups[g][i]
        raise TypeError(f"index a grouped dataset by column name or row, not {type(key).__name__}")

    @property
    def schema(self):
        return self.groups[0].schema

    @property
    def metadata(self) -> _Metadata:
        return _Metadata([ds.metadata for ds in self.groups])

    @property
    def version(self) -> str:
        return VERSION_PREFIX + json.dumps({str(g): ds.version for g, ds in zip(self.group_ids, self.groups)},
                                           sort_keys=True)

    def group_rows(self) -> list[tuple[int, int, int]]:
        """[(group, first global row, end)] of every group that exists."""
        return [(g, int(self.offsets[k]), int(self.offsets[k + 1])) for k, g in enumerate(self.group_ids)]


def group_violations(ds: Any) -> list[str]:
    """What breaks the layout in a grouped view: a group holding (or listing) a shard of another group. The union
    of keys (every row once) is the caller's check over the whole view. [] for a single dataset."""
    if not isinstance(ds, GroupedView):
        return []
    out = []
    for k, g in enumerate(ds.group_ids):
        mine, part = ds.layout.shards_of(g), ds.groups[k]
        n = len(part)
        shards = {int(s) for s in (part["shard"][0:n] if n else [])}
        listed = {int(s) for s in (part.metadata["ingested_shards"] if "ingested_shards" in part.metadata.keys()
                                   else [])}
        stray = sorted(s for s in shards | listed if s not in mine)
        if stray:
            out.append(f"group {g} (shards {mine.start}..{mine.stop - 1}) holds or lists shards {stray[:10]}")
    return out
