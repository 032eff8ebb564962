"""Stage registry: stage name -> module. Modules are imported lazily so `--help` and config errors stay fast.

`STAGES` lists the stages in pipeline order: a topological order of the graph their `upstream` declarations
make (`stage_order`, `graphlib`); a test holds the two together. A stage from another package is added with
`register(name, "package.module")` (its module defines `STAGE`), which re-orders `STAGES` by the graph;
`registered(...)` does so for a `with` block and restores the registry afterwards.
"""
from __future__ import annotations

import graphlib
import importlib
import importlib.util
from contextlib import contextmanager
from typing import Iterator

from .. import plugins
from ..errors import ConfigError

# Pipeline order; each name is a module defining `STAGE`.
BUILTIN: dict[str, str] = {
    "download": "pipeline.stages.download",
    "frames": "pipeline.stages.frames",
    "asr": "pipeline.stages.asr",
    "clip": "pipeline.stages.clip",
    "audio": "pipeline.stages.audio",
    "scenegraph": "pipeline.stages.scenegraph",
    "ingest": "pipeline.stages.ingest",
}
STAGES: dict[str, str] = dict(BUILTIN)


def load_plugins() -> None:
    """The expert packages `VPT_MODALITIES` names register their stages (and modalities) when `pipeline.modalities`
    loads: load it when the variable is set, so that their stages resolve in every process of a run (the command,
    local workers, Slurm tasks); without it nothing is imported (`--help` stays light)."""
    if plugins.named():
        try:
            importlib.import_module("pipeline.modalities")
        except ImportError as exc:      # a package named there that is not installed: one line, before any work
            raise ConfigError(f"{plugins.PLUGINS_ENV}={','.join(plugins.named())}: {exc}") from None


def available() -> list[str]:
    load_plugins()
    out = []
    for name, mod in STAGES.items():
        if importlib.util.find_spec(mod) is not None:
            out.append(name)
    return out


def get_stage(name: str):
    if name not in STAGES:
        load_plugins()
    if name not in STAGES or importlib.util.find_spec(STAGES[name]) is None:
        raise ConfigError(f"unknown stage {name!r}; choose one of: {', '.join(available())}")
    return importlib.import_module(STAGES[name]).STAGE


def run_prelude(spec: str | None) -> None:
    """Call a stage's `finish_prelude` ("module:function", see `Stage.finish_prelude`), first thing in a finish job.
    A prelude only starts work early: when it fails, the finish step does that work itself, so it is logged here."""
    if not spec:
        return
    try:
        module, _, function = spec.partition(":")
        getattr(importlib.import_module(module), function)()
    except Exception as exc:  # noqa: BLE001
        import logging

        logging.getLogger(__name__).warning(f"finish prelude {spec} failed ({type(exc).__name__}: {exc}); the "
                                            "finish step goes on without it")


def stage_order(stages: dict[str, str] | None = None) -> list[str]:
    """The stages in an order where each comes after every stage its `upstream` names (ties keep the listed
    order). Imports the stage modules. A cycle, or an upstream stage that is not registered, is a ConfigError."""
    stages = STAGES if stages is None else stages
    position = {name: k for k, name in enumerate(stages)}
    graph: dict[str, set[str]] = {}
    for name, module in stages.items():
        deps = set(importlib.import_module(module).STAGE.upstream)
        unknown = sorted(deps - set(stages))
        if unknown:
            raise ConfigError(f"stage {name!r} reads from unregistered stage(s) {unknown}")
        graph[name] = deps
    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        raise ConfigError(f"stage upstream graph has a cycle: {' -> '.join(exc.args[1])}") from None
    order: list[str] = []
    ready: set[str] = set()
    while sorter.is_active():
        ready |= set(sorter.get_ready())
        first = min(ready, key=position.__getitem__)     # one at a time: the earliest listed of the ready ones
        ready.discard(first)
        order.append(first)
        sorter.done(first)
    return order


def register(name: str, module: str) -> None:
    """Add the stage `name` (module `module`, defining `STAGE`) and re-order `STAGES` by the upstream graph."""
    if name in STAGES and STAGES[name] != module:
        raise ValueError(f"stage {name!r} is already registered as {STAGES[name]}")
    candidate = {**STAGES, name: module}
    order = stage_order(candidate)
    STAGES.clear()
    STAGES.update({n: candidate[n] for n in order})


def unregister(name: str) -> None:
    if name in BUILTIN:
        raise ValueError(f"stage {name!r} is built in")
    STAGES.pop(name, None)


@contextmanager
def registered(**stages: str) -> Iterator[None]:
    """Register name=module stages for a `with` block; `STAGES` is restored afterwards."""
    saved = dict(STAGES)
    try:
        for name, module in stages.items():
            register(name, module)
        yield
    finally:
        STAGES.clear()
        STAGES.update(saved)
