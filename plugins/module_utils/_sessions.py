# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A backup session as the other processes of the keeper's user see it: its
directory (state file and socket), whether its keeper still lives, what it
waits for, the listing and sweeping of sessions, and the client side of the
keeper's socket protocol (request, Attachment). The keeper process itself is
_keeper's; the modules that only read sessions or talk to a keeper (the
catalog's lock check, the copy, session_info) need only this module.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import threading
import time

from ._errors import PgopsError
from ._files import read_json, write_json
from ._progress import copy_line, read_progress
from ._units import human_seconds

STATE_FILE = "state.json"
SOCKET_FILE = "keeper.sock"
STARTING, RUNNING, STOPPED = "starting", "running", "stopped"
LIVE = (STARTING, RUNNING)
TERMINAL = (STOPPED, "aborted", "expired", "lost", "failed")
_SID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_MESSAGE = 16 * 1024 * 1024
# A run that waits for a step in turns (pg_backup_progress, called again and again by the action
# plugins of pg_backup_session and pg_backup_copy) promises the next turn within this many
# seconds of the last; when none comes, the run is gone and the keeper ends the backup.
WATCH_GRACE = 30.0


class KeeperError(PgopsError):
    pass


def utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def default_runtime_dir() -> str:
    # The effective user's home, not $HOME: become may keep the caller's HOME.
    return os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".pgops_online_backup", "sessions")


def new_session_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def valid_session_id(sid) -> bool:
    return isinstance(sid, str) and bool(_SID_RE.match(sid)) and sid not in (".", "..")


def session_dir(runtime_dir: str, sid: str) -> str:
    if not valid_session_id(sid):
        raise KeeperError(
            f"invalid session id {sid!r}: letters, digits, '_', '.' and '-' only (at most 64), e.g. 20261129T101500Z-0123abcd"
        )
    return os.path.join(runtime_dir, sid)


# --------------------------------------------------------------------------
# reading sessions: any process of the keeper's user (or root) on its host


def proc_stat(pid: int):
    """(state, starttime) of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def process_alive(pid, starttime) -> bool:
    """The process still runs: same pid and start time, not a zombie."""
    if not pid:
        return False
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X") and st[1] == starttime


def keeper_alive(state: dict) -> bool:
    return process_alive(state.get("pid"), state.get("pid_starttime"))


def read_state(sdir: str):
    state = read_json(os.path.join(sdir, STATE_FILE))
    return state if isinstance(state, dict) else None


def write_state(sdir: str, state: dict) -> None:
    write_json(os.path.join(sdir, STATE_FILE), state)


def waiter_alive(state: dict) -> bool:
    """A stop task still waits for the archive of this stopped session."""
    wait = state.get("archive_wait") or {}
    return not state.get("delivered") and process_alive(wait.get("pid"), wait.get("pid_starttime"))


def describe(state: dict, now: float | None = None) -> dict:
    """alive, stale and what the session waits for (for listing; changes nothing)."""
    now = time.time() if now is None else now
    status = state.get("status")
    alive = keeper_alive(state)
    out = dict(state)
    out.pop("result", None)  # never list label contents
    out["alive"] = alive
    out["stale"] = status in LIVE and not alive
    if status == STARTING:
        out["waiting_for"] = "the start: PostgreSQL's checkpoint (fast=false spreads it over checkpoint_timeout)"
        if state.get("start_stage") == "wal summaries":
            out["waiting_for"] = "the start: the WAL summarizer, for the incremental backup's changed blocks"
        since = state.get("checkpoint_requested_at") or state.get("launched_at")
        if since:
            out["start_waiting_seconds"] = round(now - epoch(since), 1)
            out["waiting_for"] += f", for {human_seconds(out['start_waiting_seconds'])} so far"
    elif status == RUNNING:
        out["waiting_for"] = "the stop (the copy runs meanwhile)"
        contact = state.get("last_contact_at")
        if contact:
            out["seconds_since_contact"] = round(now - epoch(contact), 1)
    elif status == STOPPED and not state.get("delivered"):
        out["waiting_for"] = (
            "the WAL archive" if waiter_alive(state) else "nobody: the stop task that waited for the archive is gone"
        )
    else:
        out["waiting_for"] = None
    if out["stale"]:
        out["waiting_for"] = "nobody: the keeper process is gone"
    return out


def with_progress(sdir: str, described: dict) -> dict:
    """A running session's copy progress (the record its copy writes every second), if any."""
    if described.get("status") == RUNNING:
        rec = read_progress(sdir)
        if rec is not None and not rec.get("finished"):
            described["progress"] = rec
            if described.get("alive"):
                described["waiting_for"] = f"the stop (the copy runs meanwhile): {copy_line(rec)}"
    return described


def epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def list_sessions(runtime_dir: str, ask: bool = False) -> list:
    """Every session the directory knows, with liveness; changes nothing.
    ask: live keepers are asked for their state (fresher than the file)."""
    out = []
    try:
        names = sorted(os.listdir(runtime_dir))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name in names:
        if not valid_session_id(name):
            continue
        sdir = os.path.join(runtime_dir, name)
        state = read_state(sdir)
        if state is None:
            continue
        if ask and state.get("status") in LIVE and keeper_alive(state):
            reply = request(sdir, {"op": "status"}, timeout=5)
            if reply.get("ok") and isinstance(reply.get("state"), dict):
                state = reply["state"]
        out.append(with_progress(sdir, describe(state)))
    return out


def liveness(runtime_dir: str, sid: str, grace: float, now: float | None = None) -> tuple:
    """(live, why) of a session a repository lock names: True while its keeper
    or its archive wait runs, False once both are gone, None when this process
    cannot see it (no such session, another user's directory)."""
    now = time.time() if now is None else now
    try:
        sdir = session_dir(runtime_dir, sid)
    except KeeperError:
        return None, f"invalid session id {sid!r}"
    try:
        os.stat(sdir)
    except FileNotFoundError:
        return None, f"no session {sid} in {runtime_dir}"
    except OSError as e:
        return None, f"cannot see session {sid}: {e.strerror}"
    state = read_state(sdir)
    if state is None:
        return None, f"session {sid} has no readable state"
    status = state.get("status")
    if status in LIVE:
        if keeper_alive(state):
            return True, f"its keeper (pid {state.get('pid')}) is {status}"
        return False, f"its session keeper (pid {state.get('pid')}) is gone"
    if status == STOPPED:
        if waiter_alive(state):
            return True, "its stop task waits for the WAL archive"
        delivered = state.get("delivered_at")
        if delivered and now - epoch(delivered) <= grace:
            return True, "it stopped moments ago (its run is finishing the backup)"
        return False, "its backup stopped but the run that was finishing it is gone"
    return False, f"its session ended ({status}: {state.get('reason')})"


def mark_lost_if_dead(sdir: str, state: dict, write: bool = True) -> dict:
    """A live session whose keeper is gone is lost (recorded unless write is false: check mode)."""
    if state.get("status") in LIVE and not keeper_alive(state):
        state["status"] = "lost"
        state["reason"] = (
            f"keeper process {state.get('pid')} is gone (killed or crashed); the server ended the backup with its session"
        )
        state["ended_at"] = utcnow()
        if write:
            write_state(sdir, state)
    return state


def sweep(runtime_dir: str, keep_seconds: float = 7 * 86400) -> list:
    """Mark dead keepers lost; remove finished sessions older than keep_seconds."""
    removed = []
    now = time.time()
    for state in list_sessions(runtime_dir):
        sdir = os.path.join(runtime_dir, state["session_id"])
        if state["stale"]:
            mark_lost_if_dead(sdir, read_state(sdir) or state)
        elif state.get("status") in TERMINAL:
            try:
                age = now - os.stat(os.path.join(sdir, STATE_FILE)).st_mtime
            except OSError:
                continue
            if age > keep_seconds:
                shutil.rmtree(sdir, ignore_errors=True)
                removed.append(state["session_id"])
    return removed


START_KEYS = (
    "session_id", "label", "start_lsn", "start_wal", "timeline", "server_version", "server_version_num",
    "system_identifier", "backup_from", "started_at", "start_seconds", "wal_segment_size", "incremental",
    "incremental_refused",
)  # fmt: skip


def public(state: dict) -> dict:
    """What a started (or stopped) session returns to the run."""
    return {k: state.get(k) for k in START_KEYS}


def start_result(state: dict) -> dict:
    """pg_backup_session state=started's result for a session that has started."""
    out = public(state)
    out.update(expires_at=state.get("expires_at"), keeper_pid=state.get("pid"))
    return out


# --------------------------------------------------------------------------
# the client side of the keeper's socket protocol


def request(sdir: str, payload: dict, timeout: float | None) -> dict:
    """Send one request to a keeper and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.path.join(sdir, SOCKET_FILE))
            s.sendall(json.dumps(payload).encode() + b"\n")
            return json.loads(recv_line(s) or b"null") or {"ok": False, "error": "the keeper closed the connection"}
        except (OSError, ValueError) as e:
            return {"ok": False, "error": f"cannot reach the session keeper: {e}", "unreachable": True}


def recv_line(s) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_MESSAGE:
            raise ValueError("message too large")
    return buf.split(b"\n", 1)[0]


class Attachment:
    """A long task of the run (the copy) attached to the keeper for as long as it
    runs, over one open connection: while attached, the run counts as alive (no
    lease can lapse), the keeper checks its database session every couple of
    seconds, and it tells the task at once when the backup ends (on_gone is
    called once, from a thread). A task that dies without detaching (killed
    run, lost controller) closes the connection: the keeper aborts the backup."""

    def __init__(self, sdir: str, on_gone=None, op: str = "attach"):
        self.sdir = sdir
        self.on_gone = on_gone
        self.op = op  # "attach": the copy; "watch": the run waiting for the start or the copy in turns
        self.gone = None
        self.sock = None
        self._dropped = False
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        try:
            self.sock.connect(os.path.join(self.sdir, SOCKET_FILE))
            self.sock.sendall(json.dumps({"op": self.op}).encode() + b"\n")
            reply = json.loads(recv_line(self.sock) or b"null") or {}
        except (OSError, ValueError) as e:
            reply = {"ok": False, "error": f"cannot reach the session keeper: {e}"}
        if not reply.get("ok"):
            self._ended(reply)
            return
        self.sock.settimeout(None)
        self._thread.start()

    def _watch(self) -> None:
        try:
            line = recv_line(self.sock)  # the keeper writes only when the backup ended
            reply = json.loads(line) if line else {}
        except (OSError, ValueError):
            reply = {}
        self._ended(reply)

    def _ended(self, reply: dict) -> None:
        if self.gone is not None or reply.get("detached") or self._dropped:
            return
        state = reply.get("state")
        if not state:
            # The connection closed without a word: the keeper died. Its sockets close before
            # the kernel marks it a zombie, so give /proc a moment to agree.
            deadline = time.monotonic() + 2
            state = read_state(self.sdir) or {}
            while state.get("status") in LIVE and keeper_alive(state) and time.monotonic() < deadline:
                time.sleep(0.02)
            state = mark_lost_if_dead(self.sdir, state, write=False)
        status = state.get("status")
        self.gone = f"session {status}, backup unusable: {state.get('reason') or reply.get('error')}"
        if self.on_gone is not None:
            self.on_gone()

    def stop(self, back_within: float | None = None) -> None:
        """Detach: the task ends normally (the stop task follows). back_within: a watcher's promise
        of its next turn within so many seconds (the keeper ends the backup when none comes)."""
        if self.sock is None:
            return
        msg = {"op": "detach"}
        if back_within:
            msg["back_within"] = back_within
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError:
            pass
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join(10)
        self.sock.close()

    def drop(self) -> None:
        """Go away without detaching, as a killed task does: the keeper aborts the backup."""
        if self.sock is None:
            return
        self._dropped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
