#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_archiving_info
short_description: Check that WAL archiving works before an online backup, and report why not
version_added: 0.1.0
description:
  - Gathers what an online backup depends on (version, C(wal_level), C(archive_mode), C(archive_command) or
    C(archive_library), the C(pg_stat_archiver) row, the backlog of C(.ready) segments, data directory,
    tablespaces, database size, privileges) and returns it together with a list of RV(problems).
  - Each problem has a stable C(code), a message a DBA understands and a hint with the fix (the setting to change
    and whether a reload or a restart is needed, or the exact C(GRANT) to run).
  - With O(prove=true) (the default) on a primary it also proves that archiving works. It writes a little WAL
    (a non-transactional logical message, no objects are created), switches to a new WAL segment with
    C(pg_switch_wal) and waits at most O(prove_timeout) seconds until that segment is archived. A failure the
    archiver reports for it ends the wait at once.
  - On a standby, which cannot switch WAL, the proof is replaced by the settings checks
    (C(archive_mode=always) is needed for a standby to archive).
  - Nothing else is changed, and a backup is never started. Run it before
    P(pgops.online_backup.pg_backup_session#module) so a broken archive stops the run before backup mode is entered.
extends_documentation_fragment:
  - pgops.online_backup.connection
  - pgops.online_backup.attributes
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: Everything runs except the proof, which is reported as skipped because it switches WAL.
  diff_mode:
    support: none
  idempotent:
    support: partial
    details: Read-only except for the WAL switch of the proof, which is reported as a change.
options:
  prove:
    description:
      - Prove that archiving works by switching WAL and waiting until the finished segment is archived.
      - Needs C(EXECUTE) on C(pg_switch_wal) (superusers have it). Skipped on a standby, in check mode, and when
        the settings already show that archiving cannot work.
    type: bool
    default: true
  prove_timeout:
    description:
      - Seconds to wait for the proof segment to be archived.
    type: float
    default: 60
  require_privileges:
    description:
      - Report V(missing_backup_privilege) when O(login_user) may not run the backup start and stop functions.
      - Set to V(false) when this role only checks and another role takes the backups.
    type: bool
    default: true
  fail_on_problems:
    description:
      - Fail the task when any problem is found, with every problem (code, message and hint) in one message.
      - The facts are returned either way.
    type: bool
    default: false
  destination:
    description:
      - A backup destination directory on the host the module runs on (it need not exist yet).
      - Checked to be an absolute path, outside the data directory and every tablespace (comparing resolved paths of
        its nearest existing parent), and to have at least O(space_margin) times the size of the databases free.
      - The data directory and tablespace checks need the data directory's location, readable by superusers and
        members of C(pg_read_all_settings); without it they are skipped with a warning.
    type: path
  space_margin:
    description:
      - Factor applied to the size of the databases and tablespaces to get the space O(destination) needs.
    type: float
    default: 1.1
notes:
  - Problem codes are V(server_too_old), V(wal_level_minimal), V(archive_mode_off), V(standby_archive_mode_not_always),
    V(archive_command_empty), V(both_command_and_library), V(archiver_failing), V(archive_proof_failed),
    V(archive_proof_timeout), V(missing_backup_privilege), V(cannot_switch_wal), V(destination_not_absolute),
    V(destination_inside_data_directory), V(destination_inside_tablespace) and V(destination_insufficient_space).
  - The O(destination) checks compare paths of the managed node with the server's; run the module on the database host.
  - Tested against PostgreSQL 13, 15 and 18 (primary and streaming standby).
seealso:
  - name: Continuous archiving and point-in-time recovery
    description: PostgreSQL documentation.
    link: https://www.postgresql.org/docs/current/continuous-archiving.html
  - module: pgops.online_backup.pg_backup_session
"""

EXAMPLES = r"""
- name: Prove that WAL archiving works, stop here when it does not
  pgops.online_backup.pg_archiving_info:
    login_unix_socket: /var/run/postgresql
    prove_timeout: 120
    destination: /var/backups/postgresql
    fail_on_problems: true

- name: Check a standby and a dedicated backup role over TCP without switching WAL
  pgops.online_backup.pg_archiving_info:
    login_host: 127.0.0.1
    login_user: backup
    login_password: "{{ vault_backup_password }}"
    prove: false
  register: archiving

- name: Show what to fix
  ansible.builtin.debug:
    msg: "{{ item.code }}: {{ item.message }}; {{ item.hint }}"
  loop: "{{ archiving.problems }}"
"""

RETURN = r"""
ok:
  description: True when no problem was found.
  returned: always
  type: bool
problems:
  description: What stands in the way of an online backup, in the order to fix it.
  returned: always
  type: list
  elements: dict
  contains:
    code:
      description: Stable identifier of the problem.
      type: str
      sample: archive_mode_off
    message:
      description: What is wrong.
      type: str
    hint:
      description: How to fix it, including whether a reload or restart is needed.
      type: str
  sample:
    - code: archive_command_empty
      message: "archive_mode is on but archive_command is empty and archive_library is not set: ..."
      hint: "set archive_command or archive_library, e.g. ALTER SYSTEM SET archive_command = ...; then reload ..."
server_version:
  description: Server version as text.
  returned: always
  type: str
  sample: "17.10"
server_version_num:
  description: Server version as a number.
  returned: always
  type: int
  sample: 170010
in_recovery:
  description: Whether the server is a standby (C(pg_is_in_recovery)).
  returned: always
  type: bool
wal_level:
  description: The C(wal_level) setting.
  returned: always
  type: str
  sample: replica
archive_mode:
  description: The C(archive_mode) setting (V(off), V(on) or V(always)).
  returned: always
  type: str
archive_command:
  description: The C(archive_command) setting; null when not readable by the role.
  returned: always
  type: str
archive_library:
  description: The C(archive_library) setting (15 and newer); null before 15.
  returned: always
  type: str
archive_timeout:
  description: The C(archive_timeout) setting in seconds.
  returned: always
  type: int
full_page_writes:
  description: The C(full_page_writes) setting (PostgreSQL forces full-page writes while a backup runs, whatever it says).
  returned: always
  type: bool
archiver:
  description: The C(pg_stat_archiver) row (after the proof, when one ran).
  returned: always
  type: dict
  sample:
    archived_count: 12
    last_archived_wal: "00000001000000000000000C"
    last_archived_time: "2026-11-29T10:15:00.123456+00:00"
    failed_count: 0
    last_failed_wal: null
    last_failed_time: null
    stats_reset: "2026-11-01T00:00:00+00:00"
ready_count:
  description: Number of WAL files waiting for the archiver (C(.ready) in C(pg_wal/archive_status)); null without
    the privilege to list that directory (superuser or C(pg_monitor)).
  returned: always
  type: int
data_directory:
  description: The server's data directory; null when the role may not read it.
  returned: always
  type: str
tablespaces:
  description: User tablespaces, each with V(oid), V(name), V(location) and V(size_bytes) (null when not readable).
  returned: always
  type: list
  elements: dict
database_size_bytes:
  description: Total size of all databases (C(pg_database_size), which counts their files in every tablespace);
    null when not readable.
  returned: always
  type: int
expected_backup_bytes:
  description: Size a backup is expected to have; the sum of C(pg_tablespace_size) over all tablespaces
    (including C(pg_default) and C(pg_global)) when readable, else RV(database_size_bytes).
  returned: always
  type: int
privileges:
  description: What the connected role may do.
  returned: always
  type: dict
  contains:
    role:
      description: The connected role.
      type: str
    superuser:
      description: Whether the role is a superuser.
      type: bool
    can_start_backup:
      description: EXECUTE on the backup start and stop functions of this major (null before 12).
      type: bool
    can_switch_wal:
      description: EXECUTE on C(pg_switch_wal).
      type: bool
    can_read_data_directory:
      description: The role may read the C(data_directory) setting (superuser or C(pg_read_all_settings)).
      type: bool
    can_read_archive_status:
      description: EXECUTE on C(pg_ls_archive_statusdir).
      type: bool
system_identifier:
  description: The cluster's system identifier; null when not readable.
  returned: always
  type: str
wal_segment_size:
  description: WAL segment size in bytes.
  returned: always
  type: int
  sample: 16777216
proof:
  description: The active proof.
  returned: always
  type: dict
  contains:
    performed:
      description: Whether the proof ran.
      type: bool
    skipped_reason:
      description: Why it did not run; null when it did.
      type: str
    wal:
      description: The WAL segment that was switched and waited for.
      type: str
    lsn:
      description: Location returned by C(pg_switch_wal).
      type: str
    switched:
      description: Whether a WAL switch happened (this is what C(changed) reports).
      type: bool
    seconds:
      description: Seconds from the switch to the outcome.
      type: float
    timeout:
      description: The O(prove_timeout) used.
      type: float
    archived:
      description: Whether the segment was archived in time; null when the proof did not run.
      type: bool
    outcome:
      description: V(archived), V(failed) (the archiver reported a failure) or V(timeout); null when skipped.
      type: str
destination:
  description: What was found about O(destination) (resolved path, free and required bytes).
  returned: when O(destination) is set
  type: dict
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._archive import (
    archiver_row,
    archiving_settings,
    ready_count,
    wait_for_segment_or_failure,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._backup_api import (
    MIN_MAJOR,
    backup_function_signatures,
    format_lsn,
    major_of,
    parse_lsn,
    wal_file_name,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._postgres import (
    cluster_key,
    connect_or_fail,
    error_text,
    postgres_common_argument_spec,
    psycopg2,
    query_all,
    query_one,
    server_version,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._preflight import (
    archiving_active,
    command_problem,
    evaluate,
    format_problems,
    inspect_destination,
)

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


def skip_reason(module, facts: dict) -> str | None:
    """Why the proof must not run, or None."""
    if not module.params["prove"]:
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
    if module.check_mode:
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


def check_destination(module, facts: dict) -> None:
    path = module.params["destination"]
    if path is None:
        return
    dest = inspect_destination(
        path, facts["data_directory"], facts["tablespaces"], facts["expected_backup_bytes"], module.params["space_margin"]
    )
    facts["destination"] = dest
    if not dest["absolute"]:
        return
    role = facts["privileges"]["role"]
    if facts["data_directory"] is None:
        module.warn(
            f"role {role} may not read data_directory (needs superuser or pg_read_all_settings): "
            f"could not check that {path} is outside the data directory"
        )
    if facts["expected_backup_bytes"] is None:
        module.warn(f"role {role} may not read the database sizes: could not check the free space at {path}")


def main():
    argument_spec = postgres_common_argument_spec()
    argument_spec.update(
        prove=dict(type="bool", default=True),
        prove_timeout=dict(type="float", default=60),
        require_privileges=dict(type="bool", default=True),
        fail_on_problems=dict(type="bool", default=False),
        destination=dict(type="path"),
        space_margin=dict(type="float", default=1.1),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    if p["prove_timeout"] <= 0:
        module.fail_json(msg=f"prove_timeout must be greater than 0, got {p['prove_timeout']:g}")
    if p["space_margin"] <= 0:
        module.fail_json(msg=f"space_margin must be greater than 0, got {p['space_margin']:g}")

    conn = connect_or_fail(module, application_name="pgops.online_backup pg_archiving_info")
    stage = "could not read the server's archiving facts"
    try:
        facts = gather(conn)
        reason = skip_reason(module, facts)
        if reason is None:
            stage = "the archive proof could not run"
            facts["proof"], facts["archiver"] = prove(conn, facts, p["prove_timeout"])
            facts["ready_count"] = ready_count(conn)
        else:
            facts["proof"] = {
                "performed": False, "skipped_reason": reason, "wal": None, "lsn": None, "switched": False,
                "seconds": None, "timeout": p["prove_timeout"], "archived": None, "outcome": None,
            }  # fmt: skip
    except psycopg2.Error as e:
        module.fail_json(msg=f"{stage}: {error_text(e)}")
    finally:
        conn.close()

    check_destination(module, facts)
    problems = evaluate(facts, prove=p["prove"], require_privileges=p["require_privileges"])
    changed = facts["proof"]["switched"]
    facts.update(problems=problems, ok=not problems)
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


if __name__ == "__main__":
    main()
