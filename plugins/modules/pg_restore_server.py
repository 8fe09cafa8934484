#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_restore_server
short_description: Start a restored PostgreSQL data directory and wait for its recovery, or stop it
version_added: 0.1.0
description:
  - O(state=started) starts the server of a data directory prepared by M(pgops.online_backup.pg_restore_prepare)
    with C(pg_ctl) and waits, at most O(timeout) seconds, until recovery has ended the way its settings say.
    With a C(recovery_target_action) of C(promote) (or target C(latest)) that is C(pg_is_in_recovery()) false;
    with C(pause), replay paused at the target; with C(shutdown), the server stopped at the target.
  - It reports the LSN and the commit time recovery reached (C(pg_last_wal_replay_lsn()),
    C(pg_last_xact_replay_timestamp())), the log line where recovery stopped and the new timeline.
  - A server that stops during recovery (for example FATAL "recovery ended before configured recovery target
    was reached" when the archive ends before the target) fails the task at once with the server's own message.
    PostgreSQL 12 promotes at the end of the WAL instead; that is reported as a failure too, the server left running.
  - When O(timeout) passes with recovery still going, the task fails and the server is left running (recovery
    continues); the message says how far it got and how to stop it.
  - O(state=stopped) stops the server of the data directory (fast shutdown, then immediate after O(stop_timeout))
    and makes sure its postmaster is gone.
extends_documentation_fragment:
  - pgops.online_backup.attributes
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: Reports whether it would start or stop the server; changes nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
    details: A running server is not started again (the wait still happens); a stopped one is not stopped.
options:
  data_directory:
    description: The restored data directory.
    type: path
    required: true
  state:
    description: V(started) starts and waits; V(stopped) stops.
    type: str
    choices: [started, stopped]
    default: started
  bin_dir:
    description:
      - Directory with C(pg_ctl) of the data directory's major version. Default as
        M(pgops.online_backup.pg_restore_prepare) finds it.
    type: path
  log_file:
    description:
      - File for the server's output (C(pg_ctl -l)). Default C(<data_directory>/log/pgops-restore-server.log).
      - When the server runs a logging collector, its current file is read too.
    type: path
  port:
    description: Port of the server. Default from the data directory's configuration.
    type: int
  socket_directory:
    description: Unix socket directory to connect through. Default from the data directory's configuration.
    type: path
  login_user:
    description: Role to connect as while waiting. Default the OS user the module runs as.
    type: str
  login_password:
    description: Password of O(login_user).
    type: str
    default: ''
  login_db:
    description: Database to connect to.
    type: str
    default: postgres
  wait:
    description: Wait for recovery to end.
    type: bool
    default: true
  timeout:
    description: Seconds to wait for recovery to end (O(state=started)).
    type: int
    default: 600
  stop_timeout:
    description: Seconds a fast shutdown may take before an immediate one (O(state=stopped)).
    type: int
    default: 60
notes:
  - Run it as the OS user that owns the data directory.
"""

EXAMPLES = r"""
- name: Start the restored server and wait for recovery
  pgops.online_backup.pg_restore_server:
    data_directory: /srv/pg/restored
    timeout: 1800
  register: recovery

- name: Show where recovery stopped
  ansible.builtin.debug:
    msg: "{{ recovery.reached_lsn }} {{ recovery.reached_time }} {{ recovery.recovery_stop }}"

- name: Stop it
  pgops.online_backup.pg_restore_server:
    data_directory: /srv/pg/restored
    state: stopped
"""

RETURN = r"""
host_problem:
  description:
    - On a failure, true when it is about this host (a busy port, recovery outlasting O(timeout)) rather than the
      backup or its WAL. The drill records such a run as inconclusive.
  returned: failure
  type: bool
state:
  description:
    - V(promoted) (recovery ended, read-write), V(paused) (paused at the target), V(shutdown) (stopped at the
      target), V(running) (no recovery was pending) or V(stopped).
  returned: always
  type: str
pid:
  description: Postmaster pid (null when not running).
  returned: always
  type: int
port:
  description: Port of the server.
  returned: always
  type: int
socket_directory:
  description: Socket directory of the server.
  returned: always
  type: str
reached_lsn:
  description: Last WAL location replayed.
  returned: when the server could be asked
  type: str
reached_time:
  description: Commit time of the last transaction replayed (null when none was).
  returned: when the server could be asked
  type: str
recovery_stop:
  description: The server's "recovery stopping ..." log line, when recovery stopped at a target.
  returned: when the log says
  type: str
timeline:
  description: The timeline the server chose at promotion.
  returned: when the log says
  type: int
seconds:
  description: Seconds from start to the end of recovery.
  returned: always
  type: float
log_file:
  description: The server's output file.
  returned: always
  type: str
log:
  description: The last lines the server logged during this start (on failure, those that explain it).
  returned: always
  type: list
  elements: str
"""

import os
import pwd
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._errors import PgopsError
from ansible_collections.pgops.online_backup.plugins.module_utils._postgres import ensure_driver
from ansible_collections.pgops.online_backup.plugins.module_utils._restore_files import read_conf
from ansible_collections.pgops.online_backup.plugins.module_utils._restore_plan import RestoreError
from ansible_collections.pgops.online_backup.plugins.module_utils._restore_server import (
    ServerLog,
    data_major,
    expected_end,
    fatal_lines,
    find_bin_dir,
    listen_hosts,
    port_in_use,
    recovery_facts,
    recovery_state,
    running_postmaster,
    server_address,
    start_postmaster,
    stop_postmaster,
    tail,
)

POLL = 0.3
PID_GRACE = 15  # seconds for postmaster.pid to appear after pg_ctl returns


def started(module, data_dir: str, result: dict) -> None:
    p = module.params
    major = data_major(data_dir)
    if major is None:
        raise RestoreError(f"{data_dir} is not a PostgreSQL data directory (no PG_VERSION)")
    conf = read_conf(data_dir)
    port, socket_dir = result["port"], result["socket_directory"]
    recovering = os.path.exists(os.path.join(data_dir, "recovery.signal"))
    target, action = expected_end(conf) if recovering else ("none", "none")
    pid = running_postmaster(data_dir)
    log = ServerLog(data_dir, result["log_file"])
    changed = False
    began = time.monotonic()
    if pid is None:
        busy = port_in_use(port, socket_dir, listen_hosts(conf.get("listen_addresses", "localhost")))
        if busy:
            module.fail_json(msg=f"the restored server cannot start: {busy}", host_problem=True, **result)
        if module.check_mode:
            module.exit_json(changed=True, msg=f"would start the server of {data_dir} on port {port}", **result)
        bin_dir = find_bin_dir(major, p["bin_dir"])
        log.mark_collector()
        proc = start_postmaster(bin_dir, data_dir, result["log_file"])
        if proc.returncode != 0:
            module.fail_json(
                msg=f"pg_ctl start failed (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()}",
                log=tail(log.text()), **result,
            )  # fmt: skip
        changed = True
    elif module.check_mode:
        module.exit_json(changed=False, msg=f"the server of {data_dir} is running (pid {pid})", pid=pid, **result)
    if not p["wait"]:
        module.exit_json(
            changed=changed, msg=f"started the server of {data_dir} (not waiting)", state="starting", pid=pid, **result
        )

    deadline = began + p["timeout"]
    state, answer, seen_pid = None, None, pid
    while True:
        pid = running_postmaster(data_dir)
        seen_pid = pid or seen_pid
        text = log.text() if pid is None else ""
        facts = recovery_facts(text)
        # Gone: seen running before, or its log already says it ended (a quick target), or it never came up.
        ended = "shut_down" in facts or bool(fatal_lines(text))
        if pid is None and (seen_pid or ended or time.monotonic() - began > PID_GRACE):
            if action == "shutdown" and "shutdown_at_target" in facts:
                state = "shutdown"
                break
            fatal = fatal_lines(text)
            why = "; ".join(fatal[-3:]) or "it exited without a FATAL message (see the log)"
            module.fail_json(
                msg=f"the restored server stopped during recovery: {why}", state="stopped", pid=None, log=tail(text, 25),
                recovery_stop=facts.get("recovery_stop"), seconds=round(time.monotonic() - began, 3), **result,
            )  # fmt: skip
        if pid is not None:
            try:
                answer = recovery_state(p, port, socket_dir, major) or answer
            except RestoreError as e:
                # A server going down (a FATAL during recovery) can refuse a connection in odd ways for a
                # moment; once it has exited, the next turn reports why from its log.
                gone_by = time.monotonic() + 5
                while running_postmaster(data_dir) is not None and time.monotonic() < gone_by:
                    time.sleep(POLL)
                if running_postmaster(data_dir) is None:
                    continue
                module.fail_json(msg=str(e), pid=pid, log=tail(log.text()), **result)
            if answer and not answer["in_recovery"]:
                state = "promoted" if recovering else "running"
                break
            if answer and answer["paused"] and action == "pause":
                state = "paused"
                break
        if time.monotonic() > deadline:
            where = (
                f"replayed up to {answer['reached_lsn']} (last transaction {answer['reached_time']})"
                if answer
                else "not yet accepting connections"
            )
            module.fail_json(
                msg=f"recovery did not end within {p['timeout']} s: the server is {where}; it is left running "
                f"(pid {pid}) and keeps recovering. Stop it with: pg_ctl -D {data_dir} -m fast stop",
                state="recovering", pid=pid, log=tail(log.text()), host_problem=True, **result,
            )  # fmt: skip
        time.sleep(POLL)

    text = log.text()
    facts = recovery_facts(text)
    result.update(
        state=state, pid=pid if state != "shutdown" else None, seconds=round(time.monotonic() - began, 3),
        recovery_stop=facts.get("recovery_stop"), timeline=int(facts["new_timeline"]) if "new_timeline" in facts else None,
        reached_lsn=(answer or {}).get("reached_lsn") or facts.get("redo_done") or facts.get("consistent"),
        reached_time=(answer or {}).get("reached_time") or facts.get("last_transaction"), log=tail(text),
        target=target, target_action=action,
    )  # fmt: skip
    if (
        changed
        and recovering
        and target in ("time", "lsn", "name", "xid")
        and state == "promoted"
        and not facts.get("recovery_stop")
    ):
        if text.strip():
            # PostgreSQL 12 promotes at the end of the WAL when the target is never reached (13+ stop with a FATAL).
            module.fail_json(
                msg=f"recovery ended at the end of the archived WAL ({result['reached_lsn']}) before the configured "
                f"{target} target was reached; the server was promoted there and is left running (pid {pid})",
                **result,
            )
        module.warn("the server log could not be read, so it is not known whether recovery stopped at the target")
    if state == "promoted":
        msg = f"recovery ended and the server was promoted: reached {result['reached_lsn']}"
    elif state == "paused":
        msg = f"recovery paused at the target, {result['reached_lsn']}; run SELECT pg_wal_replay_resume() to promote"
    elif state == "shutdown":
        msg = "recovery reached the target and the server shut down as asked"
    else:
        msg = f"the server of {data_dir} is running (pid {pid})"
    if result["recovery_stop"]:
        msg += f" ({result['recovery_stop']})"
    module.exit_json(changed=changed, msg=msg, **result)


def stopped(module, data_dir: str, result: dict) -> None:
    pid = running_postmaster(data_dir)
    if pid is None:
        module.exit_json(changed=False, msg=f"the server of {data_dir} is not running", state="stopped", pid=None, **result)
    if module.check_mode:
        module.exit_json(changed=True, msg=f"would stop the server of {data_dir} (pid {pid})", state="running", pid=pid, **result)
    began = time.monotonic()
    mode = stop_postmaster(pid, module.params["stop_timeout"])
    if mode is None:
        module.fail_json(msg=f"the server of {data_dir} (pid {pid}) did not stop", state="running", pid=pid, **result)
    module.exit_json(
        changed=True, msg=f"stopped the server of {data_dir} (pid {pid}, {mode} shutdown)", state="stopped", pid=None,
        stopped_pid=pid, shutdown=mode, seconds=round(time.monotonic() - began, 3), **result,
    )  # fmt: skip


def main():
    module = AnsibleModule(
        argument_spec=dict(
            data_directory=dict(type="path", required=True),
            state=dict(type="str", default="started", choices=["started", "stopped"]),
            bin_dir=dict(type="path"),
            log_file=dict(type="path"),
            port=dict(type="int"),
            socket_directory=dict(type="path"),
            login_user=dict(type="str"),
            login_password=dict(type="str", default="", no_log=True),
            login_db=dict(type="str", default="postgres"),
            wait=dict(type="bool", default=True),
            timeout=dict(type="int", default=600),
            stop_timeout=dict(type="int", default=60),
        ),
        supports_check_mode=True,
    )
    p = module.params
    data_dir = os.path.normpath(p["data_directory"])
    if not p["login_user"]:
        p["login_user"] = pwd.getpwuid(os.geteuid()).pw_name
    result = {"data_directory": data_dir, "log_file": p["log_file"] or os.path.join(data_dir, "log", "pgops-restore-server.log")}
    if p["state"] == "stopped":
        result.update(port=p["port"], socket_directory=p["socket_directory"])
        stopped(module, data_dir, result)
    ensure_driver(module)
    if not os.path.isdir(data_dir):
        module.fail_json(msg=f"data directory {data_dir} does not exist", **result)
    if os.geteuid() == 0:
        module.fail_json(msg="PostgreSQL refuses to run as root: run this as the data directory's owner (become_user: postgres)")
    port, socket_dir = server_address(read_conf(data_dir), p["port"], p["socket_directory"])
    result.update(port=port, socket_directory=socket_dir)
    try:
        started(module, data_dir, result)
    except (PgopsError, OSError, subprocess.SubprocessError) as e:
        module.fail_json(msg=str(e), **result)


if __name__ == "__main__":
    main()
