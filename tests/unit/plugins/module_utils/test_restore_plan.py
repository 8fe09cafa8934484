"""The plan of a restore, without a server or files: input validation (versions, recovery targets, ports,
paths), recovery settings and postgresql.conf values, and tablespace_map parsing and planning."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
plan = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._restore_plan")
backup_api = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._backup_api")
postgres = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._errors")
RestoreError = plan.RestoreError
BackupApiError = backup_api.BackupApiError


def test_restore_errors_are_the_collections_errors():
    assert issubclass(RestoreError, postgres.PgopsError) and issubclass(BackupApiError, postgres.PgopsError)


# -- versions and targets


@pytest.mark.parametrize(
    ("value", "major"), [(150020, 15), ("150020", 15), ("170004", 17), (120022, 12), ("15.2", 15), ("17beta1", 17), (15, 15)]
)
def test_major_of(value, major):
    assert backup_api.major_of(value) == major


@pytest.mark.parametrize("value", ["", "abc", 90600, None])
def test_major_of_refuses_nonsense(value):
    with pytest.raises(BackupApiError, match="major version"):
        backup_api.major_of(value)


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
    # A malformed LSN is refused by the collection's one LSN parser.
    with pytest.raises(BackupApiError if target == "lsn" else RestoreError, match=message):
        plan.validate_target(target, value, action, timeline)


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
    assert plan.validate_target(target, value, "promote", "latest") == []


def test_time_without_zone_is_refused_and_useless_options_warn():
    """A zoneless time is refused whatever the backup (pg_backup_info refuses it for latest): the restored
    server would read it in its own timezone setting, GMT when it has none."""
    with pytest.raises(RestoreError, match=r"'2026-11-29 10:15:00' has no time zone: add one \(like \+00"):
        plan.validate_target("time", "2026-11-29 10:15:00", "promote", "latest")
    assert "no effect" in plan.validate_target("latest", "", "pause", "latest")[0]
    assert "inclusive" in plan.validate_target("name", "x", "promote", "latest", inclusive=False)[0]


def test_target_time_zones_are_understood():
    t, _ = plan.parse_target_time("2026-11-29 10:15:00.5+05:30")
    assert t.utcoffset().total_seconds() == 5.5 * 3600 and t.microsecond == 500000
    t, _ = plan.parse_target_time("2026-11-29 10:15:00-03")
    assert t.utcoffset().total_seconds() == -3 * 3600
    assert plan.parse_target_time("2026-11-29 10:15:00 Europe/Paris") == (None, "Europe/Paris")


def test_targets_before_the_end_of_the_backup_are_refused():
    info = {"id": "20261129T101500Z", "stop_lsn": "0/5000100", "stopped_at": "2026-11-29T10:15:30.500+00:00"}
    with pytest.raises(RestoreError, match="before the end of backup"):
        plan.check_target_against_backup("lsn", "0/5000000", info)
    with pytest.raises(RestoreError, match="before the end of backup"):
        plan.check_target_against_backup("time", "2026-11-29 11:15:00+02", info)
    plan.check_target_against_backup("lsn", "0/5000100", info)
    plan.check_target_against_backup("time", "2026-11-29 10:15:31+00", info)
    plan.check_target_against_backup("time", "2026-11-29 09:00:00 Europe/Paris", info)  # cannot tell: the server decides
    plan.check_target_against_backup("name", "x", info)


@pytest.mark.parametrize(
    ("port", "ok"), [(0, True), (5433, True), (65535, True), (80, False), (65536, False), (-1, False), ("x", False)]
)
def test_port_validation(port, ok):
    if ok:
        assert plan.validate_port(port) == int(port)
    else:
        with pytest.raises(RestoreError):
            plan.validate_port(port)


def test_paths_must_be_absolute():
    assert plan.require_absolute("data_directory", "/srv/pg/../pg/x/") == "/srv/pg/x"
    for bad in ("", None, "relative/dir"):
        with pytest.raises(RestoreError, match="absolute"):
            plan.require_absolute("data_directory", bad)


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
    s = plan.recovery_settings("cp x %p", target, value, "shutdown", "latest")
    targets = [
        k for k in s if k.startswith("recovery_target") and k not in ("recovery_target_action", "recovery_target_timeline")
    ]
    assert targets == [key]
    assert s["recovery_target_action"] == "shutdown" and s["recovery_target_timeline"] == "latest"
    assert s["restore_command"] == "cp x %p"


def test_latest_writes_no_target_and_no_action():
    s = plan.recovery_settings("cp x %p", "latest", "", "promote", None)
    assert s == {"restore_command": "cp x %p", "recovery_target_timeline": "latest"}


def test_exclusive_target():
    s = plan.recovery_settings("c", "lsn", "0/3000060", "promote", "2", inclusive=False)
    assert s["recovery_target_inclusive"] is False and s["recovery_target_timeline"] == "2"


def test_conf_quoting():
    assert plan.conf_quote("it's a\\b") == "'it''s a\\\\b'"
    assert plan.conf_quote(5433) == "5433"
    assert plan.conf_quote(False) == "off"
    assert plan.conf_quote("") == "''"


def test_restore_command_quotes_the_archive_and_fails_for_missing_files(tmp_path):
    archive = tmp_path / "wal archive"
    archive.mkdir()
    (archive / "000000010000000000000002").write_bytes(b"wal")
    cmd = plan.restore_command_for(str(archive))
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
    settings = {**plan.recovery_settings("new cmd", "name", "p1", "promote", "latest"), "port": 5544, "archive_mode": "off"}
    once = plan.render_auto_conf(existing, settings, "# Added by pgops.online_backup.pg_restore_prepare: one")
    assert "work_mem = '64MB'" in once
    assert "old" not in once and "2020-01-01" not in once and "port = 5432" not in once
    assert "recovery_target_name = 'p1'" in once and "port = 5544" in once and "restore_command = 'new cmd'" in once
    # Restoring again over the same file keeps one value per key.
    twice = plan.render_auto_conf(once, {**settings, "port": 5545}, "# Added by pgops.online_backup.pg_restore_prepare: two")
    keys = [line.split("=")[0].strip() for line in twice.splitlines() if "=" in line and not line.startswith("#")]
    assert sorted(keys) == sorted(set(keys))
    assert "port = 5545" in twice and twice.count("Added by") == 1


def test_dangerous_lines_of_a_restored_postgresql_conf_are_commented_out():
    text = (
        "data_directory = '/var/lib/pg/live'\n#recovery_target_time = 'x'\n"
        "recovery_target_xid=5\nshared_buffers = 128MB\nrestore_command 'x'\n"
    )
    new, disabled = plan.disable_conf_lines(text)
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
    assert plan.conf_value(text, key) == value


# -- tablespaces


def test_tablespace_map_round_trip_with_odd_paths():
    entries = [("16390", "/srv/ts one"), ("16391", "/srv/back\\slash"), ("16392", "/srv/new\nline")]
    text = plan.format_tablespace_map(entries)
    assert text.splitlines()[0] == "16390 /srv/ts one"
    assert plan.parse_tablespace_map(text) == entries
    with pytest.raises(RestoreError, match="invalid tablespace_map line"):
        plan.parse_tablespace_map("abc /x\n")


def test_tablespaces_remapped_by_oid_path_or_name():
    backup = [{"oid": 16390, "name": "fast", "location": "/old/fast"}, {"oid": 16391, "name": "slow", "location": "/old/slow"}]
    spcmap = [("16390", "/old/fast"), ("16391", "/old/slow")]
    planned = plan.plan_tablespaces(backup, spcmap, {"16390": "/new/fast"})
    assert [(t["oid"], t["path"]) for t in planned] == [("16390", "/new/fast"), ("16391", "/old/slow")]
    planned = plan.plan_tablespaces(backup, spcmap, {"/old/fast": "/new/a", "slow": "/new/b/"})
    assert [t["path"] for t in planned] == ["/new/a", "/new/b"]
    assert planned[0]["name"] == "fast" and planned[0]["location"] == "/old/fast"
    with pytest.raises(RestoreError, match="does not have: 99999"):
        plan.plan_tablespaces(backup, spcmap, {"99999": "/x"})
    with pytest.raises(RestoreError, match="same directory"):
        plan.plan_tablespaces(backup, spcmap, {"fast": "/x", "slow": "/x"})
    with pytest.raises(RestoreError, match="absolute"):
        plan.plan_tablespaces(backup, spcmap, {"fast": "relative"})
    assert plan.plan_tablespaces([], [], {}) == []
