"""Deep Lake dataset health: free space before a write, a crash-proof probe of the head, rollback to the last
good version.

Deep Lake 4.7 does not report a full disk: a commit on a full filesystem "succeeds", leaving zero-length chunk
files and a truncated version counter behind, after which reading the new rows kills the reading process
(SIGSEGV) and every later write fails. The versions before it stay intact: chunk files are immutable (a commit
only adds new ones) and every version is described by the small version log `<dataset>/_deeplake_log`.
So, for a dataset on a local filesystem:

- `check_free_space(url, need_bytes, what)`: a write that would not fit is refused before anything is written
  (`DatasetSpaceError`, one line).
- `probe(url)`: opens the dataset read-only in a child process (a native crash kills the child, not the caller)
  and reads it: every column of every row from `from_row` on (the rows the commit added, a block of rows at a
  time; bulky columns by row lists, as a slice of a Sequence(Image) column crashes Deep Lake 4.7.4 now and then
  whatever the data; images as their stored bytes, 16 of the new rows decoded), and of the rows before, the
  bulky columns (images, embeddings, any Sequence) in samples (the first and last 64 rows plus every (n/64)-th);
  after a tag (a write that changes no rows, `from_row=INFO_ONLY`) only the head's version, rows and tags. A
  head whose metadata records other row counts than it holds is a torn commit (`torn_commit`: Deep Lake writes a
  commit's metadata and its rows to two logs, and a kill can land between them): the writer rolls it back.
  Within `warm_probes()` one child serves every probe, and `probe_later` / `write_checked(wait=False)` let the
  writer go on while it reads (the child can also run a check the caller names on each block of rows it reads:
  `row_checks`).
- The last good version: after a probe passes, the writer saves a copy of the version log in
  `<dataset>.lastgood/good/` (with `state.json`: version, rows, tags, a digest of the log); a copy taken right
  after the commit (`stage_good`) is put in place by renames once the probe passes. `ensure_readable`
  (called where ingest, verify and status open the dataset) finds the head as saved (digest equal: no probe) or
  probes it; an unreadable head is rolled back by putting the saved log in place. Nothing is deleted: the
  unreadable log is kept in `<dataset>.lastgood/unreadable-<time>/`, and the chunks of the failed commit stay
  unused. Without a saved version (a dataset written before this existed, or a remote URL) an unreadable head is
  a one-line `DatasetUnreadable` naming the tags, whose versions stay readable (`ds.tags[name].open()`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .atomic import fsync_tree
from .errors import ConfigError

_log = logging.getLogger(__name__)
LOG_DIR = "_deeplake_log"
GUARD_SUFFIX = ".lastgood"
GOOD = "good"
STATE = "state.json"
PROBE_TIMEOUT_S = 1800
SAMPLE_ROWS = 64
BULKY_COLUMNS = frozenset({"frames", "clip", "audio"})
DECODE_ROWS = 16        # image rows a probe decodes among a commit's new rows (all of them are read as bytes)


class DatasetSpaceError(ConfigError):
    """Not enough free space for a write: refused before anything is written."""


class DatasetUnreadable(ConfigError):
    """The dataset's head cannot be read and could not be rolled back."""


class DatasetWriteError(ConfigError):
    """A write left the head unreadable (it was rolled back) or failed."""


@dataclass
class Probe:
    ok: bool
    problem: str = ""
    info: dict[str, Any] = field(default_factory=dict)   # version, rows, tags {name: version}, ingested_shards


def local_dir(url: str) -> Path | None:
    """The directory of a dataset on a local filesystem (file:// URL or a plain path); None for remote URLs."""
    url = str(url)
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if "://" in url else Path(url)


def guard_dir(path: Path) -> Path:
    return path.with_name(path.name + GUARD_SUFFIX)


def exists(path: Path | None) -> bool:
    return path is not None and (path / LOG_DIR).is_dir()


def log_digest(path: Path) -> str:
    """sha256 over the version log's files (names and bytes; lock files left out): equal digests, same head."""
    h = hashlib.sha256()
    root = path / LOG_DIR
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def free_bytes(path: Path) -> int:
    """Bytes free to an unprivileged writer on the filesystem of `path` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB"


def check_free_space(url: str, need_bytes: int, what: str) -> int:
    """Refuse (DatasetSpaceError) a write of `what` needing `need_bytes` where less is free. Returns bytes free
    (-1 for remote datasets, which are not checked)."""
    path = local_dir(url)
    if path is None:
        return -1
    free = free_bytes(path)
    if free < need_bytes:
        raise DatasetSpaceError(f"not enough free space for {what} in {path}: {_mib(need_bytes)} needed, "
                                f"{_mib(free)} free; nothing of it was written (free space and re-run)")
    return free


# ------------------------------------------------------------------------------------------------ the probe


def sequence_or_image(dtype: Any) -> bool:
    """A column type read by row lists, never by slices (images, embeddings, videos, any Sequence): Deep Lake 4.7.4
    segfaults, now and then, slicing a Sequence(Image) column (`ds["frames"][a:b]`) whose every row reads fine."""
    kind = str(dtype).lower()       # e.g. "sequence[kind=image, dtype=array(...)]"
    return any(k in kind for k in ("image", "sequence", "embedding", "video"))


def _rows(column: Any, rows: list[int], as_bytes: bool) -> list:
    """Values of `rows` (a list: never a slice, see below); `as_bytes`: an image column's stored bytes."""
    if as_bytes:
        try:
            return column.get_bytes(rows)
        except RuntimeError:    # Deep Lake 4.7's get_bytes refuses a block that holds an empty sequence
            pass
    return column[rows]


FINGERPRINTS = "ingested_fingerprints"     # the writer's metadata: per shard, what of it the dataset holds


def head_info(ds: Any) -> dict[str, Any]:
    """What a probe reports of a head, and what a saved good version records: version, rows, tags, shards, the
    rows the writer's records count (`recorded_rows`, None on datasets made before them) and the digest of each
    shard's completion marker they record (`markers`: what a submitter compares to tell a group up to date)."""
    meta = ds.metadata
    prints = {str(k): dict(v) for k, v in dict(meta[FINGERPRINTS]).items()} if FINGERPRINTS in meta.keys() else {}
    counts = [v.get("num_rows") for v in prints.values()] if FINGERPRINTS in meta.keys() else [None]
    return {"version": ds.version, "rows": len(ds),
            "tags": {name: ds.tags[name].version for name in ds.tags.names()},
            "ingested_shards": (sorted(int(s) for s in meta["ingested_shards"])
                                if "ingested_shards" in meta.keys() else None),
            "recorded_rows": None if any(c is None for c in counts) else sum(int(c) for c in counts),
            "markers": {k: v.get("marker") for k, v in prints.items()}}


def torn_commit(info: dict[str, Any]) -> str | None:
    """Why a head (its `head_info`) is a torn commit, or None. Deep Lake 4.7 writes a commit to two logs, the
    metadata's (`_deeplake_log/_meta`) and then the rows' (the branch's): a process killed between the two (seen
    in the kill soak), or a disk filling there, leaves a head that reads fine and lists shards whose rows it does
    not hold. The writer records each shard's row count in the same commit as its rows, so in any head it wrote
    the counts add up to the rows. The writer rolls such a head back (`ensure_readable(save=True)`, and after
    each of its writes); `verify` reports it, as rows missing or extra."""
    recorded = info.get("recorded_rows")
    if recorded is None or recorded == info.get("rows"):
        return None
    return (f"a torn commit: its metadata records {recorded} rows of shards {info.get('ingested_shards')} and "
            f"it holds {info.get('rows')}")


BLOCK_ROWS = 256         # rows of the commit's new rows a probe reads at a time (every column of them)
# `from_row` of a probe after a write that changed no rows (a tag): the head is opened and its info read (version,
# rows, tags, shard list: what such a write can break), no data, as the data is that of a version probed before
INFO_ONLY = -1


def _probe_read(url: str, from_row: int, emit: Callable[[str], None],
                on_block: Callable[[range, dict[str, list]], None] | None = None) -> Any:
    """Open the head read-only, emit its info as one JSON line, read it, emit "ok"; returns the open head.
    `on_block(rows, values)`: called with each block of the new rows as read, every column's values of them
    (image columns as their stored bytes, one per image), so a check needs no second read."""
    import deeplake

    ds = deeplake.open_read_only(url)
    n = len(ds)
    emit(json.dumps(head_info(ds)))
    if from_row == INFO_ONLY:
        emit("ok")
        return ds
    step = max(1, n // SAMPLE_ROWS)
    sample = sorted({*range(0, min(n, SAMPLE_ROWS)), *range(max(0, n - SAMPLE_ROWS), n), *range(0, n, step)})
    first_new = max(0, min(from_row, n))
    old = [i for i in sample if i < first_new]
    new = n - first_new
    decoded = sorted({first_new + k * new // DECODE_ROWS for k in range(DECODE_ROWS)} | {n - 1}) if new else []
    # (name, column, bulky: sampled before first_new, by_rows: read by row lists, images: read as bytes)
    columns = [(col.name, ds[col.name], col.name in BULKY_COLUMNS or sequence_or_image(col.dtype),
                sequence_or_image(col.dtype), "image" in str(col.dtype).lower()) for col in ds.schema.columns]
    for _, column, bulky, _, images in columns:
        if bulky and old:       # the rows before the commit: bulky columns sampled
            _rows(column, old, images)
    # Every column of the rows the commit added is read whole, a block of rows at a time (bounded memory); images
    # as their stored bytes (every chunk read, no JPEG decoded: decoding was most of a probe's time), and a spread
    # of DECODE_ROWS of them decoded as a reader will. Sequence and image columns by lists of rows: Deep Lake 4.7.4
    # segfaults, now and then, slicing a Sequence(Image) column (`ds["frames"][a:b]`) of a dataset every row of
    # which reads fine, so a slice would fail good heads; the others by slices (embeddings: 3x faster than lists).
    for a in range(first_new, n, BLOCK_ROWS):
        b = min(n, a + BLOCK_ROWS)
        values: dict[str, list] = {}
        for name, column, _, by_rows, images in columns:
            got = _rows(column, list(range(a, b)), images) if by_rows else column[a:b]
            if len(got) != b - a:
                raise RuntimeError(f"column {name}: rows {a}..{b - 1} read {len(got)} values")
            values[name] = got
        if on_block is not None:
            on_block(range(a, b), values)
        del values
    for _, column, _, _, images in columns:
        if images and (decoded or old):
            column[decoded + old[:DECODE_ROWS]]
    emit("ok")
    return ds


def _probe_main(url: str, from_row: int) -> None:
    """Child side of a one-shot probe."""
    _probe_read(url, from_row, lambda line: print(line, flush=True))


SERVE = "--serve"
REPLY = "@@probe "      # prefix of the serving child's replies (anything else on its stdout is ignored)


def _serve_main(preload: list[str]) -> None:
    """Child side of the warm prober: `preload` (module names, e.g. a row check's) imported first; then one request
    per stdin line (JSON [url, from_row] or [url, from_row, check]), replies on stdout. With `check` ({"call":
    "module:function", "kwargs": {...}}), the function is called with each block of new rows the probe reads
    (`rows` a range, `values` {column: values of those rows as read}, then the kwargs) and returns violations;
    after "ok" all it found is sent as "checked [...]"."""
    import gc
    import importlib

    import deeplake  # noqa: F401  - imported once, before the first request

    for module in preload:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a request naming it reports the failure
            pass
    out = sys.stdout
    emit = lambda line: (out.write(REPLY + line + "\n"), out.flush())  # noqa: E731
    emit("ready")
    for line in sys.stdin:
        request = json.loads(line)
        url, from_row, check = request[0], int(request[1]), (request[2] if len(request) > 2 else None)
        found: list[str] = []
        failed: list[str] = []
        on_block = None
        if check is not None:
            try:
                # the caller names its check ("module:function"): this module knows nothing of what is checked
                module, _, name = str(check["call"]).partition(":")
                function, kwargs = getattr(importlib.import_module(module), name), dict(check.get("kwargs", {}))

                def on_block(rows: range, values: dict[str, list], function=function, kwargs=kwargs) -> None:
                    if failed:
                        return
                    try:
                        found.extend(str(v) for v in function(rows, values, **kwargs))
                    except Exception as exc:  # noqa: BLE001 - the writer then checks the rows itself
                        failed.append(_first_line(exc))
            except Exception as exc:  # noqa: BLE001
                failed.append(_first_line(exc))
        try:
            ds = _probe_read(url, from_row, emit, on_block)
        except Exception as exc:  # noqa: BLE001 - reported to the writer, the child serves on
            emit("error " + _first_line(exc))
            if check is not None:
                emit("checked-error the head did not read")
            gc.collect()
            continue
        if check is not None:
            emit("checked-error " + failed[0] if failed else "checked " + json.dumps(found))
        del ds
        gc.collect()


def _first_line(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def _signal_problem(returncode: int) -> str:
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"reading it kills the reader ({name})"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class WarmProber:
    """A child process that imports Deep Lake once and then probes on request (the import and interpreter start
    were most of a one-shot probe's time, paid after every commit). Same isolation: the dataset is read in the
    child, so a native crash kills the child, is reported like the one-shot probe's, and the next probe starts a
    new child. Started as soon as it is made, so its start-up overlaps the writer's own work."""

    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        self.preload = tuple(preload)               # modules the child imports before it says "ready"
        self.prestarted = False                     # started by `prestart_probes`, ahead of its `warm_probes`
        self.proc: subprocess.Popen | None = None
        self.err = None
        self.buf = b""
        self.checks_wanted = 0                      # row checks requested of this prober (see `row_checks`)
        self.checks: list[list[str] | None] = []    # their results as they arrive (None: failed)
        self.checks_lost = False                    # a child died with checks owed
        self._start()

    def _start(self) -> None:
        import tempfile

        self.err = tempfile.TemporaryFile()
        self.buf = b""
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.dataset_health", SERVE, *self.preload],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     env=_child_env())

    def _line(self, deadline: float) -> str | None:
        """The next reply line (without prefix); None at end of output (the child died) or at the deadline."""
        import select

        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(REPLY):
                    return text[len(REPLY):]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self.buf += chunk

    def _died(self) -> str:
        assert self.proc is not None
        if len(self.checks) < self.checks_wanted:
            self.checks_lost = True
        code = self.proc.wait()
        tail = ""
        if self.err is not None:
            self.err.seek(0)
            lines = [ln for ln in self.err.read().decode(errors="replace").strip().splitlines() if ln.strip()]
            tail = lines[-1].strip()[:300] if lines else ""
        self.proc = None
        if code < 0:
            return _signal_problem(code)
        return f"reading it fails: {tail or f'exit code {code}'}"

    def submit(self, url: str, from_row: int = 0, timeout_s: float = PROBE_TIMEOUT_S,
               check: dict[str, Any] | None = None) -> Callable[[], Probe]:
        """Send a probe request; the returned function waits for its verdict (one request in flight at a time).
        `check` ({"call": "module:function", "kwargs": {...}}): the child calls the function on each block of new
        rows as the probe reads it (`function(rows, values, **kwargs)`: a range of row indices, every column's
        values of those rows, image columns as stored bytes); what it returns (violations) is collected by
        `row_checks`."""
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        deadline = time.monotonic() + timeout_s
        request = [str(url), int(from_row)] + ([check] if check is not None else [])
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            self.checks_wanted += check is not None
        except BrokenPipeError:
            died = Probe(False, self._died(), {})
            return lambda: died
        return lambda: self._verdict(deadline, timeout_s)

    def _verdict(self, deadline: float, timeout_s: float) -> Probe:
        info: dict[str, Any] = {}
        try:
            while True:
                line = self._line(deadline)
                if line is None:
                    return Probe(False, self._died(), info)
                if line == "ready" or self._check_reply(line):
                    continue
                if line == "ok":
                    return Probe(True, "", info)
                if line.startswith("error "):
                    return Probe(False, f"reading it fails: {line[len('error '):]}", info)
                if line.startswith("{"):
                    try:
                        info = json.loads(line)
                    except json.JSONDecodeError:
                        pass
        except TimeoutError:
            self.close()
            return Probe(False, f"reading it took over {timeout_s:.0f} s", info)

    def probe(self, url: str, from_row: int = 0, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
        return self.submit(url, from_row, timeout_s)()

    def _check_reply(self, line: str) -> bool:
        if line.startswith("checked "):
            try:
                self.checks.append([str(v) for v in json.loads(line[len("checked "):])])
            except (json.JSONDecodeError, TypeError):
                self.checks.append(None)
            return True
        if line.startswith("checked-error"):
            self.checks.append(None)
            return True
        return False

    def row_checks(self, timeout_s: float = PROBE_TIMEOUT_S) -> list[str] | None:
        """The violations every row check requested so far found (after their probes' verdicts were taken),
        then forgotten; None when any of them is missing or failed (the caller checks the rows itself)."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self.checks_lost and len(self.checks) < self.checks_wanted and self.proc is not None:
                line = self._line(deadline)
                if line is None:
                    self._died()
                    self.checks_lost = True
                elif not self._check_reply(line):
                    continue
        except TimeoutError:
            self.close()
        results, complete = self.checks, not self.checks_lost and len(self.checks) == self.checks_wanted
        self.checks, self.checks_wanted, self.checks_lost = [], 0, False
        if not complete or any(r is None for r in results):
            return None
        return [v for r in results for v in r]

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if len(self.checks) < self.checks_wanted:
            self.checks_lost = True
        if proc is not None:    # a reader between requests: nothing of it to keep
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                try:
                    if pipe is not None:
                        pipe.close()
                except OSError:
                    pass
        if self.err is not None:
            self.err.close()
            self.err = None


_warm: WarmProber | None = None
_spare: WarmProber | None = None     # started by `prestart_probes`, for the next `warm_probes` block


def prestart_probes(preload: tuple[str, ...] = ()) -> None:
    """Start the warm child now, for the next `warm_probes` block of this process. A writer's entry point calls it
    first thing (`python -m pipeline.dataset`), so that the child's start-up (Python and Deep Lake imports, and
    `preload`: the modules of the row checks it will be asked for; about 0.35 CPU s in all) runs while the writer
    imports its own modules and reads its input, not during the write. A spare never used ends when this process
    does (its stdin closes)."""
    global _spare
    if _spare is None and _warm is None:
        _spare = WarmProber(preload)
        _spare.prestarted = True


@contextmanager
def warm_probes(preload: tuple[str, ...] = ()) -> Iterator[None]:
    """Within this block every `probe` of this process goes to one warm child (see WarmProber): the one
    `prestart_probes` started, when there is one (a dead one is replaced at its first request), else a new one
    that imports `preload` as it starts."""
    global _warm, _spare
    if _warm is not None:
        yield
        return
    _warm, _spare = (_spare if _spare is not None else WarmProber(preload)), None
    try:
        yield
    finally:
        prober, _warm = _warm, None
        prober.close()


def prober_prestarted() -> bool:
    """Whether this `warm_probes` block's child was started ahead of it (`prestart_probes`)."""
    return _warm is not None and _warm.prestarted


def probe_later(url: str, from_row: int = 0, timeout_s: float = PROBE_TIMEOUT_S,
                check: dict[str, Any] | None = None) -> Callable[[], Probe]:
    """`probe`, started now (in the warm child, when there is one: see `warm_probes`); call the result for the
    verdict. Without a warm child the probe runs here and now. `check`: see `WarmProber.submit` and
    `row_checks` (ignored without a warm child: `row_checks` then says None)."""
    if _warm is not None:
        return _warm.submit(url, from_row, timeout_s, check)
    result = probe(url, from_row, timeout_s)
    return lambda: result


def row_checks(timeout_s: float = PROBE_TIMEOUT_S) -> list[str] | None:
    """The violations found by every row check the warm child was asked for in this `warm_probes` block (then
    forgotten); None without a warm child, or when any check is missing (a child died) or failed."""
    return _warm.row_checks(timeout_s) if _warm is not None else None


def probe(url: str, from_row: int = 0, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    """Read the dataset's head in a child process; `from_row`: rows before it are read only in samples
    (`INFO_ONLY`: after a write that changed no rows, only the head's info)."""
    if _warm is not None:
        return _warm.probe(url, from_row, timeout_s)
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.dataset_health", str(url), str(int(from_row))],
                              capture_output=True, text=True, timeout=timeout_s, env=_child_env())
    except subprocess.TimeoutExpired:
        return Probe(False, f"reading it took over {timeout_s:.0f} s")
    lines = proc.stdout.splitlines()
    info: dict[str, Any] = {}
    if lines and lines[0].startswith("{"):
        try:
            info = json.loads(lines[0])
        except json.JSONDecodeError:
            pass
    if lines and lines[-1] == "ok":     # read through; a native crash at the child's exit is not the head's
        return Probe(True, "", info)
    if proc.returncode < 0:
        problem = _signal_problem(proc.returncode)
    else:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        problem = f"reading it fails: {tail[-1].strip()[:300] if tail else f'exit code {proc.returncode}'}"
    return Probe(False, problem, info)


# ------------------------------------------------------------------------------------ last good version


def saved_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((guard_dir(path) / GOOD / STATE).read_text())
    except (OSError, ValueError):
        return None


_fsync_tree = fsync_tree


def _staged_dir(path: Path) -> Path:
    return guard_dir(path) / f".{GOOD}.tmp-{os.getpid()}"


def stage_good(url: str, info: dict[str, Any], log: Callable[[str], None] = _log.warning) -> Path | None:
    """Copy the head's version log aside, durably, with `info` (the writer's view: `head_info`) as its state:
    the next last good version once a probe has read the head (`save_good(..., staged=)` then only renames).
    Taken right after a commit, before the writer writes anything more, so that a disk filling meanwhile cannot
    keep the commit from becoming the version to roll back to. None when it could not be copied (no space)."""
    path = local_dir(url)
    if not exists(path):
        return None
    tmp = _staged_dir(path)
    try:
        guard_dir(path).mkdir(parents=True, exist_ok=True)
        for stale in guard_dir(path).glob(f".{GOOD}.tmp-*"):    # ours, or a killed writer's (one writer at a time)
            shutil.rmtree(stale, ignore_errors=True)
        digest = log_digest(path)
        shutil.copytree(path / LOG_DIR, tmp / LOG_DIR)
        if log_digest(tmp) != digest:
            raise OSError("the version log changed while it was copied")
        (tmp / STATE).write_text(json.dumps({**info, "digest": digest, "saved": time.time()}, sort_keys=True))
        _fsync_tree(tmp)
        return tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"dataset {path}: could not copy the new version log aside ({exc}); it is saved once probed, if "
            "space allows")
        return None


def save_good(url: str, info: dict[str, Any], log: Callable[[str], None] = _log.warning,
              staged: Path | None = None) -> bool:
    """Save the (just probed) head's version log as the last good version. Only a dataset's writer may call it
    (a copy taken during someone else's commit could be torn). `staged`: the head's copy `stage_good` took,
    put in place by renames when it is still the head's and the probe read the version it describes. False
    when it could not be saved (no space): the previous saved version, older but intact, stays."""
    path = local_dir(url)
    if not exists(path):
        return False
    guard = guard_dir(path)
    tmp = _staged_dir(path)
    old = guard / f".{GOOD}.old-{os.getpid()}"
    try:
        guard.mkdir(parents=True, exist_ok=True)
        digest = log_digest(path)
        try:
            state = json.loads((staged / STATE).read_text()) if staged is not None else {}
        except (OSError, ValueError):
            state = {}
        if not (state.get("digest") == digest and state.get("version") == info.get("version")):
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path / LOG_DIR, tmp / LOG_DIR)
            if log_digest(tmp) != digest:
                raise OSError("the version log changed while it was copied")
            (tmp / STATE).write_text(json.dumps({**info, "digest": digest, "saved": time.time()}, sort_keys=True))
            _fsync_tree(tmp)
        if (guard / GOOD).exists():
            os.rename(guard / GOOD, old)
        os.rename(tmp, guard / GOOD)
        shutil.rmtree(old, ignore_errors=True)
        return True
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not (guard / GOOD).exists():
            os.rename(old, guard / GOOD)
        log(f"dataset {path}: could not save the last good version ({exc}); the previous one is kept")
        return False


def _describe(state: dict[str, Any]) -> str:
    tags = [name for name, version in (state.get("tags") or {}).items() if version == state.get("version")]
    return (f"version {state.get('version')} ({state.get('rows')} rows, "
            + (f"tag {', '.join(sorted(tags))}" if tags else "untagged") + ")")


def rollback(url: str, problem: str, log: Callable[[str], None] = _log.warning) -> dict[str, Any]:
    """Put the last good version's log in place of an unreadable head's. Raises DatasetUnreadable when there is
    none (or it cannot be put in place). Returns the restored version's state."""
    path = local_dir(url)
    state = saved_state(path) if path is not None else None
    good = guard_dir(path) / GOOD / LOG_DIR if path is not None else None
    if state is None or good is None or not good.is_dir():
        tags = ""
        try:
            import deeplake

            ds = deeplake.open_read_only(str(url))
            tags = ", ".join(sorted(ds.tags.names()))
        except Exception:  # noqa: BLE001 - only for the message
            pass
        raise DatasetUnreadable(
            f"dataset {url}: its head is unreadable ({problem}) and no good version of it was saved to roll back "
            f"to; " + (f"its tags ({tags}) stay readable with ds.tags[name].open(); " if tags else "")
            + "move it aside and re-run stage=ingest to rebuild it")
    keep = guard_dir(path) / f"unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        keep.mkdir(parents=True)
        os.rename(path / LOG_DIR, keep / LOG_DIR)      # renames: no space needed
        os.rename(good, path / LOG_DIR)
    except OSError as exc:
        if not (path / LOG_DIR).exists() and (keep / LOG_DIR).exists():
            os.rename(keep / LOG_DIR, path / LOG_DIR)
        raise DatasetUnreadable(f"dataset {url}: its head is unreadable ({problem}) and the rollback to the last "
                                f"good {_describe(state)} failed: {exc}") from None
    log(f"dataset {path}: the head is unreadable ({problem}); rolled back to the last good {_describe(state)}. "
        f"The unreadable version log is kept in {keep}")
    try:    # the saved copy went into place: save it again (it may not fit yet; then it is saved after the next write)
        shutil.copytree(path / LOG_DIR, guard_dir(path) / GOOD / LOG_DIR)
        _fsync_tree(guard_dir(path) / GOOD)
    except OSError:
        shutil.rmtree(guard_dir(path) / GOOD / LOG_DIR, ignore_errors=True)
    return state


def head_problem(url: str) -> tuple[str | None, dict[str, Any]]:
    """(None, info) when the head is the saved good version or reads cleanly, else (problem, info). Read-only."""
    path = local_dir(url)
    if path is not None:
        if not exists(path):
            return None, {}
        state = saved_state(path)
        if state is not None and state.get("digest") == log_digest(path):
            return None, state
    result = probe(url)
    return (None if result.ok else result.problem), result.info


def ensure_readable(url: str, log: Callable[[str], None] = _log.warning, save: bool = False) -> dict[str, Any]:
    """The head's info, after rolling an unreadable head back to the last good version (DatasetUnreadable when
    it cannot be). {} when there is no dataset. `save` (the dataset's writer only): a readable head that is not
    the saved one is saved as the last good version."""
    problem, info = head_problem(url)
    path = local_dir(url)
    new_head = exists(path) and (saved_state(path) or {}).get("digest") != log_digest(path)
    if problem is None and save and new_head:
        problem = torn_commit(info)     # the writer does not build on a torn head: back to the last good version
    if problem is None:
        if save and new_head:
            save_good(url, info, log)
        return info
    state = rollback(url, problem, log)
    again = probe(url)
    if not again.ok:
        raise DatasetUnreadable(f"dataset {url}: rolled back to {_describe(state)}, which is unreadable too "
                                f"({again.problem})")
    return again.info


def write_checked(url: str, action: Callable[[], Any], what: str, log: Callable[[str], None] = _log.warning,
                  from_row: int = 0, wait: bool = True, ds: Any = None, check: dict[str, Any] | None = None,
                  expect: Callable[[dict[str, Any]], str | None] | None = None) -> Callable[[], None] | None:
    """Run a write that ends in a new version (`ds.commit`, `ds.tag`), then probe the new head in a child process:
    readable, it is saved as the last good version; unreadable, it is rolled back to the previous one and
    DatasetWriteError says so. Remote datasets are written unchecked.

    `wait=False` (a write that went through): the probe runs in the warm child while the caller goes on, and the
    returned function completes the check (the save, or the rollback and its error). The caller must call it
    before its next commit (never one on top of an unprobed head), and may only do uncommitted work meanwhile,
    which a failed check discards (the process stops with the error). `ds`, the writer's handle: the new version
    log is copied aside at once (`stage_good`), while the probe runs, so the save only renames, whatever the
    caller wrote since.
    `check` ({"call": "module:function", "kwargs": {...}}, see `WarmProber.submit`): the probe child also runs
    that check on the rows from `from_row` on as it reads them; `row_checks()` collects what it found.
    `expect(info)`: what the write must show in the head a reader opens (the probe's info), None when it does, else
    why not; a head that reads fine without it is a failed write (not saved as good; re-run)."""
    path = local_dir(url)
    if path is None:
        action()
        return None
    try:
        action()
        failure = None
    except Exception as exc:  # noqa: BLE001 - reported with the state it left
        failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    verdict = probe_later(url, from_row, check=check)
    staged = stage_good(url, head_info(ds), log) if ds is not None and failure is None else None     # during the probe

    def settle() -> None:
        result = verdict()
        missing = expect(result.info) if expect is not None and failure is None and result.ok else None
        _settle(url, path, what, missing or failure, result, log, staged)

    if wait or failure is not None:
        settle()
        return None
    return settle


def _settle(url: str, path: Path, what: str, failure: str | None, result: Probe,
            log: Callable[[str], None], staged: Path | None = None) -> None:
    torn = torn_commit(result.info) if result.ok else None
    if torn is not None:
        result = Probe(False, torn, result.info)
    if failure is None and result.ok:
        save_good(url, result.info, log, staged=staged)
        return
    if staged is not None:
        shutil.rmtree(staged, ignore_errors=True)
    free = _mib(free_bytes(path))
    if result.ok:
        raise DatasetWriteError(f"{what} failed ({failure}; {free} free); the dataset reads fine at version "
                                f"{result.info.get('version')}: free space if needed and re-run")
    problem = result.problem + (f" after {failure}" if failure else "")
    try:
        state = rollback(url, problem, log)
    except DatasetUnreadable as exc:
        raise DatasetWriteError(f"{what} left the dataset unreadable ({free} free): {exc}") from None
    raise DatasetWriteError(f"{what} left the dataset unreadable ({problem}; {free} free): rolled back to the "
                            f"last good {_describe(state)}; free space and re-run")


if __name__ == "__main__":
    if sys.argv[1:2] == [SERVE]:
        _serve_main(sys.argv[2:])
    else:
        _probe_main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    # The verdict is out; leave without the interpreter's teardown, where Deep Lake 4.7's native library has been
    # seen to abort ("double free", intermittently, after all work was done): that must not read as an
    # unreadable head and roll a good one back.
    sys.stdout.flush()
    os._exit(0)


_HELD: list = []


def held(ds):
    """Keep a Deep Lake handle until the process ends (see below: freeing one after another handle wrote the
    same dataset is where Deep Lake 4.7 now and then aborts). For the short-lived ingest and verify processes."""
    _HELD.append(ds)
    return ds


def exit_skipping_native_teardown(code: int) -> None:
    """End a command that read or wrote a Deep Lake dataset without the interpreter's teardown.

    Deep Lake 4.7's native objects now and then abort the process while they are freed at exit ("double free
    detected in tcache 2"), after the command has done and printed everything: the exit code would then say the
    command failed. Everything is flushed first; files were already made durable by the writes themselves.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
