"""pg_backup_session against real PostgreSQL 12-18 through real ansible-playbook."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import time

import pytest
from harness.pg import MAJORS, restore_tar_backup, tagged_processes
from harness.scratch import scratch_dir

MODULE = "pgops.online_backup.pg_backup_session"
INFO = "pgops.online_backup.pg_backup_session_info"


def session_task(name: str, register: str | None = None, **args) -> dict:
    """A task of the module (state from the task name's first word), or of the info module for "status"."""
    word = name.split()[0]
    if word == "status":
        task = {"name": name, INFO: args}
    else:
        args.setdefault("state", {"start": "started", "stop": "stopped", "abort": "aborted"}[word])
        task = {"name": name, MODULE: args}
    if register:
        task["register"] = register
    return task


def play(*tasks, **kw) -> list:
    return [{"hosts": "postgresql", "gather_facts": False, "tasks": list(tasks), **kw}]


def tar_data_dir(cluster, dest_tar: str) -> None:
    # What a user's copy step does; tar exits 1 when files change under it.
    proc = subprocess.run(
        [
            "tar",
            "-C",
            cluster.data,
            "-cf",
            dest_tar,
            "--exclude=./pg_wal/*",
            "--exclude=./postmaster.pid",
            "--exclude=./postmaster.opts",
            "--warning=no-file-changed",
            "--warning=no-file-removed",
            ".",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode in (0, 1), proc.stderr


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("major", MAJORS)
def test_start_and_stop_in_separate_playbook_runs_restores_rows_written_during_backup(major, make_cluster, playbook, tmp_path):
    c = make_cluster(major)
    c.sql("CREATE TABLE t (id int PRIMARY KEY, phase text)")
    c.sql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 1000) g")
    cv = c.conn_vars()

    first = playbook(play(session_task("start", label=f"it-{major}", fast=True, **cv)))
    assert first.rc == 0, first
    started = first.task("start")
    assert started["start_wal"] == c.sql("SELECT pg_walfile_name(%s::pg_lsn)", (started["start_lsn"],))[0][0]
    assert started["server_version_num"] // 10000 == major
    assert started["backup_from"] == "primary"
    assert started["system_identifier"] == str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    assert c.backups_in_progress() == 1, "the keeper must hold the session after the task ended"

    # Written while the backup runs: must be in the restored copy through WAL.
    c.sql("INSERT INTO t SELECT g, 'during' FROM generate_series(1001, 1500) g")
    tar = str(tmp_path / "base.tar")
    tar_data_dir(c, tar)
    c.sql("INSERT INTO t SELECT g, 'during' FROM generate_series(1501, 2000) g")

    dest = tmp_path / "backup"
    dest.mkdir()
    second = playbook(play(session_task("stop", session_id=started["session_id"], dest=str(dest), archive_timeout=30, **cv)))
    assert second.rc == 0, second
    stopped = second.task("stop")
    assert f"LABEL: it-{major}\n" in stopped["labelfile"]
    assert stopped["wal_archived"] is True
    assert os.path.exists(os.path.join(c.archive, stopped["stop_wal"]))
    label = dest / "backup_label"
    assert label.read_bytes() == stopped["labelfile"].encode()
    assert stat.S_IMODE(label.stat().st_mode) == 0o600
    assert not (dest / "tablespace_map").exists()
    assert not os.path.exists(os.path.join(c.data, "backup_label")), "the live cluster must never get a backup_label"
    assert c.backups_in_progress() == 0

    c.sql("INSERT INTO t VALUES (99999, 'after')")
    restored = restore_tar_backup(major, tar, str(dest), c.archive)
    try:
        rows = dict(restored.sql("SELECT phase, count(*) FROM t GROUP BY phase"))
        assert rows == {"before": 1000, "during": 1000}, rows
    finally:
        restored.destroy()


def test_copy_task_between_start_and_stop_in_one_play(make_cluster, playbook, tmp_path):
    c = make_cluster(16)
    cv = c.conn_vars()
    dest = tmp_path / "b"
    dest.mkdir()
    run = playbook(
        play(
            session_task("start", "b", label="one-play", **cv),
            {
                "name": "copy",
                "ansible.builtin.command": f"tar -C {c.data} -cf {dest}/base.tar --exclude=./pg_wal/* "
                "--exclude=./postmaster.pid --warning=no-file-changed .",
                "register": "copy",
                "changed_when": True,
                "failed_when": "copy.rc not in [0, 1]",
            },
            session_task("stop", session_id="{{ b.session_id }}", dest=str(dest), **cv),
        )
    )
    assert run.rc == 0, run
    assert (dest / "backup_label").read_text() == run.task("stop")["labelfile"]
    restored = restore_tar_backup(16, str(dest / "base.tar"), str(dest), c.archive)
    restored.destroy()


def test_pg_backup_copy_task_between_start_and_stop_restores_with_rows_written_during(make_cluster, playbook, tmp_path):
    """The copy module on its own (the role has the keeper copy): it renews the lease and
    records every file's checksum as the archive streams past."""
    c = make_cluster(17)
    c.sql("CREATE TABLE t (id int, phase text)")
    c.sql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 1000) g")
    cv = c.conn_vars()
    dest = tmp_path / "b"
    dest.mkdir()
    run = playbook(
        play(
            session_task("start", "b", label="copy-module", lease=20, keepalive_interval=1, **cv),  # a loaded CI runs slow
            {
                "name": "write during",
                # Debian's psql: the relocatable server builds have no client.
                "ansible.builtin.command": f"/usr/lib/postgresql/15/bin/psql -h {c.sock} "
                f"-p {c.port} -U postgres -c \"INSERT INTO t SELECT g, 'during' FROM generate_series(1, 1000) g\" postgres",
                "changed_when": True,
            },
            {
                "name": "copy",
                "pgops.online_backup.pg_backup_copy": {
                    "data_directory": c.data,
                    "dest": str(dest),
                    "server_version_num": 170000,
                    "session_id": "{{ b.session_id }}",
                    "manifest_checksum": "auto",
                },
            },
            session_task("stop", session_id="{{ b.session_id }}", dest=str(dest), **cv),
        )
    )
    assert run.rc == 0, run
    copy = run.task("copy")
    assert [f["name"] for f in copy["files"]] == ["base.tar"] and copy["manifest_checksum"] == "CRC32C"
    entries = json.load(open(dest / ".pgops-copy-entries.json"))
    assert entries["algorithm"] == "CRC32C" and any(e["path"] == "global/pg_control" for e in entries["entries"])
    restored = restore_tar_backup(17, str(dest / "base.tar"), str(dest), c.archive)
    try:
        rows = dict(restored.sql("SELECT phase, count(*) FROM t GROUP BY phase"))
        assert rows == {"before": 1000, "during": 1000}, rows
    finally:
        restored.destroy()


def _copy_processes(dest: str) -> list:
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if (cmd.startswith(("tar ", "gzip ", "pigz ")) and cwd.startswith(dest)) or dest in cmd:
            found.append((pid, cmd))
    return found


def _in_background(playbook, plays, **kw) -> tuple:
    """Run a playbook in a thread; (thread, dict that gets the run)."""
    import threading

    out = {}
    thread = threading.Thread(target=lambda: out.update(run=playbook(plays, **kw)))
    thread.start()
    return thread, out


def test_abort_during_a_copy_task_stops_the_copy_within_seconds(make_cluster, playbook, tmp_path):
    """The copy is attached to the keeper: when the backup is aborted, the copy task hears it at
    once, kills tar and gzip, removes its partial archive and fails saying why."""
    c = make_cluster(15)
    c.sql("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1500000) g")
    cv = c.conn_vars()
    dest = tmp_path / "b"
    dest.mkdir()
    started = playbook(play(session_task("start", label="abort-copy", fast=True, **cv))).task("start")
    # gzip -9 on one thread: the copy is still running when the abort comes.
    copy = {
        "name": "copy",
        "pgops.online_backup.pg_backup_copy": {
            "data_directory": c.data, "dest": str(dest), "compression": "gzip", "compression_level": 9, "threads": 1,
            "server_version_num": 150000, "session_id": started["session_id"],
        },
    }  # fmt: skip
    thread, copying = _in_background(playbook, play(copy))
    wait_until(lambda: (dest / "base.tar.gz.partial").exists(), what="the copy to begin")
    abort = playbook(play(session_task("abort", session_id=started["session_id"], **cv)))
    aborted = time.monotonic()
    assert abort.rc == 0 and abort.task("abort")["changed"] is True, abort
    thread.join(60)
    assert time.monotonic() - aborted < 10, "the copy did not stop within seconds of the abort"
    assert copying["run"].rc != 0
    msg = copying["run"].task("copy")["msg"]
    assert "cancelled" in msg and "session aborted, backup unusable: aborted on request" in msg, msg
    wait_until(lambda: c.backups_in_progress() == 0, what="the backup to end")
    wait_until(lambda: not _copy_processes(str(dest)), what="tar and gzip to be gone")
    assert not (dest / "base.tar.gz").exists() and not (dest / "base.tar.gz.partial").exists()


def _slow_checkpoint_cluster(make_cluster):
    """A server whose spread checkpoint takes minutes: many dirty buffers paced over checkpoint_timeout."""
    c = make_cluster(16, checkpoint_timeout="300s", checkpoint_completion_target="0.9", shared_buffers="256MB")
    c.sql("CREATE TABLE dirty AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1000000) g")
    c.sql("CHECKPOINT")
    c.sql("UPDATE dirty SET h = md5(h)")  # every page dirty again, none written yet
    return c


def test_a_start_waiting_for_its_checkpoint_is_listed_and_can_be_aborted(make_cluster, playbook, tmp_path):
    """The keeper is addressable from the moment it exists: while pg_backup_start waits for a
    spread checkpoint, pg_backup_session_info lists it as starting and an abort ends it at once."""
    c = _slow_checkpoint_cluster(make_cluster)
    cv = c.conn_vars()
    sid = f"slow-start-{os.getpid()}-{time.monotonic_ns()}"
    thread, starting = _in_background(playbook, play(session_task("start", label="slow-start", session_id=sid, **cv)))
    wait_until(lambda: _starting_session(playbook, sid), what="the start to wait")
    info = _starting_session(playbook, sid)
    assert info["alive"] is True and "checkpoint" in info["waiting_for"], info
    abort = playbook(play(session_task("abort", session_id=sid, **cv)))
    assert abort.rc == 0 and abort.task("abort")["changed"] is True, abort
    thread.join(30)
    assert not thread.is_alive(), "the start task did not return after the abort"
    assert starting["run"].rc != 0
    assert "aborted while it started" in starting["run"].task("start")["msg"], starting["run"].task("start")["msg"]
    wait_until(lambda: c.backups_in_progress() == 0 and not _keeper_backends(c), what="the keeper's session to end")


def _starting_session(playbook, sid: str):
    run = playbook(play(session_task("status", session_id=sid)))
    found = run.task("status")["sessions"]
    return found[0] if found and found[0]["status"] == "starting" else None


def _keeper_backends(cluster) -> list:
    return cluster.sql("SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgops.online_backup keeper%%'")


def test_a_start_task_killed_while_the_checkpoint_runs_ends_its_keeper(make_cluster, playbook, tmp_path):
    """Ctrl-C while the start waits for its checkpoint: the keeper sees its module go and cancels
    the start, so nothing is left holding a backup (or, for the role, a lock)."""
    c = _slow_checkpoint_cluster(make_cluster)
    cv = c.conn_vars()
    sid = f"killed-start-{os.getpid()}-{time.monotonic_ns()}"
    tag = f"PGOPS_KILL_TAG={sid}"
    thread, _starting = _in_background(
        playbook, play(session_task("start", label="killed-start", session_id=sid, **cv)), env={"PGOPS_KILL_TAG": sid}
    )
    wait_until(lambda: _starting_session(playbook, sid), what="the start to wait")
    # The run and its module process, as Ctrl-C leaves them; the keeper (a daemon of its own) lives on.
    run_pids = tagged_processes(tag, keepers=False)
    assert run_pids and tagged_processes(tag, keepers=True), "the start task's processes (or its keeper) were not found"
    for pid in run_pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    state_file = pathlib.Path.home() / ".pgops_online_backup" / "sessions" / sid / "state.json"
    wait_until(
        lambda: json.loads(state_file.read_text())["status"] != "starting" and not _keeper_backends(c),
        timeout=10,
        what="the keeper to cancel the start and end its session",
    )
    state = json.loads(state_file.read_text())
    assert state["status"] == "aborted" and "went away while the start waited" in state["reason"], state
    thread.join(60)
    assert c.backups_in_progress() == 0


def test_abort_ends_the_backup_and_a_later_start_works(make_cluster, playbook):
    c = make_cluster(15)
    cv = c.conn_vars()
    run = playbook(
        play(
            session_task("start", "b", label="to-abort", fast=True, **cv),
            session_task("abort", state="aborted", session_id="{{ b.session_id }}", **cv),
        )
    )
    assert run.rc == 0, run
    assert run.task("abort")["changed"] is True
    backend = c.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgops%%'")[0][0]
    assert backend == 0
    again = playbook(
        play(
            session_task("start", "b", label="after-abort", fast=True, **cv),
            session_task("stop", session_id="{{ b.session_id }}", **cv),
        )
    )
    assert again.rc == 0, again
    assert "LABEL: after-abort" in again.task("stop")["labelfile"]


def test_killed_keeper_makes_server_abort_and_stop_fail_clearly(make_cluster, playbook):
    c = make_cluster(17)
    cv = c.conn_vars()
    run = playbook(play(session_task("start", label="killed", fast=True, **cv)))
    started = run.task("start")
    os.kill(started["keeper_pid"], signal.SIGKILL)
    wait_until(lambda: c.backups_in_progress() == 0, what="the server to end the keeper's backend")
    wait_until(lambda: "aborting backup due to backend exiting" in open(c.log).read(), what="the abort in the server log")
    stop = playbook(play(session_task("stop", session_id=started["session_id"], **cv)))
    assert stop.rc != 0
    msg = stop.task("stop")["msg"]
    assert "session lost, backup unusable" in msg, msg
    assert str(started["keeper_pid"]) in msg


def test_max_duration_expiry_is_reported(make_cluster, playbook):
    c = make_cluster(14)
    cv = c.conn_vars()
    run = playbook(play(session_task("start", label="short", fast=True, max_duration=2, keepalive_interval=1, **cv)))
    sid = run.task("start")["session_id"]
    wait_until(lambda: c.backups_in_progress() == 0, what="the keeper to give up after max_duration")
    wait_until(lambda: not os.path.exists(f"/proc/{run.task('start')['keeper_pid']}/stat"), what="the keeper to exit")
    status = playbook(play(session_task("status")))
    mine = [s for s in status.task("status")["sessions"] if s["session_id"] == sid]
    assert mine and mine[0]["status"] == "expired", mine
    assert "max_duration of 2s" in mine[0]["reason"]
    assert status.task("status")["changed"] is False
    stop = playbook(play(session_task("stop", session_id=sid, **cv)))
    assert stop.rc != 0
    assert "expired" in stop.task("stop")["msg"]


def test_two_sessions_on_one_cluster_both_complete(make_cluster, playbook):
    c = make_cluster(18)
    cv = c.conn_vars()
    run = playbook(
        play(
            session_task("start a", "a", label="alpha", fast=True, **cv),
            session_task("start b", "b", label="beta", fast=True, **cv),
            session_task("stop a by label", state="stopped", label="alpha", **cv),
            session_task("stop b", session_id="{{ b.session_id }}", **cv),
        )
    )
    assert run.rc == 0, run
    assert "LABEL: alpha" in run.task("stop a by label")["labelfile"]
    assert "LABEL: beta" in run.task("stop b")["labelfile"]
    assert c.backups_in_progress() == 0


def test_archive_wait_timeout_names_the_segment_and_keeps_the_label(make_cluster, playbook, tmp_path):
    c = make_cluster(15)
    cv = c.conn_vars()
    run = playbook(play(session_task("start", label="slow-archive", fast=True, **cv)))
    sid = run.task("start")["session_id"]
    c.set_conf(archive_command="'/bin/false'")
    c.sql("SELECT pg_reload_conf()")
    dest = tmp_path / "d"
    dest.mkdir()
    t0 = time.monotonic()
    stop = playbook(play(session_task("stop", session_id=sid, dest=str(dest), archive_timeout=3, **cv)))
    assert time.monotonic() - t0 < 30
    assert stop.rc != 0
    res = stop.task("stop")
    assert res["missing_wal"] and res["missing_wal"][-1] == res["stop_wal"]
    assert res["stop_wal"] in res["msg"] and "pg_stat_archiver" in res["msg"], res["msg"]
    assert "LABEL: slow-archive" in res["labelfile"]
    assert (dest / "backup_label").read_text() == res["labelfile"]
    # Fix archiving and resume the wait with the same session id.
    c.set_conf(archive_command=f"'test ! -f {c.archive}/%f && cp %p {c.archive}/%f'")
    c.sql("SELECT pg_reload_conf()")
    again = playbook(play(session_task("stop", session_id=sid, archive_timeout=60, **cv)))
    assert again.rc == 0, again
    assert again.task("stop")["wal_archived"] is True
    assert again.task("stop")["labelfile"] == res["labelfile"]


def test_check_mode_starts_nothing(make_cluster, playbook):
    c = make_cluster(15)
    run = playbook(play(session_task("start", label="dry", **c.conn_vars())), check=True)
    assert run.rc == 0, run
    assert run.task("start")["changed"] is True
    assert "would start" in run.task("start")["msg"]
    assert c.backups_in_progress() == 0


def test_keeper_files_are_private_and_password_not_exposed(make_cluster, playbook, request):
    c = make_cluster(16)
    secret = "s3cr3t-Pa55-zz"
    c.sql(f"CREATE ROLE backup_admin LOGIN SUPERUSER PASSWORD '{secret}'")
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path is too deep.
    short = scratch_dir("pgops-rt-")
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    runtime = pathlib.Path(short) / "rt" / "sessions"
    conn = {"login_host": "127.0.0.1", "port": c.port, "login_user": "backup_admin", "login_password": secret}
    run = playbook(play(session_task("start", label="secure", fast=True, runtime_dir=str(runtime), **conn)), args=["-vvv"])
    assert run.rc == 0, run
    started = run.task("start")
    pid = started["keeper_pid"]
    sdir = runtime / started["session_id"]
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert stat.S_IMODE(sdir.stat().st_mode) == 0o700
    sock = sdir / "keeper.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE((sdir / "state.json").stat().st_mode) == 0o600
    assert secret.encode() not in open(f"/proc/{pid}/cmdline", "rb").read()
    assert secret.encode() not in open(f"/proc/{pid}/environ", "rb").read()
    assert secret not in run.stdout + run.stderr
    assert secret not in json.dumps(run.results).replace('"login_password": "********"', "")
    stop = playbook(play(session_task("stop", session_id=started["session_id"], runtime_dir=str(runtime), **conn)))
    assert stop.rc == 0, stop


# -- bad input and faults: a clear message, nothing left running


def _start_fails(playbook, cluster, major=None, **args) -> str:
    run = playbook(play(session_task("start", **args)))
    assert run.rc != 0, run
    if cluster is not None:
        assert cluster.backups_in_progress() == 0
    return run.task("start")["msg"]


@pytest.mark.parametrize(
    "label,expected",
    [("x" * 1025, "1025 bytes long; PostgreSQL accepts at most 1024"), ("bad\x00label", "NUL character")],
)
def test_bad_label_is_refused(label, expected, make_cluster, playbook):
    c = make_cluster(15)
    msg = _start_fails(playbook, c, label=label, **c.conn_vars())
    assert expected in msg, msg


def test_unreachable_server(playbook):
    msg = _start_fails(playbook, None, label="x", login_host="127.0.0.1", port=1)
    assert msg.startswith("unable to connect to database:"), msg
    assert "127.0.0.1" in msg and "port 1" in msg


def test_wrong_password_is_reported_and_never_shown(make_cluster, playbook):
    c = make_cluster(15)
    c.sql("CREATE ROLE someone LOGIN PASSWORD 'right-one'")
    run = playbook(
        play(
            session_task(
                "start", label="x", login_host="127.0.0.1", port=c.port, login_user="someone", login_password="Wr0ng-pa55word"
            )
        ),
        args=["-vvv"],
    )
    assert run.rc != 0
    msg = run.task("start")["msg"]
    assert "password authentication failed" in msg, msg
    assert "Wr0ng-pa55word" not in run.stdout + run.stderr + json.dumps(run.results)


@pytest.mark.parametrize(
    "major,grants",
    [
        (14, ["pg_start_backup(text, boolean, boolean)", "pg_stop_backup(boolean, boolean)"]),
        (16, ["pg_backup_start(text, boolean)", "pg_backup_stop(boolean)"]),
    ],
)
def test_missing_privilege_names_the_exact_grants(major, grants, make_cluster, playbook):
    c = make_cluster(major)
    c.sql("CREATE ROLE plain LOGIN PASSWORD 'pw-plain'")
    msg = _start_fails(playbook, c, label="x", login_host="127.0.0.1", port=c.port, login_user="plain", login_password="pw-plain")
    for g in grants:
        assert f'GRANT EXECUTE ON FUNCTION {g} TO "plain";' in msg, msg
    # The GRANTs from the message are enough.
    for g in grants:
        c.sql(f"GRANT EXECUTE ON FUNCTION {g} TO plain")
    run = playbook(
        play(
            session_task(
                "start",
                "b",
                label="granted",
                fast=True,
                login_host="127.0.0.1",
                port=c.port,
                login_user="plain",
                login_password="pw-plain",
            ),
            session_task(
                "stop",
                session_id="{{ b.session_id }}",
                login_host="127.0.0.1",
                port=c.port,
                login_user="plain",
                login_password="pw-plain",
            ),
        )
    )
    assert run.rc == 0, run


def test_wal_level_minimal(make_cluster, playbook):
    c = make_cluster(15, wal_level="minimal", max_wal_senders=0, archive_mode="off")
    msg = _start_fails(playbook, c, label="x", **c.conn_vars())
    assert "WAL level not sufficient" in msg and "wal_level = replica" in msg, msg


def test_unknown_session_id_on_stop(make_cluster, playbook):
    c = make_cluster(15)
    run = playbook(play(session_task("stop", state="stopped", session_id="20200101T000000Z-00000000", **c.conn_vars())))
    assert run.rc != 0
    assert "unknown session id 20200101T000000Z-00000000" in run.task("stop")["msg"]
    bad = playbook(play(session_task("stop", state="stopped", session_id="../../etc", **c.conn_vars())))
    assert "invalid session id" in bad.task("stop")["msg"]


def test_lease_ends_a_backup_whose_run_went_silent(make_cluster, playbook):
    c = make_cluster(16)
    cv = c.conn_vars()
    run = playbook(play(session_task("start", label="leased", fast=True, lease=5, keepalive_interval=1, **cv)))
    assert run.rc == 0, run
    started = run.task("start")
    assert c.backups_in_progress() == 1
    wait_until(lambda: c.backups_in_progress() == 0, timeout=20, what="the lease to run out")
    wait_until(lambda: not os.path.exists(f"/proc/{started['keeper_pid']}/stat"), what="the keeper to exit")
    status = playbook(play(session_task("status")))
    mine = [s for s in status.task("status")["sessions"] if s["session_id"] == started["session_id"]]
    assert mine[0]["status"] == "expired" and "(lease)" in mine[0]["reason"], mine
    bad = playbook(play(session_task("start", label="x", lease=2, **cv)))
    assert "lease must be 0 (off) or at least 5 seconds" in bad.task("start")["msg"]


def test_a_start_that_times_out_is_cancelled_and_leaves_no_session(make_cluster, playbook):
    c = _slow_checkpoint_cluster(make_cluster)
    run = playbook(play(session_task("start", label="too-slow", start_timeout=2, **c.conn_vars())))
    assert run.rc != 0
    assert "did not start within 2s" in run.task("start")["msg"], run.task("start")["msg"]
    wait_until(lambda: c.backups_in_progress() == 0 and not _keeper_backends(c), what="the cancelled start's session to go")
    status = playbook(play(session_task("status", label="too-slow")))
    assert not [s for s in status.task("status")["sessions"] if s.get("alive")]


def test_stopping_by_a_reused_label_ignores_the_sessions_that_finished(make_cluster, playbook):
    """A nightly label is used every night: last night's stopped session must not make tonight's stop ambiguous."""
    c = make_cluster(17)
    cv = c.conn_vars()
    label = f"nightly-{c.port}-{time.monotonic_ns()}"
    for night in (1, 2):
        run = playbook(
            play(
                session_task("start", label=label, fast=True, **cv),
                session_task("stop by label", state="stopped", label=label, **cv),
            )
        )
        assert run.rc == 0, f"night {night}: {run}"
    status = playbook(play(session_task("status", label=label)))
    assert [s["status"] for s in status.task("status")["sessions"]] == ["stopped", "stopped"]
    assert status.task("status")["changed"] is False
