# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pre-flight checks: turn the facts gathered about a server into problems.

evaluate() and destination_problems() are pure: facts in, a list of
{code, message, hint} out, so unit tests reach every rule without a server.
inspect_destination() is the only part that looks at the file system.
"""

from __future__ import annotations

import datetime
import os

from ._backup_api import MIN_MAJOR, backup_function_signatures, grant_statements, major_of, quote_ident
from ._files import existing_ancestor, path_inside

# Stable problem codes: playbooks and monitoring match on them.
CODES = (
    "server_too_old",
    "wal_level_minimal",
    "archive_mode_off",
    "standby_archive_mode_not_always",
    "archive_command_empty",
    "both_command_and_library",
    "archiver_failing",
    "archive_proof_failed",
    "archive_proof_timeout",
    "archive_proof_not_switched",
    "standby_primary_unreachable",
    "missing_backup_privilege",
    "cannot_switch_wal",
    "destination_not_absolute",
    "destination_inside_data_directory",
    "destination_inside_tablespace",
    "destination_insufficient_space",
    "archive_backlog",
    "archive_stale",
)

RELOAD = "then reload the configuration (SELECT pg_reload_conf(); no restart needed)"
RESTART = "then restart PostgreSQL ({what} only takes effect at server start; a reload is not enough)"


def make_problem(code: str, message: str, hint: str) -> dict:
    if code not in CODES:
        raise AssertionError(code)
    return {"code": code, "message": message, "hint": hint}


def format_problems(problems: list) -> str:
    """Every problem on one line each: 'code: message; hint'."""
    return "\n".join(f"{p['code']}: {p['message']}; {p['hint']}" for p in problems)


def mb(value: float) -> str:
    return f"{value / 1048576:,.1f} MB"


def archiving_active(facts: dict) -> bool:
    """This server itself archives WAL (a standby only with archive_mode=always)."""
    mode = facts.get("archive_mode")
    return mode == "always" or (mode == "on" and not facts.get("in_recovery"))


def command_problem(facts: dict) -> dict | None:
    """archive_command / archive_library, once archiving is active."""
    major = major_of(facts.get("server_version_num") or 0)
    command = facts.get("archive_command")
    library = facts.get("archive_library") or ""
    if major >= 16 and command and library:
        return make_problem(
            "both_command_and_library",
            f"both archive_command ({command!r}) and archive_library ({library!r}) are set: PostgreSQL 16 and newer "
            "refuse this combination, the archiver stops with FATAL and no WAL is archived",
            f"keep only one of them, e.g. ALTER SYSTEM SET archive_command = ''; or ALTER SYSTEM RESET archive_library; {RELOAD}",
        )
    # None means the setting was not readable: unknown, not empty.
    if command == "" and not library:
        ready = facts.get("ready_count")
        piling = f" ({ready} WAL file(s) already wait in pg_wal)" if ready else ""
        alt = " or archive_library" if major >= 15 else ""
        nolib = " and archive_library is not set" if alt else ""
        return make_problem(
            "archive_command_empty",
            f"archive_mode is {facts.get('archive_mode')} but archive_command is empty{nolib}: "
            f"finished WAL segments pile up in pg_wal and are never archived{piling}, so a backup's stop would wait forever",
            f"set archive_command{alt}, e.g. ALTER SYSTEM SET archive_command = "
            "'test ! -f /path/to/archive/%f && cp %p /path/to/archive/%f'; "
            f"{RELOAD}",
        )
    return None


def _describe_archiver(row: dict, ready, with_failure: bool = True) -> str:
    parts = [
        f"last archived {row.get('last_archived_wal')} at {row.get('last_archived_time')}"
        if row.get("last_archived_wal")
        else "nothing archived since the statistics were reset"
    ]
    if with_failure and row.get("last_failed_wal"):
        parts.append(f"last failure {row.get('last_failed_wal')} at {row.get('last_failed_time')}")
    parts.append(f"failed_count {row.get('failed_count') or 0}")
    if ready is not None:
        parts.append(f"{ready} WAL file(s) waiting for the archiver")
    return "; ".join(parts)


FIX_ARCHIVER = (
    "look for 'archive command failed' in the server log, run archive_command by hand as the PostgreSQL OS user "
    "with %p and %f filled in for that segment, and check the archive destination (exists, writable, not full); "
    f"after changing archive_command, {RELOAD.replace('then ', '')}"
)


def archiver_problem(facts: dict) -> dict | None:
    """The proof's outcome, or pg_stat_archiver when there was no proof."""
    proof = facts.get("proof") or {}
    row = facts.get("archiver") or {}
    ready = facts.get("ready_count")
    if proof.get("outcome") == "no_primary":
        return make_problem(
            "standby_primary_unreachable",
            f"the standby's archiving could not be proven: {proof.get('skipped_reason')}",
            "a standby cannot switch WAL, so its primary does, for the proof and at the backup's stop: set "
            "pg_backup_primary_host/_port/_login_user (the primary option), or let the primary accept this role from "
            "this host (the host and port come from primary_conninfo)",
        )
    if proof.get("performed"):
        outcome = proof.get("outcome")
        if outcome == "archived" and proof.get("switched") is False:
            return make_problem(
                "archive_proof_not_switched",
                f"the proof could not switch WAL: nothing was written since the last switch and the role could write no "
                f"WAL record, so {proof.get('wal')} is an older segment and proves nothing about archive_command now",
                "grant EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) to the role, or run again once the "
                "server has written some WAL",
            )
        if outcome == "archived":
            return None  # archiving works now, whatever failed before
        if outcome == "failed":
            failed, wal = row.get("last_failed_wal"), proof.get("wal")
            what = (
                f"the proof segment {wal}"
                if (failed or "")[:24] == wal
                else f"{failed}, which comes before the proof segment {wal} and holds it up"
            )
            return make_problem(
                "archive_proof_failed",
                f"WAL archiving does not work: {proof.get('seconds')}s after the WAL switch the archiver failed to archive "
                f"{what} ({_describe_archiver(row, ready, with_failure=False)}); a backup's stop would wait forever",
                FIX_ARCHIVER,
            )
        return make_problem(
            "archive_proof_timeout",
            f"the proof WAL segment {proof.get('wal')} was not archived within {proof.get('timeout')}s and the archiver "
            f"reported no failure ({_describe_archiver(row, ready)}): archiving is stuck or slower than the WAL is written",
            "check the server log and how long archive_command takes per segment, and the backlog of .ready files "
            "in pg_wal/archive_status; if archiving is only slow, raise prove_timeout",
        )
    if archiver_failing(row):
        return make_problem(
            "archiver_failing",
            f"the WAL archiver is failing: its last attempt, for {row.get('last_failed_wal')}, failed at "
            f"{row.get('last_failed_time')} and nothing was archived after that "
            f"({_describe_archiver(row, ready, with_failure=False)})",
            FIX_ARCHIVER,
        )
    return None


def _when(value):
    # Compare instants, not strings: the offsets of two timestamps differ across a DST change.
    try:
        return datetime.datetime.fromisoformat(value) if isinstance(value, str) else value
    except ValueError:
        return value


def archiver_failing(row: dict) -> bool:
    """The archiver's last attempt failed: a failure newer than the last success."""
    failed = row.get("last_failed_time")
    if not failed:
        return False
    archived = row.get("last_archived_time")
    return archived is None or _when(failed) > _when(archived)


def privilege_problems(facts: dict, prove: bool, require_privileges: bool) -> list:
    privs = facts.get("privileges") or {}
    major = major_of(facts.get("server_version_num") or 0)
    role = privs.get("role") or "backup_role"
    # pg_switch_wal only matters for the proof, and a standby cannot switch at all.
    needs_switch = prove and not facts.get("in_recovery") and privs.get("can_switch_wal") is False
    out = []
    if require_privileges and privs.get("can_start_backup") is False:
        grants = " ".join(grant_statements(major, role, switch_wal=needs_switch))
        funcs = " and ".join(backup_function_signatures(major))
        also = " nor pg_switch_wal() (needed for the archive proof)" if needs_switch else ""
        out.append(
            make_problem(
                "missing_backup_privilege",
                f"role {quote_ident(role)} is not a superuser and may not execute {funcs}{also}, "
                "so it cannot start or stop an online backup",
                f"as a superuser run: {grants} (takes effect at once, no reload or restart)",
            )
        )
    elif needs_switch:
        out.append(
            make_problem(
                "cannot_switch_wal",
                f"role {quote_ident(role)} may not execute pg_switch_wal(), so the archive proof cannot switch WAL "
                "to show that a finished segment gets archived",
                f"as a superuser run: GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {quote_ident(role)}; "
                "or check the settings only, without the proof "
                "(pgops.online_backup.pg_archiving_info, or pg_backup_preflight_prove: false)",
            )
        )
    return out


def evaluate(facts: dict, prove: bool = True, require_privileges: bool = True) -> list:
    """Every problem the facts show, in the order a DBA would fix them."""
    problems = []
    num = facts.get("server_version_num") or 0
    if num and major_of(num) < MIN_MAJOR:
        problems.append(
            make_problem(
                "server_too_old",
                f"PostgreSQL {facts.get('server_version')} is older than {MIN_MAJOR}, "
                "the oldest release this collection supports",
                f"upgrade the cluster to PostgreSQL {MIN_MAJOR} or newer (pg_upgrade, or dump and restore)",
            )
        )
    if facts.get("wal_level") == "minimal":
        problems.append(
            make_problem(
                "wal_level_minimal",
                "wal_level is minimal: the WAL lacks what is needed to restore an online backup, "
                "and PostgreSQL refuses to start one ('WAL level not sufficient for making an online backup')",
                "set wal_level = replica (or logical), together with archive_mode = on and an archive_command, e.g. "
                "ALTER SYSTEM SET wal_level = 'replica'; " + RESTART.format(what="wal_level"),
            )
        )
    mode = facts.get("archive_mode")
    if facts.get("in_recovery"):
        if mode != "always":
            problems.append(
                make_problem(
                    "standby_archive_mode_not_always",
                    f"this server is a standby with archive_mode = {mode}: a standby archives WAL only with "
                    "archive_mode = always, so a backup taken here cannot make sure the WAL it needs reaches the archive",
                    "on the standby set archive_mode = always with an archive_command that writes to the archive "
                    "(ALTER SYSTEM SET archive_mode = 'always'), "
                    + RESTART.format(what="archive_mode")
                    + "; or take the backup from the primary",
                )
            )
    elif mode == "off":
        problems.append(
            make_problem(
                "archive_mode_off",
                "archive_mode is off: finished WAL segments are never archived, so the WAL needed to restore "
                "a backup would not be kept",
                "set archive_mode = on and an archive_command (or archive_library), e.g. ALTER SYSTEM SET archive_mode = 'on'; "
                "ALTER SYSTEM SET archive_command = 'test ! -f /path/to/archive/%f && cp %p /path/to/archive/%f'; "
                + RESTART.format(what="archive_mode")
                + "; archive_command alone would only need a reload",
            )
        )
    if archiving_active(facts) and facts.get("wal_level") != "minimal":
        problem = command_problem(facts)
        if problem is None:
            problem = archiver_problem(facts)
        if problem:
            problems.append(problem)
    if num and major_of(num) >= MIN_MAJOR:
        problems.extend(privilege_problems(facts, prove, require_privileges))
    problems.extend(destination_problems(facts.get("destination")))
    problems.extend(guard_problems(facts.get("guard")))
    return problems


def guard_problems(guard: dict | None) -> list:
    """The archive guard: a backlog or an age past the thresholds the user set (0 is off)."""
    if not guard:
        return []
    out = []
    ready, limit = guard.get("ready_count"), guard.get("backlog_max") or 0
    wal = guard.get("pg_wal_bytes")
    disk = f"; pg_wal holds {mb(wal)} (max_wal_size {mb(guard.get('max_wal_size_bytes') or 0)})" if wal is not None else ""
    if limit and ready is not None and ready > limit:
        out.append(
            make_problem(
                "archive_backlog",
                f"{ready} WAL segment(s) ({mb(guard.get('ready_bytes') or 0)}) wait for the archiver, more than "
                f"archive_backlog_max ({limit}){disk}: they stay in pg_wal until archived, and pg_wal fills its disk",
                "see why archiving is slow or failing (pg_stat_archiver, the server log, the archive's free space and "
                f"reachability); the archiver works in order, so the oldest waiting segment is the one to look at; {RELOAD}"
                " after changing archive_command",
            )
        )
    age, age_max = guard.get("seconds_since_last_archived"), guard.get("age_max") or 0
    if age_max and ready and age is not None and age > age_max:
        out.append(
            make_problem(
                "archive_stale",
                f"nothing was archived for {int(age)}s (archive_age_max {age_max}s) while {ready} segment(s) wait{disk}",
                FIX_ARCHIVER,
            )
        )
    return out


# -- destination


def resolve(path: str) -> str:
    """realpath of the nearest existing ancestor, plus the parts not created yet."""
    path = os.path.abspath(path)
    base = existing_ancestor(path)
    rest = os.path.relpath(path, base)
    real = os.path.realpath(base)
    return real if rest == "." else os.path.join(real, rest)


def inspect_destination(path: str, data_directory: str | None, tablespaces: list, expected_bytes, margin: float) -> dict:
    """File-system facts about a backup destination on this host."""
    out = {"path": path, "absolute": os.path.isabs(path)}
    if not out["absolute"]:
        return out
    base = existing_ancestor(path)
    st = os.statvfs(base)
    out.update(
        existing_parent=base,
        resolved=resolve(path),
        free_bytes=st.f_bavail * st.f_frsize,  # what an unprivileged writer may use
        expected_bytes=expected_bytes,
        required_bytes=int(expected_bytes * margin) if expected_bytes is not None else None,
        space_margin=margin,
        data_directory=resolve(data_directory) if data_directory else None,
        tablespaces=[dict(t, resolved=resolve(t["location"])) for t in tablespaces if os.path.isabs(t.get("location") or "")],
    )
    return out


def destination_problems(dest: dict | None) -> list:
    if not dest:
        return []
    path = dest["path"]
    if not dest.get("absolute"):
        return [
            make_problem(
                "destination_not_absolute",
                f"destination {path!r} is not an absolute path: it would depend on the directory the task happens to run in",
                "give the backup destination as an absolute path, e.g. /var/backups/postgresql",
            )
        ]
    out = []
    resolved = dest.get("resolved") or path
    datadir = dest.get("data_directory")
    if datadir and path_inside(resolved, datadir):
        out.append(
            make_problem(
                "destination_inside_data_directory",
                f"destination {path} (resolves to {resolved}) is inside the data directory {datadir}: the backup "
                "would copy itself and fill the cluster's own disk, and PostgreSQL does not expect foreign files there",
                "choose a destination outside the data directory, preferably on another file system or host",
            )
        )
    for ts in dest.get("tablespaces") or []:
        if path_inside(resolved, ts["resolved"]):
            out.append(
                make_problem(
                    "destination_inside_tablespace",
                    f"destination {path} (resolves to {resolved}) is inside tablespace {ts['name']} at {ts['location']}: "
                    "the backup would copy itself and fill the tablespace's disk",
                    "choose a destination outside the data directory and every tablespace",
                )
            )
    required = dest.get("required_bytes")
    free = dest.get("free_bytes")
    if required is not None and free is not None and free < required:
        out.append(
            make_problem(
                "destination_insufficient_space",
                f"destination {path} has {mb(free)} free on {dest.get('existing_parent')}, but the backup needs about "
                f"{mb(required)} ({dest.get('space_margin')} x {mb(dest.get('expected_bytes') or 0)} "
                "of databases and tablespaces)",
                "free space at the destination or choose a larger one; compression shrinks the backup, "
                "and a smaller space_margin accepts a tighter fit",
            )
        )
    return out
