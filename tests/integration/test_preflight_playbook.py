"""The preflight playbook: a report per host, a failure naming every problem, nothing started;
pg_archiving_check proves archiving (one WAL switch) unless pg_backup_preflight_prove is false,
when pg_archiving_info only reads."""

from __future__ import annotations

import os

from harness.ansible import NODE_PYTHON, REPO

PREFLIGHT = os.path.join(REPO, "playbooks", "preflight.yml")
CHECK = "Check the server and the repository, and prove that WAL archiving works"
READ = "Check the server, its WAL archiving and the repository (read-only, no proof)"
REPORT = "Report what was found"
FAIL = "Fail when a backup would be refused"


def current_wal(c) -> str:
    """The WAL file being written. Not pg_current_wal_lsn(): right after a switch it
    sits exactly on the segment boundary, where pg_walfile_name() names the segment
    just finished, so a switch would go unseen until more WAL is written."""
    return c.sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")[0][0]


def statuses(run, name: str) -> dict:
    return {e["host"]: e["status"] for e in run.results if e["task"] == name}


def test_preflight_playbook_passes_a_good_host_and_names_problems_of_a_bad_one(make_cluster, playbook):
    good = make_cluster(16)
    bad = make_cluster(16, archive_mode="off")

    def inventory(**hostvars) -> str:
        extra = "".join(f" {k}={v}" for k, v in hostvars.items())
        return "[postgresql]\n" + "".join(
            f"{name} ansible_connection=local ansible_python_interpreter={NODE_PYTHON} "
            f"pg_backup_login_unix_socket={c.sock} pg_backup_port={c.port}{extra}\n"
            for name, c in (("good", good), ("bad", bad))
        )

    # Proof (the default): the good host's WAL is switched and archived.
    wal = current_wal(good)
    archived = good.sql("SELECT archived_count FROM pg_stat_archiver")[0][0]
    run = playbook(PREFLIGHT, inventory(), extra_vars={"pg_backup_prove_timeout": 30})
    assert run.rc != 0
    assert statuses(run, READ) == {"good": "skipped", "bad": "skipped"}
    assert statuses(run, FAIL) == {"good": "skipped", "bad": "failed"}
    failed = run.task(FAIL, host="bad")["msg"]
    assert "[archive_mode_off]" in failed and "restart" in failed and "Fix:" in failed, failed
    r = run.task(CHECK, host="good")
    proof = r["proof"]
    assert proof["performed"] and proof["archived"] and proof["wal"] == wal and proof["timeout"] == 30, proof
    assert r["changed"] is True and r["ok"] is True
    assert run.task(CHECK, host="bad")["changed"] is False  # archive_mode off: no proof, no switch
    assert current_wal(good) > wal
    assert good.sql("SELECT archived_count FROM pg_stat_archiver")[0][0] > archived
    report = run.task(REPORT, host="good")["msg"]
    assert report[0].startswith("PostgreSQL 16") and "(primary)" in report[0] and good.data in report[0], report
    assert "'archived': True" in report[2] and report[4] == "0 problem(s) []", report
    assert report[3].startswith("archive guard: 0 segment(s) waiting"), report
    assert run.task(REPORT, host="bad")["msg"][4] == "1 problem(s) ['archive_mode_off']"

    # pg_backup_preflight_prove=false (a string from the INI inventory): read-only, no WAL switch.
    wal = current_wal(good)
    run = playbook(PREFLIGHT, inventory(pg_backup_preflight_prove="false"))
    assert run.rc != 0
    assert statuses(run, CHECK) == {"good": "skipped", "bad": "skipped"}
    assert statuses(run, FAIL) == {"good": "skipped", "bad": "failed"}
    assert [e["task"] for e in run.results if e["result"].get("changed")] == []
    r = run.task(READ, host="good")
    assert r["ok"] is True and r["changed"] is False and r["proof"]["performed"] is False
    assert "pg_archiving_check" in run.task(REPORT, host="good")["msg"][2]
    assert current_wal(good) == wal
    failed = run.task(FAIL, host="bad")["msg"]
    assert "[archive_mode_off]" in failed and "Fix:" in failed, failed

    assert good.backups_in_progress() == 0 and bad.backups_in_progress() == 0
