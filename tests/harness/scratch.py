"""Scratch directories under /tmp that the tests remove: each one is registered when made,
and the conftest removes a test's own after it (and the rest when the session ends).
Without this, every run left its repositories, restores and clusters behind: about
1,400 directories and 68 GB of /tmp after a day of runs on this machine."""

from __future__ import annotations

import os
import shutil
import tempfile

_made: list = []  # in the order made; per process (each xdist worker has its own)


def scratch_dir(prefix: str, base: str | None = None) -> str:
    """tempfile.mkdtemp, removed after the test (or the session) that made it."""
    path = tempfile.mkdtemp(prefix=prefix, dir=base or "/tmp")
    _made.append(path)
    return path


def keep(path: str) -> str:
    """Leave path out of the automatic removal: its owner removes it (a module fixture's factory that makes
    directories inside the first test that calls it, after that test's mark)."""
    if path in _made:
        _made.remove(path)
    return path


def mark() -> int:
    return len(_made)


def remove_since(position: int) -> None:
    """Remove the scratch directories made since mark() returned position, newest first."""
    while len(_made) > position:
        path = _made.pop()
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
