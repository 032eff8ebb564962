"""Launchers run the incomplete shards of a stage: `local` (process pool) or `slurm` (submitit array jobs)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LaunchResult:
    shards: list[int]
    failed_shards: dict[int, str] = field(default_factory=dict)   # shard -> error
    busy_shards: dict[int, str] = field(default_factory=dict)     # shard -> the live owner that runs it (skipped)
    job_ids: list[str] = field(default_factory=list)
    waited: bool = True

    @property
    def ok(self) -> bool:
        return not self.failed_shards


def launch(cfg, shards: list[int]) -> LaunchResult:
    if cfg.launcher.name == "local":
        from .local import launch as run
    else:
        from .slurm import launch as run
    return run(cfg, shards)
