"""The preflight playbook: a report per host, a failure naming every problem, nothing started."""

from __future__ import annotations

import os

from harness.ansible import NODE_PYTHON, REPO

PREFLIGHT = os.path.join(REPO, "playbooks", "preflight.yml")


def test_preflight_playbook_passes_a_good_host_and_names_problems_of_a_bad_one(make_cluster, playbook):
    good = make_cluster(16)
    bad = make_cluster(16, archive_mode="off")
    inventory = "[postgresql]\n" + "".join(
        f"{name} ansible_connection=local ansible_python_interpreter={NODE_PYTHON} "
        f"pg_backup_login_unix_socket={c.sock} pg_backup_port={c.port}\n"
        for name, c in (("good", good), ("bad", bad))
    )
    archived = good.sql("SELECT archived_count FROM pg_stat_archiver")[0][0]
    run = playbook(PREFLIGHT, inventory)
    assert run.rc != 0
    assert run.task("Fail when a backup would be refused", host="good")["skip_reason"]
    failed = run.task("Fail when a backup would be refused", host="bad")["msg"]
    assert "archive_mode_off" in failed and "restart" in failed, failed
    proof = run.task("Check the server, its WAL archiving and the repository", host="good")["proof"]
    assert proof["performed"] and proof["archived"], proof
    assert good.sql("SELECT archived_count FROM pg_stat_archiver")[0][0] > archived
    assert good.backups_in_progress() == 0 and bad.backups_in_progress() == 0
