# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The session keeper: one detached process per backup that holds the
database session PostgreSQL requires between start and stop, and nothing else.

An Ansible task is a short-lived process, and a non-exclusive backup dies
with the session that started it. The keeper is double-forked from the
module, detached from everything the task owns, and addressable from the
moment it exists: its state file and socket are there before it connects, so
a start that waits minutes for its checkpoint can be listed and aborted. It
opens its own connection, starts the backup, reports through a pipe, then
serves ping / stop / abort on a Unix socket until it is told to stop, its
session is lost, its run goes silent (lease) or max_duration passes.

Core decides (a state machine with no sockets, processes or server, unit
tested); Keeper does the I/O. Everything the keeper uses is imported at module
load: Ansible deletes the module's payload when the task ends.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import select
import shutil
import signal
import socket
import struct
import threading
import time

from ._backup_api import MIN_MAJOR, explain_start_error, format_lsn, major_of, parse_lsn, start_sql, stop_sql, wal_file_name
from ._files import ensure_private_dir
from ._incremental import IncrementalRefused, label_lines, read_block_map, save_block_map
from ._postgres import connect, error_text, psycopg2, query_all, query_one, server_version
from ._sessions import (
    LIVE,
    RUNNING,
    SOCKET_FILE,
    STARTING,
    STOPPED,
    TERMINAL,
    KeeperError,
    proc_stat,
    recv_line,
    request,
    session_dir,
    utcnow,
    write_state,
)

# A ping checks the database session at most this often: a copy that pings every
# couple of seconds learns within seconds that a restarted server ended the backup.
PING_CHECK_INTERVAL = 1.0
PROC_NAME = b"pgops-keeper"
ATTACHED_CHECK_INTERVAL = 2.0


# --------------------------------------------------------------------------
# module side


def launch(conn_kwargs: dict, spec: dict, runtime_dir: str, timeout: float, handover_after: float = 0) -> dict:
    """Start a keeper; return its report once the start function has returned.

    spec: session_id, label, fast, max_duration, keepalive_interval, lease, cluster, start_timeout.
    handover_after: when the start has not returned after this many seconds, hand it over: the keeper
    no longer reports to this process (nor aborts when it goes), keeps the start's outcome in its state
    and cancels the start itself after start_timeout; the report is then {"handed_over": True, ...}.
    0: wait for the start, however long (up to timeout).
    """
    ensure_private_dir(runtime_dir)
    sdir = session_dir(runtime_dir, spec["session_id"])
    try:
        os.mkdir(sdir, 0o700)
    except FileExistsError:
        raise KeeperError(f"session {spec['session_id']} already exists in {runtime_dir}: choose another session_id") from None
    sock_path = os.path.join(sdir, SOCKET_FILE)
    if len(sock_path.encode()) > 107:
        os.rmdir(sdir)
        raise KeeperError(f"socket path {sock_path} is longer than 107 bytes: choose a shorter runtime_dir")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate child: new session, fork again, vanish
        code = 1
        try:
            os.close(rfd)
            os.setsid()
            if os.fork() == 0:
                _keeper_main(wfd, conn_kwargs, spec, sdir)
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    os.waitpid(pid, 0)
    return _read_report(rfd, sdir, timeout, handover_after)


def _read_report(rfd: int, sdir: str, timeout: float, handover_after: float = 0) -> dict:
    """Read the keeper's pid line, then its start report, within timeout (or hand the start over)."""
    now = time.monotonic()
    deadline = now + timeout
    handover_at = now + handover_after if handover_after and handover_after < timeout else None
    buf = b""
    keeper_pid = None
    try:
        while True:
            lines = buf.split(b"\n")
            for line in lines[:-1]:
                msg = json.loads(line)
                if "pid" in msg and "ok" not in msg:
                    keeper_pid = msg["pid"]
                else:
                    return msg
            buf = lines[-1]
            if handover_at is not None and keeper_pid and time.monotonic() >= handover_at:
                handover_at = None
                reply = request(sdir, {"op": "handover"}, 30)
                if reply.get("ok"):
                    return {"handed_over": True, "pid": keeper_pid, "state": reply.get("state") or {}}
                # Refused: the start has just returned (its report is in the pipe), or the keeper is gone.
            left = deadline - time.monotonic()
            if left <= 0:
                # Cancel the start in its session (the backend may wait for a checkpoint and not
                # notice a dead client until it ends); kill the keeper if it does not answer.
                reply = request(sdir, {"op": "abort", "reason": f"the start did not return within {timeout:g}s"}, 30)
                if not reply.get("ok") and keeper_pid:
                    os.kill(keeper_pid, signal.SIGKILL)
                return {"ok": False, "error": f"the backup did not start within {timeout:g}s; the start was cancelled"}
            wait = left if handover_at is None else max(0.0, min(left, handover_at - time.monotonic()))
            ready, _writable, _errors = select.select([rfd], [], [], wait)
            if ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    return {"ok": False, "error": "the session keeper exited before reporting the start"}
                buf += chunk
    finally:
        os.close(rfd)


def start_failure(report: dict, login_user) -> str:
    """What a failed start says (report: the keeper's failure report, or a handed-over start's start_error)."""
    err = report.get("error", "unknown error")
    if report.get("stage") == "connect":
        return f"unable to connect to database: {err}; nothing was started"
    major = major_of(report.get("version_num") or 150000)
    return f"could not start the backup: {explain_start_error(report.get('sqlstate'), err, major, login_user)}"


# --------------------------------------------------------------------------
# the decisions (pure: unit tests drive them with a fake clock)


class Core:
    """What each event does to the session. Times are monotonic seconds; the
    I/O layer carries out the returned actions:

    - on_request(op) -> (action, reply): action None (send reply), "stop" (run
      the stop, then reply), "abort" (cancel the start or end the session, then reply)
    - due(now) -> (action, wait): "expire" / "lease" (end the session now),
      "keepalive" (check the session now), or None and how long to sleep
    """

    def __init__(self, spec: dict, now: float):
        self.spec = spec
        self.status = STARTING
        self.reason = None
        self.deadline = now + spec["max_duration"]
        self.lease = spec.get("lease") or 0
        self.interval = max(1, spec.get("keepalive_interval") or 30)
        self.last_contact = now
        self.last_check = now
        self.attached = 0  # the copy
        self.watching = 0  # the run, waiting for the start or the copy (pg_backup_progress)
        self.watch_deadline = None  # the run's next turn is due by then
        self.watch_promise = 0.0  # ... which it promised within so many seconds of its last
        self.handed_over = False
        start_timeout = spec.get("start_timeout") or 0
        self.start_deadline = now + start_timeout if start_timeout else None
        self.abort_reason = None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def end(self, status: str, reason: str) -> None:
        if not self.ended:
            self.status = status
            self.reason = reason

    def started(self, now: float) -> None:
        if self.status == STARTING:
            self.status = RUNNING
            self.last_contact = now
            self.last_check = now

    def on_request(self, op, now: float) -> tuple:
        if op == "status":  # a look from pg_backup_session_info: not word from the run
            return None, None
        self.last_contact = now
        if op == "ping":
            check = self.status == RUNNING and now - self.last_check >= PING_CHECK_INTERVAL
            return ("keepalive" if check else None), None
        if op == "abort":
            if self.ended:
                return None, {"ok": False, "error": f"the session already ended ({self.status})"}
            return "abort", None
        if op == "attach":
            if self.status != RUNNING:
                return None, {"ok": False, "error": f"the session is {self.status}: {self.reason}"}
            self.attached += 1
            return "attach", None
        if op == "watch":
            if self.status not in LIVE:
                return None, {"ok": False, "error": f"the session is {self.status}: {self.reason}"}
            self.watching += 1
            self.watch_deadline = None
            return "watch", None
        if op == "handover":
            if self.status != STARTING or self.handed_over:
                return None, {"ok": False, "error": f"the start has returned already ({self.status})"}
            self.handed_over = True
            return "handover", None
        if op == "stop":
            if self.status == STARTING:
                return None, {
                    "ok": False,
                    "error": "the backup has not started yet: the start still waits for its checkpoint",
                }
            if self.status != RUNNING:
                return None, {"ok": False, "error": f"the session ended ({self.status}: {self.reason})"}
            if self.attached:
                # Its files would hold changes made after the stop's LSN: a copy must finish first.
                return None, {
                    "ok": False,
                    "error": "a copy is still attached to this backup: stop it once the copy has finished (or abort it)",
                }
            return "stop", None
        return None, {"ok": False, "error": f"unknown request {op!r}"}

    def on_launcher_gone(self) -> str | None:
        """The module that launched us died before learning the session id: nobody can stop this backup."""
        if self.status == STARTING and not self.handed_over:
            return "abort"
        return None

    def on_detach(self, graceful: bool, now: float, kind: str = "attach", back_within: float | None = None) -> str | None:
        """An attached task ended: gracefully (it said so), or it died (its connection closed).
        kind "watch": the run's watcher; gracefully with back_within, its next turn is due by then."""
        self.last_contact = now
        if kind == "watch":
            self.watching = max(0, self.watching - 1)
            if graceful:
                if back_within and not self.watching:
                    self.watch_deadline = now + back_within
                    self.watch_promise = back_within
                return None
            return "abort" if self.status in LIVE else None
        self.attached = max(0, self.attached - 1)
        if not graceful and self.status == RUNNING:
            return "abort"
        return None

    def on_keepalive(self, error, now: float) -> None:
        self.last_check = now
        if error is not None and not self.ended:
            self.end("lost", f"the database session was lost ({error}); the backup is unusable")

    def due(self, now: float) -> tuple:
        if self.ended:
            return None, 0.0
        left = self.deadline - now
        if left <= 0:
            self.end(
                "expired",
                f"max_duration of {self.spec['max_duration']}s passed at {utcnow()}; the keeper "
                "ended the session and the server aborted the backup",
            )
            return "expire", 0.0
        wait = left
        if self.status == STARTING and self.handed_over and self.start_deadline is not None:
            start_left = self.start_deadline - now
            if start_left <= 0:
                self.abort_reason = (
                    f"the backup did not start within {self.spec.get('start_timeout'):g}s; the start was cancelled"
                )
                return "abort", 0.0
            wait = min(wait, start_left)
        if self.watch_deadline is not None and not self.watching:
            watch_left = self.watch_deadline - now
            if watch_left <= 0:
                waited = "start" if self.status == STARTING else "copy"
                self.abort_reason = (
                    f"the run that was waiting for this backup's {waited} went silent (no turn within "
                    f"{self.watch_promise:g}s of its last: killed or lost); aborted"
                )
                return "abort", 0.0
            wait = min(wait, watch_left)
        if self.attached or self.watching:
            self.last_contact = now  # an attached task is word from the run for as long as it runs
        if self.lease and self.status == RUNNING:
            lease_left = self.lease - (now - self.last_contact)
            if lease_left <= 0:
                # The run that started us stopped calling (killed, Ctrl-C): nobody will stop this backup.
                self.end(
                    "expired",
                    f"no word from the run for {self.lease}s (lease) at {utcnow()}: it is gone; the keeper ended "
                    "the session and the server aborted the backup",
                )
                return "lease", 0.0
            wait = min(wait, lease_left)
        if self.status == RUNNING:
            # While a copy is attached, a server restart must stop it within seconds.
            interval = min(self.interval, ATTACHED_CHECK_INTERVAL) if self.attached else self.interval
            check_left = interval - (now - self.last_check)
            if check_left <= 0:
                return "keepalive", 0.0
            wait = min(wait, check_left)
        return None, max(0.0, wait)


# --------------------------------------------------------------------------
# the database session (the keeper's only connection)


class Session:
    """The keeper's connection: opened in the keeper (never across a fork)."""

    def __init__(self, conn_kwargs: dict):
        self.kw = conn_kwargs
        self.conn = None
        self.backend_pid = None  # the server process the backup was started in
        self.closed = False  # set by close(): a start thread still connecting must not start the backup

    def open(self) -> tuple:
        self.conn = connect(self.kw)
        self._unless_closed()
        num, text = server_version(self.conn)
        return num, text

    def _unless_closed(self) -> None:
        # An abort while the start thread connected found no connection to cancel or close.
        if self.closed:
            conn, self.conn = self.conn, None
            if conn is not None:
                conn.close()
            raise KeeperError("the session was ended before the backup started")

    def settings(self, major: int) -> None:
        # The session must outlive any idle or statement limit set by the DBA.
        names = ["statement_timeout", "idle_in_transaction_session_timeout", "lock_timeout"]
        if major >= 14:
            names.append("idle_session_timeout")
        if major >= 17:
            names.append("transaction_timeout")
        with self.conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT set_config(%s, '0', false)", (name,))

    def start(self, major: int, label: str, fast: bool) -> tuple:
        self._unless_closed()
        backend_pid = self.backend_pid = query_one(self.conn, "SELECT pg_backend_pid()")[0]
        self.called_at = time.time()  # before the start's checkpoint begins: an incremental's file age limit
        t0 = time.monotonic()
        lsn_text = query_one(self.conn, start_sql(major), (label, fast))[0]
        return backend_pid, lsn_text, time.monotonic() - t0

    def changed_blocks(self, parent: dict, start_lsn: str, tli: int) -> tuple:
        """What changed since the parent backup's start, from the WAL summaries, read over this session."""
        return read_block_map(
            lambda sql, args=None: query_one(self.conn, sql, args),
            lambda sql, args=None: query_all(self.conn, sql, args),
            parent["lsn"],
            parent["tli"],
            start_lsn,
            tli,
        )

    def facts(self) -> dict:
        row = query_one(
            self.conn,
            "SELECT (SELECT timeline_id FROM pg_control_checkpoint()),"
            " (SELECT system_identifier::text FROM pg_control_system()),"
            " pg_is_in_recovery(),"
            " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')",
        )
        return {"timeline": row[0], "system_identifier": row[1], "in_recovery": row[2], "wal_segment_size": row[3]}

    def ping(self):
        """None when the session is healthy, else the driver's error or why it is not the backup's session."""
        try:
            pid = query_one(self.conn, "SELECT pg_backend_pid()")[0]
        except psycopg2.Error as e:
            return error_text(e)
        if self.backend_pid is not None and pid != self.backend_pid:
            # A pooler in transaction or statement mode hands each statement to any server process: the stop
            # could end another session's backup, and this one's would never be stopped.
            return (
                f"the session moved from server process {self.backend_pid}, where the backup started, to {pid}: "
                "a connection pooler in transaction or statement mode? connect to the server directly"
            )
        return None

    def stop(self, major: int) -> tuple:
        return query_one(self.conn, stop_sql(major))

    def min_recovery_timeline(self):
        try:
            return query_one(self.conn, "SELECT min_recovery_end_timeline FROM pg_control_recovery()")[0]
        except psycopg2.Error:
            return None

    def cancel(self) -> None:
        if self.conn is not None:
            try:
                self.conn.cancel()
            except psycopg2.Error:
                pass

    def close(self) -> None:
        """Ending the session makes the server abort a backup that was not stopped."""
        self.closed = True
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass


# --------------------------------------------------------------------------
# keeper side (runs only in the detached grandchild)


class _Terminate(BaseException):
    """Raised by the SIGTERM handler to unwind the keeper cleanly."""


def _keeper_main(wfd: int, conn_kwargs: dict, spec: dict, sdir: str) -> None:
    code = 0
    try:
        _detach(wfd)
        Keeper(wfd, Session(conn_kwargs), spec, sdir).run()
    except BaseException as e:  # noqa: BLE001 - nothing may escape into the module wrapper
        code = 1
        try:
            os.write(wfd, json.dumps({"ok": False, "stage": "keeper", "error": f"session keeper failed: {e!r}"}).encode() + b"\n")
        except OSError:
            pass
    finally:
        os._exit(code)


def _detach(keep_fd: int) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    os.chdir("/")
    os.umask(0o077)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    # Any inherited pipe (Ansible's stdout, ssh's channel) would keep the task open.
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep_fd:
            try:
                os.close(fd)
            except OSError:
                pass
    try:
        ctypes.CDLL(None).prctl(15, PROC_NAME, 0, 0, 0)  # PR_SET_NAME, shows in ps/top
    except (OSError, AttributeError):
        pass


class Keeper:
    """One poll loop: requests, the start's completion, the launcher going
    away, keepalives, lease and max_duration all pass through Core."""

    def __init__(self, wfd, db: Session, spec: dict, sdir: str):
        self.wfd = wfd
        self.db = db
        self.spec = spec
        self.sdir = sdir
        self.core = Core(spec, time.monotonic())
        self.sock = None
        self.poller = None
        self.watchers = {}  # fd -> socket of an attached task (the copy)
        self.start_outcome = None
        self.start_r, self.start_w = os.pipe()  # readable once the start thread is done
        self.state = {
            "session_id": spec["session_id"],
            "label": spec["label"],
            "cluster": spec["cluster"],
            "status": STARTING,
            "pid": os.getpid(),
            "pid_starttime": proc_stat(os.getpid())[1],
            "fast": spec["fast"],
            "launched_at": utcnow(),
            "max_duration": spec["max_duration"],
            "lease": spec.get("lease") or 0,
            # Set by the start thread (only ever reassigned: the loop may be serializing the dict).
            "start_stage": "connect",
            "checkpoint_requested_at": None,
            "handed_over": False,
            "watchers": 0,  # turns of the run waiting for the start or the copy, attached now
        }

    # -- reporting to the module that launched us

    def _report(self, msg: dict) -> bool:
        """False when nobody reads the pipe any more."""
        if self.wfd is None:
            return False
        try:
            os.write(self.wfd, json.dumps(msg, default=str).encode() + b"\n")
            ok = True
        except OSError:
            ok = False
        if "ok" in msg or not ok:
            os.close(self.wfd)
            self.wfd = None
        return ok

    def _save(self) -> None:
        self.state["status"] = self.core.status
        if self.core.reason:
            self.state["reason"] = self.core.reason
        if self.core.ended:
            self.state.setdefault("ended_at", utcnow())
        write_state(self.sdir, self.state)

    def _on_term(self, signum, frame):
        raise _Terminate()

    # -- lifecycle

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            self._listen()
            self._save()
            self._report({"pid": os.getpid()})
            threading.Thread(target=self._start_thread, daemon=True).start()
            self._loop()
        except _Terminate:
            self._finish("aborted", "the keeper received SIGTERM; the backup was aborted")
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
            self.db.close()
            self._release_watchers()
            if self.sock is not None:
                self.sock.close()
                try:
                    os.unlink(os.path.join(self.sdir, SOCKET_FILE))
                except OSError:
                    pass

    def _listen(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = os.path.join(self.sdir, SOCKET_FILE)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(8)

    def _start_thread(self) -> None:
        """Connect and run the start function (it may wait minutes for a checkpoint)."""
        spec = self.spec
        stage = "connect"
        try:
            num, text = self.db.open()
            self.state.update(server_version_num=num, server_version=text)
            stage = "version"
            major = major_of(num)
            if major < MIN_MAJOR:
                raise KeeperError(f"PostgreSQL {text} is not supported (12 or newer)")
            stage = "start"
            self.db.settings(major)
            self.state["checkpoint_requested_at"] = utcnow()
            self.state["start_stage"] = "checkpoint"
            backend_pid, lsn_text, seconds = self.db.start(major, spec["label"], spec["fast"])
            facts = self.db.facts()
            stage = "incremental"
            if spec.get("incremental_from"):
                self.state["start_stage"] = "wal summaries"
            facts["incremental"] = self._changes(major, lsn_text, facts) if spec.get("incremental_from") else None
            self.start_outcome = ("ok", backend_pid, lsn_text, seconds, facts)
        except (psycopg2.Error, KeeperError) as e:
            self.start_outcome = ("error", stage, e)
        except BaseException as e:  # noqa: BLE001 - reported to the module, never raised in a thread
            self.start_outcome = ("error", "keeper", e)
        finally:
            os.write(self.start_w, b"x")

    def _changes(self, major: int, lsn_text: str, facts: dict) -> dict:
        """{"facts": ...} when this backup can be incremental (the changed blocks saved for the copy),
        else {"refused": why}: the backup then goes on as a full one."""
        if major < 17:
            return {"refused": f"block-level incremental backups need PostgreSQL 17 or later (this is {major})"}
        try:
            bm, facts_incr = self.db.changed_blocks(self.spec["incremental_from"], lsn_text, facts["timeline"])
            save_block_map(self.sdir, bm, facts_incr, self.db.called_at)
        except IncrementalRefused as e:
            return {"refused": str(e)}
        except psycopg2.Error as e:
            return {"refused": f"the WAL summaries could not be read: {error_text(e)}"}
        except OSError as e:
            return {"refused": f"the changed blocks could not be saved in {self.sdir}: {e}"}
        return {"facts": facts_incr}

    def _started(self) -> None:
        outcome = self.start_outcome
        if outcome[0] == "error":
            _kind, stage, exc = outcome
            if self.core.ended:  # aborted while starting: the cancel made the start fail
                self._save()
                return
            err = error_text(exc) if isinstance(exc, psycopg2.Error) else str(exc)
            report = {
                "ok": False,
                "stage": stage,
                "error": err,
                "sqlstate": getattr(exc, "pgcode", None),
                "version_num": self.state.get("server_version_num"),
            }
            self.core.end("failed", f"the start failed: {err}")
            if self.core.handed_over:
                # Nobody reads the pipe: the run's watcher (pg_backup_progress) reads this, then forgets the session.
                self.state["start_error"] = dict(report, message=start_failure(report, self.spec.get("login_user")))
                self._save()
                return
            self._save()
            self._report(report)
            shutil.rmtree(self.sdir, ignore_errors=True)  # nothing to stop, list or abort
            return
        _kind, backend_pid, lsn_text, seconds, facts = outcome
        if self.core.ended:  # an abort won the race: the session is closed, the backup gone
            self._save()
            return
        now = time.monotonic()
        self.core.started(now)
        lsn = parse_lsn(lsn_text)
        self.state.update(
            start_stage=None,
            backend_pid=backend_pid,
            start_lsn=lsn_text,
            start_wal=wal_file_name(facts["timeline"], lsn, facts["wal_segment_size"]),
            timeline=facts["timeline"],
            wal_segment_size=facts["wal_segment_size"],
            system_identifier=facts["system_identifier"],
            backup_from="standby" if facts["in_recovery"] else "primary",
            started_at=utcnow(),
            start_seconds=round(seconds, 3),
            incremental=(facts.get("incremental") or {}).get("facts"),
            incremental_refused=(facts.get("incremental") or {}).get("refused"),
            last_contact_at=utcnow(),
            expires_at=datetime.datetime.fromtimestamp(time.time() + (self.core.deadline - now), datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
        )
        self._save()
        if self.core.handed_over:
            return  # the run's watcher reads the state
        if not self._report({"ok": True, "state": self.state}):
            # The module died between the start and its report: nobody knows this session.
            self.db.close()
            self.core.end("aborted", "the module that started the backup was gone before it learned the session id")
            self._save()

    def _loop(self) -> None:
        poller = self.poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.start_r, select.POLLIN)
        if self.wfd is not None:
            poller.register(self.wfd, 0)  # POLLERR once the launcher's end of the pipe is closed
        while not self.core.ended:
            action, wait = self.core.due(time.monotonic())
            if action in ("expire", "lease"):
                # A start still waiting for its checkpoint holds the connection: close() would wait for it.
                self.db.cancel()
                self.db.close()
                self._save()
                return
            if action == "abort":  # a handed-over start ran out of time, or the run's watcher went silent
                self._abort(self.core.abort_reason)
                return
            if action == "keepalive":
                self.core.on_keepalive(self.db.ping(), time.monotonic())
                if self.core.ended:
                    self._save()
                    return
                continue
            if self.core.status == STARTING:
                wait = min(wait, 1.0)
            for fd, events in poller.poll(max(0, int(wait * 1000)) + 1):
                if fd == self.start_r:
                    poller.unregister(self.start_r)
                    if self.wfd is not None:
                        poller.unregister(self.wfd)
                    self._started()
                elif fd == self.sock.fileno():
                    self._accept()
                elif fd in self.watchers:
                    self._watcher_event(fd)
                elif self.wfd is not None and fd == self.wfd and events & (select.POLLERR | select.POLLHUP):
                    poller.unregister(self.wfd)
                    if self.core.on_launcher_gone() == "abort":
                        self._abort("the module that started the backup went away while the start waited; aborted")
                if self.core.ended:
                    return

    def _accept(self) -> None:
        try:
            client, _address = self.sock.accept()
        except OSError:
            return
        with client:
            req = self._read_request(client)
            if req is None:
                return
            op = req.get("op") or "?"
            action, reply = self.core.on_request(op, time.monotonic())
            if op != "status":
                self.state["last_contact_at"] = utcnow()
            if action == "keepalive":
                self.core.on_keepalive(self.db.ping(), time.monotonic())
            elif action == "abort":
                self._abort(req.get("reason") or "aborted on request")
            elif action in ("attach", "watch"):
                self._send(client, {"ok": True, "state": self.state})
                held = client.dup()  # kept open for the task's lifetime; the with block closes the original
                self.watchers[held.fileno()] = (held, action)
                self.poller.register(held.fileno(), select.POLLIN)
                self.state["watchers"] = self.core.watching
                return
            elif action == "handover":
                # The launcher leaves before the start returns: no report to it, and its going is no abort.
                if self.wfd is not None:
                    self.poller.unregister(self.wfd)
                    os.close(self.wfd)
                    self.wfd = None
                self.state["handed_over"] = True
                self._save()
            elif action == "stop":
                # No SIGTERM between the stop call and its reply: the label must reach the caller.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                try:
                    reply = self._stop()
                    self._send(client, reply)
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
                return
            if self.core.ended and action != "abort":
                self._save()  # a keepalive found the session lost
            reply = reply or {"ok": True}
            reply.setdefault("state", self.state)
            self._send(client, reply)

    def _watcher_event(self, fd: int) -> None:
        """An attached task wrote (detach) or went away (its connection closed)."""
        conn, kind = self.watchers.pop(fd)
        self.poller.unregister(fd)
        back_within = None
        try:
            conn.settimeout(5)
            line = recv_line(conn)
            msg = (json.loads(line) or {}) if line else {}
            graceful = msg.get("op") == "detach"
            if isinstance(msg.get("back_within"), (int, float)) and msg["back_within"] > 0:
                back_within = float(msg["back_within"])
        except (OSError, ValueError, AttributeError):
            graceful = False
        if graceful:
            self._send(conn, {"ok": True, "detached": True, "state": self.state})
        conn.close()
        status = self.core.status
        verdict = self.core.on_detach(graceful, time.monotonic(), kind, back_within)
        self.state["watchers"] = self.core.watching
        if verdict == "abort":
            if kind == "attach":
                self._abort("the copy task attached to this backup went away before it finished (its run was killed or lost)")
            elif status == STARTING:
                self._abort("the run went away while the start waited for its checkpoint (killed or lost); aborted")
            else:
                self._abort("the run waiting for this backup's copy went away (killed or lost); aborted")

    def _release_watchers(self) -> None:
        """The session ended: tell every attached task at once, so its copy stops."""
        for conn, _kind in list(self.watchers.values()):
            self._send(conn, {"ok": False, "ended": True, "state": self.state})
            conn.close()
        self.watchers.clear()

    def _send(self, client, reply: dict) -> None:
        try:
            client.sendall(json.dumps(reply, default=str).encode() + b"\n")
        except OSError:
            pass

    def _read_request(self, client):
        """The request from the keeper's own user (or root); None otherwise."""
        client.settimeout(30)
        try:
            creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.geteuid()):
                client.sendall(b'{"ok": false, "error": "permission denied"}\n')
                return None
            req = json.loads(recv_line(client) or b"{}")
        except (OSError, ValueError):
            return None
        return req if isinstance(req, dict) else {"op": "?"}

    def _abort(self, reason: str) -> None:
        if self.core.status == STARTING:
            self.db.cancel()  # the start may wait for a checkpoint: make it return now
        self.db.close()
        self.core.end("aborted", reason)
        self._save()
        if self.wfd is not None:
            self._report({"ok": False, "stage": "start", "error": f"the backup was aborted while it started: {reason}"})

    def _finish(self, status: str, reason: str) -> None:
        if self.core.status in LIVE:
            self.db.cancel()
            self.db.close()
            self.core.end(status, reason)
            try:
                self._save()
            except OSError:
                pass

    def _stop(self) -> dict:
        major = major_of(self.state["server_version_num"])
        requested = utcnow()  # every commit that returned before this is in the backup
        t0 = time.monotonic()
        moved = self.db.ping()  # the stop must run in the backup's own server process
        if moved:
            self.core.end("failed", f"the stop was not run: {moved}")
            self._save()
            return {"ok": False, "error": moved, "state": self.state}
        try:
            lsn_text, labelfile, spcmapfile = self.db.stop(major)
            incr = self.state.get("incremental")
            if incr:
                # As the server's own incremental backup writes it: pg_combinebackup follows the chain by these.
                labelfile = labelfile.rstrip("\n") + "\n" + label_lines(incr["from_lsn"], incr["from_tli"])
        except psycopg2.Error as e:
            msg = error_text(e)
            self.core.end("failed", f"the stop function failed: {msg}")
            self._save()
            return {"ok": False, "error": msg, "sqlstate": e.pgcode, "state": self.state}
        stop_lsn = parse_lsn(lsn_text)
        tli = self.state["timeline"]
        if self.state.get("backup_from") == "standby":
            # A standby's backup ends at its minimum recovery point, on that point's timeline.
            tli = self.db.min_recovery_timeline() or tli
        self.state["result"] = {
            "stop_lsn": format_lsn(stop_lsn),
            # The stop location ends the backup: its segment is the one before it.
            "stop_wal": wal_file_name(tli, stop_lsn, self.state["wal_segment_size"], previous=True),
            "labelfile": labelfile,
            "spcmapfile": spcmapfile or "",
            "stop_requested_at": requested,
            "stopped_at": utcnow(),
            "stop_seconds": round(time.monotonic() - t0, 3),
        }
        self.core.end(STOPPED, "stopped on request")
        # Saved before replying: the label survives whatever happens next.
        try:
            self._save()
        except OSError as e:
            # Could not save it (disk full?): the reply is now its only copy.
            return {"ok": True, "state": self.state, "warning": f"the label could not be saved in the session directory: {e}"}
        return {"ok": True, "state": self.state}
