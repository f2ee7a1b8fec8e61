"""Errors the user can act on. The CLI prints them as one clear message (no traceback)."""

from __future__ import annotations

from pathlib import Path


class ExpertRAGError(Exception):
    """Base class: an error whose message is meant for the user, not a bug."""


class InputError(ExpertRAGError):
    """Bad user input, located as precisely as we can: file, line, field."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        self.reason = message
        where = ""
        if self.path is not None:
            where = self.path + (f":{line}" if line is not None else "")
        if field is not None:
            where += f" (field '{field}')" if where else f"field '{field}'"
        super().__init__(f"{where}: {message}" if where else message)


class IndexFormatError(ExpertRAGError):
    """A missing, corrupt, truncated or mismatched index directory (named in the message)."""


class ConfigError(ExpertRAGError):
    """A config file that does not parse or validate."""
