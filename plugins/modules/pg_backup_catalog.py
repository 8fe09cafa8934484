#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_backup_catalog
short_description: Record a backup's life in the repository (backup.json, lock, retention)
version_added: 0.1.0
description:
  - The life of one backup's record in a repository on the host it runs on. V(running) creates the backup's directory
    and C(backup.json) with C(status=running) while taking the cluster's lock; V(complete) writes C(backup_manifest),
    marks the backup complete, releases the lock, then applies retention and writes the metrics file; V(failed)
    records the error, removes the partial data and releases the lock.
  - A lock whose holder is gone is taken over at once (its backup is marked failed, with a warning). The holder is
    the backup's session, started by M(pgops.online_backup.pg_backup_session) with the RV(session_id) this module
    returns (see O(session_local)), while it starts, runs and waits for the archive.
  - Used by the role P(pgops.online_backup.pg_backup#role); listing is M(pgops.online_backup.pg_backup_info).
extends_documentation_fragment:
  - pgops.online_backup.attributes
  - pgops.online_backup.s3
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
    description:
      - Absolute path of the repository, or C(s3://bucket/prefix) for a bucket (with the O(s3_endpoint) options; the
        lock is then a conditional PUT, C(If-None-Match), so it holds across hosts).
    type: str
    required: true
  label_files:
    description:
      - With O(state=complete), files to write into the backup first, a dict of file name to text (C(backup_label) and
        C(tablespace_map) from the stop, for a repository the database host does not write to directly).
    type: dict
    default: {}
  incremental:
    description:
      - With O(state=running), also choose the parent of an incremental backup, returned as RV(parent) - the newest
        complete backup of O(cluster) not known to be damaged, when it was taken with the same C(method) and
        PostgreSQL major (from O(fields)) and has a manifest - or, when there is none, RV(parent_refused) says why.
      - RV(parent) also holds C(files), every file of the parent with its size, modification time, checksum and the
        backup that holds it. A file-level incremental (before PostgreSQL 17) compares each file with it; a block-level
        one copies whole every relation file the parent does not hold.
      - Retention keeps the parents of every incremental backup it keeps.
    type: bool
    default: false
  state:
    description:
      - V(running) creates the backup directory and C(backup.json), and takes the lock. Only the repository directory
        itself is created (mode 0700), never a missing parent.
      - V(complete) merges O(fields), sets C(status=complete), releases the lock, applies retention (O(keep),
        O(keep_days)) and WAL expiry.
      - V(failed) records O(error), removes the partial data (unless O(keep_failed_files)), releases the lock.
      - V(expired) applies retention and WAL expiry on their own, to O(cluster) or to every cluster of the repository.
        In check mode it removes nothing and says exactly which backups and WAL files it would remove and which
        recovery window stays (with C(--diff), as a before/after list).
      - V(pinned) pins a complete backup (O(reason) required, O(by) recorded), and retention never removes it;
        V(unpinned) takes the pin away.
    type: str
    choices: [running, complete, failed, expired, pinned, unpinned]
    required: true
  backup_id:
    description: The backup (for every state but V(running) and V(expired)).
    type: str
  cluster:
    description: The cluster's system identifier (names the lock; which cluster's backups retention judges).
    type: str
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
      - Seconds a lock counts as taken while its session has not started yet (the run is between this task and the
        start) or cannot be seen from here, counted from the lock's or the backup's last change. A lock whose session
        has ended is free at once.
    type: float
    default: 120
  session_local:
    description:
      - With O(state=running), the run starts this backup's session on this host as this OS user, with
        O(pgops.online_backup.pg_backup_session#module:session_id) set to RV(session_id). The lock names that session,
        so a later run can tell at once whether the backup is still alive.
      - With V(false) (a session on another host, as with a repository host) a lock is trusted for a day unless its
        backup is complete or failed.
    type: bool
    default: false
  session_runtime_dir:
    description:
      - The O(pgops.online_backup.pg_backup_session#module:runtime_dir) of that session, when not the default.
      - Implies O(session_local).
    type: path
  manifest_checksum:
    description:
      - With O(state=complete), first write C(backup_manifest) (PostgreSQL's format) with this checksum algorithm,
        from the checksums M(pgops.online_backup.pg_backup_copy) recorded during the copy when they match.
      - V(auto) takes the algorithm the copy step recorded, else V(CRC32C) when this node's Python has a C
        implementation of it, else V(SHA256).
      - Unset writes no manifest. A manifest that cannot be written fails the task and the backup is not marked complete.
    type: str
    choices: [auto, SHA224, SHA256, SHA384, SHA512, CRC32C, NONE]
  keep:
    description:
      - With O(state=complete) or O(state=expired), keep the newest this many complete backups of the cluster.
      - Whatever the rules, the newest complete backup and pinned backups are never removed, a running backup is
        never touched, and with neither O(keep) nor O(keep_days) set nothing is removed at all.
    type: int
    default: 0
  keep_days:
    description:
      - With O(state=complete) or O(state=expired), a recovery window in days - keep every backup needed to recover to
        any moment of the last O(keep_days) days, that is every backup that stopped inside the window and the newest
        one that stopped before it. With O(keep) too, a backup either rule keeps stays.
      - Failed backups go once they are older than the window (and the oldest kept backup). WAL older than the start
        of the oldest kept backup goes too, per timeline, keeping C(.history) files; no WAL goes while any kept
        backup's own WAL range is incomplete (that is reported instead).
    type: float
    default: 0
  reason:
    description: With O(state=pinned), why the backup is kept (recorded in C(backup.json)).
    type: str
  by:
    description: With O(state=pinned), who pinned it (recorded in C(backup.json)).
    type: str
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
- name: Preview retention by a 14-day window (run with --check --diff to remove nothing)
  pgops.online_backup.pg_backup_catalog:
    repository: /backup/pg
    state: expired
    keep_days: 14

- name: Keep this backup whatever retention says
  pgops.online_backup.pg_backup_catalog:
    repository: /backup/pg
    state: pinned
    backup_id: 20261129T101500Z
    reason: the audit of 2026

- name: Open the backup record and take the lock
  pgops.online_backup.pg_backup_catalog:
    repository: /backup/pg
    state: running
    cluster: "{{ preflight.system_identifier }}"
    fields: {label: nightly, method: tar}
  register: record
"""

RETURN = r"""
parent:
  description:
    - With O(incremental), the parent backup's C(id), C(start_lsn), C(timeline), C(started_at) and C(type) (and
      C(files)); null when none.
  returned: state=running and incremental
  type: dict
parent_refused:
  description: With O(incremental), why there is no parent (the backup is then a full one).
  returned: state=running and incremental
  type: str
backup_id:
  description: The backup's id (its directory name).
  returned: always
  type: str
session_id:
  description: With O(state=running), the id to give the backup's session (the backup's id and a random suffix).
  returned: state is running
  type: str
  sample: 20261129T101500Z-0a1b2c3d
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
retention:
  description: With O(state=complete), what retention kept (with why), removed, and the WAL it removed (or why none).
  returned: state is complete
  type: dict
clusters:
  description: With O(state=expired), per cluster, what retention kept (with why) and removed (C(removed), C(remove)),
    the WAL files removed (C(wal_removed)) or why none (C(wal_kept_because)), and C(window_start).
  returned: state is expired
  type: dict
"""

import datetime

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._errors import PgopsError
from ansible_collections.pgops.online_backup.plugins.module_utils._layout import valid_backup_id
from ansible_collections.pgops.online_backup.plugins.module_utils._repository import (
    choose_parent,
    complete_backup,
    fail_backup,
    note_parent,
    open_backup,
    parent_files,
    pin_backup,
    read_catalog,
    retention,
    validate_repository,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._s3 import S3_OPTION_SPEC, config_from_params, is_s3
from ansible_collections.pgops.online_backup.plugins.module_utils._sessions import default_runtime_dir
from ansible_collections.pgops.online_backup.plugins.module_utils._storage import open_storage

CHECKSUMS = ["auto", "SHA224", "SHA256", "SHA384", "SHA512", "CRC32C", "NONE"]


def window_text(plan: dict) -> str:
    kept = plan["kept"]
    if plan.get("window_start"):
        start = datetime.datetime.fromtimestamp(plan["window_start"], datetime.timezone.utc).isoformat(timespec="seconds")
        return f"point-in-time recovery from {start} on stays possible"
    return f"{len(kept)} complete backup(s) stay"


def retention_diff(plan: dict) -> dict:
    """What --diff shows: the backups and WAL files before and after."""
    kept = [k["id"] for k in plan["kept"]]
    gone = plan["removed"]
    wal = plan["wal_removed"]
    before = "".join(f"backup {i}\n" for i in sorted(kept + gone)) + "".join(f"wal {n}\n" for n in wal)
    after = "".join(f"backup {i}\n" for i in sorted(kept))
    return {"before": before, "after": after}


def expired(module, repo: str) -> None:
    """Retention and WAL expiry on their own, for one cluster or every cluster of the repository."""
    p = module.params
    try:
        clusters = (
            [p["cluster"]]
            if p["cluster"]
            else sorted({str(e.get("system_identifier")) for e in read_catalog(repo) if e.get("system_identifier")})
        )
        results = {c: retention(repo, c, p["keep"], p["keep_days"], dry_run=module.check_mode) for c in clusters}
    except (PgopsError, OSError) as e:
        module.fail_json(msg=str(e))
    changed = any(r["removed"] or r["wal_removed"] for r in results.values())
    lines = []
    for c, r in results.items():
        verb = "would remove" if module.check_mode else "removed"
        lines.append(
            f"cluster {c}: {verb} {len(r['removed'])} backup(s) {', '.join(r['removed']) or ''} and {len(r['wal_removed'])} "
            f"WAL file(s){' (' + r['wal_removed'][0] + ' .. ' + r['wal_removed'][-1] + ')' if r['wal_removed'] else ''}; "
            + window_text(r)
            + (f"; WAL kept: {r['wal_kept_because']}" if r.get("wal_kept_because") else "")
        )
    diff = [retention_diff(r) for r in results.values()]
    module.exit_json(
        changed=changed, clusters=results, msg="; ".join(lines) or "no backups", diff=diff[0] if len(diff) == 1 else diff
    )


def choose(repo: str, p: dict, out: dict) -> None:
    """The parent of an incremental backup, into out (parent, parent_refused, backup)."""
    fields = p["fields"]
    out["parent"], out["parent_refused"] = choose_parent(
        read_catalog(repo), p["cluster"], fields.get("method", "tar"), fields.get("pg_version") or ""
    )
    if out["parent"]:
        # File-level: the copy compares each file with what the parent holds. Block-level (17+):
        # a relation file the parent lacks is copied whole (pg_combinebackup needs it in each backup).
        out["parent"]["files"] = parent_files(repo, out["parent"]["id"])
        out["backup"] = note_parent(repo, out["backup_id"], out["parent"]["id"])


def main():
    module = AnsibleModule(
        argument_spec=dict(
            repository=dict(type="str", required=True),
            state=dict(type="str", required=True, choices=["running", "complete", "failed", "expired", "pinned", "unpinned"]),
            backup_id=dict(type="str"),
            cluster=dict(type="str"),
            fields=dict(type="dict", default={}),
            forbidden_roots=dict(type="list", elements="path", default=[]),
            lock_grace=dict(type="float", default=120),
            session_local=dict(type="bool", default=False),
            session_runtime_dir=dict(type="path"),
            keep=dict(type="int", default=0),
            keep_days=dict(type="float", default=0),
            reason=dict(type="str"),
            by=dict(type="str"),
            manifest_checksum=dict(type="str", choices=CHECKSUMS),
            error=dict(type="str", default=""),
            keep_failed_files=dict(type="bool", default=False),
            metrics_file=dict(type="path"),
            label_files=dict(type="dict", default={}),
            incremental=dict(type="bool", default=False),
            **S3_OPTION_SPEC,
        ),
        required_if=[
            ("state", "running", ["cluster"]),
            ("state", "complete", ["backup_id", "cluster"]),
            ("state", "failed", ["backup_id", "cluster"]),
            ("state", "pinned", ["backup_id", "reason"]),
            ("state", "unpinned", ["backup_id"]),
        ],
        supports_check_mode=True,
    )
    p = module.params
    repo, state, bid = p["repository"], p["state"], p["backup_id"]
    problem = validate_repository(repo, p["forbidden_roots"])
    if problem:
        module.fail_json(msg=problem)
    if bid is not None and not valid_backup_id(bid):
        module.fail_json(msg=f"invalid backup_id {bid!r}: expected the form 20261129T101500Z")
    if p["keep"] < 0 or not 0 <= p["keep_days"] < 1e6:  # also NaN and infinity
        module.fail_json(msg=f"keep and keep_days must be 0 (off) or more, got {p['keep']} and {p['keep_days']:g}")
    if is_s3(repo):
        try:
            repo = open_storage(repo, config_from_params(p))
        except PgopsError as e:
            module.fail_json(msg=str(e))
    if state == "expired":
        expired(module, repo)
    if state in ("pinned", "unpinned"):
        try:
            changed, info = pin_backup(repo, bid, state == "pinned", p["reason"] or "", p["by"] or "", dry_run=module.check_mode)
        except (PgopsError, OSError) as e:
            module.fail_json(msg=str(e), backup_id=bid)
        module.exit_json(
            changed=changed, backup_id=bid, backup=info, msg=f"backup {bid} is {'pinned' if state == 'pinned' else 'not pinned'}"
        )
    if module.check_mode:
        module.exit_json(changed=True, msg=f"would mark a backup {state} in {p['repository']}", backup_id=bid, path=None)
    try:
        if state == "running":
            runtime_dir = p["session_runtime_dir"] or (default_runtime_dir() if p["session_local"] else None)
            out = open_backup(repo, p["cluster"], p["fields"], p["lock_grace"], runtime_dir, module.warn)
            if p["incremental"]:
                try:
                    choose(repo, p, out)
                except (PgopsError, OSError) as e:
                    # Nothing has started yet: the record is failed and the lock released, as a run's rescue would.
                    fail_backup(
                        repo, out["backup_id"], p["cluster"], f"choosing the parent failed: {e}", False, p["fields"], None
                    )
                    raise
            module.exit_json(changed=True, msg=f"backup {out['backup_id']} is running in {out['path']}", **out)
        if state == "complete":
            out = complete_backup(
                repo, bid, p["cluster"], p["fields"], p["manifest_checksum"], p["keep"], module.warn, p["metrics_file"],
                p["keep_days"], p["label_files"],
            )  # fmt: skip
            module.exit_json(changed=True, msg=f"backup {bid} is complete", **out)
        out = fail_backup(repo, bid, p["cluster"], p["error"], p["keep_failed_files"], p["fields"], p["metrics_file"])
        if out.get("metrics_error"):
            module.warn(out["metrics_error"])
        module.exit_json(changed=True, msg=f"backup {bid} is marked failed", **out)
    except (PgopsError, OSError) as e:
        module.fail_json(msg=str(e), backup_id=bid)


if __name__ == "__main__":
    main()
