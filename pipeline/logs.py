"""Logging, configured once per entry point.

Modules log through `logging.getLogger(__name__)` and never configure handlers themselves. Each entry point
(`python -m pipeline`, `python -m pipeline.train`, `python -m pipeline.task`, the verify/report/demo commands)
calls `configure()` once at start; training calls it with its rank so that only rank 0 logs at INFO (other
ranks log warnings and errors, prefixed with their rank). Per-task log files are added by `pipeline.task`.

`VPT_LOG_LEVEL` (DEBUG, INFO, WARNING...) overrides the level. Final summaries of a command (the status table,
a report path) stay plain `print`s: they are the command's output, not its log.
"""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "pipeline.logs"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (not the stream of the first call), so a
    command run in-process under a replaced stderr (tests' capture, a redirect) logs where its errors go."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: int | str | None = None, rank: int = 0) -> logging.Logger:
    """Send the `pipeline` loggers to stderr once; idempotent (a second call only updates the level)."""
    env = os.environ.get("VPT_LOG_LEVEL")
    if level is None:
        level = env or ("INFO" if rank == 0 else "WARNING")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    root = logging.getLogger("pipeline")
    root.setLevel(level)
    # not to the root logger too: a library's module-level `logging.info()` (open_clip's model loading) installs a
    # root handler, and every line would then be written twice
    root.propagate = False
    if not any(getattr(h, "name", None) == _HANDLER_NAME for h in root.handlers):
        handler = _StderrHandler()
        handler.name = _HANDLER_NAME
        prefix = f"[rank {rank}] " if rank else ""
        handler.setFormatter(logging.Formatter(prefix + FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    return root
