"""Backups taken from a streaming standby (pg_backup_source)."""

from __future__ import annotations

import glob
import json
import os
import time

import pytest
from harness.ansible import NODE_PYTHON, REPO
from harness.layout import restore_backup
from harness.pg import Cluster, free_port, make_pg_dir, make_standby
from harness.workload import Writer

BACKUP = os.path.join(REPO, "playbooks", "backup.yml")
PG15 = "/usr/lib/postgresql/15/bin"


def caught_up(primary: Cluster, standby: Cluster, timeout: float = 30) -> None:
    target = primary.sql("SELECT pg_current_wal_lsn()::text")[0][0]
    deadline = time.monotonic() + timeout
    while not standby.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))[0][0]:
        assert time.monotonic() < deadline, "standby did not catch up"
        time.sleep(0.05)


def inventory(**hosts) -> str:
    lines = ["[postgresql]"]
    for name, c in hosts.items():
        lines.append(
            f"{name} ansible_connection=local ansible_python_interpreter={NODE_PYTHON} "
            f"pg_backup_login_unix_socket={c.sock} pg_backup_port={c.port}"
        )
    return "\n".join(lines) + "\n"


@pytest.fixture
def pair(make_cluster):
    primary = make_cluster(15)
    standby = None

    def build(archive_mode: str = "always"):
        nonlocal standby
        standby = make_standby(primary, archive_mode=archive_mode)
        return primary, standby

    yield build
    if standby is not None:
        standby.destroy()


def test_standby_backup_restores_to_consistency(pair, playbook):
    primary, standby = pair()
    primary.sql("CREATE TABLE t (id int)")
    primary.sql("INSERT INTO t SELECT generate_series(1, 1000)")
    writer = Writer(primary)
    writer.start()
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        time.sleep(0.3)
        caught_up(primary, standby)
        before = {i for i, _ in writer.committed}
        run = playbook(
            BACKUP,
            inventory(standby=standby),
            extra_vars={
                "pg_backup_repository": repo,
                "pg_backup_source": "standby",
                "pg_backup_fast_checkpoint": True,
                "pg_backup_compression": "zstd",
                "pg_backup_archive_timeout": 30,
            },
        )
    finally:
        writer.stop()
    assert run.rc == 0, run
    (path,) = glob.glob(os.path.join(repo, "2*", "backup.json"))
    info = json.load(open(path))
    assert info["status"] == "complete" and info["backup_from"] == "standby"
    label = open(os.path.join(os.path.dirname(path), "backup_label")).read()
    assert "BACKUP FROM: standby" in label
    stop = run.task("Stop the backup, write backup_label into it and wait for its WAL to be archived")
    assert stop["wal_archived"] is True and stop["primary_wal_switched"] in (True, False)
    assert os.path.exists(os.path.join(primary.archive, info["stop_wal"]))
    restored = restore_backup(os.path.dirname(path), primary.archive, 15)
    try:
        assert restored.sql("SELECT count(*) FROM t")[0][0] == 1000
        got = {r[0] for r in restored.sql("SELECT id FROM writer_log")}
        assert before <= got <= {i for i, _ in writer.committed}
    finally:
        restored.destroy()
    assert primary.backups_in_progress() == 0 and standby.backups_in_progress() == 0


def test_prefer_standby_picks_the_standby_and_skips_the_primary(pair, playbook):
    primary, standby = pair()
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    run = playbook(
        BACKUP,
        inventory(primary=primary, standby=standby),
        extra_vars={"pg_backup_repository": repo, "pg_backup_source": "prefer_standby", "pg_backup_fast_checkpoint": True},
    )
    assert run.rc == 0, run
    infos = [json.load(open(p)) for p in glob.glob(os.path.join(repo, "2*", "backup.json"))]
    pre = {r["host"]: r["result"].get("problems") for r in run.results if r["task"].startswith("Check the server")}
    assert [i["backup_from"] for i in infos] == ["standby"], pre
    assert "is backed up from standby" in run.stdout
    # The standby's archiving was proven, the primary switching WAL for it (from primary_conninfo).
    (proof,) = [r["result"]["proof"] for r in run.results if r["host"] == "standby" and r["task"].startswith("Check the server")
                and r["status"] == "ok" and r["result"].get("proof", {}).get("performed")]  # fmt: skip
    assert proof["switched_on"] == "primary" and proof["outcome"] == "archived", proof


def test_a_standby_whose_archiving_is_broken_is_refused_before_the_start(pair, playbook):
    """The standby cannot switch WAL, so its pre-flight used to read pg_stat_archiver only: an idle standby
    with a broken archive_command passed and its backup failed at the stop, after the whole copy. The
    primary now switches WAL for the proof and the standby's own archiver must archive that segment."""
    primary, standby = pair()
    standby.sql("ALTER SYSTEM SET archive_command = 'false'")
    standby.sql("SELECT pg_reload_conf()")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    v = {
        "pg_backup_repository": repo,
        "pg_backup_source": "standby",
        "pg_backup_prove_timeout": 20,
        "pg_backup_archive_timeout": 20,
    }
    run = playbook(BACKUP, inventory(standby=standby), extra_vars=v)
    assert run.rc != 0, run
    assert "archive_proof_failed" in run.stdout and "nothing was started" in run.stdout, run.stdout[-3000:]
    assert not os.path.exists(repo) and standby.backups_in_progress() == 0


def test_primary_source_refuses_a_standby_and_standby_needs_archive_mode_always(pair, playbook):
    primary, standby = pair(archive_mode="on")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    run = playbook(BACKUP, inventory(standby=standby), extra_vars={"pg_backup_repository": repo})
    assert run.rc != 0
    assert "this server is a standby" in run.stdout
    run = playbook(BACKUP, inventory(standby=standby), extra_vars={"pg_backup_repository": repo, "pg_backup_source": "standby"})
    assert run.rc != 0
    assert "standby_archive_mode_not_always" in run.stdout, run.stdout[-3000:]
    assert not os.path.exists(repo)
    assert standby.backups_in_progress() == 0


def test_a_standby_stop_that_does_not_wait_still_has_the_primary_finish_its_segment(pair, playbook):
    """pg_backup_wait_for_archive false on a standby (as the stop advises where the standby does not archive):
    the primary is still asked to switch WAL, so that on an idle primary without archive_timeout the stop
    segment is completed and archived instead of staying open while the backup is recorded complete."""
    primary, standby = pair()
    primary.sql("CREATE TABLE t (id int)")
    primary.sql("INSERT INTO t SELECT generate_series(1, 1000)")
    caught_up(primary, standby)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    run = playbook(
        BACKUP,
        inventory(standby=standby),
        extra_vars={"pg_backup_repository": repo, "pg_backup_source": "standby", "pg_backup_wait_for_archive": False},
    )
    assert run.rc == 0, run
    stop = run.task("Stop the backup, write backup_label into it and wait for its WAL to be archived")
    assert stop["wal_archived"] is False and stop["primary_wal_switched"] is True, stop
    (path,) = glob.glob(os.path.join(repo, "2*", "backup.json"))
    stop_wal = json.load(open(path))["stop_wal"]
    deadline = time.monotonic() + 30  # the primary's archiver, nothing else writing
    while not os.path.exists(os.path.join(primary.archive, stop_wal)):
        assert time.monotonic() < deadline, f"{stop_wal} was never archived: the primary did not finish it"
        time.sleep(0.1)


def test_a_standby_that_cannot_reach_its_primary_is_refused_before_the_start(pair, playbook):
    """The standby's proof and its stop both need the primary to switch WAL: no way there is a pre-flight
    problem naming the fix, before anything starts."""
    primary, standby = pair()
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    v = {"pg_backup_repository": repo, "pg_backup_source": "standby", "pg_backup_primary_host": "127.0.0.1",
         "pg_backup_primary_port": free_port()}  # fmt: skip
    run = playbook(BACKUP, inventory(standby=standby), extra_vars=v)
    assert run.rc != 0, run
    assert "standby_primary_unreachable" in run.stdout and "nothing was started" in run.stdout, run.stdout[-3000:]
    assert not os.path.exists(repo) and standby.backups_in_progress() == 0
