"""Expert packages from outside `pipeline/`, named for every process of a run by one environment variable.

`pipeline.modalities.load_plugins` imports them (each registers its modality and its stage) when the modalities
load; the stage registry loads the modalities when asked for a stage it does not know yet. Below both: it imports
nothing from the package.
"""
from __future__ import annotations

import os

PLUGINS_ENV = "VPT_MODALITIES"


def named() -> list[str]:
    """The packages the variable names (comma-separated "package.module" or "package.module:function")."""
    return [s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(",") if s.strip()]
