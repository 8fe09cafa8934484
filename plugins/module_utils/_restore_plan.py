# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a restore will do, decided before anything changes.

Input checks (recovery target, port, paths), the recovery settings written into
postgresql.auto.conf, and tablespace_map parsing and planning. Pure functions;
the file work is in _restore_files, the restored server in _restore_server.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex

from ._backup_api import BackupApiError, parse_lsn
from ._errors import PgopsError

TARGETS = ("immediate", "latest", "time", "lsn", "name", "xid")
ACTIONS = ("promote", "pause", "shutdown")
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


class RestoreError(PgopsError):
    pass


class HostRefusal(RestoreError):
    """A refusal about this host (free space, programs, a busy port), not about the backup: a drill
    that meets one is inconclusive, never a reason to distrust the backup."""


# -- input


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


def validate_target(target: str, value, action: str, timeline, inclusive: bool = True) -> list:
    """Check a recovery target; returns warnings, raises RestoreError (BackupApiError for an LSN) with what to fix."""
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
            # The restored server would read it in its own timezone setting (GMT when its configuration
            # has none): recovery could replay past the change it was meant to stop before.
            raise RestoreError(
                f"recovery target time {value!r} has no time zone: add one (like +00, +05:30 or Z) so that it "
                "names one moment whatever the restored server's timezone setting"
            )
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
        except BackupApiError:
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
    # PostgreSQL replaces %f, %p, %r and %% in the command: a % of the path itself must be written %%.
    src = shlex.quote(wal_archive.rstrip("/") or "/").replace("%", "%%") + "/%f"
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


def conf_key(line: str) -> str | None:
    """The setting an active configuration line sets (lower case), or None."""
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
        key = conf_key(line)
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
        if conf_key(line) != key:
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


def now_utc() -> str:
    """The time stamped into postgresql.auto.conf's header and a drill's record."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
