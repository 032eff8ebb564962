"""Stamp a run with its machine and filesystem, and write it as JSON, a markdown table and a PNG plot."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from importlib import metadata as pkg_metadata
from pathlib import Path

PHASE_LABELS = {"write": "write", "random": "random read", "scan": "scan"}


def filesystem_of(path: Path) -> dict:
    """Mount point, type and device of the filesystem holding `path` (longest /proc/mounts prefix)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    real = os.path.realpath(path)
    best = {"mount": "/", "type": "unknown", "device": "unknown"}
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                device, mount, fstype, *_ = line.split()
                mount = mount.replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best["mount"]):
                    best = {"mount": mount, "type": fstype, "device": device}
    except OSError:
        pass
    try:  # statfs's magic-number name, e.g. "lustre", "nfs", "ext2/ext3" (ext4 reads as the latter)
        best["statfs_type"] = subprocess.run(
            ["stat", "-f", "-c", "%T", real], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return best


def _cpu_model() -> str:
    from pipeline.machine import cpu_model

    return cpu_model()


def _version(package: str) -> str | None:
    try:
        return pkg_metadata.version(package)
    except pkg_metadata.PackageNotFoundError:
        return None


def machine_stamp(root: Path) -> dict:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "filesystem": filesystem_of(root),
        "root": str(root),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {p: _version(p) for p in ("deeplake", "pyarrow", "numpy", "pillow", "submitit")},
    }


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "n/a"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def markdown(result: dict) -> str:
    s, cfg = result["stamp"], result["config"]
    fs = s["filesystem"]
    clients = result["clients"]
    lines = [
        f"# Metadata-throughput benchmark — {result['mode']}, {clients} client(s)",
        "",
        f"- host `{s['host']}`, {s['cpu']}, {s['cores']} cores, {s['memory_gb']} GB RAM, kernel {s['kernel']}",
        f"- filesystem under test: `{s['root']}` on `{fs['mount']}` type **{fs['type']}**"
        f" (statfs: {fs.get('statfs_type', '?')}), device `{fs['device']}`",
        f"- {cfg['samples']} samples per client (mean JPEG {result['sample_bytes']['jpeg_mean'] / 1024:.1f} KiB,"
        f" float16[{cfg['embedding_dim']}] embedding, caption ~{result['sample_bytes']['caption_mean']:.0f} B,"
        f" JSON metadata ~{result['sample_bytes']['metadata_json_mean']:.0f} B);"
        f" {cfg['random_reads']} random reads in batches of {cfg['batch_size']}",
        f"- page cache before reads: {', '.join(result['page_cache'])}; date {s['date_utc']};"
        f" deeplake {s['versions']['deeplake']}, pyarrow {s['versions']['pyarrow']}",
    ]
    if result.get("nodes"):
        lines.append(f"- clients ran on: {', '.join(result['nodes'])}")
    if result.get("barrier_timeouts"):
        lines.append(f"- WARNING: barrier timeouts (phases did not fully overlap): {result['barrier_timeouts']}")
    agg = result["aggregate"]
    if agg["fs"]:
        f = cfg["fs"]
        lines += [
            "",
            f"## Filesystem phase (mdtest-like): {f['files_per_client']} files of {f['file_size']} B per client"
            f" in {f['dirs']} shared directories",
            "",
            "| phase | ops | aggregate ops/s | per-client ops/s min / median / max |",
            "|---|---:|---:|---:|",
        ]
        for phase, row in agg["fs"].items():
            lines.append(
                f"| {phase} | {row['ops']:,} | {_fmt(row['aggregate_ops_per_s'])} |"
                f" {_fmt(row['client_ops_per_s_min'])} / {_fmt(row['client_ops_per_s_median'])} /"
                f" {_fmt(row['client_ops_per_s_max'])} |"
            )
    lines += [
        "",
        "## Dataset phase (samples/s are aggregate over clients)",
        "",
        "| layout | write samples/s | random-read samples/s | scan samples/s | files created | bytes on disk |"
        " metadata syscalls / sample, random | opens / sample, random | metadata syscalls / sample, scan |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    method = None
    for name, row in agg["dataset"].items():
        sc = row.get("syscalls")
        method = method or (sc or {}).get("method")
        lines.append(
            f"| {name} | {_fmt(row['write']['aggregate_samples_per_s'])} |"
            f" {_fmt(row['random']['aggregate_samples_per_s'])} | {_fmt(row['scan']['aggregate_samples_per_s'])} |"
            f" {row['disk_per_client']['files']:,} | {_mib(row['disk_per_client']['bytes_on_disk'])} |"
            f" {_fmt(sc['random']['per_sample'], 2) if sc else 'n/a'} |"
            f" {_fmt(sc['random']['opens_per_sample'], 2) if sc else 'n/a'} |"
            f" {_fmt(sc['scan']['per_sample'], 3) if sc else 'n/a'} |"
        )
    if clients > 1:
        lines += ["", "Per-client spread (samples/s, min / median / max):", "",
                  "| layout | write | random read | scan |", "|---|---:|---:|---:|"]
        for name, row in agg["dataset"].items():
            cells = [
                f"{_fmt(row[p]['client_samples_per_s_min'])} / {_fmt(row[p]['client_samples_per_s_median'])} /"
                f" {_fmt(row[p]['client_samples_per_s_max'])}"
                for p in ("write", "random", "scan")
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sc_cfg = cfg["syscalls"]
    lines += [
        "",
        f"Files and bytes are per client. Syscalls: {method or 'not counted'}"
        + (f", over {sc_cfg['random_reads']} random reads and one full scan (client 0), reader open included;"
           f" counted: {result['syscall_filter']}." if method else "."),
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    agg = result["aggregate"]
    names = list(agg["dataset"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    if agg["fs"]:
        phases = list(agg["fs"])
        ax.bar(phases, [agg["fs"][p]["aggregate_ops_per_s"] for p in phases], color="tab:gray")
        ax.set_yscale("log")
        ax.set_ylabel("aggregate ops/s")
    ax.set_title("filesystem phase (mdtest-like)")
    ax = axes[1]
    x = np.arange(len(names))
    for k, phase in enumerate(("write", "random", "scan")):
        ax.bar(x + (k - 1) * 0.27, [agg["dataset"][n][phase]["aggregate_samples_per_s"] for n in names], 0.27,
               label=PHASE_LABELS[phase])
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("aggregate samples/s")
    ax.set_title("dataset phase throughput")
    ax.legend()
    ax = axes[2]
    for k, phase in enumerate(("random", "scan")):
        vals = [(agg["dataset"][n]["syscalls"] or {}).get(phase, {}).get("per_sample", 0.0) for n in names]
        ax.bar(x + (k - 0.5) * 0.4, [max(v, 1e-3) for v in vals], 0.4, label=PHASE_LABELS[phase])
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("metadata syscalls per sample")
    ax.set_title("metadata syscalls per sample read")
    ax.legend()
    s = result["stamp"]
    fig.suptitle(
        f"{s['host']} · {s['filesystem']['type']} at {s['filesystem']['mount']} · {result['mode']}, "
        f"{result['clients']} client(s) · {result['config']['samples']} samples/client"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, out_dir: Path) -> dict[str, Path]:
    """Write <stem>.json, <stem>.md and <stem>.png under `out_dir`; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    stem = f"{result['mode']}-c{result['clients']}-{result['stamp']['host']}-{stamp}"
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=2, sort_keys=True))
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths
