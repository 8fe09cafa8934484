"""Drills as policy against real servers: rotation through the clusters of a shared repository
(the one whose newest drill is oldest first), and input refused before anything runs."""

from __future__ import annotations

import os
import subprocess
import time

from harness.ansible import REPO
from harness.backup import BACKUP, backup_vars, backups
from harness.pg import make_pg_dir
from harness.wal import install_pgops_wal

DRILL = os.path.join(REPO, "playbooks", "drill.yml")
DRILL_SPEC = "Restore drill - restore a backup into a scratch directory, check it, record the result, clean up"


def drills(repo: str) -> dict:
    """system identifier -> (backup id, drill at) of each drilled backup."""
    return {str(b["system_identifier"]): (b["id"], b["drill"]["at"]) for b in backups(repo) if b.get("drill")}


def test_rotation_drills_the_cluster_whose_newest_drill_is_oldest(make_cluster, playbook):
    prog = install_pgops_wal(os.path.join(make_pg_dir("pgops-prog-"), "install"))
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    os.mkdir(repo, 0o700)
    subprocess.run(["chown", "postgres:postgres", repo], check=True)
    sysids = []
    for major in (16, 18):  # two clusters archiving and backing up into one repository
        c = make_cluster(major)
        c.sql("ALTER SYSTEM SET archive_command = %s", (f"{prog} push --repository {repo} %p",))
        c.sql("SELECT pg_reload_conf()")
        run = playbook(BACKUP, extra_vars=backup_vars(c, repo))
        assert run.rc == 0, run
        sysids.append(str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0]))
    never_first = sorted(sysids)  # neither was drilled: in order of system identifier
    dv = {"pg_restore_repository": repo, "pg_restore_drill_limit": 1, "pg_restore_wal_program": prog}

    run = playbook(DRILL, extra_vars=dv)
    assert run.rc == 0, run
    assert list(drills(repo)) == [never_first[0]]
    run = playbook(DRILL, extra_vars=dv)
    assert run.rc == 0, run
    first = drills(repo)
    assert set(first) == set(sysids), "the second run drills the cluster never drilled"
    assert first[never_first[0]][1] <= first[never_first[1]][1]

    # Two per run: both, and each drill is new.
    run = playbook(DRILL, extra_vars={**dv, "pg_restore_drill_limit": 2})
    assert run.rc == 0, run
    again = drills(repo)
    assert all(again[s][1] > first[s][1] for s in sysids), (first, again)
    assert all(b["drill"]["result"] == "passed" for b in backups(repo) if b.get("drill"))


def test_a_random_time_after_the_last_commit_is_inconclusive_not_a_damaged_backup(make_cluster, playbook):
    """An idle cluster: no transaction commits after its backup, so no time of the window can be reached."""
    prog = install_pgops_wal(os.path.join(make_pg_dir("pgops-prog-"), "install"))
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    os.mkdir(repo, 0o700)
    subprocess.run(["chown", "postgres:postgres", repo], check=True)
    c = make_cluster(13, autovacuum="off")
    c.sql("ALTER SYSTEM SET archive_command = %s", (f"{prog} push --repository {repo} %p",))
    c.sql("SELECT pg_reload_conf()")
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo))
    assert run.rc == 0, run
    sysid = str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    for _ in range(2):  # the window grows by archived segments, without a commit
        time.sleep(2)
        c.sql("CHECKPOINT")  # WAL to switch away from (a checkpoint record, no transaction)
        (switched,) = c.sql("SELECT pg_walfile_name(pg_switch_wal())")[0]
    deadline = time.monotonic() + 30
    while not any(n.startswith(switched) for n in os.listdir(os.path.join(repo, "wal", sysid))):
        assert time.monotonic() < deadline, f"{switched} was not archived"
        time.sleep(0.2)

    dv = {"pg_restore_repository": repo, "pg_restore_drill_target": "random", "pg_restore_wal_program": prog}
    run = playbook(DRILL, extra_vars=dv)
    assert run.rc == 0, run
    assert "was inconclusive: no transaction committed between the random target" in run.stdout
    (b,) = backups(repo)
    assert "drill" not in b, "an unreachable time says nothing about the backup"
    record = b["inconclusive_drill"]
    assert record["result"] == "inconclusive" and record["target_time"], record
    assert "recovery ended before configured recovery target was reached" in record["error"], record
    info = playbook(
        [{"hosts": "postgresql", "gather_facts": False,
          "tasks": [{"name": "latest", "pgops.online_backup.pg_backup_info": {"repository": repo, "backup": "latest"}}]}]
    )  # fmt: skip
    assert info.rc == 0 and info.task("latest")["backup"]["id"] == b["id"], info


def test_drill_policy_input_is_refused_before_anything_runs(playbook, tmp_path):
    for bad, said in (
        ({"pg_restore_drill_target": "sometimes"}, "must be one of: immediate, latest, random, got: sometimes"),
        ({"pg_restore_drill_target": "random", "pg_restore_backup": "20261201T000000Z"}, "pg_restore_backup must stay latest"),
        ({"pg_restore_drill_limit": 2, "pg_restore_backup": "20261201T000000Z"}, "pg_restore_backup must stay latest"),
    ):
        run = playbook(DRILL, extra_vars={"pg_restore_repository": str(tmp_path), **bad})
        assert run.rc != 0
        (failed,) = [r for r in run.results if r["status"] == "failed"]
        # The role's argument spec or its own check, before any other task.
        assert failed["task"].startswith("Validat") and said in str(failed["result"]), failed
        before = [r["task"] for r in run.results if r["status"] != "failed"]
        assert before in ([], [f"Validating arguments against arg spec 'drill' - {DRILL_SPEC}"]), before
