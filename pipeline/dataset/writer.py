"""The Deep Lake writer of ingest: brings each dataset of the layout (`pipeline.dataset.layout`) up to date with
the complete ingest shards of its group.

Per group, exactly one writer at a time (`<run_dir>/ingest/dataset.lock`, or `dataset-group-<g>.lock` per group),
with these guarantees (see `pipeline.stages.ingest` for the whole story): a commit per `shards_per_commit`
shards, deletes + appends + the shard list + fingerprints in one commit, every commit and tag probed and saved as
the last good version (`pipeline.dataset_health`), a tag once the group is complete and verified. Groups share
nothing but the filesystem, so their writers run at once: `write_dataset(cfg, group=g)` writes one group (an
array task, `python -m pipeline.dataset <g>`), `write_dataset(cfg)` every group, up to `stage.writers` of
them concurrently in child processes.

Memory: a shard's rows table is read in batches of at most `max_rows_in_memory` rows (Deep Lake writes chunks
out as rows are appended), twice from one memory-mapped file (the same inode, whatever a finalize renames
meanwhile): once for its digest and the run-level check (the rows without images and embeddings), once for the
appends. A shard small enough is decoded once. The next shard is opened, hashed and (when both fit in the bound)
decoded in a thread while the current one is appended (`ShardReader`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import arrow_memory
from .. import dataset_health as health
from ..join import JoinParams
from ..schema import TABLE, deeplake_columns, row_schema, to_deeplake_columns
from ..shards import MARKER, ShardStore
from ..verify.checks import Tolerances
from ..verify.dataset import NEW_ROWS_CHECK, verify_dataset
from ..verify.shard import row_bulk, trusted_verdict, verify_shard
from .layout import Layout, dataset_url, writer_layout
from .lock import writer_lock  # noqa: F401  (importable from here)

_log = logging.getLogger(__name__)
_info = _log.info      # the default progress log (callers may pass their own)

FINGERPRINTS = health.FINGERPRINTS     # dataset metadata: per shard, what of it the dataset holds (its rows too)
Hook = Callable[[int], None]


def open_or_create(url: str, log: Callable[[str], None] = _info):
    ds, check = _open_or_create(url, log)
    if check is not None:
        check()
    return ds


def _open_or_create(url: str, log: Callable[[str], None] = _info) -> tuple[Any, Callable[[], None] | None]:
    """The dataset, and the check of the version it committed (creating it, or adding columns) still in flight
    (`dataset_health.write_checked(wait=False)`; None: nothing committed)."""
    import deeplake

    if deeplake.exists(url):
        ds = health.held(deeplake.open(url))
        have = {c.name for c in ds.schema.columns}
        missing = {k: v for k, v in deeplake_columns().items() if k not in have}
        if not missing:
            return ds, None
        # a dataset made before these columns: its old rows read them as None
        for name, dtype in missing.items():
            ds.add_column(name, dtype)
        return ds, health.write_checked(url, lambda: ds.commit(f"schema: add columns {sorted(missing)}"),
                                        "the schema migration", log, wait=False, ds=ds)
    ds = health.held(deeplake.create(url))
    for name, dtype in deeplake_columns().items():
        ds.add_column(name, dtype)
    ds.metadata["ingested_shards"] = []
    ds.metadata[FINGERPRINTS] = {}
    return ds, health.write_checked(url, lambda: ds.commit("create: empty dataset with the row schema"),
                                    "creating the dataset", log, wait=False, ds=ds)


def ingested_shards(ds) -> list[int]:
    return sorted(int(s) for s in ds.metadata["ingested_shards"]) if "ingested_shards" in ds.metadata.keys() \
        else []


def ingested_fingerprints(ds) -> dict[str, dict[str, Any]]:
    """shard (as str) -> {"marker", "rows", "num_rows"} of what the dataset holds; {} on datasets made before."""
    return {str(k): dict(v) for k, v in dict(ds.metadata[FINGERPRINTS]).items()} \
        if FINGERPRINTS in ds.metadata.keys() else {}


def marker_digest(store: ShardStore) -> str:
    """sha256 of the shard's completion marker, which every finalize rewrites (it carries the finalize time)."""
    path = store.dir / MARKER
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def rows_bytes(store: ShardStore) -> int:
    """Uncompressed bytes of the shard's rows table (Parquet metadata only: nothing is read)."""
    path = store.table_path(TABLE)
    if not path.exists():
        return 0
    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def read_rows(store: ShardStore) -> tuple[pa.Table | None, str]:
    """The shard's rows table (whole) and the sha256 of the very bytes it was parsed from."""
    path = store.table_path(TABLE)
    if not path.exists():
        return None, "absent"
    buf = pa.memory_map(str(path)).read_buffer()   # finalize replaces the file by rename: this inode stays whole
    return pq.read_table(pa.BufferReader(buf)), hashlib.sha256(buf).hexdigest()


class ShardRows:
    """A shard's rows table held open (memory-mapped: one inode, so a finalize renaming a new file in meanwhile
    changes nothing here), at most `max_rows` rows of it in memory at a time. `digest`: sha256 of its bytes
    ("absent": no table). A shard of at most `max_rows` rows is decoded once and kept for the appends; a larger
    one is read twice in batches (the check's columns, then every column for the appends)."""

    def __init__(self, store: ShardStore, max_rows: int):
        path = store.table_path(TABLE)
        self.max_rows = max(1, int(max_rows))
        self.file = pa.memory_map(str(path)) if path.exists() else None
        self.digest, self.num_rows, self.pf, self.whole = "absent", 0, None, None
        if self.file is not None:
            # Arrow reads the mapped pages without the GIL (and without copies), so a read-ahead thread overlaps
            # the appends; a Python file object would take the GIL for every read.
            self.digest = hashlib.sha256(memoryview(self.file.read_buffer())).hexdigest()
            self.file.seek(0)
            self.pf = pq.ParquetFile(self.file)
            self.num_rows = self.pf.metadata.num_rows

    def preload(self) -> None:
        """Decode the whole table now, when it fits in `max_rows` (what `batches` would do first)."""
        if self.pf is not None and self.whole is None and self.num_rows <= self.max_rows:
            self.whole = self.pf.read()

    @property
    def absent(self) -> bool:
        return self.file is None

    def _tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        if self.pf is None:
            return
        if self.num_rows <= self.max_rows:
            if self.whole is None:
                self.whole = self.pf.read()
            yield self.whole
            return
        for batch in self.pf.iter_batches(batch_size=self.max_rows, columns=columns):
            yield pa.Table.from_batches([batch])

    def batches(self) -> Iterator[pa.Table]:
        """The rows in the dataset's schema (columns joined before a column existed get nulls), in batches."""
        schema = row_schema()       # every registered modality's columns (pipeline.modalities)
        for table in self._tables():
            for name in schema.names:
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
            yield table.select(list(schema.names)).cast(schema)

    def slim(self) -> pa.Table | None:
        """Every row without its bulky columns (JPEGs and embeddings counted, as the run-level check wants)."""
        if self.pf is None:
            return None
        bulk = row_bulk()
        names = self.pf.schema_arrow.names
        parts = []
        for t in self._tables([c for c in names if c not in bulk or bulk[c]]):
            for column, count in bulk.items():
                if column in t.column_names:
                    if count:
                        t = t.append_column(count, pc.list_value_length(t.column(column)).fill_null(0))
                    t = t.drop_columns([column])
            parts.append(t)
        if not parts:
            return self.pf.schema_arrow.empty_table().drop_columns([c for c in bulk if c in names])
        return pa.concat_tables(parts)

    def key_columns(self) -> pa.Table | None:
        """video_id and segment_idx of every row (from the rows already decoded, when they were)."""
        if self.pf is None:
            return None
        if self.whole is not None:
            return self.whole.select(["video_id", "segment_idx"])
        return self.pf.read(columns=["video_id", "segment_idx"])

    def close(self) -> None:
        self.whole = None
        if self.file is not None:
            self.file.close()


class ShardReader:
    """The shards' rows tables (`ShardRows`) in the order asked for, the next one opened and hashed in a thread
    while the caller appends the current, and decoded there too when both fit in `max_rows` rows together (the
    writer's memory bound holds: at most `max_rows` decoded rows at a time)."""

    def __init__(self, run_dir: Path, shards: list[int], max_rows: int):
        from concurrent.futures import ThreadPoolExecutor

        self.run_dir, self.order, self.max_rows = run_dir, list(shards), max(1, int(max_rows))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-read-ahead")
        self.ahead: dict[int, Any] = {}

    def _open(self, shard: int, beside: int) -> ShardRows:
        rows = ShardRows(ShardStore(self.run_dir, "ingest", shard), self.max_rows)
        if rows.num_rows + beside <= self.max_rows:
            rows.preload()
        return rows

    def open(self, shard: int) -> ShardRows:
        """`shard`'s rows (read ahead when it was the next one), and the read-ahead of the one after it."""
        future = self.ahead.pop(shard, None)
        rows = future.result() if future is not None else ShardRows(ShardStore(self.run_dir, "ingest", shard),
                                                                     self.max_rows)
        k = self.order.index(shard) + 1 if shard in self.order else len(self.order)
        if k < len(self.order) and self.order[k] not in self.ahead:
            self.ahead[self.order[k]] = self.pool.submit(self._open, self.order[k], rows.num_rows)
        return rows

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for future in self.ahead.values():
            if future.exception() is None:
                future.result().close()
        self.ahead.clear()


def delete_shard_rows(ds, shard: int) -> int:
    """Delete (uncommitted) every dataset row of `shard`; returns how many."""
    n = len(ds)
    shards = ds["shard"][0:n] if n else []
    doomed = [i for i in range(n) if int(shards[i]) == shard]
    for i in reversed(doomed):          # from the end: earlier offsets stay valid
        ds.delete(i)
    return len(doomed)


def current_version_tagged(ds) -> bool:
    version = ds.version
    return any(ds.tags[name].version == version for name in ds.tags.names())


def group_up_to_date(cfg: Any, layout: Layout, group: int) -> bool:
    """Whether the group's writer would find nothing to do: the group's head is its last good version (saved once
    probed), which records every shard of the group with the completion marker the shard has now, and is tagged.
    Read from the saved state and the markers only: no Deep Lake in the process that asks (a submitter), no write.
    False whenever in doubt (the writer then decides)."""
    path = health.local_dir(layout.group_url(group))
    if path is None or not health.exists(path):
        return False
    state = health.saved_state(path) or {}
    if not state.get("markers") or state.get("digest") != health.log_digest(path):
        return False
    for shard in layout.shards_of(group):
        store = ShardStore(Path(cfg.run_dir), "ingest", shard)
        if not store.is_complete() or state["markers"].get(str(shard)) != marker_digest(store):
            return False
    return state.get("version") in set((state.get("tags") or {}).values())


def _keys(table: pa.Table | None) -> set[tuple[str, int]]:
    if table is None or not table.num_rows:
        return set()
    return set(zip(table.column("video_id").to_pylist(), table.column("segment_idx").to_pylist()))


def run_layout(cfg: Any, log: Callable[[str], None] = _info) -> Layout:
    """The run's layout, pinned (catalogue written) when it has several groups."""
    from ..atomic import read_json

    run_dir = Path(cfg.run_dir)
    geometry = read_json(run_dir / "geometry.json") or {}
    return writer_layout(dataset_url(cfg.stage, run_dir), int(geometry.get("num_shards", 0)),
                         int(cfg.stage.get("shards_per_group", 0) or 0), log)


def write_group(cfg: Any, layout: Layout, group: int, log: Callable[[str], None] = _info,
                after_append: Hook | None = None, before_append: Hook | None = None,
                after_commit: Callable[[list[int]], None] | None = None) -> dict[str, Any]:
    """Bring one dataset of the layout up to date with the complete ingest shards of its group."""
    from ..manifest import load_items

    arrow_memory.configure()
    run_dir = Path(cfg.run_dir)
    stage = cfg.stage
    url = layout.group_url(group)
    mine = layout.shards_of(group)
    per_commit = max(1, int(stage.shards_per_commit))
    max_rows = max(1, int(stage.get("max_rows_in_memory", 0) or 1 << 62))
    batch = max(1, min(int(stage.append_batch_rows), max_rows))
    tol, params = Tolerances.from_config(stage), JoinParams.from_config(stage)
    row_check = {"call": NEW_ROWS_CHECK, "kwargs": {"tol": asdict(tol)}}     # run by each commit's probe child
    t0, started_at, rows_written, rows_deleted, commits, verify_s = time.perf_counter(), time.time(), 0, 0, 0, 0.0
    verdicts_used = 0
    written: list[int] = []
    replaced: list[int] = []
    refused: dict[int, list[str]] = {}
    shard_keys: dict[int, set[tuple[str, int]]] = {}
    problems: list[str] = []
    with writer_lock(run_dir, log, layout.lock_name(group)), ExitStack() as probes:
        # Every new head is probed in one warm child, started first: its start-up overlaps the reads below.
        probes.enter_context(health.warm_probes(preload=(NEW_ROWS_CHECK.partition(":")[0],)))
        prestarted = health.prober_prestarted()
        # a head left unreadable (the disk filled during a commit) goes back to the last good version first
        health.ensure_readable(url, log, save=True)
        # (re)read under the lock: another writer may have just committed. `inflight`: the last commit's probe,
        # running while the next shards are read, checked and appended (its version log already copied aside:
        # `dataset_health.stage_good`), settled before the next commit lands on it.
        ds, check = _open_or_create(url, log)
        inflight = [check] if check is not None else []
        probes.callback(_settle, inflight)      # also when the write stops early: an unreadable head is news
        done = set(ingested_shards(ds))
        prints = ingested_fingerprints(ds)
        complete = [s for s in mine if ShardStore(run_dir, "ingest", s).is_complete()]
        # Markers are read before any rows table: a finalize racing us then leaves a stale marker digest, which
        # only makes the next run re-check the rows, never a fresh marker digest recorded over stale rows.
        markers = {s: marker_digest(ShardStore(run_dir, "ingest", s)) for s in complete}
        todo = [s for s in complete if s not in done or prints.get(str(s), {}).get("marker") != markers[s]]
        videos: dict[int, list[str]] = {}
        if todo:
            for item in load_items(run_dir):
                videos.setdefault(item.shard, []).append(item.video_id)
        margin, min_free = float(stage.free_space_margin), float(stage.free_space_min_mb) * 2**20
        reader = ShardReader(run_dir, todo, max_rows)      # the next shard read while this one is appended
        probes.callback(reader.close)
        for g in range(0, len(todo), per_commit):
            chunk = todo[g:g + per_commit]
            need = sum(rows_bytes(ShardStore(run_dir, "ingest", s)) for s in chunk)
            health.check_free_space(url, int(margin * need + min_free),
                                    f"ingest shards {chunk} ({need / 2**10:.1f} KiB of rows x {margin:g} + "
                                    f"{min_free / 2**20:g} MiB)")
            accepted = []
            from_row = len(ds)          # the rows the commit adds; a replaced shard's delete can shift any row
            for shard in chunk:
                rows = reader.open(shard)
                try:
                    slim = None
                    # Re-finalized with identical rows (e.g. a retry that failed again): only the marker is new.
                    if shard not in done or prints.get(str(shard), {}).get("rows") != rows.digest:
                        t1 = time.perf_counter()
                        # the check's verdict kept at the shard's finalize, when it judged these very bytes
                        bad = trusted_verdict(run_dir, shard, videos.get(shard, []), tol, params, rows.digest)
                        if bad is None:
                            slim = rows.slim()
                            bad = verify_shard(run_dir, shard, videos.get(shard, []), tol, params, slim).blocking()
                        else:
                            verdicts_used += 1
                        verify_s += time.perf_counter() - t1
                        if bad:
                            refused[shard] = [str(v) for v in bad[:5]]
                            log(f"ingest: shard {shard} NOT committed, {len(bad)} violation(s) of the run-level "
                                "check: " + "; ".join(refused[shard][:3]))
                            continue
                        if shard in done:
                            rows_deleted += delete_shard_rows(ds, shard)
                            replaced.append(shard)
                            from_row = 0
                        if before_append is not None:
                            before_append(shard)
                        for table in rows.batches():
                            for start in range(0, table.num_rows, batch):
                                ds.append(to_deeplake_columns(table.slice(start, batch)))
                        rows_written += rows.num_rows
                        written.append(shard)
                    shard_keys[shard] = _keys(slim if slim is not None else rows.key_columns())
                    prints[str(shard)] = {"marker": markers[shard], "rows": rows.digest, "num_rows": rows.num_rows}
                finally:
                    rows.close()
                accepted.append(shard)
                if after_append is not None:
                    after_append(shard)
            if not accepted:
                continue
            _settle(inflight)
            done |= set(accepted)
            # Deletes, appends and metadata land in one commit: a crash leaves the old rows or the new, not both.
            ds.metadata["ingested_shards"] = sorted(done)
            ds.metadata[FINGERPRINTS] = prints
            message = f"ingest shards {json.dumps(accepted)}"

            def commit(accepted=accepted, message=message):
                ds.commit(message)
                if after_commit is not None:
                    after_commit(accepted)

            inflight.append(health.write_checked(url, commit, f"ingest: the commit of shards {accepted}", log,
                                                 from_row=from_row, wait=False, ds=ds, check=row_check))
            commits += 1
            log(f"ingest: committed shards {accepted} to {url}")
        tag = None
        ready = bool(len(mine)) and len(complete) == len(mine) and not refused and not current_version_tagged(ds)
        if commits or ready:
            t1 = time.perf_counter()
            for shard in done - set(shard_keys) - set(refused):      # unchanged since ingested: keys only
                path = ShardStore(run_dir, "ingest", shard).table_path(TABLE)
                shard_keys[shard] = _keys(pq.read_table(path, columns=["video_id", "segment_idx"])
                                          if path.exists() else None)
            # Keys and shard lists here, over the whole dataset; the rows each commit added were checked as
            # stored by its probe child (`check_rows`), while this process went on; checked here when they were not.
            problems = [str(v) for v in verify_dataset(run_dir, stage, shard_keys, tol, shards=[], ds=ds)]
            _settle(inflight)
            found = health.row_checks()
            if found is None:
                problems = [str(v) for v in verify_dataset(run_dir, stage, shard_keys, tol, shards=written, ds=ds)]
            else:
                problems += found
            problems += [f"dataset: shard {s} listed in group {group}, which holds shards {mine.start}.."
                         f"{mine.stop - 1}" for s in sorted(done) if s not in mine]
            verify_s += time.perf_counter() - t1
            if problems:
                log(f"ingest: dataset check after the commit: {len(problems)} violation(s), not tagged: "
                    + "; ".join(problems[:3]))
        _settle(inflight)
        # Tagged whenever complete, verified and untagged, so a crash between the last commit and the tag is repaired.
        if ready and not problems:
            base = tag = f"{stage.tag_prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{len(ds)}rows"
            taken, n = set(ds.tags.names()), 1
            while tag in taken:         # a replace within the same second can give the same name
                n += 1
                tag = f"{base}-{n}"
            health.write_checked(url, lambda: ds.tag(tag), f"ingest: tagging {tag}", log, from_row=health.INFO_ONLY,
                                 ds=ds, expect=lambda info: None if tag in info.get("tags", {}) else
                                 "the tag is missing from the head a reader opens")
            log(f"ingest: tagged {tag} ({len(ds)} rows, shards {mine.start}..{mine.stop - 1})")
        rows = len(ds)
    seconds = time.perf_counter() - t0
    return {"dataset": url, "group": group, "shards_written": written, "shards_replaced": replaced,
            "rows_written": rows_written, "rows_deleted": rows_deleted, "commits": commits, "tag": tag, "rows": rows,
            "seconds": seconds, "shards_refused": refused, "dataset_violations": problems, "verify_seconds": verify_s,
            # started_at/ended_at: epoch seconds, for the span of concurrent writers
            "verdicts_used": verdicts_used, "started_at": started_at, "ended_at": time.time(),
            "probe_child_prestarted": prestarted}


def _settle(inflight: list[Callable[[], None] | None]) -> None:
    """Complete the checks in flight (a commit's save as the last good version, or its rollback and error)."""
    while inflight:
        check = inflight.pop(0)
        if check is not None:
            check()


def write_dataset(cfg: Any, log: Callable[[str], None] = _info, after_append: Hook | None = None,
                  group: int | None = None, before_append: Hook | None = None,
                  after_commit: Callable[[list[int]], None] | None = None,
                  writers: int | None = None) -> dict[str, Any]:
    """Bring the run's dataset(s) up to date with every complete ingest shard; commit per `shards_per_commit`.

    A shard not yet in its dataset is appended; one whose rows changed since it was ingested (re-finalized by
    retry_failed or upstream catch-up) has its old rows deleted and the new ones appended in the same commit.
    Either only once its rows pass `verify_shard`; a shard that fails keeps what the dataset had of it.
    `cfg` is the run config (run_dir + stage). `group`: only that group (one task of an array of writers);
    None: every group, `writers` (default `stage.writers`) at once in child processes. Returns what was done
    (for several groups: the sums, `tag` the list of tags made, `groups` each group's result). The hooks
    (`before_append`/`after_append(shard)`, `after_commit(shards)`) are for tests; with them, groups run here.
    """
    layout = run_layout(cfg, log)
    hooks = {"after_append": after_append, "before_append": before_append, "after_commit": after_commit}
    if not layout.grouped:
        return write_group(cfg, layout, 0, log, **hooks)
    if group is not None:
        if group not in layout.groups():
            from ..errors import ConfigError

            raise ConfigError(f"group {group} out of range: this dataset has groups 0..{layout.num_groups - 1}")
        return write_group(cfg, layout, group, log, **hooks)
    n = int(writers if writers is not None else cfg.stage.get("writers", 1) or 1)
    t0 = time.perf_counter()
    if n <= 1 or any(hooks.values()):
        results = [write_group(cfg, layout, g, log, **hooks) for g in layout.groups()]
    else:
        results = _write_in_children(cfg, layout, n, log)
    return _combined(layout, results, time.perf_counter() - t0)


def _combined(layout: Layout, results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"dataset": layout.url, "groups": results, "seconds": seconds}
    for key in ("shards_written", "shards_replaced"):
        out[key] = sorted(s for r in results for s in r[key])
    for key in ("rows_written", "rows_deleted", "commits", "rows", "verify_seconds", "verdicts_used"):
        out[key] = sum(r[key] for r in results)
    out["shards_refused"] = {int(s): v for r in results for s, v in r["shards_refused"].items()}
    out["dataset_violations"] = [v for r in results for v in r["dataset_violations"]]
    tags = [r["tag"] for r in results if r["tag"]]
    out["tag"] = tags or None
    return out


def _write_in_children(cfg: Any, layout: Layout, n: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every group, `n` writer processes at a time (`python -m pipeline.dataset <g>`); a failed group is
    reported after the others finished."""
    from omegaconf import OmegaConf

    payload = json.dumps({"run_dir": str(cfg.run_dir),
                          "stage": OmegaConf.to_container(cfg.stage, resolve=True)
                          if OmegaConf.is_config(cfg.stage) else dict(cfg.stage)})
    def one(g: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.dataset", str(g)], input=payload,
                              capture_output=True, text=True, env=health._child_env())

    from concurrent.futures import ThreadPoolExecutor

    results, failures = [], []
    with ThreadPoolExecutor(max_workers=n) as pool:
        for g, proc in zip(layout.groups(), pool.map(one, layout.groups())):
            for line in proc.stderr.splitlines():
                if line.startswith("ingest"):
                    log(line)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines:
                results.append(json.loads(lines[-1]))
            else:
                tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                failures.append(f"group {g}: {tail[-1].strip() if tail else f'exit code {proc.returncode}'}")
    if failures:
        from ..errors import ConfigError

        raise ConfigError("ingest: " + "; ".join(failures) + " (re-run to complete them)")
    return results


def main(argv: list[str]) -> int:
    """`python -m pipeline.dataset <group>` with {"run_dir", "stage"} (JSON) on stdin: one group's writer (an
    array task); its result as the last line of stdout, progress on stderr."""
    from omegaconf import OmegaConf

    from ..errors import ConfigError

    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m pipeline.dataset <group> < {\"run_dir\": ..., \"stage\": {...}}", file=sys.stderr)
        return 2
    try:
        payload = json.loads(sys.stdin.read())
        cfg = OmegaConf.create({"run_dir": payload["run_dir"], "stage": payload["stage"]})
    except (ValueError, KeyError, TypeError) as exc:
        print(f"ingest: the writer's input is not {{\"run_dir\", \"stage\"}} JSON: {exc}", file=sys.stderr)
        return 2
    try:
        result = write_dataset(cfg, log=lambda line: print(line, file=sys.stderr, flush=True), group=int(argv[0]))
    except ConfigError as exc:
        print(f"ingest: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(result, default=str), flush=True)
    return 0

