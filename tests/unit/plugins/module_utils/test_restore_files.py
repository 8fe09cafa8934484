"""The file work of a restore, without a server: target directories (checked, prepared, put back), a backup's
sources, archive extraction with each decompressor, tidying the restored data directory, its configuration
files, and the WAL archive check."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
files = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._restore_files")
server = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._restore_server")
RestoreError = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._restore_plan").RestoreError


# -- target directories


def test_absent_and_empty_targets_are_accepted_and_non_empty_refused(tmp_path):
    backup = tmp_path / "repo" / "20261129T101500Z"
    backup.mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    assert files.check_targets(str(tmp_path / "absent"), [], False, str(backup)) == [(str(tmp_path / "absent"), "absent")]
    assert files.check_targets(str(empty), [], False, str(backup)) == [(str(empty), "empty")]
    with pytest.raises(RestoreError, match=r"not empty \(keep.txt\).*force"):
        files.check_targets(str(full), [], False, str(backup))
    assert files.check_targets(str(full), [], True, str(backup)) == [(str(full), "not_empty")]
    assert (full / "keep.txt").read_text() == "precious"  # checking changes nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(RestoreError, match="not a directory"):
        files.check_targets(str(tmp_path / "file"), [], True, str(backup))
    with pytest.raises(RestoreError, match="overlaps the backup"):
        files.check_targets(str(backup / "data"), [], True, str(backup))
    ts = [{"oid": "16390", "path": str(tmp_path / "absent" / "ts"), "location": "/old"}]
    with pytest.raises(RestoreError, match="inside the data directory"):
        files.check_targets(str(tmp_path / "absent"), ts, False, str(backup))


@pytest.fixture
def fake_postmaster(tmp_path):
    """A process whose cwd is a data directory, named in its postmaster.pid (as a running server's is)."""
    data = tmp_path / "live"
    data.mkdir()
    (data / "PG_VERSION").write_text("15\n")
    proc = subprocess.Popen(["sleep", "60"], cwd=data)
    (data / "postmaster.pid").write_text(f"{proc.pid}\n{data}\n")
    yield data
    proc.kill()
    proc.wait()


def test_a_running_server_is_never_restored_over_even_with_force(tmp_path, fake_postmaster):
    assert server.running_postmaster(str(fake_postmaster))
    with pytest.raises(RestoreError, match="running PostgreSQL server"):
        files.check_targets(str(fake_postmaster), [], True, str(tmp_path / "backup"))
    assert (fake_postmaster / "PG_VERSION").exists()


def test_tablespaces_of_the_running_original_are_refused(tmp_path, fake_postmaster):
    ts = [{"oid": "16390", "path": str(tmp_path / "ts"), "location": str(tmp_path / "ts")}]
    live = {"data_directory": str(fake_postmaster)}
    with pytest.raises(RestoreError, match="original server .* is using; map it elsewhere"):
        files.check_targets(str(tmp_path / "new"), ts, True, str(tmp_path / "backup"), live=live)
    moved = [dict(ts[0], path=str(tmp_path / "ts2"))]
    assert len(files.check_targets(str(tmp_path / "new"), moved, False, str(tmp_path / "backup"), live=live)) == 2


def test_force_never_empties_a_directory_that_holds_a_running_server_or_the_originals_tablespace(tmp_path, fake_postmaster):
    """A target one level too high (the parent of a live data directory, or of the original's tablespace)
    is refused before anything is removed: force empties the whole tree."""
    backup = "/nonexistent/pgops-repository/20261129T101500Z"
    (tmp_path / "other").mkdir()
    with pytest.raises(RestoreError, match=r"holds the data directory .*live of a running PostgreSQL server.*even with force"):
        files.check_targets(str(tmp_path), [], True, backup)
    assert (fake_postmaster / "PG_VERSION").exists()
    spaces_root = tmp_path / "spaces"
    (spaces_root / "ts").mkdir(parents=True)
    (spaces_root / "ts" / "PG_15_202209061").mkdir()
    ts = [{"oid": "16390", "path": str(tmp_path / "elsewhere"), "location": str(spaces_root / "ts")}]
    live = {"data_directory": str(fake_postmaster)}
    with pytest.raises(RestoreError, match=r"overlaps .*tablespace 16390 of the running original server"):
        files.check_targets(str(spaces_root), ts, True, backup, live=live)
    with pytest.raises(RestoreError, match=r"overlaps .*tablespace 16390 of the running original server"):
        files.check_targets(str(spaces_root / "ts" / "restored"), ts, True, backup, live=live)
    assert (spaces_root / "ts" / "PG_15_202209061").is_dir()
    # Once the server has stopped, the same directory may be emptied with force.
    os.remove(fake_postmaster / "postmaster.pid")
    assert files.check_targets(str(tmp_path), [], True, backup) == [(str(tmp_path), "not_empty")]


def test_undo_puts_targets_back(tmp_path):
    created = tmp_path / "new"
    files.prepare_directory(str(created), "absent")
    assert oct(created.stat().st_mode & 0o777) == "0o700"
    (created / "half").write_text("x")
    files.undo_directory(str(created), "absent")
    assert not created.exists()
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "sub").mkdir()
    files.prepare_directory(str(existing), "not_empty")
    assert os.listdir(existing) == []
    (existing / "half").write_text("x")
    assert files.undo_directory(str(existing), "empty") == []
    assert existing.exists() and os.listdir(existing) == []


def test_a_mount_points_lost_and_found_stays_and_what_cannot_be_removed_is_said(tmp_path, monkeypatch):
    """A target that is a mount point holds the file system's lost+found: it counts as empty, is never
    removed, and does not stop the undo of what a failed restore wrote beside it. What the undo cannot
    remove is returned (the run says so instead of claiming the target was put back)."""
    mount = tmp_path / "mnt"
    (mount / "lost+found").mkdir(parents=True)
    assert files.directory_state(str(mount))[0] == "empty"
    (mount / "base").mkdir()
    (mount / "zz_partial").write_text("x")
    assert files.undo_directory(str(mount), "empty") == []
    assert os.listdir(mount) == ["lost+found"]
    for name in ("a_stuck", "b_base"):
        (mount / name).mkdir()
    real = files.shutil.rmtree

    def rmtree(path, *a, **kw):
        if path.endswith("a_stuck"):
            raise PermissionError(13, "Permission denied", path)
        return real(path, *a, **kw)

    monkeypatch.setattr(files.shutil, "rmtree", rmtree)
    left = files.undo_directory(str(mount), "empty")
    assert len(left) == 1 and "a_stuck: Permission denied" in left[0], left
    assert sorted(os.listdir(mount)) == ["a_stuck", "lost+found"]  # the rest was removed after the failure


# -- the backup's files


def make_tree(root):
    (root / "base" / "1").mkdir(parents=True)
    (root / "PG_VERSION").write_text("15\n")
    (root / "postgresql.conf").write_text("port = 6543\n")
    (root / "base" / "1" / "1259").write_bytes(os.urandom(20000))
    (root / "pg_wal").mkdir()
    return root


def tree(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


COMPRESSIONS = {"": None, ".gz": ["gzip", "-c"], ".zst": ["zstd", "-q", "-c"], ".lz4": ["lz4", "-q", "-c"]}


@pytest.mark.parametrize("method", ["tar", "cpio"])
@pytest.mark.parametrize("suffix", list(COMPRESSIONS))
def test_archives_are_extracted_with_the_right_decompressor(tmp_path, method, suffix):
    src = make_tree(tmp_path / "src")
    plain = tmp_path / f"base.{method}"
    if method == "tar":
        # "./" prefixed member names, as GNU tar writes them with -C dir .
        subprocess.run(["tar", "-C", str(src), "-cf", str(plain), "."], check=True)
    else:
        names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=src, capture_output=True, text=True, check=True).stdout
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-O", str(plain)], cwd=src, input=names, text=True, check=True)
    archive = tmp_path / f"base.{method}{suffix}"
    if COMPRESSIONS[suffix]:
        with open(archive, "wb") as out:
            subprocess.run(COMPRESSIONS[suffix] + [str(plain)], stdout=out, check=True)
        plain.unlink()
    dest = tmp_path / "dest"
    dest.mkdir()
    files.extract(str(archive), str(dest), method)
    assert tree(dest) == tree(src)
    if method == "tar":
        assert files.peek_tar_config(str(archive)) == {"postgresql.conf": "port = 6543\n"}


def test_a_corrupt_archive_fails_naming_the_tool(tmp_path):
    src = make_tree(tmp_path / "src")
    archive = tmp_path / "base.tar.zst"
    subprocess.run(f"tar -C {src} -cf - . | zstd -q -c > {archive}", shell=True, check=True)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RestoreError, match=r"extracting base.tar.zst failed: zstd exited"):
        files.extract(str(archive), str(dest), "tar")


def test_rsync_backups_are_copied_with_their_links(tmp_path):
    backup = tmp_path / "b"
    data = make_tree(backup / "data")
    (data / "pg_tblspc").mkdir()
    (backup / "tablespaces" / "16390").mkdir(parents=True)
    os.symlink("../../tablespaces/16390", data / "pg_tblspc" / "16390")
    sources = files.backup_sources(str(backup), {"method": "rsync"})
    assert sources["spaces"] == {"16390": str(backup / "tablespaces" / "16390")}
    dest = tmp_path / "dest"
    dest.mkdir()
    files.extract(sources["base"], str(dest), "rsync")
    assert os.readlink(dest / "pg_tblspc" / "16390") == "../../tablespaces/16390"
    files.link_tablespaces(str(dest), [{"oid": "16390", "path": "/new/ts"}])
    assert os.readlink(dest / "pg_tblspc" / "16390") == "/new/ts"


def _traversal_tree(root):
    """link -> outside, then link/evil: a member written through a link an earlier member made."""
    (root / "PG_VERSION").parent.mkdir(parents=True)
    (root / "PG_VERSION").write_text("15\n")
    os.symlink(str(root.parent / "outside"), root / "link")


@pytest.mark.parametrize("suffix", ["", ".zst"])
def test_a_cpio_archive_with_a_symbolic_link_is_refused_before_cpio_writes_through_it(tmp_path, suffix):
    """cpio writes link/evil through link -> outside, which it extracted first (GNU cpio 2.13): the members
    reach cpio through a guard that refuses any but files and directories, so nothing lands outside."""
    (tmp_path / "outside").mkdir()
    first, second = tmp_path / "first", tmp_path / "second"
    _traversal_tree(first)
    (second / "link").mkdir(parents=True)
    (second / "link" / "evil").write_text("evil")
    parts = []
    for src, names in ((first, "PG_VERSION\nlink\n"), (second, "link/evil\n")):
        cpio = ["cpio", "-o", "-H", "newc", "--quiet"]
        parts.append(subprocess.run(cpio, cwd=src, input=names.encode(), capture_output=True, check=True).stdout)
    trailer = parts[0].rfind(b"070701", 0, parts[0].index(b"TRAILER!!!"))
    plain = tmp_path / "base.cpio"
    plain.write_bytes(parts[0][:trailer] + parts[1])
    archive = tmp_path / f"base.cpio{suffix}"
    if suffix:
        subprocess.run(["zstd", "-q", "--rm", str(plain), "-o", str(archive)], check=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RestoreError, match=r"base.cpio.* cannot be restored: link is a symbolic link .*restore another backup"):
        files.extract(str(archive), str(dest), "cpio")
    assert os.listdir(tmp_path / "outside") == []
    assert not os.path.lexists(dest / "link")


def test_a_tar_archive_or_rsync_tree_with_a_symbolic_link_is_refused(tmp_path):
    """tar makes its symbolic links last (never writes through them) and rsync copies them as they are:
    a link is refused once they are done, before recovery could write through it."""
    (tmp_path / "outside").mkdir()
    src = tmp_path / "src"
    _traversal_tree(src)
    archive = tmp_path / "base.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(archive), "."], check=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RestoreError, match=r"base.tar holds symbolic links \(link -> .*outside\)"):
        files.extract(str(archive), str(dest), "tar")
    rsync_dest = tmp_path / "rsync-dest"
    rsync_dest.mkdir()
    (src / "pg_tblspc").mkdir()
    os.symlink("../../tablespaces/16390", src / "pg_tblspc" / "16390")  # an rsync backup's own: allowed
    os.symlink("/var/lib/postgresql/15/main/base", src / "pg_tblspc" / "16391")
    with pytest.raises(RestoreError, match=r"holds symbolic links \(link -> .*outside, pg_tblspc/16391 -> /var/lib"):
        files.extract(str(src), str(rsync_dest), "rsync")
    assert os.listdir(tmp_path / "outside") == []


def test_backup_sources_of_archives(tmp_path):
    for name in ("base.tar.zst", "16390.tar.zst", "backup_label", "backup.json"):
        (tmp_path / name).write_bytes(b"")
    s = files.backup_sources(str(tmp_path), {"method": "tar", "compression": "zstd"})
    assert s["base"].endswith("base.tar.zst") and list(s["spaces"]) == ["16390"]
    with pytest.raises(RestoreError, match="no base.cpio"):
        files.backup_sources(str(tmp_path), {"method": "cpio"})
    with pytest.raises(RestoreError, match="method 'zip'"):
        files.backup_sources(str(tmp_path), {"method": "zip"})


def test_missing_decompressor_is_reported_before_anything_changes(tmp_path, monkeypatch):
    (tmp_path / "base.tar.lz4").write_bytes(b"")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "lz4" else real_which(name))
    with pytest.raises(RestoreError, match="needs lz4 on this host"):
        files.needed_tools(files.backup_sources(str(tmp_path), {"method": "tar"}))


def test_peek_of_a_big_tar_stops_early(tmp_path):
    src = make_tree(tmp_path / "src")
    big = tmp_path / "base.tar"
    with tarfile.open(big, "w") as tf:
        tf.add(src / "postgresql.conf", arcname="postgresql.conf")
        for n in range(50):
            tf.add(src / "base" / "1" / "1259", arcname=f"base/1/{n}")
    assert files.peek_tar_config(str(big), limit=3) == {"postgresql.conf": "port = 6543\n"}
    assert files.peek_tar_config(str(tmp_path / "missing.tar")) == {}


# -- the restored data directory


def test_tidying_removes_what_belongs_to_the_original(tmp_path):
    data = make_tree(tmp_path / "data")
    for name in ("postmaster.pid", "postmaster.opts", "recovery.conf", "standby.signal"):
        (data / name).write_text("x")
    (data / "pg_replslot" / "slot1").mkdir(parents=True)
    (data / "pg_wal" / "000000010000000000000001").write_bytes(b"x")
    removed = files.tidy_data_directory(str(data), 17)
    assert {"postmaster.pid", "recovery.conf", "standby.signal", "pg_replslot/slot1", "pg_wal/000000010000000000000001"} <= set(
        removed
    )
    for sub in ("pg_wal/archive_status", "pg_wal/summaries", "pg_tblspc"):
        assert (data / sub).is_dir()
    assert not (data / "postmaster.pid").exists()
    assert files.write_minimal_configs(str(data)) == ["pg_hba.conf", "pg_ident.conf"]  # postgresql.conf was there


def test_tidy_never_follows_a_linked_pg_wal_into_the_original(tmp_path):
    live_wal = tmp_path / "live_wal"
    live_wal.mkdir()
    (live_wal / "000000010000000000000003").write_bytes(b"live")
    data = tmp_path / "data"
    for d in ("pg_replslot", "pg_tblspc"):
        (data / d).mkdir(parents=True)
    os.symlink(live_wal, data / "pg_wal")
    removed = files.tidy_data_directory(str(data), 15)
    assert "pg_wal (link)" in removed
    assert (live_wal / "000000010000000000000003").read_bytes() == b"live"
    assert (data / "pg_wal").is_dir() and not (data / "pg_wal").is_symlink()
    assert (data / "pg_wal" / "archive_status").is_dir()


def test_original_port_from_copied_configuration(tmp_path):
    assert files.original_port(str(tmp_path)) == 5432
    (tmp_path / "postgresql.conf").write_text("port = 5433\n")
    assert files.original_port(str(tmp_path)) == 5433
    (tmp_path / "postgresql.auto.conf").write_text("port = '5434'\n")
    assert files.original_port(str(tmp_path)) == 5434


# -- WAL archive


def test_wal_needed_and_missing(tmp_path):
    assert files.wal_files_needed("000000010000000000000002", "000000010000000000000004") == [
        "000000010000000000000002",
        "000000010000000000000003",
        "000000010000000000000004",
    ]
    assert files.wal_files_needed("0000000100000000000000FF", "000000010000000100000000") == [
        "0000000100000000000000FF",
        "000000010000000100000000",
    ]
    assert files.wal_files_needed(None, "x") == []
    (tmp_path / "000000010000000000000002").write_bytes(b"")
    (tmp_path / "000000010000000000000003.zst").write_bytes(b"")
    needed = files.wal_files_needed("000000010000000000000002", "000000010000000000000004")
    assert files.missing_wal(str(tmp_path), needed) == ["000000010000000000000004"]
    # A plain cp restore_command (wal_archive) cannot use the compressed one.
    assert files.missing_wal(str(tmp_path), needed, plain=True) == ["000000010000000000000003", "000000010000000000000004"]
    with pytest.raises(RestoreError, match="cannot be read"):
        files.missing_wal(str(tmp_path / "nope"), needed)


def test_wal_needed_across_log_files_with_the_segment_size():
    # 16 MB segments: 0/FF is followed by 1/00; 64 MB ones: 0/3F by 1/00.
    assert files.wal_files_needed("0000000100000000000000FE", "000000010000000100000001", 16 * 1024 * 1024) == [
        "0000000100000000000000FE",
        "0000000100000000000000FF",
        "000000010000000100000000",
        "000000010000000100000001",
    ]
    assert files.wal_files_needed("00000001000000000000003F", "000000010000000100000000", "67108864") == [
        "00000001000000000000003F",
        "000000010000000100000000",
    ]
    # Within one log file the size does not matter; a size PostgreSQL cannot have is ignored.
    assert files.wal_files_needed("000000010000000000000FFE", "000000010000000000000FFF") == [
        "000000010000000000000FFE",
        "000000010000000000000FFF",
    ]
    assert files.wal_files_needed("0000000100000000000000FF", "000000010000000100000000", 12345) == [
        "0000000100000000000000FF",
        "000000010000000100000000",
    ]
    # A stop on a later timeline (a standby promoted during the backup) is named as it is.
    assert files.wal_files_needed("000000010000000000000002", "000000020000000000000003", 16 * 1024 * 1024) == [
        "000000010000000000000002",
        "000000020000000000000003",
    ]
