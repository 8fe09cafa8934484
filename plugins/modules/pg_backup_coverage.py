#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_backup_coverage
short_description: Report which points in time a repository can restore each cluster to
version_added: 0.1.0
description:
  - Reads a repository on the host it runs on - the C(backup.json) of every backup and the WAL C(pgops-wal)
    archived into C(<repository>/wal/<system identifier>/) - and reports, per cluster, each complete backup with its
    WAL range and whether every segment of it is there, the continuous point-in-time recovery window (from the end
    of the oldest backup that can be restored to the newest segment reached without a gap), and every gap, naming
    the missing segments.
  - Segments count by their position on any timeline, so a window continues across a promotion.
  - Read-only; never changes anything.
author:
  - pgops.online_backup contributors (@pgops)
extends_documentation_fragment:
  - pgops.online_backup.attributes
  - pgops.online_backup.s3
attributes:
  check_mode:
    support: full
    details: Read-only; runs the same in check mode.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  repository:
    description: The backup repository (absolute path on this host). Or C(s3://bucket/prefix), with the O(s3_endpoint) options.
    type: str
    required: true
  cluster:
    description: Only this cluster (its system identifier); every cluster of the repository when left out.
    type: str
seealso:
  - module: pgops.online_backup.pg_backup_info
"""

EXAMPLES = r"""
- name: How far back can we restore?
  pgops.online_backup.pg_backup_coverage:
    repository: /backup/pg
  register: coverage

- name: Say it
  ansible.builtin.debug:
    msg: "{{ item.system_identifier }}: {{ item.window.seconds | default(0) }} s of PITR, {{ item.gaps | length }} gap(s)"
  loop: "{{ coverage.clusters }}"
"""

RETURN = r"""
clusters:
  description: One entry per cluster.
  returned: always
  type: list
  elements: dict
  contains:
    system_identifier:
      description: The cluster.
      type: str
    backups:
      description: Its complete backups, newest first, each with C(id), C(start_wal), C(stop_wal), C(wal_complete) and the
        C(missing) segments of its range.
      type: list
      elements: dict
    window:
      description: The continuous PITR window, C(start) and C(end) (times; C(start_timestamp) and C(end_timestamp) as
        seconds since the epoch), C(seconds), C(from_backup) and C(end_wal); null when no backup can be restored.
      type: dict
    gaps:
      description: Holes in the archive after its oldest segment, each with C(after) (the last segment before it),
        C(count) and the first C(missing) segment names.
      type: list
      elements: dict
    segments:
      description: WAL segments in the archive.
      type: int
    newest_segment:
      description: The newest one.
      type: str
"""


from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._errors import PgopsError
from ansible_collections.pgops.online_backup.plugins.module_utils._layout import WAL_DIR, wal_dir
from ansible_collections.pgops.online_backup.plugins.module_utils._repository import (
    DEFAULT_SEGMENT_SIZE,
    coverage,
    is_complete,
    read_catalog,
    sort_newest_first,
    wal_files,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._s3 import S3_OPTION_SPEC, config_from_params
from ansible_collections.pgops.online_backup.plugins.module_utils._storage import open_storage


def cluster_report(entries: list, st, cluster: str) -> dict:
    mine = sort_newest_first([e for e in entries if str(e.get("system_identifier")) == cluster and is_complete(e)])
    seg_size = int(next((e["wal_segment_size"] for e in mine if e.get("wal_segment_size")), DEFAULT_SEGMENT_SIZE))
    rel = wal_dir("", cluster).lstrip("/")
    files = wal_files(st, rel)
    report = coverage(mine, files, seg_size)
    report.update(system_identifier=cluster, wal_directory=st.path(rel), wal_archived=bool(files))
    return report


def main():
    module = AnsibleModule(
        argument_spec=dict(repository=dict(type="str", required=True), cluster=dict(type="str"), **S3_OPTION_SPEC),
        supports_check_mode=True,
    )
    p = module.params
    try:
        st = open_storage(p["repository"], config_from_params(p))
        entries = read_catalog(st)
        found = {str(e["system_identifier"]) for e in entries if e.get("system_identifier")}
        found |= {d for d in st.list_dir(WAL_DIR) if d.isdigit()}
        clusters = [p["cluster"]] if p["cluster"] else sorted(found)
        reports = [cluster_report(entries, st, c) for c in clusters]
    except (PgopsError, OSError) as e:
        module.fail_json(msg=f"cannot read the repository {p['repository']}: {e}", clusters=[])
    lines = []
    for r in reports:
        w = r["window"]
        span = f"PITR window {w['start']} .. {w['end']}" if w else "no backup can be restored"
        gaps = f", {len(r['gaps'])} gap(s) from {r['gaps'][0]['missing'][0]}" if r["gaps"] else ""
        lines.append(f"{r['system_identifier']}: {span}{gaps}")
    module.exit_json(changed=False, clusters=reports, msg="; ".join(lines) or "no backups")


if __name__ == "__main__":
    main()
