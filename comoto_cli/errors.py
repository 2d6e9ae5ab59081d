"""Errors that reach the user as one clear line (no traceback unless ``--debug``).

Library code raises these; the CLI prints ``error: <message>`` and exits with ``exit_code``.
Messages name the file and, where there is one, the CSV row (1-based, header = row 1) or config field.
"""

from __future__ import annotations

from pathlib import Path


class ComotoError(Exception):
    """Base class: a problem the user can fix (bad input, bad config). Exit code 1."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None, row: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if row is not None:
                where += f", row {row}"
            where += ": "
        super().__init__(f"{where}{message}")
        self.path = None if path is None else str(path)
        self.row = row
        self.reason = message


class UsageError(ComotoError):
    """Wrong command-line usage or invalid configuration value. Exit code 2, like Click's usage errors."""

    exit_code = 2


class InputDataError(ComotoError):
    """A data file (DICOM, CSV, cache) is missing, corrupt or inconsistent. Exit code 1."""


class CheckpointError(ComotoError):
    """A checkpoint that cannot be loaded safely or does not match the configured model."""
