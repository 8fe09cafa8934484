#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_backup_report
short_description: Judge clusters' recoverability against a policy and publish the report
version_added: 0.1.0
description:
  - O(state=judged) puts together what M(pgops.online_backup.pg_backup_info), M(pgops.online_backup.pg_backup_coverage)
    and M(pgops.online_backup.pg_archiving_info) found about one cluster into one row of the recoverability report -
    the newest complete backup and its age, the point-in-time recovery window, the gaps in the archive, the newest
    passing restore drill, its age, target and recovery time, and the archive's health - and says which rules of the
    policy it breaks. Changes nothing.
  - O(state=published) writes the rows of a fleet as one JSON report (O(report_file)) and as Prometheus metrics for
    node_exporter's textfile collector (O(metrics_file), series C(pgops_status_*), the policy included so alert rules
    compare against it), and returns them as a table. Files are written atomically and only when their content changes.
  - The C(status) playbook runs both.
author:
  - pgops.online_backup contributors (@pgops)
extends_documentation_fragment:
  - pgops.online_backup.attributes
attributes:
  check_mode:
    support: full
    details: O(state=judged) runs the same; O(state=published) reports what it would write.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  state:
    description: V(judged) judges one cluster; V(published) writes the fleet's report.
    type: str
    choices: [judged, published]
    default: judged
  host:
    description: With O(state=judged), the inventory name of the database host, for the row.
    type: str
  cluster:
    description: With O(state=judged), the cluster's system identifier.
    type: str
  backups:
    description: With O(state=judged), the C(backups) M(pgops.online_backup.pg_backup_info) returned for the repository.
    type: list
    elements: dict
    default: []
  coverage:
    description: With O(state=judged), the cluster's entry of the C(clusters) M(pgops.online_backup.pg_backup_coverage) returned.
    type: dict
    default: {}
  archiving:
    description:
      - With O(state=judged), what M(pgops.online_backup.pg_archiving_info) returned for the cluster (its C(problems)).
      - A result without C(system_identifier) (the server could not be read) is a violation of its own.
    type: dict
    default: {}
  max_backup_age:
    description: Hours the newest complete backup may be old; V(0) is no rule.
    type: float
    default: 0
  min_window:
    description: Hours of continuous point-in-time recovery the archive must offer; V(0) is no rule.
    type: float
    default: 0
  max_drill_age:
    description: Hours the newest passing restore drill may be old; V(0) is no rule.
    type: float
    default: 0
  now:
    description: The time to judge at (ISO 8601 with a time zone); now when left out.
    type: str
  rows:
    description: With O(state=published), the C(row) of every cluster.
    type: list
    elements: dict
    default: []
  report_file:
    description: With O(state=published), where to write the JSON report (its directory must exist).
    type: path
  metrics_file:
    description: With O(state=published), where to write the metrics (node_exporter's textfile directory, which must exist).
    type: path
"""

EXAMPLES = r"""
- name: Judge the cluster
  pgops.online_backup.pg_backup_report:
    host: "{{ inventory_hostname }}"
    cluster: "{{ archiving.system_identifier }}"
    backups: "{{ info.backups }}"
    coverage: "{{ coverage.clusters[0] }}"
    archiving: "{{ archiving }}"
    max_backup_age: 26
    min_window: 168
    max_drill_age: 192
  register: report

- name: Publish the fleet's report
  pgops.online_backup.pg_backup_report:
    state: published
    rows: "{{ ansible_play_hosts | map('extract', hostvars, ['report', 'row']) | list }}"
    max_backup_age: 26
    min_window: 168
    max_drill_age: 192
    report_file: /var/lib/pgops/status.json
    metrics_file: /var/lib/prometheus/node-exporter/pgops_status.prom
  run_once: true
"""

RETURN = r"""
row:
  description:
    - With O(state=judged), the cluster's row - C(host), C(cluster), C(newest_backup), C(newest_backup_at),
      C(backup_age_hours), C(complete_backups), C(newest_failure_at), C(window_start), C(window_end), C(window_hours),
      C(gaps) (missing segments), C(first_missing), C(newest_drill) (the backup of the newest passing drill), C(drill_at),
      C(drill_age_hours), C(drill_target), C(drill_reached_time), C(drill_restore_seconds), C(last_drill_result),
      C(archive_problems) and C(violations).
  returned: O(state=judged)
  type: dict
violations:
  description: With O(state=judged), each rule of the policy the cluster breaks, in words.
  returned: O(state=judged)
  type: list
  elements: str
table:
  description: With O(state=published), the report as lines of text, a header and one line per cluster.
  returned: O(state=published)
  type: list
  elements: str
failing:
  description: With O(state=published), the rows that break the policy, as C(host/cluster) names.
  returned: O(state=published)
  type: list
  elements: str
"""

import datetime
import json
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._metrics import render_status, write_if_changed
from ansible_collections.pgops.online_backup.plugins.module_utils._status import POLICY, judge, table, when


def published(module, now) -> None:
    p = module.params
    rows = sorted(p["rows"], key=lambda r: (str(r.get("host")), str(r.get("cluster"))))
    for r in rows:
        missing = {"host", "cluster", "violations"} - set(r)
        if missing:
            module.fail_json(msg=f"a row lacks {', '.join(sorted(missing))}: pass the row state=judged returned")
    policy = {k: p[k] for k in POLICY}
    files = [(p["report_file"], json.dumps({"at": now.isoformat(), "policy": policy, "clusters": rows}, indent=2) + "\n")]
    files.append((p["metrics_file"], render_status(rows, policy, now.timestamp())))
    changed = False
    for path, text in files:
        if not path:
            continue
        if not os.path.isdir(os.path.dirname(path) or "."):
            module.fail_json(msg=f"the directory of {path} does not exist; create it or choose another path")
        try:
            changed |= write_if_changed(path, text, module.check_mode)
        except OSError as e:
            module.fail_json(msg=f"could not write {path}: {e}")
    failing = [f"{r['host']}/{r['cluster']}" for r in rows if r["violations"]]
    msg = f"{len(rows)} cluster(s), {len(failing)} breaking the policy" + (f": {', '.join(failing)}" if failing else "")
    module.exit_json(changed=changed, table=table(rows), failing=failing, msg=msg)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["judged", "published"], default="judged"),
            host=dict(type="str"),
            cluster=dict(type="str"),
            backups=dict(type="list", elements="dict", default=[]),
            coverage=dict(type="dict", default={}),
            archiving=dict(type="dict", default={}),
            max_backup_age=dict(type="float", default=0),
            min_window=dict(type="float", default=0),
            max_drill_age=dict(type="float", default=0),
            now=dict(type="str"),
            rows=dict(type="list", elements="dict", default=[]),
            report_file=dict(type="path"),
            metrics_file=dict(type="path"),
        ),
        required_if=[("state", "judged", ["host", "cluster"])],
        supports_check_mode=True,
    )
    p = module.params
    for rule in POLICY:
        if p[rule] < 0:
            module.fail_json(msg=f"{rule} is {p[rule]:g}: give hours (0 turns the rule off)")
    now = when(p["now"]) if p["now"] else datetime.datetime.now(datetime.timezone.utc)
    if now is None:
        module.fail_json(msg=f"now {p['now']!r} is not a time with a time zone, like 2026-11-29T10:15:00+00:00")
    if p["state"] == "published":
        published(module, now)
    policy = {k: p[k] for k in POLICY}
    row, violations = judge(p["host"], p["cluster"], p["backups"], p["coverage"], p["archiving"], policy, now)
    msg = f"cluster {p['cluster']} on {p['host']}: " + ("; ".join(violations) if violations else "within policy")
    module.exit_json(changed=False, row=row, violations=violations, msg=msg)


if __name__ == "__main__":
    main()
