"""What the molecule scenario's converge left for each PostgreSQL host: one
complete backup per cluster in its repository (on the host itself, or on the
repository host), private file modes, the WAL it needs in the archive, a passed
restore drill, and nothing running or locked any more."""

from __future__ import annotations

import json
import os
import re

import pytest

testinfra_hosts = ["ansible://postgresql"]

# Set by molecule.yml for each host; the backup must show them.
COMPRESSION = {"pg17-primary": "zstd", "pg17-standby": "lz4", "pg13-primary": "gzip"}
SUFFIX = {"none": "", "gzip": ".gz", "zstd": ".zst", "lz4": ".lz4"}
TAR_FLAG = {"none": "", "gzip": "--gzip", "zstd": "--zstd", "lz4": "--use-compress-program=lz4"}
LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
WAL = re.compile(r"^[0-9A-F]{24}$")

# Sessions the keeper recorded for this cluster, read on the host (one run instead of a file at a time).
SESSIONS = r"""
import glob, json, os, sys
for path in glob.glob(os.path.expanduser("~postgres/.pgops_online_backup/sessions/*/state.json")):
    try:
        with open(path) as f:
            s = json.load(f)
    except (OSError, ValueError):
        continue
    if s.get("system_identifier") != sys.argv[1]:
        continue
    try:
        with open("/proc/%d/stat" % s["pid"]) as f:
            stat = f.read()
        live = stat[stat.rindex(")") + 2] not in "ZX" and int(stat[stat.rindex(")") + 2:].split()[19]) == s.get("pid_starttime")
    except (OSError, KeyError, TypeError, ValueError):
        live = False
    print(json.dumps({"session": s.get("session_id"), "status": s.get("status"), "pid": s.get("pid"), "live": live}))
"""


def lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def as_postgres(host, command: str, *args) -> str:
    with host.sudo("postgres"):
        return host.check_output(command, *args)


@pytest.fixture
def backups(store) -> list:
    """Every backup.json in the host's repository, oldest first."""
    out = store.run("find %s -mindepth 2 -maxdepth 2 -name backup.json", store.repository)
    return [json.loads(store.read(path)) for path in sorted(out.split())]


@pytest.fixture
def system_identifier(sql) -> str:
    return sql("SELECT system_identifier FROM pg_control_system()")[0][0]


def test_one_complete_backup_of_this_cluster(me, backups, sql, system_identifier, fleet):
    assert len(backups) == 1, [b.get("id") for b in backups]
    (b,) = backups
    assert b["status"] == "complete", b
    assert b["method"] == "tar"
    assert b["compression"] == COMPRESSION[me["name"]]
    assert b["system_identifier"] == system_identifier
    assert b["data_directory"] == me["pg"]["data"]
    assert str(b["pg_version"]).startswith(str(me["major"])), b["pg_version"]
    assert LSN.match(b["start_lsn"]) and LSN.match(b["stop_lsn"]), b
    assert lsn(b["start_lsn"]) <= lsn(b["stop_lsn"]), b
    assert WAL.match(b["start_wal"]) and WAL.match(b["stop_wal"]), b
    assert b["start_wal"] <= b["stop_wal"]
    assert b["started_at"] <= b["stopped_at"]
    assert b["timeline"] >= 1
    assert b["bytes"] > 0
    assert b["id"] and b["label"]
    if me["upstream"]:
        # A backup of the standby is a backup of the primary's cluster, taken without loading the primary.
        assert b["backup_from"] == "standby", b
        primary = fleet[me["upstream"]]
        query = "SELECT system_identifier FROM pg_control_system()"
        assert sql(query, via=primary) == [[system_identifier]]
    else:
        assert b["backup_from"] == "primary", b


def test_backup_files(me, store, backups):
    b = backups[-1]
    path = f"{store.repository}/{b['id']}"
    names = set(store.run("ls -A %s", path).split())
    base = "base.tar" + SUFFIX[b["compression"]]
    assert {"backup.json", "backup_label", "backup_manifest", base} <= names, names
    assert not {"tablespace_map", "base.tar"} & (names - {base}), names  # no tablespaces; compressed only

    label = store.read(f"{path}/backup_label")
    assert f"START WAL LOCATION: {b['start_lsn']} (file {b['start_wal']})" in label, label
    # PostgreSQL 13 and older still wrote "master" for a primary.
    source = "master" if b["backup_from"] == "primary" and me["major"] <= 13 else b["backup_from"]
    assert f"BACKUP FROM: {source}" in label, label
    assert f"START TIMELINE: {b['timeline']}" in label, label

    manifest = json.loads(store.read(f"{path}/backup_manifest"))
    assert manifest["PostgreSQL-Backup-Manifest-Version"] == (2 if me["major"] >= 17 else 1)
    assert any(f["Path"] == "global/pg_control" for f in manifest["Files"])
    assert manifest["WAL-Ranges"][0]["Start-LSN"] == b["start_lsn"]

    # The archive holds a data directory without the live server's WAL and pid file.
    listing = set(store.run(f"tar {TAR_FLAG[b['compression']]} -tf %s", f"{path}/{base}").split())
    listing = {n.removeprefix("./") for n in listing}
    assert {"PG_VERSION", "global/pg_control", "postgresql.conf"} <= listing
    assert "postmaster.pid" not in listing and "backup_label" not in listing
    assert not [n for n in listing if n.startswith("pg_wal/") and not n.endswith("/")], "WAL files in the archive"


def test_wal_the_backup_needs_is_archived(store, backups):
    b = backups[-1]
    archived = set(store.run("ls -A %s", store.archive).split())
    for name in (b["start_wal"], b["stop_wal"]):
        # pgops-wal stores it compressed (the PostgreSQL 13 primary archives with it).
        assert archived & {name, f"{name}.zst"}, f"{name} missing from {store.archive} on {store.name}"


def test_repository_is_private(store):
    """Backups hold every row of the cluster: their owner alone may read them."""
    out = store.run("find %s -printf '%%y %%m %%u %%p\\n'", store.repository)
    entries = [line.split(" ", 3) for line in out.splitlines()]
    assert len(entries) > 5, out
    wrong = [e for e in entries if e[2] != store.owner or (e[0] == "d" and e[1] != "700") or (e[0] == "f" and e[1] != "600")]
    assert not wrong, wrong
    assert {e[0] for e in entries} <= {"d", "f"}, entries


def test_remote_backups_leave_nothing_on_the_database_host(host, me, store):
    if store.name == me["name"]:
        pytest.skip("this host keeps its own repository")
    with host.sudo():
        assert host.check_output("ls -A %s", os.path.join(me["dir"], "backup")) == ""


def test_no_lock_left(store):
    out = store.run("find %s -maxdepth 2 -path '*/.locks/*'", store.repository)
    assert out.strip() == "", f"lock left behind: {out}"


def test_no_backup_session_left_on_the_server(sql):
    rows = sql("SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE 'pgops.online_backup keeper%'")
    assert rows == [], rows


def test_no_keeper_left(host, system_identifier):
    """No session keeper (comm pgops-keeper) of this cluster still runs, and none is recorded as running.

    The process table is shared with whatever else runs on this machine, so a
    keeper counts as this cluster's through its session record (the module
    removes the record once a backup is stopped; a keeper still connected
    would show in pg_stat_activity, checked above).
    """
    out = as_postgres(host, "/usr/bin/python3 -c %s %s", SESSIONS, system_identifier)
    sessions = [json.loads(line) for line in out.splitlines()]
    assert not [s for s in sessions if s["live"] or s["status"] == "running"], sessions
    keepers = host.run("pgrep -x pgops-keeper -u postgres")
    assert keepers.rc in (0, 1), keepers.stderr
    live_pids = {int(p) for p in keepers.stdout.split()}
    assert not live_pids & {s["pid"] for s in sessions}, sessions


def test_cluster_still_serves(me, sql):
    """The backup left the live cluster as it was: up, and the standby still replaying."""
    in_recovery = sql("SELECT pg_is_in_recovery()")[0][0]
    assert in_recovery == ("t" if me["upstream"] else "f")
    if me["upstream"]:
        assert sql("SELECT status FROM pg_stat_wal_receiver")[0][0] == "streaming"
    assert int(sql("SELECT count(*) FROM fleet_seed")[0][0]) == 1000


def test_restore_drill_passed(store, backups):
    """converge's drill restored this backup into a scratch server, recovered it and checked it."""
    b = backups[-1]
    drill = b.get("drill")
    assert drill, f"no drill recorded in backup {b['id']}"
    assert drill["result"] == "passed", drill
    assert drill["error"] is None
    checks = {c["name"]: c for c in drill["checks"]}
    assert {"manifest", "recovery"} <= set(checks), list(checks)
    assert all(c["ok"] for c in drill["checks"]), drill["checks"]
    assert drill["target"] == "immediate"
    # Consistent means: replayed at least up to the end of the backup.
    assert lsn(drill["reached_lsn"]) >= lsn(b["stop_lsn"]), (drill["reached_lsn"], b["stop_lsn"])
    # The scratch server is gone with its directory (the drill ran where the repository is).
    assert store.run("ls -A %s", store.scratch).strip() == ""
    # (ps, not pgrep -f: the shell running pgrep would carry the path in its own command line)
    left = [line for line in store.host.check_output("ps -eo pid=,args=").splitlines() if store.scratch in line]
    assert not left, left
