"""Manifest text, checksums, parsing, comparing and the streaming archive readers, without a server."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
mf = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._manifest")
disk = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._layout")

NOT_UTF8 = os.fsdecode(b"base/1/caf\xe9")  # a Latin-1 name: no valid UTF-8


# -- manifest text


def entries():
    return [
        mf.FileEntry("global/pg_control", 8192, 1795950900, "SHA256", "ab" * 32),
        mf.FileEntry("backup_label", 226, 1795950960, "SHA256", "cd" * 32),
    ]


def test_build_manifest_is_byte_for_byte_postgres_layout():
    data = mf.build_manifest(entries(), [(1, "0/2000028", "0/2000100")])
    body = (
        '{ "PostgreSQL-Backup-Manifest-Version": 1,\n'
        '"Files": [\n'
        '{ "Path": "backup_label", "Size": 226, "Last-Modified": "2026-11-29 11:16:00 GMT", '
        f'"Checksum-Algorithm": "SHA256", "Checksum": "{"cd" * 32}" }},\n'
        '{ "Path": "global/pg_control", "Size": 8192, "Last-Modified": "2026-11-29 11:15:00 GMT", '
        f'"Checksum-Algorithm": "SHA256", "Checksum": "{"ab" * 32}" }}\n'
        "],\n"
        '"WAL-Ranges": [\n'
        '{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }\n'
        "],\n"
    ).encode()
    assert data == body + f'"Manifest-Checksum": "{hashlib.sha256(body).hexdigest()}"}}\n'.encode()
    json.loads(data)  # valid JSON too


def test_version_2_has_system_identifier_second():
    data = mf.build_manifest(entries(), [(1, 0x2000028, 0x2000100)], version=2, system_identifier="7441234567890123456")
    assert data.startswith(b'{ "PostgreSQL-Backup-Manifest-Version": 2,\n"System-Identifier": 7441234567890123456,\n"Files": [')
    m = mf.parse_manifest(data)
    assert (m.version, m.system_identifier) == (2, 7441234567890123456)
    with pytest.raises(ValueError, match="system identifier"):
        mf.build_manifest(entries(), [(1, 1, 2)], version=2)


def test_checksum_none_and_lsn_normalised():
    e = [mf.FileEntry("PG_VERSION", 3, 0)]
    data = mf.build_manifest(e, [(3, "00000001/0A000028", "1/B000100")])
    assert b'"Checksum' not in data.split(b"\n")[2]
    assert b'"Start-LSN": "1/A000028", "End-LSN": "1/B000100"' in data
    m = mf.parse_manifest(data)
    assert m.files["PG_VERSION"].algorithm is None
    assert m.wal_ranges == [{"timeline": 3, "start_lsn": "1/A000028", "end_lsn": "1/B000100"}]


def test_encoded_path_for_names_that_are_not_utf8():
    e = [mf.FileEntry(NOT_UTF8, 1, 0, "CRC32C", "00000000"), mf.FileEntry('base/1/é "q"\t', 2, 0)]
    data = mf.build_manifest(e, [(1, "0/1", "0/2")])
    assert b'"Encoded-Path": "626173652f312f636166e9"' in data
    assert '"Path": "base/1/é \\"q\\"\\t"'.encode() in data
    m = mf.parse_manifest(data)
    assert set(m.files) == {NOT_UTF8, 'base/1/é "q"\t'}


def test_empty_file_list():
    m = mf.parse_manifest(mf.build_manifest([], [(1, "0/1", "0/2")]))
    assert m.files == {} and m.total_bytes == 0


# -- parsing errors (as strict as pg_verifybackup)


def good() -> bytes:
    return mf.build_manifest(entries(), [(1, "0/2000028", "0/2000100")])


def resign(data: bytes) -> bytes:
    """Recompute Manifest-Checksum after editing the body."""
    body = data[: data.rindex(b"\n", 0, len(data) - 1) + 1]
    return body + f'"Manifest-Checksum": "{hashlib.sha256(body).hexdigest()}"}}\n'.encode()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.replace(b'"Size": 226', b'"Size": 227'), "checksum mismatch"),
        (lambda d: d[:-1], "not newline-terminated"),
        (lambda d: resign(d.replace(b'"Size": 226, ', b'"Size": 226, "Mode": 1, ')), "unexpected file field 'Mode'"),
        (lambda d: resign(d.replace(b'Version": 1', b'Version": 3')), "unexpected manifest version"),
        (lambda d: resign(d.replace(b"global/pg_control", b"backup_label")), "duplicate path"),
        (lambda d: resign(d.replace(b'"Checksum": "cdcd', b'"Checksum": "cd')), "invalid SHA256 checksum"),
        (lambda d: resign(d.replace(b'"Checksum-Algorithm": "SHA256"', b'"Checksum-Algorithm": "MD5"')), "unrecognized"),
        (lambda d: resign(d.replace(b'"Path"', b'"Encoded-Path"', 1)), "could not decode"),
        (lambda d: resign(d.replace(b"{ ", b'{ "Extra": 1, ', 1)), "first field"),
        (lambda d: d.replace(b'"Manifest-Checksum"', b'"Manifest-Checksu"'), "unexpected field"),
        (lambda d: d[: d.rindex(b"],\n")] + b"]}\n", "no checksum"),
        (lambda d: b"{}\n", "at least 2 lines"),
    ],
)
def test_parse_rejects(edit, message):
    with pytest.raises(mf.ManifestError, match=message):
        mf.parse_manifest(edit(good()))


def test_parse_roundtrip():
    m = mf.parse_manifest(good())
    assert m.version == 1
    assert m.files["backup_label"] == mf.FileEntry("backup_label", 226, 1795950960, "SHA256", "cd" * 32)
    assert m.total_bytes == 226 + 8192
    assert m.checksum == hashlib.sha256(good()[: good().rindex(b"\n", 0, len(good()) - 1) + 1]).hexdigest()


# -- comparing


def test_compare_names_every_problem():
    m = mf.parse_manifest(good())
    found = [
        mf.FileEntry("backup_label", 226, 0, "SHA256", "ee" * 32),  # checksum
        mf.FileEntry("base/1/99999", 5, 0),  # extra
    ]
    assert mf.compare(m, found) == [
        {"path": "backup_label", "problem": "checksum", "expected": "cd" * 32, "actual": "ee" * 32},
        {"path": "base/1/99999", "problem": "extra", "expected": None, "actual": 5},
        {"path": "global/pg_control", "problem": "missing", "expected": 8192, "actual": None},
    ]
    assert mf.compare(
        m, [mf.FileEntry("backup_label", 1, 0), mf.FileEntry("global/pg_control", 8192, 0, "SHA256", "ab" * 32)]
    ) == [{"path": "backup_label", "problem": "size", "expected": 226, "actual": 1}]


def test_wanted_by_skips_checksum_when_size_differs():
    want = mf.wanted_by(mf.parse_manifest(good()))
    assert want("backup_label", 226) == "SHA256"
    assert want("backup_label", 1) is None
    assert want("nope", 1) is None


# -- layouts on disk


LABEL = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nLABEL: t\n"


def make_datadir(path, with_label=True):
    """A small fake data directory (contents do not matter to a manifest)."""
    files = {
        "PG_VERSION": b"15\n",
        "global/pg_control": os.urandom(8192),
        "base/1/1259": os.urandom(16384),
        "base/1/1259_fsm": b"\0" * 24576,
        "base/5/16384": b"",
        "pg_wal/000000010000000000000002": b"x" * 100,  # never listed
        "pg_wal/archive_status/x.done": b"",
        "postgresql.auto.conf": b"# auto\n",
    }
    if with_label:
        files["backup_label"] = LABEL
    for name, data in files.items():
        p = os.path.join(path, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(path, "pg_tblspc"), exist_ok=True)
    os.utime(os.path.join(path, "PG_VERSION"), (1795950900, 1795950900))
    return files


def make_tablespace(path):
    files = {"PG_15_202209061/5/16390": os.urandom(8192), "PG_15_202209061/5/16390_vm": b"\0" * 8192}
    for name, data in files.items():
        p = os.path.join(path, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return files


def expected_paths(data_files, ts_files=None, oid="16400"):
    paths = {p for p in data_files if not p.startswith("pg_wal/")}
    paths |= {f"pg_tblspc/{oid}/{p}" for p in ts_files or {}}
    return paths


def rsync_backup(tmp_path):
    root = tmp_path / "20261129T101500Z"
    data = root / "data"
    data.mkdir(parents=True)
    files = make_datadir(str(data))
    with open(data / "tablespace_map", "w") as f:
        f.write("16400 /srv/ts\n")
    files["tablespace_map"] = b""
    ts = make_tablespace(str(root / "tablespaces" / "16400"))
    os.symlink("../../tablespaces/16400", data / "pg_tblspc" / "16400")
    info = {"method": "rsync", "tablespaces": [{"oid": 16400, "name": "ts", "location": "/srv/ts"}]}
    return str(root), info, expected_paths(files, ts)


def manifest_of(layout, algorithm: str):
    """The manifest of what the layout holds now, as the backup would have written it."""
    entries, errors = mf.collect_entries(layout, algorithm)
    assert errors == []
    return mf.parse_manifest(mf.build_manifest(entries, [(1, "0/2000028", "0/2000100")]))


def test_rsync_layout_entries_follow_the_tablespace_link(tmp_path):
    root, info, paths = rsync_backup(tmp_path)
    layout = mf.detect_layout(root, info)
    assert layout.method == "rsync" and layout.data_dir == os.path.join(root, "data")
    assert layout.manifest_paths == [os.path.join(root, "data", "backup_manifest"), os.path.join(root, "backup_manifest")]
    entries, errors = mf.collect_entries(layout, "SHA256")
    assert errors == []
    assert {e.path for e in entries} == paths
    by_path = {e.path: e for e in entries}
    assert by_path["PG_VERSION"].mtime == 1795950900
    assert by_path["PG_VERSION"].checksum == hashlib.sha256(b"15\n").hexdigest()


def test_rsync_layout_refuses_a_link_outside_the_backup(tmp_path):
    root, info, _ = rsync_backup(tmp_path)
    outside = tmp_path / "live_ts"
    make_tablespace(str(outside))
    link = os.path.join(root, "data", "pg_tblspc", "16400")
    os.unlink(link)
    os.symlink(str(outside), link)
    _, errors = mf.collect_entries(mf.detect_layout(root, info), "NONE")
    assert errors and errors[0]["path"] == "pg_tblspc/16400" and "outside the backup" in errors[0]["actual"]


def test_missing_tablespace_is_named(tmp_path):
    root, info, _ = rsync_backup(tmp_path)
    os.unlink(os.path.join(root, "data", "pg_tblspc", "16400"))
    assert mf.detect_layout(root, info).missing == ["data/pg_tblspc/16400"]


def test_verify_rsync_layout_finds_each_kind_of_problem(tmp_path):
    root, info, paths = rsync_backup(tmp_path)
    layout = mf.detect_layout(root, info)
    manifest = manifest_of(layout, "CRC32C")
    problems, files, size = mf.verify_layout(layout, manifest)
    assert problems == [] and files == len(paths)
    data = os.path.join(root, "data")
    with open(os.path.join(data, "base/1/1259"), "r+b") as f:  # flip one byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    os.unlink(os.path.join(root, "tablespaces/16400/PG_15_202209061/5/16390_vm"))
    with open(os.path.join(data, "base/1/99999"), "wb") as f:
        f.write(b"new")
    with open(os.path.join(data, "base/1/1259_fsm"), "ab") as f:
        f.write(b"\0")
    with open(os.path.join(data, "pg_wal/000000010000000000000003"), "wb") as f:
        f.write(b"WAL is never checked")
    problems, _, _ = mf.verify_layout(mf.detect_layout(root, info), manifest)
    assert [(p["path"], p["problem"]) for p in problems] == [
        ("base/1/1259", "checksum"),
        ("base/1/1259_fsm", "size"),
        ("base/1/99999", "extra"),
        ("pg_tblspc/16400/PG_15_202209061/5/16390_vm", "missing"),
    ]
    assert problems[1]["expected"] == 24576 and problems[1]["actual"] == 24577


def test_non_utf8_names_on_disk(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make_datadir(str(data))
    with open(os.path.join(os.fsencode(str(data)), b"base/1/caf\xe9"), "wb") as f:
        f.write(b"x")
    layout = mf.detect_layout(str(tmp_path), {"method": "rsync"})
    entries, errors = mf.collect_entries(layout, "SHA256")
    assert not errors and NOT_UTF8 in {e.path for e in entries}
    manifest = mf.parse_manifest(mf.build_manifest(entries, [(1, "0/1", "0/2")]))
    assert b"Encoded-Path" in mf.build_manifest(entries, [(1, "0/1", "0/2")])
    assert mf.verify_layout(layout, manifest)[0] == []


# -- archives


def tar_of(src: str, dest: str, compression: str | None = None):
    """GNU tar of a directory the way the backup role makes it: -C dir ... ."""
    cmd = ["tar", "-C", src, "-cf", dest, "--exclude=./pg_wal/*"]
    if compression:
        cmd.insert(1, {"gz": "--gzip", "zst": "--zstd", "lz4": "--use-compress-program=lz4"}[compression])
    cmd.append(".")
    subprocess.run(cmd, check=True)


def cpio_of(src: str, dest: str, compression: str | None = None):
    listing = subprocess.run(
        ["find", ".", "(", "-path", "./pg_wal/*", ")", "-prune", "-o", "-print"], cwd=src, capture_output=True, check=True
    ).stdout
    out = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=src, input=listing, capture_output=True, check=True).stdout
    if compression:
        out = subprocess.run({"gz": ["gzip", "-c"], "zst": ["zstd", "-qc"], "lz4": ["lz4", "-qc"]}[compression],
                             input=out, capture_output=True, check=True).stdout  # fmt: skip
    with open(dest, "wb") as f:
        f.write(out)


def archive_backup(tmp_path, kind: str, compression: str | None):
    src = tmp_path / "src"
    ts_src = tmp_path / "ts"
    files = make_datadir(str(src), with_label=False)
    ts = make_tablespace(str(ts_src))
    os.symlink(str(ts_src), src / "pg_tblspc" / "16400")  # as in a live data directory
    os.link(src / "base/1/1259", src / "base/1/1259_hardlink")
    files["base/1/1259_hardlink"] = b""
    root = tmp_path / "backup"
    root.mkdir()
    suffix = f".{compression}" if compression else ""
    make = tar_of if kind == "tar" else cpio_of
    make(str(src), str(root / f"base.{kind}{suffix}"), compression)
    make(str(ts_src), str(root / f"16400.{kind}{suffix}"), compression)
    (root / "backup_label").write_bytes(LABEL)
    (root / "tablespace_map").write_text("16400 /srv/ts\n")
    files.update(backup_label=LABEL, tablespace_map=b"")
    info = {"method": kind, "tablespaces": [{"oid": "16400"}], "files": [f"base.{kind}{suffix}", f"16400.{kind}{suffix}"]}
    return str(root), info, expected_paths(files, ts), str(src)


ARCHIVE_CASES = [(kind, comp) for kind in ("tar", "cpio") for comp in (None, "gz", "zst", "lz4")]


@pytest.mark.parametrize("kind, compression", ARCHIVE_CASES)
def test_archive_backups_match_the_directory(tmp_path, kind, compression):
    # scripts/setup.sh installs these: a missing tool is a broken setup, not a reason to skip.
    assert kind != "cpio" or shutil.which("cpio"), "cpio is not installed (scripts/setup.sh installs it)"
    name = disk.compression_of_suffix(f".{compression}" if compression else "")
    assert name == "none" or shutil.which(disk.COMPRESSION[name][2][-1][0]), f"{name} tool missing"
    root, info, paths, src = archive_backup(tmp_path, kind, compression)
    layout = mf.detect_layout(root, info)
    assert (layout.method, layout.compression) == (kind, name)
    assert layout.missing == []
    entries, errors = mf.collect_entries(layout, "SHA256")
    assert errors == []
    assert {e.path for e in entries} == paths
    by_path = {e.path: e for e in entries}
    with open(os.path.join(src, "base/1/1259"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert by_path["base/1/1259"].checksum == digest == by_path["base/1/1259_hardlink"].checksum
    assert by_path["PG_VERSION"].mtime == 1795950900
    assert by_path["base/5/16384"].size == 0
    # The same files read from the plain directory give the same manifest entries.
    plain = {e.path: (e.size, e.checksum) for e in mf.scan_directory(src, "", lambda p, s: "SHA256", [], skip=mf.excluded)
             if not e.path.startswith("pg_tblspc/")}  # fmt: skip
    assert {p: v for p, v in ((e.path, (e.size, e.checksum)) for e in entries) if p in plain} == plain
    manifest = mf.parse_manifest(mf.build_manifest(entries, [(1, "0/2000028", "0/2000100")]))
    assert mf.verify_layout(layout, manifest)[0] == []


def test_tar_corrupted_member_and_missing_archive(tmp_path):
    root, info, _, _ = archive_backup(tmp_path, "tar", None)
    layout = mf.detect_layout(root, info)
    manifest = manifest_of(layout, "SHA256")
    base = os.path.join(root, "base.tar")
    with tarfile.open(base) as tf:
        offset = tf.getmember("./global/pg_control").offset_data
    with open(base, "r+b") as f:
        f.seek(offset + 10)
        b = f.read(1)
        f.seek(offset + 10)
        f.write(bytes([b[0] ^ 1]))
    os.unlink(os.path.join(root, "16400.tar"))
    problems, _, _ = mf.verify_layout(mf.detect_layout(root, info), manifest)
    kinds = [(p["path"], p["problem"]) for p in problems]
    assert kinds[0] == ("16400.tar", "missing")
    assert ("global/pg_control", "checksum") in kinds
    assert ("pg_tblspc/16400/PG_15_202209061/5/16390", "missing") in kinds


def test_cpio_corrupted_member(tmp_path):
    root, info, _, _ = archive_backup(tmp_path, "cpio", None)
    layout = mf.detect_layout(root, info)
    manifest = manifest_of(layout, "CRC32C")
    base = os.path.join(root, "base.cpio")
    with open(base, "rb") as f:
        offset = next(m.offset for m in mf.iter_cpio(f) if mf.member_name(os.fsdecode(m.name)) == "base/1/1259_fsm")
    with open(base, "r+b") as f:
        f.seek(offset + 4000)
        f.write(b"\1")
    problems, _, _ = mf.verify_layout(mf.detect_layout(root, info), manifest)
    assert [(p["path"], p["problem"]) for p in problems] == [("base/1/1259_fsm", "checksum")]


def test_truncated_and_garbage_archives_are_unreadable(tmp_path):
    root, info, _, _ = archive_backup(tmp_path, "tar", "zst")
    layout = mf.detect_layout(root, info)
    manifest = manifest_of(layout, "SHA256")
    base = os.path.join(root, "base.tar.zst")
    size = os.path.getsize(base)
    with open(base, "r+b") as f:
        f.truncate(size // 2)
    with open(os.path.join(root, "16400.tar.zst"), "wb") as f:
        f.write(b"not zstd at all" * 10)
    problems, _, _ = mf.verify_layout(mf.detect_layout(root, info), manifest)
    unreadable = {p["path"]: p["actual"] for p in problems if p["problem"] == "unreadable"}
    assert set(unreadable) == {"base.tar.zst", "16400.tar.zst"}
    assert "zstd failed" in unreadable["16400.tar.zst"]
    assert any(p["problem"] == "missing" for p in problems)


def test_cpio_reader_rejects_other_formats():
    with pytest.raises(mf.ArchiveError, match="not a cpio newc archive"):
        list(mf.iter_cpio(io.BytesIO(b"070707" + b"0" * 200)))  # old portable format
    with pytest.raises(mf.ArchiveError, match="unexpected end"):
        list(mf.iter_cpio(io.BytesIO(b"0707")))


def test_gzip_stream_and_label_at_root_wins(tmp_path):
    # A base.tar that also holds a backup_label (a stale one): the one at the backup root is used.
    src = tmp_path / "src"
    make_datadir(str(src), with_label=True)
    (src / "backup_label").write_bytes(b"stale")
    root = tmp_path / "b"
    root.mkdir()
    tar_of(str(src), str(root / "base.tar.gz"), "gz")
    (root / "backup_label").write_bytes(LABEL)
    layout = mf.detect_layout(str(root))
    entries, errors = mf.collect_entries(layout, "SHA256")
    assert not errors
    label = [e for e in entries if e.path == "backup_label"]
    assert len(label) == 1 and label[0].size == len(LABEL)
    assert layout.notes and "backup_label" in layout.notes[0]
    with gzip.open(root / "base.tar.gz") as f:
        assert f.read(1)  # a real gzip file


def test_layout_detection(tmp_path):
    with pytest.raises(disk.LayoutError, match="is not a backup"):
        mf.detect_layout(str(tmp_path))
    (tmp_path / "base.tar").write_bytes(b"")
    (tmp_path / "base.tar.zst").write_bytes(b"")
    with pytest.raises(disk.LayoutError, match="two archives for base"):
        mf.detect_layout(str(tmp_path))
    os.unlink(tmp_path / "base.tar")
    layout = mf.detect_layout(str(tmp_path), {"method": "tar", "files": ["base.tar.zst", "16385.tar.zst"]})
    assert layout.missing == ["16385.tar.zst"]
    assert mf.detect_layout(str(tmp_path), {"method": "cpio"}).missing == ["base.cpio"]
    with pytest.raises(disk.LayoutError, match="unknown backup method"):
        mf.detect_layout(str(tmp_path), {"method": "zip"})
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "PG_VERSION").write_text("17\n")
    assert mf.detect_layout(str(plain)).method == "plain"
