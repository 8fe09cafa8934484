"""The backup list for people (pg_backup_info format=table, the list playbook): sizes, durations,
the columns of complete, failed, running and incremental backups, old and damaged backup.json files,
and pg_backup_info's own answer, without a server."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import subprocess
import sys

from harness.ansible import REPO, collections_workspace

sys.path.insert(0, collections_workspace())
status = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._status")

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.timezone.utc)
SYSID = "7714565372798160724"
GiB = 1024**3


def complete(**extra) -> dict:
    return {
        "id": "20261201T100000Z", "status": "complete", "system_identifier": SYSID, "inventory_hostname": "db1",
        "pg_version": 170006, "pg_version_text": "17.6", "data_directory": "/var/lib/postgresql/17/main",
        "created_at": "2026-12-01T10:00:00+00:00", "started_at": "2026-12-01T10:00:01.497+00:00",
        "stopped_at": "2026-12-01T10:02:06.697+00:00", "duration": 125.2, "bytes": int(1.2 * GiB),
        "source_bytes": int(4.6 * GiB), "size_on_disk": int(1.3 * GiB), "start_wal": "000000010000000000000007",
        "stop_wal": "000000010000000000000009", **extra,
    }  # fmt: skip


def row(entry: dict) -> dict:
    return dict(zip(status.LIST_HEAD, status.list_row(entry, NOW)))


def test_a_complete_backup_has_every_column():
    r = row(
        complete(
            verification={"verified": True, "at": "2026-12-01T10:20:00Z", "problems_count": 0},
            drill={"result": "passed", "at": "2026-12-01T11:00:00Z"},
        )
    )
    assert r == {
        "id": "20261201T100000Z",
        "type": "full",
        "status": "complete",
        "started (UTC)": "2026-12-01 10:00",
        "duration": "2m05s",
        "stored / source": "1.2 GiB / 4.6 GiB",
        "WAL range": "000000010000000000000007 .. 000000010000000000000009",
        "verified": "ok 2026-12-01 10:20",
        "last drill": "passed 2026-12-01 11:00",
    }


def test_a_backup_json_without_type_is_full_and_an_incremental_names_its_parent():
    assert row(complete())["type"] == "full"
    assert row(complete(type="full"))["type"] == "full"
    assert row(complete(type="incremental", parent="20261130T100000Z"))["type"] == "incr of 20261130T100000Z"
    assert row(complete(type="incremental"))["type"] == "incr of ?", "a parent that is not recorded is not invented"


def test_the_newest_verification_and_the_newest_drill_are_shown():
    r = row(
        complete(
            verification={"verified": False, "at": "2026-12-01T10:30:00Z", "problems_count": 3},
            drill={"result": "failed", "at": "2026-12-01T11:00:00Z", "error": "checks failed"},
            inconclusive_drill={"result": "inconclusive", "at": "2026-12-01T11:30:00Z"},
        )
    )
    assert r["verified"] == "FAILED 2026-12-01 10:30"
    assert r["last drill"] == "inconclusive 2026-12-01 11:30"
    older = row(
        complete(drill={"result": "failed", "at": "2026-12-01T11:00:00Z"}, inconclusive_drill={"at": "2026-12-01T09:00:00Z"})
    )
    assert older["last drill"] == "failed 2026-12-01 11:00"
    never = row(complete())
    assert (never["verified"], never["last drill"]) == ("never", "never")


def test_a_running_backup_counts_its_time_so_far():
    r = row({"id": "20261201T115800Z", "status": "running", "created_at": "2026-12-01T11:57:55+00:00"})
    assert r["duration"] == "2m05s so far"
    assert r["started (UTC)"] == "2026-12-01 11:57"
    assert (r["stored / source"], r["WAL range"], r["verified"], r["last drill"]) == ("-", "-", "-", "-")
    assert status.list_row({"id": "x", "status": "running", "created_at": "2026-12-01T11:57:55+00:00"})[4] == "-"


def test_a_failed_backup_lasts_until_it_failed_and_its_error_is_a_note():
    failed = {
        "id": "20261130T100000Z", "status": "failed", "system_identifier": SYSID, "created_at": "2026-11-30T10:00:00+00:00",
        "failed_at": "2026-11-30T10:00:14+00:00", "error": "the copy failed:\n  tar exited with 2", "start_wal": None,
    }  # fmt: skip
    r = row(failed)
    assert (r["status"], r["duration"], r["stored / source"], r["WAL range"]) == ("failed", "14s", "-", "-")
    lines = status.backup_table([failed], NOW)
    assert lines[-1] == "  20261130T100000Z failed: the copy failed: tar exited with 2"
    long = status.backup_table([dict(failed, error="x" * 500)], NOW)[-1]
    assert long.endswith("...") and len(long) < 250


def test_missing_fields_are_dashes_and_odd_values_are_shown_as_they_are():
    r = row({"id": "20261201T100000Z"})
    assert r == {
        "id": "20261201T100000Z", "type": "full", "status": "-", "started (UTC)": "-", "duration": "-",
        "stored / source": "-", "WAL range": "-", "verified": "-", "last drill": "-",
    }  # fmt: skip
    odd = row(complete(started_at="yesterday", duration=None, bytes=None, stop_wal=None, type="differential"))
    assert odd["started (UTC)"] == "yesterday" and odd["type"] == "differential"
    assert odd["duration"] == "-", "no duration and a start that is not a time: unknown"
    assert odd["stored / source"] == "1.3 GiB / 4.6 GiB", "size_on_disk stands in for bytes"
    assert odd["WAL range"] == "000000010000000000000007 .. ?"
    assert row(complete(duration=None))["duration"] == "2m05s", "from started_at to stopped_at"
    assert row({"id": "20261201T100000Z", "status": "invalid", "error": "not a JSON object"})["type"] == "-"


def test_the_table_is_per_cluster_newest_first_in_fixed_width_columns():
    other = "7714565372798160999"
    entries = [
        complete(id="20261129T100000Z", pinned={"at": "2026-11-30T00:00:00Z", "reason": "audit"}),
        complete(id="20261201T110000Z", system_identifier=other, inventory_hostname="db2", pg_version_text="13.20"),
        {"id": "20261201T115800Z", "status": "running", "system_identifier": SYSID, "created_at": "2026-12-01T11:58:00+00:00"},
        complete(type="incremental", parent="20261129T100000Z"),
        {"id": "20261201T000000Z", "status": "invalid", "error": "/backup/pg/20261201T000000Z/backup.json is not a JSON object"},
    ]
    lines = status.backup_table(entries, NOW, {SYSID: "20261201T100000Z"}, "/backup/pg")
    assert lines[0] == "5 backup(s) of 3 cluster(s) in /backup/pg"
    headings = [i for i, line in enumerate(lines) if line.startswith(("cluster ", "backups of no known cluster"))]
    assert [lines[i - 1] for i in headings] == ["", "", ""], "an empty line before each cluster"
    assert lines[headings[0]] == (
        f"cluster {SYSID} (db1; PostgreSQL 17.6; /var/lib/postgresql/17/main): 3 backup(s), 2 complete; latest: 20261201T100000Z"
    )
    assert lines[headings[1]].startswith(f"cluster {other} (db2; PostgreSQL 13.20;")
    assert lines[headings[1]].endswith("latest: none (no complete backup that is not known to be damaged)")
    assert lines[headings[2]].startswith("backups of no known cluster: 1 backup(s), 0 complete")
    mine = lines[headings[0] + 1 : headings[1] - 1]
    head, body, notes = mine[0], mine[1:4], mine[4:]
    assert head.split("  ")[0] == "id" and "stored / source" in head and head.rstrip().endswith("last drill")
    assert [line[:16] for line in body] == ["20261201T115800Z", "20261201T100000Z", "20261129T100000Z"], "newest first"
    # Fixed width: every column starts where its header does.
    for name in status.LIST_HEAD:
        at = head.index(name)
        for line in body:
            assert (at == 0 or line[at - 2 : at] == "  ") and line[at] != " ", (name, line)
    assert "incr of 20261129T100000Z" in body[1] and "2m00s so far" in body[0]
    assert notes == ["  20261129T100000Z pinned: audit"]
    assert lines[-1].startswith("  20261201T000000Z invalid: /backup/pg/20261201T000000Z/backup.json is not a JSON object")
    # Without latest, nothing is said about it; without backups, one line.
    assert "latest" not in status.backup_table(entries[:1], NOW)[2]
    assert status.backup_table([], NOW, {}, "/backup/pg") == ["no backups in /backup/pg"]


def test_the_report_table_keeps_its_columns():
    """The status report's table shares the column code."""
    row_ = {
        "host": "db1", "cluster": SYSID, "newest_backup": "20261201T100000Z", "backup_age_hours": 2.0, "window_hours": 26.5,
        "gaps": 0, "first_missing": None, "newest_drill": None, "last_drill_result": None, "drill_age_hours": None,
        "archive_problems": [], "violations": [],
    }  # fmt: skip
    head, line = status.table([row_])
    assert head.index("newest backup") == line.index("20261201T100000Z")
    assert line.split() == ["db1", SYSID, "20261201T100000Z", "2", "26.5", "0", "never", "-", "ok", "ok"]


def test_pg_backup_info_format_table(tmp_path, add_backup):
    """The module itself on a repository: format json leaves the answer as it was, table adds the lines."""
    add_backup(tmp_path, "20261130T100000Z", **{k: v for k, v in complete().items() if k not in ("id", "status")})
    add_backup(tmp_path, "20261201T100000Z", status="failed", system_identifier=SYSID, error="tar exited with 2")
    add_backup(tmp_path, "20261201T110000Z", raw="{not json")

    def run(**args) -> dict:
        payload = json.dumps({"ANSIBLE_MODULE_ARGS": {"repository": str(tmp_path), **args}})
        env = dict(os.environ, PYTHONPATH=collections_workspace())
        module = os.path.join(REPO, "plugins", "modules", "pg_backup_info.py")
        proc = subprocess.run([sys.executable, module], input=payload, capture_output=True, text=True, env=env)
        return json.loads(proc.stdout)

    plain = run()
    assert "table" not in plain and plain["count"] == 3 and plain["latest"] == "20261130T100000Z", plain
    as_json = run(format="json")
    assert as_json.keys() == plain.keys()
    listed = run(format="table")
    assert {k: v for k, v in listed.items() if k not in ("table", "invocation")} == {
        k: v for k, v in plain.items() if k != "invocation"
    }
    text = "\n".join(listed["table"])
    assert listed["table"][0] == f"3 backup(s) of 2 cluster(s) in {tmp_path}"
    heading = f"cluster {SYSID} (db1; PostgreSQL 17.6; /var/lib/postgresql/17/main): 2 backup(s), 1 complete"
    assert heading + "; latest: 20261130T100000Z" in text
    assert "  20261201T100000Z failed: tar exited with 2" in text
    assert "20261201T110000Z  -     invalid" in text
    only_failed = run(format="table", status=["failed"])
    assert [line[:16] for line in only_failed["table"] if line.startswith("2026")] == ["20261201T100000Z"]
    bad = run(format="yaml")
    assert bad.get("failed") and "format" in bad["msg"], bad
