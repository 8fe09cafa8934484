#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_backup_session_info
short_description: List the backup sessions held on a host
version_added: 0.1.0
description:
  - Lists the sessions of M(pgops.online_backup.pg_backup_session) in O(runtime_dir) - starting, running, stopped,
    ended - with whether each keeper process is alive, whether the session is stale (its keeper is gone), its lease,
    and what it waits for (the start's checkpoint, the stop, the WAL archive, or nobody).
  - Live keepers are asked for their current state; asking does not count as word from the run, so it never extends
    a lease. Nothing is changed, ever.
  - A session that starts says how long its start has waited for the checkpoint; a running one whose copy runs says
    how far the copy is (RV(sessions[].progress)).
  - Label contents are never listed.
author:
  - pgops.online_backup contributors (@pgops)
extends_documentation_fragment:
  - pgops.online_backup.attributes
attributes:
  check_mode:
    support: full
    details: Read-only; runs the same in check mode.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  runtime_dir:
    description:
      - Directory of the keepers' sockets and state files, as given to M(pgops.online_backup.pg_backup_session).
      - Defaults to C(~/.pgops_online_backup/sessions) of the user the module runs as.
    type: path
  session_id:
    description:
      - Only this session.
    type: str
  label:
    description:
      - Only sessions with this label.
    type: str
  status:
    description:
      - Only sessions in these statuses.
    type: list
    elements: str
    choices: [starting, running, stopped, aborted, expired, lost, failed]
notes:
  - Run it as the OS user that runs the backups (the same C(become_user)), since each user has its own sessions.
seealso:
  - module: pgops.online_backup.pg_backup_session
"""

EXAMPLES = r"""
- name: What backup sessions does this host hold?
  pgops.online_backup.pg_backup_session_info:
  register: sessions

- name: Abort every session whose run is gone
  pgops.online_backup.pg_backup_session:
    state: aborted
    session_id: "{{ item.session_id }}"
  loop: "{{ sessions.sessions | selectattr('status', 'equalto', 'running') | list }}"
  when: item.seconds_since_contact | default(0) > 600
"""

RETURN = r"""
sessions:
  description: The sessions, oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    session_id:
      description: The session's id.
      type: str
    label:
      description: The backup label.
      type: str
    cluster:
      description: The server it is connected to (host or socket directory, and port).
      type: str
    status:
      description: V(starting), V(running), V(stopped), V(aborted), V(expired), V(lost) or V(failed).
      type: str
    reason:
      description: Why it ended.
      type: str
    alive:
      description: The keeper process still runs.
      type: bool
    stale:
      description: Starting or running, but its keeper is gone (the server has ended the backup).
      type: bool
    waiting_for:
      description: What the session waits for now, or null once it is finished.
      type: str
    lease:
      description: Seconds of silence from its run after which the keeper ends the backup (0 is off).
      type: int
    seconds_since_contact:
      description: Seconds since the run last spoke to the keeper (running sessions).
      type: float
    start_stage:
      description:
        - While the session starts, what the start does - V(connect), V(checkpoint) (PostgreSQL's start function waits
          for its checkpoint) or V(wal summaries) (an incremental backup's changed blocks are read).
      type: str
    start_waiting_seconds:
      description: While the session starts, seconds since the checkpoint was requested.
      type: float
    fast:
      description: Whether the start asked for a fast (immediate) checkpoint instead of a spread one.
      type: bool
    progress:
      description:
        - While a M(pgops.online_backup.pg_backup_copy) of the session runs, how far it is (updated every second) -
          C(bytes_done) and C(bytes_expected) (of the cluster's files), C(percent), C(rate_bytes_per_second) (over the
          last seconds), C(eta_seconds), C(seconds) so far, C(phase) (C(copying), C(staging the changed blocks),
          C(checksums), C(flushing to disk)), C(started_at), C(updated_at) and C(pid) (the copy's process).
      type: dict
    started_at:
      description: When the start function returned.
      type: str
    expires_at:
      description: When max_duration ends the backup.
      type: str
  sample:
    - session_id: 20261129T101500Z
      label: nightly
      cluster: /var/run/postgresql:5432
      status: running
      alive: true
      stale: false
      waiting_for: the stop (the copy runs meanwhile)
      lease: 300
      seconds_since_contact: 1.2
      progress:
        bytes_done: 851837746
        bytes_expected: 1669339136
        percent: 51.0
        rate_bytes_per_second: 421612339
        eta_seconds: 1.9
        phase: copying
runtime_dir:
  description: The directory that was read.
  returned: always
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._sessions import default_runtime_dir, list_sessions

STATUSES = ["starting", "running", "stopped", "aborted", "expired", "lost", "failed"]


def main():
    module = AnsibleModule(
        argument_spec=dict(
            runtime_dir=dict(type="path"),
            session_id=dict(type="str"),
            label=dict(type="str"),
            status=dict(type="list", elements="str", choices=STATUSES),
        ),
        supports_check_mode=True,
    )
    p = module.params
    runtime_dir = p["runtime_dir"] or default_runtime_dir()
    if not os.path.isabs(runtime_dir):
        module.fail_json(msg=f"runtime_dir must be an absolute path, got {runtime_dir}")
    sessions = [
        s
        for s in list_sessions(runtime_dir, ask=True)
        if (not p["session_id"] or s.get("session_id") == p["session_id"])
        and (not p["label"] or s.get("label") == p["label"])
        and (not p["status"] or s.get("status") in p["status"])
    ]
    live = sum(1 for s in sessions if s.get("alive"))
    module.exit_json(
        changed=False,
        sessions=sessions,
        runtime_dir=runtime_dir,
        msg=f"{len(sessions)} session(s) in {runtime_dir}, {live} with a live keeper",
    )


if __name__ == "__main__":
    main()
