"""An operator's 3 a.m.: interrupted runs never block the next one, restores never trust a
damaged backup, and what was found by trying the collection as a hostile user would.
Each test reproduces a defect of an earlier version against real servers."""

from __future__ import annotations

import glob
import importlib
import json
import os
import shutil
import signal
import time

import pytest
from harness.ansible import REPO
from harness.backup import (
    BACKUP,
    backup_vars,
    backups,
    descendants,
    finish,
    slow_cluster,
    start_backup_in_background,
    wait_for_copy,
)
from harness.pg import make_pg_dir

_sessions = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._sessions")

RESTORE = os.path.join(REPO, "playbooks", "restore.yml")
DRILL = os.path.join(REPO, "playbooks", "drill.yml")
SESSIONS = os.path.expanduser("~postgres/.pgops_online_backup/sessions")  # the playbook becomes postgres


def wait_until(predicate, timeout: float = 30.0, what: str = "condition", every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def restore_vars(repo: str, archive: str, **extra) -> dict:
    """A restore into a new directory, on a free port with a private socket directory."""
    root = make_pg_dir("pgops-restore-")
    v = {
        "pg_restore_repository": repo, "pg_restore_data_directory": os.path.join(root, "data"), "pg_restore_port": 0,
        "pg_restore_wal_archive": archive, "pg_restore_unix_socket_directory": root, "pg_restore_recovery_timeout": 60,
    }  # fmt: skip
    v.update(extra)
    return v


def stop_restored(data_dir: str) -> None:
    pid_file = os.path.join(data_dir, "postmaster.pid")
    if os.path.exists(pid_file):
        os.kill(int(open(pid_file).readline()), signal.SIGINT)
        wait_until(lambda: not os.path.exists(pid_file), what="the restored server to stop")


def archive_through_a_gate(cluster) -> str:
    """archive_command works while the returned file exists (the pre-flight's proof needs it) and fails once it is gone."""
    gate = os.path.join(make_pg_dir("pgops-gate-"), "open")
    open(gate, "w").close()
    cluster.sql(
        "ALTER SYSTEM SET archive_command = %s",
        (f"test -f {gate} && test ! -f {cluster.archive}/%f && cp %p {cluster.archive}/%f",),
    )
    cluster.sql("SELECT pg_reload_conf()")
    return gate


def session_of(record: dict) -> dict | None:
    """The state of the session the role started for this backup: the one its record names. Not any
    session whose id starts with the backup id: backups that another test's cluster starts in the same
    second share it (ids are per second, with a random suffix)."""
    try:
        return json.load(open(os.path.join(SESSIONS, record["session_id"], "state.json")))
    except (OSError, ValueError):
        return None


def kill_run(proc) -> None:
    """The run and its module processes, as Ctrl-C or a dropped controller leaves them (sudo
    would put module processes in a session of their own). The keeper is not among them."""
    for pid in [proc.pid] + descendants(proc.pid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "pgops-keeper":
                    continue
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    proc.wait()


def next_run_succeeds_within(playbook, cluster, repo: str, seconds: float, killed_at: float) -> dict:
    """A new run, started at most `seconds` after the kill, succeeds; the dead run's backup is failed."""
    assert time.monotonic() - killed_at < seconds, "the test itself was too slow to start the next run in time"
    run = playbook(BACKUP, extra_vars=backup_vars(cluster, repo))
    assert run.rc == 0, run
    assert "removed a stale lock" in run.stdout + run.stderr
    statuses = [b["status"] for b in backups(repo)]
    assert statuses == ["failed", "complete"], statuses
    assert cluster.backups_in_progress() == 0
    return backups(repo)[0]


# -- 1. Ctrl-C while the start waits for its checkpoint


def test_interrupted_while_the_start_waits_for_its_checkpoint_the_next_run_starts_within_seconds(
    make_cluster, playbook, tmp_path
):
    c = make_cluster(16, checkpoint_timeout="300s", checkpoint_completion_target="0.9", shared_buffers="256MB")
    c.sql("CREATE TABLE dirty AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1000000) g")
    c.sql("CHECKPOINT")
    c.sql("UPDATE dirty SET h = md5(h)")  # a spread checkpoint of all this takes minutes
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    proc = start_backup_in_background(c, repo, str(tmp_path / "w"), pg_backup_fast_checkpoint=False)
    running = wait_until(lambda: [b for b in backups(repo) if b["status"] == "running"], what="the backup's record")[0]
    wait_until(lambda: (session_of(running) or {}).get("status") == "starting", what="the start to wait")
    kill_run(proc)
    killed = time.monotonic()
    dead = next_run_succeeds_within(playbook, c, repo, 5, killed)
    assert dead["id"] == running["id"] and "went away while the start waited" in dead["error"], dead["error"]


# -- 2. Ctrl-C during the archive wait


def test_interrupted_during_the_archive_wait_the_next_run_starts_within_seconds(make_cluster, playbook, tmp_path):
    c = slow_cluster(make_cluster)
    gate = archive_through_a_gate(c)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    proc = start_backup_in_background(c, repo, str(tmp_path / "w"), pg_backup_archive_timeout=600)
    running = wait_for_copy(repo)
    os.unlink(gate)
    state = wait_until(
        lambda: (lambda s: s if s and s.get("archive_wait") else None)(session_of(running)),
        timeout=120,
        what="the stop task to wait for the archive",
    )
    assert state["status"] == "stopped" and not state.get("delivered")
    kill_run(proc)
    killed = time.monotonic()
    open(gate, "w").close()  # archiving works again: the next run's proof must pass
    dead = next_run_succeeds_within(playbook, c, repo, 5, killed)
    assert dead["id"] == running["id"], dead
    assert "the run that was finishing it is gone" in dead["error"], dead["error"]


def test_interrupted_mid_copy_over_ssh_the_next_run_starts_within_seconds(make_cluster, playbook, ssh_host, tmp_path):
    """The same over SSH as a sudo user: the controller and the ssh connection die, and with them the
    module processes on the host (the keeper, a daemon of its own, lives on and sees its copy go)."""
    c = slow_cluster(make_cluster)
    host = ssh_host("127.0.0.3")
    inventory = host.inventory(ansible_pipelining=False)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    proc = start_backup_in_background(c, repo, str(tmp_path / "w"), inventory=inventory)
    running = wait_for_copy(repo)
    kill_run(proc)
    for pid in descendants(host.pid):  # the ssh session's processes on the host: the module tasks
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "pgops-keeper":
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    killed = time.monotonic()
    assert time.monotonic() - killed < 5
    run = playbook(BACKUP, inventory, extra_vars=backup_vars(c, repo))
    assert run.rc == 0, run
    assert "removed a stale lock" in run.stdout + run.stderr
    statuses = [b["status"] for b in backups(repo)]
    assert statuses == ["failed", "complete"], statuses
    assert backups(repo)[0]["id"] == running["id"]
    assert "the copy task attached to this backup went away" in backups(repo)[0]["error"]
    assert c.backups_in_progress() == 0


def _status(sdir: str) -> dict:
    """The keeper's state as it is now (root may ask it), or {} when it cannot be asked."""
    return _sessions.request(sdir, {"op": "status"}, 5).get("state") or {}


def _reading(root: str) -> list:
    """tar or gzip processes of a copy of root (they run in it)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == root and open(f"/proc/{pid}/comm").read().strip() in ("tar", "gzip", "pigz"):
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_interrupted_while_it_waits_for_a_copy_in_turns_the_next_run_starts_within_seconds(make_cluster, playbook, tmp_path):
    """Past its first interval the copy runs on in a process of its own, and the run waits for it in
    turns that print its progress, each attached to the keeper: the run dies, its turn with it, and
    the keeper ends the backup at once; the copy hears that and stops."""
    c = slow_cluster(make_cluster)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    proc = start_backup_in_background(c, repo, str(tmp_path / "w"), pg_backup_progress_interval=3)
    running = wait_for_copy(repo)
    sdir = os.path.join(SESSIONS, running["session_id"])
    wait_until(lambda: os.path.isdir(sdir), what="the session")
    wait_until(lambda: _status(sdir).get("watchers"), timeout=60, what="a turn of the run to wait for the copy")
    kill_run(proc)
    killed = time.monotonic()
    wait_until(lambda: c.backups_in_progress() == 0, timeout=5, what="the keeper to end the backup")
    wait_until(lambda: not _reading(c.data), timeout=10, what="the copy's tar and gzip to stop")
    dead = next_run_succeeds_within(playbook, c, repo, 15, killed)
    assert dead["id"] == running["id"] and "the run waiting for this backup's copy went away" in dead["error"], dead


# -- 3. a missing WAL segment is caught before a restore


def test_a_missing_start_segment_is_named_before_the_restore_changes_anything(make_cluster, playbook, tmp_path):
    c = make_cluster(15)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo))
    assert run.rc == 0, run
    (info,) = backups(repo)
    start = info["start_wal"]
    # The archive keeps <start>.<offset>.backup, which shares the segment's stem: it must not stand in for it.
    assert [n for n in os.listdir(c.archive) if n.startswith(start + ".") and n.endswith(".backup")]
    os.unlink(os.path.join(c.archive, start))
    ev = restore_vars(repo, c.archive)
    target = ev["pg_restore_data_directory"]
    run = playbook(RESTORE, extra_vars=ev)
    assert run.rc != 0
    assert f"lacks {start}" in run.stdout, run
    assert not os.path.exists(target) or not os.listdir(target), "the restore changed the target before refusing"


# -- 4. a backup known to be damaged is never restored silently


def _corrupt(backup_path: str) -> None:
    (archive,) = [p for p in glob.glob(os.path.join(backup_path, "base.tar*"))]
    with open(archive, "r+b") as f:
        f.seek(os.path.getsize(archive) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def test_restore_verifies_before_it_trusts_and_latest_skips_a_damaged_backup(make_cluster, playbook, tmp_path):
    c = make_cluster(17)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    for _ in range(2):
        run = playbook(BACKUP, extra_vars=backup_vars(c, repo))
        assert run.rc == 0, run
        time.sleep(1.1)  # backup ids are per second
    good, damaged = backups(repo)
    _corrupt(os.path.join(repo, damaged["id"]))

    # Never checked yet: the restore verifies the manifest first, refuses, and records it.
    ev = restore_vars(repo, c.archive, pg_restore_start=False)
    run = playbook(RESTORE, extra_vars=ev)
    assert run.rc != 0
    assert "failed verification" in run.stdout, run
    target = ev["pg_restore_data_directory"]
    assert not os.path.exists(target) or not os.listdir(target)
    assert backups(repo)[1]["verification"]["verified"] is False

    # Now known to be damaged: latest skips it, saying which and why, and restores the good one.
    run = playbook(RESTORE, extra_vars=ev)
    assert run.rc == 0, run
    out = run.stdout + run.stderr
    assert f"backup {damaged['id']} is not chosen as the latest" in out and "verification" in out, out[-3000:]
    assert run.task(f"Find backup latest in {repo}")["backup"]["id"] == good["id"]

    # By id it is refused, unless forced.
    by_id = restore_vars(repo, c.archive, pg_restore_backup=damaged["id"], pg_restore_start=False)
    run = playbook(RESTORE, extra_vars=by_id)
    assert run.rc != 0 and "is known to be damaged" in run.stdout, run
    run = playbook(RESTORE, extra_vars={**by_id, "pg_restore_force_unverified": True, "pg_restore_verify": False})
    assert run.rc == 0, run


def test_a_failed_drill_makes_latest_skip_the_backup(make_cluster, playbook, tmp_path):
    c = make_cluster(15)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    for _ in range(2):
        assert playbook(BACKUP, extra_vars=backup_vars(c, repo)).rc == 0
        time.sleep(1.1)
    good, newest = backups(repo)
    _corrupt(os.path.join(repo, newest["id"]))
    ev = {"pg_restore_repository": repo, "pg_restore_wal_archive": c.archive}
    drill = playbook(DRILL, extra_vars=ev)
    assert drill.rc != 0
    assert backups(repo)[1]["drill"]["result"] == "failed"
    drill = playbook(DRILL, extra_vars=ev)
    assert drill.rc == 0, drill
    assert f"backup {newest['id']} is not chosen as the latest" in drill.stdout + drill.stderr
    assert backups(repo)[0]["drill"]["result"] == "passed"


# -- 6. a % in the WAL archive's path


def test_a_percent_sign_in_the_wal_archive_path_restores(make_cluster, playbook, tmp_path):
    c = make_cluster(15)
    # "%p" is what PostgreSQL would replace: unescaped, recovery copies from a path that does not exist.
    archive = os.path.join(make_pg_dir("pgops-wal-"), "50%off_%p_wal")
    os.mkdir(archive)
    shutil.chown(archive, "postgres", "postgres")
    # In archive_command too, a % of the path is written %%.
    escaped = archive.replace("%", "%%")
    c.sql("ALTER SYSTEM SET archive_command = %s", (f"test ! -f '{escaped}/%f' && cp %p '{escaped}/%f'",))
    c.sql("SELECT pg_reload_conf()")
    c.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo))
    assert run.rc == 0, run
    ev = restore_vars(repo, archive)
    run = playbook(RESTORE, extra_vars=ev)
    try:
        assert run.rc == 0, run
    finally:
        stop_restored(ev["pg_restore_data_directory"])


# -- 7. every message's advice is true when it is printed


def test_a_failed_archive_wait_does_not_advise_resuming_what_the_rescue_ended(make_cluster, playbook):
    c = make_cluster(15)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    gate = archive_through_a_gate(c)
    # The proof passes, then the gate shuts before the stop: a hook task in the play would be nicer,
    # but the role runs as one; a short archive timeout and a gate shut by the copy's start do it.
    repo_vars = backup_vars(c, repo, pg_backup_archive_timeout=3)
    proc = start_backup_in_background(c, repo, os.path.join(make_pg_dir("pgops-w-"), "w"), **repo_vars)
    wait_for_copy(repo)
    os.unlink(gate)
    rc, out = finish(proc)
    assert rc != 0
    fail_line = [line for line in out.splitlines() if "failed at 'Stop the backup" in line][-1]
    assert "not archived after 3s" in fail_line, fail_line
    assert "state=stopped" not in fail_line and "resume" not in fail_line, fail_line
    (info,) = backups(repo)
    assert info["status"] == "failed" and "state=stopped" not in info["error"]


# -- 8. smaller ones


def test_a_refused_lock_directory_leaves_no_backup_directory_behind(make_cluster, playbook):
    c = make_cluster(15)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    os.mkdir(repo, 0o700)
    shutil.chown(repo, "postgres", "postgres")
    elsewhere = make_pg_dir("pgops-elsewhere-")
    os.symlink(elsewhere, os.path.join(repo, ".locks"))
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo))
    assert run.rc != 0
    assert "is not a directory (a symlink is not accepted)" in run.stdout, run
    assert sorted(os.listdir(repo)) == [".locks"], "a refused run must leave no backup directory"
    assert os.listdir(elsewhere) == []


def test_a_missing_repository_parent_is_a_typo_not_a_directory_to_create(make_cluster, playbook):
    c = make_cluster(15)
    base = make_pg_dir("pgops-repo-")
    repo = os.path.join(base, "typo", "repo")
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo))
    assert run.rc != 0
    assert f"the parent directory {os.path.join(base, 'typo')} of repository {repo} does not exist" in run.stdout, run
    assert os.listdir(base) == []
    assert c.backups_in_progress() == 0


def test_a_server_restarted_mid_copy_stops_the_copy_within_seconds(make_cluster, tmp_path):
    c = slow_cluster(make_cluster)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    proc = start_backup_in_background(c, repo, str(tmp_path / "w"))
    wait_for_copy(repo)
    c.stop("fast")
    c.start()
    restarted = time.monotonic()
    rc, out = finish(proc)
    took = time.monotonic() - restarted
    assert rc != 0
    assert "session lost, backup unusable" in out, out[-3000:]
    # gzip -9 on one thread takes far longer than this for the whole copy.
    assert took < 15, f"the copy went on for {took:.1f}s after the server restarted"
    (info,) = backups(repo)
    assert info["status"] == "failed"


@pytest.mark.parametrize("label, rule", [("x" * 1025, "1025 bytes"), ("é" * 600, "1200 bytes")])
def test_a_label_over_the_byte_limit_says_which_rule_and_counts_bytes(label, rule, make_cluster, playbook):
    c = make_cluster(15)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_label=label))
    assert run.rc != 0
    assert f"pg_backup_label is {rule} in UTF-8; PostgreSQL accepts at most 1024 bytes" in run.stdout, run
    assert not os.path.exists(repo)
