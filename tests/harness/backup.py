"""Runs of the backup playbook for tests: variables, background runs to strike at, and what a repository holds."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time

from harness.ansible import REPO, VENV_BIN, collections_workspace, local_inventory

BACKUP = os.path.join(REPO, "playbooks", "backup.yml")


def backup_vars(cluster, repo: str, **extra) -> dict:
    v = {
        "pg_backup_repository": repo,
        "pg_backup_login_unix_socket": cluster.sock,
        "pg_backup_port": cluster.port,
        "pg_backup_fast_checkpoint": True,
        "pg_backup_prove_timeout": 20,
        "pg_backup_archive_timeout": 30,
    }
    v.update(extra)
    return v


def backups(repo: str) -> list:
    out = []
    for path in sorted(glob.glob(os.path.join(repo, "2*", "backup.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out


def assert_nothing_left(cluster, repo: str) -> None:
    """After a failure: no complete backup, no session on the server, no lock."""
    assert all(b["status"] != "complete" for b in backups(repo)), backups(repo)
    assert not glob.glob(os.path.join(repo, ".locks", "*.lock")), "lock left behind"
    if cluster.postmaster_pid():
        assert cluster.backups_in_progress() == 0


def descendants(pid: int) -> list:
    """Every process below pid (by parent links in /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def slow_cluster(make_cluster):
    c = make_cluster(15)
    # md5 text compresses slowly with gzip -9 on one thread: the copy takes seconds.
    c.sql("CREATE TABLE bulk AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h FROM generate_series(1, 1500000) g")
    return c


def start_backup_in_background(cluster, repo: str, workdir: str, inventory: str | None = None, **extra):
    """ansible-playbook in the background; returns (Popen, results file)."""
    os.makedirs(workdir, exist_ok=True)
    inv = os.path.join(workdir, "inv.ini")
    open(inv, "w").write(inventory or local_inventory())
    ev = os.path.join(workdir, "ev.json")
    # gzip -9 on one thread: a copy that takes seconds, unless the test says otherwise.
    slow = {"pg_backup_compression": "gzip", "pg_backup_compression_level": 9, "pg_backup_compression_threads": 1}
    json.dump(backup_vars(cluster, repo, **{**slow, **extra}), open(ev, "w"))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections_workspace(), PGOPS_TEST_OWNER=str(os.getpid()))
    proc = subprocess.Popen(
        [os.path.join(VENV_BIN, "ansible-playbook"), "-i", inv, BACKUP, "-e", f"@{ev}"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc


def wait_for_copy(repo: str, timeout: float = 60) -> dict:
    """Wait until the copy is under way; return the running backup.json."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for info in backups(repo):
            if glob.glob(os.path.join(repo, info["id"], "*.partial")):
                return info
        time.sleep(0.05)
    raise AssertionError(f"the copy did not start: {backups(repo)}")


def wait_for_output(proc, text: str) -> list:
    """Read a background run's output until a line holds text; the lines read (finish returns the rest)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the run ended without printing {text!r}:\n{''.join(lines[-40:])}")


def running_keeper_pid(cluster) -> int:
    """The keeper of this cluster's backup, from the postgres user's session directory."""
    for path in glob.glob(os.path.expanduser("~postgres/.pgops_online_backup/sessions/*/state.json")):
        state = json.load(open(path))
        if state.get("cluster") == f"{cluster.sock}:{cluster.port}" and state.get("status") == "running":
            return state["pid"]
    raise AssertionError("no running keeper for this cluster")


def finish(proc, timeout: float = 180) -> tuple:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out
