#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_restore_drill
short_description: Check a restored PostgreSQL server and record a restore drill in the backup's catalog entry
version_added: 0.1.0
description:
  - O(state=checked) runs the checks of a restore drill against a restored (scratch) server, O(query) in every
    database that allows connections, and C(pg_amcheck) of the server's major version on all databases when one
    is installed (C(/usr/lib/postgresql/<major>/bin), C(/usr/pgsql-<major>/bin), the PostgreSQL 17 tools of this
    collection's setup, or E(PATH)).
  - O(state=recorded) writes the drill's outcome as C(drill) into the backup's C(backup.json)
    (C(result), C(at), C(seconds), C(checks), C(error), C(host)), where M(pgops.online_backup.pg_backup_info) shows it.
  - Used by the C(pgops.online_backup.drill) playbook.
extends_documentation_fragment:
  - pgops.online_backup.attributes
  - pgops.online_backup.s3
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: O(state=checked) only reads (but C(pg_amcheck) with O(amcheck_install_missing) creates the amcheck
      extension on the scratch server); O(state=recorded) writes nothing in check mode.
  diff_mode:
    support: none
  idempotent:
    support: none
options:
  state:
    description: V(checked) runs the checks; V(recorded) writes the drill result.
    type: str
    choices: [checked, recorded]
    default: checked
  data_directory:
    description: The restored data directory; its configuration gives O(port) and O(socket_directory) when they are not set.
    type: path
  port:
    description: Port of the restored server.
    type: int
  socket_directory:
    description: Unix socket directory of the restored server.
    type: path
  login_user:
    description: Role to connect as. Default the OS user the module runs as.
    type: str
  login_password:
    description: Password of O(login_user) (given to C(pg_amcheck) through its environment, never its command line).
    type: str
    default: ''
  query:
    description: Query run in every database; it must succeed.
    type: str
    default: SELECT count(*) FROM pg_class
  amcheck:
    description:
      - V(auto) runs C(pg_amcheck) when one of the server's major version is installed, V(always) fails when
        none is, V(never) skips it.
    type: str
    choices: [auto, always, never]
    default: auto
  amcheck_install_missing:
    description: Let C(pg_amcheck) create the amcheck extension where it is missing (a scratch server only).
    type: bool
    default: true
  bin_dir:
    description: Look for C(pg_amcheck) here first.
    type: path
  fail_on_error:
    description: With O(state=checked), fail the task when a check fails (otherwise RV(passed) says it).
    type: bool
    default: true
  backup_path:
    description:
      - With O(state=recorded), the backup directory (or C(s3://bucket/prefix/<backup_id>)) whose C(backup.json) gets
        the result.
    type: str
  result:
    description:
      - With O(state=recorded), the outcome. V(inconclusive) says the drill could not be carried out for a reason
        that is not the backup's (recovery to a random time after the last archived commit, or a problem of the drill's
        host such as free space, programs or a busy port found before anything changed, or recovery outlasting its
        timeout); it does not mark the backup
        damaged; it is kept as C(inconclusive_drill), apart from C(drill).
    type: str
    choices: [passed, failed, inconclusive]
  checks:
    description: With O(state=recorded), the checks that ran (RV(checks) of O(state=checked)).
    type: list
    elements: dict
    default: []
  error:
    description: With O(state=recorded), why the drill failed.
    type: str
    default: ''
  seconds:
    description: With O(state=recorded), how long the drill took.
    type: float
  details:
    description: With O(state=recorded), more facts to keep in the record (for example the reached LSN).
    type: dict
    default: {}
"""

EXAMPLES = r"""
- name: Check the scratch server
  pgops.online_backup.pg_restore_drill:
    data_directory: /tmp/pgops-drill-x/data
    fail_on_error: false
  register: drill_checks

- name: Record the drill
  pgops.online_backup.pg_restore_drill:
    state: recorded
    backup_path: /backup/pg/20261129T101500Z
    result: "{{ 'passed' if drill_checks.passed else 'failed' }}"
    checks: "{{ drill_checks.checks }}"
"""

RETURN = r"""
passed:
  description: Whether every check passed.
  returned: state is checked
  type: bool
checks:
  description: One entry per check with C(name), C(ok), C(seconds) and C(detail).
  returned: state is checked
  type: list
  elements: dict
  sample: [{name: "query postgres", ok: true, seconds: 0.01, detail: "SELECT count(*) FROM pg_class: 415"}]
databases:
  description: Databases checked.
  returned: state is checked
  type: list
  elements: str
drill:
  description: The record written into C(backup.json).
  returned: state is recorded
  type: dict
"""

import os
import pwd
import socket
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils import _postgres
from ansible_collections.pgops.online_backup.plugins.module_utils._errors import PgopsError
from ansible_collections.pgops.online_backup.plugins.module_utils._layout import BACKUP_JSON
from ansible_collections.pgops.online_backup.plugins.module_utils._restore_files import read_conf
from ansible_collections.pgops.online_backup.plugins.module_utils._restore_plan import now_utc
from ansible_collections.pgops.online_backup.plugins.module_utils._restore_server import (
    connect_restored,
    find_tool,
    server_address,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._s3 import S3_OPTION_SPEC, config_from_params
from ansible_collections.pgops.online_backup.plugins.module_utils._storage import update_backup_at

# subprocess, not run_command (ansible-core 2.21's pylint check ansible-bad-function): pg_amcheck runs under
# AMCHECK_TIMEOUT, which run_command lacks.
# pylint: disable=ansible-bad-function

AMCHECK_TIMEOUT = 3600
APPLICATION_NAME = "pgops.online_backup drill"


def timed(name: str, fn) -> dict:
    began = time.monotonic()
    try:
        ok, detail = fn()
    except Exception as e:  # noqa: BLE001 - any failure of a check is the check's result
        sql_error = _postgres.HAS_PSYCOPG2 and isinstance(e, _postgres.psycopg2.Error)
        ok, detail = False, _postgres.error_text(e) if sql_error else str(e)
    return {"name": name, "ok": ok, "seconds": round(time.monotonic() - began, 3), "detail": detail}


def checked(module) -> None:
    p = module.params
    _postgres.ensure_driver(module)
    if p["data_directory"]:
        port, socket_dir = server_address(read_conf(p["data_directory"]), p["port"], p["socket_directory"])
    elif p["port"] and p["socket_directory"]:
        port, socket_dir = p["port"], p["socket_directory"]
    else:
        module.fail_json(msg="give data_directory, or port and socket_directory")
    try:
        conn = connect_restored(p, port, socket_dir, "postgres", APPLICATION_NAME, 10)
        rows = _postgres.query_all(conn, "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname")
        databases = [r[0] for r in rows]
        major = _postgres.query_one(conn, "SELECT current_setting('server_version_num')::int / 10000")[0]
        conn.close()
    except _postgres.psycopg2.Error as e:
        module.fail_json(msg=f"cannot connect to the restored server on {socket_dir} port {port}: {_postgres.error_text(e)}")

    def run_query(db: str):
        def fn():
            c = connect_restored(p, port, socket_dir, db, APPLICATION_NAME, 10)
            try:
                row = _postgres.query_one(c, p["query"])
            finally:
                c.close()
            return True, f"{p['query']}: {row[0] if row else 'no row'}"

        return fn

    checks = [timed(f"query {db}", run_query(db)) for db in databases]

    if p["amcheck"] != "never":
        tool = find_tool("pg_amcheck", major, p["bin_dir"])
        if tool is None:
            if p["amcheck"] == "always":
                checks.append({"name": "pg_amcheck", "ok": False, "seconds": 0.0, "detail": f"no pg_amcheck {major} installed"})
        else:

            def amcheck():
                cmd = [tool, "-h", socket_dir, "-p", str(port), "-U", p["login_user"], "--all", "--no-password"]
                if p["amcheck_install_missing"]:
                    cmd.append("--install-missing")
                env = dict(os.environ, LC_ALL="C", LANG="C")
                if p["login_password"]:
                    env["PGPASSWORD"] = p["login_password"]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=AMCHECK_TIMEOUT, check=False)
                lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
                if proc.returncode == 0:
                    return True, f"{tool}: no corruption found in {len(databases)} databases"
                return False, f"{tool} exited {proc.returncode}: {' | '.join(lines[-20:])}"

            checks.append(timed("pg_amcheck", amcheck))

    passed = all(c["ok"] for c in checks)
    failed = [f"{c['name']}: {c['detail']}" for c in checks if not c["ok"]]
    result = {"passed": passed, "checks": checks, "databases": databases, "changed": False}
    if not passed:
        msg = "drill checks failed: " + "; ".join(failed)
        if p["fail_on_error"]:
            module.fail_json(msg=msg, **result)
        module.exit_json(msg=msg, **result)
    module.exit_json(msg=f"{len(checks)} drill checks passed", **result)


def recorded(module) -> None:
    p = module.params
    if not p["backup_path"] or not p["result"]:
        module.fail_json(msg="state recorded needs backup_path and result")
    record = {
        "result": p["result"],
        "at": now_utc(),
        "seconds": p["seconds"],
        "checks": p["checks"],
        "error": p["error"] or None,
        "host": socket.gethostname(),
    }
    record.update(p["details"] or {})
    if module.check_mode:
        module.exit_json(changed=True, msg=f"would record drill {p['result']} in {p['backup_path']}/{BACKUP_JSON}", drill=record)
    try:
        # An inconclusive drill neither clears nor hides the verdict of the drills before it.
        key = "inconclusive_drill" if p["result"] == "inconclusive" else "drill"
        update_backup_at(p["backup_path"], config_from_params(p), **{key: record})
    except (PgopsError, OSError) as e:
        module.fail_json(msg=f"could not record the drill: {e}", drill=record)
    module.exit_json(changed=True, msg=f"drill {p['result']} recorded in {p['backup_path']}/{BACKUP_JSON}", drill=record)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", default="checked", choices=["checked", "recorded"]),
            data_directory=dict(type="path"),
            port=dict(type="int"),
            socket_directory=dict(type="path"),
            login_user=dict(type="str"),
            login_password=dict(type="str", default="", no_log=True),
            query=dict(type="str", default="SELECT count(*) FROM pg_class"),
            amcheck=dict(type="str", default="auto", choices=["auto", "always", "never"]),
            amcheck_install_missing=dict(type="bool", default=True),
            bin_dir=dict(type="path"),
            fail_on_error=dict(type="bool", default=True),
            backup_path=dict(type="str"),
            result=dict(type="str", choices=["passed", "failed", "inconclusive"]),
            checks=dict(type="list", elements="dict", default=[]),
            error=dict(type="str", default=""),
            seconds=dict(type="float"),
            details=dict(type="dict", default={}),
            **S3_OPTION_SPEC,
        ),
        supports_check_mode=True,
    )
    if not module.params["login_user"]:
        module.params["login_user"] = pwd.getpwuid(os.geteuid()).pw_name
    if module.params["state"] == "recorded":
        recorded(module)
    checked(module)


if __name__ == "__main__":
    main()
