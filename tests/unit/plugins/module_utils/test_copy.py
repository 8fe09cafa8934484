"""The copy step on a fake data directory made here: which files, in what
order, the archivers and compressors, and cancelling."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
copier = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._copy")
s3 = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._s3")
CONTROL, CopyError, archive, compressor_command, walk, walk_error = (
    copier.CONTROL,
    copier.CopyError,
    copier.archive,
    copier.compressor_command,
    copier.walk,
    copier.walk_error,
)


def touch(root, rel, size=10):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * size)


def test_walk_applies_pg_basebackup_exclusions(tmp_path):
    root = str(tmp_path)
    keep = ["PG_VERSION", "base/1/1259", "base/1/1259_fsm", "base/1/2000_init", "global/1262", "postgresql.conf", "pg_xact/0000"]
    drop = [
        "postmaster.pid",
        "postmaster.opts",
        "backup_label",
        "tablespace_map",
        "pg_wal/000000010000000000000001",
        "pg_wal/archive_status/000000010000000000000001.done",
        "pg_stat_tmp/global.stat",
        "pg_replslot/s/state",
        "base/1/pg_internal.init",
        "base/1/t3_16384",
        "base/1/2000",
        "base/1/2000_fsm",
        "base/1/2000.1",
        "base/pgsql_tmp/pgsql_tmp1.0",
        "pg_subtrans/0000",
        "postgresql.auto.conf.tmp",
    ]
    for rel in keep + drop + [CONTROL]:
        touch(root, rel)
    files, total = walk(root)
    for rel in keep:
        assert rel in files, rel
    for rel in drop:
        assert rel not in files, rel
    # Directories kept empty so the restored cluster has them.
    for d in ("pg_wal", "pg_wal/archive_status", "pg_stat_tmp", "pg_replslot", "pg_subtrans"):
        assert d in files, d
    assert files[-1] == CONTROL, "pg_control must be copied last"
    assert total == 10 * (len(keep) + 1)
    # Each directory comes before its contents (tar/cpio restore permissions in order).
    assert files.index("base") < files.index("base/1") < files.index("base/1/1259")


def test_walk_skips_tablespace_links_and_extra_dirs(tmp_path):
    root = str(tmp_path / "data")
    touch(root, "PG_VERSION")
    touch(root, "stats/x.stat")
    os.makedirs(os.path.join(root, "pg_tblspc"))
    os.symlink("/nonexistent", os.path.join(root, "pg_tblspc", "16384"))
    files, _ = walk(root, extra_empty=("stats",))
    assert "pg_tblspc" in files and "pg_tblspc/16384" not in files
    assert "stats" in files and "stats/x.stat" not in files


def test_tablespace_walk_is_not_treated_as_data_dir(tmp_path):
    root = str(tmp_path)
    touch(root, "PG_15_202209061/16385/16400")
    touch(root, "PG_15_202209061/16385/t5_16401")
    files, _ = walk(root, is_data_dir=False)
    assert "PG_15_202209061/16385/16400" in files
    assert "PG_15_202209061/16385/t5_16401" not in files


def test_compressor_command():
    assert compressor_command("none", None, 2) == []
    assert compressor_command("zstd", 5, 2) == ["zstd", "-q", "-T2", "-5"]
    assert compressor_command("lz4", None, 2) == ["lz4", "-q", "-1"]


@pytest.mark.parametrize("method", ["tar", "cpio"])
def test_symlinked_pg_wal_is_archived_as_an_empty_directory(tmp_path, method):
    """A pg_wal on another volume must never come back as a link to the live WAL."""
    root = str(tmp_path / "data")
    touch(root, "PG_VERSION")
    touch(root, CONTROL)
    wal = tmp_path / "livewal"
    touch(str(wal), "000000010000000000000001")
    touch(str(wal), "archive_status/000000010000000000000001.done")
    os.symlink(str(wal), os.path.join(root, "pg_wal"))
    files, _ = walk(root)
    assert "pg_wal" in files and "pg_wal/archive_status" in files
    assert not any(f.startswith("pg_wal/0") or f.endswith(".done") for f in files)
    out = str(tmp_path / f"base.{method}")
    archive(method, root, files, out, "none", None, 1)
    listing = subprocess.run(
        ["tar", "-tvf", out] if method == "tar" else ["cpio", "-itv", "-F", out], capture_output=True, text=True, check=True
    ).stdout
    wal_lines = [line for line in listing.splitlines() if " pg_wal" in line or " ./pg_wal" in line]
    assert wal_lines, listing
    # Directories only: no link back to the live WAL ("l" type, "->"), no segment.
    assert all(line.startswith("d") and "->" not in line for line in wal_lines), wal_lines


def test_unreadable_directory_is_an_error_not_a_silent_gap(tmp_path):
    with pytest.raises(CopyError, match="cannot read"):
        walk(str(tmp_path / "missing"))
    # What os.walk reports for a directory it cannot list (tests run as root, who reads everything).
    with pytest.raises(CopyError, match="cannot read /d/base/1: Permission denied"):
        walk_error(PermissionError(13, "Permission denied", "/d/base/1"))
    walk_error(FileNotFoundError(2, "No such file or directory", "/d/base/dropped"))  # dropped during the walk: fine


def _spec(root, method: str) -> dict:
    return {**copier.COPY_DEFAULTS, "data_directory": root, "tablespaces": [], "dest": root + ".out", "method": method}


def test_a_file_named_like_the_cpio_trailer_is_refused_for_cpio_only(tmp_path):
    plan_copy = copier.plan_copy
    root = str(tmp_path / "data")
    for rel in ("PG_VERSION", "global/pg_control", "TRAILER!!!"):
        touch(root, rel)
    with pytest.raises(CopyError, match="cannot be copied with cpio"):
        plan_copy(_spec(root, "cpio"))
    assert "TRAILER!!!" in plan_copy(_spec(root, "tar"))["files"]


def test_a_cancelled_copy_stops_between_steps(tmp_path):
    Cancel, hash_tree, run_copy = copier.Cancel, copier.hash_tree, copier.run_copy
    root = str(tmp_path / "data")
    for rel in ("PG_VERSION", "global/pg_control", "base/1/1259"):
        touch(root, rel, 5000)
    os.makedirs(root + ".out")
    cancel = Cancel()
    cancel.fire()
    with pytest.raises(CopyError, match="cancelled"):
        hash_tree(root, ["PG_VERSION", "base/1/1259"], "", "SHA256", 2, cancel)
    with pytest.raises(CopyError, match="cancelled"):
        run_copy({**_spec(root, "tar"), "manifest_checksum": "SHA256"}, cancel=cancel)
    assert os.listdir(root + ".out") == []  # no archive, no .partial left


def test_a_missing_compressor_is_a_copy_error(monkeypatch):
    layout = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._layout")
    monkeypatch.setattr(layout.shutil, "which", lambda name: None)
    with pytest.raises(CopyError, match="compression zstd needs zstd on this host"):
        compressor_command("zstd", 3, 2)
    assert compressor_command("none", None, 2) == []


def test_an_upload_is_written_in_parts_sized_for_the_archive(tmp_path):
    """S3 allows 10,000 parts: with the default 16 MiB a data directory over 156 GiB failed at part
    10,001, after the whole upload. The copy sizes the parts for twice the archive's expected size."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "PG_VERSION").write_text("17\n")
    (root / "f").write_bytes(os.urandom(4096))
    opened = []

    class Writer:
        def __init__(self):
            self.data = b""
            self.bytes_written = 0

        def write(self, chunk):
            self.data += bytes(chunk)
            self.bytes_written += len(chunk)

        def close(self):
            pass

        def abort(self):
            raise AssertionError("aborted")

    class Store:
        def open_write(self, rel, part_size):
            opened.append((rel, part_size, Writer()))
            return opened[-1][2]

        def uri(self, rel):
            return f"s3://bucket/{rel}"

    size = 200 * 1024**3
    part = copier.part_size_for(size)
    assert part * s3.MAX_PARTS >= 2 * size and part % (1024 * 1024) == 0
    r = copier.archive("tar", str(root), ["PG_VERSION", "f"], "base.tar", "none", None, 0, upload=(Store(), "base.tar", part))
    (rel, used, writer) = opened[0]
    assert (rel, used) == ("base.tar", part) and r["bytes"] == len(writer.data) > 4096


def _data_dir(tmp_path) -> str:
    root = str(tmp_path / "data")
    for rel in ("PG_VERSION", "global/pg_control", "base/1/1259", "base/1/2600"):
        touch(root, rel, 5000)
    return root


@pytest.mark.parametrize("method", ["tar", "cpio", "rsync"])
def test_a_socket_in_the_data_directory_is_left_out(tmp_path, method):
    """unix_socket_directories may include the data directory: tar refused the socket (every backup failed),
    rsync copied it. It is left out, as pg_basebackup does."""
    import socket

    root = _data_dir(tmp_path)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(root, ".s.PGSQL.5432"))
    try:
        os.makedirs(root + ".out")
        assert ".s.PGSQL.5432" not in walk(root)[0]
        copier.run_copy({**_spec(root, method), "manifest_checksum": "SHA256"})
        assert ".s.PGSQL.5432" not in _stored_names(root + ".out", method)
    finally:
        sock.close()


@pytest.mark.parametrize("method", ["tar", "rsync"])
def test_a_file_named_in_another_encoding_is_copied(tmp_path, method):
    """A file name that is not UTF-8 (rsync crashed encoding its file list)."""
    root = _data_dir(tmp_path)
    name = os.fsdecode(b"lat\xe9")
    touch(root, name)
    os.makedirs(root + ".out")
    copier.run_copy({**_spec(root, method), "manifest_checksum": "SHA256"})
    assert name in _stored_names(root + ".out", method)


def test_rsync_accepts_a_file_removed_between_the_walk_and_the_copy(tmp_path):
    """A listed file dropped before rsync reaches it (DROP TABLE, VACUUM FULL): rsync exits 23 with its
    summary line, which is as benign as tar's 'File removed before we read it'."""
    root = _data_dir(tmp_path)
    os.makedirs(root + ".out")
    spec = {**_spec(root, "rsync"), "manifest_checksum": "SHA256"}
    plan = copier.plan_copy(spec)
    os.unlink(os.path.join(root, "base/1/2600"))
    copier.run_copy(spec, plan)
    assert "base/1/1259" in _stored_names(root + ".out", "rsync")


def test_cpio_refuses_hard_linked_files_which_it_would_write_after_pg_control(tmp_path):
    """GNU cpio (newc) defers files with several links to the end of the archive: after global/pg_control.
    Shown first with cpio itself, then refused before anything is written; tar keeps the order."""
    root = _data_dir(tmp_path)
    os.link(os.path.join(root, "base/1/1259"), os.path.join(tmp_path, "old-cluster-link"))
    listing = subprocess.run(
        ["cpio", "-o", "-0", "-H", "newc"], cwd=root, input=b"base/1/1259\0global/pg_control\0", capture_output=True
    ).stdout
    names = subprocess.run(["cpio", "-it"], input=listing, capture_output=True).stdout.decode().split()
    assert names == ["global/pg_control", "base/1/1259"], names  # the deferral this guards against
    with pytest.raises(CopyError, match="several hard links .* use method tar or rsync"):
        copier.plan_copy(_spec(root, "cpio"))
    files = copier.plan_copy(_spec(root, "tar"))["files"]
    assert files[-1] == CONTROL and "base/1/1259" in files


def _stored_names(out: str, method: str) -> set:
    if method == "rsync":
        data = os.path.join(out, "data")
        return {os.path.relpath(os.path.join(d, f), data) for d, _s, fs in os.walk(data) for f in fs}
    (archive,) = [n for n in os.listdir(out) if n.startswith("base.")]
    cmd = (
        ["tar", "--quoting-style=literal", "-tf", os.path.join(out, archive)]
        if method == "tar"
        else ["cpio", "-it", "-F", os.path.join(out, archive)]
    )
    listing = subprocess.run(cmd, capture_output=True, check=True).stdout
    return {os.fsdecode(n[2:] if n.startswith(b"./") else n) for n in listing.split(b"\n") if n}


def test_the_changed_blocks_are_staged_where_there_is_room_or_the_copy_refuses_before_writing(tmp_path):
    """A block-level incremental stages its INCREMENTAL files: in the backup's own directory for a local
    repository (not the system's /tmp, often small or in memory), in staging_dir when given, and never
    where they cannot fit (refused before anything is written, naming the setting)."""
    dest = str(tmp_path / "backup")
    os.makedirs(dest)
    spec = {**copier.COPY_DEFAULTS, "dest": dest}
    assert copier.staging_directory(spec) == dest
    assert copier.staging_directory({**spec, "staging_dir": "/srv/stage"}) == "/srv/stage"
    assert copier.staging_directory({**spec, "repository_host": "repo@h"}) == copier.tempfile.gettempdir()
    assert copier.staging_directory({**spec, "dest": "s3://b/p/20261201T000000Z"}) == copier.tempfile.gettempdir()
    assert copier.staging_problem(dest, 100, 3, 8192) is None
    st = os.statvfs(dest)
    why = copier.staging_problem(dest, st.f_bavail * st.f_frsize // 8192 + 1, 0, 8192)
    assert why and "pg_backup_incremental_staging_dir" in why and "MiB free" in why, why
    assert "not a writable directory" in copier.staging_problem(str(tmp_path / "nope"), 100, 3, 8192)
