# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read what an online backup depends on from a server, prove that WAL
archiving works, and judge it with _preflight (pg_archiving_info, and the
pre-flight that pg_backup_session can run before it starts)."""

from __future__ import annotations

import time

from ._archive import archiver_row, archiving_settings, ready_count, wait_for_segment_or_failure
from ._backup_api import MIN_MAJOR, backup_function_signatures, format_lsn, major_of, parse_lsn, wal_file_name
from ._postgres import connect_or_fail, error_text, psycopg2, query_all, query_one, server_version
from ._preflight import archiving_active, command_problem, evaluate, inspect_destination

# After a switch the insert position sits just past the new segment's long page
# header (40 bytes); anything at or below this offset means an empty segment,
# which pg_switch_wal() would not switch.
EMPTY_SEGMENT_OFFSET = 64


def _optional(conn, sql: str, args=None):
    """First row, or None when the role may not see it (a fact, not an error)."""
    try:
        return query_one(conn, sql, args)
    except psycopg2.Error:
        return None


def _optional_all(conn, sql: str, args=None):
    try:
        return query_all(conn, sql, args)
    except psycopg2.Error:
        return None


def _int(value):
    return int(value) if value not in (None, "") else None


def gather(conn) -> dict:
    """Every fact, read-only."""
    num, text = server_version(conn)
    major = major_of(num)
    settings = archiving_settings(conn, major)
    # pg_settings hides data_directory from roles without pg_read_all_settings.
    more = dict(
        query_all(
            conn,
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            (["full_page_writes", "wal_segment_size", "data_directory"],),
        )
    )
    facts = {
        "server_version": text,
        "server_version_num": num,
        "in_recovery": settings["in_recovery"],
        "wal_level": settings["wal_level"],
        "archive_mode": settings["archive_mode"],
        "archive_command": settings["archive_command"],
        "archive_library": settings["archive_library"],
        "archive_timeout": _int(settings["archive_timeout"]),
        "full_page_writes": more.get("full_page_writes") == "on" if more.get("full_page_writes") else None,
        "wal_segment_size": _int(more.get("wal_segment_size")),
        "data_directory": more.get("data_directory"),
        "archiver": archiver_row(conn),
        "ready_count": ready_count(conn),
    }
    row = _optional(conn, "SELECT system_identifier::text FROM pg_control_system()")
    facts["system_identifier"] = row[0] if row else None
    facts["privileges"] = privileges(conn, major, facts["data_directory"] is not None)
    facts.update(sizes(conn))
    return facts


def privileges(conn, major: int, can_read_data_directory: bool) -> dict:
    role, superuser = query_one(conn, "SELECT current_user::text, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)")

    def can(signature: str):
        row = _optional(conn, "SELECT has_function_privilege(%s, 'EXECUTE')", (signature,))
        return bool(row[0]) if row else False

    return {
        "role": role,
        "superuser": bool(superuser),
        # Superusers pass has_function_privilege for everything.
        "can_start_backup": all(can(s) for s in backup_function_signatures(major)) if major >= MIN_MAJOR else None,
        "can_switch_wal": can("pg_switch_wal()"),
        "can_read_data_directory": can_read_data_directory,
        "can_read_archive_status": can("pg_ls_archive_statusdir()") if major >= MIN_MAJOR else False,
    }


def sizes(conn) -> dict:
    tablespaces = [
        {"oid": oid, "name": name, "location": location, "size_bytes": None}
        for oid, name, location in query_all(
            conn,
            "SELECT oid, spcname::text, pg_tablespace_location(oid) FROM pg_tablespace"
            " WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY spcname",
        )
    ]
    row = _optional(conn, "SELECT sum(pg_database_size(oid))::bigint FROM pg_database")
    db_bytes = row[0] if row else None
    # pg_database_size already counts a database's files in every tablespace, so
    # the backup's size is the sum over tablespaces (with pg_global), not db + tablespaces.
    ts_sizes = _optional_all(conn, "SELECT oid, pg_tablespace_size(oid) FROM pg_tablespace")
    expected = db_bytes
    if ts_sizes is not None:
        by_oid = dict(ts_sizes)
        for t in tablespaces:
            t["size_bytes"] = by_oid.get(t["oid"])
        expected = sum(by_oid.values())
    return {"tablespaces": tablespaces, "database_size_bytes": db_bytes, "expected_backup_bytes": expected}


def skip_reason(facts: dict, prove_wanted: bool, check_mode: bool) -> str | None:
    """Why the proof must not run, or None."""
    if not prove_wanted:
        return "prove is false"
    if major_of(facts["server_version_num"]) < MIN_MAJOR:
        return f"PostgreSQL {facts['server_version']} is not supported"
    if facts["in_recovery"]:
        return (
            "the server is a standby: WAL cannot be switched during recovery, so the settings were checked instead "
            "(prove archiving on the primary)"
        )
    if facts["wal_level"] == "minimal" or not archiving_active(facts) or command_problem(facts):
        return "WAL archiving is not set up (see problems), a proof could not succeed"
    if not facts["privileges"]["can_switch_wal"]:
        return f"role {facts['privileges']['role']} may not execute pg_switch_wal()"
    if check_mode:
        return "check mode: the proof switches WAL"
    return None


def prove(conn, facts: dict, timeout: float) -> tuple:
    """Switch WAL and wait for that segment: (proof, latest pg_stat_archiver row)."""
    seg_size = facts["wal_segment_size"]
    sql = "SELECT pg_current_wal_insert_lsn()::text, pg_walfile_name(pg_current_wal_insert_lsn())"
    before_text, walname = query_one(conn, sql)
    timeline = int(walname[:8], 16)
    before = parse_lsn(before_text)
    # Read before the switch: a failure counted after it belongs to this proof.
    baseline = archiver_row(conn)
    if before % seg_size <= EMPTY_SEGMENT_OFFSET:
        # Nothing written since the last switch: write a record that creates no object.
        try:
            query_one(conn, "SELECT pg_logical_emit_message(false, 'pgops.online_backup', 'archive proof')::text")
        except psycopg2.Error:
            pass  # then the switch below may do nothing, which the result says
    t0 = time.monotonic()
    lsn = parse_lsn(query_one(conn, "SELECT pg_switch_wal()::text")[0])
    # pg_switch_wal() returns the end of the switch record, or the insert position
    # when there was nothing to switch. The finished segment holds the byte before
    # it; computed here because pg_walfile_name() changed at a boundary in 17.
    wal = wal_file_name(timeline, lsn, seg_size, previous=True)
    res = wait_for_segment_or_failure(conn, wal, timeout, baseline.get("failed_count") or 0)
    proof = {
        "performed": True,
        "skipped_reason": None,
        "wal": wal,
        "lsn": format_lsn(lsn),
        "switched": lsn > before,
        "seconds": round(time.monotonic() - t0, 3),
        "timeout": timeout,
        "archived": res["archived"],
        "outcome": res["outcome"],
    }
    return proof, res["archiver"]


def check_destination(facts: dict, path: str | None, space_margin: float, warn) -> None:
    if path is None:
        return
    dest = inspect_destination(path, facts["data_directory"], facts["tablespaces"], facts["expected_backup_bytes"], space_margin)
    facts["destination"] = dest
    if not dest["absolute"]:
        return
    role = facts["privileges"]["role"]
    if facts["data_directory"] is None:
        warn(
            f"role {role} may not read data_directory (needs superuser or pg_read_all_settings): "
            f"could not check that {path} is outside the data directory"
        )
    if facts["expected_backup_bytes"] is None:
        warn(f"role {role} may not read the database sizes: could not check the free space at {path}")


class InspectError(Exception):
    """The server could not be read (stage says which step failed)."""


def inspect(
    conn,
    prove_wanted: bool = True,
    prove_timeout: float = 60,
    destination: str | None = None,
    space_margin: float = 1.1,
    require_privileges: bool = True,
    check_mode: bool = False,
    warn=None,
) -> dict:
    """Every fact an online backup depends on, the archive proof, and the
    problems found (facts["problems"]). Changes nothing but the proof's WAL switch."""
    stage = "could not read the server's archiving facts"
    try:
        facts = gather(conn)
        reason = skip_reason(facts, prove_wanted, check_mode)
        if reason is None:
            stage = "the archive proof could not run"
            facts["proof"], facts["archiver"] = prove(conn, facts, prove_timeout)
            facts["ready_count"] = ready_count(conn)
        else:
            facts["proof"] = {
                "performed": False, "skipped_reason": reason, "wal": None, "lsn": None, "switched": False,
                "seconds": None, "timeout": prove_timeout, "archived": None, "outcome": None,
            }  # fmt: skip
    except psycopg2.Error as e:
        raise InspectError(f"{stage}: {error_text(e)}") from None
    check_destination(facts, destination, space_margin, warn or (lambda msg: None))
    problems = evaluate(facts, prove=prove_wanted, require_privileges=require_privileges)
    facts.update(problems=problems, ok=not problems)
    return facts


def inspect_for_module(module, destination: str | None, application_name: str, fail_prefix: str = "") -> dict:
    """inspect() with a module's connection and its prove, prove_timeout and
    space_margin options; bad values and an unreadable server fail the module."""
    p = module.params
    for name in ("prove_timeout", "space_margin"):
        if p[name] <= 0:
            module.fail_json(msg=f"{fail_prefix}{name} must be greater than 0, got {p[name]:g}")
    conn = connect_or_fail(module, application_name=application_name)
    try:
        return inspect(
            conn,
            prove_wanted=p["prove"],
            prove_timeout=p["prove_timeout"],
            destination=destination,
            space_margin=p["space_margin"],
            require_privileges=p.get("require_privileges", True),
            check_mode=module.check_mode,
            warn=module.warn,
        )
    except InspectError as e:
        module.fail_json(msg=f"{fail_prefix}{e}")
    finally:
        conn.close()
