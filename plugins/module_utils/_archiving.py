# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""WAL archiving on a server: its settings, the archiver's state, waiting for
segments, the facts an online backup depends on, and the active proof that
archiving works. _preflight judges the facts (pure rules); this file reads
them. Only prove() changes anything (it switches WAL)."""

from __future__ import annotations

import os
import re
import shlex
import time

from ._backup_api import MIN_MAJOR, backup_function_signatures, format_lsn, major_of, parse_lsn, wal_file_name, wal_name_le
from ._errors import PgopsError
from ._postgres import (
    PRIMARY_SPEC,
    cluster_key,
    connect,
    connect_or_fail,
    connection_kwargs,
    error_text,
    postgres_common_argument_spec,
    primary_params,
    psycopg2,
    query_all,
    query_dicts,
    query_one,
    server_version,
)
from ._preflight import archiver_failing, archiving_active, command_problem, evaluate, format_problems, inspect_destination


def _iso(value):
    return value.isoformat() if hasattr(value, "isoformat") else value


def archiver_row(conn) -> dict:
    row = query_dicts(
        conn,
        "SELECT archived_count, last_archived_wal, last_archived_time, failed_count,"
        " last_failed_wal, last_failed_time, stats_reset FROM pg_stat_archiver",
    )[0]
    return {k: _iso(v) for k, v in row.items()}


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


def wait_for_segment_or_failure(
    conn, name: str, timeout: float, failed_count: int, first_poll: float = 0.01, patient: bool = False
) -> dict:
    """Wait until WAL file name is archived, the archiver fails, or timeout seconds pass.

    failed_count is pg_stat_archiver.failed_count read before name was
    switched: a failure counted after that, with nothing archived since, means
    the archiver is stuck at name or before it (it works in order), so waiting
    longer cannot help. outcome is "archived", "failed" or "timeout".
    patient: a failure does not end the wait (a standby sharing its primary's archive may fail
    while the primary's copy of the same file is still being written, then succeed on retry);
    a failure still standing at the timeout is "failed".
    """
    begin = time.monotonic()
    delay = first_poll
    while True:
        row = archiver_row(conn)
        status = _status_files(conn, [name])
        waited = time.monotonic() - begin
        failing = (row.get("failed_count") or 0) > failed_count and archiver_failing(row)
        if archived(name, status, row):
            outcome = "archived"
        elif failing and not patient:
            outcome = "failed"
        elif waited >= timeout:
            outcome = "failed" if failing else "timeout"
        else:
            time.sleep(min(delay, max(0.0, timeout - waited)))
            delay = min(delay * 2, 0.25)
            continue
        return {"outcome": outcome, "archived": outcome == "archived", "waited": round(waited, 3), "archiver": row}


# After a switch the insert position sits just past the new segment's long page
# header (40 bytes); anything at or below this offset means an empty segment,
# which pg_switch_wal() would not switch.
EMPTY_SEGMENT_OFFSET = 64
WAL_SEGMENT_RE = re.compile(r"^[0-9A-F]{24}(\.(gz|zst|lz4))?$")


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
        "archive_age_recipients": age_recipients(settings["archive_command"]),
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
    facts["guard"] = guard_facts(conn, facts)
    return facts


def age_recipients(command: str | None) -> list | None:
    """The public keys pgops-wal encrypts WAL for (its --age-recipient arguments), [] when it
    encrypts for none; None when the command is unreadable or not pgops-wal's. The backup role
    compares them with the backups' own: WAL a key cannot decrypt makes that key's restores fail."""
    if not command or "pgops-wal" not in command:
        return None
    try:
        words = shlex.split(command.replace("%%", "\0"))
    except ValueError:
        return None
    words = [w.replace("\0", "%") for w in words]
    found = []
    for i, word in enumerate(words):
        if word == "--age-recipient" and i + 1 < len(words):
            found.append(words[i + 1])
        elif word.startswith("--age-recipient="):
            found.append(word.split("=", 1)[1])
    return found


def guard_facts(conn, facts: dict) -> dict:
    """How far the archiver is behind, read-only: what a disk filling with WAL shows first."""
    row = query_one(
        conn,
        "SELECT EXTRACT(EPOCH FROM now() - last_archived_time)::float8, pg_size_bytes(current_setting('max_wal_size'))"
        " FROM pg_stat_archiver",
    )
    wal = _optional(conn, "SELECT coalesce(sum(size), 0)::bigint FROM pg_ls_waldir()")  # pg_monitor or superuser
    ready = facts["ready_count"]
    seg = facts["wal_segment_size"] or 0
    return {
        "seconds_since_last_archived": round(row[0], 1) if row[0] is not None else None,
        "ready_count": ready,
        "ready_bytes": ready * seg if ready is not None else None,
        "failed_count": facts["archiver"].get("failed_count"),
        "last_failed_wal": facts["archiver"].get("last_failed_wal"),
        "last_failed_time": facts["archiver"].get("last_failed_time"),
        "pg_wal_bytes": wal[0] if wal else None,
        "max_wal_size_bytes": row[1],
    }


def newest_archived(repository: str, system_identifier: str | None):
    """(name, mtime) of the newest WAL segment pgops-wal archived for this cluster in a
    repository on this host, or (None, None)."""
    if not repository or not system_identifier:
        return None, None
    directory = os.path.join(repository, "wal", system_identifier)
    try:
        names = [n for n in os.listdir(directory) if WAL_SEGMENT_RE.match(n)]
    except OSError:
        return None, None
    if not names:
        return None, None
    newest = max(names, key=lambda n: n[:24])
    try:
        return newest[:24], os.stat(os.path.join(directory, newest)).st_mtime
    except OSError:
        return newest[:24], None


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


def skip_reason(facts: dict, prove_wanted: bool, check_mode: bool, via_primary: bool = False) -> str | None:
    """Why the proof must not run, or None. via_primary: a standby's proof switches WAL on its
    primary (the standby cannot) and waits for the standby's own archiver."""
    if not prove_wanted:
        return "not asked for: pg_archiving_info only reads (pg_archiving_check proves archiving by switching WAL)"
    if major_of(facts["server_version_num"]) < MIN_MAJOR:
        return f"PostgreSQL {facts['server_version']} is not supported"
    if facts["in_recovery"] and not via_primary:
        return (
            "the server is a standby: WAL cannot be switched during recovery, so the settings were checked instead "
            "(give the primary option to have the primary switch WAL for the proof)"
        )
    if facts["wal_level"] == "minimal" or not archiving_active(facts) or command_problem(facts):
        return "WAL archiving is not set up (see problems), a proof could not succeed"
    if not facts["in_recovery"] and not facts["privileges"]["can_switch_wal"]:
        return f"role {facts['privileges']['role']} may not execute pg_switch_wal()"
    if check_mode:
        return "check mode: the proof switches WAL"
    return None


def prove(conn, facts: dict, timeout: float, switch_conn=None) -> tuple:
    """Switch WAL and wait for that segment: (proof, latest pg_stat_archiver row). switch_conn: the
    primary of a standby (conn), which switches while the standby's archiver is waited for."""
    seg_size = facts["wal_segment_size"]
    switcher = switch_conn or conn
    sql = "SELECT pg_current_wal_insert_lsn()::text, pg_walfile_name(pg_current_wal_insert_lsn())"
    before_text, walname = query_one(switcher, sql)
    timeline = int(walname[:8], 16)
    before = parse_lsn(before_text)
    # Read before the switch: a failure counted after it belongs to this proof.
    baseline = archiver_row(conn)
    if before % seg_size <= EMPTY_SEGMENT_OFFSET:
        # Nothing written since the last switch: write a record that creates no object.
        try:
            query_one(switcher, "SELECT pg_logical_emit_message(false, 'pgops.online_backup', 'archive proof')::text")
        except psycopg2.Error:
            try:  # an assigned transaction id makes its commit write a record (EXECUTE revoked above)
                query_one(switcher, "SELECT txid_current()")
            except psycopg2.Error:
                pass  # then the switch below may do nothing: the proof says it did not switch
    t0 = time.monotonic()
    lsn = parse_lsn(query_one(switcher, "SELECT pg_switch_wal()::text")[0])
    # pg_switch_wal() returns the end of the switch record, or the insert position
    # when there was nothing to switch. The finished segment holds the byte before
    # it; computed here because pg_walfile_name() changed at a boundary in 17.
    wal = wal_file_name(timeline, lsn, seg_size, previous=True)
    res = wait_for_segment_or_failure(conn, wal, timeout, baseline.get("failed_count") or 0, patient=switch_conn is not None)
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


class InspectError(PgopsError):
    """The server could not be read (stage says which step failed)."""


def inspect(
    conn,
    prove_wanted: bool = True,
    prove_timeout: float | None = 60,
    destination: str | None = None,
    space_margin: float = 1.1,
    require_privileges: bool = True,
    check_mode: bool = False,
    warn=None,
    guard: dict | None = None,
    primary=None,
) -> dict:
    """Every fact an online backup depends on, the archive proof, and the
    problems found (facts["problems"]). Changes nothing but the proof's WAL switch.
    primary: for a standby, a function of the standby's connection that connects to its primary."""
    stage = "could not read the server's archiving facts"
    try:
        facts = gather(conn)
        reason = skip_reason(facts, prove_wanted, check_mode, via_primary=primary is not None)
        if reason is None and facts["in_recovery"]:
            stage = "the archive proof could not switch WAL on the primary"
            try:
                switch_conn = primary(conn)
            except PgopsError as e:  # a problem of the pre-flight (the stop needs this connection too), not a crash
                facts["proof"] = dict(_not_proven(f"the primary could not be reached: {e}", prove_timeout), outcome="no_primary")
            else:
                try:
                    facts["proof"], facts["archiver"] = prove(conn, facts, prove_timeout, switch_conn)
                finally:
                    switch_conn.close()
                facts["proof"]["switched_on"] = "primary"
                facts["ready_count"] = ready_count(conn)
        elif reason is None:
            stage = "the archive proof could not run"
            facts["proof"], facts["archiver"] = prove(conn, facts, prove_timeout)
            facts["ready_count"] = ready_count(conn)
        else:
            facts["proof"] = _not_proven(reason, prove_timeout)
    except psycopg2.Error as e:
        raise InspectError(f"{stage}: {error_text(e)}") from None
    check_destination(facts, destination, space_margin, warn or (lambda msg: None))
    guard = guard or {}
    facts["guard"]["newest_in_repository"], mtime = newest_archived(guard.get("repository"), facts["system_identifier"])
    facts["guard"]["seconds_since_newest_in_repository"] = round(time.time() - mtime, 1) if mtime else None
    facts["guard"].update(backlog_max=guard.get("backlog_max") or 0, age_max=guard.get("age_max") or 0)
    problems = evaluate(facts, prove=prove_wanted, require_privileges=require_privileges)
    facts.update(problems=problems, ok=not problems)
    return facts


def _not_proven(reason: str, timeout) -> dict:
    return {
        "performed": False, "skipped_reason": reason, "wal": None, "lsn": None, "switched": False,
        "seconds": None, "timeout": timeout, "archived": None, "outcome": None,
    }  # fmt: skip


def inspect_for_module(module, application_name: str, prove_wanted: bool, fail_prefix: str = "") -> dict:
    """inspect() with a module's connection and its destination, space_margin,
    require_privileges (and, to prove, prove_timeout) options; bad values and an
    unreadable server fail the module."""
    p = module.params
    for name in ("prove_timeout", "space_margin"):
        if p.get(name) is not None and p[name] <= 0:
            module.fail_json(msg=f"{fail_prefix}{name} must be greater than 0, got {p[name]:g}")
    conn = connect_or_fail(module, application_name=application_name)
    try:
        return inspect(
            conn,
            prove_wanted=prove_wanted,
            prove_timeout=p.get("prove_timeout"),
            destination=p.get("destination"),
            space_margin=p["space_margin"],
            require_privileges=p.get("require_privileges", True),
            check_mode=module.check_mode,
            warn=module.warn,
            guard={
                "repository": p.get("repository"),
                "backlog_max": p.get("archive_backlog_max"),
                "age_max": p.get("archive_age_max"),
            },
            primary=_primary_connector(p, application_name) if p.get("primary") else None,
        )
    except InspectError as e:
        module.fail_json(msg=f"{fail_prefix}{e}")
    finally:
        conn.close()


def _primary_connector(params: dict, application_name: str):
    def connect_primary(standby_conn):
        where = primary_params(params, standby_conn)
        try:
            return connect(connection_kwargs(where, application_name=application_name))
        except psycopg2.Error as e:
            at = f"{where.get('login_host') or where.get('login_unix_socket')}:{where['port']}"
            raise PgopsError(f"unable to connect to the primary ({at}): {error_text(e)}; set the primary option") from None

    return connect_primary


def archiving_argument_spec(prove: bool = False) -> dict:
    """The options of pg_archiving_info (and, with prove, pg_archiving_check)."""
    spec = postgres_common_argument_spec()
    spec.update(
        require_privileges=dict(type="bool", default=True),
        fail_on_problems=dict(type="bool", default=False),
        destination=dict(type="path"),
        space_margin=dict(type="float", default=1.1),
        repository=dict(type="path"),
        archive_backlog_max=dict(type="int", default=0),
        archive_age_max=dict(type="int", default=0),
    )
    if prove:
        spec["prove_timeout"] = dict(type="float", default=60)
        spec["primary"] = PRIMARY_SPEC
    return spec


def report_facts(module, prove_wanted: bool) -> None:
    """pg_archiving_info and pg_archiving_check: gather (and prove), then exit
    or fail with every problem. changed is true only when the proof switched WAL."""
    p = module.params
    what = "pg_archiving_check" if prove_wanted else "pg_archiving_info"
    facts = inspect_for_module(module, f"pgops.online_backup {what}", prove_wanted)
    problems = facts["problems"]
    changed = facts["proof"]["switched"]
    where = cluster_key(p)
    if problems and p["fail_on_problems"]:
        module.fail_json(
            msg=f"{len(problems)} problem(s) on {where}, no backup was started:\n{format_problems(problems)}",
            changed=changed,
            **facts,
        )
    proof = facts["proof"]
    if problems:
        msg = f"{len(problems)} problem(s) on {where}: {', '.join(pr['code'] for pr in problems)}"
    elif proof["performed"]:
        msg = f"WAL archiving works on {where}: segment {proof['wal']} archived {proof['seconds']}s after the switch"
    else:
        msg = f"no problems found on {where} (proof skipped: {proof['skipped_reason']})"
    module.exit_json(changed=changed, msg=msg, **facts)
