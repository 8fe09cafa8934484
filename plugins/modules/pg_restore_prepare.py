#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_restore_prepare
short_description: Restore a PostgreSQL backup into a data directory, ready for archive recovery
version_added: 0.1.0
description:
  - Restores one backup of this collection's repository layout (C(<repository>/<backup_id>), with C(backup.json)
    saying C(status=complete)) into an empty or absent data directory, as PostgreSQL's documentation describes
    for a restore from a low-level base backup, and leaves it ready to start. It does not start the server
    (see M(pgops.online_backup.pg_restore_server)).
  - "Tar and cpio backups: C(base.tar)/C(base.cpio) (plain, C(.gz), C(.zst) or C(.lz4), decompressed with
    pigz/gzip, zstd or lz4) are extracted into the data directory and each C(<oid>.tar)/C(<oid>.cpio) into its
    tablespace directory; C(backup_label) and C(tablespace_map) are copied from the backup root.
    Rsync backups: C(data/) and C(tablespaces/<oid>/) are copied with rsync."
  - An incremental backup (C(type=incremental) in C(backup.json)) is restored with its chain - its parent, the
    parent's parent, down to a full backup, found beside it in the same repository, each checked complete and of
    the same cluster - every one extracted into a private scratch directory beside O(data_directory) (removed
    afterwards), then reconstructed by PostgreSQL's C(pg_combinebackup) into O(data_directory) and the tablespace
    paths (C(pg_combinebackup) of the backup's major, from O(bin_dir), the server's client tools or C(PATH)).
  - A file-level incremental (before PostgreSQL 17, method tar) is extracted, then each file it took from an earlier
    backup of its chain (C(backup_files.json)) is extracted from that backup's archive. A file-level rsync backup
    is a complete directory and is restored as it is.
  - Tablespaces go back to their original locations unless O(tablespace_map) moves them; C(tablespace_map)
    is rewritten with the new paths and C(pg_tblspc/<oid>) links to them.
  - Writes the recovery settings into C(postgresql.auto.conf) (C(restore_command), at most one
    C(recovery_target*), C(recovery_target_action), C(recovery_target_timeline)) and creates C(recovery.signal).
    Earlier recovery settings copied from the original server are dropped (or commented out in
    C(postgresql.conf)) so they cannot combine with the new target.
  - The restored server is kept away from the original one. It gets C(archive_mode=off) (unless O(keep_archiving)),
    its own O(port), O(listen_addresses) and O(socket_directory), no C(external_pid_file), and empty
    C(archive_cleanup_command) and C(recovery_end_command) (a standby's C(archive_cleanup_command) would delete WAL
    from the original's archive at every restartpoint of the recovery); C(hot_standby=on), so that the run can watch
    the recovery, and C(lc_messages=C), since the run reads the server's messages (O(settings) may say otherwise for
    C(hot_standby), C(recovery_end_command) and C(lc_messages)). C(postmaster.pid),
    C(postmaster.opts), C(recovery.conf), C(standby.signal), replication slots and WAL segments that came with
    the copy are removed. A C(data_directory) setting in the copied C(postgresql.conf) is commented out.
  - Everything is checked before anything changes (input, backup, free space, target directories, binaries,
    decompressors, the WAL archive); a failure while restoring puts the target directories back as they were.
  - "A backup on a repository host (O(repository_host)) is pulled over ssh from there: its archives are streamed into
    the extraction (C(ssh cat | decompress | tar -x), nothing staged on this host), an rsync backup is copied by rsync
    over ssh, the parents of an incremental backup are read there too, and the check of O(wal_directory) lists the
    WAL archive there. This host may be another machine than the one that was backed up: other paths, other port."
extends_documentation_fragment:
  - pgops.online_backup.attributes
  - pgops.online_backup.age_identity
  - pgops.online_backup.s3
  - pgops.online_backup.repository_host
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: Runs every check and reports what it would restore where; changes nothing.
  diff_mode:
    support: none
  idempotent:
    support: none
    details: A second run finds the data directory not empty and refuses, unless O(force=true), which restores again.
options:
  backup_path:
    description:
      - The backup directory (C(<repository>/<backup_id>)); its C(backup.json) must say C(status=complete).
      - M(pgops.online_backup.pg_backup_info) with O(pgops.online_backup.pg_backup_info#module:backup=latest) gives it.
      - Or C(s3://bucket/prefix/<backup_id>) (with the O(s3_endpoint) options). Its small files are downloaded to a
        private temporary directory and its archives are streamed from the bucket into the extraction (ranged GETs in
        parallel, no local copy of an archive).
      - Or, with O(repository_host), the backup directory on that host.
    type: str
    required: true
  data_directory:
    description:
      - Absolute path of the data directory to restore into. Created (mode 0700) when absent; must be empty
        unless O(force=true).
    type: path
    required: true
  force:
    description:
      - Replace the content of a non-empty data directory or tablespace directory.
      - A directory that belongs to a running server is never replaced.
    type: bool
    default: false
  tablespace_map:
    description:
      - New locations of tablespaces. Keys are a tablespace's OID, its original location, or its name; values
        are absolute paths. Tablespaces not named here go back to their original locations.
      - A key that matches no tablespace of the backup is an error.
    type: dict
    default: {}
  wal_archive:
    description:
      - Directory of the archived WAL (what C(archive_command) copied to). The C(restore_command) copies from it.
      - Mutually exclusive with O(restore_command).
    type: path
  restore_command:
    description:
      - The C(restore_command) to write, for archives that are not a plain directory (for example compressed
        WAL or a remote store). It must fail for a file that does not exist.
    type: str
  check_wal:
    description:
      - With O(wal_archive) (or O(wal_directory)), fail before restoring when the archive lacks a WAL segment the backup
        needs (from C(start_wal) to C(stop_wal) of C(backup.json)), naming it.
    type: bool
    default: true
  wal_directory:
    description:
      - With O(restore_command), the directory that command reads from, for the check of O(check_wal) (files there may
        be compressed, as C(pgops-wal) stores them in C(<repository>/wal/<system identifier>/)).
      - With O(repository_host), a directory on that host (the check lists it over ssh); O(wal_archive) is always a
        directory of this host.
    type: path
  target:
    description:
      - Where recovery stops. V(latest) replays all archived WAL; V(immediate) stops as soon as the backup is
        consistent; V(time), V(lsn), V(name) (a restore point) and V(xid) stop at O(target_value).
    type: str
    choices: [immediate, latest, time, lsn, name, xid]
    default: latest
  target_value:
    description:
      - The value for O(target=time) (a timestamp with a time zone, for example V(2026-11-29 10:15:00+00)),
        O(target=lsn) (for example V(0/3000060)), O(target=name) or O(target=xid). Must be empty otherwise.
    type: str
  target_action:
    description:
      - What the server does at the target (C(recovery_target_action)). Not written for O(target=latest).
    type: str
    choices: [promote, pause, shutdown]
    default: promote
  target_timeline:
    description:
      - C(recovery_target_timeline) (V(latest), V(current) or a number).
    type: str
    default: latest
  target_inclusive:
    description:
      - C(recovery_target_inclusive) for time, lsn and xid targets (stop after the target rather than just before it).
    type: bool
    default: true
  port:
    description:
      - Port of the restored server. V(0) picks a free one (returned in RV(port)).
      - The original server's port (from the copied configuration) is refused unless O(allow_original_port=true),
        and a port in use always is.
    type: int
    required: true
  allow_original_port:
    description:
      - Allow the original server's port, for a restore on another host that takes the original's place.
    type: bool
    default: false
  listen_addresses:
    description:
      - C(listen_addresses) of the restored server. The default, empty, means the Unix socket only.
    type: str
    default: ''
  socket_directory:
    description:
      - C(unix_socket_directories) of the restored server (one directory). Default C(/var/run/postgresql) when it
        exists and is writable, else C(/tmp).
    type: path
  keep_archiving:
    description:
      - Keep the original's archiving settings. By default C(archive_mode=off) is written, so that the restored
        server never archives into the original's WAL archive.
    type: bool
    default: false
  access:
    description:
      - V(keep) keeps the restored C(pg_hba.conf).
      - V(socket_trust) writes a C(pg_hba.conf) with C(local all all trust) only (and points C(hba_file) at it),
        for drills on a scratch server; O(socket_directory) must then not be accessible to other users.
    type: str
    choices: [keep, socket_trust]
    default: keep
  settings:
    description:
      - More settings for the restored server, written into C(postgresql.auto.conf) after the others.
      - The settings the other options manage (C(port), C(listen_addresses), C(unix_socket_directories),
        C(archive_mode), C(hba_file), C(external_pid_file), C(restore_command), C(recovery_target*)) are refused here.
    type: dict
    default: {}
  bin_dir:
    description:
      - Directory with C(pg_ctl) and C(postgres) of the backup's major version. Default is the first of
        C(/usr/lib/postgresql/<major>/bin), C(/usr/pgsql-<major>/bin), C(/var/cache/pgops-online-backup/pg/<major>/bin)
        whose C(postgres --version) matches.
    type: path
notes:
  - Run it as the OS user that will run the restored server (C(become_user=postgres)); PostgreSQL refuses to run as root.
  - The backup files are only read.
seealso:
  - module: pgops.online_backup.pg_restore_server
  - module: pgops.online_backup.pg_backup_info
  - name: Recovering using a continuous archive backup
    description: PostgreSQL documentation.
    link: https://www.postgresql.org/docs/current/continuous-archiving.html#BACKUP-PITR-RECOVERY
"""

EXAMPLES = r"""
- name: Find the latest complete backup
  pgops.online_backup.pg_backup_info:
    repository: /backup/pg
    backup: latest
  register: chosen

- name: Restore it to a point in time, on port 5433
  pgops.online_backup.pg_restore_prepare:
    backup_path: "{{ chosen.backup.path }}"
    data_directory: /srv/pg/restored
    wal_archive: /backup/wal
    target: time
    target_value: "2026-11-29 10:15:00+00"
    port: 5433
    tablespace_map:
      "16390": /srv/pg/restored_ts
  become: true
  become_user: postgres

- name: Find the latest backup on the repository host
  pgops.online_backup.pg_backup_info:
    repository: /backup/pg
    backup: latest
  delegate_to: repo1.example.com
  register: on_repo

- name: Restore it here, pulled over ssh; recovery gets its WAL from there with pgops-wal
  pgops.online_backup.pg_restore_prepare:
    backup_path: "{{ on_repo.backup.path }}"
    repository_host: postgres@repo1.example.com
    ssh_options: [-i, /var/lib/postgresql/.ssh/id_backup]
    data_directory: /srv/pg/restored
    restore_command: >-
      /usr/local/bin/pgops-wal get --repository /backup/pg --cluster {{ on_repo.backup.system_identifier }}
      --host postgres@repo1.example.com --ssh-option=-i --ssh-option=/var/lib/postgresql/.ssh/id_backup %f %p
    wal_directory: /backup/pg/wal/{{ on_repo.backup.system_identifier }}
    port: 5433
  become: true
  become_user: postgres
"""

RETURN = r"""
chain:
  description:
    - For an incremental backup, the ids of the backups it was reconstructed from with C(pg_combinebackup), oldest
      (the full one) first, or a file-level incremental (C(tar)) that took files from them; empty for a full backup.
  returned: always
  type: list
  elements: str
backup_id:
  description: The restored backup.
  returned: always
  type: str
data_directory:
  description: The restored data directory.
  returned: always
  type: str
major:
  description: PostgreSQL major version of the backup.
  returned: always
  type: int
bin_dir:
  description: Directory of the C(pg_ctl) and C(postgres) to run the restored data directory with.
  returned: always
  type: str
port:
  description: Port of the restored server (the one picked when O(port=0)).
  returned: always
  type: int
socket_directory:
  description: Unix socket directory of the restored server.
  returned: always
  type: str
tablespaces:
  description: Each tablespace with C(oid), C(name), original C(location) and new C(path).
  returned: always
  type: list
  elements: dict
settings:
  description: The settings written (or to be written, in check mode) into C(postgresql.auto.conf).
  returned: always
  type: dict
method:
  description: Backup method (C(tar), C(cpio), C(rsync)).
  returned: always
  type: str
removed:
  description: Files of the original server removed from the restored copy.
  returned: success and not in check mode
  type: list
  elements: str
created:
  description: Configuration files the backup lacked and that were created (C(postgresql.conf), C(pg_hba.conf), C(pg_ident.conf)).
  returned: success and not in check mode
  type: list
  elements: str
disabled:
  description: Lines of the restored C(postgresql.conf) commented out (C(data_directory), recovery settings).
  returned: success and not in check mode
  type: list
  elements: str
seconds:
  description: Time spent restoring.
  returned: always
  type: float
host_problem:
  description:
    - On a refusal, true when it is about this host (free space, programs, a busy port) rather than the backup. The
      drill records such a run as inconclusive, never as a reason to distrust the backup.
  returned: failure
  type: bool
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._backup_api import BackupApiError, major_of
from ansible_collections.pgops.online_backup.plugins.module_utils._errors import PgopsError
from ansible_collections.pgops.online_backup.plugins.module_utils._files import existing_ancestor, read_json, write_private_file
from ansible_collections.pgops.online_backup.plugins.module_utils._incremental import FILES_FILE
from ansible_collections.pgops.online_backup.plugins.module_utils._layout import (
    AGE_IDENTITY_OPTIONS,
    BACKUP_JSON,
    WAL_DIR,
    read_backup,
    use_age_identity,
    valid_backup_id,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._restore_files import (
    backup_sources,
    check_targets,
    combine_chain,
    config_port,
    extract,
    link_tablespaces,
    missing_wal,
    needed_tools,
    original_port,
    peek_tar_config,
    place_label_files,
    prepare_directory,
    take_from_parents,
    tidy_data_directory,
    undo_directory,
    wal_files_needed,
    writable_parent,
    write_minimal_configs,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._restore_plan import (
    AUTO_CONF_HEADER,
    TARGETS,
    HostRefusal,
    RestoreError,
    check_target_against_backup,
    disable_conf_lines,
    format_tablespace_map,
    now_utc,
    parse_tablespace_map,
    plan_tablespaces,
    recovery_settings,
    render_auto_conf,
    require_absolute,
    restore_command_for,
    validate_port,
    validate_target,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._restore_server import (
    data_major,
    default_socket_directory,
    find_bin_dir,
    find_tool,
    listen_hosts,
    pick_free_port,
    port_in_use,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._s3 import S3_OPTION_SPEC, config_from_params, is_s3
from ansible_collections.pgops.online_backup.plugins.module_utils._storage import (
    SSH_OPTION_SPEC,
    SshStorage,
    open_storage,
    remote_of,
    split_backup_url,
    stage_backup_at,
)

# Settings that keep the restored server away from the original: only through their options.
MANAGED_SETTINGS = {
    "restore_command": "restore_command or wal_archive",
    "port": "port",
    "listen_addresses": "listen_addresses",
    "unix_socket_directories": "socket_directory",
    "archive_mode": "keep_archiving",
    "hba_file": "access",
    "external_pid_file": "(none; the original's pid file is never shared)",
    "archive_cleanup_command": "(none; a restore never cleans up the archive it recovers from)",
}


def complete_backup(path: str) -> dict:
    """backup.json of a complete backup; RestoreError for anything else."""
    info_path = os.path.join(path, BACKUP_JSON)
    try:
        info = read_backup(path)
    except OSError as e:
        raise RestoreError(f"{info_path} cannot be read: {e}") from None
    if info is None:
        if not os.path.lexists(info_path):
            raise RestoreError(f"{path} is not a backup: it has no {BACKUP_JSON}")
        raise RestoreError(f"{info_path} is not a JSON object")
    if info.get("status") != "complete":
        raise RestoreError(
            f"backup {info.get('id') or path} is not complete (status: {info.get('status')}); it cannot be trusted"
        )
    return info


def read_tablespace_map(sources: dict, backup_dir: str) -> list:
    """The tablespace_map the backup carries (root for tar/cpio, data/ for rsync)."""
    where = (
        os.path.join(sources["base"], "tablespace_map")
        if sources["method"] == "rsync"
        else os.path.join(backup_dir, "tablespace_map")
    )
    try:
        with open(where, encoding="utf-8", errors="surrogateescape") as f:
            return parse_tablespace_map(f.read())
    except FileNotFoundError:
        return []


def free_space_problem(data_dir: str, spaces: list, states: list, needed) -> str | None:
    """Why the restore will not fit (None when it will, or when it cannot be told)."""
    try:
        needed = int(needed or 0)
    except (TypeError, ValueError):
        return None
    if needed <= 0 or any(state == "not_empty" for _path, state in states):
        return None

    base = existing_ancestor(data_dir)
    if any(os.stat(existing_ancestor(ts["path"])).st_dev != os.stat(base).st_dev for ts in spaces):
        return None  # split across filesystems: the backup does not say how much goes where
    st = os.statvfs(base)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        return f"{base} has {free // 1048576} MB free; the backup needs {needed // 1048576} MB"
    return None


def original_server_port(info: dict, sources: dict, local: dict):
    """The original server's port: from backup.json, or the copied configuration (read from the start of base.tar,
    or from data/ of an rsync backup, which local names here even when the backup is on a repository host).

    None for cpio backups without it in backup.json; they are checked again once extracted.
    """
    if str(info.get("port") or "").isdigit():
        return int(info["port"])
    if sources["method"] == "rsync":
        return original_port(local["base"])
    if sources["method"] == "tar":
        found = peek_tar_config(sources["base"])
        if "postgresql.conf" in found:
            return config_port([found["postgresql.conf"], found.get("postgresql.auto.conf", "")]) or 5432
    return None


def check_original_port(port: int, orig_port, allowed: bool) -> None:
    if orig_port and int(orig_port) == port and not allowed:
        raise RestoreError(
            f"port {port} is the original server's port; choose another (or allow_original_port for a host that replaces it)"
        )


def backup_here(where: str, p: dict) -> tuple:
    """(a directory where the backup at where reads as on disk, {stand-in: streamed reader}): the backup's own
    directory; or, for one in a bucket or on a repository host (repository_host), a private staging directory
    holding its small files, removed when the module ends (its archives are streamed from there when read)."""
    ssh = remote_of(p)
    if ssh:
        require_absolute("backup_path", where)
    elif not is_s3(where):
        return require_absolute("backup_path", where), {}
    _repository, backup_id = split_backup_url(where)
    if not valid_backup_id(backup_id):
        raise RestoreError(f"backup_path {where} does not end in a backup id such as 20261129T101500Z")
    st, _bid, staging, readers = stage_backup_at(where, config_from_params(p), ssh, prefix=".pgops-restore-")
    if not os.path.exists(os.path.join(staging, BACKUP_JSON)):
        raise RestoreError(f"{st.path(backup_id)}{' on ' + ssh.target if ssh else ''} has no {BACKUP_JSON}: not a backup")
    return staging, readers


def streamed(sources: dict, readers: dict) -> dict:
    """sources with each archive (or rsync directory) a bucket or repository host holds as its reader."""
    out = dict(sources, base=readers.get(sources["base"], sources["base"]))
    out["spaces"] = {oid: readers.get(path, path) for oid, path in sources["spaces"].items()}
    return out


def parent_chain(p: dict, info: dict, major: int) -> list:
    """The backups an incremental one is restored from, oldest (the full one) first, without itself:
    each complete, of the same cluster and major, found beside it in the same repository."""
    path = p["backup_path"].rstrip("/")
    base = path[: path.rindex("/")]
    chain = []
    child = info
    while child.get("type") == "incremental":
        pid = child.get("parent")
        if not valid_backup_id(pid) or len(chain) > 1000 or any(m["info"].get("id") == pid for m in chain):
            raise RestoreError(f"backup {child.get('id')} is an incremental one with an invalid parent {pid!r}")
        bdir, readers = backup_here(f"{base}/{pid}", p)
        try:
            pinfo = complete_backup(bdir)
        except RestoreError as e:
            raise RestoreError(f"backup {info.get('id')} needs its parent {pid}, which cannot be used: {e}") from None
        if pinfo.get("system_identifier") != info.get("system_identifier") or major_of(pinfo.get("pg_version") or 0) != major:
            raise RestoreError(f"parent {pid} of backup {child.get('id')} is of another cluster or PostgreSQL version")
        sources = streamed(backup_sources(bdir, pinfo), readers)
        needed_tools(sources)
        chain.insert(0, {"backup_dir": bdir, "sources": sources, "info": pinfo})
        child = pinfo
    return chain


def plan(module) -> dict:
    """Every check, no change. Returns what the restore will do."""
    p = module.params
    if os.geteuid() == 0:
        raise RestoreError(
            "this runs as root: PostgreSQL refuses to run as root and the restored files must belong to the server's "
            "OS user; run it as that user (become: true, become_user: postgres)"
        )
    ssh = remote_of(p)
    if ssh and is_s3(p["backup_path"]):
        raise RestoreError("repository_host is for a repository reached over ssh, not for an s3:// backup_path")
    backup_dir, readers = backup_here(p["backup_path"], p)
    data_dir = require_absolute("data_directory", p["data_directory"])
    warnings = validate_target(p["target"], p["target_value"], p["target_action"], p["target_timeline"], p["target_inclusive"])
    port = validate_port(p["port"])
    if p["wal_archive"]:
        require_absolute("wal_archive", p["wal_archive"])
    if p["restore_command"] is not None and not p["restore_command"].strip():
        raise RestoreError("restore_command is empty")
    if "\n" in (p["restore_command"] or ""):
        raise RestoreError("restore_command must be one line")
    info = complete_backup(backup_dir)
    check_target_against_backup(p["target"], p["target_value"], info)
    try:
        major = major_of(info.get("pg_version") or info.get("pg_version_text") or "")
    except BackupApiError as e:
        raise RestoreError(f"backup.json of {backup_dir}: {e}") from None
    local = backup_sources(backup_dir, info)
    # A bucket's or a repository host's archives are streamed from there (the stand-ins here only name them).
    sources = streamed(local, readers)
    # An incremental backup's chain is checked first: without it nothing else matters.
    chain, combine, taken = [], None, None
    mode = (info.get("incremental") or {}).get("mode", "block") if info.get("type") == "incremental" else None
    if mode == "block":
        chain = parent_chain(p, info, major)
        combine = find_tool("pg_combinebackup", major, p["bin_dir"])
        if combine is None:
            raise HostRefusal(
                f"backup {info.get('id')} is an incremental one: restoring it needs pg_combinebackup of PostgreSQL {major} "
                f"(postgresql-client-{major}), in bin_dir or on PATH"
            )
    elif mode == "file" and sources["method"] != "rsync":  # rsync's file-level backups are complete directories
        doc = read_json(os.path.join(backup_dir, FILES_FILE))
        if not isinstance(doc, dict) or not isinstance(doc.get("taken"), dict):
            raise RestoreError(f"backup {info.get('id')} is a file-level incremental without a readable {FILES_FILE}")
        taken = doc["taken"]
        chain = parent_chain(p, info, major)
    mapping = {str(k): v for k, v in (p["tablespace_map"] or {}).items()}
    spaces = plan_tablespaces(info.get("tablespaces") or [], read_tablespace_map(local, backup_dir), mapping)
    missing_archives = [ts["oid"] for ts in spaces if ts["oid"] not in sources["spaces"]]
    if missing_archives:
        raise RestoreError(f"backup {backup_dir} lacks the files of tablespace(s) {', '.join(missing_archives)}")
    states = check_targets(data_dir, spaces, p["force"], backup_dir, live=info)
    for path, _state in states:
        why = writable_parent(path)
        if why:
            raise HostRefusal(why)
    # A chain is extracted beside the data directory before it is combined into it.
    needed = info.get("source_bytes")
    if needed and (info.get("incremental") or {}).get("mode", "block") == "block" and info.get("type") == "incremental":
        needed = 2 * int(needed) + int(info.get("bytes") or 0)
    why = free_space_problem(data_dir, spaces, states, needed)
    if why:
        raise HostRefusal(f"not enough space to restore: {why}")
    needed_tools(sources)
    bin_dir = find_bin_dir(major, p["bin_dir"])

    restore_command = restore_command_for(p["wal_archive"]) if p["wal_archive"] else p["restore_command"]
    wal_dir = p["wal_archive"] or p["wal_directory"]
    if wal_dir and p["check_wal"]:
        needed = wal_files_needed(info.get("start_wal"), info.get("stop_wal"), info.get("wal_segment_size"))
        present = None
        if is_s3(wal_dir):
            repository, rel = wal_dir.rsplit("/" + WAL_DIR + "/", 1)
            present = {name for name, _mtime in open_storage(repository, config_from_params(p)).files(f"{WAL_DIR}/{rel}")}
        elif ssh and not p["wal_archive"]:
            # Recovery's WAL is on the repository host: it is asked there.
            present = {name for name, _mtime in SshStorage(wal_dir, ssh).files("")}
            wal_dir = f"{ssh.target}:{wal_dir}"
        lacking = missing_wal(wal_dir, needed, present, plain=bool(p["wal_archive"]))
        if lacking and p["wal_archive"] and not missing_wal(wal_dir, lacking, present):
            raise RestoreError(
                f"the WAL archive {wal_dir} holds {', '.join(lacking)} only compressed or encrypted (pgops-wal's layout), "
                "which wal_archive's plain copy cannot use: leave wal_archive unset so that the WAL is read with "
                "pgops-wal get from the repository (or give a restore_command that decodes it)"
            )
        if lacking:
            raise RestoreError(
                f"the WAL archive {wal_dir} lacks {', '.join(lacking)}, which backup {info.get('id')} needs "
                "to become consistent; the restore could never succeed"
            )

    socket_dir = p["socket_directory"] or default_socket_directory()
    require_absolute("socket_directory", socket_dir)
    if not os.path.isdir(socket_dir):
        raise RestoreError(f"socket_directory {socket_dir} does not exist")
    if p["access"] == "socket_trust" and os.stat(socket_dir).st_mode & 0o007:
        raise RestoreError(f"access socket_trust needs a socket_directory other users cannot enter; {socket_dir} is open to them")
    addresses = listen_hosts(p["listen_addresses"])
    orig_port = original_server_port(info, sources, local)
    if port == 0:
        port = pick_free_port(socket_dir, addresses, avoid=(int(orig_port or 5432), 5432))
    else:
        check_original_port(port, orig_port, p["allow_original_port"])
        busy = port_in_use(port, socket_dir, addresses)
        if busy:
            raise HostRefusal(f"port {port} cannot be used by the restored server: {busy}")

    settings = recovery_settings(
        restore_command, p["target"], p["target_value"], p["target_action"], p["target_timeline"], p["target_inclusive"]
    )
    settings.update(port=port, listen_addresses=p["listen_addresses"], unix_socket_directories=socket_dir, external_pid_file="")
    # A standby's commands must not run here: archive recovery runs archive_cleanup_command at every
    # restartpoint (it would delete from the original's archive) and recovery_end_command at its end.
    # Hot standby lets the run watch recovery (the original may have had it off, which also turns
    # recovery_target_action pause into shutdown).
    settings.update(archive_cleanup_command="", recovery_end_command="", hot_standby="on")
    # The run reads the server's messages (a refused connection while it starts, how recovery ended): in English,
    # whatever the original's lc_messages (settings may set another; the run's reading then may fail).
    settings["lc_messages"] = "C"
    if not p["keep_archiving"]:
        settings["archive_mode"] = "off"
    if p["access"] == "socket_trust":
        settings["hba_file"] = os.path.join(data_dir, "pg_hba.conf")
    for key, value in (p["settings"] or {}).items():
        option = MANAGED_SETTINGS.get(key.lower(), "target" if key.lower().startswith("recovery_target") else None)
        if option:
            raise RestoreError(f"setting {key} is managed by this module: use its {option} option")
        settings[key] = value
    for w in warnings:
        module.warn(w)
    return {
        "info": info, "backup_dir": backup_dir, "data_dir": data_dir, "major": major, "sources": sources,
        "spaces": spaces, "states": states, "bin_dir": bin_dir, "settings": settings, "port": port,
        "socket_dir": socket_dir, "orig_port": orig_port, "chain": chain, "combine": combine, "taken": taken,
        "source": f" from {ssh.target}" if ssh else "",
    }  # fmt: skip


def restore(module, pl: dict) -> dict:
    """The file work, in an order where a failure can be undone."""
    p = module.params
    data_dir, sources, method = pl["data_dir"], pl["sources"], pl["sources"]["method"]
    out = {"removed": [], "created": [], "disabled": []}
    for path, state in pl["states"]:
        prepare_directory(path, state)
    if pl["combine"]:
        final = {"backup_dir": pl["backup_dir"], "sources": sources, "info": pl["info"]}
        out["combined"] = combine_chain(pl["chain"] + [final], data_dir, pl["spaces"], pl["combine"])
    else:
        extract(sources["base"], data_dir, method)
        for ts in pl["spaces"]:
            extract(sources["spaces"][ts["oid"]], ts["path"], method)
        if pl["taken"]:
            out["taken_from"] = take_from_parents(pl["chain"], pl["taken"], data_dir, pl["spaces"])
    found = data_major(data_dir)
    if found is None:
        raise RestoreError(
            f"the restored {data_dir} has no PG_VERSION: {os.path.basename(sources['base'])} is not a data directory"
        )
    if found != pl["major"]:
        raise RestoreError(f"the restored data directory is PostgreSQL {found}, backup.json says {pl['major']}")
    if not pl["orig_port"] and p["port"] != 0:
        check_original_port(pl["port"], original_port(data_dir), p["allow_original_port"])
    if not pl["combine"]:  # pg_combinebackup wrote the label, without the INCREMENTAL lines
        place_label_files(pl["backup_dir"], data_dir, method)
    if not os.path.exists(os.path.join(data_dir, "backup_label")):
        raise RestoreError("the backup has no backup_label: without it recovery would start from the wrong checkpoint")
    map_path = os.path.join(data_dir, "tablespace_map")
    if pl["spaces"]:
        write_private_file(map_path, format_tablespace_map([(ts["oid"], ts["path"]) for ts in pl["spaces"]]).encode("utf-8"))
    out["removed"] = tidy_data_directory(data_dir, pl["major"])
    link_tablespaces(data_dir, pl["spaces"])
    out["created"] = write_minimal_configs(data_dir)
    if p["access"] == "socket_trust":
        write_private_file(
            os.path.join(data_dir, "pg_hba.conf"),
            b"# pgops.online_backup drill: Unix socket in a private directory only\nlocal all all trust\n",
        )
    conf = os.path.join(data_dir, "postgresql.conf")
    with open(conf, encoding="utf-8", errors="surrogateescape") as f:
        text, out["disabled"] = disable_conf_lines(f.read())
    if out["disabled"]:
        with open(conf, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
    auto = os.path.join(data_dir, "postgresql.auto.conf")
    try:
        with open(auto, encoding="utf-8", errors="surrogateescape") as f:
            existing = f.read()
    except FileNotFoundError:
        existing = ""
    header = f"{AUTO_CONF_HEADER}: restore of backup {pl['info'].get('id')} at {now_utc()}"
    write_private_file(auto, render_auto_conf(existing, pl["settings"], header).encode("utf-8"))
    write_private_file(os.path.join(data_dir, "recovery.signal"), b"")
    os.chmod(data_dir, 0o700)
    return out


def main():
    module = AnsibleModule(
        argument_spec=dict(
            backup_path=dict(type="str", required=True),
            data_directory=dict(type="path", required=True),
            force=dict(type="bool", default=False),
            tablespace_map=dict(type="dict", default={}),
            wal_archive=dict(type="path"),
            wal_directory=dict(type="path"),
            restore_command=dict(type="str"),
            check_wal=dict(type="bool", default=True),
            target=dict(type="str", default="latest", choices=list(TARGETS)),
            target_value=dict(type="str"),
            target_action=dict(type="str", default="promote", choices=["promote", "pause", "shutdown"]),
            target_timeline=dict(type="str", default="latest"),
            target_inclusive=dict(type="bool", default=True),
            port=dict(type="int", required=True),
            allow_original_port=dict(type="bool", default=False),
            listen_addresses=dict(type="str", default=""),
            socket_directory=dict(type="path"),
            keep_archiving=dict(type="bool", default=False),
            access=dict(type="str", default="keep", choices=["keep", "socket_trust"]),
            settings=dict(type="dict", default={}),
            bin_dir=dict(type="path"),
            **AGE_IDENTITY_OPTIONS,
            **S3_OPTION_SPEC,
            **SSH_OPTION_SPEC,
        ),
        mutually_exclusive=[
            ("wal_archive", "restore_command"),
            ("wal_archive", "wal_directory"),
            ("age_identity", "age_identity_file"),
        ],
        required_one_of=[("wal_archive", "restore_command")],
        supports_check_mode=True,
    )
    began = time.monotonic()
    try:
        use_age_identity(module.params)
        pl = plan(module)
    except (PgopsError, OSError) as e:
        # host_problem: about this host, not the backup (a drill records it as inconclusive).
        module.fail_json(msg=f"restore refused, nothing was changed: {e}", host_problem=isinstance(e, HostRefusal))
    result = {
        "backup_id": pl["info"].get("id"),
        "data_directory": pl["data_dir"],
        "major": pl["major"],
        "bin_dir": pl["bin_dir"],
        "port": pl["port"],
        "socket_directory": pl["socket_dir"],
        "tablespaces": pl["spaces"],
        "settings": pl["settings"],
        "method": pl["sources"]["method"],
        "compression": pl["sources"]["compression"],
        "chain": [m["info"].get("id") for m in pl["chain"]] + ([pl["info"].get("id")] if pl["chain"] else []),
        "target": module.params["target"],
        "target_value": module.params["target_value"],
    }
    where = pl["data_dir"] + "".join(f", tablespace {ts['oid']} to {ts['path']}" for ts in pl["spaces"])
    replaced = [path for path, state in pl["states"] if state == "not_empty"]
    what = f"backup {result['backup_id']}{pl['source']} ({result['method']}, PostgreSQL {pl['major']}) into {where}"
    if module.check_mode:
        note = f"; would replace the content of {', '.join(replaced)}" if replaced else ""
        module.exit_json(changed=True, msg=f"would restore {what}, port {pl['port']}{note}", seconds=0.0, **result)
    try:
        done = restore(module, pl)
    except Exception as e:  # noqa: BLE001 - whatever failed (a defect too), the targets are put back first
        left = [problem for path, state in pl["states"] for problem in undo_directory(path, state)]
        if left:
            after = f"; what it wrote could not all be removed ({'; '.join(left[:3])}): remove it before the next run"
        elif replaced:
            after = f"; the target directories are empty again (the old content of {', '.join(replaced)} was removed by force)"
        else:
            after = "; the target directories were put back as they were"
        module.fail_json(msg=f"restore of {what} failed: {e}{after}", **result)
    result.update(done, seconds=round(time.monotonic() - began, 3))
    module.exit_json(changed=True, msg=f"restored {what}, ready to start on port {pl['port']}", **result)


if __name__ == "__main__":
    main()
