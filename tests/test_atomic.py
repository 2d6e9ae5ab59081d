"""Atomic writes: nothing partial on failure, and the finished file has the mode a plain write would give."""

from __future__ import annotations

import os
import stat

import pytest

from comoto_cli.utils.atomic import atomic_path, write_json_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_finished_file_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode)
    assert mode == 0o666 & ~umask


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.csv") as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
