"""The scanners that follow tar and cpio streams, against real GNU tar and cpio output."""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
stream_mod = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._stream")
_copy = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._copy")
_checksum = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._checksum")
CpioScanner, TarScanner = stream_mod.CpioScanner, stream_mod.TarScanner


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    files = {
        "PG_VERSION": b"15\n",
        "empty": b"",
        "base/1/1259": os.urandom(70000),
        "exact": b"x" * 512,
        ("d" * 60) + "/" + ("n" * 80): b"long name",  # > 100 bytes: GNU 'L' header
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "link").symlink_to("PG_VERSION")
    names = ["PG_VERSION", "empty", "base", "base/1", "base/1/1259", "exact", "d" * 60, ("d" * 60) + "/" + ("n" * 80), "link"]
    return root, files, names


def _scan(scanner, stream: bytes, step: int):
    for i in range(0, len(stream), step):
        scanner.feed(stream[i : i + step])
    return {e["path"]: e for e in scanner.entries}


@pytest.mark.parametrize("step", [1, 511, 4096, 1 << 20])
def test_tar_scanner_matches_the_files(tree, step):
    root, files, names = tree
    stream = subprocess.run(
        ["tar", "-C", str(root), "-cf", "-", "--format=gnu", "--no-recursion", "--null", "-T", "-"],
        input=b"\0".join(n.encode() for n in names) + b"\0",
        capture_output=True,
        check=True,
    ).stdout
    scanner = TarScanner("pg_tblspc/7/" if step == 1 else "", "SHA256")
    got = _scan(scanner, stream, step)
    prefix = "pg_tblspc/7/" if step == 1 else ""
    assert scanner.done
    assert set(got) == {prefix + k for k in files}
    for rel, data in files.items():
        e = got[prefix + rel]
        assert e["size"] == len(data) and e["checksum"] == hashlib.sha256(data).hexdigest()
        assert e["mtime"] == int(os.stat(root / rel).st_mtime)


@pytest.mark.parametrize("step", [3, 1 << 20])
def test_cpio_scanner_matches_the_files(tree, step):
    root, files, names = tree
    stream = subprocess.run(
        ["cpio", "-o", "-0", "-H", "newc", "--quiet"],
        cwd=root,
        input=b"\0".join(n.encode() for n in names) + b"\0",
        capture_output=True,
        check=True,
    ).stdout
    scanner = CpioScanner("", "SHA224")
    got = _scan(scanner, stream, step)
    assert scanner.done
    assert set(got) == set(files)
    for rel, data in files.items():
        assert got[rel]["checksum"] == hashlib.sha224(data).hexdigest()
    # The restore's guard refuses the link (cpio would write through it), lets the rest pass as the copy
    # writes it (-L: links followed), and keeps nothing per file (a backup may hold millions).
    with pytest.raises(ValueError, match="link is a symbolic link"):
        _scan(CpioScanner("", None, files_and_dirs_only=True), stream, step)
    followed = subprocess.run(
        ["cpio", "-o", "-0", "-L", "-H", "newc", "--quiet"],
        cwd=root,
        input=b"\0".join(n.encode() for n in names) + b"\0",
        capture_output=True,
        check=True,
    ).stdout
    guard = CpioScanner("", None, files_and_dirs_only=True)
    _scan(guard, followed, step)
    assert guard.done and guard.entries == []


def test_truncated_stream_is_not_done(tree):
    root, _, names = tree
    stream = subprocess.run(
        ["tar", "-C", str(root), "-cf", "-", "--format=gnu", *names[:5]], capture_output=True, check=True
    ).stdout
    scanner = TarScanner("", "NONE")
    scanner.feed(stream[:1500])
    assert not scanner.done


def _archiver(method: str, root, names, big: bool) -> list:
    return _copy._archive_command(method, str(root), big_records=big)


@pytest.mark.parametrize("method", ["tar", "cpio"])
@pytest.mark.parametrize("sink_kind", ["pipe", "file"])
def test_tee_passes_the_archive_on_with_standard_padding(tree, tmp_path, method, sink_kind):
    """1 MiB records in, byte for byte what the archiver writes with its default
    records out (through tee(2) into a pipe, or read and written into a file),
    with every file's checksum seen on the way."""
    root, files, names = tree
    listing = b"\0".join(n.encode() for n in names) + b"\0"
    expected = subprocess.run(_archiver(method, root, names, False), cwd=root, input=listing, capture_output=True, check=True)
    archiver = subprocess.Popen(
        _archiver(method, root, names, True), cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    archiver.stdin.write(listing)
    archiver.stdin.close()
    out = tmp_path / "out"
    scanner = (TarScanner if method == "tar" else CpioScanner)("", "CRC32C")
    with open(out, "wb") as f:
        if sink_kind == "pipe":
            cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=f)
            _copy._tee(archiver.stdout.fileno(), cat.stdin.fileno(), scanner)
            cat.stdin.close()
            assert cat.wait() == 0
        else:
            _copy._tee(archiver.stdout.fileno(), f.fileno(), scanner)
    assert archiver.wait() == 0, archiver.stderr.read()
    assert scanner.done
    got = out.read_bytes()
    # The big records really were bigger: the archiver padded to 1 MiB.
    assert len(got) < 1 << 20
    assert got == expected.stdout
    # Our archivers dereference links: "link" is stored as a copy of PG_VERSION.
    want = {k: _checksum.Crc32c(v).hexdigest() for k, v in {**files, "link": files["PG_VERSION"]}.items()}
    assert {e["path"]: e["checksum"] for e in scanner.entries} == want


def test_tee_stops_at_a_stream_that_ends_early(tree, tmp_path):
    root, _, names = tree
    stream = subprocess.run(["tar", "-C", str(root), "-cf", "-", "--format=gnu", *names[:5]], capture_output=True, check=True)
    r, w = os.pipe()
    os.write(w, stream.stdout[:1500])
    os.close(w)
    scanner = TarScanner("", "NONE")
    with open(tmp_path / "out", "wb") as f:
        _copy._tee(r, f.fileno(), scanner)
    os.close(r)
    assert not scanner.done
    assert (tmp_path / "out").read_bytes() == stream.stdout[:1500]


def test_scanner_for_each_method():
    assert isinstance(stream_mod.scanner_for("tar", "", "NONE"), TarScanner)
    assert isinstance(stream_mod.scanner_for("cpio", "", "NONE"), CpioScanner)
