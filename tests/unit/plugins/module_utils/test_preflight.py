"""The pre-flight rules of pg_archiving_info, without a server."""

from __future__ import annotations

import copy
import importlib
import io
import os
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
pf = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._preflight")
archiving = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._archiving")

GOOD = {
    "server_version": "15.20",
    "server_version_num": 150020,
    "in_recovery": False,
    "wal_level": "replica",
    "archive_mode": "on",
    "archive_command": "cp %p /archive/%f",
    "archive_library": "",
    "archive_timeout": 0,
    "full_page_writes": True,
    "archiver": {
        "archived_count": 3,
        "last_archived_wal": "000000010000000000000003",
        "last_archived_time": "2026-11-29T10:00:00+00:00",
        "failed_count": 0,
        "last_failed_wal": None,
        "last_failed_time": None,
    },
    "ready_count": 0,
    "privileges": {
        "role": "postgres",
        "superuser": True,
        "can_start_backup": True,
        "can_switch_wal": True,
        "can_read_data_directory": True,
    },
    "proof": {"performed": True, "wal": "000000010000000000000004", "seconds": 0.1, "timeout": 60, "outcome": "archived"},
}


def facts(**changes) -> dict:
    out = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def codes(problems: list) -> list:
    return [p["code"] for p in problems]


def test_good_configuration_has_no_problem():
    assert pf.evaluate(facts()) == []


def test_every_problem_has_message_and_hint():
    cases = [
        facts(server_version_num=110022, server_version="11.22"),
        facts(wal_level="minimal", archive_mode="off"),
        facts(archive_command=""),
        facts(server_version_num=160000, archive_library="basic_archive"),
        facts(proof={"performed": False}, archiver={"last_failed_time": "2026-11-29T11:00:00+00:00"}),
        facts(privileges={"can_start_backup": False, "can_switch_wal": False, "superuser": False}),
    ]
    for case in cases:
        for p in pf.evaluate(case):
            assert p["code"] in pf.CODES
            assert len(p["message"]) > 30 and len(p["hint"]) > 20, p


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"archive_mode": "off", "proof": {"performed": False}}, ["archive_mode_off"]),
        ({"archive_command": ""}, ["archive_command_empty"]),
        ({"wal_level": "minimal", "archive_mode": "off"}, ["wal_level_minimal", "archive_mode_off"]),
        ({"server_version_num": 110022, "server_version": "11.22"}, ["server_too_old"]),
        ({"server_version_num": 160004, "archive_library": "basic_archive"}, ["both_command_and_library"]),
        ({"in_recovery": True}, ["standby_archive_mode_not_always"]),
        ({"in_recovery": True, "archive_mode": "off"}, ["standby_archive_mode_not_always"]),
        ({"in_recovery": True, "archive_mode": "always"}, []),
        ({"in_recovery": True, "archive_mode": "always", "archive_command": ""}, ["archive_command_empty"]),
    ],
)
def test_settings_rules(changes, expected):
    assert codes(pf.evaluate(facts(**changes))) == expected


def test_restart_or_reload_is_said():
    by_code = {p["code"]: p for p in pf.evaluate(facts(wal_level="minimal", archive_mode="off"))}
    assert "restart" in by_code["wal_level_minimal"]["hint"] and "wal_level = replica" in by_code["wal_level_minimal"]["hint"]
    assert "restart" in by_code["archive_mode_off"]["hint"] and "archive_mode = 'on'" in by_code["archive_mode_off"]["hint"]
    (empty,) = pf.evaluate(facts(archive_command=""))
    assert "pg_reload_conf()" in empty["hint"] and "no restart" in empty["hint"]
    (standby,) = pf.evaluate(facts(in_recovery=True))
    assert "archive_mode = 'always'" in standby["hint"] and "restart" in standby["hint"]


def test_hidden_archive_command_is_not_reported_empty():
    # pg_settings may hide a setting from a role: unknown is not empty.
    assert pf.evaluate(facts(archive_command=None)) == []


def test_archive_library_alone_is_fine_and_both_only_fail_on_16():
    assert pf.evaluate(facts(archive_command="", archive_library="basic_archive")) == []
    # 15 uses the library and ignores the command; 16 refuses both.
    assert pf.evaluate(facts(archive_library="basic_archive")) == []
    assert codes(pf.evaluate(facts(server_version_num=180001, archive_library="x"))) == ["both_command_and_library"]


def test_empty_command_before_15_does_not_mention_archive_library():
    (p,) = pf.evaluate(facts(server_version_num=130022, archive_command="", archive_library=None, ready_count=7))
    assert "archive_library" not in p["message"] + p["hint"]
    assert "7 WAL file(s) already wait" in p["message"]


FAILED_ROW = {
    "last_failed_wal": "000000010000000000000004",
    "last_failed_time": "2026-11-29T10:05:00+00:00",
    "failed_count": 5,
}


@pytest.mark.parametrize(
    ("row", "failing"),
    [
        ({}, False),
        ({"last_failed_time": None, "last_archived_time": "2026-11-29T10:00:00+00:00"}, False),
        ({"last_failed_time": "2026-11-29T10:05:00+00:00", "last_archived_time": None}, True),
        ({"last_failed_time": "2026-11-29T10:05:00+00:00", "last_archived_time": "2026-11-29T10:00:00+00:00"}, True),
        ({"last_failed_time": "2026-11-29T09:00:00+00:00", "last_archived_time": "2026-11-29T10:00:00+00:00"}, False),
        ({"last_failed_time": "2026-10-25T02:10:00+01:00", "last_archived_time": "2026-10-25T02:30:00+02:00"}, True),
    ],
)
def test_archiver_failing(row, failing):
    assert pf.archiver_failing(row) is failing


def test_archiver_failing_without_proof():
    (p,) = pf.evaluate(facts(proof={"performed": False}, archiver=FAILED_ROW, ready_count=2))
    assert p["code"] == "archiver_failing"
    assert "000000010000000000000004" in p["message"] and "2 WAL file(s) waiting" in p["message"]
    assert "archive_command" in p["hint"]


def test_failure_older_than_success_is_not_failing():
    row = dict(FAILED_ROW, last_failed_time="2026-11-29T09:00:00+00:00")
    assert pf.evaluate(facts(proof={"performed": False}, archiver=row)) == []


def test_failing_compares_instants_not_strings():
    # Autumn DST change: 02:10+01:00 is after 02:30+02:00, though it sorts before it.
    row = {
        "last_archived_wal": "000000010000000000000003",
        "last_archived_time": "2026-10-25T02:30:00+02:00",
        "last_failed_wal": "000000010000000000000004",
        "last_failed_time": "2026-10-25T02:10:00+01:00",
    }
    assert codes(pf.evaluate(facts(proof={"performed": False}, archiver=row))) == ["archiver_failing"]


def test_successful_proof_wins_over_an_old_failure():
    assert pf.evaluate(facts(archiver=FAILED_ROW)) == []


def test_failed_proof_is_reported_once():
    (p,) = pf.evaluate(facts(archiver=FAILED_ROW, proof={"outcome": "failed", "seconds": 0.4}))
    assert p["code"] == "archive_proof_failed"
    assert "the proof segment 000000010000000000000004" in p["message"] and "0.4s" in p["message"]


def test_failed_proof_on_an_earlier_segment_says_so():
    row = dict(FAILED_ROW, last_failed_wal="000000010000000000000002")
    (p,) = pf.evaluate(facts(archiver=row, proof={"outcome": "failed"}))
    assert p["code"] == "archive_proof_failed"
    assert "000000010000000000000002, which comes before the proof segment 000000010000000000000004" in p["message"]


def test_proof_timeout():
    (p,) = pf.evaluate(facts(proof={"outcome": "timeout", "timeout": 5.0}))
    assert p["code"] == "archive_proof_timeout"
    assert "5.0s" in p["message"] and "prove_timeout" in p["hint"]


def test_settings_problem_hides_archiver_state():
    # The archiver cannot work without a command; one problem, the cause.
    got = pf.evaluate(facts(archive_command="", proof={"performed": False}, archiver=FAILED_ROW))
    assert codes(got) == ["archive_command_empty"]


NO_PRIVS = {"role": "bob", "superuser": False, "can_start_backup": False, "can_switch_wal": False}


def test_missing_privilege_names_the_grants_of_the_major():
    (p,) = pf.evaluate(facts(privileges=NO_PRIVS, proof={"performed": False}))
    assert p["code"] == "missing_backup_privilege"
    assert 'GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO "bob";' in p["hint"]
    assert 'GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO "bob";' in p["hint"]
    assert 'GRANT EXECUTE ON FUNCTION pg_switch_wal() TO "bob";' in p["hint"]
    (old,) = pf.evaluate(facts(server_version_num=130022, privileges=NO_PRIVS, proof={"performed": False}))
    assert 'GRANT EXECUTE ON FUNCTION pg_start_backup(text, boolean, boolean) TO "bob";' in old["hint"]
    assert 'GRANT EXECUTE ON FUNCTION pg_stop_backup(boolean, boolean) TO "bob";' in old["hint"]


def test_switch_grant_only_when_the_proof_needs_it():
    (p,) = pf.evaluate(facts(privileges=NO_PRIVS), prove=False)
    assert "pg_switch_wal" not in p["hint"]
    (p,) = pf.evaluate(facts(privileges=dict(NO_PRIVS, can_switch_wal=True)))
    assert "pg_switch_wal" not in p["hint"]


def test_cannot_switch_wal():
    privs = dict(NO_PRIVS, can_start_backup=True)
    (p,) = pf.evaluate(facts(privileges=privs))
    assert p["code"] == "cannot_switch_wal" and 'pg_switch_wal() TO "bob"' in p["hint"]
    assert pf.evaluate(facts(privileges=privs), prove=False) == []
    # A standby never switches WAL: not its problem.
    assert pf.evaluate(facts(privileges=privs, in_recovery=True, archive_mode="always")) == []


def test_require_privileges_false():
    assert codes(pf.evaluate(facts(privileges=NO_PRIVS), require_privileges=False)) == ["cannot_switch_wal"]
    assert pf.evaluate(facts(privileges=NO_PRIVS), prove=False, require_privileges=False) == []


def test_format_problems_one_line_each():
    text = pf.format_problems(pf.evaluate(facts(wal_level="minimal", archive_mode="off")))
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("wal_level_minimal: ") and lines[1].startswith("archive_mode_off: ")


# -- destination


def test_resolve_follows_symlinks_of_the_existing_part(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert pf.resolve(str(tmp_path / "link")) == os.path.realpath(tmp_path / "real")
    assert pf.resolve(str(tmp_path / "link" / "a" / "b")) == os.path.join(os.path.realpath(tmp_path / "real"), "a", "b")


def dest_codes(tmp_path, path, expected_bytes=1000, margin=1.1) -> list:
    data = tmp_path / "data"
    ts = tmp_path / "ts"
    data.mkdir(exist_ok=True)
    ts.mkdir(exist_ok=True)
    tablespaces = [{"oid": 16384, "name": "fast", "location": str(ts)}]
    dest = pf.inspect_destination(path, str(data), tablespaces, expected_bytes, margin)
    return pf.destination_problems(dest)


def test_destination_rules(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data", target_is_directory=True)
    assert dest_codes(tmp_path, str(tmp_path / "backups" / "new")) == []
    assert codes(dest_codes(tmp_path, "backups")) == ["destination_not_absolute"]
    assert codes(dest_codes(tmp_path, str(tmp_path / "data" / "b"))) == ["destination_inside_data_directory"]
    assert codes(dest_codes(tmp_path, str(tmp_path / "link" / "b"))) == ["destination_inside_data_directory"]
    assert codes(dest_codes(tmp_path, str(tmp_path / "ts" / "PG_15" / "b"))) == ["destination_inside_tablespace"]
    assert dest_codes(tmp_path, str(tmp_path / "data2")) == []


def test_destination_space(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    (p,) = dest_codes(tmp_path, str(tmp_path / "b"), expected_bytes=free, margin=2.0)
    assert p["code"] == "destination_insufficient_space"
    assert p["message"].count(" MB") >= 2 and "2.0 x" in p["message"]
    # Unknown size: nothing to compare.
    assert dest_codes(tmp_path, str(tmp_path / "b"), expected_bytes=None) == []


def test_destination_without_data_directory_checks_the_rest(tmp_path):
    dest = pf.inspect_destination(str(tmp_path / "b"), None, [], 10, 1.1)
    assert dest["data_directory"] is None
    assert pf.destination_problems(dest) == []
    assert codes(pf.evaluate(facts(destination=pf.inspect_destination("rel", None, [], 10, 1.1)))) == ["destination_not_absolute"]


def test_age_recipients_are_read_from_pgops_wal_archive_command_as_the_shell_splits_it():
    ssh_key = "ssh-ed25519 AAAAC3Nza 100%% ops"  # an SSH public key with a comment, quoted, % doubled
    command = f"/usr/local/bin/pgops-wal push --repository /b --age-recipient age1abc --age-recipient '{ssh_key}' %p"
    assert archiving.age_recipients(command) == ["age1abc", "ssh-ed25519 AAAAC3Nza 100% ops"]
    assert archiving.age_recipients("/usr/local/bin/pgops-wal push --repository /b --age-recipient=age1x %p") == ["age1x"]
    assert archiving.age_recipients("/usr/local/bin/pgops-wal push --repository /b %p") == [], "WAL in clear"
    assert archiving.age_recipients("cp %p /archive/%f") is None, "not pgops-wal: not judged"
    assert archiving.age_recipients(None) is None, "unreadable"
    assert archiving.age_recipients("pgops-wal push --age-recipient 'unterminated %p") is None


def test_a_proof_that_did_not_switch_proves_nothing():
    """On an idle server whose role may write no WAL record, pg_switch_wal() switches nothing and the
    segment waited for is an old one, archived long ago: not a proof of archive_command now."""
    problems = pf.evaluate(facts(proof={"switched": False}))
    assert codes(problems) == ["archive_proof_not_switched"], problems
    assert "pg_logical_emit_message" in problems[0]["hint"]
    assert pf.evaluate(facts(proof={"switched": True})) == []


def test_the_proof_writes_a_record_before_switching_even_without_pg_logical_emit_message(monkeypatch):
    """Right after a switch nothing is written, so pg_switch_wal() would switch nothing: the proof first
    writes a logical message, or, with EXECUTE on it revoked (a common hardening), assigns a transaction
    id, whose commit is a record. The server here is a stand-in that answers the proof's queries."""
    import psycopg2

    seg = 16 << 20
    state = {"insert": 2 * seg + 0x28, "asked": []}

    def query_one(conn, sql, args=None):
        state["asked"].append(sql)
        if "pg_logical_emit_message" in sql:
            raise psycopg2.Error("permission denied for function pg_logical_emit_message")
        if "txid_current" in sql:
            state["insert"] += 0x40  # the commit record
            return ("745",)
        if "pg_switch_wal" in sql:
            switched = state["insert"] % seg > 0x28
            end = (state["insert"] // seg + 1) * seg if switched else state["insert"]
            return (f"{end >> 32:X}/{end & 0xFFFFFFFF:X}",)
        lsn = state["insert"]
        return (f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}", "000000010000000000000002")

    monkeypatch.setattr(archiving, "query_one", query_one)
    monkeypatch.setattr(archiving, "archiver_row", lambda conn: {"failed_count": 0})
    monkeypatch.setattr(
        archiving,
        "wait_for_segment_or_failure",
        lambda conn, wal, timeout, failed, **kw: {"archived": True, "outcome": "archived", "archiver": {}},
    )
    proof, _row = archiving.prove(None, {"wal_segment_size": seg}, 5)
    assert any("txid_current" in q for q in state["asked"]), state["asked"]
    assert proof["switched"] is True and proof["wal"] == "000000010000000000000002", proof
    assert pf.evaluate(facts(proof=proof)) == []


def test_the_systemd_unit_of_a_postmaster_is_read_from_its_cgroup(tmp_path, monkeypatch):
    config = importlib.import_module("ansible_collections.pgops.online_backup.plugins.modules.pg_archiving_config")
    (tmp_path / "postmaster.pid").write_text("4242\n/var/lib/postgresql/16/main\n")
    cgroups = {"/proc/4242/cgroup": "0::/system.slice/system-postgresql.slice/postgresql@16-main.service\n"}
    real_open = open

    def fake_open(path, *a, **kw):
        return io.StringIO(cgroups[path]) if path in cgroups else real_open(path, *a, **kw)

    main_pid = {"postgresql@16-main.service": "4242\n", "patroni.service": "77\n"}

    def systemctl(argv):  # as AnsibleModule.run_command answers
        return 0, main_pid[argv[-1]], ""

    monkeypatch.setattr("builtins.open", fake_open)
    assert config.service_unit(str(tmp_path), systemctl) == ("postgresql@16-main.service", True)
    cgroups["/proc/4242/cgroup"] = "0::/system.slice/patroni.service\n"
    assert config.service_unit(str(tmp_path), systemctl) == ("patroni.service", False), "a manager: it must restart the server"
    assert config.service_unit(str(tmp_path), lambda argv: (1, "", "no systemctl")) == ("patroni.service", None)
    cgroups["/proc/4242/cgroup"] = "0::/user.slice/user-1000.slice/session-4.scope\n"
    assert config.service_unit(str(tmp_path), systemctl) == (None, None), "started by hand in a login session"
    assert config.service_unit(str(tmp_path / "none"), systemctl) == (None, None)


def test_a_standby_whose_primary_cannot_be_reached_is_a_problem_not_a_crash():
    proof = {"performed": False, "outcome": "no_primary", "switched": False,
             "skipped_reason": "the primary could not be reached: unable to connect to the primary (10.0.0.5:5432)"}  # fmt: skip
    problems = pf.evaluate(facts(in_recovery=True, archive_mode="always", proof=proof))
    assert codes(problems) == ["standby_primary_unreachable"], problems
    assert "10.0.0.5:5432" in problems[0]["message"] and "pg_backup_primary_host" in problems[0]["hint"]


def test_a_patient_wait_outlasts_a_failure_the_archiver_then_retries_past(monkeypatch):
    """A standby sharing its primary's archive can fail once on a file the primary is still writing,
    then archive it on the retry: its proof waits on (patient); a primary's proof ends at the failure."""
    rows = iter(
        [{"failed_count": 1, "last_failed_wal": "000000010000000000000005", "last_failed_time": "2026-12-02T10:00:01+00:00",
          "last_archived_wal": "000000010000000000000004", "last_archived_time": "2026-12-02T10:00:00+00:00"}] * 2
        + [{"failed_count": 1, "last_archived_wal": "000000010000000000000005", "last_archived_time": "2026-12-02T10:00:02+00:00",
            "last_failed_wal": "000000010000000000000005", "last_failed_time": "2026-12-02T10:00:01+00:00"}] * 5
    )  # fmt: skip
    monkeypatch.setattr(archiving, "archiver_row", lambda conn: next(rows))
    monkeypatch.setattr(archiving, "_status_files", lambda conn, names: {})
    res = archiving.wait_for_segment_or_failure(None, "000000010000000000000005", 5, 0, first_poll=0, patient=True)
    assert res["outcome"] == "archived", res
    failing = {"failed_count": 1, "last_failed_wal": "000000010000000000000005", "last_failed_time": "2026-12-02T10:00:01+00:00"}
    rows = iter([dict(failing, last_archived_wal="000000010000000000000004", last_archived_time="2026-12-02T10:00:00+00:00")])
    assert archiving.wait_for_segment_or_failure(None, "000000010000000000000005", 5, 0, first_poll=0)["outcome"] == "failed"
