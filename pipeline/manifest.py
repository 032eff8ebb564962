"""Manifests and shard geometry.

A manifest lists the videos of a run: a text file (one entry per line: a YouTube id, a URL, a local path, or
`video_id<whitespace>url`) or a Parquet file with columns `video_id` and `url`. A line that is an existing file is a
path, whatever it holds (spaces, non-ASCII, '#'); other lines starting with '#' are comments. An id made from a file
name whose characters had to be replaced (non-ASCII, spaces) keeps a short hash of the name, so that `vidéo.mp4`
and `vidèo.mp4` stay two videos. The same media given twice (the same path, a path and its `file://` URL, the same
URL or YouTube video) is kept once, with a warning naming both lines. Items are assigned to shards by a
stable hash of the video id, so the assignment never depends on list order or on the machine. The geometry
(number of shards, the manifest itself) is pinned in the run dir on first launch; a later launch with a different
geometry is refused instead of silently re-sharding half-finished work.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import read_json, write_json, write_parquet
from .errors import ConfigError

YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]+")
GEOMETRY_FILE = "geometry.json"
MANIFEST_FILE = "manifest.parquet"


@dataclass(frozen=True)
class Item:
    video_id: str
    url: str
    shard: int = -1


def shard_of(video_id: str, num_shards: int) -> int:
    """Stable across Python versions and machines (unlike hash())."""
    digest = hashlib.sha1(video_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def _youtube_id(url: str) -> str | None:
    p = urlparse(url)
    host = (p.hostname or "").lower()
    if host.endswith("youtu.be"):
        cand = p.path.lstrip("/").split("/")[0]
        return cand if YOUTUBE_ID.match(cand) else None
    if "youtube.com" in host:
        if "v" in parse_qs(p.query):
            cand = parse_qs(p.query)["v"][0]
            return cand if YOUTUBE_ID.match(cand) else None
        parts = [x for x in p.path.split("/") if x]
        if len(parts) >= 2 and parts[0] in ("shorts", "embed", "live") and YOUTUBE_ID.match(parts[1]):
            return parts[1]
    return None


def _local_file(entry: str) -> str | None:
    """The file an entry names, if it is an existing local file (a path or a file:// URL)."""
    if entry.startswith("file://"):
        path = unquote(urlparse(entry).path)
    elif "://" in entry:
        return None
    else:
        path = entry
    try:
        return path if path and os.path.isfile(path) else None
    except (OSError, ValueError):
        return None


def id_from_name(name: str) -> str:
    """A video id from a file name: its stem, made filesystem-safe; when characters had to be replaced
    (non-ASCII, spaces, punctuation) a short hash of the original stem keeps distinct names distinct."""
    stem = Path(name).stem or name
    safe = SAFE_ID.sub("_", stem).strip("_")
    if safe != stem:
        digest = hashlib.sha1(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        safe = f"{safe}-{digest}" if safe else digest
    return safe


def media_key(url: str) -> str:
    """What an entry points at: the real path of a local file (path or file:// URL), the YouTube video, or the URL."""
    local = _local_file(url)
    if local is not None:
        return "file:" + os.path.realpath(local)
    if url.startswith("file://"):
        return "file:" + os.path.realpath(unquote(urlparse(url).path))
    if "://" not in url and not YOUTUBE_ID.match(url):
        return "file:" + os.path.realpath(url)
    yt = _youtube_id(url) or (url if YOUTUBE_ID.match(url) else None)
    return f"youtube:{yt}" if yt else url


def item_from_entry(entry: str) -> tuple[str, str]:
    """Turn one manifest line into (video_id, url)."""
    entry = entry.strip()
    if _local_file(entry) is None:
        fields = entry.split(None, 1)
        if len(fields) == 2:
            vid, url = fields[0], fields[1].strip()
            if SAFE_ID.search(vid) or (any(ch.isspace() for ch in url) and _local_file(url) is None):
                raise ConfigError(f"{entry!r} is neither an existing file nor `video_id url` "
                                  f"({url!r} has spaces and is no existing file)")
            return vid, url
        if YOUTUBE_ID.match(entry):
            return entry, f"https://www.youtube.com/watch?v={entry}"
        yt = _youtube_id(entry)
        if yt:
            return yt, entry
    # A local path or another URL: the id comes from the file name.
    name = unquote(urlparse(entry).path) if "://" in entry else entry
    return id_from_name(Path(name).name or entry), entry


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_manifest(path: str | Path, warn: Callable[[str], None] | None = None) -> list[Item]:
    """Items of a manifest; `warn` (default: a line on stderr) hears of media given twice (kept once)."""
    warn = warn or _warn_stderr
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"input manifest not found: {path}")
    if path.is_dir():
        raise ConfigError(f"input manifest is a directory, expected a .txt or .parquet file: {path}")
    entries: list[tuple[str, str, object, object]] = []  # (where, entry as written, video_id, url)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        cols = set(table.column_names)
        if not {"video_id", "url"} <= cols:
            raise ConfigError(f"parquet manifest {path} needs columns video_id and url, has {sorted(cols)}")
        for row, (vid, url) in enumerate(zip(table.column("video_id").to_pylist(),
                                             table.column("url").to_pylist()), 1):
            entries.append((f"entry {row}", f"{vid} {url}", vid, url))
    else:
        for n, raw in enumerate(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
            line = raw.strip()
            if not line or (line.startswith("#") and _local_file(line) is None):
                continue
            try:
                vid, url = item_from_entry(line)
            except ConfigError as exc:
                raise ConfigError(f"line {n} of {path}: {exc}") from None
            entries.append((f"line {n}", line, vid, url))
    if not entries:
        raise ConfigError(f"input manifest {path} lists no videos")
    by_id: dict[str, tuple[str, str, str]] = {}       # video_id -> (url, where, key)
    by_media: dict[str, tuple[str, str, str]] = {}    # media key -> (video_id, where, entry)
    for where, entry, vid, url in entries:
        if not isinstance(vid, str) or not vid or not isinstance(url, str) or not url:
            raise ConfigError(f"{where} of {path} has an empty video id or url ({vid!r}, {url!r})")
        if SAFE_ID.search(vid):
            raise ConfigError(f"video id {vid!r} in {path} has characters other than letters, digits, '-', '_', '.'")
        key = media_key(url)
        if key in by_media:
            first_vid, first_where, first_entry = by_media[key]
            warn(f"{path}: {where} ({entry!r}) is the same media as {first_where} ({first_entry!r}); "
                 f"kept once, as {first_vid!r}")
            continue
        if vid in by_id:
            raise ConfigError(f"video id {vid!r} appears twice in {path} with different URLs "
                              f"({by_id[vid][1]} and {where})")
        by_id[vid] = (url, where, key)
        by_media[key] = (vid, where, entry)
    return [Item(v, u) for v, (u, _, _) in by_id.items()]


@dataclass(frozen=True)
class Geometry:
    num_shards: int
    num_items: int
    manifest_sha1: str

    def to_dict(self) -> dict:
        return {"num_shards": self.num_shards, "num_items": self.num_items, "manifest_sha1": self.manifest_sha1,
                "hash": "sha1(video_id)[:8] mod num_shards"}


def _manifest_digest(items: list[Item]) -> str:
    h = hashlib.sha1()
    for it in sorted(items, key=lambda i: i.video_id):
        h.update(f"{it.video_id}\t{it.url}\n".encode())
    return h.hexdigest()


def plan_geometry(run_dir: Path, input_path: str | None, num_shards: int | None,
                  items_per_shard: int) -> tuple[Geometry, list[Item], bool]:
    """Check (without writing) what geometry a launch will use. Returns (geometry, items, is_new)."""
    pinned = read_json(run_dir / GEOMETRY_FILE)
    if pinned is None:
        if not input_path:
            raise ConfigError(f"run_dir {run_dir} has no manifest yet: pass input=<manifest.txt|.parquet>")
        items = read_manifest(input_path)
        n = num_shards or max(1, math.ceil(len(items) / items_per_shard))
        if n < 1:
            raise ConfigError(f"num_shards must be >= 1, got {n}")
        geo = Geometry(n, len(items), _manifest_digest(items))
        return geo, [Item(i.video_id, i.url, shard_of(i.video_id, n)) for i in items], True

    geo = Geometry(pinned["num_shards"], pinned["num_items"], pinned["manifest_sha1"])
    if num_shards is not None and num_shards != geo.num_shards:
        raise ConfigError(f"run_dir {run_dir} is pinned to num_shards={geo.num_shards}; refusing num_shards="
                          f"{num_shards} (use a new run_dir to re-shard)")
    if input_path:
        new_items = read_manifest(input_path)
        if _manifest_digest(new_items) != geo.manifest_sha1:
            raise ConfigError(f"input {input_path} differs from the manifest pinned in {run_dir}; "
                              "use a new run_dir for a different video list")
    return geo, load_items(run_dir), False


def pin_geometry(run_dir: Path, geo: Geometry, items: list[Item]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table({"video_id": [i.video_id for i in items], "url": [i.url for i in items],
                      "shard": pa.array([i.shard for i in items], pa.int32())})
    write_parquet(run_dir / MANIFEST_FILE, table)
    write_json(run_dir / GEOMETRY_FILE, geo.to_dict())  # written last: its presence means the pin is complete


def load_items(run_dir: Path, shard: int | None = None) -> list[Item]:
    table = pq.ParquetFile(run_dir / MANIFEST_FILE).read()  # pq.read_table would import pyarrow.dataset + pandas
    items = [Item(v, u, s) for v, u, s in zip(table.column("video_id").to_pylist(), table.column("url").to_pylist(),
                                              table.column("shard").to_pylist())]
    if shard is not None:
        items = [i for i in items if i.shard == shard]
    return sorted(items, key=lambda i: i.video_id)
