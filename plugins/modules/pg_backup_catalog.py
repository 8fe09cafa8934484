#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_backup_catalog
short_description: Record a backup's life in the repository (backup.json, lock, retention)
version_added: 0.1.0
description:
  - Creates a backup's directory and C(backup.json) with C(status=running) while holding the cluster's lock
    in the repository, records the running session, marks the backup C(complete) (and only then applies
    retention) or C(failed) (removing its partial data), and releases the lock.
  - Used by the role M(pgops.online_backup.pg_backup); listing is M(pgops.online_backup.pg_backup_info).
extends_documentation_fragment:
  - pgops.online_backup.attributes
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: Validates and reports; writes nothing.
  diff_mode:
    support: none
  idempotent:
    support: none
options:
  repository:
    description: Absolute path of the repository.
    type: path
    required: true
  state:
    description:
      - V(running) creates the backup directory and C(backup.json), and takes the lock.
      - V(updated) merges O(fields) into C(backup.json).
      - V(complete) merges O(fields), sets C(status=complete), releases the lock, applies O(keep).
      - V(failed) records O(error), removes the partial data (unless O(keep_failed_files)), releases the lock.
    type: str
    choices: [running, updated, complete, failed]
    required: true
  backup_id:
    description: The backup (required except for O(state=running)).
    type: str
  cluster:
    description: The cluster's system identifier (names the lock).
    type: str
    required: true
  fields:
    description: Values for C(backup.json) (for O(state=running) the initial record).
    type: dict
    default: {}
  forbidden_roots:
    description: Directories the repository must not be inside (the data directory and tablespaces).
    type: list
    elements: path
    default: []
  lock_grace:
    description:
      - Seconds a lock counts as taken while no session keeper holds it yet (the start of the backup follows the lock).
        After that, a lock whose backup has no living keeper on this host is stale and is replaced, with a warning.
    type: float
    default: 120
  manifest_checksum:
    description:
      - With O(state=complete), first write C(backup_manifest) (PostgreSQL's format) with this checksum algorithm,
        from the checksums M(pgops.online_backup.pg_backup_copy) recorded during the copy when they match.
      - V(auto) takes the algorithm the copy step recorded, else V(CRC32C) when this node's Python has a C
        implementation of it, else V(SHA256).
      - Unset writes no manifest. A manifest that cannot be written fails the task and the backup is not marked complete.
    type: str
    choices: [auto, SHA224, SHA256, SHA384, SHA512, CRC32C, NONE]
  keeper_local:
    description:
      - With O(state=running), whether the backup's session keeper runs on this host and holds the lock's flock (a
        repository on the database host). A lock of a remote keeper is trusted for a day.
    type: bool
    default: true
  keep:
    description: With O(state=complete), how many complete backups of this cluster to keep (0 keeps all).
    type: int
    default: 0
  error:
    description: With O(state=failed), what went wrong.
    type: str
    default: ''
  keep_failed_files:
    description: With O(state=failed), keep the partial data for inspection.
    type: bool
    default: false
  metrics_file:
    description:
      - With O(state=complete) or O(state=failed), then write the repository's backup metrics to this file in
        Prometheus' text format (for node_exporter's textfile collector, e.g.
        C(/var/lib/prometheus/node-exporter/pgops_backup.prom)), atomically, mode 0644. Per cluster - last complete
        backup's time, duration, copy time, sizes and WAL files, complete and failed backups, last failure's time.
      - The directory must exist. A file that cannot be written is a warning, never a failed backup.
    type: path
"""

EXAMPLES = r"""
- name: Open the backup record and take the lock
  pgops.online_backup.pg_backup_catalog:
    repository: /backup/pg
    state: running
    cluster: "{{ preflight.system_identifier }}"
    fields: {label: nightly, method: tar}
  register: record
"""

RETURN = r"""
backup_id:
  description: The backup's id (its directory name).
  returned: always
  type: str
path:
  description: The backup's directory.
  returned: always
  type: str
backup:
  description: The backup.json content after the change.
  returned: success
  type: dict
manifest:
  description: With O(manifest_checksum), what the manifest holds (files, bytes, version, algorithm, seconds, from_copy_step).
  returned: state is complete
  type: dict
removed:
  description: Backups removed by retention, or files removed from a failed backup.
  returned: state is complete or failed
  type: list
  elements: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._files import UnsafePathError
from ansible_collections.pgops.online_backup.plugins.module_utils._manifest import LayoutError, ManifestError
from ansible_collections.pgops.online_backup.plugins.module_utils._record import complete_backup, open_backup
from ansible_collections.pgops.online_backup.plugins.module_utils._repository import (
    RepositoryError,
    backup_json_path,
    caller_fields,
    fail_backup,
    update_backup,
    validate_repository,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            repository=dict(type="path", required=True),
            state=dict(type="str", required=True, choices=["running", "updated", "complete", "failed"]),
            backup_id=dict(type="str"),
            cluster=dict(type="str", required=True),
            fields=dict(type="dict", default={}),
            forbidden_roots=dict(type="list", elements="path", default=[]),
            lock_grace=dict(type="float", default=120),
            keeper_local=dict(type="bool", default=True),
            keep=dict(type="int", default=0),
            manifest_checksum=dict(type="str", choices=["auto", "SHA224", "SHA256", "SHA384", "SHA512", "CRC32C", "NONE"]),
            error=dict(type="str", default=""),
            keep_failed_files=dict(type="bool", default=False),
            metrics_file=dict(type="path"),
        ),
        required_if=[
            ("state", "updated", ["backup_id"]),
            ("state", "complete", ["backup_id"]),
            ("state", "failed", ["backup_id"]),
        ],
        supports_check_mode=True,
    )
    p = module.params
    repo, state = p["repository"], p["state"]
    problem = validate_repository(repo, p["forbidden_roots"])
    if problem:
        module.fail_json(msg=problem)
    if module.check_mode:
        module.exit_json(changed=True, msg=f"would mark a backup {state} in {repo}", backup_id=p["backup_id"], path=None)
    try:
        if state == "running":
            out = open_backup(repo, p["cluster"], p["fields"], p["lock_grace"], p["keeper_local"], module.warn)
            module.exit_json(changed=True, **out)
        bid = p["backup_id"]
        if state == "updated":
            info = update_backup(repo, bid, **caller_fields(p["fields"]))
            module.exit_json(changed=True, backup_id=bid, path=os.path.dirname(backup_json_path(repo, bid)), backup=info)
        if state == "complete":
            out = complete_backup(
                repo, bid, p["cluster"], p["fields"], p["manifest_checksum"], p["keep"], module.warn, p["metrics_file"]
            )
            module.exit_json(changed=True, **out)
        try:
            out = fail_backup(repo, bid, p["cluster"], p["error"], p["keep_failed_files"], p["fields"], p["metrics_file"])
        except RepositoryError as e:
            module.fail_json(msg=str(e), backup_id=bid, path=os.path.dirname(backup_json_path(repo, bid)))
        if out.get("metrics_error"):
            module.warn(out["metrics_error"])
        module.exit_json(changed=True, **out)
    except (RepositoryError, UnsafePathError, ManifestError, LayoutError, ValueError, OSError) as e:
        module.fail_json(msg=str(e))


if __name__ == "__main__":
    main()
