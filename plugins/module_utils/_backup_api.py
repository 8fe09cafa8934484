# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The low-level backup API per PostgreSQL major, and WAL arithmetic.

Pure functions: no connection, no module object, so unit tests reach them.
"""

from __future__ import annotations

import re

from ._errors import PgopsError

MIN_MAJOR = 12
MAX_LABEL_BYTES = 1024  # server refuses longer: "backup label too long (max 1024 bytes)"

_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_START_RE = re.compile(r"^START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+) \(file ([0-9A-F]{24})\)$", re.M)


class BackupApiError(PgopsError, ValueError):
    """A value that is not what PostgreSQL would accept (an LSN, a version, a WAL name)."""


def major_of(version) -> int:
    """Major version from server_version_num (150020, "150020") or a version text ("15.2", "17beta1")."""
    text = str(version).strip()
    if text.isdigit():
        num = int(text)
        if num >= 100000:
            return num // 10000
        if 10 <= num < 100:
            return num
    else:
        m = re.match(r"^(\d+)", text)
        if m:
            return int(m.group(1))
    raise BackupApiError(f"cannot tell the PostgreSQL major version from {version!r}")


def start_sql(major: int) -> str:
    # Before 15 the default is exclusive mode: always pass false explicitly.
    if major >= 15:
        return "SELECT pg_backup_start(%s, %s)::text"
    return "SELECT pg_start_backup(%s, %s, false)::text"


def stop_sql(major: int) -> str:
    # wait_for_archive=false: the server's own wait cannot be bounded without
    # cancelling the call and losing the label; we wait ourselves afterwards.
    if major >= 15:
        return "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    return "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"


def backup_function_signatures(major: int) -> list:
    if major >= 15:
        return ["pg_backup_start(text, boolean)", "pg_backup_stop(boolean)"]
    return ["pg_start_backup(text, boolean, boolean)", "pg_stop_backup(boolean, boolean)"]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def grant_statements(major: int, role: str, switch_wal: bool = False) -> list:
    """The exact GRANTs a non-superuser needs on this major."""
    funcs = backup_function_signatures(major)
    if switch_wal:
        funcs.append("pg_switch_wal()")
    return [f"GRANT EXECUTE ON FUNCTION {f} TO {quote_ident(role)};" for f in funcs]


def validate_label(label: str) -> str | None:
    """Return an error message for a label the server would refuse, else None."""
    if not label:
        return "label must not be empty"
    if "\x00" in label:
        return "label must not contain a NUL character"
    if "\n" in label or "\r" in label:
        # The label is written as one line of backup_label.
        return "label must not contain a line break"
    size = len(label.encode("utf-8"))
    if size > MAX_LABEL_BYTES:
        return f"label is {size} bytes long; PostgreSQL accepts at most {MAX_LABEL_BYTES} bytes"
    return None


def parse_lsn(text) -> int:
    m = _LSN_RE.match(str(text if text is not None else "").strip())
    if not m:
        raise BackupApiError(f"{text!r} is not an LSN like 0/3000060")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def wal_file_name(timeline: int, lsn: int, seg_size: int, previous: bool = False) -> str:
    """Name of the WAL segment holding lsn (or the byte before it, as the
    server's XLByteToPrevSeg does for a stop location)."""
    if previous:
        lsn -= 1
    return wal_segment_name(timeline, lsn // seg_size, seg_size)


WAL_NAME_RE = re.compile(r"^[0-9A-F]{24}$")


def wal_segno(name: str, seg_size: int) -> int:
    """Position of a WAL segment on its timeline."""
    if not WAL_NAME_RE.match(name or ""):
        raise BackupApiError(f"{name!r} is not a WAL segment name like 000000010000000000000003")
    per_id = 0x100000000 // seg_size
    low = int(name[16:24], 16)
    if low >= per_id:
        raise BackupApiError(f"{name} cannot exist with {seg_size // 1048576} MB segments (at most {per_id - 1:X} per log)")
    return int(name[8:16], 16) * per_id + low


def wal_segment_name(timeline: int, segno: int, seg_size: int) -> str:
    per_id = 0x100000000 // seg_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def wal_segment_count(first: str, last: str, seg_size: int) -> int:
    """Segments from first to last inclusive (same timeline)."""
    return wal_segno(last, seg_size) - wal_segno(first, seg_size) + 1


def wal_segment_names(first: str, last: str, seg_size: int) -> list:
    """Every segment name from first to last inclusive, on first's timeline
    (a backup's WAL range: the stop segment may be on a later timeline after a
    standby's promotion, and is then named as it is)."""
    start, end = wal_segno(first, seg_size), wal_segno(last, seg_size)
    tli = int(first[:8], 16)
    names = [wal_segment_name(tli, n, seg_size) for n in range(start, end + 1)]
    if names and last[:8] != first[:8]:
        names[-1] = last
    return names


def backup_history_file_name(start_wal: str, start_lsn: int, seg_size: int) -> str:
    """<start segment>.<offset>.backup, written by the stop call on a primary."""
    return f"{start_wal}.{start_lsn % seg_size:08X}.backup"


def parse_labelfile(labelfile: str) -> dict:
    """Fields of a backup_label, keys lower-cased with underscores."""
    out = {}
    for line in labelfile.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key.strip().lower().replace(" ", "_")] = value.strip()
    m = _START_RE.search(labelfile)
    if m:
        out["start_lsn"] = m.group(1)
        out["start_wal"] = m.group(2)
    return out


def wal_name_le(a: str, b: str) -> bool:
    """a is at or before b in archive order (same timeline, names sort by position)."""
    return a[8:24] <= b[8:24] if a[:8] == b[:8] else a[:8] < b[:8]


def explain_start_error(sqlstate: str | None, message: str, major: int, role: str) -> str:
    """A message that says what is wrong and how to fix it."""
    if sqlstate == "42501":
        grants = " ".join(grant_statements(major, role))
        return f"role {quote_ident(role)} may not run the backup functions ({message}). As a superuser, run: {grants}"
    if "WAL level not sufficient" in message:
        return (
            f"{message}: set wal_level = replica (or logical) in postgresql.conf and "
            "restart the server; wal_level=minimal cannot make online backups"
        )
    if "recovery is in progress" in message:
        return f"{message}: the standby cannot run this; check the standby's settings"
    return message
