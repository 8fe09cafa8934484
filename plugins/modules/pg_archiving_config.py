#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_archiving_config
short_description: Set a PostgreSQL server's WAL archiving settings with ALTER SYSTEM, and say when a restart is needed
version_added: 0.1.0
description:
  - Sets each of O(settings) that differs from the server's value with C(ALTER SYSTEM), then reloads the configuration.
    Settings that already have the wanted value are left alone, so a second run changes nothing.
  - Settings that only take effect at server start (C(archive_mode), C(wal_level)) are reported in RV(restart_needed)
    and RV(pending_restart); this module never restarts the server (the role P(pgops.online_backup.pg_archiving#role)
    does when told to).
  - Values are passed to the server as literals quoted by the server itself (C(quote_literal)), never formatted into
    SQL; setting names are checked against C(pg_settings).
extends_documentation_fragment:
  - pgops.online_backup.connection
  - pgops.online_backup.attributes
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: Reports what would change; changes nothing.
  diff_mode:
    support: full
  idempotent:
    support: full
options:
  settings:
    description:
      - Server settings to have, name to value, for example C(archive_mode), C(archive_command), C(restore_command),
        C(archive_timeout).
      - Needs a superuser, or on 15 and newer a role granted C(ALTER SYSTEM) on each parameter.
    type: dict
    required: true
  reload:
    description:
      - Reload the configuration after a change (C(pg_reload_conf())).
    type: bool
    default: true
notes:
  - Tested against PostgreSQL 13 to 18.
seealso:
  - module: pgops.online_backup.pg_archiving_check
"""

EXAMPLES = r"""
- name: Archive WAL with the collection's command
  pgops.online_backup.pg_archiving_config:
    login_unix_socket: /var/run/postgresql
    settings:
      archive_mode: "on"
      archive_command: /usr/local/bin/pgops-wal push --repository /backup/pg --cluster 7314159265358979323 %p
  register: archiving

- name: Say when a restart is still needed
  ansible.builtin.debug:
    msg: "restart PostgreSQL for {{ archiving.pending_restart | join(', ') }}"
  when: archiving.restart_needed
"""

RETURN = r"""
changes:
  description: The settings that were (or in check mode would be) changed.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The setting.
      type: str
    before:
      description: Its value before.
      type: str
    after:
      description: Its value after.
      type: str
    restart:
      description: Whether it takes effect only at the next server start.
      type: bool
restart_needed:
  description: A setting that only takes effect at server start differs from what the server runs with.
  returned: always
  type: bool
pending_restart:
  description: The settings waiting for a restart (C(pg_settings.pending_restart) after the reload).
  returned: always
  type: list
  elements: str
data_directory:
  description: The server's data directory (for a restart with pg_ctl); null when the role may not read it.
  returned: always
  type: str
service_unit:
  description: The systemd unit the server runs in (read from its postmaster's cgroup on the database host), so that
    a restart goes through it; null when it runs outside systemd or this cannot be read.
  returned: always
  type: str
service_unit_main:
  description: Whether the postmaster is the main process of RV(service_unit) (false under a manager such as Patroni,
    which must do the restart itself); null when C(systemctl) cannot say.
  returned: always
  type: bool
server_version_num:
  description: Server version as a number.
  returned: always
  type: int
"""

import os
import re
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._postgres import (
    connect_or_fail,
    error_text,
    postgres_common_argument_spec,
    psycopg2,
    query_all,
    query_one,
    server_version,
)

NAME_RE = re.compile(r"^[a-z_][a-z0-9_.]*$")


def current_settings(conn, names: list) -> dict:
    """Each setting as the server runs with it, and as its files now say (a value set with ALTER
    SYSTEM that waits for a restart is already what was asked for: setting it again is no change)."""
    rows = query_all(conn, "SELECT name, setting, context, pending_restart FROM pg_settings WHERE name = ANY(%s)", (names,))
    out = {r[0]: {"setting": r[1], "context": r[2], "pending_restart": r[3], "configured": r[1]} for r in rows}
    try:
        files = query_all(
            conn,
            # Not "error IS NULL": a value waiting for the restart is there with "setting could not be applied".
            "SELECT DISTINCT ON (name) name, setting FROM pg_file_settings WHERE name = ANY(%s) ORDER BY name, seqno DESC",
            (names,),
        )
    except psycopg2.Error:  # pg_file_settings is for superusers: then the running value is all we know
        files = []
    for name, setting in files:
        # archive_command reads "(disabled)" while archive_mode is off (until the restart that turns it on).
        if name in out and (out[name]["pending_restart"] or out[name]["setting"] == "(disabled)"):
            out[name]["configured"] = setting
    return out


def service_unit(data_directory: str | None, run_command) -> tuple:
    """(the systemd unit the postmaster runs in, from its cgroup, or None; whether the postmaster is
    that unit's main process: False for a manager such as Patroni, None when systemctl cannot say).
    A restart must go through that unit, or systemd sees its service die and the new postmaster outside it.
    run_command: AnsibleModule.run_command."""
    try:
        with open(os.path.join(data_directory or "", "postmaster.pid")) as f:
            pid = int(f.readline())
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except (OSError, ValueError):
        return None, None
    unit = next(
        (part for line in lines for part in reversed(line.split(":", 2)[-1].split("/")) if part.endswith(".service")), None
    )
    if unit is None:
        return None, None
    rc, out, _err = run_command(["systemctl", "show", "-p", "MainPID", "--value", unit])
    return unit, (int(out.strip()) == pid if rc == 0 and out.strip().isdigit() else None)


def not_allowed(conn, num: int, names: list) -> list:
    """The settings this role may not ALTER SYSTEM (checked before the first one, so that a
    missing grant never leaves half of them written)."""
    if query_one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")[0]:
        return []
    if num < 150000:
        return list(names)
    return [n for n in names if not query_one(conn, "SELECT has_parameter_privilege(%s, 'ALTER SYSTEM')", (n,))[0]]


def wait_for_reload(conn, wanted: dict, changes: list) -> list:
    """The server's own word on what waits for a restart, once the reload is through
    (a backend rereads its configuration at its next query: ask until it agrees, a second at most)."""
    deadline = time.monotonic() + 1
    while True:
        after = current_settings(conn, list(wanted))
        done = all(after[c["name"]]["setting"] == c["after"] or after[c["name"]]["pending_restart"] for c in changes)
        if done or time.monotonic() > deadline:
            return sorted(k for k, v in after.items() if v["pending_restart"])
        time.sleep(0.05)


def normalize(value) -> str:
    """Ansible hands booleans for on/off; PostgreSQL reports them as on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def main():
    argument_spec = postgres_common_argument_spec()
    argument_spec.update(settings=dict(type="dict", required=True), reload=dict(type="bool", default=True))
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    wanted = {k: normalize(v) for k, v in module.params["settings"].items()}
    bad = [k for k in wanted if not NAME_RE.match(k)]
    if bad:
        module.fail_json(msg=f"not setting names: {', '.join(bad)}")
    conn = connect_or_fail(module, application_name="pgops.online_backup pg_archiving_config")
    try:
        num, _text = server_version(conn)
        have = current_settings(conn, list(wanted))
        unknown = sorted(set(wanted) - set(have))
        if unknown:
            module.fail_json(msg=f"PostgreSQL {_text} has no setting {', '.join(unknown)}; nothing was changed")
        changes = [
            {"name": k, "before": have[k]["configured"], "after": v, "restart": have[k]["context"] == "postmaster"}
            for k, v in wanted.items()
            if have[k]["configured"] != v
        ]
        denied = not_allowed(conn, num, [c["name"] for c in changes])
        if denied:
            module.fail_json(
                msg=f"this database role may not ALTER SYSTEM SET {', '.join(denied)}: connect as a superuser (or, on 15 and "
                f"newer, GRANT ALTER SYSTEM ON PARAMETER {', '.join(denied)} TO <role>); nothing was changed",
                changes=changes,
            )
        if changes and not module.check_mode:
            try:
                with conn.cursor() as cur:
                    for c in changes:
                        literal = query_one(conn, "SELECT quote_literal(%s)", (c["after"],))[0]
                        cur.execute(f"ALTER SYSTEM SET {c['name']} = {literal}")  # name checked against pg_settings
                    if module.params["reload"]:
                        cur.execute("SELECT pg_reload_conf()")
            except psycopg2.Error as e:
                module.fail_json(
                    msg=f"ALTER SYSTEM failed: {error_text(e)}. It needs a superuser (or, on 15 and newer, GRANT ALTER "
                    "SYSTEM ON PARAMETER <name> TO <role>)",
                    changes=changes,
                )
        pending = sorted({c["name"] for c in changes if c["restart"]} | {k for k, v in have.items() if v["pending_restart"]})
        if not module.check_mode and module.params["reload"]:
            pending = wait_for_reload(conn, wanted, changes)
        row = query_one(conn, "SELECT setting FROM pg_settings WHERE name = 'data_directory'")
    finally:
        conn.close()
    unit, unit_main = service_unit(row[0] if row else None, module.run_command)
    diff = {
        "before": "".join(f"{c['name']} = {c['before']!r}\n" for c in changes),
        "after": "".join(f"{c['name']} = {c['after']!r}\n" for c in changes),
    }
    module.exit_json(
        changed=bool(changes),
        changes=changes,
        restart_needed=bool(pending),
        pending_restart=pending,
        data_directory=row[0] if row else None,
        service_unit=unit,
        service_unit_main=unit_main,
        server_version_num=num,
        diff=diff,
        msg=(f"set {', '.join(c['name'] for c in changes)}" if changes else "every setting already has its value")
        + (f"; restart PostgreSQL for {', '.join(pending)}" if pending else ""),
    )


if __name__ == "__main__":
    main()
