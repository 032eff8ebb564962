"""Count metadata system calls per sample read, for each layout's random-read and scan phases.

The read phases run in a child process (``python -m benchmarks.metadata.syscalls ...``). Preferred method:
``strace -f`` on the child, counting only the calls between marker ``stat()``s of a path that cannot exist, so
interpreter start-up and imports are excluded and native libraries (Deep Lake's I/O never passes through
Python) are seen. Fallback when strace is missing or not permitted: a ``sys.addaudithook`` in the child that
sees Python-level opens and directory listings only; results carry the method so the two are never mixed up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

MARKER_DIR = "/nonexistent-vpt-bench-marker"
# Calls that touch names, inodes or descriptors rather than file contents.
STRACE_FILTER = "trace=%file,%fstat,getdents64,close"
OPEN_CALLS = {"open", "openat", "openat2", "creat"}
AUDIT_EVENTS = {"open", "os.listdir", "os.scandir", "os.remove", "os.rename", "os.mkdir", "os.rmdir"}
PHASES = ("random", "scan")
STRACE_METHOD = "strace"
AUDIT_METHOD = "audit-hook (Python-level opens/listings only; native-library I/O is not seen)"

_CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?([a-z_0-9]+)\(")


def strace_usable() -> bool:
    if shutil.which("strace") is None:
        return False
    try:
        done = subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def parse_strace(lines: Sequence[str]) -> dict[str, Counter]:
    """Per phase, a Counter of syscall names seen between ``<marker>/<phase>-begin`` and ``-end``."""
    counts = {p: Counter() for p in PHASES}
    phase = None
    for line in lines:
        if MARKER_DIR in line:
            for p in PHASES:
                if f"{MARKER_DIR}/{p}-begin" in line:
                    phase = p
                elif f"{MARKER_DIR}/{p}-end" in line:
                    phase = None
            continue
        if phase is None:
            continue
        m = _CALL.match(line)  # "<... x resumed>", signals and exits do not match: each call counts once
        if m:
            counts[phase][m.group(1)] += 1
    return counts


def _summary(counter: Counter, samples: int) -> dict:
    total = sum(counter.values())
    opens = sum(n for name, n in counter.items() if name in OPEN_CALLS or name == "open")
    return {
        "samples": samples,
        "total": total,
        "per_sample": total / samples if samples else 0.0,
        "opens_per_sample": opens / samples if samples else 0.0,
        "by_syscall": dict(counter.most_common()),
    }


def count_read_syscalls(
    layout: str,
    root: Path,
    options,
    indices: Sequence[int],
    *,
    batch_size: int = 64,
    method: str = "auto",
) -> dict:
    """Metadata syscalls per sample for reading `indices` at random and for a full scan of the layout at `root`.

    `options` is the LayoutOptions the data was written with; `method` is "auto", "strace" or "audit".
    """
    if method == "auto":
        method = "strace" if strace_usable() else "audit"
    with tempfile.TemporaryDirectory(prefix="vpt-syscalls-") as tmp:
        args_file = Path(tmp) / "args.json"
        args_file.write_text(
            json.dumps(
                {
                    "layout": layout,
                    "root": str(root),
                    "options": asdict(options),
                    "indices": [int(i) for i in indices],
                    "batch_size": batch_size,
                    "audit": method == "audit",
                }
            )
        )
        result_file = Path(tmp) / "result.json"
        child = [sys.executable, "-m", "benchmarks.metadata.syscalls", str(args_file), str(result_file)]
        trace_file = Path(tmp) / "trace.txt"
        if method == "strace":
            child = ["strace", "-f", "-qq", "-e", STRACE_FILTER, "-o", str(trace_file), *child]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run(child, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"read-phase child failed ({done.returncode}): {done.stderr[-2000:]}")
        child_result = json.loads(result_file.read_text())
        if method == "strace":
            with open(trace_file, errors="replace") as fh:
                counts = parse_strace(fh)
        else:
            counts = {p: Counter(child_result["audit"][p]) for p in PHASES}
    return {
        "method": STRACE_METHOD if method == "strace" else AUDIT_METHOD,
        "filter": STRACE_FILTER if method == "strace" else sorted(AUDIT_EVENTS),
        "random": _summary(counts["random"], child_result["samples"]["random"]),
        "scan": _summary(counts["scan"], child_result["samples"]["scan"]),
    }


def _marker(name: str) -> None:
    try:
        os.stat(f"{MARKER_DIR}/{name}")
    except OSError:
        pass


def warm_up_libraries() -> None:
    """Load modules and start library thread pools before the first marker: that is not a layout's cost.

    Nothing here touches the data under test, so no cache of it is warmed.
    """
    import deeplake
    import numpy as np
    import pandas  # noqa: F401  (pyarrow imports it lazily on first conversion)
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from .layouts import _npy_bytes, _npy_load, _table_to_samples

    ds = deeplake.create("mem://warm-up")
    ds.add_column("x", deeplake.types.Text())
    ds.append({"x": ["a", "b"]})
    ds["x"][[1, 0]]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2, np.float16), type=pa.float16()), 2)
    _table_to_samples(pa.table({"key": ["k"], "jpeg": [b"j"], "embedding": emb, "caption": ["c"], "metadata_json": ["{}"]}))
    _npy_load(_npy_bytes(np.zeros(2, np.float16)))


def _child(args_file: Path, result_file: Path) -> None:
    """Runs inside the traced process: open reader + read phase, bracketed by markers."""
    from .layouts import LayoutOptions, make_layout

    args = json.loads(args_file.read_text())
    warm_up_libraries()
    layout = make_layout(args["layout"], Path(args["root"]), LayoutOptions(**args["options"]))
    indices, batch = args["indices"], args["batch_size"]
    audit = {p: Counter() for p in PHASES}
    current: list[str | None] = [None]
    if args["audit"]:
        def hook(event: str, _args) -> None:
            if current[0] is not None and event in AUDIT_EVENTS:
                audit[current[0]][event] += 1

        sys.addaudithook(hook)
    samples = {}

    current[0] = "random"
    _marker("random-begin")
    n = 0
    with layout.reader() as reader:
        for start in range(0, len(indices), batch):
            n += len(reader.read(indices[start : start + batch]))
    _marker("random-end")
    samples["random"] = n

    current[0] = "scan"
    _marker("scan-begin")
    n = 0
    with layout.reader() as reader:
        for chunk in reader.scan(batch):
            n += len(chunk)
    _marker("scan-end")
    current[0] = None
    samples["scan"] = n
    result_file.write_text(json.dumps({"samples": samples, "audit": {p: dict(c) for p, c in audit.items()}}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("args_file", type=Path)
    parser.add_argument("result_file", type=Path)
    ns = parser.parse_args()
    _child(ns.args_file, ns.result_file)
