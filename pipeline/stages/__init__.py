"""Stage registry: stage name -> module. Modules are imported lazily so `--help` and config errors stay fast."""
from __future__ import annotations

import importlib
import importlib.util

from ..errors import ConfigError

# Pipeline order; each name is a module in this package defining `STAGE`.
STAGES: dict[str, str] = {
    "download": "pipeline.stages.download",
    "frames": "pipeline.stages.frames",
    "asr": "pipeline.stages.asr",
    "clip": "pipeline.stages.clip",
    "audio": "pipeline.stages.audio",
    "scenegraph": "pipeline.stages.scenegraph",
    "ingest": "pipeline.stages.ingest",
}


def available() -> list[str]:
    out = []
    for name, mod in STAGES.items():
        if importlib.util.find_spec(mod) is not None:
            out.append(name)
    return out


def get_stage(name: str):
    if name not in STAGES or importlib.util.find_spec(STAGES[name]) is None:
        raise ConfigError(f"unknown stage {name!r}; choose one of: {', '.join(available())}")
    return importlib.import_module(STAGES[name]).STAGE
