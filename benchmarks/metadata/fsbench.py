"""mdtest-like filesystem phase: create, stat, open+read and remove N small files in a directory fan-out.

Each phase is timed on its own, as mdtest does. With several clients, ``barrier`` (a callable given the phase
name) holds everyone at the start of each phase so phases overlap and aggregate ops/s means something.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

PHASES = ("create", "stat", "read", "remove")


def file_paths(root: Path, client: int, files: int, dirs: int) -> list[Path]:
    """Files spread round-robin over `dirs` directories shared by all clients (names carry the client id)."""
    return [root / f"dir-{n % dirs:05d}" / f"c{client:04d}-f{n:08d}" for n in range(files)]


def run_fs_phase(
    root: Path,
    *,
    files: int,
    dirs: int = 16,
    file_size: int = 4096,
    client: int = 0,
    barrier: Callable[[str], None] | None = None,
) -> dict:
    """Run the four phases; returns {phase: {ops, seconds, ops_per_s, start, end}} plus the settings used."""
    root = Path(root)
    paths = file_paths(root, client, files, dirs)
    for d in {p.parent for p in paths}:
        d.mkdir(parents=True, exist_ok=True)  # directory creation is setup, not a timed op
    payload = os.urandom(file_size)
    results: dict[str, dict] = {}

    def timed(phase: str, op: Callable[[Path], object]) -> None:
        if barrier is not None:
            barrier(phase)
        start = time.time()
        t0 = time.perf_counter()
        ops = 0
        for p in paths:
            op(p)
            ops += 1
        seconds = time.perf_counter() - t0
        results[phase] = {
            "ops": ops,
            "seconds": seconds,
            "ops_per_s": ops / seconds if seconds > 0 else float("inf"),
            "start": start,
            "end": start + seconds,
        }

    def create(p: Path) -> None:
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)

    def read(p: Path) -> None:
        fd = os.open(p, os.O_RDONLY)
        try:
            if len(os.read(fd, file_size)) != file_size:
                raise OSError(f"short read from {p}")
        finally:
            os.close(fd)

    def stat(p: Path) -> None:
        if os.stat(p).st_size != file_size:
            raise OSError(f"wrong size for {p}")

    timed("create", create)
    timed("stat", stat)
    timed("read", read)
    timed("remove", os.unlink)
    return {"files": files, "dirs": dirs, "file_size": file_size, "client": client, "phases": results}


def aggregate_phases(client_results: list[dict]) -> dict:
    """Aggregate ops/s per phase over clients: all ops over the span from the first start to the last end."""
    out = {}
    for phase in PHASES:
        rows = [r["phases"][phase] for r in client_results if phase in r.get("phases", {})]
        if not rows:
            continue
        span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
        ops = sum(r["ops"] for r in rows)
        rates = sorted(r["ops_per_s"] for r in rows)
        out[phase] = {
            "ops": ops,
            "span_s": span,
            "aggregate_ops_per_s": ops / span if span > 0 else float("inf"),
            "client_ops_per_s_min": rates[0],
            "client_ops_per_s_median": statistics.median(rates),
            "client_ops_per_s_max": rates[-1],
        }
    return out


class FileBarrier:
    """A barrier on the shared filesystem: each client drops a file, then waits until all `clients` are there.

    Its own metadata traffic happens outside the timed phases. After `timeout_s` it gives up waiting (records it)
    so a client whose peers were never scheduled still finishes.
    """

    def __init__(self, directory: Path, clients: int, client: int, timeout_s: float = 300.0, poll_s: float = 0.02):
        self.directory = Path(directory)
        self.clients, self.client = clients, client
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.timeouts: list[str] = []

    def __call__(self, name: str) -> None:
        if self.clients <= 1:
            return
        d = self.directory / name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"client-{self.client:04d}").touch()
        deadline = time.monotonic() + self.timeout_s
        while len(os.listdir(d)) < self.clients:
            if time.monotonic() > deadline:
                self.timeouts.append(name)
                return
            time.sleep(self.poll_s)
