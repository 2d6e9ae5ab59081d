"""Crash-safe file output: write to a temporary file in the destination folder, then rename.

A killed process leaves either the old file or the new one, never a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from comoto_cli.errors import ComotoError


def _temporary_name(destination: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(handle)
    return Path(name)


def _plain_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 less the umask. mkstemp makes its file 0o600,
    which would leave caches, checkpoints and results unreadable to the rest of a lab on a shared server."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def ensure_writable_dir(folder: str | Path) -> Path:
    """Create ``folder`` (and parents) or raise a one-line error saying why it cannot be used."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:  # errno alone ("File exists", "Not a directory") does not say which path
            raise ComotoError(f"cannot create output folder: {blocker} is a file, not a folder", path=folder) from None
        raise ComotoError(f"cannot create output folder: {exc.strerror or exc}", path=folder) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ComotoError("output folder is not writable", path=folder)
    return folder


@contextlib.contextmanager
def atomic_path(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``destination``; rename it over ``destination`` on success.

    On any exception the temporary file is removed and ``destination`` is untouched.
    """
    destination = Path(destination)
    ensure_writable_dir(destination.parent)
    try:
        temporary = _temporary_name(destination)
    except OSError as exc:
        raise ComotoError(f"cannot write: {exc.strerror or exc}", path=destination) from None
    try:
        yield temporary
        os.chmod(temporary, _plain_file_mode())
        os.replace(temporary, destination)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ComotoError(f"cannot write: {exc.strerror or exc}", path=destination) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(destination: str | Path, text: str) -> None:
    with atomic_path(destination) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def write_json_atomic(destination: str | Path, payload: object) -> None:
    write_text_atomic(destination, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _file_stamps(folder: Path) -> dict[Path, tuple[int, int, int]]:
    if not folder.is_dir():
        return {}
    stamps = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            stamps[path] = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return stamps


@contextlib.contextmanager
def all_or_nothing(folder: str | Path) -> Iterator[Path]:
    """For a command that writes several files into ``folder`` (each one atomically): when it fails part-way,
    remove the files it had written and the folders it had created, so no half set of outputs is left."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    before = _file_stamps(folder)
    try:
        yield folder
    except BaseException:
        for path, stamp in _file_stamps(folder).items():
            if before.get(path) != stamp:
                path.unlink(missing_ok=True)
        for path in created:  # deepest first; a folder that holds anything else stays
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
