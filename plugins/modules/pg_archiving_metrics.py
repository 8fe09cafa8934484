#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_archiving_metrics
short_description: Publish the archive guard of a cluster as Prometheus metrics for node_exporter
version_added: 0.1.0
description:
  - Writes the archive guard that M(pgops.online_backup.pg_archiving_info) reports for one cluster (seconds since the
    last archived file, the C(.ready) backlog in files and bytes, failed attempts, C(pg_wal) against C(max_wal_size),
    the newest segment in the repository) and one C(pgops_archive_problem) series per problem code, in Prometheus'
    text format, for node_exporter's textfile collector.
  - The file is written atomically (mode 0644; it holds sizes, times and counts, no secret) and only when its content
    changes. Keep it apart from the backups' metrics file (C(pg_backup_metrics_file)), which the catalog rewrites.
author:
  - pgops.online_backup contributors (@pgops)
extends_documentation_fragment:
  - pgops.online_backup.attributes
attributes:
  check_mode:
    support: full
    details: Reports whether the file would change; writes nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  path:
    description: The metrics file, in node_exporter's textfile directory (it must exist).
    type: path
    required: true
  facts:
    description: What M(pgops.online_backup.pg_archiving_info) (or M(pgops.online_backup.pg_archiving_check)) returned.
    type: dict
    required: true
  host:
    description: The C(host) label of the series.
    type: str
    required: true
seealso:
  - module: pgops.online_backup.pg_archiving_info
"""

EXAMPLES = r"""
- name: Read the archive guard
  pgops.online_backup.pg_archiving_info:
    archive_backlog_max: 64
    archive_age_max: 900
  register: guard

- name: Publish it for node_exporter
  pgops.online_backup.pg_archiving_metrics:
    path: /var/lib/prometheus/node-exporter/pgops_archive.prom
    facts: "{{ guard }}"
    host: "{{ inventory_hostname }}"
"""

RETURN = r"""
path:
  description: The file written.
  returned: always
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._metrics import render_archive, write_if_changed


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            facts=dict(type="dict", required=True),
            host=dict(type="str", required=True),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if not os.path.isdir(os.path.dirname(p["path"]) or "."):
        module.fail_json(msg=f"the directory of {p['path']} does not exist (node_exporter's textfile directory)")
    try:
        changed = write_if_changed(p["path"], render_archive(p["facts"], p["host"]), module.check_mode)
    except OSError as e:
        module.fail_json(msg=f"could not write {p['path']}: {e}")
    module.exit_json(changed=changed, path=p["path"])


if __name__ == "__main__":
    main()
