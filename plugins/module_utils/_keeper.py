# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The session keeper: one detached process per backup that holds the
database session PostgreSQL requires between start and stop.

An Ansible task is a short-lived process, and a non-exclusive backup dies
with the session that started it. The keeper is double-forked from the
module, detached from everything the task owns, opens its own connection,
starts the backup, reports through a pipe, then serves stop/abort/ping
requests on a Unix socket in a private directory until it is told to stop,
its session is lost, or max_duration passes.

Everything the keeper uses is imported at module load: the module's payload
is deleted by Ansible when the task ends, so nothing can be imported later.
"""

from __future__ import annotations

import ctypes
import datetime
import fcntl
import json
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import threading
import time

from ._backup_api import MIN_MAJOR, format_lsn, major_of, parse_lsn, start_sql, stop_sql, wal_file_name
from ._copy import Cancel, run_copy
from ._files import ensure_private_dir, read_json, write_json
from ._postgres import connect, error_text, psycopg2, query_one, server_version
from ._repository import backup_json_path, fail_backup

STATE_FILE = "state.json"
SOCKET_FILE = "keeper.sock"
PROC_NAME = b"pgops-keeper"
RUNNING = "running"
TERMINAL = ("stopped", "aborted", "expired", "lost", "failed")
_SID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
MAX_MESSAGE = 16 * 1024 * 1024


class KeeperError(Exception):
    pass


class _Terminate(BaseException):
    """Raised by the SIGTERM handler to unwind the keeper cleanly."""


class _NobodyListening(BaseException):
    """The module that started us is gone before learning the session id: nobody could ever stop it."""


def utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def default_runtime_dir() -> str:
    # The effective user's home, not $HOME: become may keep the caller's HOME.
    return os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".pgops_online_backup", "sessions")


def new_session_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def valid_session_id(sid: str) -> bool:
    return bool(sid) and bool(_SID_RE.match(sid))


def session_dir(runtime_dir: str, sid: str) -> str:
    if not valid_session_id(sid):
        raise KeeperError(f"invalid session id {sid!r}: expected the form 20261129T101500Z-0123abcd")
    return os.path.join(runtime_dir, sid)


def _proc_stat(pid: int):
    """(state, starttime) of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def keeper_alive(state: dict) -> bool:
    """The recorded keeper still runs (same pid and start time, not a zombie)."""
    pid = state.get("pid")
    if not pid:
        return False
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X") and st[1] == state.get("pid_starttime")


def read_state(sdir: str):
    return read_json(os.path.join(sdir, STATE_FILE))


def list_sessions(runtime_dir: str) -> list:
    """Every session the directory knows, with liveness; changes nothing."""
    out = []
    try:
        names = sorted(os.listdir(runtime_dir))
    except FileNotFoundError:
        return out
    for name in names:
        if not valid_session_id(name):
            continue
        state = read_state(os.path.join(runtime_dir, name))
        if state is None:
            continue
        alive = keeper_alive(state)
        state["alive"] = alive
        state["stale"] = state.get("status") == RUNNING and not alive
        state.pop("result", None)  # never list label contents
        out.append(state)
    return out


def mark_lost_if_dead(sdir: str, state: dict, write: bool = True) -> dict:
    """A running session whose keeper is gone is lost (recorded unless write is false: check mode)."""
    if state.get("status") == RUNNING and not keeper_alive(state):
        state["status"] = "lost"
        state["reason"] = (
            f"keeper process {state.get('pid')} is gone (killed or crashed); the server ended the backup with its session"
        )
        state["ended_at"] = utcnow()
        if write:
            write_json(os.path.join(sdir, STATE_FILE), state)
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


# --------------------------------------------------------------------------
# module side


def launch(conn_kwargs: dict, spec: dict, runtime_dir: str, timeout: float) -> dict:
    """Start a keeper; return its report once the start function has returned.

    spec: session_id, label, fast, max_duration, keepalive_interval, cluster.
    """
    ensure_private_dir(runtime_dir)
    sdir = session_dir(runtime_dir, spec["session_id"])
    os.mkdir(sdir, 0o700)
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
    return _read_report(rfd, sdir, timeout)


def _read_report(rfd: int, sdir: str, timeout: float) -> dict:
    """Read the keeper's pid line, then its start report, within timeout."""
    deadline = time.monotonic() + timeout
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
            left = deadline - time.monotonic()
            if left <= 0:
                if keeper_pid:
                    # The backend notices the lost client and aborts the backup.
                    os.kill(keeper_pid, signal.SIGKILL)
                shutil.rmtree(sdir, ignore_errors=True)
                return {"ok": False, "error": f"the backup did not start within {timeout:g}s; the keeper was stopped"}
            ready, _writable, _errors = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    shutil.rmtree(sdir, ignore_errors=True)
                    return {"ok": False, "error": "the session keeper exited before reporting the start"}
                buf += chunk
    finally:
        os.close(rfd)


class LeaseRenewer:
    """Pings a keeper from a thread while a long task runs (the copy), so that
    a keeper started with a lease outlives the task but not a dead run."""

    def __init__(self, sdir: str, every: float = 15.0):
        self.sdir = sdir
        lease = (read_state(sdir) or {}).get("lease") or 0
        # Three renewals per lease at least: one lost ping never ends a backup.
        self.every = min(every, lease / 3) if lease else every
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._halt.wait(self.every):
            request(self.sdir, {"op": "ping"}, timeout=10)

    def start(self) -> None:
        request(self.sdir, {"op": "ping"}, timeout=10)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(15)
        request(self.sdir, {"op": "ping"}, timeout=10)  # the stop task follows: a fresh lease for it


def request(sdir: str, payload: dict, timeout: float) -> dict:
    """Send one request to a keeper and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.path.join(sdir, SOCKET_FILE))
            s.sendall(json.dumps(payload).encode() + b"\n")
            return json.loads(_recv_line(s) or b"null") or {"ok": False, "error": "the keeper closed the connection"}
        except (OSError, ValueError) as e:
            return {"ok": False, "error": f"cannot reach the session keeper: {e}", "unreachable": True}


def _recv_line(s) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_MESSAGE:
            raise ValueError("message too large")
    return buf.split(b"\n", 1)[0]


# --------------------------------------------------------------------------
# keeper side (runs only in the detached grandchild)


def _keeper_main(wfd: int, conn_kwargs: dict, spec: dict, sdir: str) -> None:
    code = 0
    keeper = None
    try:
        _detach(wfd)
        if spec.get("lock_file"):
            # Held until the keeper exits: a repository lock whose flock nobody
            # holds belongs to a dead run (see _repository).
            lock_fd = os.open(spec["lock_file"], os.O_RDONLY)
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
        keeper = _Keeper(wfd, conn_kwargs, spec, sdir)
        keeper.run()
    except BaseException as e:  # noqa: BLE001 - nothing may escape into the module wrapper
        code = 1
        # Tell the waiting module why, if it still waits (never write to a closed, maybe reused, fd).
        fd = wfd if keeper is None else keeper.wfd
        if fd is not None:
            try:
                os.write(
                    fd, json.dumps({"ok": False, "stage": "keeper", "error": f"session keeper failed: {e!r}"}).encode() + b"\n"
                )
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


class _CopyJob(threading.Thread):
    """The copy the start asked for, run by the keeper right after the backup
    started (no task round trip in between); the stop waits for it."""

    def __init__(self, spec: dict):
        super().__init__(daemon=True)
        self.spec = spec
        self.cancel = Cancel()
        self.result = None
        self.error = None
        self.done_r, self.done_w = os.pipe()  # readable once the copy ended: wakes the keeper's select

    def run(self) -> None:
        try:
            self.result = run_copy(self.spec, cancel=self.cancel)
        except BaseException as e:  # noqa: BLE001 - reported to the stop, never raised in a thread
            self.error = str(e) or repr(e)
        finally:
            os.write(self.done_w, b"x")

    def stop(self) -> None:
        self.cancel.fire()
        self.join(60)


class _Keeper:
    def __init__(self, wfd, conn_kwargs, spec, sdir):
        self.wfd = wfd
        self.kw = conn_kwargs
        self.spec = spec
        self.sdir = sdir
        self.conn = None
        self.sock = None
        self.state = {}
        self.copy = None

    # -- reporting

    def _report(self, msg: dict) -> None:
        if self.wfd is None:
            return
        try:
            os.write(self.wfd, json.dumps(msg, default=str).encode() + b"\n")
        except OSError:
            if msg.get("ok"):
                raise _NobodyListening() from None
        if "ok" in msg:
            os.close(self.wfd)
            self.wfd = None

    def _save(self) -> None:
        write_json(os.path.join(self.sdir, STATE_FILE), self.state)

    def _fail_start(self, stage: str, exc) -> None:
        self._report(
            {
                "ok": False,
                "stage": stage,
                "error": error_text(exc),
                "sqlstate": getattr(exc, "pgcode", None),
                "version_num": self.state.get("server_version_num"),
            }
        )
        shutil.rmtree(self.sdir, ignore_errors=True)

    def _on_term(self, signum, frame):
        raise _Terminate()

    # -- lifecycle

    def run(self) -> None:
        self._report({"pid": os.getpid()})
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            if not self._start():
                return
            self._serve()
        except _Terminate:
            if self.state.get("status") == RUNNING:
                self._end("aborted", "the keeper received SIGTERM; the backup was aborted")
        except _NobodyListening:
            self._end("aborted", "the module that started the backup was gone before it learned the session id")
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
            if self.copy is not None and self.copy.is_alive():
                self.copy.stop()  # whatever ended the session: no tar or zstd left writing
            if self.conn is not None:
                try:
                    self.conn.close()
                except psycopg2.Error:
                    pass
            self._fail_record()
            if self.sock is not None:
                self.sock.close()
                try:
                    os.unlink(os.path.join(self.sdir, SOCKET_FILE))
                except OSError:
                    pass

    def _start(self) -> bool:
        spec = self.spec
        try:
            self.conn = connect(self.kw)
        except psycopg2.Error as e:
            self._fail_start("connect", e)
            return False
        try:
            num, text = server_version(self.conn)
            self.state["server_version_num"] = num
            major = major_of(num)
            if major < MIN_MAJOR:
                self._report({"ok": False, "stage": "version", "error": f"PostgreSQL {text} is not supported (12 or newer)"})
                shutil.rmtree(self.sdir, ignore_errors=True)
                return False
            self._session_settings(major)
            backend_pid = query_one(self.conn, "SELECT pg_backend_pid()")[0]
            t0 = time.monotonic()
            lsn_text = query_one(self.conn, start_sql(major), (spec["label"], spec["fast"]))[0]
            start_seconds = time.monotonic() - t0
            facts = self._facts()
        except psycopg2.Error as e:
            self._fail_start("start", e)
            return False
        lsn = parse_lsn(lsn_text)
        started = time.time()
        self.state = {
            "session_id": spec["session_id"],
            "label": spec["label"],
            "cluster": spec["cluster"],
            "status": RUNNING,
            "pid": os.getpid(),
            "pid_starttime": _proc_stat(os.getpid())[1],
            "backend_pid": backend_pid,
            "server_version_num": num,
            "server_version": text,
            "start_lsn": lsn_text,
            "start_wal": wal_file_name(facts["timeline"], lsn, facts["wal_segment_size"]),
            "timeline": facts["timeline"],
            "wal_segment_size": facts["wal_segment_size"],
            "system_identifier": facts["system_identifier"],
            "backup_from": "standby" if facts["in_recovery"] else "primary",
            "fast": spec["fast"],
            "started_at": utcnow(),
            "start_seconds": round(start_seconds, 3),
            "max_duration": spec["max_duration"],
            "lease": spec.get("lease") or 0,
            "expires_at": datetime.datetime.fromtimestamp(started + spec["max_duration"], datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
        }
        self.deadline = time.monotonic() + spec["max_duration"]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = os.path.join(self.sdir, SOCKET_FILE)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(8)
        if spec.get("copy"):
            self.state["copy"] = {"status": "running"}
        self._save()
        self._report({"ok": True, "state": self.state})
        if spec.get("copy"):
            self.copy = _CopyJob(spec["copy"])
            self.copy.start()
        return True

    def _fail_record(self) -> None:
        """A backup that ended any other way than its stop can never be used: its record
        says so now, its data goes and the cluster's lock is free for the next run."""
        record = self.spec.get("record")
        if not record or not self.state.get("session_id") or self.state.get("status") == "stopped":
            return
        reason = self.state.get("reason") or "the session keeper ended before the backup was stopped"
        try:
            # Only a record still "running": its run may have marked it failed already, with the cause.
            if (read_json(backup_json_path(record["repository"], record["backup_id"])) or {}).get("status") != "running":
                return
            fail_backup(
                record["repository"],
                record["backup_id"],
                record["cluster"],
                f"session keeper: {reason}",
                record["keep_files"],
                metrics_file=record.get("metrics_file"),
            )
        except Exception:  # noqa: BLE001 - best effort; the next run's lock check covers the rest
            pass

    def _session_settings(self, major: int) -> None:
        # The session must outlive any idle or statement limit set by the DBA.
        sets = ["statement_timeout", "idle_in_transaction_session_timeout", "lock_timeout"]
        if major >= 14:
            sets.append("idle_session_timeout")
        if major >= 17:
            sets.append("transaction_timeout")
        with self.conn.cursor() as cur:
            for name in sets:
                cur.execute("SELECT set_config(%s, '0', false)", (name,))

    def _facts(self) -> dict:
        row = query_one(
            self.conn,
            "SELECT (SELECT timeline_id FROM pg_control_checkpoint()),"
            " (SELECT system_identifier::text FROM pg_control_system()),"
            " pg_is_in_recovery(),"
            " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')",
        )
        return {"timeline": row[0], "system_identifier": row[1], "in_recovery": row[2], "wal_segment_size": row[3]}

    def _end(self, status: str, reason: str, result: dict | None = None) -> None:
        self.state["status"] = status
        self.state["reason"] = reason
        self.state["ended_at"] = utcnow()
        if result is not None:
            self.state["result"] = result
        self._save()

    def _serve(self) -> None:
        interval = self.spec["keepalive_interval"]
        lease = self.spec.get("lease") or 0
        self.last_contact = time.monotonic()
        while True:
            now = time.monotonic()
            if self.copy is not None and self.copy.is_alive():
                # Our own copy is word enough: the lease counts from its end (a run with more
                # hosts than forks reaches this host's stop only when a fork is free).
                self.last_contact = now
            left = self.deadline - now
            if left <= 0:
                self._end(
                    "expired",
                    f"max_duration of {self.spec['max_duration']}s passed at {utcnow()}; the keeper "
                    "ended the session and the server aborted the backup",
                )
                return
            lease_left = lease - (now - self.last_contact) if lease else left
            if lease_left <= 0:
                # The run that started us stopped calling (killed, Ctrl-C): nobody will stop this backup.
                self._end(
                    "expired",
                    f"no word from the run for {lease}s (lease) at {utcnow()}: it is gone; the keeper ended the "
                    "session and the server aborted the backup",
                )
                return
            ready, _writable, _errors = select.select([self.sock], [], [], min(interval, left, lease_left))
            if not ready:
                try:
                    query_one(self.conn, "SELECT 1")
                except psycopg2.Error as e:
                    self._end("lost", f"the database session was lost ({error_text(e)}); the backup is unusable")
                    return
                continue
            try:
                client, _address = self.sock.accept()
            except OSError:
                continue
            self.last_contact = time.monotonic()
            with client:
                op = self._read_request(client)
                if op == "stop" and self.copy is not None and self.copy.is_alive():
                    # Seen by state=status (and the tests): a stop task waits for the copy.
                    self.state["copy"]["stop_waiting_since"] = utcnow()
                    self._save()
                    if not self._await_copy(client):
                        return
                # No SIGTERM between the stop call and its reply: the label must reach the caller.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                try:
                    done = self._handle(client, op)
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            if done:
                return

    def _read_request(self, client):
        """The request's op from the keeper's own user (or root); None otherwise."""
        client.settimeout(30)
        try:
            creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.geteuid()):
                client.sendall(b'{"ok": false, "error": "permission denied"}\n')
                return None
            req = json.loads(_recv_line(client) or b"{}")
        except (OSError, ValueError):
            return None
        return (req.get("op") or "?") if isinstance(req, dict) else "?"

    def _await_copy(self, client) -> bool:
        """Wait for the copy while the stop request stays open: False when the
        backup had to end meanwhile (the run went away, max_duration, session lost)."""
        interval = self.spec["keepalive_interval"]
        while self.copy.is_alive():
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.copy.stop()
                self._end("expired", f"max_duration of {self.spec['max_duration']}s passed during the copy; backup aborted")
                return False
            ready, _w, _x = select.select([self.copy.done_r, client, self.sock], [], [], min(interval, left))
            if self.sock in ready and self._serve_during_copy():
                return False
            if client in ready:
                try:
                    # EOF: the client is gone; anything else it sends is not for us (read, dropped).
                    gone = client.recv(4096, socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    # The task that waits for the stop died with its run (Ctrl-C, lost controller).
                    self.copy.stop()
                    self.conn.close()
                    self._end("aborted", "the run that asked for the stop went away during the copy; backup aborted")
                    return False
            if not ready:
                try:
                    query_one(self.conn, "SELECT 1")
                except psycopg2.Error as e:
                    self.copy.stop()
                    self._end("lost", f"the database session was lost ({error_text(e)}); the backup is unusable")
                    return False
            if self.copy.done_r in ready:
                self.copy.join()  # it wrote its last byte: ending now
        return True

    def _serve_during_copy(self) -> bool:
        """Another request while a stop waits for the copy: ping, or abort (True: the backup ended)."""
        try:
            other, _address = self.sock.accept()
        except OSError:
            return False
        with other:
            op = self._read_request(other)
            if op == "abort":
                self.copy.stop()
                self.conn.close()  # ending the session aborts the backup on the server
                self._end("aborted", "aborted on request during the copy")
                reply, ended = {"ok": True, "state": self.state}, True
            elif op == "ping":
                reply, ended = {"ok": True, "state": self.state}, False
            else:
                reply, ended = {"ok": False, "error": f"{op!r} must wait: a stop is waiting for the copy"}, False
            if op is not None:
                try:
                    other.sendall(json.dumps(reply, default=str).encode() + b"\n")
                except OSError:
                    pass
        return ended

    def _handle(self, client, op) -> bool:
        """Serve one request; True when the keeper should exit."""
        if op is None:
            return False
        try:
            if op == "ping":
                reply, done = {"ok": True, "state": self.state}, False
            elif op == "stop" and self.copy is not None and self.copy.error is not None:
                # The copy failed: nothing can be usable, end the backup on the server.
                self.conn.close()
                self.state["copy"] = {"status": "failed", "error": self.copy.error}
                self._end("failed", f"the copy failed: {self.copy.error}; the backup was aborted")
                reply, done = {"ok": False, "copy_failed": True, "error": self.state["reason"], "state": self.state}, True
            elif op == "stop":
                if self.copy is not None:
                    self.state["copy"] = {"status": "done", **self.copy.result}
                reply, done = self._stop(), True
            elif op == "abort":
                if self.copy is not None and self.copy.is_alive():
                    self.copy.stop()
                self.conn.close()  # ending the session aborts the backup on the server
                self._end("aborted", "aborted on request")
                reply, done = {"ok": True, "state": self.state}, True
            else:
                reply, done = {"ok": False, "error": f"unknown request {op!r}"}, False
        except OSError as e:  # e.g. the state file cannot be written: still answer
            reply, done = (
                {"ok": False, "error": f"the keeper could not record the session: {e}", "state": self.state},
                op != "ping",
            )
        try:
            client.sendall(json.dumps(reply, default=str).encode() + b"\n")
        except OSError:
            pass
        return done

    def _stop(self) -> dict:
        major = major_of(self.state["server_version_num"])
        requested = utcnow()  # every commit that returned before this is in the backup
        t0 = time.monotonic()
        try:
            lsn_text, labelfile, spcmapfile = query_one(self.conn, stop_sql(major))
        except psycopg2.Error as e:
            msg = error_text(e)
            self._end("failed", f"the stop function failed: {msg}")
            return {"ok": False, "error": msg, "sqlstate": e.pgcode, "state": self.state}
        stop_lsn = parse_lsn(lsn_text)
        tli = self.state["timeline"]
        if self.state.get("backup_from") == "standby":
            # A standby's backup ends at its minimum recovery point, on that point's timeline.
            try:
                row = query_one(self.conn, "SELECT min_recovery_end_timeline FROM pg_control_recovery()")
                tli = row[0] or tli
            except psycopg2.Error:
                pass
        result = {
            "stop_lsn": format_lsn(stop_lsn),
            # The stop location ends the backup: its segment is the one before it.
            "stop_wal": wal_file_name(tli, stop_lsn, self.state["wal_segment_size"], previous=True),
            "labelfile": labelfile,
            "spcmapfile": spcmapfile or "",
            "stop_requested_at": requested,
            "stopped_at": utcnow(),
            "stop_seconds": round(time.monotonic() - t0, 3),
        }
        # Saved before replying: the label survives whatever happens next.
        try:
            self._end("stopped", "stopped on request", result)
        except OSError as e:
            # Could not save it (disk full?): the reply is now its only copy.
            return {"ok": True, "state": self.state, "warning": f"the label could not be saved in the session directory: {e}"}
        return {"ok": True, "state": self.state}
