"""On-disk state of one shard of one stage: packed outputs, the per-item ledger, parts, the completion marker.

    <run_dir>/<stage>/shard-00003/
        parts/part-000001.<table>.parquet   flushed while the shard runs (resume point after kill/requeue)
        parts/part-000001.ledger.parquet    the ledger rows of that part; written last = the part is complete
        <table>.parquet                     final packed outputs, sorted by key
        ledger.parquet                      one row per item: status ok|failed|skipped, reason, attempts
        stats.json                          per-shard stats (merged into the stage summary)
        _SUCCESS                            completion marker, written last
        _FAILED                             the error of the last task that died on this shard (cleared on success)
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import read_json, write_json, write_parquet

MARKER = "_SUCCESS"
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

    def read_table(self, table: str) -> pa.Table | None:
        p = self.table_path(table)
        if not p.exists():
            return None
        return pq.read_table(p, memory_map=True)

    def read_ledger(self) -> list[dict]:
        t = self.read_table(LEDGER)
        return t.to_pylist() if t is not None else []

    def stats(self) -> dict:
        return read_json(self.dir / "stats.json", {}) or {}

    # -- parts (progress inside a running shard) --------------------------------------------------------------
    def _part_ids(self) -> list[int]:
        if not self.parts_dir.exists():
            return []
        ids = []
        for p in self.parts_dir.glob("part-*.ledger.parquet"):
            ids.append(int(p.name.split(".")[0].split("-")[1]))
        return sorted(ids)

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
        ids = self._part_ids()
        pid = (ids[-1] + 1) if ids else 1
        for name, table in tables.items():
            if table is not None and table.num_rows:
                write_parquet(self.parts_dir / f"part-{pid:06d}.{name}.parquet", table)
        write_parquet(self.parts_dir / f"part-{pid:06d}.{LEDGER}.parquet",
                      pa.Table.from_pylist(ledger_rows, schema=LEDGER_SCHEMA))

    # -- finalize -------------------------------------------------------------------------------------------
    def finalize(self, ledger_rows: list[dict], tables: dict[str, pa.Table], stats: dict[str, Any],
                 marker_info: dict[str, Any]) -> None:
        """Write packed outputs, ledger and stats, then the marker; then drop the parts."""
        self.dir.mkdir(parents=True, exist_ok=True)
        # A re-finalize (retry_failed) must not leave a table from the old outputs that the new one lacks.
        for name, table in tables.items():
            write_parquet(self.table_path(name), table)
        ledger_rows = sorted(ledger_rows, key=lambda r: r["video_id"])
        write_parquet(self.table_path(LEDGER), pa.Table.from_pylist(ledger_rows, schema=LEDGER_SCHEMA))
        counts = Counter(r["status"] for r in ledger_rows)
        stats = {**stats, "items": len(ledger_rows), "ok": counts.get(OK, 0), "failed": counts.get(FAILED, 0),
                 "skipped": counts.get(SKIPPED, 0)}
        write_json(self.dir / "stats.json", stats)
        write_json(self.dir / MARKER, {**marker_info, "time": time.time(), "items": len(ledger_rows),
                                        "tables": sorted(tables)})
        (self.dir / FAILED_MARKER).unlink(missing_ok=True)
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def clear_marker(self) -> None:
        (self.dir / MARKER).unlink(missing_ok=True)


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
