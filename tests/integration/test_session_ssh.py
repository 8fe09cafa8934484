"""Held backup session over real SSH: start in one ansible-playbook run, copy and
stop in a second one, as a non-root SSH user with become_user postgres, then
restore the copy by hand and find the rows written while the backup ran."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator

import pytest
from harness.pg import PG_USER, Cluster, make_pg_dir, process_gone, restore_tar_backup, tagged_processes
from harness.ssh import ADMIN_USER

pytestmark = pytest.mark.ssh

MODULE = "pgops.online_backup.pg_backup_session"
ROLE = "pgops_ssh_bkp"
TAG_VAR = "PGOPS_TEST_TAG"
START_RUN_LIMIT = 60  # seconds; a keeper holding the task's stdout makes the run hang until it exits
ROWS_BEFORE = 50
ROWS_DURING = 70
GRANTS = {
    13: ["pg_start_backup(text, boolean, boolean)", "pg_stop_backup(boolean, boolean)"],
    17: ["pg_backup_start(text, boolean)", "pg_backup_stop(boolean)"],
}


@pytest.fixture(autouse=True)
def no_leftover_keepers() -> Iterator[str]:
    """Overrides conftest's keeper check for this module, scoped to this test's own keepers.

    Other test runs share this machine, so "every new keeper" is too wide, and the
    controller's environment does not reach a keeper started over SSH + sudo. The
    plays tag the module's environment (the keeper inherits it); only those count.
    """
    tag = f"{TAG_VAR}={secrets.token_hex(8)}"
    yield tag
    left = [pid for pid in tagged_processes(tag, keepers=True) if _proc_alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"session keeper(s) left running: {left}"


def _play(tasks: list, tag: str) -> list:
    name, value = tag.split("=", 1)
    # The environment keyword reaches the module through sudo (env_reset keeps only a few variables).
    return [
        {"hosts": "postgresql", "gather_facts": False, "become": True, "become_user": PG_USER,
         "environment": {name: value}, "tasks": tasks}
    ]  # fmt: skip


def _proc_alive(pid: int) -> bool:
    return not process_gone(pid)


def _status_ids(pid: int, field: str) -> list:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _wait_backend_gone(cluster: Cluster, sid: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    while cluster.sql(query, (f"pgops.online_backup keeper {sid}",))[0][0] and time.monotonic() < deadline:
        time.sleep(0.05)


def _make_backup_role(cluster: Cluster, password: str) -> None:
    # A password role over TCP (the harness hba wants scram there), with only the backup GRANTs.
    # 13 still hashes with md5 by default, which a scram hba line rejects.
    cluster.sql(f"SET password_encryption = 'scram-sha-256'; CREATE ROLE {ROLE} LOGIN PASSWORD %s", (password,))
    for func in GRANTS[cluster.major]:
        cluster.sql(f"GRANT EXECUTE ON FUNCTION {func} TO {ROLE}")


@pytest.mark.parametrize(("major", "pipelining"), [(13, True), (17, False)], ids=["pg13-pipelining", "pg17-no-pipelining"])
def test_start_copy_stop_restore_over_ssh(
    major: int, pipelining: bool, make_cluster, ssh_host, playbook, no_leftover_keepers: str
) -> None:
    tag = no_leftover_keepers
    cluster = make_cluster(major)
    host = ssh_host("127.0.0.2")
    password = "pw-" + secrets.token_hex(16)  # unique: any occurrence in output is a leak
    label = f"ssh-{major}-{secrets.token_hex(4)}"
    _make_backup_role(cluster, password)
    cluster.sql("CREATE TABLE t (id int PRIMARY KEY, phase text NOT NULL)")
    cluster.sql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, %s) g", (ROWS_BEFORE,))

    inventory = host.inventory(user=ADMIN_USER, ansible_pipelining=pipelining)
    pg_home = pwd.getpwnam(PG_USER).pw_dir
    postgres_uid = pwd.getpwnam(PG_USER).pw_uid
    dest = make_pg_dir("pgops-ssh-backup-")  # owned by postgres: the tar and backup_label go here
    keeper_pid = None
    sid = sdir = None
    restored = None
    try:
        # -- run 1: start over TCP with a password; the task must return while the keeper lives on
        start_task = {
            "name": "start",
            MODULE: {
                "state": "started",
                "label": label,
                "fast": True,
                "login_host": "127.0.0.1",
                "port": cluster.port,
                "login_user": ROLE,
                "login_password": password,
            },
        }
        t0 = time.monotonic()
        try:
            run1 = playbook(_play([start_task], tag), inventory, args=["-v"], timeout=START_RUN_LIMIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the start run hung for {START_RUN_LIMIT}s: the keeper keeps the task's stdout/ssh channel open")
        elapsed = time.monotonic() - t0
        assert run1.rc == 0, run1
        assert elapsed < START_RUN_LIMIT, f"start run took {elapsed:.1f}s: the task waited for the keeper"
        started = run1.task("start")
        keeper_pid = started["keeper_pid"]
        sid = started["session_id"]
        sdir = os.path.join(pg_home, ".pgops_online_backup", "sessions", sid)

        # The keeper outlived the task, as postgres, in its own session on the server.
        assert _proc_alive(keeper_pid)
        assert tagged_processes(tag, keepers=True) == [keeper_pid]
        assert _status_ids(keeper_pid, "Uid") == [postgres_uid] * 4
        assert cluster.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND usename = %s",
            (f"pgops.online_backup keeper {sid}", ROLE),
        )[0][0] == 1  # fmt: skip
        for st, mode in ((os.stat(sdir), 0o700), (os.stat(os.path.dirname(sdir)), 0o700)):
            assert stat.S_IMODE(st.st_mode) == mode and st.st_uid == postgres_uid
        sock = os.stat(os.path.join(sdir, "keeper.sock"))
        assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600 and sock.st_uid == postgres_uid

        # The password never leaves memory: not in argv, environment or Ansible's output.
        secret = password.encode()
        for what in ("cmdline", "environ"):
            with open(f"/proc/{keeper_pid}/{what}", "rb") as f:
                assert secret not in f.read(), f"password in keeper {what}"
        assert password not in run1.stdout + run1.stderr
        # It really went over SSH as the unprivileged user (then sudo to postgres).
        with open(host.log) as f:
            assert f"Accepted publickey for {ADMIN_USER} from " in f.read()

        # -- between the runs: writes the backup must carry through WAL replay
        cluster.sql("INSERT INTO t SELECT g, 'during' FROM generate_series(1001, 1000 + %s) g", (ROWS_DURING,))

        # -- run 2: copy with tar on the host, then stop (over the Unix socket) and write backup_label
        tar_path = os.path.join(dest, "base.tar")
        copy_task = {
            "name": "copy",
            "ansible.builtin.command": {
                "argv": [
                    "tar",
                    "-C",
                    cluster.data,
                    "-cf",
                    tar_path,
                    "--warning=no-file-changed",
                    "--warning=no-file-removed",
                    "--exclude=./pg_wal/*",
                    "--exclude=./postmaster.pid",
                    "--exclude=./postmaster.opts",
                    ".",
                ]
            },
            "register": "copy",
            # Files of a running cluster change while tar reads them: exit code 1 is expected.
            "failed_when": "copy.rc not in [0, 1]",
        }
        stop_task = {
            "name": "stop",
            MODULE: {
                "state": "stopped",
                "session_id": sid,
                "dest": dest,
                "archive_timeout": 60,
                **cluster.conn_vars(),
            },
        }
        run2 = playbook(_play([copy_task, stop_task], tag), inventory, args=["-v"], timeout=120)
        assert run2.rc == 0, run2
        assert password not in run2.stdout + run2.stderr
        stopped = run2.task("stop")
        labelfile = stopped["labelfile"]
        assert f"LABEL: {label}\n" in labelfile
        assert stopped["wal_archived"] is True

        label_path = os.path.join(dest, "backup_label")
        st = os.stat(label_path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == postgres_uid
        with open(label_path, "rb") as f:
            assert f.read() == labelfile.encode()
        assert os.stat(tar_path).st_uid == postgres_uid  # written by the task as postgres

        # The keeper ran the stop in its session and left.
        deadline = time.monotonic() + 10
        while _proc_alive(keeper_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _proc_alive(keeper_pid)
        # Its record stays (0600, swept after a week) so the label can be fetched again; the socket is gone.
        with open(os.path.join(sdir, "state.json")) as f:
            record = json.load(f)
        assert record["status"] == "stopped" and record["delivered"] is True
        assert record["result"]["labelfile"] == labelfile
        assert not os.path.exists(os.path.join(sdir, "keeper.sock"))
        keeper_pid = None

        # -- restore by PostgreSQL's manual procedure and check the data
        restored = restore_tar_backup(major, tar_path, dest, cluster.archive)
        counts = dict(restored.sql("SELECT phase, count(*) FROM t GROUP BY phase"))
        assert counts == {"before": ROWS_BEFORE, "during": ROWS_DURING}
    finally:
        if keeper_pid is not None and _proc_alive(keeper_pid):
            os.kill(keeper_pid, signal.SIGKILL)  # the server aborts the backup with the session
            _wait_backend_gone(cluster, sid)
        if sdir:
            shutil.rmtree(sdir, ignore_errors=True)
        if restored is not None:
            restored.destroy()
        shutil.rmtree(dest, ignore_errors=True)
