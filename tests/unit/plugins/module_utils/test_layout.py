"""The repository's on-disk format: backup ids, archive names and their
compression, the compression tools, where WAL lives, and backup.json."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
layout = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._layout")

ARCHIVE_METHODS = ("tar", "cpio")  # rsync writes a directory, not an archive


# -- backup ids


@pytest.mark.parametrize("bid", ["20261129T101500Z", "20261129T101500Z-01", "20261129T101500Z-99"])
def test_valid_backup_ids(bid):
    assert layout.valid_backup_id(bid)
    assert layout.backup_dir("/repo", bid) == f"/repo/{bid}"


@pytest.mark.parametrize(
    "bid", ["", "latest", "../20261129T101500Z", "20261129T101500Z/..", "20261129T101500", "20261129T101500Z-1", None, 20261129]
)
def test_invalid_backup_ids_are_refused(bid):
    assert not layout.valid_backup_id(bid)
    with pytest.raises(layout.LayoutError, match="invalid backup id"):
        layout.backup_dir("/repo", bid)


def test_new_backup_ids_are_unique_within_a_second(tmp_path, monkeypatch):
    frozen = time.gmtime(1795950900)  # 2026-11-29 11:15:00 UTC
    monkeypatch.setattr(layout.time, "gmtime", lambda *a: frozen)
    made = [layout.new_backup_id(str(tmp_path)) for _ in range(3)]
    assert [bid for bid, _path in made] == ["20261129T111500Z", "20261129T111500Z-01", "20261129T111500Z-02"]
    for bid, path in made:
        assert layout.valid_backup_id(bid) and path == str(tmp_path / bid)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    # Sorted by name is sorted by creation.
    assert sorted(bid for bid, _ in made) == [bid for bid, _ in made]


def test_new_backup_id_gives_up_after_99_in_one_second(tmp_path, monkeypatch):
    frozen = time.gmtime(1795950900)
    monkeypatch.setattr(layout.time, "gmtime", lambda *a: frozen)
    for n in range(100):
        (tmp_path / ("20261129T111500Z" + (f"-{n:02d}" if n else ""))).mkdir()
    with pytest.raises(layout.LayoutError, match="cannot create a unique backup directory"):
        layout.new_backup_id(str(tmp_path))


# -- archive names


@pytest.mark.parametrize("method", ARCHIVE_METHODS)
@pytest.mark.parametrize("compression", layout.COMPRESSIONS)
@pytest.mark.parametrize("key", ["base", "16384"])
def test_archive_names_round_trip(key, method, compression):
    name = layout.archive_name(key, method, compression)
    assert layout.parse_archive_name(name) == (key, method, compression)
    assert layout.compression_of_file(name) == compression
    assert name.startswith(f"{key}.{method}")


def test_archive_names_are_the_documented_ones():
    # docs/repository.md: restorable by hand with tar/cpio and the usual tools.
    assert layout.archive_name("base", "tar", "none") == "base.tar"
    assert layout.archive_name("16384", "cpio", "zstd") == "16384.cpio.zst"
    assert layout.archive_name("base", "tar", "gzip") == "base.tar.gz"
    assert layout.archive_name("base", "tar", "lz4") == "base.tar.lz4"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "base",
        "base.tar.bz2",
        "base.zip",
        "base.rsync",
        "foo.tar",
        "-1.tar",
        ".tar",
        "base.TAR",
        "base.tar.",
        "base.tar.gz.partial",
        "base.tar.zst~",
        "16384a.cpio",
        "base.tar.gz.gz",
        "backup.json",
        "backup_manifest",
    ],
)
def test_parse_archive_name_rejects_junk(name):
    assert layout.parse_archive_name(name) is None


def test_find_archives(tmp_path):
    for name in ("base.tar.zst", "16384.tar.zst", "base.cpio", "backup.json", "backup_label", "base.tar.zst.partial"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "16385.tar").mkdir()  # not a file: not an archive
    assert layout.find_archives(str(tmp_path), "tar") == {"base": "base.tar.zst", "16384": "16384.tar.zst"}
    assert layout.find_archives(str(tmp_path), "cpio") == {"base": "base.cpio"}
    assert layout.find_archives(str(tmp_path), "rsync") == {}


def test_find_archives_refuses_two_archives_for_one_key(tmp_path):
    (tmp_path / "16384.tar.gz").write_bytes(b"")
    (tmp_path / "16384.tar.lz4").write_bytes(b"")
    with pytest.raises(layout.LayoutError, match="two archives for 16384") as err:
        layout.find_archives(str(tmp_path), "tar")
    assert "16384.tar.gz" in str(err.value) and "16384.tar.lz4" in str(err.value)
    # Another method's archives do not count against this one.
    assert layout.find_archives(str(tmp_path), "cpio") == {}


@pytest.mark.parametrize(
    "path, compression",
    [
        ("base.tar.gz", "gzip"),
        ("/r/b/16384.cpio.zst", "zstd"),
        ("x.lz4", "lz4"),
        ("base.tar", "none"),
        ("000000010000000000000002", "none"),
        ("/a.gz/base.tar", "none"),
        ("000000010000000000000002.zst", "zstd"),
    ],
)
def test_compression_of_file(path, compression):
    assert layout.compression_of_file(path) == compression


def test_unknown_suffix_is_refused():
    with pytest.raises(layout.LayoutError, match="unknown compression suffix"):
        layout.compression_of_suffix(".bz2")


# -- compression tools


@pytest.mark.parametrize("compression", [c for c in layout.COMPRESSIONS if c != "none"])
def test_compressor_and_read_commands_round_trip(tmp_path, compression):
    """What compressor() writes, read_commands() reads back: with real tools, as setup.sh installs them."""
    data = os.urandom(5000) + b"\0" * 100000
    packed = subprocess.run(layout.compressor(compression, None, 2), input=data, capture_output=True, check=True).stdout
    assert packed != data and len(packed) < len(data)
    path = tmp_path / layout.archive_name("base", "tar", compression)
    path.write_bytes(packed)
    cmd = layout.read_commands(str(path))[0]
    assert subprocess.run(cmd, capture_output=True, check=True).stdout == data
    # From stdin too (the restore pipes a file into it).
    assert subprocess.run(layout.decompressor(str(path)), input=packed, capture_output=True, check=True).stdout == data


def test_read_commands_argument_order(tmp_path):
    for compression in ("zstd", "lz4"):
        path = "/r/-dangerous" + layout.suffix_of(compression)
        cmd = layout.read_commands(path)[0]
        # The options, then "--" so that a name is never read as an option, then the name.
        assert cmd == layout.decompressor(path) + ["--", path]
        assert cmd[0] == compression and cmd.index("--") == len(cmd) - 2
    gz = layout.read_commands("/r/base.tar.gz")[0]
    assert gz[0] in ("pigz", "gzip") and gz[-1] == "/r/base.tar.gz" and "--" not in gz
    assert gz[1:-1] == ["-dc"]
    assert layout.read_commands("/r/base.tar") == [] and layout.decompressor("/r/base.tar") is None


def test_compressor_levels_and_threads():
    assert layout.compressor("none") == []
    zstd = layout.compressor("zstd", None, 4)
    assert zstd[0] == "zstd" and "-T4" in zstd and zstd[-1] == f"-{layout.COMPRESSION['zstd'][3]}"
    assert layout.compressor("lz4", 9)[-1] == "-9"
    gz = layout.compressor("gzip", 1, 3)
    assert gz[-1] == "-1" and (gz[:3] == ["pigz", "-p", "3"] if shutil.which("pigz") else gz[0] == "gzip")


def test_missing_tools_are_named(monkeypatch):
    monkeypatch.setattr(layout.shutil, "which", lambda name: None)
    with pytest.raises(layout.LayoutError, match="compression zstd needs zstd on this host"):
        layout.compressor("zstd", 3, 1)
    with pytest.raises(layout.LayoutError, match="base.tar.gz needs pigz or gzip on this host to be decompressed"):
        layout.read_commands("/r/base.tar.gz")[0]
    assert layout.read_commands("/r/base.cpio") == []  # a plain file needs no tool


def test_gzip_falls_back_when_pigz_is_missing(monkeypatch):
    real = shutil.which
    monkeypatch.setattr(layout.shutil, "which", lambda name: None if name == "pigz" else real(name))
    assert layout.read_commands("/r/base.tar.gz")[0] == ["gzip", "-dc", "/r/base.tar.gz"]
    assert layout.compressor("gzip", 5, 8) == ["gzip", "-5"]


# -- encryption


def _keypair(tmp_path) -> tuple:
    identity = tmp_path / "identity.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], check=True, capture_output=True, text=True).stdout.strip()
    return str(identity), recipient


def test_encrypted_archive_round_trip_needs_the_identity(tmp_path):
    """compress | age -r writes base.tar.zst.age; read_commands decrypts then decompresses, with real tools."""
    identity, recipient = _keypair(tmp_path)
    data = b"pgops-marker-" + os.urandom(3000) + b"\0" * 50000
    path = tmp_path / layout.archive_name("base", "tar", "zstd", "age")
    assert path.name == "base.tar.zst.age" and layout.parse_archive_name(path.name) == ("base", "tar", "zstd")
    with open(path, "wb") as out:
        proc = subprocess.run(layout.compressor("zstd", None, 1), input=data, capture_output=True, check=True)
        out.write(subprocess.run(layout.encryptor("age", [recipient]), input=proc.stdout, capture_output=True, check=True).stdout)
    assert b"pgops-marker" not in path.read_bytes() and path.read_bytes().startswith(b"age-encryption.org/v1")
    assert layout.compression_of_file(str(path)) == "zstd" and layout.is_encrypted(str(path))
    layout.set_age_identity(None)
    with pytest.raises(layout.LayoutError, match="encrypted with age: give the private key"):
        layout.read_commands(str(path))
    layout.set_age_identity(identity)
    try:
        cmds = layout.read_commands(str(path))
        assert [c[0] for c in cmds] == ["age", "zstd"] and cmds[0][-1] == str(path)
        with layout.PlainReader(str(path)) as stream:
            assert stream.read() == data
        # The wrong key: age's own message comes out, naming the file.
        (tmp_path / "other").mkdir()
        other, _ = _keypair(tmp_path / "other")
        layout.set_age_identity(other)
        with pytest.raises(layout.LayoutError, match=r"age failed on base.tar.zst.age \(exit 1\).*no identity matched"):
            with layout.PlainReader(str(path)) as stream:
                stream.read()
    finally:
        layout.set_age_identity(None)


def test_bad_recipients_are_refused_before_anything_runs(monkeypatch):
    good = "age1" + "q" * 58
    assert layout.bad_recipients([good]) is None
    assert layout.bad_recipients(["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx user@host"]) is None
    assert "at least one public key" in layout.bad_recipients([])
    assert "'AGE-SECRET-KEY-1XYZ'" in layout.bad_recipients([good, "AGE-SECRET-KEY-1XYZ"])
    with pytest.raises(layout.LayoutError, match="not an age public key"):
        layout.encryptor("age", ["age1short"])
    with pytest.raises(layout.LayoutError, match="unknown encryption 'gpg'"):
        layout.encryptor("gpg", [good])
    assert layout.encryptor("none", []) == []
    monkeypatch.setattr(layout.shutil, "which", lambda name: None)
    with pytest.raises(layout.LayoutError, match="needs the age tool on this host"):
        layout.encryptor("age", [good])


def test_stored_wal_names_may_be_encrypted():
    assert layout.parse_stored_wal("000000010000000000000003.zst.age") == ("000000010000000000000003", "segment")
    assert layout.parse_stored_wal("00000002.history.age") == (None, "history")
    assert layout.parse_stored_wal("000000010000000000000003.zst.age.sha256") is None
    assert ".zst.age" in layout.STORED_SUFFIXES and "" in layout.STORED_SUFFIXES


# -- WAL


def test_wal_dir():
    assert layout.wal_dir("/repo", "7441234567890123456") == "/repo/wal/7441234567890123456"
    assert layout.wal_dir("/repo", 7441234567890123456) == "/repo/wal/7441234567890123456"


@pytest.mark.parametrize("sysid", ["", "../x", "744x", "-1", "7441 2", None, "/etc"])
def test_wal_dir_refuses_a_non_numeric_identifier(sysid):
    with pytest.raises(layout.LayoutError, match="invalid system identifier"):
        layout.wal_dir("/repo", sysid)


# -- backup.json


def test_read_backup(tmp_path):
    assert layout.read_backup(str(tmp_path / "missing")) is None
    assert layout.read_backup(str(tmp_path)) is None  # no backup.json
    for text in ("{not json", "[1, 2]", '"a string"', "null", "", "\xff\xfe"):
        (tmp_path / "backup.json").write_bytes(text.encode("latin-1"))
        assert layout.read_backup(str(tmp_path)) is None, text
    (tmp_path / "backup.json").write_text('{"status": "complete"}')
    assert layout.read_backup(str(tmp_path)) == {"status": "complete"}


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", "42"])
def test_update_backup_refuses_missing_or_non_object_json(tmp_path, content):
    if content is not None:
        (tmp_path / "backup.json").write_text(content)
    with pytest.raises(layout.LayoutError, match="backup.json is missing or not a JSON object; not updating it"):
        layout.update_backup(str(tmp_path), status="failed")
    if content is None:
        assert not (tmp_path / "backup.json").exists()
    else:
        assert (tmp_path / "backup.json").read_text() == content  # left as it was


def test_update_backup_is_atomic_and_private(tmp_path, add_backup):
    d = add_backup(tmp_path, "20261129T101500Z", "complete", stop_lsn="0/3000100")
    doc = layout.update_backup(d, verification={"verified": True, "problems_count": 0})
    assert doc["verification"]["verified"] is True and doc["stop_lsn"] == "0/3000100"
    with open(os.path.join(d, "backup.json")) as f:
        assert json.load(f) == doc
    assert stat.S_IMODE(os.stat(os.path.join(d, "backup.json")).st_mode) == 0o600
    assert not [n for n in os.listdir(d) if ".tmp." in n]
    layout.update_backup(d, drill={"passed": False})
    assert layout.read_backup(d)["drill"] == {"passed": False} and layout.read_backup(d)["verification"]["verified"]


def test_write_backup_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        layout.write_backup(str(tmp_path), {"id": "x", "status": "running"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "backup.json").st_mode) == 0o600
    assert layout.read_backup(str(tmp_path)) == {"id": "x", "status": "running"}


def test_write_backup_gives_the_file_to_the_directory_owner(tmp_path):
    assert os.geteuid() == 0, "the test suite runs as root (scripts/test.sh): it needs to own files as another user"
    mine = tmp_path / "root_owned"
    mine.mkdir()
    layout.write_backup(str(mine), {"status": "running"})
    assert os.stat(mine / "backup.json").st_uid == 0
    theirs = tmp_path / "repo_user"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    layout.write_backup(str(theirs), {"status": "running"})
    st = os.stat(theirs / "backup.json")
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    # Rewritten by root later, it stays the repository user's.
    layout.update_backup(str(theirs), status="complete")
    st = os.stat(theirs / "backup.json")
    assert (st.st_uid, st.st_gid) == (65534, 65534) and layout.read_backup(str(theirs))["status"] == "complete"


# -- sizes


def test_disk_usage_counts_hard_links_once_and_never_follows_links(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(os.urandom(64 * 1024))
    one = layout.disk_usage(str(tmp_path / "d"))
    os.link(tmp_path / "d" / "a", tmp_path / "d" / "b")
    big = tmp_path / "elsewhere"
    big.write_bytes(os.urandom(256 * 1024))
    os.symlink(big, tmp_path / "d" / "link")
    assert layout.disk_usage(str(tmp_path / "d")) - one < 16 * 1024  # a directory entry and a link, not 64 or 256 KiB
    assert one >= 64 * 1024
    assert layout.disk_usage(str(tmp_path / "missing")) == 0
