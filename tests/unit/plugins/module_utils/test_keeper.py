"""The session keeper without a server or a keeper process: the Core state
machine on a fake monotonic clock, and what state files say about a session
(liveness, describe, sweeping), written by hand into tmp_path."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import sys
import threading
import time

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
k = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._keeper")
sess = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._sessions")

SPEC = {"max_duration": 3600, "lease": 60, "keepalive_interval": 30}
# No keepalive gets in the way of what a test looks at.
QUIET = dict(SPEC, keepalive_interval=10**6)


def running(spec=QUIET, at: float = 100.0):
    core = k.Core(spec, 0.0)
    core.started(at)
    assert core.status == "running"
    return core


def iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()


# -- Core: the lease


def test_ping_renews_the_lease_but_status_does_not():
    pinged, looked_at = running(), running()
    pinged.on_request("ping", 150.0)
    looked_at.on_request("status", 150.0)
    # Lease 60 s from the start at 100: due at 160 unless renewed.
    assert looked_at.due(160.0) == ("lease", 0.0)
    assert looked_at.status == "expired" and "no word from the run for 60s (lease)" in looked_at.reason
    action, wait = pinged.due(160.0)
    assert action is None and wait == pytest.approx(50.0) and pinged.status == "running"
    assert pinged.due(210.0) == ("lease", 0.0)


def test_status_request_gets_no_action_and_no_reply_of_its_own():
    core = running()
    assert core.on_request("status", 120.0) == (None, None)  # the I/O layer replies with the state


def test_every_request_but_status_is_word_from_the_run():
    for op in ("abort", "stop", "nonsense"):
        core = running()
        core.on_request(op, 150.0)
        assert core.last_contact == 150.0, op


def test_lease_only_counts_while_running():
    core = k.Core(QUIET, 0.0)
    # Starting: a checkpoint may take longer than the lease; only max_duration counts.
    action, wait = core.due(1000.0)
    assert action is None and core.status == "starting" and wait == pytest.approx(2600.0)
    core.started(1000.0)
    assert core.due(1059.0)[0] is None
    assert core.due(1060.0) == ("lease", 0.0)
    # Ended: nothing is due any more.
    assert core.due(5000.0) == (None, 0.0) and core.status == "expired"


def test_no_lease_means_only_max_duration():
    core = running(dict(QUIET, lease=0), at=0.0)
    action, wait = core.due(3000.0)
    assert action is None and wait == pytest.approx(600.0)
    assert core.due(3600.0) == ("expire", 0.0)


# -- Core: max_duration


@pytest.mark.parametrize("start", [None, 10.0])
def test_max_duration_ends_the_session_whether_started_or_not(start):
    core = k.Core(dict(QUIET, max_duration=100, lease=0), 0.0)
    if start is not None:
        core.started(start)
    action, wait = core.due(99.5)
    assert action is None and wait == pytest.approx(0.5)
    assert core.due(100.0) == ("expire", 0.0)
    assert core.status == "expired" and "max_duration of 100s passed" in core.reason
    assert core.ended


def test_max_duration_counts_from_the_launch_not_the_start():
    core = k.Core(dict(QUIET, max_duration=100, lease=1000), 0.0)
    core.started(90.0)
    assert core.due(100.0)[0] == "expire"


def test_wait_is_the_nearest_deadline():
    core = running(dict(SPEC, max_duration=100), at=0.0)
    assert core.due(0.0) == (None, pytest.approx(30.0))  # keepalive (30) before lease (60) and max_duration (100)
    core.on_keepalive(None, 50.0)
    assert core.due(50.0) == (None, pytest.approx(10.0))  # the lease runs out at 60
    core.on_request("ping", 59.0)
    core.on_keepalive(None, 80.0)
    assert core.due(90.0) == (None, pytest.approx(10.0))  # max_duration now: lease at 119, keepalive at 110


# -- Core: keepalives


def test_keepalive_due_after_the_interval():
    core = running(dict(SPEC, lease=0), at=0.0)
    action, wait = core.due(29.0)
    assert action is None and wait == pytest.approx(1.0)
    assert core.due(30.0) == ("keepalive", 0.0)
    assert core.due(31.0) == ("keepalive", 0.0)  # until it is done
    core.on_keepalive(None, 31.0)
    action, wait = core.due(32.0)
    assert action is None and wait == pytest.approx(29.0) and core.status == "running"


def test_no_keepalive_while_starting():
    core = k.Core(dict(SPEC, lease=0), 0.0)
    action, _wait = core.due(500.0)
    assert action is None and core.status == "starting"


def test_keepalive_interval_is_at_least_a_second():
    core = running(dict(SPEC, keepalive_interval=0.01, lease=0), at=0.0)
    assert core.due(0.5)[0] is None and core.due(1.0)[0] == "keepalive"


def test_a_ping_checks_the_session_at_most_once_a_second():
    core = running(dict(SPEC, lease=0), at=0.0)
    assert core.on_request("ping", 0.5) == (None, None)
    assert core.on_request("ping", 1.0) == ("keepalive", None)
    core.on_keepalive(None, 1.0)
    assert core.on_request("ping", 1.5) == (None, None)
    # Not while starting: there is no backup to check yet.
    assert k.Core(SPEC, 0.0).on_request("ping", 100.0) == (None, None)


def test_a_keepalive_error_ends_the_session_as_lost():
    core = running(SPEC, at=0.0)
    core.on_keepalive("server closed the connection unexpectedly", 30.0)
    assert core.status == "lost" and core.ended
    assert "server closed the connection unexpectedly" in core.reason and "unusable" in core.reason
    assert core.due(31.0) == (None, 0.0)
    action, reply = core.on_request("stop", 32.0)
    assert action is None and reply["ok"] is False and "lost" in reply["error"]
    # The first end wins: a later abort or error does not rewrite what happened.
    core.on_keepalive("another error", 33.0)
    core.end("aborted", "too late")
    assert core.status == "lost" and "server closed" in core.reason


# -- Core: requests


def test_stop_is_refused_while_starting():
    core = k.Core(SPEC, 0.0)
    action, reply = core.on_request("stop", 5.0)
    assert action is None and reply["ok"] is False and "has not started yet" in reply["error"]
    assert core.status == "starting"


def test_stop_while_running_is_carried_out_by_the_io_layer():
    core = running()
    assert core.on_request("stop", 120.0) == ("stop", None)
    assert core.status == "running"  # the I/O layer ends the session once the stop function returned


def test_stop_is_refused_while_a_copy_is_attached_and_carried_out_after_it_detached():
    """A stray stop while the copy runs would end the backup under it: the copy's files would hold
    changes made after the stop's LSN. A watcher (the run waiting in turns) does not block it."""
    core = running()
    assert core.on_request("attach", 100.0) == ("attach", None)
    action, reply = core.on_request("stop", 110.0)
    assert action is None and reply["ok"] is False and "copy is still attached" in reply["error"]
    assert core.status == "running"
    core.on_detach(True, 120.0)
    assert core.on_request("watch", 121.0) == ("watch", None)
    assert core.on_request("stop", 122.0) == ("stop", None)


@pytest.mark.parametrize("status", ["stopped", "aborted", "expired", "failed"])
def test_stop_is_refused_after_the_end(status):
    core = running()
    core.end(status, "because")
    action, reply = core.on_request("stop", 120.0)
    assert action is None and reply == {"ok": False, "error": f"the session ended ({status}: because)"}


def test_abort_while_starting_returns_the_abort_action():
    core = k.Core(SPEC, 0.0)
    assert core.on_request("abort", 5.0) == ("abort", None)
    assert core.status == "starting"  # the I/O layer cancels the start, then ends it


def test_abort_after_the_end_is_refused():
    core = running()
    assert core.on_request("abort", 120.0) == ("abort", None)
    core.end("aborted", "on request")
    action, reply = core.on_request("abort", 121.0)
    assert action is None and reply == {"ok": False, "error": "the session already ended (aborted)"}


def test_unknown_request():
    action, reply = running().on_request("reboot", 120.0)
    assert action is None and reply == {"ok": False, "error": "unknown request 'reboot'"}


def test_launcher_gone_aborts_only_while_starting():
    core = k.Core(SPEC, 0.0)
    assert core.on_launcher_gone() == "abort"
    core.started(10.0)
    assert core.on_launcher_gone() is None and core.status == "running"


def test_started_only_moves_a_starting_session():
    core = k.Core(SPEC, 0.0)
    core.end("aborted", "while starting")
    core.started(10.0)  # the start returned after the abort won the race
    assert core.status == "aborted"


# -- session ids


@pytest.mark.parametrize("sid", ["20261129T101500Z-0123abcd", "a", "A.b_c-9", "x" * 64])
def test_valid_session_ids(sid):
    assert sess.valid_session_id(sid)
    assert sess.session_dir("/run/s", sid) == f"/run/s/{sid}"


def test_new_session_ids_are_valid_and_unique():
    ids = {sess.new_session_id() for _ in range(50)}
    assert len(ids) == 50 and all(sess.valid_session_id(sid) for sid in ids)


@pytest.mark.parametrize("sid", ["", ".", "..", "../x", "a/b", "/abs", "-x", ".hidden", "x" * 65, "a b", None, 42])
def test_invalid_session_ids(sid):
    assert not sess.valid_session_id(sid)
    with pytest.raises(sess.KeeperError, match="invalid session id"):
        sess.session_dir("/run/s", sid)


# -- liveness: what a repository lock asks


def test_liveness_of_sessions_this_process_cannot_see(tmp_path, write_session):
    assert sess.liveness(str(tmp_path), "nope", 60) == (None, f"no session nope in {tmp_path}")
    assert sess.liveness(str(tmp_path), "../x", 60)[0] is None
    (tmp_path / "empty").mkdir()
    assert sess.liveness(str(tmp_path), "empty", 60) == (None, "session empty has no readable state")
    sdir = write_session(tmp_path, "junk")
    with open(os.path.join(sdir, "state.json"), "w") as f:
        f.write("[1]")
    assert sess.liveness(str(tmp_path), "junk", 60)[0] is None


@pytest.mark.parametrize("status", ["starting", "running"])
def test_liveness_of_a_live_session_is_its_keeper(tmp_path, write_session, live_process, dead_process, status):
    pid, starttime = live_process
    write_session(tmp_path, "s", status=status, pid=pid, pid_starttime=starttime)
    assert sess.liveness(str(tmp_path), "s", 60) == (True, f"its keeper (pid {pid}) is {status}")
    # The same pid started at another time is another process (a reused pid).
    write_session(tmp_path, "s", status=status, pid=pid, pid_starttime=starttime + 1)
    assert sess.liveness(str(tmp_path), "s", 60) == (False, f"its session keeper (pid {pid}) is gone")
    dead, dead_start = dead_process
    write_session(tmp_path, "s", status=status, pid=dead, pid_starttime=dead_start)
    assert sess.liveness(str(tmp_path), "s", 60) == (False, f"its session keeper (pid {dead}) is gone")
    write_session(tmp_path, "s", status=status)  # no pid recorded
    assert sess.liveness(str(tmp_path), "s", 60)[0] is False


def test_liveness_of_a_stopped_session(tmp_path, write_session, live_process, dead_process):
    pid, starttime = live_process
    write_session(tmp_path, "s", status="stopped", pid=1, pid_starttime=0, archive_wait={"pid": pid, "pid_starttime": starttime})
    assert sess.liveness(str(tmp_path), "s", 60) == (True, "its stop task waits for the WAL archive")
    dead, dead_start = dead_process
    write_session(tmp_path, "s", status="stopped", archive_wait={"pid": dead, "pid_starttime": dead_start})
    assert sess.liveness(str(tmp_path), "s", 60) == (False, "its backup stopped but the run that was finishing it is gone")
    now = time.time()
    write_session(tmp_path, "s", status="stopped", delivered=True, delivered_at=iso(now - 50))
    assert sess.liveness(str(tmp_path), "s", 60, now) == (True, "it stopped moments ago (its run is finishing the backup)")
    assert sess.liveness(str(tmp_path), "s", 40, now)[0] is False
    assert sess.liveness(str(tmp_path), "s", 60, now + 20)[0] is False
    # Delivered: a waiter that still runs no longer counts, only the grace does.
    write_session(
        tmp_path,
        "s",
        status="stopped",
        delivered=True,
        delivered_at=iso(now - 500),
        archive_wait={"pid": pid, "pid_starttime": starttime},
    )
    assert sess.liveness(str(tmp_path), "s", 60, now)[0] is False


@pytest.mark.parametrize("status", ["aborted", "expired", "lost", "failed"])
def test_liveness_of_an_ended_session(tmp_path, write_session, live_process, status):
    pid, starttime = live_process  # even a keeper that still runs its clean-up
    write_session(tmp_path, "s", status=status, reason="why", pid=pid, pid_starttime=starttime)
    assert sess.liveness(str(tmp_path), "s", 60) == (False, f"its session ended ({status}: why)")


# -- describe, list, mark lost, sweep


def test_describe_a_running_session(live_process):
    pid, starttime = live_process
    now = time.time()
    state = {"session_id": "s", "status": "running", "pid": pid, "pid_starttime": starttime, "last_contact_at": iso(now - 12.34)}
    state["result"] = {"labelfile": "secret"}
    d = sess.describe(state, now)
    assert d["alive"] is True and d["stale"] is False
    assert d["waiting_for"] == "the stop (the copy runs meanwhile)"
    assert d["seconds_since_contact"] == pytest.approx(12.3, abs=0.05)
    assert "result" not in d and state["result"] == {"labelfile": "secret"}  # the caller's dict is not changed


def test_describe_a_keeper_that_died(dead_process):
    pid, starttime = dead_process
    for status in ("starting", "running"):
        d = sess.describe({"status": status, "pid": pid, "pid_starttime": starttime})
        assert d["alive"] is False and d["stale"] is True
        assert d["waiting_for"] == "nobody: the keeper process is gone"


def test_describe_what_a_session_waits_for(live_process, dead_process):
    pid, starttime = live_process
    keeper = {"pid": pid, "pid_starttime": starttime}
    assert "checkpoint" in sess.describe(dict(keeper, status="starting"))["waiting_for"]
    waiter = {"status": "stopped", "archive_wait": {"pid": pid, "pid_starttime": starttime}}
    assert sess.describe(waiter)["waiting_for"] == "the WAL archive"
    assert sess.describe(waiter)["stale"] is False  # a stopped session has no keeper to lose
    gone = {"status": "stopped", "archive_wait": {"pid": dead_process[0], "pid_starttime": dead_process[1]}}
    assert sess.describe(gone)["waiting_for"] == "nobody: the stop task that waited for the archive is gone"
    assert sess.describe(dict(waiter, delivered=True))["waiting_for"] is None
    assert sess.describe({"status": "aborted"})["waiting_for"] is None


def test_list_sessions_reads_only_session_directories(tmp_path, write_session, live_process):
    assert sess.list_sessions(str(tmp_path / "missing")) == []
    write_session(tmp_path, "b", status="running", pid=live_process[0], pid_starttime=live_process[1])
    write_session(tmp_path, "a", status="aborted")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "nostate").mkdir()
    (tmp_path / "notes").write_text("a stray file, not a session")  # found by review: it used to crash the listing
    got = sess.list_sessions(str(tmp_path))
    assert [(s["session_id"], s["alive"]) for s in got] == [("a", False), ("b", True)]
    assert sess.liveness(str(tmp_path), "notes", 60)[0] is None
    assert sess.sweep(str(tmp_path)) == []


def test_mark_lost_if_dead(tmp_path, write_session, dead_process, live_process):
    sdir = write_session(tmp_path, "s", status="running", pid=dead_process[0], pid_starttime=dead_process[1])
    state = sess.read_state(sdir)
    checked = sess.mark_lost_if_dead(sdir, dict(state), write=False)
    assert checked["status"] == "lost" and sess.read_state(sdir)["status"] == "running"  # check mode writes nothing
    sess.mark_lost_if_dead(sdir, state)
    saved = sess.read_state(sdir)
    assert saved["status"] == "lost" and f"keeper process {dead_process[0]} is gone" in saved["reason"] and saved["ended_at"]
    alive = write_session(tmp_path, "t", status="running", pid=live_process[0], pid_starttime=live_process[1])
    assert sess.mark_lost_if_dead(alive, sess.read_state(alive))["status"] == "running"
    assert sess.read_state(alive)["status"] == "running"


def test_sweep_marks_dead_keepers_lost_and_removes_old_finished_sessions(tmp_path, write_session, dead_process, live_process):
    dead = write_session(tmp_path, "dead", status="running", pid=dead_process[0], pid_starttime=dead_process[1])
    live = write_session(tmp_path, "live", status="running", pid=live_process[0], pid_starttime=live_process[1])
    old = write_session(tmp_path, "old", status="stopped", delivered=True)
    recent = write_session(tmp_path, "recent", status="aborted")
    week_ago = time.time() - 8 * 86400
    os.utime(os.path.join(old, "state.json"), (week_ago, week_ago))
    os.utime(os.path.join(live, "state.json"), (week_ago, week_ago))  # a live one is never removed
    assert sess.sweep(str(tmp_path)) == ["old"]
    assert sorted(os.listdir(tmp_path)) == ["dead", "live", "recent"]
    assert sess.read_state(dead)["status"] == "lost"
    assert sess.read_state(live)["status"] == "running" and sess.read_state(recent)["status"] == "aborted"


# -- a task attached to the keeper (the copy)


def test_attach_only_while_running():
    core = k.Core(SPEC, 0.0)
    action, reply = core.on_request("attach", 1.0)
    assert action is None and reply["ok"] is False and "starting" in reply["error"] and core.attached == 0
    core.started(2.0)
    assert core.on_request("attach", 3.0) == ("attach", None) and core.attached == 1
    core.end("aborted", "on request")
    assert core.on_request("attach", 4.0)[1]["ok"] is False and core.attached == 1


def test_an_attached_task_keeps_the_lease_and_checks_the_session_often():
    core = running(SPEC, at=0.0)
    core.on_request("attach", 0.0)
    for now in range(2, 600, 2):  # the copy runs ten minutes without a ping
        action, _wait = core.due(float(now))
        assert action in (None, "keepalive"), (now, action)
        if action == "keepalive":
            core.on_keepalive(None, float(now))
    assert core.status == "running"
    # Checks every ATTACHED_CHECK_INTERVAL, not every keepalive_interval.
    core.on_keepalive(None, 600.0)
    assert core.due(600.0 + k.ATTACHED_CHECK_INTERVAL)[0] == "keepalive"
    # Detached gracefully: the lease counts again from then.
    assert core.on_detach(True, 601.0) is None and core.attached == 0
    core.on_keepalive(None, 650.0)
    assert core.due(660.0)[0] is None
    assert core.due(661.0) == ("lease", 0.0)


def test_an_attached_task_that_dies_aborts_the_backup():
    core = running(SPEC, at=0.0)
    core.on_request("attach", 1.0)
    core.on_request("attach", 1.0)
    assert core.on_detach(False, 5.0) == "abort" and core.attached == 1
    core.end("aborted", "the copy went away")
    assert core.on_detach(False, 6.0) is None and core.attached == 0  # nothing left to abort


class FakeKeeper:
    """Accepts one attached task: replies to attach, then sends what the test says."""

    def __init__(self, sdir: str, first: dict):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(os.path.join(sdir, sess.SOCKET_FILE))
        self.sock.listen(1)
        self.first = first
        self.requests = []
        self.client = None
        self.accepted = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        client, _ = self.sock.accept()
        self.client = client
        self.requests.append(json.loads(sess.recv_line(client)))
        client.sendall(json.dumps(self.first).encode() + b"\n")
        self.accepted.set()
        try:
            line = sess.recv_line(client)
        except OSError:  # closed by the test
            return
        if line:
            self.requests.append(json.loads(line))
            client.sendall(b'{"ok": true, "detached": true}\n')

    def send(self, reply: dict):
        self.client.sendall(json.dumps(reply).encode() + b"\n")

    def close(self):
        if self.client is not None:
            self.client.close()
        self.sock.close()


def wait_for(predicate, seconds: float = 5.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def attached(tmp_path, write_session):
    """(fake keeper, attachment, on_gone calls) of a running session with a task attached."""
    sdir = write_session(tmp_path, "s", status="running")
    fake = FakeKeeper(sdir, {"ok": True, "state": {"status": "running"}})
    gone = []
    attachment = sess.Attachment(sdir, on_gone=lambda: gone.append(1))
    attachment.start()
    assert fake.accepted.wait(5) and fake.requests == [{"op": "attach"}] and attachment.gone is None
    yield fake, attachment, gone
    fake.close()


def test_attachment_is_told_at_once_when_the_backup_ends(attached):
    fake, attachment, gone = attached
    fake.send({"ok": False, "ended": True, "state": {"status": "lost", "reason": "the server restarted"}})
    assert wait_for(lambda: gone == [1])
    assert attachment.gone == "session lost, backup unusable: the server restarted"


def test_attachment_detaches_quietly(attached):
    fake, attachment, gone = attached
    attachment.stop()
    assert fake.requests == [{"op": "attach"}, {"op": "detach"}]
    assert attachment.gone is None and gone == []


def test_attachment_refused_or_without_a_keeper(tmp_path, write_session, dead_process):
    ended = running(SPEC)
    ended.end("expired", "no word from the run for 60s (lease)")
    _action, refusal = ended.on_request("attach", 200.0)  # what the keeper answers
    sdir = write_session(tmp_path, "s", status="expired", reason=ended.reason)
    fake = FakeKeeper(sdir, refusal)
    try:
        attachment = sess.Attachment(sdir)
        attachment.start()
        assert attachment.gone == "session expired, backup unusable: no word from the run for 60s (lease)"
    finally:
        fake.close()
    os.unlink(os.path.join(sdir, sess.SOCKET_FILE))
    write_session(tmp_path, "s", status="running", pid=dead_process[0], pid_starttime=dead_process[1])
    attachment = sess.Attachment(sdir)
    attachment.start()  # no socket, and the keeper is dead: lost
    assert attachment.gone.startswith(f"session lost, backup unusable: keeper process {dead_process[0]} is gone")
    assert sess.read_state(sdir)["status"] == "running"  # only the keeper or a sweep records it


# -- the run waiting in turns (pg_backup_progress) for a handed-over start or copy


def test_a_start_handed_over_once_and_only_while_starting():
    core = k.Core(dict(QUIET, start_timeout=600), 0.0)
    assert core.on_request("handover", 1.0) == ("handover", None) and core.handed_over
    assert core.on_request("handover", 2.0)[1]["ok"] is False  # once
    assert core.on_launcher_gone() is None  # the launcher left on purpose: no abort
    started = running()
    assert started.on_request("handover", 200.0)[1]["ok"] is False  # it has returned: the report is in the pipe
    assert k.Core(QUIET, 0.0).on_launcher_gone() == "abort"  # not handed over: as before


def test_a_handed_over_start_is_cancelled_by_the_keeper_after_start_timeout():
    core = k.Core(dict(QUIET, start_timeout=600), 0.0)
    assert core.due(700.0)[0] is None  # not handed over: the start task's own timeout counts
    core.on_request("handover", 1.0)
    action, wait = core.due(500.0)
    assert action is None and wait == pytest.approx(100.0)
    assert core.due(600.0) == ("abort", 0.0)
    assert core.abort_reason == "the backup did not start within 600s; the start was cancelled"
    assert core.status == "starting"  # the I/O layer cancels the start, then ends the session


def test_watch_while_starting_or_running_only():
    core = k.Core(QUIET, 0.0)
    assert core.on_request("watch", 1.0) == ("watch", None) and core.watching == 1
    core.started(2.0)
    assert core.on_request("watch", 3.0) == ("watch", None) and core.watching == 2
    core.end("aborted", "on request")
    assert core.on_request("watch", 4.0)[1]["ok"] is False and core.watching == 2


def test_a_turn_that_dies_aborts_at_once_starting_or_running():
    starting = k.Core(QUIET, 0.0)
    starting.on_request("watch", 1.0)
    assert starting.on_detach(False, 2.0, "watch") == "abort" and starting.watching == 0
    copying = running()
    copying.on_request("watch", 101.0)
    assert copying.on_detach(False, 102.0, "watch") == "abort"
    copying.end("aborted", "the run went away")
    copying.on_request("watch", 103.0)
    assert copying.on_detach(False, 104.0, "watch") is None  # nothing left to abort


def test_the_next_turn_is_due_within_its_promise():
    core = running(SPEC, at=0.0)
    core.on_request("attach", 0.0)  # the copy
    core.on_request("watch", 1.0)
    assert core.on_detach(True, 11.0, "watch", back_within=30.0) is None and core.watch_deadline == 41.0
    assert core.due(40.0)[0] in (None, "keepalive")
    core.on_request("watch", 40.5)  # the next turn came: no deadline while it waits
    assert core.watch_deadline is None and core.due(100.0)[0] in (None, "keepalive")
    core.on_detach(True, 101.0, "watch", back_within=30.0)
    assert core.due(131.0) == ("abort", 0.0)
    assert "went silent (no turn within 30s of its last" in core.abort_reason and "copy" in core.abort_reason
    assert core.status == "running"  # the I/O layer aborts


def test_a_last_turn_promises_nothing():
    core = running(QUIET, at=0.0)
    core.on_request("watch", 1.0)
    assert core.on_detach(True, 2.0, "watch") is None and core.watch_deadline is None
    # The step ended: the lease counts from the last turn, as from any word.
    assert core.due(61.0)[0] is None
    assert core.due(62.0) == ("lease", 0.0)


def test_a_silent_run_while_its_start_waits_is_named():
    core = k.Core(dict(QUIET, start_timeout=1800), 0.0)
    core.on_request("handover", 1.0)
    core.on_request("watch", 1.5)
    core.on_detach(True, 2.0, "watch", back_within=30.0)
    assert core.due(32.0) == ("abort", 0.0) and "start" in core.abort_reason


def test_watching_keeps_the_lease():
    core = running(SPEC, at=0.0)
    core.on_request("watch", 0.0)
    for now in range(10, 600, 10):
        action, _wait = core.due(float(now))
        if action == "keepalive":
            core.on_keepalive(None, float(now))
        assert core.status == "running", now


def test_attachment_as_a_watcher_promises_its_next_turn(tmp_path, write_session):
    sdir = write_session(tmp_path, "w", status="running")
    fake = FakeKeeper(sdir, {"ok": True, "state": {"status": "running"}})
    try:
        attachment = sess.Attachment(sdir, op="watch")
        attachment.start()
        assert fake.accepted.wait(5) and attachment.gone is None
        attachment.stop(back_within=30.0)
        assert fake.requests == [{"op": "watch"}, {"op": "detach", "back_within": 30.0}]
    finally:
        fake.close()


def test_a_dropped_attachment_goes_without_a_word(attached):
    fake, attachment, gone = attached
    attachment.drop()
    assert wait_for(lambda: len(fake.requests) == 1)
    assert fake.requests == [{"op": "attach"}] and gone == [] and attachment.gone is None


# -- Session: the backup's own server process


class _PooledConn:
    """A connection whose statements land on the server processes given, in turn (as through a pooler in
    transaction mode); the backup functions answer as a server would."""

    def __init__(self, backend_pids: list):
        self.pids = list(backend_pids)
        self.statements = []
        self.closed = False

    def close(self):
        self.closed = True

    def cursor(self):
        conn = self

        class Cursor:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def execute(self, sql, args=None):
                conn.statements.append(sql)
                self.row = (conn.pids.pop(0),) if "pg_backend_pid()" in sql else ("0/3000028",)

            def fetchone(self):
                return self.row

        return Cursor()


def test_the_keepalive_notices_a_session_moved_to_another_server_process():
    session = k.Session({})
    session.conn = _PooledConn([4242, 4242, 5151])
    assert session.start(15, "label", True)[0] == 4242
    assert session.ping() is None, "the same server process: healthy"
    moved = session.ping()
    assert moved and "moved from server process 4242, where the backup started, to 5151" in moved
    assert "pooler" in moved


def test_a_stop_in_another_server_process_is_not_run(tmp_path):
    """Through a pooler the stop could end another session's backup: it is refused, the session failed."""
    session = k.Session({})
    session.conn = _PooledConn([4242, 5151])
    session.start(15, "label", True)
    spec = dict(QUIET, session_id="20261202T101500Z-0a1b2c3d", label="label", cluster="7312", fast=True)
    keeper = k.Keeper(None, session, spec, str(tmp_path))
    keeper.core.started(time.monotonic())
    keeper.state["server_version_num"] = 150000
    reply = keeper._stop()
    assert not reply["ok"] and "moved from server process 4242" in reply["error"]
    assert keeper.core.status == "failed"
    assert not [sql for sql in session.conn.statements if "pg_backup_stop" in sql]
    os.close(keeper.start_r)
    os.close(keeper.start_w)


def test_a_session_ended_while_its_start_connected_never_starts_the_backup():
    """An abort while the start thread connects finds no connection to cancel: the thread, once connected,
    closes it instead of starting the backup (which would run on the server until the keeper exits)."""
    session = k.Session({})
    session.close()  # the abort, before the connection exists
    conn = session.conn = _PooledConn([4242])  # then the connection arrives
    with pytest.raises(k.KeeperError, match="ended before the backup started"):
        session.start(15, "label", True)
    assert conn.closed and conn.statements == []
