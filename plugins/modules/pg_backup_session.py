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
  - The keeper listens on a Unix socket (mode 0600) in a private directory (mode 0700) owned by
    the user the module runs as; only that user (or root) can talk to it. Credentials reach it in
    memory, never through its command line or environment.
  - The keeper keeps its session alive (no statement or idle timeouts, TCP keepalives, a cheap
    query every O(keepalive_interval) seconds) and ends the backup by itself after O(max_duration).
  - O(state=stopped) asks for the stop with C(wait_for_archive=false), keeps the label, then waits
    for the required WAL to be archived for at most O(archive_timeout) seconds. A wait that runs
    out fails with the missing WAL file and the archiver's state, and keeps the label; running
    O(state=stopped) again for the same session resumes the wait.
  - Optionally the start also runs the pre-flight of M(pgops.online_backup.pg_archiving_info) (O(preflight)) and
    opens the backup's record in a repository on this host (O(repository)), and the stop finishes that record
    (O(backup_id)) by writing C(backup_manifest) and marking it complete, as M(pgops.online_backup.pg_backup_catalog)
    does in tasks of its own. Each task an Ansible run saves is a fifth of a second or more; the role
    M(pgops.online_backup.pg_backup) uses these options when the repository is on the database host.
extends_documentation_fragment:
  - pgops.online_backup.connection
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
      - V(stopped) stops the backup of a running session and returns the label contents.
      - V(aborted) ends the backup without a usable result.
      - V(status) lists the sessions of O(runtime_dir) (running, stale, ended) without changing anything.
    type: str
    choices: [started, stopped, aborted, status]
    default: status
  label:
    description:
      - Backup label for O(state=started) (at most 1024 bytes, no NUL or line break).
      - With O(state=stopped) or O(state=aborted) and no O(session_id), selects the one running
        session of this cluster with this label.
    type: str
  session_id:
    description:
      - Session to stop or abort, as returned by O(state=started).
    type: str
  fast:
    description:
      - Request an immediate checkpoint at start instead of a spread one.
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
      - On expiry the keeper is killed, which makes the server abort the backup.
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
        M(pgops.online_backup.pg_backup_copy) sends while it copies) before it decides the run is gone (Ctrl-C, lost
        controller) and ends the backup. A copy the keeper runs itself (O(copy)) counts as word while it runs.
      - V(0) (the default) trusts the run until O(max_duration), for copy steps of your own that do not renew it.
    type: int
    default: 0
  keepalive_interval:
    description:
      - Seconds between the keeper's keepalive queries.
    type: int
    default: 30
  dest:
    description:
      - With O(state=stopped), a directory into which C(backup_label) and, when the cluster has
        tablespaces, C(tablespace_map) are written byte for byte (mode 0600).
      - Never point this at the live data directory.
    type: path
  primary:
    description:
      - For a backup taken on a standby, how to reach the primary, which must switch WAL so that the last
        segment the backup needs reaches the standby's archive. Options left out are taken from the
        standby's C(primary_conninfo) (host, port) and from this task's connection options.
    type: dict
    suboptions:
      login_host:
        description: Host of the primary.
        type: str
      login_unix_socket:
        description: Unix socket directory of the primary.
        type: str
      port:
        description: Port of the primary.
        type: int
      login_user:
        description: Role on the primary (needs EXECUTE on C(pg_switch_wal())).
        type: str
      login_password:
        description: Password of that role.
        type: str
      login_db:
        description: Database on the primary.
        type: str
  preflight:
    description:
      - With O(state=started), first run the checks of M(pgops.online_backup.pg_archiving_info) (settings, privileges,
        the archive proof of O(prove), the destination O(repository)) and refuse to start, naming every problem with
        its fix, before anything changes. The facts come back in RV(preflight).
      - Implied by O(repository).
    type: bool
    default: false
  prove:
    description:
      - With O(preflight), prove that archiving works (switch WAL, wait until the segment is archived), as
        M(pgops.online_backup.pg_archiving_info) does.
    type: bool
    default: true
  prove_timeout:
    description:
      - Seconds the proof waits for its segment to be archived.
    type: float
    default: 60
  space_margin:
    description:
      - With O(repository), the free space it needs, as a multiple of the expected backup size.
    type: float
    default: 1.1
  source:
    description:
      - With O(preflight), the kind of server this must be; the start is refused when it is not.
    type: str
    choices: [any, primary, standby]
    default: any
  repository:
    description:
      - With O(state=started), a backup repository on this host (absolute, outside the data directory and every
        tablespace). Before the backup starts, a new backup directory, its C(backup.json) (status C(running)) and
        the cluster's lock are made there, as M(pgops.online_backup.pg_backup_catalog) O(state=running) does; the
        keeper holds the lock. A start that fails after that marks the backup failed and releases the lock.
      - With O(state=stopped) and O(backup_id), the repository of the backup to finish.
    type: path
  record:
    description:
      - With O(repository), fields stored in C(backup.json) (at the start, and with O(state=stopped) at the end,
        together with the stop's LSNs, WAL range and times).
    type: dict
    default: {}
  data_directory:
    description:
      - With O(repository), the data directory recorded and kept out of the repository; found from the server when unset.
    type: path
  lock_grace:
    description:
      - With O(repository), seconds a fresh lock counts as taken before its keeper holds it.
    type: float
    default: 120
  keep_failed_files:
    description:
      - With O(repository), keep the files of a backup the keeper has to end by itself (its run gone, a failed
        copy, O(max_duration)) when it marks it failed, as O(pgops.online_backup.pg_backup_catalog#module:keep_failed_files) does.
    type: bool
    default: false
  metrics_file:
    description:
      - With O(backup_id), once the backup is complete (and for a backup the keeper has to mark failed), write the
        repository's backup metrics to this file in Prometheus' text format, as
        M(pgops.online_backup.pg_backup_catalog) does (its O(pgops.online_backup.pg_backup_catalog#module:metrics_file)).
    type: path
  backup_id:
    description:
      - With O(state=stopped) and O(repository), the backup (RV(backup_id) of the start) to finish after the stop
        and the archive wait - O(dest) should be its directory - writing C(backup_manifest) when
        O(manifest_checksum) is set, marking it complete, releasing the lock and applying O(keep).
    type: str
  manifest_checksum:
    description:
      - With O(backup_id), the manifest's checksum algorithm, as in M(pgops.online_backup.pg_backup_catalog).
    type: str
    choices: [auto, SHA224, SHA256, SHA384, SHA512, CRC32C, NONE]
  keep:
    description:
      - With O(backup_id), complete backups of this cluster to keep (0 keeps all).
    type: int
    default: 0
  copy:
    description:
      - With O(state=started), have the keeper copy the data directory and every tablespace right after the backup
        started, exactly as M(pgops.online_backup.pg_backup_copy) does (same code, same options), while this task
        returns. O(state=stopped) then waits for the copy to finish (however long it takes) before it stops the
        backup, and returns its result in RV(copy). A copy that fails ends the backup and fails the stop.
      - If the task waiting for the stop goes away (Ctrl-C, lost controller), the keeper kills the copy and ends
        the backup; so do O(state=aborted), O(max_duration) and O(lease).
      - Implies O(preflight) (the copy takes the data directory and tablespaces from it). Saves the copy task's
        round trip, and the stop task starts while the copy still runs.
    type: dict
    suboptions:
      dest:
        description: Directory the backup is written to; defaults to the backup's directory in O(repository).
        type: path
      method:
        description: As in M(pgops.online_backup.pg_backup_copy).
        type: str
        choices: [tar, cpio, rsync]
        default: tar
      compression:
        description: As in M(pgops.online_backup.pg_backup_copy).
        type: str
        choices: [none, gzip, zstd, lz4]
        default: none
      compression_level:
        description: As in M(pgops.online_backup.pg_backup_copy).
        type: int
      threads:
        description: As in M(pgops.online_backup.pg_backup_copy).
        type: int
        default: 0
      exclude_directories:
        description: As in M(pgops.online_backup.pg_backup_copy).
        type: list
        elements: str
        default: []
      manifest_checksum:
        description: As in M(pgops.online_backup.pg_backup_copy).
        type: str
        choices: [auto, SHA224, SHA256, SHA384, SHA512, CRC32C, NONE]
      repository_host:
        description: As in M(pgops.online_backup.pg_backup_copy).
        type: str
      ssh_port:
        description: As in M(pgops.online_backup.pg_backup_copy).
        type: int
        default: 22
      ssh_options:
        description: As in M(pgops.online_backup.pg_backup_copy).
        type: list
        elements: str
        default: []
  lock_file:
    description:
      - With O(state=started), an existing file the keeper holds a shared C(flock) on for as long as it lives, so that a
        repository lock can tell a running backup from one whose run died (used by the role M(pgops.online_backup.pg_backup)).
    type: path
  runtime_dir:
    description:
      - Private directory of the keepers' sockets and state files.
      - Defaults to C(~/.pgops_online_backup/sessions) of the user the module runs as.
    type: path
notes:
  - Start and stop must run as the same OS user on the same host (use the same C(become_user)).
  - Tested against PostgreSQL 12 to 18.
seealso:
  - name: Making a non-exclusive low-level backup
    description: PostgreSQL documentation.
    link: https://www.postgresql.org/docs/current/continuous-archiving.html#BACKUP-LOWLEVEL-BASE-BACKUP
"""

EXAMPLES = r"""
- name: Start the backup (the keeper holds the session)
  pgops.online_backup.pg_backup_session:
    state: started
    label: nightly
    login_unix_socket: /var/run/postgresql
  register: backup

- name: Copy the data directory while the backup runs
  ansible.builtin.command:
    cmd: >-
      tar -C /var/lib/postgresql/17/main -cf /backup/{{ backup.session_id }}/base.tar
      --exclude=./pg_wal/* --exclude=./postmaster.pid --exclude=./postmaster.opts
      --warning=no-file-changed --warning=no-file-removed .
  register: copy
  failed_when: copy.rc not in [0, 1]

- name: Stop the backup and write backup_label beside the copy
  pgops.online_backup.pg_backup_session:
    state: stopped
    session_id: "{{ backup.session_id }}"
    login_unix_socket: /var/run/postgresql
    dest: /backup/{{ backup.session_id }}
    archive_timeout: 120

- name: Abort instead when the copy failed
  pgops.online_backup.pg_backup_session:
    state: aborted
    session_id: "{{ backup.session_id }}"

- name: List the sessions of this user
  pgops.online_backup.pg_backup_session:
    state: status
  register: sessions
"""

RETURN = r"""
session_id:
  description: Identifier of the session; pass it to the stop task.
  returned: state is started, stopped or aborted
  type: str
  sample: 20261129T101500Z-0a1b2c3d
label:
  description: The backup label.
  returned: state is started or stopped
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
  returned: state is started
  type: float
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
  description: For a standby backup, whether the primary was asked to switch WAL.
  returned: state is stopped on a standby
  type: bool
files:
  description: Files written into O(dest).
  returned: state is stopped and dest is set
  type: list
  elements: str
copy:
  description:
    - With O(copy), C(status) (V(running) after the start; V(done) or V(failed) after the stop) and, when done,
      what M(pgops.online_backup.pg_backup_copy) returns (files, bytes, source_bytes, file_count, seconds,
      manifest_checksum, crc32c_implementation).
  returned: state is started or stopped with copy
  type: dict
preflight:
  description: With O(preflight) or O(repository), the facts and C(problems) of M(pgops.online_backup.pg_archiving_info).
  returned: state is started and preflight ran
  type: dict
backup_id:
  description: With O(repository), the backup's id in the repository.
  returned: state is started or stopped with repository
  type: str
path:
  description: With O(repository), the backup's directory.
  returned: state is started or stopped with repository
  type: str
backup:
  description: With O(repository), the backup's C(backup.json).
  returned: state is started or stopped with repository
  type: dict
manifest:
  description: With O(backup_id) and O(manifest_checksum), what the manifest holds (files, bytes, version, algorithm, seconds).
  returned: state is stopped with backup_id
  type: dict
lock_released:
  description: With O(backup_id), whether the cluster's lock was released.
  returned: state is stopped with backup_id
  type: bool
removed:
  description: With O(backup_id) and O(keep), backups removed by retention.
  returned: state is stopped with backup_id
  type: list
  elements: str
sessions:
  description: Sessions known to O(runtime_dir), each with status, alive and stale flags.
  returned: state is status
  type: list
  elements: dict
"""

import datetime
import os
import shutil
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils import _keeper
from ansible_collections.pgops.online_backup.plugins.module_utils._archive import (
    archiving_enabled,
    archiving_settings,
    describe_wait_failure,
    wait_for_wal,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._backup_api import (
    backup_history_file_name,
    explain_start_error,
    major_of,
    parse_labelfile,
    parse_lsn,
    validate_label,
    wal_file_name,
    wal_segment_count,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._copy import COPY_DEFAULTS, check_copy
from ansible_collections.pgops.online_backup.plugins.module_utils._files import (
    UnsafePathError,
    write_json,
    write_private_file,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._inspect import inspect_for_module
from ansible_collections.pgops.online_backup.plugins.module_utils._manifest import LayoutError, ManifestError
from ansible_collections.pgops.online_backup.plugins.module_utils._postgres import (
    cluster_key,
    connect,
    connection_kwargs,
    ensure_driver,
    parse_conninfo,
    postgres_common_argument_spec,
    query_one,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._record import complete_backup, open_backup
from ansible_collections.pgops.online_backup.plugins.module_utils._repository import (
    RepositoryError,
    fail_backup,
    valid_backup_id,
    validate_repository,
)

START_KEYS = (
    "session_id",
    "label",
    "start_lsn",
    "start_wal",
    "timeline",
    "server_version",
    "server_version_num",
    "system_identifier",
    "backup_from",
    "started_at",
)


def _public(state: dict) -> dict:
    return {k: state.get(k) for k in START_KEYS}


def run_preflight(module) -> dict:
    """pg_archiving_info's checks, before anything starts: the facts, or a
    failure that names every problem with its fix."""
    p = module.params
    facts = inspect_for_module(module, p["repository"], "pgops.online_backup pre-flight", "nothing was started: ")
    changed = facts["proof"]["switched"]
    standby = facts["in_recovery"]
    if (p["source"] == "primary" and standby) or (p["source"] == "standby" and not standby):
        kind = "a standby (in recovery)" if standby else "a primary"
        fix = "back up a standby with source=standby" if standby else "point the task at a standby"
        module.fail_json(msg=f"nothing was started: source is {p['source']} but this server is {kind}: {fix}", preflight=facts)
    problems = facts["problems"]
    if problems:
        listed = " ".join(f"[{pr['code']}] {pr['message']} Fix: {pr['hint']}" for pr in problems)
        module.fail_json(
            msg=f"nothing was started: {len(problems)} problem(s) on {cluster_key(p)}: {listed}",
            changed=changed,
            preflight=facts,
        )
    return facts


def data_directory(module, facts: dict) -> str:
    """The data directory to record and copy: the option, else the server's setting."""
    found = module.params["data_directory"] or facts["data_directory"]
    if not found:
        module.fail_json(
            msg=f"nothing was started: database role {facts['privileges']['role']} may not read the data_directory setting "
            "(needs superuser or pg_read_all_settings): grant that, or set the data_directory option"
        )
    return found


def open_record(module, facts: dict, data_dir: str) -> dict:
    """The backup's directory, backup.json (running) and the cluster's lock."""
    p = module.params
    repo = p["repository"]
    if not facts.get("system_identifier"):
        module.fail_json(
            msg=f"nothing was started: database role {facts['privileges']['role']} may not run pg_control_system() "
            "to read the cluster's system identifier, which names the backup's lock: grant EXECUTE on it, or use a superuser"
        )
    problem = validate_repository(repo, [data_dir] + [t["location"] for t in facts["tablespaces"]])
    if problem:
        module.fail_json(msg=f"nothing was started: {problem}")
    fields = dict(p["record"])
    fields.update(
        data_directory=data_dir,
        tablespaces=facts["tablespaces"],
        pg_version=facts["server_version_num"],
        pg_version_text=facts["server_version"],
    )
    try:
        return open_backup(repo, facts["system_identifier"], fields, p["lock_grace"], True, module.warn)
    except (RepositoryError, UnsafePathError, OSError) as e:
        module.fail_json(msg=f"nothing was started: {e}")


def started(module, runtime_dir):
    p = module.params
    problem = validate_label(p["label"] or "")
    if problem:
        module.fail_json(msg=f"invalid label: {problem}")
    if p["lease"] < 0 or (p["lease"] and p["lease"] < 5):
        module.fail_json(msg=f"lease must be 0 (off) or at least 5 seconds, got {p['lease']}")
    if p["max_duration"] < 1:
        module.fail_json(msg="max_duration must be at least 1 second")
    if p["lock_file"] and not os.path.isfile(p["lock_file"]):
        module.fail_json(msg=f"lock_file {p['lock_file']} does not exist")
    if p["repository"] and not os.path.isabs(p["repository"]):
        module.fail_json(msg=f"repository {p['repository']!r} must be an absolute path")
    if p["repository"] and p["lock_file"]:
        module.fail_json(msg="repository and lock_file exclude each other: the repository's own lock is held")
    facts = run_preflight(module) if p["preflight"] or p["repository"] or p["copy"] else None
    if module.check_mode:
        module.exit_json(
            changed=True,
            msg=f"would start backup {p['label']!r} on {cluster_key(p)}"
            + (f" and record it in {p['repository']}" if p["repository"] else ""),
            session_id=None,
            **({"preflight": facts} if facts else {}),
        )
    ensure_driver(module)
    try:
        _keeper.sweep(runtime_dir)
    except OSError:
        pass
    data_dir = data_directory(module, facts) if p["repository"] or p["copy"] else None
    record = open_record(module, facts, data_dir) if p["repository"] else None
    try:
        copy = copy_spec(module, facts, record, data_dir)
        out = start_keeper(module, runtime_dir, record, copy, facts)
    except StartFailed as e:
        if record:
            # Nothing may look usable, and the lock goes: the run failed before its copy.
            try:
                fail_backup(
                    p["repository"], record["backup_id"], facts["system_identifier"], e.msg, False, metrics_file=p["metrics_file"]
                )
            except (RepositoryError, OSError) as err:
                module.warn(f"could not mark backup {record['backup_id']} failed: {err}")
        module.fail_json(msg=e.msg, **e.extra)
    if facts:
        out["preflight"] = facts
    if record:
        out.update(backup_id=record["backup_id"], path=record["path"], lock=record["lock"], backup=record["backup"])
    if copy:
        out["copy"] = {"status": "running", "dest": copy["dest"], "method": copy["method"]}
    module.exit_json(changed=True, msg=f"backup {p['label']!r} started at {out['start_lsn']}", **out)


def copy_spec(module, facts: dict | None, record: dict | None, data_dir: str | None) -> dict | None:
    """What the keeper copies right after the start (pg_backup_copy's options), checked now."""
    p = module.params
    if not p["copy"]:
        return None
    spec = dict(COPY_DEFAULTS)
    spec.update({k: v for k, v in p["copy"].items() if v is not None})
    spec.update(
        data_directory=data_dir,
        tablespaces=facts["tablespaces"],
        server_version_num=facts["server_version_num"],
        dest=p["copy"]["dest"] or (record["path"] if record else None),
    )
    if not spec["dest"]:
        raise StartFailed("nothing was started: copy needs dest, or repository for the backup's own directory")
    problem = check_copy(spec)
    if problem:
        raise StartFailed(f"nothing was started: {problem}")
    return spec


class StartFailed(Exception):
    def __init__(self, msg: str, **extra):
        super().__init__(msg)
        self.msg = msg
        self.extra = extra


def start_keeper(module, runtime_dir, record: dict | None, copy: dict | None = None, facts: dict | None = None) -> dict:
    """Launch the keeper and have it start the backup; StartFailed says why not."""
    p = module.params
    spec = {
        "session_id": _keeper.new_session_id(),
        "label": p["label"],
        "fast": p["fast"],
        "max_duration": p["max_duration"],
        "keepalive_interval": max(1, p["keepalive_interval"]),
        "cluster": cluster_key(p),
        "lock_file": record["lock"] if record else p["lock_file"],
        "lease": p["lease"],
        "copy": copy,
        # A backup the keeper has to end by itself (its run gone, max_duration, a failed
        # copy) is marked failed in its record at once, which frees the cluster's lock.
        "record": {
            "repository": p["repository"],
            "backup_id": record["backup_id"],
            "cluster": facts["system_identifier"],
            "keep_files": p["keep_failed_files"],
            "metrics_file": p["metrics_file"],
        }
        if record
        else None,
    }
    kw = connection_kwargs(p, application_name=f"pgops.online_backup keeper {spec['session_id']}")
    try:
        report = _keeper.launch(kw, spec, runtime_dir, p["start_timeout"])
    except (_keeper.KeeperError, UnsafePathError, OSError) as e:
        raise StartFailed(f"cannot start the session keeper: {e}") from None
    if not report.get("ok"):
        stage = report.get("stage")
        err = report.get("error", "unknown error")
        if stage == "connect":
            raise StartFailed(f"unable to connect to database: {err}")
        major = major_of(report.get("version_num") or 150000)
        raise StartFailed(
            f"could not start the backup: {explain_start_error(report.get('sqlstate'), err, major, p['login_user'])}",
            sqlstate=report.get("sqlstate"),
        )
    state = report["state"]
    out = _public(state)
    out.update(
        start_seconds=state.get("start_seconds"),
        expires_at=state.get("expires_at"),
        keeper_pid=state.get("pid"),
        keeper_pid_starttime=state.get("pid_starttime"),
        wal_segment_size=state.get("wal_segment_size"),
    )
    return out


def find_session(module, runtime_dir):
    """The session directory and state chosen by session_id or unique label."""
    p = module.params
    if p["session_id"]:
        try:
            sdir = _keeper.session_dir(runtime_dir, p["session_id"])
        except _keeper.KeeperError as e:
            module.fail_json(msg=str(e))
        state = _keeper.read_state(sdir)
        if state is None:
            module.fail_json(
                msg=f"unknown session id {p['session_id']}: no such session in {runtime_dir} "
                "(start and stop must run on the same host as the same OS user)"
            )
        return sdir, state
    if not p["label"]:
        module.fail_json(msg="session_id or label is required to select a session")
    key = cluster_key(p)
    matches = [
        s
        for s in _keeper.list_sessions(runtime_dir)
        if s.get("label") == p["label"] and s.get("cluster") == key and s.get("status") in ("running", "stopped")
    ]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)}"
        module.fail_json(msg=f"{what} running sessions with label {p['label']!r} on {key}; pass session_id")
    sid = matches[0]["session_id"]
    sdir = _keeper.session_dir(runtime_dir, sid)
    return sdir, _keeper.read_state(sdir)


def fail_ended(module, sdir, state):
    """A session that can no longer give a usable backup: say why, forget it."""
    status = state.get("status")
    reason = state.get("reason") or ""
    what = {
        "lost": "session lost, backup unusable",
        "expired": "session expired, backup unusable",
        "aborted": "session was aborted, backup unusable",
        "failed": "the stop failed, backup unusable",
    }.get(status, f"session is {status}")
    if not module.check_mode:
        _forget(sdir)
    module.fail_json(msg=f"{what}: {reason}", session_id=state.get("session_id"), status=status)


def _forget(sdir):
    shutil.rmtree(sdir, ignore_errors=True)


def stopped(module, runtime_dir):
    p = module.params
    if p["backup_id"] and not p["repository"]:
        module.fail_json(msg="backup_id needs repository: the repository of the backup to finish")
    if p["backup_id"] and not valid_backup_id(p["backup_id"]):
        module.fail_json(msg=f"invalid backup_id {p['backup_id']!r}")
    if module.check_mode and not (p["session_id"] or p["label"]):
        module.exit_json(changed=True, msg="would stop the backup session")
    sdir, state = find_session(module, runtime_dir)
    state = _keeper.mark_lost_if_dead(sdir, state, write=not module.check_mode)
    if state["status"] not in ("running", "stopped"):
        fail_ended(module, sdir, state)
    if module.check_mode:
        module.exit_json(changed=True, msg=f"would stop backup session {state['session_id']}", **_public(state))
    ensure_driver(module)
    if state["status"] == "running":
        # A copy the keeper runs is waited for, however long it takes (the keeper
        # ends the backup if this task goes away meanwhile).
        copying = (state.get("copy") or {}).get("status") == "running"
        reply = _keeper.request(sdir, {"op": "stop"}, timeout=None if copying else 120)
        if reply.get("copy_failed"):
            _forget(sdir)
            module.fail_json(msg=reply["error"], session_id=state["session_id"], copy=reply["state"].get("copy"))
        if not reply.get("ok"):
            if reply.get("unreachable"):
                state = _keeper.mark_lost_if_dead(sdir, _keeper.read_state(sdir) or state)
                if state["status"] != "running":
                    fail_ended(module, sdir, state)
            fresh = _keeper.read_state(sdir)
            if fresh is None:
                # Its session directory went while we waited: an abort (which forgets it) got there first.
                module.fail_json(
                    msg=f"the session was aborted while this stop waited ({reply.get('error')}): backup unusable",
                    session_id=state["session_id"],
                )
            if fresh.get("status") in ("lost", "expired", "aborted", "failed"):
                fail_ended(module, sdir, fresh)
            module.fail_json(msg=f"could not stop the backup: {reply.get('error')}", session_id=state["session_id"])
        state = reply["state"]
        if reply.get("warning"):
            module.warn(reply["warning"])
    result = state["result"]
    out = _public(state)
    out.update(result)
    if state.get("copy"):
        out["copy"] = state["copy"]
    out["duration"] = _seconds_between(state["started_at"], result["stopped_at"])
    out["wal_files"] = wal_segment_count(state["start_wal"], result["stop_wal"], state["wal_segment_size"])
    files = []
    if p["dest"]:
        files = write_label_files(module, p["dest"], result)
        out["files"] = files
    out["wal_archived"] = False
    out["archive_wait_seconds"] = 0.0
    if p["wait_for_archive"]:
        wait = wait_archive(module, state, result)
        out.update(wait)
        if wait.get("failed"):
            # The backup has ended on the server; label and files are kept and a
            # second stopped call resumes this wait.
            state["reason"] = wait["msg"]
            write_json(os.path.join(sdir, _keeper.STATE_FILE), state)
            module.fail_json(changed=True, **{k: v for k, v in out.items() if k != "failed"})
    # Kept (0600, swept after 7 days): the label stays retrievable until the caller has stored it.
    state["delivered"] = True
    write_json(os.path.join(sdir, _keeper.STATE_FILE), state)
    msg = f"backup {state['label']!r} stopped at {result['stop_lsn']}"
    if p["backup_id"]:
        out.update(finish_record(module, state, out))
        msg += f"; backup {p['backup_id']} is complete"
    module.exit_json(changed=True, msg=msg, **out)


STOP_FIELDS = (
    "session_id", "start_lsn", "start_wal", "started_at", "stop_requested_at", "stopped_at", "stop_lsn", "stop_wal",
    "timeline", "backup_from", "wal_files", "wal_archived", "duration", "archive_wait_seconds",
)  # fmt: skip


def finish_record(module, state: dict, out: dict) -> dict:
    """backup.json gets the stop's facts, the manifest is written, the backup
    is marked complete and the lock released (pg_backup_catalog state=complete)."""
    p = module.params
    fields = dict(p["record"])
    copy = out.get("copy")
    if copy:  # the keeper copied: what the role would have recorded from its copy task
        fields.update(
            copy_seconds=copy["seconds"],
            files=[f["name"] for f in copy["files"]],
            bytes=copy["bytes"],
            source_bytes=copy["source_bytes"],
            crc32c_implementation=copy.get("crc32c_implementation"),
        )
    fields.update({k: out.get(k) for k in STOP_FIELDS})
    try:
        done = complete_backup(
            p["repository"],
            p["backup_id"],
            state["system_identifier"],
            fields,
            p["manifest_checksum"],
            p["keep"],
            module.warn,
            p["metrics_file"],
        )
    except (RepositoryError, UnsafePathError, ManifestError, LayoutError, ValueError, OSError) as e:
        module.fail_json(
            msg=f"the backup stopped, but backup {p['backup_id']} could not be marked complete: {e}",
            changed=True,
            **{k: v for k, v in out.items() if k != "failed"},
        )
    return {k: done[k] for k in ("backup_id", "path", "backup", "manifest", "lock_released", "removed")}


def wait_archive(module, state, result) -> dict:
    p = module.params
    try:
        conn = connect(connection_kwargs(p, application_name="pgops.online_backup archive wait"))
    except Exception as e:  # noqa: BLE001 - psycopg2's errors; the label must come back with any failure
        module.fail_json(
            msg=f"the backup stopped, but the archive cannot be checked: unable to connect to database: {e}. The label is "
            f"kept in this result and in the session; run state=stopped with session_id={state['session_id']} again to resume",
            changed=True,
            **result,
        )
    try:
        major = major_of(state["server_version_num"])
        settings = archiving_settings(conn, major)
        standby = state.get("backup_from") == "standby"
        if standby and settings.get("archive_mode") != "always":
            module.fail_json(
                msg="cannot wait for the archive: this standby does not archive WAL (archive_mode="
                f"{settings.get('archive_mode')}). Set archive_mode = always on the standby (restart needed), or stop with "
                "wait_for_archive=false and make sure the primary's archive holds "
                f"{state['start_wal']} to {result['stop_wal']}. The label is kept in this result.",
                changed=True,
                **result,
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
        out["failed"] = True
        out["missing_wal"] = res["missing"]
        out["msg"] = (
            describe_wait_failure(res, p["archive_timeout"])
            + ". The backup ended on the server and its label is kept (labelfile in this result"
            + (f", backup_label in {p['dest']}" if p["dest"] else "")
            + f"); fix archiving, then run state=stopped with session_id={state['session_id']} again to resume the wait"
        )
    return out


def _primary_params(module, conn, result: dict) -> dict:
    """Where the primary is: the primary option, else the standby's primary_conninfo."""
    p = module.params
    primary = {k: v for k, v in (p["primary"] or {}).items() if v not in (None, "")}
    if not (primary.get("login_host") or primary.get("login_unix_socket")):
        try:
            info = query_one(conn, "SELECT current_setting('primary_conninfo')")[0]
        except Exception as e:  # noqa: BLE001 - reported as a clear failure below
            module.fail_json(
                msg=f"cannot read primary_conninfo to find the primary ({e}); set the primary option. "
                "The label is kept in this result.",
                changed=True,
                **result,
            )
        parsed = parse_conninfo(info)
        primary.setdefault("login_host", parsed.get("host", ""))
        if parsed.get("port") and not primary.get("port"):
            primary["port"] = int(parsed["port"])
    merged = {k: p[k] for k in ("login_user", "login_password", "login_db", "ssl_mode", "ca_cert", "ssl_cert", "ssl_key")}
    merged.update(login_host="", login_unix_socket="", port=5432, connect_params={})
    merged.update({k: v for k, v in primary.items() if v not in (None, "")})
    return merged


def switch_wal_on_primary(module, standby_conn, state, result) -> bool:
    """A standby cannot switch WAL: have the primary finish the stop segment
    so that it reaches the standby and its archiver."""
    params = _primary_params(module, standby_conn, result)
    try:
        conn = connect(connection_kwargs(params, application_name="pgops.online_backup standby stop"))
    except Exception as e:  # noqa: BLE001 - psycopg2 may be absent from the type namespace
        where = f"{params.get('login_host') or params.get('login_unix_socket')}:{params['port']}"
        module.fail_json(
            msg=f"unable to connect to the primary ({where}) "
            f"to switch WAL for the standby backup: {e}. Set the primary option. The label is kept in this result.",
            changed=True,
            **result,
        )
    try:
        lsn = parse_lsn(query_one(conn, "SELECT pg_current_wal_insert_lsn()::text")[0])
        if wal_file_name(1, lsn, state["wal_segment_size"])[8:] > result["stop_wal"][8:]:
            return False  # the primary has moved past the stop segment already
        query_one(conn, "SELECT pg_switch_wal()")
        return True
    except Exception as e:  # noqa: BLE001 - psycopg2 errors: a cascading "primary" or a missing grant
        module.fail_json(
            msg=f"the primary could not switch WAL for the standby backup ({e}): point the primary option at the real "
            "primary, and grant EXECUTE ON FUNCTION pg_switch_wal() to the role. The label is kept in this result.",
            changed=True,
            **result,
        )
    finally:
        conn.close()


def write_label_files(module, dest, result) -> list:
    if not os.path.isdir(dest):
        module.fail_json(msg=f"dest {dest} is not a directory")
    # A copied data directory (method rsync) is fine; a live or crashed cluster never is.
    if os.path.exists(os.path.join(dest, "postmaster.pid")):
        module.fail_json(msg=f"dest {dest} holds a postmaster.pid: backup_label must never be written into a live cluster")
    written = [os.path.join(dest, "backup_label")]
    write_private_file(written[0], result["labelfile"].encode("utf-8"))
    if result.get("spcmapfile"):
        written.append(os.path.join(dest, "tablespace_map"))
        write_private_file(written[1], result["spcmapfile"].encode("utf-8"))
    return written


def _seconds_between(a: str, b: str) -> float:
    return round((datetime.datetime.fromisoformat(b) - datetime.datetime.fromisoformat(a)).total_seconds(), 3)


def aborted(module, runtime_dir):
    p = module.params
    if module.check_mode and not (p["session_id"] or p["label"]):
        module.exit_json(changed=True, msg="would abort the backup session")
    sdir, state = find_session(module, runtime_dir)
    state = _keeper.mark_lost_if_dead(sdir, state, write=not module.check_mode)
    if module.check_mode:
        module.exit_json(changed=state["status"] == "running", msg=f"would abort session {state['session_id']}")
    changed = False
    if state["status"] == "running":
        reply = _keeper.request(sdir, {"op": "abort"}, timeout=90)  # longer than the keeper takes to stop a copy (60 s)
        changed = bool(reply.get("ok"))
        if not changed:
            state = _keeper.mark_lost_if_dead(sdir, _keeper.read_state(sdir) or state)
            if state["status"] == "running":
                module.fail_json(msg=f"could not abort session {state['session_id']}: {reply.get('error')}")
        else:
            _wait_backend_gone(module, state)
    _forget(sdir)
    module.exit_json(
        changed=changed,
        session_id=state["session_id"],
        status="aborted" if changed else state["status"],
        msg=f"session {state['session_id']} " + ("aborted" if changed else f"was already {state['status']}"),
    )


def _wait_backend_gone(module, state, timeout=10.0):
    """The server drops the backup when the backend exits; wait for that, briefly."""
    kw = connection_kwargs(module.params, application_name="pgops.online_backup abort check")
    try:
        conn = connect(kw)
    except Exception:  # noqa: BLE001 - best effort; the keeper already closed the session
        return
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not query_one(conn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (state["backend_pid"],))[0]:
                return
            time.sleep(0.05)
    finally:
        conn.close()


def status(module, runtime_dir):
    module.exit_json(changed=False, sessions=_keeper.list_sessions(runtime_dir), runtime_dir=runtime_dir)


def main():
    argument_spec = postgres_common_argument_spec()
    argument_spec.update(
        state=dict(type="str", default="status", choices=["started", "stopped", "aborted", "status"]),
        label=dict(type="str"),
        session_id=dict(type="str"),
        fast=dict(type="bool", default=False),
        wait_for_archive=dict(type="bool", default=True),
        archive_timeout=dict(type="float", default=300),
        start_timeout=dict(type="float", default=1800),
        max_duration=dict(type="int", default=86400),
        keepalive_interval=dict(type="int", default=30),
        lease=dict(type="int", default=0),
        dest=dict(type="path"),
        lock_file=dict(type="path"),
        runtime_dir=dict(type="path"),
        preflight=dict(type="bool", default=False),
        prove=dict(type="bool", default=True),
        prove_timeout=dict(type="float", default=60),
        space_margin=dict(type="float", default=1.1),
        source=dict(type="str", default="any", choices=["any", "primary", "standby"]),
        repository=dict(type="path"),
        record=dict(type="dict", default={}),
        data_directory=dict(type="path"),
        lock_grace=dict(type="float", default=120),
        backup_id=dict(type="str"),
        manifest_checksum=dict(type="str", choices=["auto", "SHA224", "SHA256", "SHA384", "SHA512", "CRC32C", "NONE"]),
        keep=dict(type="int", default=0),
        keep_failed_files=dict(type="bool", default=False),
        metrics_file=dict(type="path"),
        copy=dict(
            type="dict",
            options=dict(
                dest=dict(type="path"),
                method=dict(type="str", default="tar", choices=["tar", "cpio", "rsync"]),
                compression=dict(type="str", default="none", choices=["none", "gzip", "zstd", "lz4"]),
                compression_level=dict(type="int"),
                threads=dict(type="int", default=0),
                exclude_directories=dict(type="list", elements="str", default=[]),
                manifest_checksum=dict(type="str", choices=["auto", "SHA224", "SHA256", "SHA384", "SHA512", "CRC32C", "NONE"]),
                repository_host=dict(type="str"),
                ssh_port=dict(type="int", default=22),
                ssh_options=dict(type="list", elements="str", default=[]),
            ),
        ),
        primary=dict(
            type="dict",
            options=dict(
                login_host=dict(type="str"),
                login_unix_socket=dict(type="str"),
                port=dict(type="int"),
                login_user=dict(type="str"),
                login_password=dict(type="str", no_log=True),
                login_db=dict(type="str"),
            ),
        ),
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        required_if=[("state", "started", ["label"])],
    )
    runtime_dir = module.params["runtime_dir"] or _keeper.default_runtime_dir()
    if not os.path.isabs(runtime_dir):
        module.fail_json(msg=f"runtime_dir must be an absolute path, got {runtime_dir}")
    handler = {"started": started, "stopped": stopped, "aborted": aborted, "status": status}[module.params["state"]]
    handler(module, runtime_dir)


if __name__ == "__main__":
    main()
