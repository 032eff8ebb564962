"""Group writers of ingest as a real Slurm array: `python -m benchmarks.ingest_slurm_writers [--videos N] [--out DIR]`.

Builds the upstream outputs (`benchmarks.ingest_bench.make_upstream`), runs the ingest join, then writes the same
rows as shard groups through the finish step's Slurm path (`submit_groups` + `wait_groups`: one array task per
group, `stage.writers` tasks at once through the array's `%` throttle) on the local Slurm cluster
(`slurm/local_cluster.sh`, started here when none is up and stopped again afterwards), with 1 writer at once and
with 2, the cases interleaved. Per case (the median run by wall time):
- wall: from the submission to the last task's result (Slurm scheduling, the task's interpreter start-up and
  imports included);
- span: the earliest `started_at` to the latest `ended_at` of the writers' results (`write_group`'s own work);
- rows written, aggregate rows/s on both, and the rows counted back from every group's dataset
  (`pipeline.dataset.open_read_only`) against the ingest shards' rows tables (raises when they differ).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODES = 3
# Each task asks for one CPU and 2 GiB: a writer peaks near 400 MiB plus its probe child of about as much; a node
# of the local cluster advertises 4 CPUs and 4 GiB, so two writers fit on one node and any node takes one.
TASK = ("stage.resources.cpus=1", "stage.resources.mem_gb=2", "stage.resources.gpus=0", "stage.resources.nodes=1",
        "stage.resources.timeout_min=30", "cluster.partition=main", "launcher=slurm", "launcher.wait=true",
        "launcher.poll_seconds=0.25")


# ------------------------------------------------------------------------------------------- the local cluster


@contextlib.contextmanager
def local_slurm(state_dir: str | Path | None = None, nodes: int = NODES):
    """The local Slurm cluster for the block (`pipeline.launchers.local_cluster`: reused when one is up, else
    started and stopped at the end by its last user); yields the state dir."""
    from pipeline.launchers.local_cluster import local_cluster

    with local_cluster(state_dir, nodes) as cluster:
        yield cluster.state_dir


def slurm_version() -> str:
    try:
        return subprocess.run(["sinfo", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ measuring


class TaskMemory:
    """Peak resident memory of each task of one array job: every 0.2 s, the RSS of the processes whose
    environment names the job (SLURM_ARRAY_JOB_ID; the writer, its probe child, srun), summed per task. Needs
    the tasks on this machine and their /proc readable (the local cluster run as root); {} otherwise."""

    def __init__(self, job_id: str, every_s: float = 0.2):
        self.needle = f"SLURM_ARRAY_JOB_ID={job_id}\0".encode()
        self.peak_mib: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20
        now: dict[int, float] = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes()
                if self.needle not in env:
                    continue
                task = int(re.search(rb"SLURM_ARRAY_TASK_ID=(\d+)\0", env).group(1))
                rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page_mib
            except (OSError, AttributeError, ValueError, IndexError):
                continue
            now[task] = now.get(task, 0.0) + rss
        for task, mib in now.items():
            self.peak_mib[task] = max(self.peak_mib.get(task, 0.0), mib)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self._sample()

    def stop(self) -> dict[int, float]:
        self._stop.set()
        self._thread.join()
        return dict(self.peak_mib)


def shard_rows(run_dir: Path, shards) -> int:
    """Rows of the ingest shards' own rows tables (what the join produced)."""
    from pipeline.schema import TABLE
    from pipeline.shards import ShardStore

    tables = (ShardStore(run_dir, "ingest", s).read_table(TABLE) for s in shards)
    return sum(t.num_rows for t in tables if t is not None)     # None: a shard the manifest gave no video


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one instant (an end before a start at the same instant)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def _one_run(run_dir: Path, overrides: tuple[str, ...], dataset: Path, writers: int, shards_per_group: int) -> dict:
    """Every group written by one Slurm array (`writers` tasks at once) into a fresh dataset; rows checked."""
    from benchmarks.ingest_bench import ingest_config
    from pipeline.dataset import open_read_only
    from pipeline.dataset.writer import run_layout
    from pipeline.launchers.slurm import finish_groups, submit_groups, wait_groups

    shutil.rmtree(dataset, ignore_errors=True)
    cfg = ingest_config(run_dir, *overrides, *TASK, f"stage.dataset_path={dataset}",
                        f"stage.shards_per_group={shards_per_group}", f"stage.writers={writers}")
    groups = finish_groups(cfg)             # pins the catalogue of the fresh dataset, as the finish step does
    if len(groups) < 2:
        raise ValueError(f"{len(groups)} group(s): shards_per_group={shards_per_group} must split the run's shards")
    t0 = time.time()
    submitted = submit_groups(cfg, groups, [])
    job = submitted[0][1].job_id.split("_")[0]
    memory = TaskMemory(job)
    try:
        results = wait_groups(cfg, submitted)
    finally:
        peak = memory.stop()
    wall = time.time() - t0
    script = (Path(cfg.run_dir) / cfg.stage.name / "logs" / "slurm" / f"{job}_submission.sh").read_text()
    throttle = re.search(r"#SBATCH --array=\S*%(\d+)", script)
    if throttle is None or int(throttle.group(1)) != writers:
        raise RuntimeError(f"job {job}: the array's throttle is not %{writers} (stage.writers): "
                           f"{re.findall(r'#SBATCH --array=.*', script)}")
    layout = run_layout(cfg, lambda s: None)
    counted, expected = {}, {}
    for g in groups:
        counted[g] = len(open_read_only(layout.group_url(g)))
        expected[g] = shard_rows(run_dir, layout.shards_of(g))
    by_group = {int(r["group"]): r for r in results}
    if sorted(by_group) != groups or counted != expected or \
            any(by_group[g]["rows_written"] != expected[g] for g in groups):
        raise RuntimeError(f"job {job} ({writers} writer(s)): rows per group counted {counted}, written "
                           f"{ {g: r['rows_written'] for g, r in by_group.items()} }, ingest shards hold {expected}")
    starts, ends = [r["started_at"] for r in results], [r["ended_at"] for r in results]
    return {"job": job, "wall_s": wall, "span_s": max(ends) - min(starts), "to_first_start_s": min(starts) - t0,
            "rows": sum(r["rows_written"] for r in results), "rows_counted": sum(counted.values()),
            "rows_per_group": counted,
            "groups": len(groups), "writer_seconds": [round(by_group[g]["seconds"], 3) for g in groups],
            "most_at_once": most_at_once(list(zip(starts, ends))), "throttle": int(throttle.group(1)),
            "task_peak_mib": [round(peak[g], 1) for g in sorted(peak)]}


def measure_slurm_writers(run_dir: Path, overrides: tuple[str, ...], shards_per_group: int,
                          writers_cases=(1, 2), repeat: int = 3) -> dict:
    """The run's ingest shards (join done) written as shard groups by the finish step's Slurm array, each case of
    `writers_cases` (tasks at once) `repeat` times, interleaved, each run into its own fresh `stage.dataset_path`
    (removed after its rows are checked). Starts the local Slurm cluster if none is up (and stops it after).

    Returns {"cases": {writers: median run}, "runs": {writers: [every run]}, "ratio": 2 vs 1 on wall and span,
    "slurm": version, "rows_expected": the ingest shards' rows}. A run holds wall_s (submission to the last
    result), span_s (first started_at to last ended_at), rows (written, summed), rows_counted (read back;
    rows_per_group: per group),
    rows_per_s_wall / rows_per_s_span, most_at_once (writers whose spans overlapped), throttle (the array's %),
    task_peak_mib (per task: the writer and its children). Raises when any group's rows differ from its shards'.
    """
    from benchmarks.ingest_bench import ingest_config
    from pipeline.shards import ShardStore

    run_dir = Path(run_dir).resolve()
    num_shards = int(json.loads((run_dir / "geometry.json").read_text())["num_shards"])
    incomplete = [s for s in range(num_shards) if not ShardStore(run_dir, "ingest", s).is_complete()]
    if incomplete:
        raise RuntimeError(f"ingest shards {incomplete} are not complete: run the join first")
    expected = shard_rows(run_dir, range(num_shards))
    ingest_config(run_dir, *overrides)  # the overrides compose before anything is submitted
    runs: dict[int, list[dict]] = {n: [] for n in writers_cases}
    with local_slurm():
        version = slurm_version()
        for k in range(repeat):         # interleaved: a change of the machine's load hits every case alike
            for n in writers_cases:
                dataset = run_dir / f"dataset-slurm-w{n}-{k}"
                try:
                    r = _one_run(run_dir, overrides, dataset, n, shards_per_group)
                finally:
                    shutil.rmtree(dataset, ignore_errors=True)
                if r["rows_counted"] != expected:
                    raise RuntimeError(f"{n} writer(s), run {k}: {r['rows_counted']} rows read back, the ingest "
                                       f"shards hold {expected}")
                r["rows_per_s_wall"], r["rows_per_s_span"] = r["rows"] / r["wall_s"], r["rows"] / r["span_s"]
                runs[n].append(r)
    cases = {n: sorted(got, key=lambda r: r["wall_s"])[len(got) // 2] for n, got in runs.items()}
    out = {"cases": cases, "runs": runs, "slurm": version, "rows_expected": expected, "repeat": repeat,
           "shards_per_group": shards_per_group}
    if 1 in cases and 2 in cases:
        out["ratio"] = {"wall": cases[2]["rows_per_s_wall"] / cases[1]["rows_per_s_wall"],
                        "span": cases[2]["rows_per_s_span"] / cases[1]["rows_per_s_span"]}
    return out


# ------------------------------------------------------------------------------------------------------ CLI


def table(res: dict, args) -> list[str]:
    cores = multiprocessing.cpu_count()
    lines = [
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {platform.node()}, {cores} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end. {res['slurm']}, local cluster ({NODES} nodes of 4 CPUs"
        f" / 4 GiB advertised, all on this machine). Command: `python -m benchmarks.ingest_slurm_writers --videos "
        f"{args.videos} --shards {args.shards} --seconds {args.seconds}`. {res['rows_expected']} rows, "
        f"{res['cases'][next(iter(res['cases']))]['groups']} shard groups of {res['shards_per_group']} shards, one"
        f" array task per group (1 CPU, 2 GiB); median of {res['repeat']} runs by wall time, cases interleaved.", "",
        "| writers at once (array %) | wall s (submit to last result) | writers' span s | to first writer start s "
        "| rows written | rows/s (wall) | rows/s (span) | most at once | peak MiB per task |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in res["cases"].items():
        lines.append(f"| {n} (%{r['throttle']}) | {r['wall_s']:.2f} | {r['span_s']:.2f} | {r['to_first_start_s']:.2f}"
                     f" | {r['rows']} | {r['rows_per_s_wall']:.0f} | {r['rows_per_s_span']:.0f} | "
                     f"{r['most_at_once']} | {max(r['task_peak_mib'], default=0):.0f} |")
    if "ratio" in res:
        lines += ["", f"2 writers vs 1, aggregate rows/s: {res['ratio']['wall']:.2f}x on wall, "
                      f"{res['ratio']['span']:.2f}x on the writers' span ({cores} cores)."]
    lines += ["", "All runs (wall s / span s): " + "; ".join(
        f"{n} writer(s): " + ", ".join(f"{r['wall_s']:.1f}/{r['span_s']:.1f}" for r in got)
        for n, got in res["runs"].items())]
    return lines


def main(argv: list[str] | None = None) -> int:
    from benchmarks.ingest_bench import add_data_arguments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(ap)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each case (the median is reported)")
    ap.add_argument("--out", default="/tmp/ingest-slurm-bench")
    args = ap.parse_args(argv)
    if args.shards < 2 or args.videos < 1 or args.repeat < 1:
        print("ingest_slurm_writers: needs --shards >= 2, --videos >= 1, --repeat >= 1", file=sys.stderr)
        return 2
    from benchmarks.ingest_bench import ingest_config, run_ingest_shards, upstream_from_args
    from pipeline.logs import configure

    configure()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    upstream_from_args(out, args)
    overrides = ("stage.shards_per_commit=2",)
    cfg = ingest_config(out, *overrides)
    run_ingest_shards(cfg)
    from pipeline.engine import run_shard

    for shard in range(args.shards):    # a shard the manifest gave no video is completed empty, as the stage does
        run_shard(cfg, shard)
    res = measure_slurm_writers(out, overrides, shards_per_group=-(-args.shards // 2), repeat=args.repeat)
    print("\n".join(table(res, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
