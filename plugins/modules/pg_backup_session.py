#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_backup_session
short_description: Start and stop a PostgreSQL online backup across separate tasks
version_added: 0.1.0
description:
  - Runs PostgreSQL's low-level backup API (C(pg_backup_start)/C(pg_backup_stop) on 15 and newer,
    C(pg_start_backup)/C(pg_stop_backup) in non-exclusive mode on 12 to 14).
  - A non-exclusive backup belongs to the database session that started it. O(state=started)
    launches a small detached I(session keeper) process on the managed node that opens that
    session, starts the backup, and holds the session until a later task asks for O(state=stopped)
    or O(state=aborted). The task that starts the backup returns as soon as the server has
    started it, so the copy can run in the tasks in between.
  - The keeper can be listed (M(pgops.online_backup.pg_backup_session_info)) and aborted from the moment it exists,
    also while the start still waits for its checkpoint. If the task that started it goes away during that wait
    (Ctrl-C, a lost controller), the keeper cancels the start.
  - The keeper listens on a Unix socket (mode 0600) in a private directory (mode 0700) owned by
    the user the module runs as; only that user (or root) can talk to it. Credentials reach it in
    memory, never through its command line or environment.
  - The keeper keeps its session alive (no statement or idle timeouts, TCP keepalives, a cheap
    query every O(keepalive_interval) seconds) and ends the backup by itself after O(max_duration),
    or when its run has been silent for O(lease) seconds.
  - O(state=stopped) asks for the stop with C(wait_for_archive=false), keeps the label, then waits
    for the required WAL to be archived for at most O(archive_timeout) seconds. A wait that runs
    out fails with the missing WAL file and the archiver's state, and keeps the label; running
    O(state=stopped) again for the same session resumes the wait.
  - This module holds the session and nothing else. The copy (M(pgops.online_backup.pg_backup_copy)), the
    pre-flight (M(pgops.online_backup.pg_archiving_check)) and the backup's record
    (M(pgops.online_backup.pg_backup_catalog)) are tasks of their own; the role P(pgops.online_backup.pg_backup#role)
    composes them.
extends_documentation_fragment:
  - pgops.online_backup.connection
  - pgops.online_backup.primary
  - pgops.online_backup.attributes
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: Nothing is started or stopped on the server; the result says what would happen.
  diff_mode:
    support: none
  idempotent:
    support: none
    details: Every O(state=started) starts a new backup.
options:
  state:
    description:
      - V(started) starts a backup and its keeper; returns RV(session_id).
      - V(stopped) stops the backup of a session and returns the label contents.
      - V(aborted) ends the backup without a usable result (also while it still starts).
    type: str
    choices: [started, stopped, aborted]
    required: true
  label:
    description:
      - Backup label for O(state=started) (at most 1024 bytes, no NUL or line break).
      - With O(state=stopped) or O(state=aborted) and no O(session_id), selects the one session of this cluster with
        this label that is still starting, running, or stopped but not yet delivered; sessions that finished earlier
        with the same label (a nightly label is reused every night) do not count.
    type: str
  session_id:
    description:
      - With O(state=started), the id to give the new session (letters, digits, C(_), C(.), C(-); at most 64);
        generated when left out. The role P(pgops.online_backup.pg_backup#role) uses the backup's id, so that the
        repository's lock can tell whether the backup's session is still alive.
      - With O(state=stopped) or O(state=aborted), the session to stop or abort, as returned by O(state=started).
    type: str
  fast:
    description:
      - Request an immediate checkpoint at start instead of a spread one.
      - A spread checkpoint can make the start wait up to C(checkpoint_completion_target) times
        C(checkpoint_timeout) on a busy server.
    type: bool
    default: false
  wait_for_archive:
    description:
      - Wait until the WAL needed by the backup is archived before reporting success.
      - Skipped, with a warning, when WAL archiving is not enabled on the server.
    type: bool
    default: true
  archive_timeout:
    description:
      - Seconds to wait for the archive when O(wait_for_archive=true).
    type: float
    default: 300
  start_timeout:
    description:
      - Seconds to wait for the start function (a spread checkpoint can take minutes).
      - On expiry the start is cancelled and the backup aborted.
    type: float
    default: 1800
  max_duration:
    description:
      - Seconds after which the keeper ends the backup by itself and records why.
    type: int
    default: 86400
  lease:
    description:
      - With O(state=started), seconds the keeper waits for word from the run (any request, such as the renewals
        M(pgops.online_backup.pg_backup_copy) sends every few seconds while it copies) before it decides the run is
        gone (Ctrl-C, lost controller) and ends the backup.
      - V(0) (the default) trusts the run until O(max_duration), for copy steps of your own that do not renew it.
    type: int
    default: 0
  incremental_from_lsn:
    description:
      - With O(state=started), make this backup an incremental one relative to the backup that started at this LSN
        (the parent's C(start_lsn)), on PostgreSQL 17 or later with C(summarize_wal=on).
      - Right after the start, the keeper reads over its own session which blocks changed since then
        (C(pg_wal_summary_contents()), after waiting for the WAL summarizer to reach this backup's start) and saves
        them for M(pgops.online_backup.pg_backup_copy); O(state=stopped) then adds the C(INCREMENTAL FROM LSN) and
        C(INCREMENTAL FROM TLI) lines to C(backup_label), as C(pg_basebackup --incremental) does.
      - When that cannot be done (an older server, C(summarize_wal) off, summaries missing or incomplete, another
        timeline), the backup goes on as a full one; RV(incremental_refused) says why, and the task warns.
    type: str
  incremental_from_tli:
    description:
      - The timeline the parent backup started on (its C(timeline)). Required with O(incremental_from_lsn).
    type: int
  keepalive_interval:
    description:
      - Seconds between the keeper's keepalive queries.
    type: int
    default: 30
  dest:
    description:
      - With O(state=stopped), a directory into which C(backup_label) and, when the cluster has
        tablespaces, C(tablespace_map) are written byte for byte (mode 0600).
      - Never point this at the live data directory (a directory holding C(postmaster.pid) is refused).
    type: path
  runtime_dir:
    description:
      - Private directory of the keepers' sockets and state files.
      - Defaults to C(~/.pgops_online_backup/sessions) of the user the module runs as.
    type: path
  progress_interval:
    description:
      - With O(state=started), when the start has not returned after this many seconds (a spread checkpoint on a
        busy server takes about C(checkpoint_completion_target) times C(checkpoint_timeout)), say so in the run's
        output, and again every this many seconds until it returns - for example
        C(start waiting for the checkpoint (spread, requested 1m10s ago; fast=true starts at once)).
      - The task then hands the start over to M(pgops.online_backup.pg_backup_progress), which this module's action
        plugin calls in turns until the start returns; the task returns the start's result as it always did. The
        keeper then cancels the start itself after O(start_timeout); each turn attaches to it, so if the run is
        killed the keeper cancels the start at once, and if no turn comes within 30 seconds of the last, it cancels it
        too.
      - V(0) waits within the task, printing nothing until the start returns.
      - Not with C(async).
    type: float
    default: 0
  spread_checkpoint_hint:
    description:
      - What the lines printed while a spread checkpoint is waited for name as the way to start at once; the role
        P(pgops.online_backup.pg_backup#role) passes its own variable, C(pg_backup_fast_checkpoint) set to true.
    type: str
    default: fast=true
notes:
  - Start and stop must run as the same OS user on the same host (use the same C(become_user)).
  - Tested against PostgreSQL 12 to 18.
seealso:
  - module: pgops.online_backup.pg_backup_session_info
  - module: pgops.online_backup.pg_backup_copy
  - name: Making a non-exclusive low-level backup
    description: PostgreSQL documentation.
    link: https://www.postgresql.org/docs/current/continuous-archiving.html#BACKUP-LOWLEVEL-BASE-BACKUP
"""

EXAMPLES = r"""
- name: Take a backup with a copy step of your own
  block:
    - name: Start the backup (the keeper holds the session)
      pgops.online_backup.pg_backup_session:
        state: started
        label: nightly
        login_unix_socket: /var/run/postgresql
      register: backup

    - name: Copy the data directory while the backup runs
      pgops.online_backup.pg_backup_copy:
        data_directory: /var/lib/postgresql/17/main
        dest: /backup/{{ backup.session_id }}
        compression: zstd
        session_id: "{{ backup.session_id }}"

    - name: Stop the backup and write backup_label beside the copy
      pgops.online_backup.pg_backup_session:
        state: stopped
        session_id: "{{ backup.session_id }}"
        login_unix_socket: /var/run/postgresql
        dest: /backup/{{ backup.session_id }}
        archive_timeout: 120

  rescue:
    - name: Abort the backup when a step failed
      pgops.online_backup.pg_backup_session:
        state: aborted
        session_id: "{{ backup.session_id }}"
      when: backup.session_id is defined
"""

RETURN = r"""
session_id:
  description: Identifier of the session; pass it to the stop task.
  returned: always
  type: str
  sample: 20261129T101500Z-0a1b2c3d
label:
  description: The backup label.
  returned: state is started or stopped
  type: str
incremental:
  description:
    - With O(incremental_from_lsn), what the WAL summaries say changed since the parent (C(from_lsn), C(from_tli),
      C(summaries), C(relations), C(blocks), C(databases_created)); null when the backup is a full one.
  returned: state=started or state=stopped
  type: dict
incremental_refused:
  description: Why the backup is a full one although O(incremental_from_lsn) asked for an incremental one.
  returned: state=started or state=stopped
  type: str
start_lsn:
  description: Redo location of the backup's starting checkpoint.
  returned: state is started or stopped
  type: str
  sample: 0/2000028
start_wal:
  description: WAL file holding RV(start_lsn).
  returned: state is started or stopped
  type: str
  sample: "000000010000000000000002"
timeline:
  description: Timeline at the start.
  returned: state is started or stopped
  type: int
server_version:
  description: Server version as text.
  returned: state is started or stopped
  type: str
  sample: "17.10"
server_version_num:
  description: Server version as a number.
  returned: state is started or stopped
  type: int
  sample: 170010
system_identifier:
  description: The cluster's system identifier.
  returned: state is started or stopped
  type: str
backup_from:
  description: V(primary) or V(standby).
  returned: state is started or stopped
  type: str
started_at:
  description: UTC time the start function returned.
  returned: state is started or stopped
  type: str
start_seconds:
  description: Seconds the start function took (its checkpoint).
  returned: state is started or stopped
  type: float
wal_segment_size:
  description: WAL segment size in bytes.
  returned: state is started or stopped
  type: int
keeper_pid:
  description: Process id of the session keeper.
  returned: state is started
  type: int
expires_at:
  description: When O(max_duration) ends the backup if it has not been stopped.
  returned: state is started
  type: str
stop_lsn:
  description: Location where the backup ended.
  returned: state is stopped
  type: str
stop_wal:
  description: Last WAL file the backup needs.
  returned: state is stopped
  type: str
labelfile:
  description: Contents for C(backup_label), as returned by the server.
  returned: state is stopped
  type: str
spcmapfile:
  description: Contents for C(tablespace_map); empty without tablespaces.
  returned: state is stopped
  type: str
stop_requested_at:
  description: UTC time the stop function was called; every transaction committed before it is in the backup.
  returned: state is stopped
  type: str
stopped_at:
  description: UTC time the stop function returned.
  returned: state is stopped
  type: str
duration:
  description: Seconds between start and stop of the backup.
  returned: state is stopped
  type: float
stop_seconds:
  description: Seconds the stop function took.
  returned: state is stopped
  type: float
archive_wait_seconds:
  description: Seconds spent waiting for the WAL archive.
  returned: state is stopped
  type: float
wal_files:
  description: Number of WAL segments the backup needs to be restored (start to stop).
  returned: state is stopped
  type: int
wal_archived:
  description: Whether the WAL the backup needs was confirmed archived.
  returned: state is stopped
  type: bool
primary_wal_switched:
  description: For a backup of a standby, whether the primary was asked to switch WAL.
  returned: state is stopped on a standby
  type: bool
files:
  description: Files written into O(dest).
  returned: state is stopped and dest is set
  type: list
  elements: str
status:
  description: The session's status after the task (V(aborted), or what it already was).
  returned: state is aborted
  type: str
cause:
  description: On failure, what went wrong, without the advice of the message about what to do next (for a caller
    that has its own next step, as the role's rescue does).
  returned: on failure after the backup started
  type: str
"""

import datetime
import os
import shutil
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils import _keeper, _sessions
from ansible_collections.pgops.online_backup.plugins.module_utils._archiving import (
    archiving_enabled,
    archiving_settings,
    describe_wait_failure,
    wait_for_wal,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._backup_api import (
    backup_history_file_name,
    major_of,
    parse_labelfile,
    parse_lsn,
    validate_label,
    wal_file_name,
    wal_segment_count,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._errors import PgopsError
from ansible_collections.pgops.online_backup.plugins.module_utils._files import write_private_file
from ansible_collections.pgops.online_backup.plugins.module_utils._postgres import (
    PRIMARY_SPEC,
    cluster_key,
    connect,
    connection_kwargs,
    ensure_driver,
    error_text,
    postgres_common_argument_spec,
    primary_params,
    psycopg2,
    query_one,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._progress import start_line

public = _sessions.public


class Failed(Exception):
    """Fail the task with msg (and cause, the same without advice) and these result fields."""

    def __init__(self, msg: str, cause: str | None = None, **extra):
        super().__init__(msg)
        self.msg = msg
        self.extra = dict(extra, cause=cause or msg)


# -- started


def started(module, runtime_dir: str) -> None:
    p = module.params
    problem = validate_label(p["label"])
    if problem:
        module.fail_json(msg=f"invalid label: {problem}; nothing was started")
    if p["lease"] < 0 or (p["lease"] and p["lease"] < 5):
        module.fail_json(msg=f"lease must be 0 (off) or at least 5 seconds, got {p['lease']}")
    if p["max_duration"] < 1:
        module.fail_json(msg="max_duration must be at least 1 second")
    sid = p["session_id"] or _sessions.new_session_id()
    if not _sessions.valid_session_id(sid):
        module.fail_json(msg=f"invalid session_id {sid!r}: letters, digits, '_', '.' and '-' only, at most 64")
    if module.check_mode:
        module.exit_json(changed=True, msg=f"would start backup {p['label']!r} on {cluster_key(p)}", session_id=sid)
    ensure_driver(module)
    try:
        _sessions.sweep(runtime_dir)
    except OSError:
        pass
    spec = {
        "session_id": sid,
        "label": p["label"],
        "fast": p["fast"],
        "max_duration": p["max_duration"],
        "keepalive_interval": max(1, p["keepalive_interval"]),
        "cluster": cluster_key(p),
        "lease": p["lease"],
        # A handed-over start: the keeper itself cancels it after start_timeout, and words its failure.
        "start_timeout": p["start_timeout"],
        "login_user": p["login_user"],
    }
    if p["incremental_from_lsn"]:
        try:
            parse_lsn(p["incremental_from_lsn"])
        except PgopsError as e:
            module.fail_json(msg=f"invalid incremental_from_lsn: {e}; nothing was started")
        spec["incremental_from"] = {"lsn": p["incremental_from_lsn"], "tli": p["incremental_from_tli"]}
    kw = connection_kwargs(p, application_name=f"pgops.online_backup keeper {sid}")
    try:
        report = _keeper.launch(kw, spec, runtime_dir, p["start_timeout"], handover_after=p["progress_interval"])
    except (PgopsError, OSError) as e:
        module.fail_json(msg=f"cannot start the session keeper: {e}; nothing was started")
    if report.get("handed_over"):
        info = _sessions.describe(report["state"])
        module.exit_json(
            changed=True,
            in_progress=True,
            session_id=sid,
            keeper_pid=report.get("pid"),
            progress={k: info.get(k) for k in ("start_stage", "start_waiting_seconds", "fast")},
            line=start_line(info, p["spread_checkpoint_hint"]),
            msg=f"the start of backup {p['label']!r} waits on; pg_backup_progress with session_id={sid} waits for it",
        )
    if not report.get("ok"):
        module.fail_json(msg=_keeper.start_failure(report, p["login_user"]), sqlstate=report.get("sqlstate"), session_id=sid)
    state = report["state"]
    out = _sessions.start_result(state)
    if out.get("incremental_refused"):
        module.warn(f"this backup is a full one, not an incremental: {out['incremental_refused']}")
    module.exit_json(changed=True, msg=f"backup {p['label']!r} started at {out['start_lsn']}", **out)


# -- finding a session


def find_session(module, runtime_dir: str) -> tuple:
    """The session directory and state chosen by session_id or by label."""
    p = module.params
    if p["session_id"]:
        try:
            sdir = _sessions.session_dir(runtime_dir, p["session_id"])
        except PgopsError as e:
            module.fail_json(msg=str(e))
        state = _sessions.read_state(sdir)
        if state is None:
            module.fail_json(
                msg=f"unknown session id {p['session_id']}: no such session in {runtime_dir} "
                "(start and stop must run on the same host as the same OS user)"
            )
        return sdir, state
    key = cluster_key(p)
    # Only sessions that can still be stopped: a reused label's finished sessions do not count.
    matches = [
        s
        for s in _sessions.list_sessions(runtime_dir)
        if s.get("label") == p["label"]
        and s.get("cluster") == key
        and (s.get("status") in _sessions.LIVE or (s.get("status") == _sessions.STOPPED and not s.get("delivered")))
    ]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)}"
        ids = ", ".join(m["session_id"] for m in matches)
        module.fail_json(
            msg=f"{what} unfinished sessions with label {p['label']!r} on {key}"
            + (f" ({ids}): pass session_id" if matches else "; pg_backup_session_info lists the sessions")
        )
    sid = matches[0]["session_id"]
    sdir = _sessions.session_dir(runtime_dir, sid)
    return sdir, _sessions.read_state(sdir)


ENDED = {
    "lost": "session lost, backup unusable",
    "expired": "session expired, backup unusable",
    "aborted": "session was aborted, backup unusable",
    "failed": "the session failed, backup unusable",
}


def fail_ended(module, sdir: str, state: dict) -> None:
    """A session that can no longer give a usable backup: say why, forget it."""
    status = state.get("status")
    what = ENDED.get(status, f"session is {status}")
    if not module.check_mode:
        forget(sdir)
    msg = f"{what}: {state.get('reason') or ''}"
    module.fail_json(msg=msg, cause=msg, session_id=state.get("session_id"), status=status)


def forget(sdir: str) -> None:
    shutil.rmtree(sdir, ignore_errors=True)


# -- stopped


def stopped(module, runtime_dir: str) -> None:
    p = module.params
    sdir, state = find_session(module, runtime_dir)
    state = _sessions.mark_lost_if_dead(sdir, state, write=not module.check_mode)
    if state["status"] not in (_sessions.RUNNING, _sessions.STOPPED):
        if state["status"] == _sessions.STARTING:
            module.fail_json(msg=f"session {state['session_id']} has not started yet: its start waits for the checkpoint")
        fail_ended(module, sdir, state)
    if module.check_mode:
        module.exit_json(changed=True, msg=f"would stop backup session {state['session_id']}", **public(state))
    ensure_driver(module)
    if state["status"] == _sessions.RUNNING:
        state = request_stop(module, sdir, state)
    result = state["result"]
    out = public(state)
    out.update(result)
    out["duration"] = seconds_between(state["started_at"], result["stopped_at"])
    out["wal_files"] = wal_segment_count(state["start_wal"], result["stop_wal"], state["wal_segment_size"])
    try:
        if p["dest"]:
            out["files"] = write_label_files(p["dest"], result)
        out["wal_archived"] = False
        out["archive_wait_seconds"] = 0.0
        if p["wait_for_archive"]:
            out.update(wait_archive(module, sdir, state, result))
        elif state.get("backup_from") == "standby":
            out["primary_wal_switched"] = switch_without_waiting(module, state, result)
    except Failed as e:
        # The backup has ended on the server; the label stays in the session (and dest), and a
        # second stopped call resumes the wait.
        state["reason"] = e.extra["cause"]
        _sessions.write_state(sdir, state)
        module.fail_json(msg=e.msg, changed=True, **{**out, **e.extra})
    # Kept (0600, swept after 7 days): the label stays retrievable until the caller has stored it.
    state.update(delivered=True, delivered_at=_sessions.utcnow())
    _sessions.write_state(sdir, state)
    module.exit_json(changed=True, msg=f"backup {state['label']!r} stopped at {result['stop_lsn']}", **out)


def request_stop(module, sdir: str, state: dict) -> dict:
    reply = _sessions.request(sdir, {"op": "stop"}, timeout=120)
    if reply.get("ok"):
        if reply.get("warning"):
            module.warn(reply["warning"])
        return reply["state"]
    fresh = _sessions.read_state(sdir)
    if fresh is None:
        module.fail_json(
            msg=f"the session was aborted while this stop waited ({reply.get('error')}): backup unusable",
            session_id=state["session_id"],
        )
    fresh = _sessions.mark_lost_if_dead(sdir, fresh)
    if fresh.get("status") in ENDED:
        fail_ended(module, sdir, fresh)
    module.fail_json(msg=f"could not stop the backup: {reply.get('error')}", session_id=state["session_id"])


def write_label_files(dest: str, result: dict) -> list:
    if not os.path.isdir(dest):
        raise Failed(f"dest {dest} is not a directory; the label is kept in this result")
    # A copied data directory (method rsync) is fine; a live or crashed cluster never is.
    if os.path.exists(os.path.join(dest, "postmaster.pid")):
        raise Failed(f"dest {dest} holds a postmaster.pid: backup_label must never be written into a live cluster")
    written = [os.path.join(dest, "backup_label")]
    write_private_file(written[0], result["labelfile"].encode("utf-8"))
    if result.get("spcmapfile"):
        written.append(os.path.join(dest, "tablespace_map"))
        write_private_file(written[1], result["spcmapfile"].encode("utf-8"))
    return written


def wait_archive(module, sdir: str, state: dict, result: dict) -> dict:
    """Wait for the stop segment (and the .backup history file on a primary), bounded by archive_timeout.

    This task's pid is recorded in the session while it waits: the repository's lock stays
    taken while it runs and is free the moment it is gone (killed, Ctrl-C)."""
    p = module.params
    resume = (
        f"the label is kept in session {state['session_id']}: fix archiving, then run state=stopped with "
        f"session_id={state['session_id']} again to resume the wait"
    )
    try:
        conn = connect(connection_kwargs(p, application_name="pgops.online_backup archive wait"))
    except psycopg2.Error as e:
        cause = f"the backup stopped, but the archive cannot be checked: unable to connect to database: {error_text(e)}"
        raise Failed(f"{cause}. {resume}", cause) from None
    pid = os.getpid()
    state["archive_wait"] = {"pid": pid, "pid_starttime": _sessions.proc_stat(pid)[1], "since": _sessions.utcnow()}
    _sessions.write_state(sdir, state)
    try:
        major = major_of(state["server_version_num"])
        settings = archiving_settings(conn, major)
        standby = state.get("backup_from") == "standby"
        if standby and settings.get("archive_mode") != "always":
            raise Failed(
                "cannot wait for the archive: this standby does not archive WAL (archive_mode="
                f"{settings.get('archive_mode')}). Set archive_mode = always on the standby (restart needed), or stop with "
                f"wait_for_archive=false and make sure the primary's archive holds {state['start_wal']} to "
                f"{result['stop_wal']}. The label is kept in this result."
            )
        if not archiving_enabled(settings):
            module.warn(
                "WAL archiving is not enabled on this server: the backup's WAL "
                f"({state['start_wal']} to {result['stop_wal']}) must be kept by other means"
            )
            return {"wal_archived": False, "archive_wait_seconds": 0.0}
        names = [result["stop_wal"]]
        label = parse_labelfile(result["labelfile"])
        if not standby and label.get("start_wal"):
            names.insert(
                0, backup_history_file_name(label["start_wal"], parse_lsn(label["start_lsn"]), state["wal_segment_size"])
            )
        switched = switch_wal_on_primary(module, conn, state, result) if standby else None
        res = wait_for_wal(conn, names, p["archive_timeout"])
    finally:
        conn.close()
    out = {"wal_archived": res["archived"], "archive_wait_seconds": res["waited"], "archiver": res["archiver"]}
    if switched is not None:
        out["primary_wal_switched"] = switched
    if not res["archived"]:
        cause = describe_wait_failure(res, p["archive_timeout"])
        raise Failed(f"{cause}. The backup ended on the server; {resume}", cause, missing_wal=res["missing"], **out)
    return out


def switch_without_waiting(module, state: dict, result: dict):
    """A standby's stop that does not wait for the archive still has the primary finish the stop
    segment: on an idle primary without archive_timeout it would otherwise never be complete, and the
    backup could not be restored. A failure here is a warning (the backup itself has ended)."""
    try:
        conn = connect(connection_kwargs(module.params, application_name="pgops.online_backup standby stop"))
    except psycopg2.Error as e:
        module.warn(f"could not ask the primary to switch WAL (no connection to the standby: {error_text(e)}): "
                    f"make sure {result['stop_wal']} gets archived")  # fmt: skip
        return None
    try:
        return switch_wal_on_primary(module, conn, state, result)
    except Failed as e:
        module.warn(f"{e}: make sure {result['stop_wal']} gets archived")
        return None
    finally:
        conn.close()


def switch_wal_on_primary(module, standby_conn, state: dict, result: dict) -> bool:
    """A standby cannot switch WAL: have the primary finish the stop segment
    so that it reaches the standby and its archiver."""
    try:
        params = primary_params(module.params, standby_conn)
    except PgopsError as e:
        raise Failed(f"{e}. The label is kept in this result.") from None
    try:
        conn = connect(connection_kwargs(params, application_name="pgops.online_backup standby stop"))
    except psycopg2.Error as e:
        where = f"{params.get('login_host') or params.get('login_unix_socket')}:{params['port']}"
        raise Failed(
            f"unable to connect to the primary ({where}) to switch WAL for the standby backup: {error_text(e)}. "
            "Set the primary option. The label is kept in this result."
        ) from None
    try:
        lsn = parse_lsn(query_one(conn, "SELECT pg_current_wal_insert_lsn()::text")[0])
        if wal_file_name(1, lsn, state["wal_segment_size"])[8:] > result["stop_wal"][8:]:
            return False  # the primary has moved past the stop segment already
        query_one(conn, "SELECT pg_switch_wal()")
        return True
    except psycopg2.Error as e:
        raise Failed(
            f"the primary could not switch WAL for the standby backup ({error_text(e)}): point the primary option at the "
            "real primary, and grant EXECUTE ON FUNCTION pg_switch_wal() to the role. The label is kept in this result."
        ) from None
    finally:
        conn.close()


def seconds_between(a: str, b: str) -> float:
    return round((datetime.datetime.fromisoformat(b) - datetime.datetime.fromisoformat(a)).total_seconds(), 3)


# -- aborted


def aborted(module, runtime_dir: str) -> None:
    sdir, state = find_session(module, runtime_dir)
    state = _sessions.mark_lost_if_dead(sdir, state, write=not module.check_mode)
    live = state["status"] in _sessions.LIVE
    if module.check_mode:
        module.exit_json(changed=live, msg=f"would abort session {state['session_id']}", session_id=state["session_id"])
    changed = False
    if live:
        reply = _sessions.request(sdir, {"op": "abort"}, timeout=60)
        changed = bool(reply.get("ok"))
        if not changed:
            state = _sessions.mark_lost_if_dead(sdir, _sessions.read_state(sdir) or state)
            if state["status"] in _sessions.LIVE:
                module.fail_json(msg=f"could not abort session {state['session_id']}: {reply.get('error')}")
        elif state.get("backend_pid"):
            wait_backend_gone(module, state["backend_pid"])
    forget(sdir)
    module.exit_json(
        changed=changed,
        session_id=state["session_id"],
        status="aborted" if changed else state["status"],
        msg=f"session {state['session_id']} " + ("aborted" if changed else f"was already {state['status']}"),
    )


def wait_backend_gone(module, backend_pid: int, timeout: float = 10.0) -> None:
    """The server drops the backup when the backend exits; wait for that, briefly."""
    try:
        conn = connect(connection_kwargs(module.params, application_name="pgops.online_backup abort check"))
    except psycopg2.Error:
        return  # best effort: the keeper already closed the session
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not query_one(conn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend_pid,))[0]:
                return
            time.sleep(0.05)
    finally:
        conn.close()


def main():
    argument_spec = postgres_common_argument_spec()
    argument_spec.update(
        state=dict(type="str", required=True, choices=["started", "stopped", "aborted"]),
        label=dict(type="str"),
        session_id=dict(type="str"),
        fast=dict(type="bool", default=False),
        wait_for_archive=dict(type="bool", default=True),
        archive_timeout=dict(type="float", default=300),
        start_timeout=dict(type="float", default=1800),
        max_duration=dict(type="int", default=86400),
        keepalive_interval=dict(type="int", default=30),
        incremental_from_lsn=dict(type="str"),
        incremental_from_tli=dict(type="int"),
        lease=dict(type="int", default=0),
        dest=dict(type="path"),
        runtime_dir=dict(type="path"),
        progress_interval=dict(type="float", default=0),
        spread_checkpoint_hint=dict(type="str", default="fast=true"),
        primary=PRIMARY_SPEC,
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        required_together=[("incremental_from_lsn", "incremental_from_tli")],
        required_if=[
            ("state", "started", ["label"]),
            ("state", "stopped", ["session_id", "label"], True),
            ("state", "aborted", ["session_id", "label"], True),
        ],
    )
    runtime_dir = module.params["runtime_dir"] or _sessions.default_runtime_dir()
    if not os.path.isabs(runtime_dir):
        module.fail_json(msg=f"runtime_dir must be an absolute path, got {runtime_dir}")
    handler = {"started": started, "stopped": stopped, "aborted": aborted}[module.params["state"]]
    try:
        handler(module, runtime_dir)
    except Failed as e:
        module.fail_json(msg=e.msg, changed=module.params["state"] == "stopped", **e.extra)


if __name__ == "__main__":
    main()
