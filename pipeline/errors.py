"""Errors that are the user's to fix: printed as one line, exit code 2, nothing submitted."""


class ConfigError(Exception):
    """Bad configuration, bad input path, unknown stage, refused geometry change..."""
