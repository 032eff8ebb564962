"""kill -9 soak: `python -m benchmarks.kill_soak [--kills N] [--stages frames,asr,clip,ingest] [--report PATH]`.

Builds a small run from the vendored sample media (plus speech clips cut from `speech_cuts_1080p.mp4` with ffmpeg,
so that asr and audio have work), runs every stage once uninterrupted (the reference), then for each stage under
test, N times: copies the run as it was before that stage, launches the stage as a user would
(`python -m pipeline stage=S ...`, local launcher, 2 shards, flush_every=1) in its own process group, SIGKILLs
the whole group at a moment drawn uniformly over an uninterrupted run of that stage timed just before on the same
machine (with --during-work: from its first output file to its end; start-up is most of a Ray stage's time),
checks that no process of the group outlives the kill (Ray processes: after the reaper's grace), re-runs the same
command to completion and compares every output of the stage (packed tables, ledgers and, for ingest, the Deep Lake
dataset) with the reference. Columns that hold timings are left out.

Prints and (with --report) writes a table: per stage, kills that landed mid-run, identical/total, processes left
behind. Exit code 1 if any re-run differs from the reference or leaves processes behind.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "tests" / "media"
ORDER = ["download", "frames", "asr", "clip", "audio", "scenegraph", "ingest"]
NEEDS = {"frames": ["download"], "asr": ["download"], "clip": ["download", "frames"], "audio": ["download", "asr"],
         "scenegraph": ["download", "frames"], "ingest": ["download", "frames", "asr", "clip", "audio", "scenegraph"]}
TIMING_COLUMNS = {"seconds", "time", "ingested_at", "created_at"}
GRACE_S = 25.0  # the Ray reaper keeps ending the task's Ray processes for ~20 s after the task is gone
STAGE_ARGS = ["launcher=local", "launcher.workers=2", "models=tiny", "device=cpu", "stage.flush_every=1"]


def _env(cache_dir: Path) -> dict:
    return {**os.environ, "VPT_CACHE_DIR": str(cache_dir), "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _cli(args: list[str], env: dict, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def make_manifest(work: Path, speech_clips: int) -> Path:
    media = work / "media"
    media.mkdir(parents=True, exist_ok=True)
    lines = [f"counter {MEDIA / 'counter.mp4'}", f"fades {MEDIA / 'fades.mp4'}",
             f"delayed {MEDIA / 'delayed_start.mp4'}"]
    for k in range(speech_clips):
        out = media / f"speech{k}.mp4"
        if not out.exists():
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", str(5 + 20 * k), "-t", "12", "-i",
                            str(MEDIA / "speech_cuts_1080p.mp4"), "-vf", "scale=-2:240", "-c:v", "libx264",
                            "-preset", "veryfast", "-c:a", "aac", str(out)], check=True)
        lines.append(f"speech{k} {out}")
    manifest = work / "videos.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _normalise(value, run_dir: str):
    if hasattr(value, "to_dict") and not isinstance(value, dict):  # a Deep Lake Dict
        value = value.to_dict()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, str):
        return value.replace(run_dir, "<RUN>")
    if isinstance(value, dict):
        return {k: _normalise(v, run_dir) for k, v in value.items() if k not in TIMING_COLUMNS}
    if isinstance(value, list):
        return [_normalise(v, run_dir) for v in value]
    return value


def stage_digest(run_dir: Path, stage: str) -> dict[str, str]:
    """One digest per output file of the stage (tables and ledgers of every shard; ingest: also the dataset)."""
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    for p in sorted((run_dir / stage).glob("shard-*/*.parquet")):
        t = pq.read_table(p)
        rows = [_normalise(r, str(run_dir)) for r in t.to_pylist()]
        out[f"{p.parent.name}/{p.name}"] = hashlib.sha1(json.dumps(rows, sort_keys=True, default=repr)
                                                        .encode()).hexdigest()
    for p in sorted((run_dir / stage).glob("shard-*/_SUCCESS")):
        out[f"{p.parent.name}/_SUCCESS"] = "present"
    if stage == "ingest":
        out["dataset"] = dataset_digest(run_dir / "dataset")
    return out


def dataset_digest(path: Path) -> str:
    """The dataset's digest, read in a process of its own: Deep Lake 4.7 now and then aborts a process that opened
    (and freed) handles to datasets deleted and re-created at the same path, as each round here does."""
    code = ("import os, sys; from pathlib import Path; from benchmarks.kill_soak import _dataset_digest_here; "
            "print(_dataset_digest_here(Path(sys.argv[1])), flush=True); os._exit(0)")
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().splitlines()[-1]
    return f"unreadable (exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]})"


def _dataset_digest_here(path: Path) -> str:
    import deeplake
    import numpy as np

    if not path.exists():
        return "missing"
    ds = deeplake.open_read_only(str(path))
    cols = sorted(c.name for c in ds.schema.columns)
    n = len(ds)
    # By a list of rows, never a slice: Deep Lake 4.7.4 segfaults, now and then, slicing a Sequence(Image) column
    # (`ds["frames"][a:b]`) of a perfectly readable dataset; row lists and single rows read the same data safely.
    data = {c: (ds[c][list(range(n))] if n else []) for c in cols}
    rows = []
    for i in range(n):
        h = hashlib.sha1()
        for c in cols:
            v = data[c][i]
            if isinstance(v, np.ndarray):
                h.update(v.tobytes())
            elif isinstance(v, (bytes, bytearray)):
                h.update(bytes(v))
            else:
                h.update(json.dumps(_normalise(v, str(path.parent)), sort_keys=True, default=repr).encode())
        rows.append(h.hexdigest())
    return hashlib.sha1(("\n".join(sorted(rows)) + f"\n{n}").encode()).hexdigest()


def _group_alive(sid: int) -> list[int]:
    """Processes of the task's session (its process group and any group started under it, e.g. Ray workers)."""
    import psutil

    alive = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_ray_process(cmd: str) -> bool:
    """A process of Ray: a worker (`ray::...`), its daemons, or a script of the ray package (agents, monitors)."""
    first = cmd.split(" ", 1)[0]
    return (cmd.startswith("ray::") or first.endswith(("/raylet", "/gcs_server")) or "/ray/" in cmd
            or "/session_" in cmd)


BOOKKEEPING = {"config.yaml", ".lease.lock", "lease.json", "inflight.json", "dataset.lock"}


def _written(run: Path, stage: str) -> int:
    """Output files the stage has written so far (parts, ledgers, tables, markers; not its logs, leases, in-flight
    records or config): 0 while the task is still starting (imports, leases, Ray, model)."""
    root = run / stage
    return sum(1 for p in root.rglob("*") if p.is_file() and "logs" not in p.parts and p.name not in BOOKKEEPING
               and not p.name.startswith(".")) \
        if root.exists() else 0


def kill_once(base: Path, stage: str, work: Path, env: dict, window: tuple[float, float] | None,
              rng: random.Random, reference: dict[str, str]) -> dict:
    """One run of `stage` on a copy of `base`, SIGKILLed as a whole at a moment drawn uniformly over `window`
    (seconds from its start; None: no kill, an uninterrupted run, timed, with the moment its first output file
    appeared), then re-run to completion and compared with `reference`."""
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    dropped = {s for s in ORDER if s not in NEEDS[stage]}
    shutil.copytree(base, run, ignore=lambda d, names: [n for n in names if Path(d) == base and
                                                        (n in dropped or n.startswith((".ingest", "dataset")))])
    args = [f"stage={stage}", f"run_dir={run}", *STAGE_ARGS]
    # Uniform over the measured uninterrupted duration of the stage (start-up, work and finalize alike).
    delay = None if window is None else rng.uniform(*window)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    written, first_output_s = 0, None
    try:
        if window is None:
            while proc.poll() is None:
                if first_output_s is None and _written(run, stage):
                    first_output_s = time.time() - t0
                time.sleep(0.1)
        proc.wait(timeout=delay)
        landed = False          # the run finished before the kill
        ran_s = time.time() - t0
    except subprocess.TimeoutExpired:
        written = _written(run, stage)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        landed = True
        ran_s = None
    # The kill reaches the task's process group; Ray's workers sit in groups of their own under the same session
    # and must end with the task (the Ray reaper). Wait out its grace, then count what is left.
    deadline = time.time() + GRACE_S
    left = _group_alive(proc.pid)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = _group_alive(proc.pid)
    gone_after = round(GRACE_S - max(0.0, deadline - time.time()), 1) if not left else None
    left_names, left_ray = [], 0
    for pid in left:  # counted, then cleaned up so that the next round starts clean
        cmd = _cmdline(pid)
        left_ray += is_ray_process(cmd)
        left_names.append(cmd[:160])
        try:
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    if window is None:
        rerun, reruns = subprocess.CompletedProcess(args, proc.returncode, "", ""), 0
    else:
        rerun, reruns = _cli(args, env), 1
    if rerun.returncode != 0 and reruns:  # as a user would: once more (e.g. Ray timed out starting on a loaded machine)
        first_error = rerun.stderr.strip().splitlines()[-1:]
        rerun = _cli(args, env)
        reruns = 2
    got = stage_digest(run, stage) if rerun.returncode == 0 else {}
    diff = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
    kept = None
    if diff or rerun.returncode != 0:  # kept for a look: what differs, and the logs of the killed run and re-run
        kept = work.parent / f"differs-{stage}-{int(time.time())}"
        shutil.copytree(run, kept, ignore=lambda d, names: [n for n in names if Path(d) == run and
                                                             n not in (stage, "dataset")])
    return {"delay_s": delay and round(delay, 2), "landed": landed, "ran_s": None if ran_s is None else round(ran_s, 1),
            "run_rc": None if landed else proc.returncode, "files_at_kill": written,
            "first_output_s": first_output_s and round(first_output_s, 1),
            "session_gone_after_s": gone_after,
            "left_behind": len(left), "left_ray": left_ray, "left_names": left_names, "reruns": reruns,
            "first_rerun_error": first_error if reruns == 2 else [], "rerun_rc": rerun.returncode,
            "identical": rerun.returncode == 0 and not diff, "differs": diff[:5],
            "got": {k: got.get(k) for k in diff[:5]}, "kept": kept and str(kept),
            "rerun_tail": rerun.stderr.strip().splitlines()[-1:] if rerun.returncode else []}


def write_report(a, manifest: Path, durations: dict, results: dict[str, list[dict]]) -> bool:
    """Write the table (and raw JSON); True if any re-run differs or left processes behind."""
    lines = [f"kill -9 soak, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
             f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
             f"{len(manifest.read_text().splitlines())} videos in 2 shards, seed {a.seed}, kills drawn over "
             f"{'the work (first output to end)' if a.during_work else 'the whole run'}", "",
             "| stage | uninterrupted run: total / first output (s) | runs | kills that landed mid-run | of them after the stage wrote "
             "output | identical / total | re-runs that needed a 2nd try | Ray processes left after the kill "
             f"(+{GRACE_S:.0f} s) | other processes left |",
             "|---|---|---|---|---|---|---|---|---|"]
    failed = False
    for s, rs in results.items():
        same = sum(r["identical"] for r in rs)
        left = sum(r["left_behind"] for r in rs)
        ray_left = sum(r["left_ray"] for r in rs)
        failed |= same != len(rs) or left > 0
        t = durations.get(f"{s}_uninterrupted", durations[s])
        lines.append(f"| {s} | {t:.1f} / {durations.get(f'{s}_first_output', 0.0):.1f} | {len(rs)} | {sum(r['landed'] for r in rs)} | "
                     f"{sum(r['landed'] and r['files_at_kill'] > 0 for r in rs)} | "
                     f"{same} / {len(rs)} | {sum(r['reruns'] > 1 for r in rs)} | "
                     f"{ray_left} (in {sum(r['left_ray'] > 0 for r in rs)} kills) | {left - ray_left} |")
    text = "\n".join(lines)
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(text + "\n")
    else:
        print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"durations": durations, "results": results}, indent=1))
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=2, help="kills per stage")
    ap.add_argument("--stages", default="frames,asr,clip,ingest")
    ap.add_argument("--speech-clips", type=int, default=2)
    ap.add_argument("--work", default=None, help="work dir (default: a fresh temp dir)")
    ap.add_argument("--cache-dir", default=None, help="tiny model cache (default: <work>/cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-reference", action="store_true",
                    help="keep the uninterrupted reference run already in --work (same stages and media)")
    ap.add_argument("--during-work", action="store_true",
                    help="kill only after the stage's first output file appeared in the uninterrupted run (not during "
                         "start-up: imports, leases, Ray, model loading), up to its end; default: over the whole run")
    ap.add_argument("--report", default=None, help="write the results as markdown here")
    ap.add_argument("--json", default=None, help="write the raw results as JSON here")
    a = ap.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in NEEDS]
    if bad:
        print(f"error: unknown or unsupported stage(s) {bad}; choose from {', '.join(NEEDS)}", file=sys.stderr)
        return 2
    import tempfile

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="kill-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    env = _env(Path(a.cache_dir) if a.cache_dir else work / "cache")
    rng = random.Random(a.seed)
    manifest = make_manifest(work, a.speech_clips)

    # The reference: every stage needed, uninterrupted, timed.
    base = work / "reference"
    needed = [s for s in ORDER if s in set(stages) | {n for s in stages for n in NEEDS[s]}]
    saved = work / "reference_durations.json"
    durations: dict[str, float] = json.loads(saved.read_text()) if a.reuse_reference and saved.exists() else {}
    if not set(needed) <= set(durations):
        durations = {}
        shutil.rmtree(base, ignore_errors=True)
    for s in needed:
        if s in durations:
            continue
        extra = [f"input={manifest}", "num_shards=2"] if s == "download" else []
        t0 = time.time()
        proc = _cli([f"stage={s}", f"run_dir={base}", *STAGE_ARGS, *extra], env)
        durations[s] = time.time() - t0
        if proc.returncode != 0:
            print(f"error: reference run of {s} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        print(f"reference {s}: {durations[s]:.1f}s", flush=True)
        saved.write_text(json.dumps(durations))
    references = {s: stage_digest(base, s) for s in stages}

    results: dict[str, list[dict]] = {}
    failed = False
    for s in stages:
        results[s] = []
        # The kill moment is drawn over the stage's uninterrupted duration as measured now, on this machine's
        # present load (a reference from earlier, or from a busier moment, aims kills past the end of the run).
        r = kill_once(base, s, work / "killed", env, None, rng, references[s])
        durations[f"{s}_uninterrupted"] = t_est = r["ran_s"]
        durations[f"{s}_first_output"] = t_work = r["first_output_s"] or 0.0
        print(f"{s} uninterrupted: {t_est:.1f}s, first output after {t_work:.1f}s, identical to the reference: "
              f"{r['identical']}", flush=True)
        if not r["identical"] or r["run_rc"] != 0:
            print(f"error: an uninterrupted run of {s} differs from the reference: {r['differs']}", file=sys.stderr)
            return 1
        tries = 0
        while sum(r["landed"] for r in results[s]) < a.kills and tries < 3 * a.kills:  # N kills that landed
            tries += 1
            start = min(t_work, 0.9 * t_est) if a.during_work else 0.02 * t_est
            r = kill_once(base, s, work / "killed", env, (start, 0.98 * t_est), rng, references[s])
            if not r["landed"] and r["run_rc"] == 0:  # the run took less than that: the latest measured duration
                t_work, t_est = t_work * r["ran_s"] / t_est, r["ran_s"]
            results[s].append(r)
            print(f"{s} try {tries}: {json.dumps(r)}", flush=True)
        failed = write_report(a, manifest, durations, results)  # after each stage: partial results survive
    shutil.rmtree(work / "killed", ignore_errors=True)
    print(Path(a.report).read_text() if a.report else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
