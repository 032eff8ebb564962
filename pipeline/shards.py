"""On-disk state of one shard of one stage: packed outputs, the per-item ledger, parts, the completion marker.

    <run_dir>/<stage>/shard-00003/
        parts/part-000001.<table>.parquet   flushed while the shard runs (resume point after kill/requeue)
        parts/part-000001.ledger.parquet    the ledger rows of that part; written last = the part is complete
        parts/inflight.json                 items handed to the stage and not back yet, and their crash counts
        <table>.parquet                     final packed outputs, sorted by key
        ledger.parquet                      one row per item: status ok|failed|skipped, reason, attempts
        stats.json                          per-shard stats (merged into the stage summary)
        _SUCCESS                            completion marker, written last
        _FAILED                             the error of the last task that died on this shard (cleared on success)
        .finalize/                          the next outputs, staged whole before they replace the current ones
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import _fsync_dir, read_json, write_json, write_parquet

MARKER = "_SUCCESS"
STAGING = ".finalize"
FAILED_MARKER = "_FAILED"
LEDGER = "ledger"
LEDGER_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("attempts", pa.int32()), ("seconds", pa.float64()), ("note", pa.string()),
])

OK, FAILED, SKIPPED = "ok", "failed", "skipped"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def reason_category(reason: str | None) -> str:
    """Reasons are written 'category: detail'; status and reports group by the category."""
    if not reason:
        return "unknown"
    return reason.split(":", 1)[0].strip() or "unknown"


class ShardStore:
    def __init__(self, run_dir: str | Path, stage: str, shard: int):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.shard = shard
        self.dir = self.run_dir / stage / shard_name(shard)
        self.parts_dir = self.dir / "parts"

    # -- state ---------------------------------------------------------------------------------------------
    def is_complete(self) -> bool:
        return (self.dir / MARKER).exists()

    def marker(self) -> dict | None:
        return read_json(self.dir / MARKER)

    def failure(self) -> dict | None:
        return read_json(self.dir / FAILED_MARKER)

    def record_failure(self, error: str) -> None:
        write_json(self.dir / FAILED_MARKER, {"error": error, "time": time.time(), "host": os.uname().nodename})

    def table_path(self, table: str) -> Path:
        return self.dir / f"{table}.parquet"

    def read_table(self, table: str, skip_columns: frozenset[str] = frozenset()) -> pa.Table | None:
        p = self.table_path(table)
        if not p.exists():
            return None
        if not skip_columns:
            return pq.read_table(p, memory_map=True)
        f = pq.ParquetFile(p, memory_map=True)
        return f.read(columns=[c for c in f.schema_arrow.names if c not in skip_columns])

    def read_ledger(self) -> list[dict]:
        t = self.read_table(LEDGER)
        return t.to_pylist() if t is not None else []

    def stats(self) -> dict:
        return read_json(self.dir / "stats.json", {}) or {}

    # -- parts (progress inside a running shard) --------------------------------------------------------------
    def _part_ids(self, pattern: str = "part-*.ledger.parquet") -> list[int]:
        if not self.parts_dir.exists():
            return []
        return sorted({int(p.name.split(".")[0].split("-")[1]) for p in self.parts_dir.glob(pattern)})

    def read_parts(self) -> tuple[list[dict], dict[str, list[pa.Table]]]:
        """Ledger rows and output tables of every complete part (a part is complete once its ledger exists)."""
        ledger: list[dict] = []
        tables: dict[str, list[pa.Table]] = {}
        for pid in self._part_ids():
            ledger.extend(pq.read_table(self.parts_dir / f"part-{pid:06d}.ledger.parquet").to_pylist())
            for p in self.parts_dir.glob(f"part-{pid:06d}.*.parquet"):
                name = p.name.split(".")[1]
                if name != LEDGER:
                    tables.setdefault(name, []).append(pq.read_table(p))
        return ledger, tables

    def write_part(self, ledger_rows: list[dict], tables: dict[str, pa.Table]) -> None:
        # Past every part file, complete or not: a kill between a part's tables and its ledger leaves tables
        # behind, which a reused id would adopt as its own.
        pid = max(self._part_ids("part-*.parquet"), default=0) + 1
        for name, table in tables.items():
            if table is not None and table.num_rows:
                write_parquet(self.parts_dir / f"part-{pid:06d}.{name}.parquet", table)
        write_parquet(self.parts_dir / f"part-{pid:06d}.{LEDGER}.parquet",
                      pa.Table.from_pylist(ledger_rows, schema=LEDGER_SCHEMA))

    def in_flight(self) -> "InFlight":
        return InFlight(self.parts_dir / "inflight.json")

    # -- finalize -------------------------------------------------------------------------------------------
    def finalize(self, ledger_rows: list[dict], tables: dict[str, pa.Table], stats: dict[str, Any],
                 marker_info: dict[str, Any]) -> None:
        """Stage packed outputs, ledger, stats and marker whole, then install them over the current ones."""
        staging = self.dir / STAGING
        shutil.rmtree(staging, ignore_errors=True)  # a staging torn by a kill: never installed, the shard unchanged
        for name, table in tables.items():
            write_parquet(staging / f"{name}.parquet", table)
        ledger_rows = sorted(ledger_rows, key=lambda r: r["video_id"])
        write_parquet(staging / f"{LEDGER}.parquet", pa.Table.from_pylist(ledger_rows, schema=LEDGER_SCHEMA))
        counts = Counter(r["status"] for r in ledger_rows)
        stats = {**stats, "items": len(ledger_rows), "ok": counts.get(OK, 0), "failed": counts.get(FAILED, 0),
                 "skipped": counts.get(SKIPPED, 0)}
        write_json(staging / "stats.json", stats)
        # written last: its presence says the staging is complete and may be installed (again) after a kill
        write_json(staging / MARKER, {**marker_info, "time": time.time(), "items": len(ledger_rows),
                                      "tables": sorted(tables)})
        self._install()

    def resume_finalize(self) -> bool:
        """Finish an install a kill interrupted (the shard then has no marker); True if there was one."""
        staging = self.dir / STAGING
        if (staging / MARKER).exists():
            self._install()
            return True
        shutil.rmtree(staging, ignore_errors=True)
        return False

    def _install(self) -> None:
        """Idempotent: a kill anywhere leaves no marker and the staging's marker, so it simply runs again."""
        staging = self.dir / STAGING
        info = read_json(staging / MARKER)
        # The live marker goes first, durably: a marker must never stand beside a mix of old and new outputs
        # (retry_failed and upstream catch-up re-finalize a complete shard).
        self.clear_marker()
        keep = {f"{name}.parquet" for name in [*info["tables"], LEDGER]}
        for old in self.dir.glob("*.parquet"):
            if old.name not in keep:  # an old table the new outputs lack
                old.unlink()
        for p in staging.iterdir():
            if p.name != MARKER and not p.name.startswith("."):
                os.replace(p, self.dir / p.name)
        _fsync_dir(self.dir)
        os.replace(staging / MARKER, self.dir / MARKER)
        _fsync_dir(self.dir)
        (self.dir / FAILED_MARKER).unlink(missing_ok=True)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)

    def clear_marker(self) -> None:
        (self.dir / MARKER).unlink(missing_ok=True)
        _fsync_dir(self.dir)


class InFlight:
    """The items a running attempt has handed to its stage and not yet got back, on disk: a worker that dies
    (native crash, OOM kill, time-out) cannot record anything itself, so the next attempt reads here what it was
    processing. Opening the file turns those leftovers into suspects (`crashes` has a key for each); a crash
    counts against an item only when it was alone in flight, since then nothing else can have caused it."""

    def __init__(self, path: Path):
        self.path = path
        state = read_json(path, {}) or {}
        self.crashes: dict[str, int] = dict(state.get("crashes", {}))
        left = state.get("inflight", [])
        for vid in left:
            self.crashes.setdefault(vid, 0)
        if len(left) == 1:
            self.crashes[left[0]] += 1
        self.items: set[str] = set()
        self._lock = threading.Lock()  # a stage may pull items on another thread than it yields results
        if left:
            self._save()  # counted once: this attempt may die before it starts anything

    def start(self, video_id: str) -> None:
        with self._lock:
            self.items.add(video_id)
            self._save()

    def done(self, video_id: str) -> None:
        with self._lock:
            self.items.discard(video_id)
            self._save()

    def clear(self) -> None:
        """The attempt ends alive (a shard error): what it had in flight did not crash it."""
        with self._lock:
            if self.items:
                self.items.clear()
                self._save()

    def _save(self) -> None:
        write_json(self.path, {"inflight": sorted(self.items), "crashes": self.crashes})


def concat_tables(tables: Iterable[pa.Table]) -> pa.Table | None:
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")


def dedupe_sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    """Keep the last row per key (later parts win), sorted by key: final outputs do not depend on timing."""
    if table.num_rows == 0:
        return table
    idx = pa.array(range(table.num_rows))
    t = table.append_column("__row", idx)
    last = t.group_by(keys, use_threads=False).aggregate([("__row", "max")])
    keep = pc.sort_indices(last.column("__row_max"))
    rows = pc.take(last.column("__row_max"), keep)
    out = table.take(rows)
    return out.sort_by([(k, "ascending") for k in keys])


def load_json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
