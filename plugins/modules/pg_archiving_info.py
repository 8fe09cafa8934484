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

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._inspect import inspect_for_module
from ansible_collections.pgops.online_backup.plugins.module_utils._postgres import (
    cluster_key,
    postgres_common_argument_spec,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._preflight import format_problems


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
    facts = inspect_for_module(module, p["destination"], "pgops.online_backup pg_archiving_info")
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


if __name__ == "__main__":
    main()
