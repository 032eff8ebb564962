"""What a launcher is: something that runs the incomplete shards of a stage and says how that went.

A launcher module (`pipeline.launchers.local`, `pipeline.launchers.slurm`) defines `LAUNCHER`, an instance of a
`Launcher` subclass; `pipeline.launchers.get_launcher(name)` finds it. The command line only talks to this
interface: `preflight` before anything is written, `launch` for the shards, `submit_finish` for a stage's
once-per-run step when the launch did not wait for its shards, and `run_finish` for it once they are complete.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
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


class Launcher(ABC):
    name: str = ""

    def preflight(self, cfg) -> None:
        """Can this launcher run `cfg` here? Called before anything is written; a ConfigError line if not."""

    @abstractmethod
    def launch(self, cfg, shards: list[int]) -> LaunchResult:
        """Run (or submit) the given shards of `cfg`'s stage."""

    def submit_finish(self, cfg, after_job_ids: list[str]) -> str:
        """Queue the stage's finish step after the given jobs; returns its job id. Only launchers that can return
        before their shards are done (`LaunchResult.waited` False) need it."""
        raise NotImplementedError(f"launcher {self.name!r} runs a stage's finish step itself")

    def run_finish(self, cfg, stage_cls) -> list[str]:
        """Run the stage's finish step now (its shards are complete); returns the ids of any jobs it submitted.
        Here, in this process; the Slurm launcher runs a finish step of several units (ingest's shard groups) as
        one array."""
        stage_cls.finish(cfg)
        return []
