"""What a shard of a stage reads from its upstream stages' shards (`UpstreamRows`), below the engine so that
the verifier reads the same rows the same way without importing the engine. Re-exported by `pipeline.engine`."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from .shards import OK, ShardStore


class UpstreamIncomplete(RuntimeError):
    """The shard of an upstream stage has no completion marker: this shard cannot run yet."""


class UpstreamRows:
    """Rows of the upstream stages' outputs for one shard, grouped by video id (memory-mapped, read by key).
    `skip_columns`: columns not read at all (the verifier leaves out JPEG bytes and embeddings).
    `array_columns`: list<number> columns handed over as one numpy vector per row (views of the Arrow buffer)
    instead of Python lists (ingest's embeddings: a Python float per number was most of its join time)."""

    def __init__(self, run_dir: Path, shard: int, upstream: dict[str, tuple[str, ...]],
                 skip_columns: frozenset[str] = frozenset(), array_columns: frozenset[str] = frozenset()):
        self.array_columns = array_columns
        self.tables: dict[tuple[str, str], pa.Table] = {}
        self.index: dict[tuple[str, str], dict[str, list[int]]] = {}
        self.status: dict[str, dict[str, dict]] = {}
        for stage, tables in upstream.items():
            store = ShardStore(run_dir, stage, shard)
            if not store.is_complete():
                raise UpstreamIncomplete(f"upstream stage {stage!r} shard {shard} is not complete "
                                         f"(no marker in {store.dir}); run stage={stage} first")
            self.status[stage] = {r["video_id"]: r for r in store.read_ledger()}
            for name in tables:
                t = store.read_table(name, skip_columns)
                if t is None:
                    continue
                groups: dict[str, list[int]] = defaultdict(list)
                for i, vid in enumerate(t.column("video_id").to_pylist()):
                    groups[vid].append(i)
                self.tables[(stage, name)] = t
                self.index[(stage, name)] = groups

    def upstream_problem(self, video_id: str) -> str | None:
        """Why this item cannot run here (upstream failed/skipped it), or None."""
        for stage, ledger in self.status.items():
            row = ledger.get(video_id)
            if row is None:
                return f"upstream_missing: {stage} has no ledger row for this item"
            if row["status"] != OK:
                return f"upstream_{row['status']}: {stage}: {row['reason']}"
        return None

    def rows_for(self, video_id: str) -> dict[str, dict[str, list[dict]]]:
        out: dict[str, dict[str, list[dict]]] = defaultdict(dict)
        for (stage, name), t in self.tables.items():
            idx = self.index[(stage, name)].get(video_id, [])
            if not idx:
                out[stage][name] = []
                continue
            # upstream outputs are sorted by key: a video's rows are one run, sliced without copying
            sub = t.slice(idx[0], len(idx)) if idx[-1] - idx[0] + 1 == len(idx) else t.take(idx)
            arrays = [c for c in sub.column_names if c in self.array_columns
                      and pa.types.is_list(sub.schema.field(c).type)
                      and pa.types.is_floating(sub.schema.field(c).type.value_type)]
            rows = sub.drop_columns(arrays).to_pylist() if arrays else sub.to_pylist()
            for c in arrays:
                col = sub.column(c).combine_chunks()
                offsets, valid = col.offsets.to_numpy(), col.is_valid().to_numpy(zero_copy_only=False)
                values = col.values.to_numpy(zero_copy_only=False)
                for r, a, b, ok in zip(rows, offsets[:-1], offsets[1:], valid):
                    r[c] = values[a:b] if ok else None
            out[stage][name] = rows
        return dict(out)
