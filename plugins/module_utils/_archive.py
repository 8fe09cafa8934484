# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""WAL archiving: settings, the archiver's state, and waiting for segments."""

from __future__ import annotations

import time

from ._backup_api import wal_name_le
from ._postgres import psycopg2, query_all, query_dicts, query_one


def _iso(value):
    return value.isoformat() if hasattr(value, "isoformat") else value


def archiver_row(conn) -> dict:
    row = query_dicts(
        conn,
        "SELECT archived_count, last_archived_wal, last_archived_time, failed_count,"
        " last_failed_wal, last_failed_time, stats_reset FROM pg_stat_archiver",
    )[0]
    return {k: _iso(v) for k, v in row.items()}


def archiver_failing(row: dict) -> bool:
    """The last attempt failed: a failure newer than the last success."""
    failed = row.get("last_failed_time")
    if not failed:
        return False
    archived = row.get("last_archived_time")
    return archived is None or failed > archived


def archiving_settings(conn, major: int) -> dict:
    names = ["wal_level", "archive_mode", "archive_command", "archive_timeout"]
    if major >= 15:
        names.append("archive_library")
    rows = dict(query_all(conn, "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (names,)))
    out = {n: rows.get(n) for n in names}
    out.setdefault("archive_library", None)
    out["in_recovery"] = bool(query_one(conn, "SELECT pg_is_in_recovery()")[0])
    return out


def archiving_enabled(settings: dict) -> bool:
    mode = settings.get("archive_mode")
    return mode == "always" or (mode == "on" and not settings.get("in_recovery"))


def _status_files(conn, names: list):
    """Names present in pg_wal/archive_status, or None without the privilege."""
    wanted = [n + suffix for n in names for suffix in (".ready", ".done")]
    try:
        rows = query_all(conn, "SELECT name FROM pg_ls_archive_statusdir() WHERE name = ANY(%s)", (wanted,))
    except psycopg2.errors.InsufficientPrivilege:
        return None
    return {r[0] for r in rows}


def archived(name: str, status_files, row: dict) -> bool:
    """Decide from archive_status and pg_stat_archiver whether name is archived.

    .done says so directly; an absent .ready with the archiver past the file
    (it works in name order) covers files whose status was already cleaned up.
    """
    last = row.get("last_archived_wal")
    past = bool(last) and wal_name_le(name[:24], last[:24]) and (last[:24] != name[:24] or last >= name)
    if status_files is None:
        return past
    if name + ".done" in status_files:
        return True
    return name + ".ready" not in status_files and past


def wait_for_wal(conn, names: list, timeout: float, first_poll: float = 0.01) -> dict:
    """Wait until every WAL file in names is archived, at most timeout seconds."""
    begin = time.monotonic()
    delay = first_poll
    while True:
        row = archiver_row(conn)
        status = _status_files(conn, names)
        # Without archive_status the archiver's position is all we have, and a
        # history file's name sorts before segments archived long ago: judge segments only.
        judged = names if status is not None else [n for n in names if not n.endswith(".backup")]
        missing = [n for n in judged if not archived(n, status, row)]
        waited = time.monotonic() - begin
        if not missing or waited >= timeout:
            return {"archived": not missing, "missing": missing, "waited": round(waited, 3), "archiver": row}
        time.sleep(min(delay, max(0.0, timeout - waited)))
        delay = min(delay * 2, 0.25)


def describe_wait_failure(result: dict, timeout: float) -> str:
    row = result["archiver"]
    parts = [
        f"WAL file {', '.join(result['missing'])} not archived after {timeout:g}s",
        f"pg_stat_archiver: last_archived_wal={row.get('last_archived_wal')}"
        f" at {row.get('last_archived_time')}, failed_count={row.get('failed_count')},"
        f" last_failed_wal={row.get('last_failed_wal')} at {row.get('last_failed_time')}",
    ]
    if archiver_failing(row):
        parts.append("the archiver is failing: check archive_command/archive_library and the server log")
    return "; ".join(parts)


def ready_count(conn):
    """Segments waiting for the archiver (.ready files), or None without the privilege."""
    try:
        return int(query_one(conn, "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'")[0])
    except (psycopg2.errors.InsufficientPrivilege, psycopg2.errors.UndefinedFunction):
        return None


def wait_for_segment_or_failure(conn, name: str, timeout: float, failed_count: int, first_poll: float = 0.01) -> dict:
    """Wait until WAL file name is archived, the archiver fails, or timeout seconds pass.

    failed_count is pg_stat_archiver.failed_count read before name was
    switched: a failure counted after that, with nothing archived since, means
    the archiver is stuck at name or before it (it works in order), so waiting
    longer cannot help. outcome is "archived", "failed" or "timeout".
    """
    begin = time.monotonic()
    delay = first_poll
    while True:
        row = archiver_row(conn)
        status = _status_files(conn, [name])
        waited = time.monotonic() - begin
        if archived(name, status, row):
            outcome = "archived"
        elif (row.get("failed_count") or 0) > failed_count and archiver_failing(row):
            outcome = "failed"
        elif waited >= timeout:
            outcome = "timeout"
        else:
            time.sleep(min(delay, max(0.0, timeout - waited)))
            delay = min(delay * 2, 0.25)
            continue
        return {"outcome": outcome, "archived": outcome == "archived", "waited": round(waited, 3), "archiver": row}
