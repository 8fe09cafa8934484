#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_archiving_check
short_description: Prove that WAL archiving works by switching WAL and waiting for the segment
version_added: 0.1.0
description:
  - Reads everything M(pgops.online_backup.pg_archiving_info) reads and judges it the same way, then proves on a
    primary that archiving works. It writes a little WAL (a non-transactional logical message, no objects are
    created), switches to a new WAL segment with C(pg_switch_wal) and waits at most O(prove_timeout) seconds until
    that segment is archived. A failure the archiver reports for it ends the wait at once.
  - The WAL switch is a change to the server, so the task reports C(changed) when it switched WAL.
  - The proof needs C(EXECUTE) on C(pg_switch_wal) (superusers have it); without it V(cannot_switch_wal) is reported.
  - On a standby, which cannot switch WAL, the primary switches it when O(primary) is given (the options it leaves out
    come from the standby's C(primary_conninfo) and this task's connection), and the proof waits for the standby's
    own archiver to archive that segment (C(archive_mode=always) is needed for a standby to archive); that also
    proves the connection to the primary a standby backup's stop needs. There a failure the archiver reports does
    not end the wait (a standby sharing its primary's archive may fail once on a file still being written, then
    succeed on the retry); one still standing at O(prove_timeout) is V(archive_proof_failed). Without O(primary)
    the proof on a standby is replaced by the settings checks. The proof is also skipped when the settings already
    show that archiving cannot work, and in check mode.
  - Returns every fact M(pgops.online_backup.pg_archiving_info) returns (the most used are listed below).
  - Run it before P(pgops.online_backup.pg_backup_session#module), so that a broken archive stops the run before
    backup mode is entered, as the role P(pgops.online_backup.pg_backup#role) does.
extends_documentation_fragment:
  - pgops.online_backup.connection
  - pgops.online_backup.primary
  - pgops.online_backup.archiving
  - pgops.online_backup.attributes
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: Everything is read and judged; the proof is reported as skipped because it switches WAL.
  diff_mode:
    support: none
  idempotent:
    support: none
    details: Every run switches WAL on a primary.
options:
  prove_timeout:
    description:
      - Seconds to wait for the proof segment to be archived.
    type: float
    default: 60
notes:
  - Problem codes are those of M(pgops.online_backup.pg_archiving_info), plus the proof's V(archive_proof_failed),
    V(archive_proof_timeout), V(archive_proof_not_switched) (nothing was written since the last switch and the role
    could write no WAL record, so no new segment was archived; before switching, the module writes a logical message,
    else assigns a transaction id) and, on a standby with O(primary), V(standby_primary_unreachable).
seealso:
  - module: pgops.online_backup.pg_archiving_info
"""

EXAMPLES = r"""
- name: Prove that WAL archiving works, stop here when it does not
  pgops.online_backup.pg_archiving_check:
    login_unix_socket: /var/run/postgresql
    prove_timeout: 120
    destination: /var/backups/postgresql
    fail_on_problems: true
"""

RETURN = r"""
ok:
  description: True when no problem was found.
  returned: always
  type: bool
problems:
  description: What stands in the way of an online backup, each with C(code), C(message) and C(hint).
  returned: always
  type: list
  elements: dict
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
    switched_on:
      description: V(primary) when the standby's primary switched WAL for the proof.
      type: str
      returned: on a standby, when the proof ran
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
server_version_num:
  description: Server version as a number.
  returned: always
  type: int
  sample: 170010
in_recovery:
  description: Whether the server is a standby.
  returned: always
  type: bool
system_identifier:
  description: The cluster's system identifier; null when not readable.
  returned: always
  type: str
data_directory:
  description: The server's data directory; null when the role may not read it.
  returned: always
  type: str
tablespaces:
  description: User tablespaces with V(oid), V(name), V(location) and V(size_bytes).
  returned: always
  type: list
  elements: dict
archiver:
  description: The C(pg_stat_archiver) row after the proof.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._archiving import archiving_argument_spec, report_facts


def main():
    module = AnsibleModule(argument_spec=archiving_argument_spec(prove=True), supports_check_mode=True)
    report_facts(module, prove_wanted=True)


if __name__ == "__main__":
    main()
