"""python -m benchmarks.metadata [mode=local|slurm clients=C samples=M root=/shared/path out=DIR ...]"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .report import machine_stamp, write_report
from .run import aggregate
from .slurm_parallel import run_local_clients, run_slurm_clients


def run_benchmark(cfg: dict) -> tuple[dict, dict[str, Path]]:
    """Run all clients, aggregate, write the report; returns (result, report paths)."""
    mode, clients = cfg["mode"], int(cfg["clients"])
    if mode not in ("local", "slurm"):
        raise ValueError(f"mode must be local or slurm, not {mode!r}")
    if clients < 1:
        raise ValueError("clients must be >= 1")
    root = Path(cfg["root"]).absolute()
    cfg = dict(cfg, root=str(root))
    barriers = root / "_barriers"
    shutil.rmtree(barriers, ignore_errors=True)  # a previous run's barrier files would release clients early
    try:
        if mode == "local":
            client_results = run_local_clients(cfg, clients)
        else:
            client_results = run_slurm_clients(cfg, clients)
    finally:
        shutil.rmtree(barriers, ignore_errors=True)
        if not cfg["keep"]:
            shutil.rmtree(root / "fs", ignore_errors=True)
    client_results.sort(key=lambda r: r["client"])
    first = client_results[0]
    syscalls = [l.get("syscalls") for l in first["layouts"].values() if l.get("syscalls")]
    result = {
        "benchmark": "metadata",
        "mode": mode,
        "clients": clients,
        "config": cfg,
        "stamp": machine_stamp(root),
        "nodes": sorted({r["node"] or r["host"] for r in client_results}),
        "sample_bytes": first["sample_bytes"],
        "page_cache": sorted({n for r in client_results for n in r["page_cache"]}),
        "barrier_timeouts": sorted({t for r in client_results for t in r["barrier_timeouts"]}),
        "syscall_filter": syscalls[0]["filter"] if syscalls else None,
        "aggregate": aggregate(client_results, list(cfg["layouts"])),
        "client_results": client_results,
    }
    paths = write_report(result, Path(cfg["out"]))
    return result, paths


@hydra.main(config_path="conf", config_name="metadata", version_base=None)
def main(conf: DictConfig) -> None:
    cfg = OmegaConf.to_container(conf, resolve=True)
    result, paths = run_benchmark(cfg)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    sys.exit(main())
