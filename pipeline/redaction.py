"""Credentials in configs (cookies files, proxies, tokens, passwords): recognised by key, never written anywhere.

`redacted(config)` is the config as written to run dirs and logs; the Slurm launcher passes the values it masks
through the job's environment instead of its pickled payload (`pipeline.launchers.slurm.secretless`).
It imports nothing from the package, so config, launchers and stages can all use it.
"""
from __future__ import annotations

import re

SECRET_KEY = re.compile(r"(cookie|proxy|password|passwd|token|secret)", re.I)


def is_secret(key, value) -> bool:
    """A config value that must not be written anywhere (cookies, proxies, tokens, passwords)."""
    return bool(SECRET_KEY.search(str(key))) and not isinstance(value, dict) and value not in (None, "", [], {})


def redacted(container: dict) -> dict:
    """Config as written to run dirs and logs: credentials (cookies, proxies, tokens) never leave memory."""
    out = {}
    for k, v in container.items():
        if isinstance(v, dict):
            out[k] = redacted(v)
        elif is_secret(k, v):
            out[k] = "***"
        else:
            out[k] = v
    return out
