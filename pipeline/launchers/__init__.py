"""Launchers run the incomplete shards of a stage: `local` (process pool) or `slurm` (submitit array jobs).

Each is a module of this package defining `LAUNCHER` (a `base.Launcher`); modules are imported when first asked
for, so choosing `local` never imports submitit.
"""
from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import LaunchResult, Launcher

__all__ = ["LAUNCHERS", "LaunchResult", "Launcher", "get_launcher", "launch"]

LAUNCHERS: dict[str, str] = {
    "local": "pipeline.launchers.local",
    "slurm": "pipeline.launchers.slurm",
}


def get_launcher(name: str) -> Launcher:
    if name not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {name!r}; choose one of: {', '.join(LAUNCHERS)}")
    return importlib.import_module(LAUNCHERS[name]).LAUNCHER


def launch(cfg, shards: list[int]) -> LaunchResult:
    return get_launcher(cfg.launcher.name).launch(cfg, shards)
