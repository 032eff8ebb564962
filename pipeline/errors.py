"""Errors that are the user's to fix: printed as one line, exit code 2, nothing submitted.

The lowest layer of the package: it imports nothing from `pipeline`, so every module (launchers, stages, the
verifier, the command-line entry points) can use it without an import cycle.
"""
from __future__ import annotations

import sys
from typing import Callable


class ConfigError(Exception):
    """Bad configuration, bad input path, unknown stage, refused geometry change..."""


def fail(message: str) -> int:
    """The one-line error of a command (`error: ...` on stderr); returns its exit code, 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def command_main(command: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """`python -m pipeline.<module> key=value ...` for a subcommand: a ConfigError is one line and exit code 2."""
    try:
        return command(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        return fail(str(exc))
