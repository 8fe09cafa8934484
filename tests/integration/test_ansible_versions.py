"""The collection on every ansible-core that AWX/AAP execution environments run (meta/runtime.yml:
requires_ansible >=2.16): with each of 2.16, 2.17 and 2.18 (on Python 3.11) and 2.20 and 2.21 (on Python
3.12, where the machine has one), a backup under writes through the backup playbook, then a point-in-time
restore of it through the restore playbook, run by that version's own ansible-playbook. The venv's 2.19
runs every other test. scripts/setup.sh installs each version in a virtualenv of its own; scripts/lint.sh
runs ansible-test sanity with each."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess

import pytest
from harness.ansible import local_inventory, run_playbook
from harness.pg import CACHE, Cluster, make_pg_dir
from harness.workload import Writer

from integration.test_restore import (  # noqa: F401
    BACKUP,
    RESTORE,
    archive_current_wal,
    newest_backup,
    query,
    restore_root,
    restore_vars,
    result_of,
)

VERSIONS = os.path.join(CACHE, "ansible-core")
ALWAYS = ("2.16", "2.17", "2.18")  # run on the venv's Python 3.11: setup.sh always installs them
NEWER = ("2.20", "2.21")  # need Python 3.12+: installed where the machine has one
SERIES = ALWAYS + tuple(s for s in NEWER if os.path.isdir(os.path.join(VERSIONS, s)))


def bin_dir(series: str) -> str:
    return os.path.join(VERSIONS, series, "bin")


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(15)
    c.init().start()
    repo = os.path.join(make_pg_dir("pgops-versions-"), "repo")
    try:
        yield c, repo
    finally:
        c.destroy()
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


@pytest.mark.parametrize("series", SERIES)
def test_backup_and_point_in_time_restore_with_this_ansible_core(series, cluster, restore_root, tmp_path):  # noqa: F811
    c, repo = cluster
    assert os.path.exists(os.path.join(bin_dir(series), "ansible-playbook")), (
        f"ansible-core {series} is not installed in {VERSIONS}/{series}: run scripts/setup.sh"
    )
    version = subprocess.run([os.path.join(bin_dir(series), "ansible-playbook"), "--version"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert version.startswith(f"ansible-playbook [core {series}."), version

    writer = Writer(c, table=f"writer_{series.replace('.', '_')}")
    writer.start()
    try:
        ev = dict(pg_backup_repository=repo, pg_backup_login_unix_socket=c.sock, pg_backup_port=c.port,
                  pg_backup_fast_checkpoint=True, pg_backup_compression="gzip")  # fmt: skip
        run = run_playbook(BACKUP, local_inventory(), extra_vars=ev, workdir=str(tmp_path), bin_dir=bin_dir(series))
    finally:
        writer.stop()
    assert run.rc == 0, run
    # The collection declares this version supported: ansible-core warns about any it does not.
    assert "does not support Ansible version" not in run.stdout + run.stderr, run
    info = newest_backup(repo)
    assert info["status"] == "complete"
    started = datetime.datetime.fromisoformat(info["started_at"])
    stopped = datetime.datetime.fromisoformat(info["stopped_at"])
    during = {n for n, at in writer.committed if started < at < stopped}
    assert during, "the writer committed nothing while the backup ran: the test would prove nothing"

    point = f"pgops_{series}"
    c.sql(f"SELECT pg_create_restore_point('{point}')")
    c.sql(f"INSERT INTO {writer.table} (id) VALUES (-1)")  # after the target: must not be restored
    archive_current_wal(c)

    (tmp_path / "restore").mkdir()
    root = restore_root()
    ev = restore_vars(repo, c, root, pg_restore_backup=info["id"], pg_restore_target="name", pg_restore_target_value=point)
    run = run_playbook(RESTORE, local_inventory(), extra_vars=ev, workdir=str(tmp_path / "restore"), bin_dir=bin_dir(series))
    assert run.rc == 0, run
    assert "does not support Ansible version" not in run.stdout + run.stderr, run
    port = result_of(run, "Restore backup")["port"]
    ids = {r[0] for r in query(root, port, f"SELECT id FROM {writer.table}")}
    assert ids == {n for n, _ in writer.committed}  # every commit, including those during the backup
    assert during <= ids and -1 not in ids
