"""Atomic file writes: write to a temp name beside the target, fsync, rename.

A reader (or a re-run after kill -9) sees either the old file or the complete new one, never a torn
file. On parallel filesystems (Lustre/GPFS) rename within one directory is atomic too.

Every temp-file-and-rename in the package goes through here (tests/test_atomic_writes.py checks): the
`write_*` functions for content in memory, `temp_path` for writers that need a name of their own (torch.save,
save_pretrained), `publish` to put a file or directory that is already complete in place.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import pyarrow as pa


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory entry list; best effort (some filesystems refuse fsync on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_fsync_dir = _fsync_path


def write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """durable=False: still atomic (a reader or a process that dies sees the old or the new content), without the
    fsyncs, so not guaranteed to survive a crash of the machine: for state that only guards process deaths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a torn temp file behind
        raise
    if durable:
        _fsync_dir(path.parent)


def write_text(path: str | Path, text: str, durable: bool = True) -> None:
    write_bytes(path, text.encode(), durable=durable)


def write_json(path: str | Path, obj: Any, durable: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", durable=durable)


def write_parquet(path: str | Path, table: pa.Table, **options: Any) -> None:
    """`options` go to pyarrow.parquet.write_table (compression defaults to zstd)."""
    import pyarrow.parquet as pq    # here, not at the top: light importers (a writer's start) skip pyarrow

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        pq.write_table(table, tmp, **{"compression": "zstd", **options})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def fsync_tree(root: str | Path) -> None:
    """fsync a file, or a directory with everything under it (files first, each directory after its entries)."""
    root = Path(root)
    paths = [*root.rglob("*"), root] if root.is_dir() else [root]
    for p in sorted(paths, key=lambda q: -len(q.parts)):
        _fsync_path(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(src: str | Path, dst: str | Path) -> None:
    """Put the complete file or directory `src` in place of `dst` (same filesystem): its data fsynced, one rename,
    then the directory entries fsynced. A directory replaces an existing `dst` by two renames (the old one is
    moved aside first, then removed), so `dst` is always either the old or the new tree."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fsync_tree(src)
    if src.is_dir() and dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        try:
            os.rename(src, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        _remove(old)
    else:
        os.replace(src, dst)
    _fsync_dir(dst.parent)
    if src.parent.resolve() != dst.parent.resolve():
        _fsync_dir(src.parent)


@contextmanager
def temp_path(path: str | Path) -> Iterator[Path]:
    """A temp name beside `path` for a writer that needs a file or directory name (`torch.save(obj, tmp)`,
    `model.save_pretrained(tmp)`): when the block ends without error what was written there is published to
    `path` (fsynced, renamed); after an error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
