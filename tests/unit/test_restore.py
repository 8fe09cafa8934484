"""Restore logic without a server: input validation, recovery settings, tablespace_map, target directories,
archive extraction with each decompressor, the server log, and the documentation of the restore modules."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile

import pytest
from harness.ansible import VENV_BIN, collections_workspace

sys.path.insert(0, collections_workspace())
rs = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._restore")
RestoreError = rs.RestoreError


# -- versions and targets


@pytest.mark.parametrize(
    ("value", "major"), [(150020, 15), ("150020", 15), ("170004", 17), (120022, 12), ("15.2", 15), ("17beta1", 17), (15, 15)]
)
def test_major_of(value, major):
    assert rs.major_of(value) == major


@pytest.mark.parametrize("value", ["", "abc", 90600, None])
def test_major_of_refuses_nonsense(value):
    with pytest.raises(RestoreError, match="major version"):
        rs.major_of(value)


@pytest.mark.parametrize(
    ("target", "value", "action", "timeline", "message"),
    [
        ("immediate", "0/3000000", "promote", "latest", "takes no value"),
        ("latest", "2026-11-29 10:00:00+00", "promote", "latest", "takes no value"),
        ("time", "", "promote", "latest", "needs a value"),
        ("time", "yesterday", "promote", "latest", "not a timestamp"),
        ("time", "2026-13-45 10:00:00+00", "promote", "latest", "not a valid timestamp"),
        ("lsn", "3000000", "promote", "latest", "not an LSN"),
        ("lsn", "0/xyz", "promote", "latest", "not an LSN"),
        ("xid", "12a", "promote", "latest", "not a transaction id"),
        ("xid", "1", "promote", "latest", "not a transaction id"),
        ("name", "x" * 64, "promote", "latest", "longer than 63 bytes"),
        ("name", "a\nb", "promote", "latest", "one line"),
        ("name", "ok", "resume", "latest", "action 'resume'"),
        ("name", "ok", "promote", "newest", "timeline 'newest'"),
        ("somewhere", "", "promote", "latest", "not one of"),
    ],
)
def test_bad_target_combinations_are_refused(target, value, action, timeline, message):
    with pytest.raises(RestoreError, match=message):
        rs.validate_target(target, value, action, timeline)


@pytest.mark.parametrize(
    ("target", "value"),
    [
        ("immediate", None),
        ("latest", ""),
        ("time", "2026-11-29 10:15:00+00"),
        ("time", "2026-11-29T10:15:00.123456+05:30"),
        ("time", "2026-11-29 10:15:00 UTC"),
        ("time", "2026-11-29 10:15 Europe/Paris"),
        ("lsn", "0/3000060"),
        ("lsn", "1A/FFFFFFFF"),
        ("name", "before upgrade"),
        ("xid", "745"),
    ],
)
def test_good_targets_pass(target, value):
    assert rs.validate_target(target, value, "promote", "latest") == []


def test_time_without_zone_and_useless_options_warn():
    assert "no time zone" in rs.validate_target("time", "2026-11-29 10:15:00", "promote", "latest")[0]
    assert "no effect" in rs.validate_target("latest", "", "pause", "latest")[0]
    assert "inclusive" in rs.validate_target("name", "x", "promote", "latest", inclusive=False)[0]


def test_target_time_zones_are_understood():
    t, _ = rs.parse_target_time("2026-11-29 10:15:00.5+05:30")
    assert t.utcoffset().total_seconds() == 5.5 * 3600 and t.microsecond == 500000
    t, _ = rs.parse_target_time("2026-11-29 10:15:00-03")
    assert t.utcoffset().total_seconds() == -3 * 3600
    assert rs.parse_target_time("2026-11-29 10:15:00 Europe/Paris") == (None, "Europe/Paris")


def test_targets_before_the_end_of_the_backup_are_refused():
    info = {"id": "20261129T101500Z", "stop_lsn": "0/5000100", "stopped_at": "2026-11-29T10:15:30.500+00:00"}
    with pytest.raises(RestoreError, match="before the end of backup"):
        rs.check_target_against_backup("lsn", "0/5000000", info)
    with pytest.raises(RestoreError, match="before the end of backup"):
        rs.check_target_against_backup("time", "2026-11-29 11:15:00+02", info)
    rs.check_target_against_backup("lsn", "0/5000100", info)
    rs.check_target_against_backup("time", "2026-11-29 10:15:31+00", info)
    rs.check_target_against_backup("time", "2026-11-29 09:00:00 Europe/Paris", info)  # cannot tell: the server decides
    rs.check_target_against_backup("name", "x", info)


@pytest.mark.parametrize(
    ("port", "ok"), [(0, True), (5433, True), (65535, True), (80, False), (65536, False), (-1, False), ("x", False)]
)
def test_port_validation(port, ok):
    if ok:
        assert rs.validate_port(port) == int(port)
    else:
        with pytest.raises(RestoreError):
            rs.validate_port(port)


def test_paths_must_be_absolute():
    assert rs.require_absolute("data_directory", "/srv/pg/../pg/x/") == "/srv/pg/x"
    for bad in ("", None, "relative/dir"):
        with pytest.raises(RestoreError, match="absolute"):
            rs.require_absolute("data_directory", bad)


# -- recovery settings


@pytest.mark.parametrize(
    ("target", "value", "key"),
    [
        ("immediate", None, "recovery_target"),
        ("time", "2026-11-29 10:15:00+00", "recovery_target_time"),
        ("lsn", "0/3000060", "recovery_target_lsn"),
        ("name", "p1", "recovery_target_name"),
        ("xid", "745", "recovery_target_xid"),
    ],
)
def test_exactly_one_recovery_target_is_written(target, value, key):
    s = rs.recovery_settings("cp x %p", target, value, "shutdown", "latest")
    targets = [
        k for k in s if k.startswith("recovery_target") and k not in ("recovery_target_action", "recovery_target_timeline")
    ]
    assert targets == [key]
    assert s["recovery_target_action"] == "shutdown" and s["recovery_target_timeline"] == "latest"
    assert s["restore_command"] == "cp x %p"


def test_latest_writes_no_target_and_no_action():
    s = rs.recovery_settings("cp x %p", "latest", "", "promote", None)
    assert s == {"restore_command": "cp x %p", "recovery_target_timeline": "latest"}


def test_exclusive_target():
    s = rs.recovery_settings("c", "lsn", "0/3000060", "promote", "2", inclusive=False)
    assert s["recovery_target_inclusive"] is False and s["recovery_target_timeline"] == "2"


def test_conf_quoting():
    assert rs.conf_quote("it's a\\b") == "'it''s a\\\\b'"
    assert rs.conf_quote(5433) == "5433"
    assert rs.conf_quote(False) == "off"
    assert rs.conf_quote("") == "''"


def test_restore_command_quotes_the_archive_and_fails_for_missing_files(tmp_path):
    archive = tmp_path / "wal archive"
    archive.mkdir()
    (archive / "000000010000000000000002").write_bytes(b"wal")
    cmd = rs.restore_command_for(str(archive))
    assert "'" in cmd  # the space is quoted
    dest = tmp_path / "RECOVERYXLOG"
    ok = subprocess.run(cmd.replace("%f", "000000010000000000000002").replace("%p", str(dest)), shell=True, check=False)
    assert ok.returncode == 0 and dest.read_bytes() == b"wal"
    missing = subprocess.run(cmd.replace("%f", "000000010000000000000003").replace("%p", str(dest)), shell=True, check=False)
    assert missing.returncode != 0


def test_auto_conf_drops_earlier_recovery_settings_and_keeps_the_rest():
    existing = (
        "# Do not edit this file manually!\n"
        "# It will be overwritten by the ALTER SYSTEM command.\n"
        "work_mem = '64MB'\n"
        "restore_command = 'old'\n"
        "recovery_target_time = '2020-01-01 00:00:00+00'\n"
        "port = 5432\n"
    )
    settings = {**rs.recovery_settings("new cmd", "name", "p1", "promote", "latest"), "port": 5544, "archive_mode": "off"}
    once = rs.render_auto_conf(existing, settings, "# Added by pgops.online_backup.pg_restore_prepare: one")
    assert "work_mem = '64MB'" in once
    assert "old" not in once and "2020-01-01" not in once and "port = 5432" not in once
    assert "recovery_target_name = 'p1'" in once and "port = 5544" in once and "restore_command = 'new cmd'" in once
    # Restoring again over the same file keeps one value per key.
    twice = rs.render_auto_conf(once, {**settings, "port": 5545}, "# Added by pgops.online_backup.pg_restore_prepare: two")
    keys = [line.split("=")[0].strip() for line in twice.splitlines() if "=" in line and not line.startswith("#")]
    assert sorted(keys) == sorted(set(keys))
    assert "port = 5545" in twice and twice.count("Added by") == 1


def test_dangerous_lines_of_a_restored_postgresql_conf_are_commented_out():
    text = (
        "data_directory = '/var/lib/pg/live'\n#recovery_target_time = 'x'\n"
        "recovery_target_xid=5\nshared_buffers = 128MB\nrestore_command 'x'\n"
    )
    new, disabled = rs.disable_conf_lines(text)
    assert len(disabled) == 3
    assert "shared_buffers = 128MB\n" in new and "#recovery_target_time = 'x'\n" in new
    assert all(line.startswith(("#", "shared")) for line in new.splitlines())


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("port = 5433 # comment\n", "5433"),
        ("port=5433\n", "5433"),
        ("port 5433\n", "5433"),
        ("#port = 1\nport = 2\nport = 3\n", "3"),
        ("listen_addresses = 'a, b' # x\n", "a, b"),
        ("restore_command = 'it''s # here'\n", "it's # here"),
        ("portx = 5\n", None),
    ],
)
def test_conf_value(text, value):
    key = "listen_addresses" if "listen" in text else "restore_command" if "restore" in text else "port"
    assert rs.conf_value(text, key) == value


def test_original_port_from_copied_configuration(tmp_path):
    assert rs.original_port(str(tmp_path)) == 5432
    (tmp_path / "postgresql.conf").write_text("port = 5433\n")
    assert rs.original_port(str(tmp_path)) == 5433
    (tmp_path / "postgresql.auto.conf").write_text("port = '5434'\n")
    assert rs.original_port(str(tmp_path)) == 5434


# -- tablespaces


def test_tablespace_map_round_trip_with_odd_paths():
    entries = [("16390", "/srv/ts one"), ("16391", "/srv/back\\slash"), ("16392", "/srv/new\nline")]
    text = rs.format_tablespace_map(entries)
    assert text.splitlines()[0] == "16390 /srv/ts one"
    assert rs.parse_tablespace_map(text) == entries
    with pytest.raises(RestoreError, match="invalid tablespace_map line"):
        rs.parse_tablespace_map("abc /x\n")


def test_tablespaces_remapped_by_oid_path_or_name():
    backup = [{"oid": 16390, "name": "fast", "location": "/old/fast"}, {"oid": 16391, "name": "slow", "location": "/old/slow"}]
    spcmap = [("16390", "/old/fast"), ("16391", "/old/slow")]
    plan = rs.plan_tablespaces(backup, spcmap, {"16390": "/new/fast"})
    assert [(t["oid"], t["path"]) for t in plan] == [("16390", "/new/fast"), ("16391", "/old/slow")]
    plan = rs.plan_tablespaces(backup, spcmap, {"/old/fast": "/new/a", "slow": "/new/b/"})
    assert [t["path"] for t in plan] == ["/new/a", "/new/b"]
    assert plan[0]["name"] == "fast" and plan[0]["location"] == "/old/fast"
    with pytest.raises(RestoreError, match="does not have: 99999"):
        rs.plan_tablespaces(backup, spcmap, {"99999": "/x"})
    with pytest.raises(RestoreError, match="same directory"):
        rs.plan_tablespaces(backup, spcmap, {"fast": "/x", "slow": "/x"})
    with pytest.raises(RestoreError, match="absolute"):
        rs.plan_tablespaces(backup, spcmap, {"fast": "relative"})
    assert rs.plan_tablespaces([], [], {}) == []


# -- target directories


def test_absent_and_empty_targets_are_accepted_and_non_empty_refused(tmp_path):
    backup = tmp_path / "repo" / "20261129T101500Z"
    backup.mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    assert rs.check_targets(str(tmp_path / "absent"), [], False, str(backup)) == [(str(tmp_path / "absent"), "absent")]
    assert rs.check_targets(str(empty), [], False, str(backup)) == [(str(empty), "empty")]
    with pytest.raises(RestoreError, match=r"not empty \(keep.txt\).*force"):
        rs.check_targets(str(full), [], False, str(backup))
    assert rs.check_targets(str(full), [], True, str(backup)) == [(str(full), "not_empty")]
    assert (full / "keep.txt").read_text() == "precious"  # checking changes nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(RestoreError, match="not a directory"):
        rs.check_targets(str(tmp_path / "file"), [], True, str(backup))
    with pytest.raises(RestoreError, match="overlaps the backup"):
        rs.check_targets(str(backup / "data"), [], True, str(backup))
    ts = [{"oid": "16390", "path": str(tmp_path / "absent" / "ts"), "location": "/old"}]
    with pytest.raises(RestoreError, match="inside the data directory"):
        rs.check_targets(str(tmp_path / "absent"), ts, False, str(backup))


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
    assert rs.running_postmaster(str(fake_postmaster))
    with pytest.raises(RestoreError, match="running PostgreSQL server"):
        rs.check_targets(str(fake_postmaster), [], True, str(tmp_path / "backup"))
    assert (fake_postmaster / "PG_VERSION").exists()


def test_tablespaces_of_the_running_original_are_refused(tmp_path, fake_postmaster):
    ts = [{"oid": "16390", "path": str(tmp_path / "ts"), "location": str(tmp_path / "ts")}]
    live = {"data_directory": str(fake_postmaster)}
    with pytest.raises(RestoreError, match="original server .* is using; map it elsewhere"):
        rs.check_targets(str(tmp_path / "new"), ts, True, str(tmp_path / "backup"), live=live)
    moved = [dict(ts[0], path=str(tmp_path / "ts2"))]
    assert len(rs.check_targets(str(tmp_path / "new"), moved, False, str(tmp_path / "backup"), live=live)) == 2


def test_stale_postmaster_pid_is_not_a_running_server(tmp_path):
    (tmp_path / "postmaster.pid").write_text("999999999\n")
    assert rs.running_postmaster(str(tmp_path)) is None
    (tmp_path / "postmaster.pid").write_text(f"{os.getpid()}\n")  # alive, but not running in this directory
    assert rs.running_postmaster(str(tmp_path)) is None


def test_undo_puts_targets_back(tmp_path):
    created = tmp_path / "new"
    rs.prepare_directory(str(created), "absent")
    assert oct(created.stat().st_mode & 0o777) == "0o700"
    (created / "half").write_text("x")
    rs.undo_directory(str(created), "absent")
    assert not created.exists()
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "sub").mkdir()
    rs.prepare_directory(str(existing), "not_empty")
    assert os.listdir(existing) == []
    (existing / "half").write_text("x")
    rs.undo_directory(str(existing), "empty")
    assert existing.exists() and os.listdir(existing) == []


# -- binaries


def fake_bin(path, version: str):
    path.mkdir(parents=True)
    for name in ("pg_ctl", "postgres", "pg_amcheck"):
        f = path / name
        f.write_text(f"#!/bin/sh\necho '{name} (PostgreSQL) {version}'\n")
        f.chmod(0o755)
    return str(path)


def test_bin_dir_is_found_by_major_version(tmp_path):
    d15 = fake_bin(tmp_path / "15" / "bin", "15.20")
    d17 = fake_bin(tmp_path / "17" / "bin", "17.4 (Debian)")
    candidates = (str(tmp_path / "missing" / "{major}"), str(tmp_path / "{major}" / "bin"))
    assert rs.find_bin_dir(15, None, candidates) == d15
    assert rs.find_bin_dir(17, None, candidates) == d17
    with pytest.raises(RestoreError, match="no PostgreSQL 16 server binaries found"):
        rs.find_bin_dir(16, None, candidates)
    with pytest.raises(RestoreError, match=r"cannot run this PostgreSQL 17 backup: .*PostgreSQL 15"):
        rs.find_bin_dir(17, d15)
    assert rs.find_tool("pg_amcheck", 17, d17) == os.path.join(d17, "pg_amcheck")


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
    rs.extract(str(archive), str(dest), method)
    assert tree(dest) == tree(src)
    if method == "tar":
        assert rs.peek_tar_config(str(archive)) == {"postgresql.conf": "port = 6543\n"}


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
        rs.extract(str(archive), str(dest), "tar")


def test_rsync_backups_are_copied_with_their_links(tmp_path):
    backup = tmp_path / "b"
    data = make_tree(backup / "data")
    (data / "pg_tblspc").mkdir()
    (backup / "tablespaces" / "16390").mkdir(parents=True)
    os.symlink("../../tablespaces/16390", data / "pg_tblspc" / "16390")
    sources = rs.backup_sources(str(backup), {"method": "rsync"})
    assert sources["spaces"] == {"16390": str(backup / "tablespaces" / "16390")}
    dest = tmp_path / "dest"
    dest.mkdir()
    rs.extract(sources["base"], str(dest), "rsync")
    assert os.readlink(dest / "pg_tblspc" / "16390") == "../../tablespaces/16390"
    rs.link_tablespaces(str(dest), [{"oid": "16390", "path": "/new/ts"}])
    assert os.readlink(dest / "pg_tblspc" / "16390") == "/new/ts"


def test_backup_sources_of_archives(tmp_path):
    for name in ("base.tar.zst", "16390.tar.zst", "backup_label", "backup.json"):
        (tmp_path / name).write_bytes(b"")
    s = rs.backup_sources(str(tmp_path), {"method": "tar", "compression": "zstd"})
    assert s["base"].endswith("base.tar.zst") and list(s["spaces"]) == ["16390"]
    with pytest.raises(RestoreError, match="no base.cpio"):
        rs.backup_sources(str(tmp_path), {"method": "cpio"})
    with pytest.raises(RestoreError, match="method 'zip'"):
        rs.backup_sources(str(tmp_path), {"method": "zip"})


def test_missing_decompressor_is_reported_before_anything_changes(tmp_path, monkeypatch):
    (tmp_path / "base.tar.lz4").write_bytes(b"")
    real_which = shutil.which
    monkeypatch.setattr(rs.shutil, "which", lambda name: None if name == "lz4" else real_which(name))
    with pytest.raises(RestoreError, match="needs lz4 on this host"):
        rs.needed_tools(rs.backup_sources(str(tmp_path), {"method": "tar"}))


def test_tidying_removes_what_belongs_to_the_original(tmp_path):
    data = make_tree(tmp_path / "data")
    for name in ("postmaster.pid", "postmaster.opts", "recovery.conf", "standby.signal"):
        (data / name).write_text("x")
    (data / "pg_replslot" / "slot1").mkdir(parents=True)
    (data / "pg_wal" / "000000010000000000000001").write_bytes(b"x")
    removed = rs.tidy_data_directory(str(data), 17)
    assert {"postmaster.pid", "recovery.conf", "standby.signal", "pg_replslot/slot1", "pg_wal/000000010000000000000001"} <= set(
        removed
    )
    for sub in ("pg_wal/archive_status", "pg_wal/summaries", "pg_tblspc"):
        assert (data / sub).is_dir()
    assert not (data / "postmaster.pid").exists()
    assert rs.write_minimal_configs(str(data)) == ["pg_hba.conf", "pg_ident.conf"]  # postgresql.conf was there


# -- WAL archive


def test_wal_needed_and_missing(tmp_path):
    assert rs.wal_files_needed("000000010000000000000002", "000000010000000000000004") == [
        "000000010000000000000002",
        "000000010000000000000003",
        "000000010000000000000004",
    ]
    assert rs.wal_files_needed("0000000100000000000000FF", "000000010000000100000000") == [
        "0000000100000000000000FF",
        "000000010000000100000000",
    ]
    assert rs.wal_files_needed(None, "x") == []
    (tmp_path / "000000010000000000000002").write_bytes(b"")
    (tmp_path / "000000010000000000000003.zst").write_bytes(b"")
    needed = rs.wal_files_needed("000000010000000000000002", "000000010000000000000004")
    assert rs.missing_wal(str(tmp_path), needed) == ["000000010000000000000004"]
    with pytest.raises(RestoreError, match="cannot be read"):
        rs.missing_wal(str(tmp_path / "nope"), needed)


# -- ports


def test_port_in_use_and_free_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "in use on 127.0.0.1" in rs.port_in_use(port, str(tmp_path), ["127.0.0.1"])
        assert rs.port_in_use(port, str(tmp_path), []) is None  # Unix socket only: the TCP port does not matter
        with socket.socket(socket.AF_UNIX) as u:
            u.bind(str(tmp_path / f".s.PGSQL.{port}"))
            u.listen()
            assert "already listens" in rs.port_in_use(port, str(tmp_path), [])
    free = rs.pick_free_port(str(tmp_path), ["127.0.0.1"], avoid=(5432,))
    assert free >= 1024 and rs.port_in_use(free, str(tmp_path), ["127.0.0.1"]) is None
    assert rs.listen_hosts("") == [] and rs.listen_hosts("localhost, 127.0.0.2") == ["127.0.0.1", "127.0.0.2"]


# -- the server log

LOG_NOT_REACHED = """\
2026-11-29 11:03:21.111 UTC [1421] LOG:  consistent recovery state reached at 0/2000100
2026-11-29 11:03:21.117 UTC [1421] LOG:  redo done at 0/3000090 system usage: CPU: user: 0.00 s
2026-11-29 11:03:21.117 UTC [1421] LOG:  last completed transaction was at log time 2026-11-29 11:03:19.482397+00
2026-11-29 11:03:21.117 UTC [1421] FATAL:  recovery ended before configured recovery target was reached
2026-11-29 11:03:21.121 UTC [1417] LOG:  startup process (PID 1421) exited with exit code 1
"""
LOG_REACHED = """\
2026-11-29 11:03:30.102 UTC [1780] LOG:  consistent recovery state reached at 0/2000100
2026-11-29 11:03:30.102 UTC [1780] LOG:  recovery stopping at restore point "before_b", time 2026-11-29 11:03:29.5+00
2026-11-29 11:03:30.110 UTC [1780] LOG:  selected new timeline ID: 2
2026-11-29 11:03:30.104 UTC [1777] LOG:  shutdown at recovery target
"""


def test_server_log_facts():
    assert rs.fatal_lines(LOG_NOT_REACHED) == ["FATAL: recovery ended before configured recovery target was reached"]
    facts = rs.recovery_facts(LOG_NOT_REACHED)
    assert facts["redo_done"] == "0/3000090" and facts["consistent"] == "0/2000100"
    assert "recovery_stop" not in facts
    facts = rs.recovery_facts(LOG_REACHED)
    assert facts["recovery_stop"].startswith('recovery stopping at restore point "before_b"')
    assert facts["new_timeline"] == "2" and facts["shutdown_at_target"] == "shutdown at recovery target"
    assert rs.fatal_lines(LOG_REACHED) == []


def test_expected_end_and_server_address(tmp_path):
    (tmp_path / "postgresql.conf").write_text("port = 5432\nunix_socket_directories = '/a, /b'\n")
    (tmp_path / "postgresql.auto.conf").write_text(
        "port = 6000\nrecovery_target_lsn = '0/3000060'\nrecovery_target_action = 'shutdown'\n"
    )
    conf = rs.read_conf(str(tmp_path))
    assert rs.expected_end(conf) == ("lsn", "shutdown")
    assert rs.expected_end({}) == ("latest", "pause")
    assert rs.server_address(str(tmp_path)) == (6000, "/a")
    assert rs.server_address(str(tmp_path), 7000, "/c") == (7000, "/c")


def test_peek_of_a_big_tar_stops_early(tmp_path):
    src = make_tree(tmp_path / "src")
    big = tmp_path / "base.tar"
    with tarfile.open(big, "w") as tf:
        tf.add(src / "postgresql.conf", arcname="postgresql.conf")
        for n in range(50):
            tf.add(src / "base" / "1" / "1259", arcname=f"base/1/{n}")
    assert rs.peek_tar_config(str(big), limit=3) == {"postgresql.conf": "port = 6543\n"}
    assert rs.peek_tar_config(str(tmp_path / "missing.tar")) == {}


# -- documentation


def test_module_and_role_docs_render():
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections_workspace(), ANSIBLE_NOCOLOR="1")
    doc = os.path.join(VENV_BIN, "ansible-doc")
    for name in ("pg_restore_prepare", "pg_restore_server", "pg_restore_drill"):
        out = subprocess.run([doc, f"pgops.online_backup.{name}"], env=env, capture_output=True, text=True, check=False)
        assert out.returncode == 0 and "OPTIONS" in out.stdout and not out.stderr.strip(), out.stderr
    out = subprocess.run(
        [doc, "-t", "role", "pgops.online_backup.pg_restore"], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and re.search(r"ENTRY POINT:\W*drill", out.stdout) and "pg_restore_tablespace_map" in out.stdout, (
        out.stderr
    )


def test_tidy_never_follows_a_linked_pg_wal_into_the_original(tmp_path):
    live_wal = tmp_path / "live_wal"
    live_wal.mkdir()
    (live_wal / "000000010000000000000003").write_bytes(b"live")
    data = tmp_path / "data"
    for d in ("pg_replslot", "pg_tblspc"):
        (data / d).mkdir(parents=True)
    os.symlink(live_wal, data / "pg_wal")
    removed = rs.tidy_data_directory(str(data), 15)
    assert "pg_wal (link)" in removed
    assert (live_wal / "000000010000000000000003").read_bytes() == b"live"
    assert (data / "pg_wal").is_dir() and not (data / "pg_wal").is_symlink()
    assert (data / "pg_wal" / "archive_status").is_dir()
