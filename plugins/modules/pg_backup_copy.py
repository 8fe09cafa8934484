#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_backup_copy
short_description: Copy a running cluster's files with tar, cpio or rsync during an online backup
version_added: 0.1.0
description:
  - The copy step of an online backup, run on the database host between
    M(pgops.online_backup.pg_backup_session) O(pgops.online_backup.pg_backup_session#module:state=started)
    and O(pgops.online_backup.pg_backup_session#module:state=stopped).
  - Chooses the files as C(pg_basebackup) does (the contents of C(pg_wal), C(pg_replslot), C(pg_stat_tmp) and
    similar directories, C(postmaster.pid), temporary and unlogged relations are left out) and copies
    C(global/pg_control) last, then hands the list to the tool the user chose.
  - Files that change or disappear during the copy are expected on a running cluster and are not errors;
    anything else the tool reports (for example permission denied) fails the task.
  - Method V(tar) writes C(base.tar[.gz|.zst|.lz4]) and one C(<oid>.tar[...]) per tablespace; V(cpio) the same
    with C(.cpio) (newc format); V(rsync) a ready data directory C(data/) and C(tablespaces/<oid>/), with
    C(data/pg_tblspc/<oid>) linked to them.
  - When the session of O(session_id) is an incremental backup (started with
    O(pgops.online_backup.pg_backup_session#module:incremental_from_lsn), PostgreSQL 17+), relation files are stored
    as C(INCREMENTAL.<name>) files with only the blocks the WAL summaries say changed since the parent, in PostgreSQL's
    own format, so that C(pg_combinebackup) reconstructs the chain; a file is copied whole where the server would
    (free space maps, databases created since, files with no summarized change but modified since the start, more
    than 90 % of blocks changed). Methods V(tar) and V(rsync) only. The C(INCREMENTAL) files are written to a
    private directory under C($TMPDIR) first (the changed blocks only) and removed when the copy ends.
extends_documentation_fragment:
  - pgops.online_backup.attributes
  - pgops.online_backup.s3
author:
  - pgops.online_backup contributors (@pgops)
attributes:
  check_mode:
    support: full
    details: Lists what would be copied; writes nothing.
  diff_mode:
    support: none
  idempotent:
    support: none
options:
  data_directory:
    description: The cluster's data directory.
    type: path
    required: true
  tablespaces:
    description: Tablespaces to copy, each with C(oid) and C(location).
    type: list
    elements: dict
    default: []
  dest:
    description:
      - The backup's directory (must exist, outside the data directory and every tablespace), or its
        C(s3://bucket/prefix/<backup id>) location. Each archive is then streamed into a multipart upload (no local
        copy; memory bounded to about 48 MiB per archive of up to 78 GiB of files, three parts sized for twice the
        archive's files beyond that, as S3 allows 10,000 parts), completed only when every step succeeded and aborted
        otherwise.
    type: str
    required: true
  method:
    description: The tool that copies.
    type: str
    choices: [tar, cpio, rsync]
    default: tar
  compression:
    description: Compression of V(tar) and V(cpio) archives (V(gzip) uses C(pigz) when installed).
    type: str
    choices: [none, gzip, zstd, lz4]
    default: none
  compression_level:
    description: Compression level; the compressor's default when unset.
    type: int
  encryption:
    description:
      - V(age) encrypts every archive with the C(age) tool after compression, for O(age_recipients), as
        C(base.tar.zst.age); only the holder of a matching private key can restore it.
      - When C(age) or a valid recipient is missing, the module fails before it writes anything.
      - Not with O(method=rsync), which copies a plain directory.
    type: str
    choices: [none, age]
    default: none
  age_recipients:
    description: The age public keys (C(age1...), or SSH public keys) that may decrypt the backup.
    type: list
    elements: str
    default: []
  threads:
    description: Compression threads (zstd, pigz); 0 means one per core.
    type: int
    default: 0
  server_version_num:
    description: The server's version number, for version-specific exclusions.
    type: int
    default: 150000
  manifest_checksum:
    description:
      - Record every copied file's size, modification time and checksum while the data passes by (tar, cpio) or
        right after the copy (rsync), in C(.pgops-copy-entries.json) in O(dest), for
        M(pgops.online_backup.pg_backup_manifest) to use instead of reading the whole backup again.
      - V(auto) is V(CRC32C) (pg_basebackup's default) when the node's Python has a C implementation of it (the
        C(crc32c) package, hardware-accelerated from PyPI, or Debian's C(python3-crc32c); or C(google-crc32c)), else
        V(SHA256). The result's RV(manifest_checksum) says which.
      - Unset records nothing.
    type: str
    choices: [auto, SHA224, SHA256, SHA384, SHA512, CRC32C, NONE]
  repository_host:
    description:
      - Write the backup on this host instead, reached with ssh as C([user@]host) from the database host (by the OS
        user the module runs as, with a key, as no password can be prompted for). tar and cpio stream over ssh; rsync
        copies over ssh.
      - O(dest) is then a path on that host.
    type: str
  ssh_port:
    description: ssh port of O(repository_host).
    type: int
    default: 22
  ssh_options:
    description: Further ssh options, e.g. C([-i, /var/lib/postgresql/.ssh/id_backup]).
    type: list
    elements: str
    default: []
  session_id:
    description:
      - The M(pgops.online_backup.pg_backup_session) this copy belongs to (same host and OS user). The copy attaches to
        the session's keeper for as long as it runs - its run counts as alive meanwhile, so no lease can lapse - and
        stops within seconds, failing, when the backup's session ends (aborted, or lost when the server restarts), as
        a copy the server no longer backs up is useless. A copy task that dies (its run killed or lost) makes the
        keeper abort the backup at once.
    type: str
  runtime_dir:
    description: The keepers' directory, when not the default of M(pgops.online_backup.pg_backup_session).
    type: path
  parent:
    description:
      - The parent backup of an incremental backup (RV(pgops.online_backup.pg_backup_catalog#module:parent), with
        C(files)). Required when the session is a block-level incremental (PostgreSQL 17+), where a relation file the parent
        holds neither whole nor as an C(INCREMENTAL) file is copied whole, as the server's own incremental backup does,
        because C(pg_combinebackup) needs each relation file in every backup of the chain.
      - Without a block-level session, makes this a file-level incremental backup of this parent - for PostgreSQL 12 to
        16, where there are no WAL summaries.
      - A file is not copied when it is the same as in the parent - same size and modification time, and last
        modified before the second the parent started (a change within the second a file was copied leaves its time as
        it was, so such files are always copied again) - or, with O(incremental_checksum), the same checksum.
      - V(tar) and V(cpio) store only the changed files and write C(backup_files.json), the files taken from earlier
        backups (and which backup holds each); V(rsync) hard-links unchanged files to the parent's copy (C(rsync
        --link-dest)), so every backup is a complete directory.
    type: dict
  incremental_checksum:
    description: With O(parent), compare files by checksum (read in full) instead of size and modification time.
    type: bool
    default: false
  staging_dir:
    description:
      - Where a block-level incremental backup stages its C(INCREMENTAL) files before they are archived (up to the size
        of the changed blocks; checked before anything is written).
      - Default the backup's own directory when O(dest) is a directory on this host, else the system's temporary
        directory (on S3 or a repository host).
    type: path
  exclude_directories:
    description: Further directories (relative to the data directory) whose contents are left out, e.g. a
      C(stats_temp_directory) inside the data directory on PostgreSQL 12 to 14.
    type: list
    elements: str
    default: []
  progress_interval:
    description:
      - With O(session_id), print the copy's progress in the run's output every this many seconds while it runs -
        bytes read of expected with a percentage, the rate and the time left, for example
        C(copy 812.4 MiB of 1.6 GiB (51%), 402.1 MiB/s, about 2.0s left).
      - The copy runs in a process of its own; a copy that ends within the first interval returns as it always
        did. Otherwise the task hands it over to M(pgops.online_backup.pg_backup_progress), which this module's
        action plugin calls in turns until the copy ends, printing a line at each; the task then returns the copy's
        result. Each turn attaches to the session's keeper - if the run is killed, the keeper ends the backup at once,
        and if no turn comes within 30 seconds of the last, it ends it too.
      - V(0) copies within the task, printing nothing until it ends.
      - Not with C(async), which runs the copy within its task.
    type: float
    default: 0
  metrics_file:
    description:
      - With O(session_id), keep the running copy's progress in this Prometheus textfile (C(pgops_backup_copy_*)
        gauges - bytes read and expected, rate, time left, start and last update) while it runs, beside what the
        file holds, every 5 seconds; they are taken out when the copy ends. Labels are those of
        M(pgops.online_backup.pg_backup_catalog)'s backup metrics (C(cluster), C(repository) the parent of O(dest)).
      - Meant for the file O(pgops.online_backup.pg_backup_catalog#module:metrics_file) names, on this host.
    type: path
"""

EXAMPLES = r"""
- name: Copy the data directory and tablespaces as zstd-compressed tar files
  pgops.online_backup.pg_backup_copy:
    data_directory: /var/lib/postgresql/17/main
    tablespaces: "{{ preflight.tablespaces }}"
    dest: /backup/pg/20261129T101500Z
    method: tar
    compression: zstd
"""

RETURN = r"""
files:
  description: Archives (or directories for rsync) written, with their size in bytes.
  returned: always
  type: list
  elements: dict
bytes:
  description: Bytes written to the backup (after compression).
  returned: always
  type: int
source_bytes:
  description: Bytes of regular files chosen for copying.
  returned: always
  type: int
file_count:
  description: Entries (files and directories) copied.
  returned: always
  type: int
seconds:
  description: Time the copy took.
  returned: always
  type: float
manifest_checksum:
  description: The checksum algorithm recorded during the copy (O(manifest_checksum=auto) resolved), or null.
  returned: when not in check mode
  type: str
type:
  description: V(incremental) when relation files were stored as C(INCREMENTAL) files, else V(full).
  returned: when not in check mode
  type: str
incremental:
  description:
    - For an incremental copy, C(incremental_files) (relation files stored as C(INCREMENTAL) files), C(blocks) (the
      changed blocks they hold), C(bytes) (their size), C(replaced_bytes) (the size of the files they stand for) and
      C(whole_files) (relation files copied whole all the same). Null for a full copy.
  returned: when not in check mode
  type: dict
crc32c_implementation:
  description:
    - Which CRC-32C implementation this node's Python has, C(crc32c (hardware)), C(crc32c (software)),
      C(google-crc32c) or C(python).
  returned: when not in check mode
  type: str
"""

import datetime
import os
import select
import signal
import threading
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._copy import (
    Cancel,
    CopyProgress,
    check_copy,
    plan_copy,
    run_copy,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._errors import PgopsError
from ansible_collections.pgops.online_backup.plugins.module_utils._files import read_json
from ansible_collections.pgops.online_backup.plugins.module_utils._incremental import load_block_map
from ansible_collections.pgops.online_backup.plugins.module_utils._layout import valid_backup_id
from ansible_collections.pgops.online_backup.plugins.module_utils._metrics import write_copy_progress
from ansible_collections.pgops.online_backup.plugins.module_utils._progress import Meter, copy_line, read_progress, write_progress
from ansible_collections.pgops.online_backup.plugins.module_utils._s3 import S3_OPTION_SPEC, config_from_params
from ansible_collections.pgops.online_backup.plugins.module_utils._sessions import (
    Attachment,
    default_runtime_dir,
    proc_stat,
    read_state,
    session_dir,
)

METRICS_EVERY = 5.0  # seconds between rewrites of the metrics file while the copy runs


def result_file(copy_id: str) -> str:
    """Where a handed-over copy leaves its result, in its session's directory (0600)."""
    return f"copy-{copy_id}.json"


def copy_id_of(pid: int) -> str:
    """A copy's process, named so that no reused pid passes for it: <pid>.<start time>."""
    st = proc_stat(pid)
    return f"{pid}.{st[1] if st else 0}"


def parent_paths(parent: dict, state: dict) -> frozenset:
    """The paths of a block-level incremental's parent (its manifest's), after checking that it is the
    backup the session's changed blocks were read from."""
    if not isinstance(parent.get("files"), dict):
        raise ValueError("files is not a dict")
    since = (state.get("incremental") or {}).get("from_lsn")
    if since and parent.get("start_lsn") and str(parent["start_lsn"]).upper() != str(since).upper():
        raise ValueError(
            f"the session's changed blocks are since {since}, the parent {parent.get('id')} started at {parent['start_lsn']}"
        )
    return frozenset(parent["files"])


def file_parent(parent: dict, checksum: bool) -> dict:
    if not valid_backup_id(parent["id"]):
        raise ValueError(f"invalid parent id {parent['id']!r}")
    started = datetime.datetime.fromisoformat(str(parent["started_at"])).timestamp()
    if not isinstance(parent["files"], dict):
        raise ValueError("files is not a dict")
    return {"id": str(parent["id"]), "started_epoch": started, "files": parent["files"], "checksum": checksum}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            data_directory=dict(type="path", required=True),
            tablespaces=dict(type="list", elements="dict", default=[]),
            dest=dict(type="str", required=True),
            method=dict(type="str", default="tar", choices=["tar", "cpio", "rsync"]),
            compression=dict(type="str", default="none", choices=["none", "gzip", "zstd", "lz4"]),
            compression_level=dict(type="int"),
            encryption=dict(type="str", default="none", choices=["none", "age"]),
            age_recipients=dict(type="list", elements="str", default=[]),
            threads=dict(type="int", default=0),
            server_version_num=dict(type="int", default=150000),
            exclude_directories=dict(type="list", elements="str", default=[]),
            staging_dir=dict(type="path"),
            repository_host=dict(type="str"),
            ssh_port=dict(type="int", default=22),
            ssh_options=dict(type="list", elements="str", default=[]),
            session_id=dict(type="str"),
            runtime_dir=dict(type="path"),
            parent=dict(type="dict"),
            incremental_checksum=dict(type="bool", default=False),
            **S3_OPTION_SPEC,
            manifest_checksum=dict(type="str", choices=["auto", "SHA224", "SHA256", "SHA384", "SHA512", "CRC32C", "NONE"]),
            progress_interval=dict(type="float", default=0),
            metrics_file=dict(type="path"),
        ),
        required_if=[("encryption", "age", ["age_recipients"])],
        supports_check_mode=True,
    )
    p = module.params
    p["s3"] = config_from_params(p)
    problem = check_copy(p)
    if problem:
        module.fail_json(msg=problem)
    if module.check_mode:
        try:
            plan = plan_copy(p)
        except PgopsError as e:
            module.fail_json(msg=f"nothing copied: {e}")
        module.exit_json(
            changed=True,
            msg=f"would copy {plan['count']} entries ({plan['source_bytes']} bytes) with {p['method']}",
            files=[],
            bytes=0,
            source_bytes=plan["source_bytes"],
            file_count=plan["count"],
            seconds=0.0,
        )
    spec = dict(p)  # what the copy uses, beyond the module's own options
    sdir = state = None
    if p["session_id"]:
        try:
            sdir = session_dir(p["runtime_dir"] or default_runtime_dir(), p["session_id"])
        except PgopsError as e:
            module.fail_json(msg=str(e))
        state = read_state(sdir) or {}
    block_level = bool((state or {}).get("incremental"))
    if block_level and p["method"] == "cpio":
        module.fail_json(msg="nothing copied: the session is an incremental backup, which method cpio cannot store")
    if p["parent"] and not block_level and p["method"] == "cpio":
        module.fail_json(
            msg="nothing copied: a file-level incremental backup (parent) stores only the changed files, and a restore "
            "takes the others from earlier backups only when they are tar or rsync ones: use method tar or rsync"
        )
    if block_level and not p["parent"]:
        module.fail_json(
            msg="nothing copied: the session is a block-level incremental backup: parent (pg_backup_catalog's parent, with "
            "files) must say which files the parent backup holds, as pg_combinebackup needs each relation file in every backup "
            "of the chain"
        )
    if p["parent"]:
        try:
            if block_level:
                spec["parent_paths"] = parent_paths(p["parent"], state)
            else:
                spec["file_parent"] = file_parent(p["parent"], p["incremental_checksum"])
        except (KeyError, TypeError, ValueError) as e:
            module.fail_json(msg=f"nothing copied: parent must be pg_backup_catalog's parent, with files ({e})")
    if block_level:
        try:
            spec["incremental"] = load_block_map(sdir)
        except (OSError, ValueError) as e:
            module.fail_json(msg=f"nothing copied: the incremental backup's changed blocks cannot be read: {e}")
    metrics = None
    if sdir and p["metrics_file"]:
        repository = p["dest"].rstrip("/").rsplit("/", 1)[0] or "/"
        metrics = (p["metrics_file"], str(state.get("system_identifier") or "unknown"), repository)
    if sdir and p["progress_interval"] > 0:
        copy_in_turns(module, spec, sdir, metrics, p["progress_interval"])
    out = copy(spec, sdir, metrics)
    if not out["ok"]:
        module.fail_json(msg=out["msg"])
    module.exit_json(changed=True, **out["result"])


def copy(spec: dict, sdir: str | None, metrics, parent_fd: int | None = None) -> dict:
    """Attach to the session's keeper (sdir), plan, copy, detach: {"ok": True, "result": ...} or {"ok": False, "msg": ...}.
    Planned once attached: walking millions of files on slow storage may outlast the lease, which the attachment
    holds. parent_fd: the handing-over task's pipe (copy_in_turns); when it closes before a handover, the task was
    killed."""
    cancel = Cancel()
    attached = None
    if sdir:
        try:
            attached = Attachment(sdir, cancel.fire)
        except PgopsError as e:
            return {"ok": False, "msg": str(e)}
        # However long the copy takes, the run counts as alive; if it ends, the copy stops at once.
        attached.start()
        if attached.gone:
            return {"ok": False, "msg": f"nothing copied: {attached.gone}"}
    if parent_fd is not None:
        threading.Thread(target=_watch_task, args=(parent_fd, attached, cancel), daemon=True).start()
    try:
        plan = plan_copy(spec)
    except PgopsError as e:
        if attached is not None:
            attached.stop()
        return {"ok": False, "msg": f"nothing copied: {e}"}
    progress = CopyProgress(plan["source_bytes"]) if sdir else None
    reporter = Reporter(progress, sdir, metrics) if sdir else None
    try:
        result = run_copy(spec, plan, cancel=cancel, progress=progress)
    except (PgopsError, OSError) as e:
        why = f": {attached.gone}" if attached is not None and attached.gone else ""
        return {"ok": False, "msg": f"copy failed: {e}{why}"}
    finally:
        if reporter is not None:
            reporter.stop()
        if attached is not None:
            attached.stop()
    return {"ok": True, "result": result}


class Reporter:
    """Every second, the copy's progress into its session's directory (pg_backup_progress and
    pg_backup_session_info read it); every METRICS_EVERY seconds into the metrics file."""

    def __init__(self, progress: CopyProgress, sdir: str, metrics):
        self.progress = progress
        self.sdir = sdir
        self.metrics = metrics
        self.meter = Meter(progress.expected, time.monotonic())
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self) -> dict:
        p = self.progress
        return self.meter.update(p.bytes_done(), time.monotonic(), p.expected, p.phase)

    def run(self) -> None:
        next_metrics = time.monotonic()
        while not self.done.wait(1.0):
            rec = self.sample()
            try:
                write_progress(self.sdir, rec)
                if self.metrics and time.monotonic() >= next_metrics:
                    next_metrics = time.monotonic() + METRICS_EVERY
                    write_copy_progress(self.metrics[0], rec, *self.metrics[1:])
            except OSError:
                pass  # progress is worth less than the copy: never fail it

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)
        rec = dict(self.sample(), finished=True)
        try:
            write_progress(self.sdir, rec)
            if self.metrics:
                write_copy_progress(self.metrics[0], None, *self.metrics[1:])
        except OSError:
            pass


def _watch_task(fd: int, attached, cancel) -> None:
    """The task that handed the copy over writes one byte first; a task that was killed closes its end
    before that. Then go as it went: the keeper sees the copy's connection close and ends the backup."""
    try:
        data = os.read(fd, 1)
    except OSError:
        data = b""
    if data:
        return
    if attached is not None:
        attached.drop()
    cancel.fire()


def copy_in_turns(module, spec: dict, sdir: str, metrics, interval: float) -> None:
    """Copy in a process of its own; return its result if it ends within interval, else hand it over
    (the run waits for it in turns with pg_backup_progress). Never returns."""
    ctl_r, ctl_w = os.pipe()  # task -> copy: b"h" when the task hands the copy over; closed first if it was killed
    done_r, done_w = os.pipe()  # copy -> task: closed when the result is written
    pid = os.fork()
    if pid == 0:  # the copy
        code = 1
        try:
            copy_id = copy_id_of(os.getpid())
            os.close(ctl_w)
            os.close(done_r)
            _detach(keep=(ctl_r, done_w))
            try:
                out = copy(spec, sdir, metrics, parent_fd=ctl_r)
            except BaseException as e:  # noqa: BLE001 - reported through the result, never raised into the module
                out = {"ok": False, "msg": f"copy failed: {e!r}"}
            write_progress(sdir, out, result_file(copy_id))  # 0600, atomic; no fsync: it is read at once
            code = 0
        finally:
            os._exit(code)
    copy_id = copy_id_of(pid)
    os.close(ctl_r)
    os.close(done_w)
    ready, _w, _x = select.select([done_r], [], [], interval)
    if ready:
        _report_ended(module, pid, sdir, copy_id)
    try:
        os.write(ctl_w, b"h")
    except BrokenPipeError:  # the copy ended between the wait and the handover: its result is there
        os.close(ctl_w)
        _report_ended(module, pid, sdir, copy_id)
    os.close(ctl_w)
    rec = read_progress(sdir)
    module.exit_json(
        changed=True,
        in_progress=True,
        session_id=spec["session_id"],
        copy_id=copy_id,
        progress=rec,
        line=copy_line(rec) if rec else "copy: starting",
        msg=f"the copy runs on (process {pid}); pg_backup_progress with copy_id={copy_id} waits for it",
    )


def _report_ended(module, pid: int, sdir: str, copy_id: str) -> None:
    """The task's result from the result file of a copy that has ended (exits the module)."""
    os.waitpid(pid, 0)
    path = os.path.join(sdir, result_file(copy_id))
    out = read_json(path) or {"ok": False, "msg": "copy failed: its process ended without a result"}
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    if not out.get("ok"):
        module.fail_json(msg=out.get("msg"))
    module.exit_json(changed=True, **out["result"])


def _detach(keep: tuple) -> None:
    """The copy outlives the task once it is handed over: a session of its own (no hangup from a closing
    terminal or sudo's pty), nothing of the task's open (Ansible waits for its pipes to close)."""
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


if __name__ == "__main__":
    main()
