# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The options pg_archiving_info and pg_archiving_check share (module_utils/_archiving.archiving_argument_spec).
    DOCUMENTATION = r"""
options:
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
  repository:
    description:
      - A backup repository on the host the module runs on, into which C(pgops-wal) archives this cluster's WAL
        (C(<repository>/wal/<system identifier>/)); its newest segment is reported in the archive guard.
    type: path
  archive_backlog_max:
    description:
      - Archive guard - report V(archive_backlog) when more WAL segments than this wait for the archiver (C(.ready)
        files in C(pg_wal/archive_status)). V(0) is off.
    type: int
    default: 0
  archive_age_max:
    description:
      - Archive guard - report V(archive_stale) when segments wait and nothing was archived for more seconds than
        this. An idle server that has nothing to archive is never stale. V(0) is off.
    type: int
    default: 0
"""
