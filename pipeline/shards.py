"""On-disk state of one shard of one stage: packed outputs, the per-item ledger, parts, the completion marker.

    <run_dir>/<stage>/shard-00003/
        parts/part-000001.<table>.arrow     flushed while the shard runs (resume point after kill/requeue): Arrow
                                            IPC, read back memory-mapped (no decoding); `.parquet` from older runs
        parts/part-000001.ledger.parquet    the ledger rows of that part; written last = the part is complete
        parts/inflight.json                 items handed to the stage and not back yet, and their crash counts
        <table>.parquet                     final packed outputs, sorted by key: the only Parquet encoding of a row
        ledger.parquet                      one row per item: status ok|failed|skipped, reason, attempts
        stats.json                          per-shard stats (merged into the stage summary)
        _SUCCESS                            completion marker, written last
        _FAILED                             the error of the last task that died on this shard (cleared on success)
        .finalize/                          the next outputs, staged whole before they replace the current ones
        .lease.lock, lease.json             who runs the shard now (see ShardLease)

Only the holder of the shard's lease writes any of this: a second launch of the same stage waits for (or skips)
a shard that is leased and alive, and takes over a lease whose owner is gone.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import _fsync_dir, publish, read_json, temp_path, write_json, write_parquet

MARKER = "_SUCCESS"
STAGING = ".finalize"
FAILED_MARKER = "_FAILED"
LEDGER = "ledger"
LEDGER_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("attempts", pa.int32()), ("seconds", pa.float64()), ("note", pa.string()),
])

OK, FAILED, SKIPPED = "ok", "failed", "skipped"

# Final outputs: zstd without dictionary pages. Stage tables are mostly JPEG bytes, embeddings and unique text,
# where dictionaries cost most of the encoding (and of the decoding downstream) and save ~8% of the bytes.
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": False}


def _media(dtype: pa.DataType) -> bool:
    """Binary values (JPEG frames), alone or in lists: already compressed, zstd only costs time on them."""
    while pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        dtype = dtype.value_type
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """`PARQUET_OPTIONS` for a table: its binary (media) columns stored uncompressed, and min/max statistics only
    for columns of one value per row (keys, times, text): those of list columns (every JPEG, CLIP and audio number)
    were a quarter of a rows table's write time, and no reader filters on them. Parquet names codecs and
    statistics per leaf column ("frames.list.element"), so the leaves come from the Parquet schema of an empty
    table."""
    buf = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), buf)
    leaves = [c.path for c in pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema]
    media = {f.name for f in schema if _media(f.type)}
    lists = {f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)}
    return {**PARQUET_OPTIONS,
            "compression": {path: "none" if path.split(".")[0] in media else PARQUET_OPTIONS["compression"]
                            for path in leaves},
            "write_statistics": [path for path in leaves if path.split(".")[0] not in lists]}


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
        f = pq.ParquetFile(p, memory_map=True)  # not pq.read_table: that imports pyarrow.dataset (and pandas)
        return f.read(columns=[c for c in f.schema_arrow.names if c not in skip_columns] if skip_columns else None)

    def read_ledger(self) -> list[dict]:
        t = self.read_table(LEDGER)
        return t.to_pylist() if t is not None else []

    def stats(self) -> dict:
        return read_json(self.dir / "stats.json", {}) or {}

    # -- parts (progress inside a running shard) --------------------------------------------------------------
    def _part_ids(self, pattern: str = f"part-*.{LEDGER}.parquet") -> list[int]:
        if not self.parts_dir.exists():
            return []
        return sorted({int(p.name.split(".")[0].split("-")[1]) for p in self.parts_dir.glob(pattern)})

    def read_parts(self) -> tuple[list[dict], dict[str, list[pa.Table]]]:
        """Ledger rows and output tables of every complete part (a part is complete once its ledger exists).
        Tables of Arrow parts are memory-mapped: concatenating them for the final output copies nothing."""
        ledger: list[dict] = []
        tables: dict[str, list[pa.Table]] = {}
        for pid in self._part_ids():
            ledger.extend(pq.ParquetFile(self.parts_dir / f"part-{pid:06d}.{LEDGER}.parquet").read().to_pylist())
            for p in sorted(self.parts_dir.glob(f"part-{pid:06d}.*")):
                name, kind = p.name.split(".")[1], p.suffix
                if name == LEDGER or p.name.startswith("."):
                    continue
                if kind == ".arrow":
                    tables.setdefault(name, []).append(pa.ipc.open_file(pa.memory_map(str(p))).read_all())
                elif kind == ".parquet":  # parts flushed by older versions
                    tables.setdefault(name, []).append(pq.ParquetFile(p).read())
        return ledger, tables

    def write_part(self, ledger_rows: list[dict], tables: dict[str, pa.Table]) -> None:
        """One part: its tables as Arrow IPC files (no encoding: the shard's final Parquet output is the only one),
        each fsynced and renamed into place, then its ledger, the part's completion mark."""
        # Past every part file, complete or not: a kill between a part's tables and its ledger leaves tables
        # behind, which a reused id would adopt as its own.
        pid = max(self._part_ids("part-*"), default=0) + 1
        for name, table in tables.items():
            if table is not None and table.num_rows:
                with temp_path(self.parts_dir / f"part-{pid:06d}.{name}.arrow") as tmp:
                    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                        writer.write_table(table)
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
            table = as_read_back(table)
            write_parquet(staging / f"{name}.parquet", table, **parquet_options(table.schema))
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
                publish(p, self.dir / p.name)
        _fsync_dir(self.dir)
        publish(staging / MARKER, self.dir / MARKER)
        _fsync_dir(self.dir)
        (self.dir / FAILED_MARKER).unlink(missing_ok=True)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)

    def clear_marker(self) -> None:
        (self.dir / MARKER).unlink(missing_ok=True)
        _fsync_dir(self.dir)


class InFlight:
    """The items a running attempt has handed to its stage and not yet got back, on disk: a worker that dies
    (native crash, OOM kill) cannot record anything itself, so what it was processing stays here.

    Opening the file turns leftovers into suspects (`crashes` has a key for each): the next attempt runs them one at
    a time, first. A death counts against an item only when it was alone in flight AND the task outlived its
    worker: the task's `Witness` sees the worker die and counts it. A task killed from outside as a whole (SIGKILL
    of its process group, preemption, node failure, Slurm's time limit) takes its witness with it, so nothing is
    counted and the items are only suspects.

    On Slurm the step's remaining processes may be killed as soon as its task dies, witness included; then Slurm's
    accounting tells: an attempt that ran as another job and ended FAILED or OUT_OF_MEMORY died on its own (a
    preempted, cancelled, timed-out or requeued job, or a failed node, did not)."""

    # A record up to one page is overwritten in place by one pwrite (a process death cannot tear a single-page
    # write: the kernel copies the page whole); a larger one goes to a temp file and a rename.
    IN_PLACE_MAX = 4096

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._size = 0
        try:
            state = read_json(path, {}) or {}
        except ValueError:  # torn by a crash of the machine (never fsynced): the task died with it, nothing to count
            state = {}
        self.crashes: dict[str, int] = {k: int(v) for k, v in state.get("crashes", {}).items()}
        left = state.get("inflight", [])
        for vid in left:
            self.crashes.setdefault(vid, 0)
        job = (state.get("owner") or {}).get("slurm_job")
        if len(left) == 1 and job and job != os.environ.get("SLURM_JOB_ID") and slurm_job_died_on_its_own(job):
            self.crashes[left[0]] += 1
        self.items: set[str] = set()
        self._lock = threading.Lock()  # a stage may pull items on another thread than it yields results
        if left:
            self._save()  # the leftovers become suspects: this attempt may die before it starts anything

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
        # Two writes per item, neither fsynced: the record guards deaths of processes (native crash, OOM kill,
        # kill -9), and the page cache outlives those. Only a crash of the machine could lose or tear it, and that
        # kills the witness and the task too: nothing would be counted anyway, and the items simply run again (a
        # torn record reads as empty). Readers (the witness, the next attempt) read it after this process died.
        state = {"inflight": sorted(self.items), "crashes": self.crashes,
                 "owner": {"host": socket.gethostname(), "pid": os.getpid(),
                           "slurm_job": os.environ.get("SLURM_JOB_ID", "")}}
        data = json.dumps(state, sort_keys=True).encode()
        if self._fd is None and len(data) <= self.IN_PLACE_MAX:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._size = os.fstat(self._fd).st_size
        if self._fd is None or max(len(data), self._size) > self.IN_PLACE_MAX:
            self.close()
            write_json(self.path, state, durable=False)  # atomic: temp file + rename (a new, compact file)
            return
        # JSON then blanks up to the longest record written so far: no tail of an older one is left to parse.
        record = data.ljust(self._size)
        if os.pwrite(self._fd, record, 0) != len(record):
            raise OSError(f"{self.path}: short write of the in-flight record")
        self._size = max(self._size, len(data))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


def slurm_job_died_on_its_own(job: str, timeout_s: float = 15.0) -> bool:
    """Slurm accounting says the job ended FAILED or OUT_OF_MEMORY (not preempted, cancelled, timed out, requeued,
    node failure). False when it cannot tell."""
    try:
        proc = subprocess.run(["sacct", "-j", str(job), "-X", "-n", "-P", "-o", "State"], capture_output=True,
                              text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return False
    states = {ln.split()[0] for ln in proc.stdout.splitlines() if ln.strip()} if proc.returncode == 0 else set()
    return bool(states) and states <= {"FAILED", "OUT_OF_MEMORY"}


# Runs in a bare interpreter (python -S -c): it must start fast and import nothing of the pipeline.
_WITNESS = r"""
import json, os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
worker, path = int(sys.argv[1]), sys.argv[2]
try:
    pidfd = os.pidfd_open(worker)
except (AttributeError, OSError):
    pidfd = None
while True:
    ready = select.select([0] + ([pidfd] if pidfd is not None else []), [], [], 0.5)[0]
    if 0 in ready:
        data = os.read(0, 16)
        if data.startswith(b"done"):
            sys.exit(0)
        if not data and pidfd is None:
            break
    if pidfd is not None and pidfd in ready:
        break
    if pidfd is None and os.getppid() != worker:
        break
try:
    with open(path) as f:
        state = json.load(f)
except (OSError, ValueError):
    sys.exit(0)
left = state.get("inflight", [])
if not left:
    sys.exit(0)
crashes = state.get("crashes", {})
for vid in left:
    crashes.setdefault(vid, 0)
if len(left) == 1:
    crashes[left[0]] += 1
tmp = f"{path}.witness-{os.getpid()}"
with open(tmp, "w") as f:
    json.dump({"inflight": [], "crashes": crashes, "witnessed": {"worker_pid": worker, "inflight": left}}, f,
              indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, path)
"""


class Witness:
    """A small process beside the worker (same process group, holding the shard's lease with it): if the worker
    dies and the witness lives, the worker died on its own (native crash, OOM kill of that process), and the
    witness counts the death against the item that was alone in flight. A kill of the whole task kills the witness
    too, and then nothing is counted. The lease is released only when both are gone, so the next attempt reads
    the count."""

    def __init__(self, inflight_path: Path, lease: "ShardLease | None" = None):
        fds = (lease.fd,) if lease is not None and lease.fd is not None else ()
        self.proc: subprocess.Popen | None = None
        try:
            self.proc = subprocess.Popen([sys.executable, "-S", "-c", _WITNESS, str(os.getpid()), str(inflight_path)],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=fds)
        except OSError:  # no witness: deaths are not counted, items in flight are still suspects
            self.proc = None

    def stop(self) -> None:
        """The worker ends alive: the witness leaves without counting anything."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(b"done\n")
            self.proc.stdin.flush()
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


LEASE_LOCK = ".lease.lock"
LEASE_FILE = "lease.json"
LEASE_TTL_S = 120.0


class ShardLeased(RuntimeError):
    """The shard is leased by a live owner (another launch is running it)."""

    def __init__(self, owner: dict):
        super().__init__(f"shard is being run by {describe_owner(owner)}")
        self.owner = owner


class LeaseLost(RuntimeError):
    """Another owner took the lease over (ours looked stale): this process must not write into the shard."""


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "another process (owner unknown)"
    job = f" slurm job {owner['slurm_job']}" if owner.get("slurm_job") else ""
    age = time.time() - float(owner.get("heartbeat", 0))
    return f"host {owner.get('host')} pid {owner.get('pid')}{job} (heartbeat {age:.0f}s ago)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_owner(shard_dir: Path, ttl_s: float = LEASE_TTL_S) -> dict | None:
    """The live owner of a shard's lease, from its lease file (no locking: what `status` shows), else None."""
    try:
        owner = read_json(shard_dir / LEASE_FILE)
    except (OSError, ValueError):
        return None
    if not owner:
        return None
    if owner.get("host") == socket.gethostname():
        return owner if _pid_alive(int(owner.get("pid", 0))) else None
    return owner if time.time() - float(owner.get("heartbeat", 0)) < ttl_s else None


class ShardLease:
    """Who may write into a shard: an exclusive `flock` on `<shard>/.lease.lock` (the kernel drops it when its
    holders die, so a dead owner never blocks anyone) plus `lease.json` naming the owner (host, pid, Slurm job)
    with a heartbeat. The file also guards filesystems whose locks are node-local: a lease whose owner runs on
    another host and whose heartbeat is fresher than `ttl_s` is respected; an older one is stale and taken over.
    The owner re-reads the file at every heartbeat and before each write (`check`): if another owner took it over,
    it stops writing (LeaseLost)."""

    def __init__(self, shard_dir: Path, ttl_s: float = LEASE_TTL_S, heartbeat_s: float | None = None):
        self.dir = Path(shard_dir)
        self.ttl_s = float(ttl_s)
        self.heartbeat_s = heartbeat_s or max(0.5, self.ttl_s / 8)
        self.token = uuid.uuid4().hex
        self.fd: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _info(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
                "slurm_array_task": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
                "heartbeat": time.time(), "since": getattr(self, "_since", time.time())}

    def try_acquire(self) -> dict | None:
        """Take the lease: None when taken, else the live owner that holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LEASE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            owner = read_json(self.dir / LEASE_FILE) or {}
            return owner or {"host": "?", "pid": "?", "heartbeat": time.time()}
        # The kernel lock is ours. An owner on another host may still hold the lease where locks do not reach.
        owner = read_json(self.dir / LEASE_FILE)
        if owner and owner.get("token") != self.token and owner.get("host") != socket.gethostname() \
                and time.time() - float(owner.get("heartbeat", 0)) < self.ttl_s:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            return owner
        self._since = time.time()
        try:
            write_json(self.dir / LEASE_FILE, self._info())
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self.fd = fd
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.dir.name}", daemon=True)
        self._thread.start()
        return None

    def acquire(self, wait: bool = True, poll_s: float = 0.5, on_wait=None) -> dict | None:
        """Take the lease; with wait=False return the live owner instead of waiting for it."""
        told = False
        while True:
            owner = self.try_acquire()
            if owner is None:
                return None
            if not wait:
                return owner
            if not told and on_wait is not None:
                on_wait(owner)
                told = True
            time.sleep(poll_s)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = read_json(self.dir / LEASE_FILE)
                if not current or current.get("token") != self.token:
                    self.lost = True
                    return
                write_json(self.dir / LEASE_FILE, self._info())
            except (OSError, ValueError):
                continue  # a full or flaky filesystem: try again at the next beat

    def check(self) -> None:
        """Raise LeaseLost unless this process still holds the lease."""
        if self.fd is None:
            raise LeaseLost(f"{self.dir}: lease not held")
        current = read_json(self.dir / LEASE_FILE)
        if self.lost or not current or current.get("token") != self.token:
            self.lost = True
            raise LeaseLost(f"{self.dir}: the lease was taken over by {describe_owner(current)}; "
                            "this attempt stops without writing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.fd is None:
            return
        try:
            current = read_json(self.dir / LEASE_FILE)
            if current and current.get("token") == self.token:
                (self.dir / LEASE_FILE).unlink(missing_ok=True)
        except (OSError, ValueError):
            pass
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def concat_tables(tables: Iterable[pa.Table]) -> pa.Table | None:
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")


def dedupe_sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    """Keep the last row per key (later parts win), sorted by key: final outputs do not depend on timing."""
    if table.num_rows == 0 or _sorted_unique(table, keys):
        return table  # nothing to move: the usual case (items run in key order), and no copy of the bulky columns
    idx = pa.array(range(table.num_rows))
    t = table.append_column("__row", idx)
    last = t.group_by(keys, use_threads=False).aggregate([("__row", "max")])
    keep = pc.sort_indices(last.column("__row_max"))
    rows = pc.take(last.column("__row_max"), keep)
    out = table.take(rows)
    return out.sort_by([(k, "ascending") for k in keys])


def as_read_back(table: pa.Table) -> pa.Table:
    """`table` with the schema a Parquet round trip gives it (nested list fields named `element`, not `item`):
    rows that come from Arrow parts and rows read back from an earlier output are written with the same schema,
    so the same rows give the same bytes (ingest compares the digest of a re-finalized shard's bytes)."""
    import io

    buf = io.BytesIO()
    pq.write_table(table.schema.empty_table(), buf)
    target = pq.read_schema(pa.BufferReader(buf.getvalue()))
    if table.schema.equals(target, check_metadata=True):
        return table
    try:
        return table.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a type the round trip changes beyond names
        return table


def _sorted_unique(table: pa.Table, keys: list[str]) -> bool:
    """The rows are in strictly ascending key order (what `dedupe_sorted` would return), read from the key
    columns alone."""
    k = table.select(keys)
    if any(k.column(c).null_count for c in keys):
        return False  # null keys: left to the group-by, which dedupes them as one key
    order = pc.sort_indices(k, sort_keys=[(c, "ascending") for c in keys])
    if not pc.all(pc.equal(order, pa.array(range(table.num_rows), order.type))).as_py():
        return False
    if table.num_rows < 2:
        return True
    same = None  # neighbours equal on every key column
    for c in keys:
        col = k.column(c)
        eq = pc.equal(col.slice(1), col.slice(0, table.num_rows - 1))
        same = eq if same is None else pc.and_(same, eq)
    return not pc.any(same).as_py()


def load_json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
