"""The lock of a dataset's one writer (`writer_lock`): below the writer, so that the read view rolls a group back
under the same lock without importing the writer. Re-exported by `pipeline.dataset.writer`."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def writer_lock(run_dir: Path, log: Callable[[str], None], name: str = "dataset.lock") -> Iterator[None]:
    """One writer per dataset at a time (two would both append the shards neither had committed yet). `name`:
    the lock of one group (`Layout.lock_name`); the default is the run's single dataset."""
    from filelock import FileLock, Timeout

    path = Path(run_dir) / "ingest" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"ingest: another dataset writer holds {path}; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
