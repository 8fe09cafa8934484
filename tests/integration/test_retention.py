"""Retention by count and by recovery window with WAL expiry, pins, the preview, and the
coverage of the archive, against a real server under pgbench load archiving with pgops-wal."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time

from harness.ansible import REPO
from harness.backup import BACKUP, backup_vars, backups
from harness.monitoring import samples, scrape_textfiles
from harness.pg import free_port, make_pg_dir, stop_data_directory
from harness.wal import install_pgops_wal
from harness.workload import Writer, pgbench_init, pgbench_start, pgbench_stop, written_ids

EXPIRE = os.path.join(REPO, "playbooks", "expire.yml")
PIN = os.path.join(REPO, "playbooks", "pin.yml")
RESTORE = os.path.join(REPO, "playbooks", "restore.yml")
DRILL = os.path.join(REPO, "playbooks", "drill.yml")
STATUS = os.path.join(REPO, "playbooks", "status.yml")
COVERAGE = "pgops.online_backup.pg_backup_coverage"


def utc(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def wal_names(repo: str, sysid: str) -> list:
    return sorted(os.listdir(os.path.join(repo, "wal", sysid)))


def test_retention_by_window_and_count_keeps_what_pitr_needs(make_cluster, playbook, tmp_path):
    c = make_cluster(17)
    prog = install_pgops_wal(os.path.join(make_pg_dir("pgops-prog-"), "install"))
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    os.mkdir(repo, 0o700)
    subprocess.run(["chown", "postgres:postgres", repo], check=True)
    c.sql("ALTER SYSTEM SET archive_command = %s", (f"{prog} push --repository {repo} %p",))
    c.sql("SELECT pg_reload_conf()")
    sysid = str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    pgbench_init(c)
    bench = pgbench_start(c)
    writer = Writer(c)
    writer.start()
    try:
        for _ in range(5):
            run = playbook(BACKUP, extra_vars=backup_vars(c, repo))
            assert run.rc == 0, run
            c.sql("SELECT pg_switch_wal()")  # some WAL between backups, under load anyway
            time.sleep(1.2)  # one backup id per second
    finally:
        writer.stop()
        pgbench_stop(bench)
    b1, b2, b3, b4, b5 = backups(repo)
    ev = {"pg_backup_repository": repo, "pg_backup_login_unix_socket": c.sock, "pg_backup_port": c.port}

    # A pinned backup survives every rule.
    pin = playbook(PIN, extra_vars={**ev, "pg_backup_pin_backup": b2["id"], "pg_backup_pin_reason": "audit"})
    assert pin.rc == 0, pin
    assert backups(repo)[1]["pinned"]["reason"] == "audit"

    # The window starts between b3's and b4's stop: b4 and b5 inside, b3 the base of PITR to its start.
    window_start = utc(b3["stopped_at"]) + (utc(b4["stopped_at"]) - utc(b3["stopped_at"])) / 2
    keep_days = (datetime.datetime.now(datetime.timezone.utc) - window_start).total_seconds() / 86400
    wal_before = wal_names(repo, sysid)
    preview = playbook(EXPIRE, extra_vars={**ev, "pg_backup_keep_days": keep_days}, check=True, args=["--diff"])
    assert preview.rc == 0, preview
    said = preview.task("Say what was (or would be) removed and what stays")["msg"]
    assert f"would remove 1 backup(s) {b1['id']}" in said and "WAL file(s)" in said, said
    assert f"-backup {b1['id']}" in preview.stdout, "the diff lists what would go"
    assert [b["id"] for b in backups(repo)] == [b["id"] for b in (b1, b2, b3, b4, b5)] and wal_names(repo, sysid) == wal_before

    expire = playbook(EXPIRE, extra_vars={**ev, "pg_backup_keep_days": keep_days})
    assert expire.rc == 0, expire
    result = expire.task("Apply retention (pg_backup_keep, pg_backup_keep_days) and WAL expiry")["clusters"][sysid]
    assert result["removed"] == [b1["id"]], result
    assert [b["id"] for b in backups(repo)] == [b["id"] for b in (b2, b3, b4, b5)]
    # WAL older than the oldest kept backup (the pinned b2) is gone, history files stay, b2's own WAL stays.
    left = wal_names(repo, sysid)
    assert result["wal_removed"] and all(n[:24] < b2["start_wal"] for n in result["wal_removed"])
    assert min(n[:24] for n in left if len(n.split(".")[0]) == 24) == b2["start_wal"], left

    # The oldest moment inside the window is restorable with what is left: from b3, with pgops-wal.
    target = (window_start + datetime.timedelta(seconds=0.2)).isoformat(sep=" ")
    root = make_pg_dir("pgops-restore-")
    data = os.path.join(root, "data")
    rv = {
        "pg_restore_repository": repo, "pg_restore_data_directory": data, "pg_restore_port": 0,
        "pg_restore_unix_socket_directory": root, "pg_restore_recovery_timeout": 120, "pg_restore_target": "time",
        "pg_restore_target_value": target, "pg_restore_wal_program": prog,
    }  # fmt: skip
    run = playbook(RESTORE, extra_vars=rv)
    try:
        assert run.rc == 0, run
        assert run.task(f"Find backup latest in {repo}")["backup"]["id"] == b3["id"]
        port = run.task(f"Restore backup {b3['id']} into {data}")["port"]
        ids = written_ids(root, port)
        when = utc(target.replace(" ", "T"))
        # Every row committed before the target (the writer stamps a commit when it returns: a little slack).
        assert writer.committed_before(when - datetime.timedelta(seconds=0.1)) <= ids
        assert ids <= writer.committed_before(when + datetime.timedelta(seconds=0.1))
    finally:
        stop_data_directory(data)

    # By count: the newest two and the pin stay.
    run = playbook(EXPIRE, extra_vars={**ev, "pg_backup_keep": 2})
    assert run.rc == 0, run
    assert [b["id"] for b in backups(repo)] == [b2["id"], b4["id"], b5["id"]]

    # A drill to a random time inside the window, from the newest backup that stopped before it.
    window = coverage_of(playbook, repo)["window"]
    dv = {
        "pg_restore_repository": repo, "pg_restore_drill_target": "random", "pg_restore_wal_program": prog,
        "pg_restore_recovery_timeout": 120,
    }  # fmt: skip
    for _attempt in range(3):
        drill = playbook(DRILL, extra_vars=dv)
        if drill.rc == 0:
            break
        # The one acceptable miss: a time after the archive's last commit, kept apart as inconclusive.
        assert "was inconclusive" in drill.stdout, drill
        assert not any((b.get("drill") or {}).get("result") == "failed" for b in backups(repo))
    assert drill.rc == 0, drill
    (drilled,) = [b for b in backups(repo) if b.get("drill")]
    record = drilled["drill"]
    assert record["result"] == "passed" and record["target"] == "random", record
    target = utc(record["target_time"])
    assert utc(window["start"]) < target < utc(window["end"]), (window, record)
    stopped_before = [b for b in backups(repo) if utc(b["stopped_at"]) < target]
    assert drilled["id"] == stopped_before[-1]["id"], "the drill starts from the newest backup that stopped before its time"
    reached = utc(record["reached_time"])
    assert reached <= target and target - reached < datetime.timedelta(seconds=5), record
    assert "before commit" in record["recovery_stop"] and float(record["recovery_seconds"]) > 0, record

    # The recoverability report passes a policy the cluster meets, and publishes it.
    files = tmp_path / "status"
    files.mkdir()
    sv = {
        **ev, "pg_status_max_backup_age": 1, "pg_status_max_drill_age": 1, "pg_status_min_window": 0.001,
        "pg_status_report_file": str(files / "status.json"), "pg_status_metrics_file": str(files / "pgops_status.prom"),
    }  # fmt: skip
    status = playbook(STATUS, extra_vars=sv)
    assert status.rc == 0, status
    (row,) = json.loads((files / "status.json").read_text())["clusters"]
    assert (row["cluster"], row["newest_backup"], row["newest_drill"], row["gaps"]) == (sysid, b5["id"], drilled["id"], 0)

    # A hole in the archive: coverage names it and the window ends before it.
    hole = sorted(n for n in wal_names(repo, sysid) if n[:24] > b4["stop_wal"] and n[:24] < b5["start_wal"] and len(n) == 28)
    assert hole, "no segment between b4 and b5 to take away"
    os.unlink(os.path.join(repo, "wal", sysid, hole[0]))
    report = coverage_of(playbook, repo)
    assert report["gaps"][0]["missing"][0] == hole[0][:24], report["gaps"]
    assert report["window"]["end_wal"] < hole[0][:24], report["window"]
    assert report["window"]["from_backup"] == b2["id"]
    assert [b["wal_complete"] for b in report["backups"]] == [True, True, True]

    # The report fails, naming the gap, in its table, its JSON and its metrics (scraped by a real node_exporter).
    status = playbook(STATUS, extra_vars={**sv, "pg_status_min_window": 24})
    assert status.rc != 0, status
    failed = status.task("Fail where the policy is broken")["msg"]
    assert f"because segment {hole[0][:24]} is missing" in failed and "min_window 24" in failed, failed
    assert hole[0][:24] in "\n".join(status.task("Print the report")["msg"])
    (row,) = json.loads((files / "status.json").read_text())["clusters"]
    assert row["first_missing"] == hole[0][:24] and row["gaps"] >= 1 and row["violations"], row
    scraped = samples(scrape_textfiles(str(files)))
    labels = f'{{cluster="{sysid}",host="localhost"}}'
    assert scraped[f"pgops_status_wal_missing_segments{labels}"] == row["gaps"]
    assert scraped[f"pgops_status_policy_min_window_seconds{labels}"] == 24 * 3600
    assert scraped[f"pgops_status_window_seconds{labels}"] < 24 * 3600
    assert scraped[f"pgops_status_last_drill_passed{labels}"] == 1
    assert scraped[f"pgops_status_drill_timestamp_seconds{labels}"] == utc(record["at"]).timestamp()
    assert scraped[f"pgops_status_policy_violations{labels}"] == len(row["violations"])
    assert scraped["node_textfile_scrape_error"] == 0

    # A server that cannot be read is a row of the report that breaks the policy, not a host that drops out of it.
    status = playbook(STATUS, extra_vars={**sv, "pg_backup_port": free_port()})
    assert status.rc != 0, status
    (row,) = json.loads((files / "status.json").read_text())["clusters"]
    assert (row["host"], row["cluster"], row["archive_problems"]) == ("localhost", "unknown", ["server_unreadable"]), row
    assert any(v.startswith("the server could not be read") for v in row["violations"]), row


def coverage_of(playbook, repo: str) -> dict:
    cov = playbook(
        [{"hosts": "postgresql", "gather_facts": False, "tasks": [{"name": "coverage", COVERAGE: {"repository": repo}}]}]
    )
    assert cov.rc == 0, cov
    (report,) = cov.task("coverage")["clusters"]
    return report
