# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore a backup of this collection's repository layout into a data directory.

Pure helpers (validation, recovery settings, tablespace_map, log reading) and
the file work (extracting archives, placing the label files, writing
postgresql.auto.conf and recovery.signal). The modules pg_restore_prepare,
pg_restore_server and pg_restore_drill call these; nothing here talks to Ansible.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time

TARGETS = ("immediate", "latest", "time", "lsn", "name", "xid")
ACTIONS = ("promote", "pause", "shutdown")
BIN_DIRS = ("/usr/lib/postgresql/{major}/bin", "/usr/pgsql-{major}/bin", "/var/cache/pgops-online-backup/pg/{major}/bin")
# PostgreSQL 17 client tools installed by this collection's setup (pg_amcheck, psql, ...).
EXTRA_TOOL_DIRS = {17: ("/var/cache/pgops-online-backup/pg17-tools/bin",)}
DECOMPRESSORS = {
    ".gz": (["pigz", "-dc"], ["gzip", "-dc"]),
    ".zst": (["zstd", "-dcq"],),
    ".lz4": (["lz4", "-dcq"],),
}
ARCHIVE_RE = re.compile(r"^(base|[0-9]+)\.(tar|cpio)(\.gz|\.zst|\.lz4)?$")
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
WAL_RE = re.compile(r"^[0-9A-F]{24}$")
TIME_RE = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[ T](?P<time>\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)"
    r"\s*(?P<zone>Z|UTC|GMT|[+-]\d{2}(?::?\d{2})?|[A-Za-z][A-Za-z0-9/_+-]*)?$"
)
# Settings this collection writes into postgresql.auto.conf (an earlier value is dropped first).
RECOVERY_KEYS = (
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_xid",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
)
# Lines of a restored postgresql.conf that must not act on the restored server:
# data_directory would point the server at the original cluster's files, and a
# second recovery target there is a FATAL "multiple recovery targets".
DISABLED_CONF_RE = re.compile(r"^\s*(data_directory|recovery_target\w*|restore_command)\s*(=|\s)", re.IGNORECASE)
DISABLED_PREFIX = "#pgops-restore-disabled# "
AUTO_CONF_HEADER = "# Added by pgops.online_backup.pg_restore_prepare"
MAX_RESTORE_POINT_NAME = 63  # MAXFNAMELEN - 1
# Files of the original server that must not come along (most are never copied; old backups may hold them).
STALE_FILES = ("postmaster.pid", "postmaster.opts", "recovery.conf", "standby.signal", "recovery.signal", "backup_label.old")
EMPTY_DIRS = ("pg_wal", "pg_wal/archive_status", "pg_replslot", "pg_tblspc")
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


class RestoreError(Exception):
    pass


# -- input


def major_of(pg_version) -> int:
    """Major version from server_version_num (150020, "150020") or a version text ("15.2", "17beta1")."""
    text = str(pg_version).strip()
    if text.isdigit():
        num = int(text)
        if num >= 100000:
            return num // 10000
        if 10 <= num < 100:
            return num
        raise RestoreError(f"cannot tell the PostgreSQL major version from {pg_version!r}")
    m = re.match(r"^(\d+)", text)
    if not m:
        raise RestoreError(f"cannot tell the PostgreSQL major version from {pg_version!r}")
    return int(m.group(1))


def parse_target_time(value: str) -> tuple:
    """(aware datetime or None when no zone is given, zone text). Raises RestoreError."""
    m = TIME_RE.match(value.strip())
    if not m:
        raise RestoreError(
            f"recovery target time {value!r} is not a timestamp like '2026-11-29 10:15:00+00' (date, time, and a time zone)"
        )
    t = m.group("time")
    fmt = "%Y-%m-%d %H:%M" + (":%S" if t.count(":") == 2 else "") + (".%f" if "." in t else "")
    try:
        naive = datetime.datetime.strptime(f"{m.group('date')} {t}", fmt)
    except ValueError as e:
        raise RestoreError(f"recovery target time {value!r} is not a valid timestamp: {e}") from None
    zone = m.group("zone")
    if zone in ("Z", "UTC", "GMT"):
        return naive.replace(tzinfo=datetime.timezone.utc), zone
    if zone and zone[0] in "+-":
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
        offset = datetime.timedelta(hours=hours, minutes=minutes)
        return naive.replace(tzinfo=datetime.timezone(offset if zone[0] == "+" else -offset)), zone
    return None, zone  # a zone name (or none): PostgreSQL resolves it, we cannot compare


def parse_lsn(text: str) -> int:
    if not LSN_RE.match(str(text or "")):
        raise RestoreError(f"{text!r} is not an LSN like 0/3000060")
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def validate_target(target: str, value, action: str, timeline, inclusive: bool = True) -> list:
    """Check a recovery target; returns warnings, raises RestoreError with what to fix."""
    warnings = []
    value = "" if value is None else str(value).strip()
    if target not in TARGETS:
        raise RestoreError(f"recovery target {target!r} is not one of {', '.join(TARGETS)}")
    if action not in ACTIONS:
        raise RestoreError(f"recovery target action {action!r} is not one of {', '.join(ACTIONS)}")
    if target in ("immediate", "latest"):
        if value:
            raise RestoreError(f"recovery target {target} takes no value (got {value!r}); use time, lsn, name or xid for a value")
        if target == "latest" and action != "promote":
            warnings.append(
                f"recovery target action {action} has no effect with target latest (the server promotes at the end of WAL)"
            )
    elif not value:
        raise RestoreError(f"recovery target {target} needs a value (pg_restore_target_value)")
    elif target == "time":
        _moment, zone = parse_target_time(value)
        if not zone:
            warnings.append(f"recovery target time {value!r} has no time zone: the restored server's timezone setting applies")
    elif target == "lsn":
        parse_lsn(value)
    elif target == "xid":
        if not value.isdigit() or int(value) < 3:
            raise RestoreError(f"recovery target xid {value!r} is not a transaction id (a number of at least 3)")
    elif target == "name":
        if len(value.encode()) > MAX_RESTORE_POINT_NAME:
            raise RestoreError(f"restore point name {value!r} is longer than {MAX_RESTORE_POINT_NAME} bytes")
        if "\n" in value or "\0" in value:
            raise RestoreError("restore point name must be one line without NUL")
    if not inclusive and target not in ("time", "lsn", "xid"):
        warnings.append(f"recovery_target_inclusive applies to time, lsn and xid targets, not to {target}")
    tl = "latest" if timeline in (None, "") else str(timeline).strip()
    if tl not in ("latest", "current") and not tl.isdigit():
        raise RestoreError(f"recovery target timeline {timeline!r} is not latest, current or a timeline number")
    return warnings


def check_target_against_backup(target: str, value, info: dict) -> None:
    """A target before the end of the backup can never be reached: say so before anything changes."""
    value = "" if value is None else str(value).strip()
    if target == "lsn" and info.get("stop_lsn"):
        try:
            stop = parse_lsn(str(info["stop_lsn"]))
        except RestoreError:
            return
        if parse_lsn(value) < stop:
            raise RestoreError(
                f"recovery target lsn {value} is before the end of backup {info.get('id')} ({info['stop_lsn']}): "
                "a restore of this backup cannot stop there; choose an older backup"
            )
    if target == "time" and info.get("stopped_at"):
        wanted, _zone = parse_target_time(value)
        try:
            stopped = datetime.datetime.fromisoformat(str(info["stopped_at"]).replace("Z", "+00:00"))
        except ValueError:
            return
        if wanted is not None and stopped.tzinfo is not None and wanted < stopped:
            raise RestoreError(
                f"recovery target time {value} is before the end of backup {info.get('id')} ({info['stopped_at']}): "
                "a restore of this backup cannot stop there; choose an older backup"
            )


def validate_port(port) -> int:
    try:
        num = int(port)
    except (TypeError, ValueError):
        raise RestoreError(f"port {port!r} is not a number") from None
    if not 0 <= num <= 65535 or (0 < num < 1024):
        raise RestoreError(f"port {num} is not usable: give 1024-65535 (or 0 to pick a free one)")
    return num


def require_absolute(name: str, path) -> str:
    if not path or not os.path.isabs(str(path)):
        raise RestoreError(f"{name} must be an absolute path (got {path!r})")
    return os.path.normpath(str(path))


# -- postgresql.conf values


def conf_quote(value) -> str:
    """A value as PostgreSQL's configuration files read it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def restore_command_for(wal_archive: str) -> str:
    """Copy from a directory of archived WAL; fails (quietly) for a file that is not there, as PostgreSQL requires."""
    src = shlex.quote(wal_archive.rstrip("/") or "/") + "/%f"
    return f"test -f {src} && cp {src} %p"


def recovery_settings(restore_command: str, target: str, value, action: str, timeline, inclusive: bool = True) -> dict:
    """The recovery settings, in the order they are written; exactly one recovery_target* at most."""
    out = {"restore_command": restore_command}
    value = "" if value is None else str(value).strip()
    if target == "immediate":
        out["recovery_target"] = "immediate"
    elif target in ("time", "lsn", "name", "xid"):
        out[f"recovery_target_{target}"] = value
        if not inclusive and target in ("time", "lsn", "xid"):
            out["recovery_target_inclusive"] = False
    if target != "latest":
        out["recovery_target_action"] = action
    out["recovery_target_timeline"] = "latest" if timeline in (None, "") else str(timeline).strip()
    return out


def _conf_key(line: str) -> str | None:
    m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(=|\s)", line)
    return m.group(1).lower() if m else None


def render_auto_conf(existing: str, settings: dict, header: str) -> str:
    """postgresql.auto.conf with every earlier line for our keys (and any recovery setting) dropped, ours appended."""
    drop = {k.lower() for k in settings} | set(RECOVERY_KEYS)
    kept = []
    skipping_ours = False
    for line in existing.splitlines():
        if line.startswith(AUTO_CONF_HEADER):
            skipping_ours = True  # an earlier block of ours: its keys are dropped below anyway
            continue
        key = _conf_key(line)
        if key and key in drop:
            continue
        if skipping_ours and not line.strip():
            continue
        kept.append(line)
    if not kept:
        kept = ["# Do not edit this file manually!", "# It will be overwritten by the ALTER SYSTEM command."]
    lines = kept + [header]
    lines += [f"{key} = {conf_quote(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def disable_conf_lines(text: str) -> tuple:
    """(new text, disabled lines): comment out settings that must not reach the restored server."""
    out, disabled = [], []
    for line in text.splitlines(keepends=True):
        if DISABLED_CONF_RE.match(line):
            disabled.append(line.strip())
            out.append(DISABLED_PREFIX + line)
        else:
            out.append(line)
    return "".join(out), disabled


def conf_value(text: str, key: str):
    """The last active value of key in a configuration file's text (unquoted), or None."""
    found = None
    for line in text.splitlines():
        if _conf_key(line) != key:
            continue
        value = line.split("=", 1)[1] if "=" in line else line.strip().split(None, 1)[-1]
        value = value.split("#", 1)[0].strip() if not value.strip().startswith("'") else value.strip()
        if value.startswith("'"):
            end = value.find("'", 1)
            while end > 0 and value[end : end + 2] == "''":
                end = value.find("'", end + 2)
            value = value[1:end].replace("''", "'") if end > 0 else value[1:]
        found = value
    return found


def conf_texts(data_dir: str) -> list:
    """postgresql.conf then postgresql.auto.conf of a data directory (the ones that exist)."""
    texts = []
    for name in ("postgresql.conf", "postgresql.auto.conf"):
        try:
            with open(os.path.join(data_dir, name), encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        except OSError:
            continue
    return texts


def original_port(data_dir: str) -> int:
    """The port the backed-up server used, from its copied configuration (PostgreSQL's default 5432)."""
    return config_port(conf_texts(data_dir)) or 5432


# -- tablespace_map


def parse_tablespace_map(text: str) -> list:
    """[(oid, path)] from a tablespace_map; as the server reads it, a backslash escapes the next character
    (so a path may hold a newline) and an unescaped newline ends an entry."""
    lines, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i + 1])
            i += 2
            continue
        if ch == "\n":
            lines.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    lines.append("".join(current))
    entries = []
    for raw in lines:
        raw = raw.rstrip("\r")
        if not raw.strip():
            continue
        oid, sep, path = raw.partition(" ")
        if not sep or not oid.isdigit() or not path:
            raise RestoreError(f"invalid tablespace_map line {raw!r}")
        entries.append((oid, path))
    return entries


def format_tablespace_map(entries: list) -> str:
    out = []
    for oid, path in entries:
        escaped = "".join("\\" + ch if ch in "\\\n\r" else ch for ch in path)
        out.append(f"{oid} {escaped}\n")
    return "".join(out)


def plan_tablespaces(backup_spaces: list, map_entries: list, mapping: dict) -> list:
    """[{oid, name, location (original), path (new)}], applying mapping (key oid, original path or name → new path)."""
    by_oid = {}
    for oid, path in map_entries:
        by_oid[oid] = {"oid": oid, "name": None, "location": path}
    for ts in backup_spaces or []:
        oid = str(ts.get("oid"))
        entry = by_oid.setdefault(oid, {"oid": oid, "name": None, "location": ts.get("location")})
        entry["name"] = ts.get("name")
        entry["location"] = entry["location"] or ts.get("location")
    used = set()
    for entry in by_oid.values():
        new = None
        for key in (entry["oid"], entry["location"], entry["name"]):
            if key is not None and str(key) in mapping:
                new = mapping[str(key)]
                used.add(str(key))
                break
        entry["path"] = require_absolute(f"new path of tablespace {entry['oid']}", new) if new else entry["location"]
        if not entry["path"]:
            raise RestoreError(f"tablespace {entry['oid']} has no location in the backup; map it (pg_restore_tablespace_map)")
    unknown = sorted(set(mapping) - used)
    if unknown:
        known = ", ".join(f"{e['oid']} ({e['name'] or '?'}, {e['location']})" for e in by_oid.values()) or "none"
        raise RestoreError(
            f"tablespace_map names tablespaces the backup does not have: {', '.join(unknown)}; the backup has: {known}"
        )
    paths = [e["path"] for e in by_oid.values()]
    dupes = sorted({p for p in paths if paths.count(p) > 1})
    if dupes:
        raise RestoreError(f"two tablespaces would be restored into the same directory: {', '.join(dupes)}")
    return sorted(by_oid.values(), key=lambda e: int(e["oid"]))


# -- target directories


def inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


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


def directory_state(path: str) -> tuple:
    """("absent"|"empty"|"not_empty"|"not_a_directory", a few names found)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent", []
    if stat.S_ISLNK(st.st_mode) and os.path.isdir(path):
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return "not_a_directory", []
    names = sorted(os.listdir(path))
    if not names or names == ["lost+found"]:
        return "empty", []
    return "not_empty", names[:8]


def check_targets(data_dir: str, spaces: list, force: bool, backup_dir: str, live: dict | None = None) -> list:
    """Refuse what must not be overwritten; returns [(path, state)] for the plan. Changes nothing."""
    states = []
    targets = [("data directory", data_dir)] + [(f"tablespace {ts['oid']} directory", ts["path"]) for ts in spaces]
    for what, path in targets:
        if inside(path, backup_dir) or inside(backup_dir, path):
            raise RestoreError(f"{what} {path} overlaps the backup {backup_dir}")
        state, names = directory_state(path)
        if state == "not_a_directory":
            raise RestoreError(f"{what} {path} exists and is not a directory")
        pid = running_postmaster(path) if state == "not_empty" else None
        if pid:
            raise RestoreError(
                f"{what} {path} belongs to a running PostgreSQL server (pid {pid}); never restored over, even with force"
            )
        if state == "not_empty" and not force:
            raise RestoreError(
                f"{what} {path} is not empty ({', '.join(names)}{', ...' if len(names) == 8 else ''}); "
                "restore into an empty or absent directory, or set force to replace its content"
            )
        if state == "not_empty":
            why = unremovable(path)
            if why:
                raise RestoreError(f"{what} {path} cannot be emptied: {why}")
        states.append((path, state))
    for ts in spaces:
        if inside(ts["path"], data_dir):
            raise RestoreError(f"tablespace {ts['oid']} directory {ts['path']} is inside the data directory {data_dir}")
    if live:
        # The original server still runs here: its tablespaces are live files too.
        pid = running_postmaster(live.get("data_directory") or "")
        if pid:
            for ts in spaces:
                if os.path.realpath(ts["path"]) == os.path.realpath(ts["location"] or ""):
                    raise RestoreError(
                        f"tablespace {ts['oid']} would be restored into {ts['path']}, which the original server "
                        f"(pid {pid}, {live['data_directory']}) is using; map it elsewhere (pg_restore_tablespace_map)"
                    )
            if inside(data_dir, live["data_directory"]):
                raise RestoreError(f"the data directory {data_dir} is the running original server's ({pid})")
    return states


def unremovable(path: str) -> str | None:
    """Why the content of path cannot all be removed by this user (None when it can): checked before removing any."""
    errors = []
    for dirpath, dirnames, _filenames in os.walk(path, onerror=errors.append):
        if not os.access(dirpath, os.W_OK | os.X_OK):
            return f"{dirpath} is not writable by uid {os.geteuid()}"
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    if errors:
        return f"{errors[0].filename} cannot be read by uid {os.geteuid()}"
    return None


def writable_parent(path: str) -> str | None:
    """Why path cannot be created or written by this user (None when it can)."""
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK):
        return None
    return f"{probe} is not writable by uid {os.geteuid()}: create {path} for this user first, or run as its owner"


def clear_directory(path: str) -> None:
    """Remove everything inside path; path itself stays (with its owner and mode)."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)


def prepare_directory(path: str, state: str) -> None:
    if state == "absent":
        os.makedirs(path, mode=0o700)
    elif state == "not_empty":
        clear_directory(path)
    os.chmod(path, 0o700)


def undo_directory(path: str, state: str) -> None:
    """Put a target back as it was before a failed restore (absent, or empty)."""
    try:
        if state == "absent":
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.isdir(path):
            clear_directory(path)
    except OSError:
        pass


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
        raise RestoreError(f"bin_dir {given} cannot run this PostgreSQL {major} backup: {'; '.join(tried)}")
    raise RestoreError(f"no PostgreSQL {major} server binaries found (tried {'; '.join(tried)}); install them or set bin_dir")


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


# -- the backup


def backup_sources(backup_dir: str, info: dict) -> dict:
    """{"method", "compression", "base": archive or directory, "spaces": {oid: archive or directory}}."""
    method = info.get("method")
    if method not in ("tar", "cpio", "rsync"):
        raise RestoreError(f"{backup_dir}/backup.json has method {method!r}; expected tar, cpio or rsync")
    out = {"method": method, "compression": info.get("compression") or "none", "spaces": {}}
    if method == "rsync":
        data = os.path.join(backup_dir, "data")
        if not os.path.isfile(os.path.join(data, "PG_VERSION")):
            raise RestoreError(f"backup {backup_dir} has method rsync but {data} is not a data directory (no PG_VERSION)")
        out["base"] = data
        base = os.path.join(backup_dir, "tablespaces")
        for oid in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            if oid.isdigit() and os.path.isdir(os.path.join(base, oid)):
                out["spaces"][oid] = os.path.join(base, oid)
        return out
    for name in sorted(os.listdir(backup_dir)):
        m = ARCHIVE_RE.match(name)
        if not m or m.group(2) != method:
            continue
        key = m.group(1)
        if key in out["spaces"] or (key == "base" and "base" in out):
            raise RestoreError(f"backup {backup_dir} has two archives for {key}")
        if key == "base":
            out["base"] = os.path.join(backup_dir, name)
        else:
            out["spaces"][key] = os.path.join(backup_dir, name)
    if "base" not in out:
        raise RestoreError(f"backup {backup_dir} has no base.{method}[.gz|.zst|.lz4] archive")
    return out


def decompressor(path: str) -> list | None:
    """The command that decompresses path to stdout (None for a plain archive); RestoreError when not installed."""
    for suffix, commands in DECOMPRESSORS.items():
        if path.endswith(suffix):
            for cmd in commands:
                if shutil.which(cmd[0]):
                    return cmd
            tools = " or ".join(c[0] for c in commands)
            raise RestoreError(f"{os.path.basename(path)} needs {tools} on this host to be decompressed; install it")
    return None


def needed_tools(sources: dict) -> list:
    """Check that every program the restore needs is installed before anything changes."""
    method = sources["method"]
    paths = [sources["base"]] + list(sources["spaces"].values())
    tools = {"rsync": "rsync"}.get(method, method)
    missing = [] if shutil.which(tools) else [tools]
    for path in paths if method != "rsync" else []:
        try:
            decompressor(path)
        except RestoreError as e:
            missing.append(str(e))
    if missing:
        raise RestoreError(f"cannot restore this {method} backup here: missing {'; '.join(missing)}")
    return paths


def _run_pipeline(stages: list, what: str, cwd: str) -> None:
    """Run commands piped into each other; RestoreError naming the failing stage and its message."""
    procs = []
    upstream = None
    try:
        for i, (cmd, stdin_path) in enumerate(stages):
            err = tempfile.TemporaryFile()
            last = i == len(stages) - 1
            stdin = open(stdin_path, "rb") if stdin_path else upstream  # noqa: SIM115 - closed below
            p = subprocess.Popen(cmd, cwd=cwd, stdin=stdin, stdout=subprocess.DEVNULL if last else subprocess.PIPE, stderr=err)
            if stdin is not None:
                stdin.close()  # only the child holds it now
            procs.append((cmd, p, err))
            upstream = p.stdout
        failures = []
        for cmd, p, err in procs:
            p.wait()
            err.seek(0)
            text = err.read().decode("utf-8", "replace").strip()
            if p.returncode != 0:
                failures.append(f"{os.path.basename(cmd[0])} exited {p.returncode}: {' | '.join(text.splitlines()[-5:])}")
    finally:
        for _cmd, p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
    if failures:
        raise RestoreError(f"extracting {what} failed: {'; '.join(failures)}")


def extract(source: str, dest: str, method: str) -> None:
    """Extract one archive (or copy one directory for rsync backups) into dest, which exists and is empty."""
    what = os.path.basename(source.rstrip("/"))
    if method == "rsync":
        _run_pipeline([(["rsync", "-a", "--", source.rstrip("/") + "/", dest.rstrip("/") + "/"], None)], what, dest)
        return
    unpack = {
        # Names in our archives are relative (maybe "./"); tar refuses ".." and absolute names by default.
        "tar": ["tar", "-x", "-f", "-", "--no-same-owner", "--delay-directory-restore"],
        "cpio": ["cpio", "-i", "-d", "-m", "-u", "--no-absolute-filenames", "--quiet"],
    }[method]
    dec = decompressor(source)
    stages = (
        [(dec + ["--", source] if dec[0] in ("zstd", "lz4") else dec + [source], None), (unpack, None)]
        if dec
        else [(unpack, source)]
    )
    _run_pipeline(stages, what, dest)


def peek_tar_config(archive: str, limit: int = 5000) -> dict:
    """{name: text} of postgresql.conf / postgresql.auto.conf at the top of a (compressed) tar, without extracting.

    The copy puts the data directory's top-level files first, so this reads only the start of the stream.
    """
    import tarfile  # only needed here

    wanted = {"postgresql.conf", "postgresql.auto.conf"}
    found = {}
    dec = decompressor(archive)
    proc = None
    try:
        if dec:
            cmd = dec + (["--", archive] if dec[0] in ("zstd", "lz4") else [archive])
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            stream = proc.stdout
        else:
            stream = open(archive, "rb")  # noqa: SIM115 - closed below
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for n, member in enumerate(tf):
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                if name in wanted and member.isreg():
                    found[name] = tf.extractfile(member).read().decode("utf-8", "replace")
                if len(found) == len(wanted) or n > limit:
                    break
        stream.close()
    except (OSError, tarfile.TarError, EOFError):
        return found
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    return found


def config_port(texts: list):
    """The port the configuration texts (in reading order) set, or None when none sets it."""
    port = None
    for text in texts:
        value = conf_value(text, "port")
        if value is not None and value.isdigit():
            port = int(value)
    return port


def place_label_files(backup_dir: str, data_dir: str, method: str) -> list:
    """backup_label and tablespace_map from the backup root into the restored data directory (tar, cpio)."""
    placed = []
    if method == "rsync":
        return placed  # data/ already holds them
    for name in ("backup_label", "tablespace_map"):
        src = os.path.join(backup_dir, name)
        dst = os.path.join(data_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o600)
            placed.append(name)
        elif name == "tablespace_map" and os.path.exists(dst):
            os.unlink(dst)  # a map inside the archive without one at the root would be stale
    return placed


def write_text(path: str, text: str, mode: int = 0o600) -> None:
    tmp = f"{path}.pgops-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tidy_data_directory(data_dir: str, major: int) -> list:
    """Remove what must not come from the original server; create the directories the server needs."""
    removed = []
    for name in STALE_FILES:
        path = os.path.join(data_dir, name)
        if os.path.lexists(path):
            os.unlink(path)
            removed.append(name)
    for sub in EMPTY_DIRS + (("pg_wal/summaries",) if major >= 17 else ()):
        path = os.path.join(data_dir, sub)
        if os.path.islink(path):
            # A backup that carried a link (e.g. pg_wal on another volume, made by
            # another tool) must never lead us into the original's directory.
            os.unlink(path)
            removed.append(f"{sub} (link)")
        os.makedirs(path, mode=0o700, exist_ok=True)
    slots = os.path.join(data_dir, "pg_replslot")
    for name in os.listdir(slots):
        shutil.rmtree(os.path.join(slots, name), ignore_errors=True)
        removed.append(f"pg_replslot/{name}")
    wal = os.path.join(data_dir, "pg_wal")
    for name in os.listdir(wal):
        full = os.path.join(wal, name)
        if os.path.isfile(full) and (WAL_RE.match(name) or name.endswith(".partial")):
            os.unlink(full)  # WAL comes from the archive; an old segment here would be replayed first
            removed.append(f"pg_wal/{name}")
    return removed


def link_tablespaces(data_dir: str, spaces: list) -> None:
    """pg_tblspc/<oid> → the new location (the server would recreate them from tablespace_map too)."""
    tblspc = os.path.join(data_dir, "pg_tblspc")
    for ts in spaces:
        link = os.path.join(tblspc, ts["oid"])
        if os.path.lexists(link):
            if os.path.isdir(link) and not os.path.islink(link):
                shutil.rmtree(link)
            else:
                os.unlink(link)
        os.symlink(ts["path"], link)


def write_minimal_configs(data_dir: str) -> list:
    """Data directories whose configuration lives elsewhere (Debian's /etc/postgresql): give the server minimal files."""
    created = []
    defaults = {
        "postgresql.conf": "# Created by pgops.online_backup.pg_restore_prepare: the backed-up data directory had no\n"
        "# postgresql.conf (its configuration lived elsewhere). Settings are in postgresql.auto.conf.\n",
        "pg_hba.conf": "# Created by pgops.online_backup.pg_restore_prepare (the backup had none): local OS users only.\n"
        "local all all peer\n",
        "pg_ident.conf": "",
    }
    for name, text in defaults.items():
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            write_text(path, text)
            created.append(name)
    return created


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


# -- WAL archive


def wal_files_needed(start_wal: str, stop_wal: str) -> list:
    """Segments from start to stop when they share a log id (otherwise the two ends only)."""
    if not (WAL_RE.match(start_wal or "") and WAL_RE.match(stop_wal or "")):
        return []
    if start_wal[:16] != stop_wal[:16]:
        return [start_wal, stop_wal]
    first, last = int(start_wal[16:], 16), int(stop_wal[16:], 16)
    if last < first or last - first > 10000:
        return [start_wal, stop_wal]
    return [f"{start_wal[:16]}{n:08X}" for n in range(first, last + 1)]


def missing_wal(archive: str, names: list) -> list:
    """Names (compressed variants count) not found in a WAL archive directory."""
    try:
        present = set(os.listdir(archive))
    except OSError as e:
        raise RestoreError(f"WAL archive {archive} cannot be read: {e.strerror}") from None
    stems = {n.split(".", 1)[0] for n in present}
    return [n for n in names if n not in present and n not in stems]


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


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def monotonic() -> float:
    return time.monotonic()


# -- a restored server


def read_conf(data_dir: str) -> dict:
    """Settings of a data directory's postgresql.conf overridden by postgresql.auto.conf (active lines only)."""
    out = {}
    for text in conf_texts(data_dir):
        for line in text.splitlines():
            key = _conf_key(line)
            if key:
                value = conf_value(line, key)
                if value is not None:
                    out[key] = value
    return out


def server_address(data_dir: str, port=None, socket_dir=None) -> tuple:
    """(port, socket directory) of the server of data_dir, from its configuration unless given."""
    conf = read_conf(data_dir)
    if not port:
        value = conf.get("port", "5432")
        port = int(value) if str(value).isdigit() else 5432
    if not socket_dir:
        dirs = [d.strip() for d in conf.get("unix_socket_directories", "").split(",") if d.strip()]
        socket_dir = dirs[0] if dirs else default_socket_directory()
    return int(port), socket_dir


def expected_end(conf: dict) -> tuple:
    """(target kind or "latest", recovery_target_action) from a configuration."""
    target = "latest"
    if conf.get("recovery_target"):
        target = "immediate"
    for kind in ("time", "lsn", "name", "xid"):
        if conf.get(f"recovery_target_{kind}"):
            target = kind
    return target, conf.get("recovery_target_action") or "pause"
