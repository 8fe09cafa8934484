#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_backup_info
short_description: List the PostgreSQL backups of a repository and resolve the latest good one
version_added: 0.1.0
description:
  - Reads the C(backup.json) of every backup directory in a repository of this collection's layout
    (C(<repository>/<backup_id>/backup.json)) and returns them newest first, with the path and the
    space each backup takes on disk.
  - Only C(backup.json) files are read, never the archives. A backup counts as good only when its
    C(backup.json) says C(status) is V(complete); running, failed and unreadable ones are listed but
    never chosen as RV(latest).
  - Verification and drill results recorded by M(pgops.online_backup.pg_backup_manifest) and the drill
    playbook are part of each entry (C(verification), C(drill)).
  - With O(format=table) it also returns RV(table), the same backups as text for people, the way the playbook
    C(pgops.online_backup.list) prints them.
extends_documentation_fragment:
  - pgops.online_backup.attributes
  - pgops.online_backup.s3
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: The module only reads.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  repository:
    description:
      - The backup repository directory.
      - Or C(s3://bucket/prefix), with the O(s3_endpoint) options.
    type: str
    required: true
  backup:
    description:
      - V(latest) for the newest complete backup that is not known to be damaged, or a backup id. Returned as
        RV(backup).
      - A backup whose newest verification (M(pgops.online_backup.pg_backup_manifest)) or restore drill failed is
        known to be damaged - V(latest) skips it with a warning that names it and why, and asking for it by id
        fails - unless O(allow_unverified).
      - The task fails when no such backup exists or it is not complete.
    type: str
  allow_unverified:
    description:
      - Choose a backup whose newest verification or drill failed all the same.
    type: bool
    default: false
  before:
    description:
      - With O(backup=latest), the newest backup that stopped before this time (ISO 8601 with a time zone, e.g.
        C(2026-11-29 10:15:00+00)) - the one a point-in-time recovery to that time starts from.
    type: str
  cluster:
    description:
      - Only the backups of this cluster (its system identifier), in RV(backups) and for O(backup) - in a repository
        several clusters share, V(latest) is then that cluster's newest.
    type: str
  status:
    description:
      - Only list backups with one of these statuses in RV(backups). V(invalid) is a C(backup.json)
        that is not a readable JSON object.
    type: list
    elements: str
    choices: [running, complete, failed, invalid]
  size_on_disk:
    description:
      - Compute each backup's C(size_on_disk) (walks the backup's files; turn off for very
        large repositories).
    type: bool
    default: true
  format:
    description:
      - V(json) returns the catalog as data (RV(backups), RV(latest) and the rest), for machines.
      - V(table) returns the same data and, in RV(table), the backups of RV(backups) as lines of text with fixed-width
        columns - per cluster a heading (its hosts, PostgreSQL version, data directory, how many backups and which one
        a restore of V(latest) takes), then one line per backup, newest first, then notes (the error of a failed
        backup, pins).
      - "The columns of RV(table) are C(id); C(type) (V(full), or C(incr of) the parent's id for an incremental backup;
        a C(backup.json) without C(type) is a full backup); C(status); C(started (UTC)); C(duration) (start to stop,
        like C(2m05s); for a running backup the time so far); C(stored / source) (bytes written to the repository,
        after compression, and bytes of the data directory copied, like C(1.2 GiB)); C(WAL range)
        (C(start_wal .. stop_wal)); C(verified) (the newest manifest verification - C(ok) or C(FAILED) and when);
        C(last drill) (the newest restore drill's result and when)."
    type: str
    choices: [json, table]
    default: json
notes:
  - Backup ids sort by time (for example V(20261129T101500Z)); newest first means the greatest id first.
  - Directories without C(backup.json) and names starting with a dot are not backups and are skipped.
"""

EXAMPLES = r"""
- name: List the backups
  pgops.online_backup.pg_backup_info:
    repository: /backup/pg
  register: catalog

- name: Fail unless a complete backup exists, and use it
  pgops.online_backup.pg_backup_info:
    repository: /backup/pg
    backup: latest
  register: chosen

- name: Show how old the latest good backup is
  ansible.builtin.debug:
    msg: "{{ chosen.backup.id }} stopped at {{ chosen.backup.stopped_at }}"

- name: Only the failed ones
  pgops.online_backup.pg_backup_info:
    repository: /backup/pg
    status: [failed]
  register: failed

- name: Read the backups as a table
  pgops.online_backup.pg_backup_info:
    repository: /backup/pg
    size_on_disk: false
    format: table
  register: listed

- name: Print it (a list of lines prints one line each)
  ansible.builtin.debug:
    msg: "{{ listed.table }}"
"""

RETURN = r"""
backups:
  description:
    - The backups (filtered by O(status)), newest first. Each is the content of its C(backup.json)
      plus C(path) (the backup directory) and C(size_on_disk) (bytes allocated, as C(du -s)).
    - An unreadable C(backup.json) gives an entry with C(status) V(invalid) and an C(error).
  returned: always
  type: list
  elements: dict
  sample:
    - id: 20261129T101500Z
      status: complete
      method: tar
      compression: zstd
      start_lsn: 0/2000028
      stop_lsn: 0/2000100
      path: /backup/pg/20261129T101500Z
      size_on_disk: 5271552
      verification: {verified: true, at: "2026-11-29T10:20:00Z", problems_count: 0, tool: pgops.online_backup.pg_backup_manifest}
latest:
  description: Id of the newest complete backup that is not known to be damaged, or null when there is none.
  returned: always
  type: str
passed_over:
  description: Complete backups passed over for RV(latest) because their newest verification or drill failed.
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: The backup's id.
      type: str
    reason:
      description: Which check failed, when, and why.
      type: str
count:
  description: Number of entries in RV(backups).
  returned: always
  type: int
drill_order:
  description:
    - The clusters with a complete backup (of O(cluster) when set), the one whose newest restore drill is oldest
      first and the never drilled before them - the order the drill playbook's rotation follows.
  returned: always
  type: list
  elements: dict
  contains:
    system_identifier:
      description: The cluster.
      type: str
    last_drill_at:
      description: When its newest drill ran, or null.
      type: str
backup:
  description: The backup chosen by O(backup), same fields as an entry of RV(backups).
  returned: when O(backup) is set
  type: dict
chain:
  description:
    - The parents RV(backup) is restored from when it is an incremental backup, its full backup first, as far as
      the repository holds them (same fields as an entry of RV(backups)); empty for a full backup. The restore
      role and the drill verify each against its manifest before they use the chain.
  returned: when O(backup) is set
  type: list
  elements: dict
table:
  description:
    - With O(format=table), the backups of RV(backups) as lines of text (join them with newlines for one string) -
      a first line that counts them, then per cluster an empty line, a heading, a header line and one line per
      backup, newest first, and a note per failed or pinned backup. Times are UTC.
  returned: when O(format=table)
  type: list
  elements: str
  sample:
    - "3 backup(s) of 1 cluster(s) in /backup/pg"
    - ""
    - "cluster 7714565372798160724 (db1.example.com; PostgreSQL 17.6; /var/lib/postgresql/17/main): 3 \
      backup(s), 1 complete; latest: 20261129T101500Z"
    - "id                type                      status    started (UTC)     duration      stored / \
      source    WAL range                                             verified             last drill"
    - "20261130T101500Z  incr of 20261129T101500Z  running   2026-11-30 10:15  5m05s so far  \
      -                  -                                                     -                    -"
    - "20261129T101500Z  full                      complete  2026-11-29 10:15  2m05s         1.2 GiB / 4.6 \
      GiB  000000010000000000000007 .. 000000010000000000000009  ok 2026-11-29 10:20  passed 2026-11-30 \
      02:00"
    - "20261128T101500Z  full                      failed    2026-11-28 10:15  14s           \
      -                  -                                                     -                    -"
    - "  20261128T101500Z failed: the copy failed: tar exited with 2"
"""

import datetime

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._errors import PgopsError
from ansible_collections.pgops.online_backup.plugins.module_utils._layout import STATUSES
from ansible_collections.pgops.online_backup.plugins.module_utils._repository import (
    INVALID,
    chain_of,
    filter_status,
    latest,
    read_catalog,
    select,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._restore_plan import parse_target_time
from ansible_collections.pgops.online_backup.plugins.module_utils._s3 import S3_OPTION_SPEC, config_from_params
from ansible_collections.pgops.online_backup.plugins.module_utils._status import backup_table, drill_order
from ansible_collections.pgops.online_backup.plugins.module_utils._storage import open_storage


def main():
    module = AnsibleModule(
        argument_spec=dict(
            repository=dict(type="str", required=True),
            backup=dict(type="str"),
            status=dict(type="list", elements="str", choices=list(STATUSES) + [INVALID]),
            size_on_disk=dict(type="bool", default=True),
            allow_unverified=dict(type="bool", default=False),
            before=dict(type="str"),
            cluster=dict(type="str"),
            format=dict(type="str", default="json", choices=["json", "table"]),
            **S3_OPTION_SPEC,
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        entries = read_catalog(open_storage(p["repository"], config_from_params(p)), size=p["size_on_disk"])
    except (PgopsError, OSError) as e:
        module.fail_json(msg=str(e), backups=[], latest=None, count=0)
    if p["cluster"]:
        entries = [e for e in entries if str(e.get("system_identifier")) == p["cluster"]]
    before = None
    if p["before"]:
        try:
            when, _zone = parse_target_time(p["before"])
        except PgopsError as e:
            module.fail_json(msg=str(e))
        if when is None:
            module.fail_json(msg=f"before {p['before']!r} needs a numeric time zone (like +00 or Z) to be compared")
        before = when.timestamp()
    skipped = []
    newest = latest(entries, p["allow_unverified"], skipped)
    for s in skipped:
        module.warn(f"backup {s['id']} is not chosen as the latest: {s['reason']}")
    listed = filter_status(entries, p["status"])
    result = {"backups": listed, "latest": newest["id"] if newest else None, "count": len(listed), "passed_over": skipped}
    result["drill_order"] = drill_order(entries)
    if p["format"] == "table":
        clusters = {str(e.get("system_identifier") or "unknown") for e in entries}
        picks = {c: latest([e for e in entries if str(e.get("system_identifier") or "unknown") == c]) for c in clusters}
        now = datetime.datetime.now(datetime.timezone.utc)
        result["table"] = backup_table(listed, now, {c: e["id"] for c, e in picks.items() if e}, p["repository"])
    if p["backup"]:
        try:
            result["backup"] = select(entries, p["backup"], p["allow_unverified"], before=before)
            result["chain"] = chain_of(entries, result["backup"])
        except PgopsError as e:
            module.fail_json(msg=f"{p['repository']}: {e}", **result)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
