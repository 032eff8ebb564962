"""Where the rows of a run live: one Deep Lake dataset, or one per shard group.

A run whose shards fit in one group (`num_shards <= shards_per_group`) writes ONE dataset at the dataset URL, as
before groups existed. A run with more shards writes one dataset per group of `shards_per_group` consecutive
shards, `<dataset>/group-<g>` with g = shard // shards_per_group, each by exactly one writer at a time (its own
lock), so the groups can be written concurrently. The catalogue is the list of groups the geometry implies; it
is pinned once, before any group is written, in `<dataset>/catalogue.json` ({num_shards, shards_per_group}),
written once and never updated (a writer that finds it uses it, whatever its own config says). Readers open
the catalogue as one dataset (`pipeline.dataset.view`). Remote URLs (no local directory) always use one dataset.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..atomic import read_json, write_json
from ..dataset_health import LOG_DIR, local_dir
from ..errors import ConfigError

_log = logging.getLogger(__name__)
_info = _log.info      # the default progress log (callers may pass their own)

CATALOGUE = "catalogue.json"
GROUP_PREFIX = "group-"


def dataset_url(cfg: Any, run_dir: str | Path | None = None) -> str:
    """The dataset's URL from the ingest config (`dataset_path`; null = `<run_dir>/dataset`)."""
    path = cfg.get("dataset_path") if hasattr(cfg, "get") else getattr(cfg, "dataset_path", None)
    if path:
        return str(path) if "://" in str(path) else f"file://{Path(path).resolve()}"
    return f"file://{(Path(run_dir) / 'dataset').resolve()}"


@dataclass(frozen=True)
class Layout:
    url: str                    # the dataset (one group) or the directory of the groups
    num_shards: int
    shards_per_group: int = 0   # 0: one dataset at `url` (every shard)

    @property
    def grouped(self) -> bool:
        return self.shards_per_group > 0

    @property
    def num_groups(self) -> int:
        return max(1, math.ceil(self.num_shards / self.shards_per_group)) if self.grouped else 1

    def groups(self) -> list[int]:
        return list(range(self.num_groups))

    def group_of(self, shard: int) -> int:
        return shard // self.shards_per_group if self.grouped else 0

    def shards_of(self, group: int) -> range:
        if not self.grouped:
            return range(self.num_shards)
        return range(group * self.shards_per_group, min(self.num_shards, (group + 1) * self.shards_per_group))

    def group_url(self, group: int) -> str:
        return f"{self.url.rstrip('/')}/{GROUP_PREFIX}{group}" if self.grouped else self.url

    def lock_name(self, group: int) -> str:
        return f"dataset-{GROUP_PREFIX}{group}.lock" if self.grouped else "dataset.lock"


def _is_dataset(path: Path | None) -> bool:
    return path is not None and (path / LOG_DIR).is_dir()


def read_catalogue(url: str) -> dict[str, Any] | None:
    path = local_dir(url)
    if path is None:
        return None
    cat = read_json(path / CATALOGUE)
    return cat if isinstance(cat, dict) and "shards_per_group" in cat else None


def read_layout(url: str) -> Layout | None:
    """The layout a reader finds at `url`: one dataset, a catalogue of groups, or None (nothing written yet)."""
    path = local_dir(url)
    if path is None:
        import deeplake

        return Layout(url, 0) if deeplake.exists(url) else None
    if _is_dataset(path):
        return Layout(url, 0)
    cat = read_catalogue(url)
    if cat is not None:
        return Layout(url, int(cat["num_shards"]), int(cat["shards_per_group"]))
    return None


def writer_layout(url: str, num_shards: int, shards_per_group: int,
                  log: Callable[[str], None] = _info) -> Layout:
    """The layout the writers of a run use, pinned on first use: what is on disk wins over the config."""
    path = local_dir(url)
    if path is None or _is_dataset(path):
        return Layout(url, num_shards)
    cat = read_catalogue(url)
    if cat is None:
        spg = int(shards_per_group)
        if spg <= 0 or num_shards <= spg:
            return Layout(url, num_shards)
        cat = _pin_catalogue(path, {"num_shards": int(num_shards), "shards_per_group": spg})
    if int(cat["num_shards"]) != int(num_shards):
        raise ConfigError(f"dataset {path}: its catalogue is pinned to {cat['num_shards']} shards, the run has "
                          f"{num_shards}; write to a new dataset_path")
    if int(cat["shards_per_group"]) != int(shards_per_group):
        log(f"ingest: {path} is pinned to shards_per_group={cat['shards_per_group']} (config says "
            f"{shards_per_group}); using the pinned value")
    return Layout(url, int(cat["num_shards"]), int(cat["shards_per_group"]))


def _pin_catalogue(path: Path, cat: dict[str, Any]) -> dict[str, Any]:
    """Write the catalogue once: made complete under a temporary name, then hard-linked into place (a link, unlike
    a rename, fails when the name exists: of writers racing here, the first wins and the others read it)."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{CATALOGUE}.{os.getpid()}"
    write_json(tmp, cat)
    try:
        os.link(tmp, path / CATALOGUE)
        return cat
    except FileExistsError:
        return json.loads((path / CATALOGUE).read_text())
    finally:
        tmp.unlink(missing_ok=True)
