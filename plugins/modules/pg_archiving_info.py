#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_archiving_info
short_description: Read what WAL archiving and an online backup depend on, and report what stands in the way
version_added: 0.1.0
description:
  - Gathers what an online backup depends on (version, C(wal_level), C(archive_mode), C(archive_command) or
    C(archive_library), the C(pg_stat_archiver) row, the backlog of C(.ready) segments, data directory,
    tablespaces, database size, privileges) and returns it together with a list of RV(problems).
  - Each problem has a stable C(code), a message a DBA understands and a hint with the fix (the setting to change
    and whether a reload or a restart is needed, or the exact C(GRANT) to run).
  - Strictly read-only, as every C(_info) module, it never switches WAL and never reports a change. To prove that a
    finished segment really gets archived, use M(pgops.online_backup.pg_archiving_check), which switches WAL.
  - Run it before P(pgops.online_backup.pg_backup_session#module) so a broken archive stops the run before backup
    mode is entered.
extends_documentation_fragment:
  - pgops.online_backup.connection
  - pgops.online_backup.archiving
  - pgops.online_backup.attributes
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: Read-only; runs the same in check mode.
  diff_mode:
    support: none
  idempotent:
    support: full
options: {}
notes:
  - Problem codes are V(server_too_old), V(wal_level_minimal), V(archive_mode_off), V(standby_archive_mode_not_always),
    V(archive_command_empty), V(both_command_and_library), V(archiver_failing), V(missing_backup_privilege),
    V(destination_not_absolute), V(destination_inside_data_directory), V(destination_inside_tablespace) and
    V(destination_insufficient_space), and for the archive guard V(archive_backlog) and V(archive_stale);
    M(pgops.online_backup.pg_archiving_check) adds those of its proof.
  - The O(destination) checks compare paths of the managed node with the server's; run the module on the database host.
  - Tested against PostgreSQL 13, 15 and 18 (primary and streaming standby).
seealso:
  - module: pgops.online_backup.pg_archiving_check
  - name: Continuous archiving and point-in-time recovery
    description: PostgreSQL documentation.
    link: https://www.postgresql.org/docs/current/continuous-archiving.html
  - module: pgops.online_backup.pg_backup_session
"""

EXAMPLES = r"""
- name: Stop here when WAL archiving is not set up
  pgops.online_backup.pg_archiving_info:
    login_unix_socket: /var/run/postgresql
    destination: /var/backups/postgresql
    fail_on_problems: true

- name: Check a standby and a dedicated backup role over TCP
  pgops.online_backup.pg_archiving_info:
    login_host: 127.0.0.1
    login_user: backup
    login_password: "{{ vault_backup_password }}"
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
archive_age_recipients:
  description: The public keys the collection's C(pgops-wal) in C(archive_command) encrypts WAL for (empty when it
    stores WAL in clear); null when C(archive_command) is not readable or is not C(pgops-wal).
  returned: always
  type: list
  elements: str
archive_timeout:
  description: The C(archive_timeout) setting in seconds.
  returned: always
  type: int
full_page_writes:
  description: The C(full_page_writes) setting (PostgreSQL forces full-page writes while a backup runs, whatever it says).
  returned: always
  type: bool
archiver:
  description: The C(pg_stat_archiver) row.
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
guard:
  description:
    - The archive guard - how far the archiver is behind, read-only, so that an alert fires long before pg_wal fills
      its disk.
  returned: always
  type: dict
  contains:
    seconds_since_last_archived:
      description: Seconds since the archiver last archived a file (null when it never did).
      type: float
    ready_count:
      description: WAL files waiting for the archiver (null without the privilege to list C(pg_wal/archive_status)).
      type: int
    ready_bytes:
      description: Their size (segments times the segment size).
      type: int
    failed_count:
      description: Failed attempts since the statistics were reset.
      type: int
    last_failed_wal:
      description: The last file the archiver failed on.
      type: str
    last_failed_time:
      description: When.
      type: str
    pg_wal_bytes:
      description: The size of C(pg_wal) (null without C(pg_monitor) or superuser).
      type: int
    max_wal_size_bytes:
      description: C(max_wal_size), for comparison.
      type: int
    newest_in_repository:
      description: With O(repository), the newest segment C(pgops-wal) archived there for this cluster.
      type: str
    seconds_since_newest_in_repository:
      description: With O(repository), how old that file is.
      type: float
    backlog_max:
      description: The O(archive_backlog_max) used.
      type: int
    age_max:
      description: The O(archive_age_max) used.
      type: int
proof:
  description: Always C(performed=false) here, with the C(skipped_reason); M(pgops.online_backup.pg_archiving_check)
    returns the same fields with the proof's outcome.
  returned: always
  type: dict
destination:
  description: What was found about O(destination) (resolved path, free and required bytes).
  returned: when O(destination) is set
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._archiving import archiving_argument_spec, report_facts


def main():
    module = AnsibleModule(argument_spec=archiving_argument_spec(), supports_check_mode=True)
    report_facts(module, prove_wanted=False)


if __name__ == "__main__":
    main()
