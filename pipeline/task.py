"""One array task = one shard: logging to the task's own file, failure recorded beside the shard.

Used by both launchers and by `slurm/stage_array.sbatch`:
    python -m pipeline.task stage=frames run_dir=/scratch/run shard=$SLURM_ARRAY_TASK_ID
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from .config import from_container
from .logs import configure
from .shards import shard_name


def task_logger(run_dir: str, stage: str, shard: int) -> logging.Logger:
    log_dir = Path(run_dir) / stage / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"pipeline.{stage}.{shard}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        fh = logging.FileHandler(log_dir / f"{shard_name(shard)}.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(fh)
        if os.environ.get("SLURM_JOB_ID"):  # also into Slurm's own per-task stdout
            sh = logging.StreamHandler(sys.stdout)
            sh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(sh)
    return logger


def run_task(cfg_container: dict[str, Any], shard: int) -> dict[str, Any]:
    from .engine import run_shard

    configure()         # module loggers to stderr (Slurm's per-task output) also when run as a job body
    cfg = from_container(cfg_container)
    logger = task_logger(cfg.run_dir, cfg.stage.name, shard)
    logger.info(f"task start: stage={cfg.stage.name} shard={shard} pid={os.getpid()} host={os.uname().nodename} "
                f"slurm_job={os.environ.get('SLURM_JOB_ID', '-')}")
    try:
        return run_shard(cfg, shard, logger)  # records a failure in the shard's _FAILED itself, under its lease
    except BaseException:
        logger.error(traceback.format_exc())
        raise


def main(argv: list[str] | None = None) -> int:
    from .config import compose
    from .engine import container
    from .errors import ConfigError, fail
    from .logs import configure

    configure()
    argv = list(sys.argv[1:] if argv is None else argv)
    shard_args = [a for a in argv if a.startswith("shard=")]
    if len(shard_args) != 1:
        return fail("usage: python -m pipeline.task stage=<name> run_dir=<dir> shard=<id> [overrides]")
    argv.remove(shard_args[0])
    try:
        shard = int(shard_args[0].split("=", 1)[1])
        cfg = compose(argv)
    except (ConfigError, ValueError) as exc:
        return fail(str(exc))
    run_task(container(cfg), shard)
    return 0


if __name__ == "__main__":
    sys.exit(main())
