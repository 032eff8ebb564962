"""One benchmark client (filesystem phase + dataset phase), and the aggregation of several clients' results.

A client is a plain function of a plain dict so local processes and Slurm array tasks run the same code.
"""

from __future__ import annotations

import os
import statistics
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from .fsbench import FileBarrier, aggregate_phases, run_fs_phase
from .layouts import LayoutOptions, disk_usage, make_layout
from .samples import make_samples
from .syscalls import warm_up_libraries, count_read_syscalls

DATASET_PHASES = ("write", "random", "scan")


def layout_options(cfg: dict) -> LayoutOptions:
    return LayoutOptions(**{k: int(v) for k, v in cfg["layout_options"].items()})


def drop_page_cache() -> str | None:
    """Empty the page cache so reads hit the filesystem; returns why not when not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return None
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"


def random_indices(samples: int, reads: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(samples, size=reads, replace=reads > samples)]


def run_client(cfg: dict, client: int = 0, clients: int = 1) -> dict:
    """Run every phase for one client under ``cfg["root"]``; returns its measurements (JSON-able)."""
    root = Path(cfg["root"])
    barrier = FileBarrier(root / "_barriers", clients, client, timeout_s=float(cfg["barrier_timeout_s"]))
    mine = root / f"client-{client:04d}"
    if mine.exists():
        shutil.rmtree(mine)
    mine.mkdir(parents=True)
    result: dict = {"client": client, "host": socket.gethostname(), "node": os.environ.get("SLURMD_NODENAME")}
    cache_notes: set[str] = set()

    def before_read() -> None:
        if cfg["drop_caches"]:
            note = drop_page_cache()
            cache_notes.add(note or "dropped")

    try:
        fs = cfg["fs"]
        if fs["enabled"]:
            result["fs"] = run_fs_phase(
                root / "fs",
                files=int(fs["files_per_client"]),
                dirs=int(fs["dirs"]),
                file_size=int(fs["file_size"]),
                client=client,
                barrier=lambda phase: barrier(f"fs-{phase}"),
            )

        ds, image = cfg, cfg["image"]
        samples = make_samples(
            int(ds["samples"]),
            seed=int(cfg["seed"]),
            embedding_dim=int(ds["embedding_dim"]),
            width=int(image["width"]),
            height=int(image["height"]),
            quality=int(image["quality"]),
            video=image["video"],
        )
        indices = random_indices(len(samples), int(ds["random_reads"]), int(cfg["seed"]) + 1000 + client)
        batch = int(ds["batch_size"])
        options = layout_options(cfg)
        result["sample_bytes"] = {
            "jpeg_mean": float(np.mean([len(s.jpeg) for s in samples])),
            "embedding": int(samples[0].embedding.nbytes),
            "caption_mean": float(np.mean([len(s.caption.encode()) for s in samples])),
            "metadata_json_mean": float(np.mean([len(s.metadata_json.encode()) for s in samples])),
        }
        result["layouts"] = {}
        warm_up_libraries()  # so no layout's timing includes importing its library
        for name in ds["layouts"]:
            layout = make_layout(name, mine / name, options)
            timings: dict[str, dict] = {}

            barrier(f"{name}-write")
            timings["write"] = _timed(lambda: layout.write(samples) or len(samples))

            before_read()
            barrier(f"{name}-random")

            def random_phase() -> int:
                n = 0
                with layout.reader() as reader:
                    for start in range(0, len(indices), batch):
                        got = reader.read(indices[start : start + batch])
                        # Cheap identity check inside the loop; full equality is checked after timing.
                        if got[0].key != samples[indices[start]].key:
                            raise AssertionError(f"{name}: wrong sample returned")
                        n += len(got)
                return n

            timings["random"] = _timed(random_phase)

            before_read()
            barrier(f"{name}-scan")

            def scan_phase() -> int:
                with layout.reader() as reader:
                    return sum(len(chunk) for chunk in reader.scan(batch))

            timings["scan"] = _timed(scan_phase)
            if timings["scan"]["samples"] != len(samples):
                raise AssertionError(f"{name}: scan returned {timings['scan']['samples']} of {len(samples)} samples")
            with layout.reader() as reader:
                check = indices[: min(len(indices), 64)]
                if not all(a.equals(samples[i]) for a, i in zip(reader.read(check), check)):
                    raise AssertionError(f"{name}: data read back differs from data written")
            result["layouts"][name] = {"phases": timings, "disk": disk_usage(mine / name)}

        # Syscall counting slows reads down (ptrace), so it runs after all timed phases, on one client.
        sc = cfg["syscalls"]
        if sc["enabled"] and client == 0:
            for name in ds["layouts"]:
                result["layouts"][name]["syscalls"] = count_read_syscalls(
                    name,
                    mine / name,
                    options,
                    indices[: int(sc["random_reads"])],
                    batch_size=batch,
                    method=sc["method"],
                )
        result["page_cache"] = sorted(cache_notes) or ["warm (not dropped)"]
        result["barrier_timeouts"] = barrier.timeouts
    finally:
        if not cfg["keep"]:
            shutil.rmtree(mine, ignore_errors=True)
    return result


def _timed(work) -> dict:
    start = time.time()
    t0 = time.perf_counter()
    samples = int(work())
    seconds = time.perf_counter() - t0
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds > 0 else float("inf"),
        "start": start,
        "end": start + seconds,
    }


def aggregate(client_results: list[dict], layouts: list[str]) -> dict:
    """Per layout and phase: aggregate samples/s over the clients' common span and the per-client spread."""
    out: dict = {"fs": None, "dataset": {}}
    fs_results = [r["fs"] for r in client_results if r.get("fs")]
    if fs_results:
        out["fs"] = aggregate_phases(fs_results)
    first = next(r for r in client_results if r["client"] == min(c["client"] for c in client_results))
    for name in layouts:
        per_client = [r["layouts"][name] for r in client_results]
        row: dict = {"disk_per_client": first["layouts"][name]["disk"]}
        for phase in DATASET_PHASES:
            rows = [c["phases"][phase] for c in per_client]
            span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
            rates = sorted(r["samples_per_s"] for r in rows)
            row[phase] = {
                "samples": sum(r["samples"] for r in rows),
                "span_s": span,
                "aggregate_samples_per_s": sum(r["samples"] for r in rows) / span if span > 0 else float("inf"),
                "client_samples_per_s_min": rates[0],
                "client_samples_per_s_median": statistics.median(rates),
                "client_samples_per_s_max": rates[-1],
            }
        syscalls = [r["layouts"][name].get("syscalls") for r in client_results if r["layouts"][name].get("syscalls")]
        row["syscalls"] = syscalls[0] if syscalls else None
        out["dataset"][name] = row
    return out
