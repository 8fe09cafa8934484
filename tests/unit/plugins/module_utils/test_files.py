"""Paths and private files: what is inside what, where a path would be
created, and files and directories only their owner can read."""

from __future__ import annotations

import importlib
import os
import stat
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
files = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._files")
PgopsError = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._errors").PgopsError


def test_path_inside():
    assert files.path_inside("/data", "/data")
    assert files.path_inside("/data/x/y", "/data/")
    assert not files.path_inside("/data2", "/data")
    assert files.path_inside("/anything", "/")


def test_existing_ancestor(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    # Links are not resolved: the ancestor is named as given.
    assert files.existing_ancestor(str(tmp_path / "link" / "a" / "b")) == str(tmp_path / "link")
    assert files.existing_ancestor(str(tmp_path / "real")) == str(tmp_path / "real")
    assert files.existing_ancestor(str(tmp_path / "real" / ".." / "new")) == str(tmp_path)
    assert files.existing_ancestor("/nonexistent-pgops/x/y") == "/"


def test_resolves_inside(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    assert files.resolves_inside(str(tmp_path / "link" / "b"), str(tmp_path / "data"))
    assert files.resolves_inside(str(tmp_path / "data" / "x"), str(tmp_path / "link"))
    assert not files.resolves_inside(str(tmp_path / "datax"), str(tmp_path / "data"))


def test_ensure_private_dir(tmp_path):
    made = files.ensure_private_dir(str(tmp_path / "a" / "b"))
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    assert files.ensure_private_dir(made) == made  # an existing private one is fine
    with pytest.raises(files.UnsafePathError, match="must be an absolute path"):
        files.ensure_private_dir("relative")
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(files.UnsafePathError, match="open to other users \\(mode 755\\)"):
        files.ensure_private_dir(str(tmp_path / "open"))
    assert stat.S_IMODE(os.stat(tmp_path / "open").st_mode) == 0o755  # never changed
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(files.UnsafePathError, match="a symlink is not accepted"):
        files.ensure_private_dir(str(tmp_path / "link"))
    assert issubclass(files.UnsafePathError, PgopsError)


def test_private_files_are_written_whole_with_their_mode(tmp_path):
    path = str(tmp_path / "f")
    old = os.umask(0)
    try:
        files.write_private_file(path, b"secret")
        files.write_file_atomically(str(tmp_path / "g"), b"public", 0o644)
    finally:
        os.umask(old)
    assert (tmp_path / "f").read_bytes() == b"secret" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "g").st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["f", "g"]


def test_json_round_trip_and_unreadable_json(tmp_path):
    files.write_json(str(tmp_path / "x.json"), {"b": 1, "a": [1, 2]})
    assert files.read_json(str(tmp_path / "x.json")) == {"a": [1, 2], "b": 1}
    assert files.read_json(str(tmp_path / "missing.json")) is None
    (tmp_path / "bad.json").write_text("{")
    assert files.read_json(str(tmp_path / "bad.json")) is None


@pytest.mark.parametrize("kernel", ["works", "refuses", "copies nothing", "absent"])
def test_copy_range_copies_exactly_and_stops_at_the_end(tmp_path, monkeypatch, kernel):
    """copy_file_range where the kernel does it; Python's copy where it refuses (another
    filesystem: EXDEV), where it wrongly copies nothing before the end, or where os lacks it."""
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB of a known pattern
    calls = []

    def fake(*args):
        calls.append(args)
        if kernel == "refuses":
            raise OSError(18, "Invalid cross-device link")
        return 0

    if kernel == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    elif kernel != "works":
        monkeypatch.setattr(os, "copy_file_range", fake)
    dst = tmp_path / "dst"
    with open(src, "rb") as s, open(dst, "wb") as d:
        assert files.copy_range(s.fileno(), d.fileno(), 1000, 5000) == 5000
        assert files.copy_range(s.fileno(), d.fileno(), (1 << 20) - 10, 100) == 10  # only 10 bytes are left
    assert dst.read_bytes() == src.read_bytes()[1000:6000] + src.read_bytes()[-10:]
    if kernel in ("refuses", "copies nothing"):
        assert calls  # the kernel was asked first
