#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_backup_manifest
short_description: Write and verify PostgreSQL backup manifests (the format pg_verifybackup reads)
version_added: 0.1.0
description:
  - O(state=present) writes a C(backup_manifest) in PostgreSQL's own format for a backup of this
    collection's repository layout, listing every file of the data directory with its size,
    modification time and checksum, and the WAL range the backup needs. The result is what
    C(pg_basebackup) writes, so PostgreSQL's C(pg_verifybackup) accepts it.
  - Version 1 of the format is written for servers before 17, version 2 (with C(System-Identifier))
    for 17 and newer.
  - "Plain (O(path)/data, method C(rsync)) backups: the manifest goes to C(data/backup_manifest), so
    C(pg_verifybackup <path>/data) works as is, and a copy to O(path)/backup_manifest."
  - "Tar and cpio backups: paths are those inside the archives (C(base.tar), C(base.cpio) hold the data
    directory; C(<oid>.tar), C(<oid>.cpio) each tablespace, listed as C(pg_tblspc/<oid>/...)), plus
    C(backup_label) and C(tablespace_map) from the backup root. The manifest goes to O(path)/backup_manifest."
  - Archives, compressed with gzip, zstd or lz4 or not, are read as streams and never extracted to disk.
  - An existing manifest is never rewritten unless O(force=true), so a damaged backup cannot be
    made to look good by writing a new manifest over it.
  - O(state=verified) checks the backup against its manifest (files missing, extra files, sizes,
    checksums) and, for plain backups, also runs C(pg_verifybackup) of the backup's major version when
    one is found. The result is recorded as C(verification) in the backup's C(backup.json).
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
    details: O(state=present) reports what it would write without writing (and without computing checksums);
      O(state=verified) runs fully (it only reads) but does not record the result in C(backup.json).
  diff_mode:
    support: none
  idempotent:
    support: full
    details: An existing manifest is kept unless O(force=true); a forced rewrite of unchanged files writes nothing.
options:
  path:
    description:
      - The backup directory (one C(<repository>/<backup_id>)), holding C(backup.json) and either C(data/),
        C(base.tar[.gz|.zst|.lz4]) or C(base.cpio[...]).
      - A plain data directory with C(PG_VERSION) (for example C(pg_basebackup -Fp) output) is accepted too.
      - Or C(s3://bucket/prefix/<backup_id>) with O(state=verified) (and the O(s3_endpoint) options); the archives
        are streamed from the bucket while they are checked, and the result is recorded in the bucket's C(backup.json).
      - Or, with O(repository_host) and O(state=verified), a tar or cpio backup directory on that host; its archives
        are streamed over ssh while they are checked (decrypted here, so an age key never has to be on that host), and
        the result is recorded in its C(backup.json) there. An rsync backup is verified on the host that holds it.
    type: str
    required: true
  state:
    description:
      - V(present) writes the manifest.
      - V(verified) checks the backup against its manifest and fails when anything is wrong (see O(fail_on_error)).
    type: str
    choices: [present, verified]
    default: present
  checksum_algorithm:
    description:
      - Checksum of each file for O(state=present). C(CRC32C) is computed in Python unless the C(crc32c) or
        C(google-crc32c) package is installed on the node, so it is slower than the C(SHA) family here.
      - O(state=verified) uses the algorithms the manifest names.
    type: str
    choices: [NONE, CRC32C, SHA224, SHA256, SHA384, SHA512]
    default: SHA256
  manifest_version:
    description:
      - Manifest format version. Default is 2 when the server version is 17 or newer, else 1
        (C(pg_verifybackup) before 17 refuses version 2).
    type: int
    choices: [1, 2]
  timeline:
    description:
      - Timeline of the backup's WAL range. Default from C(backup.json).
    type: int
  start_lsn:
    description:
      - Start of the WAL range (the redo location of the start checkpoint). Default from C(backup.json).
    type: str
  stop_lsn:
    description:
      - End of the WAL range (the stop location). Default from C(backup.json).
    type: str
  system_identifier:
    description:
      - The cluster's system identifier, written in version 2 manifests. Default from C(backup.json).
    type: str
  server_version_num:
    description:
      - Server version as a number (for example V(170010)); picks the manifest version and the
        C(pg_verifybackup) to run. Default from C(backup.json) (C(pg_version)), else the backup's C(PG_VERSION).
    type: int
  force:
    description:
      - Rewrite an existing manifest with O(state=present).
    type: bool
    default: false
  fail_on_error:
    description:
      - With O(state=verified), fail the task when the backup does not verify. When false the task
        succeeds and RV(verified) and RV(problems) say what is wrong.
    type: bool
    default: true
  run_pg_verifybackup:
    description:
      - With O(state=verified), also run C(pg_verifybackup) for plain backups when one of the backup's
        major version is found (tar and cpio backups are verified by this module alone).
    type: bool
    default: true
  pg_verifybackup:
    description:
      - Path of the C(pg_verifybackup) to run. Default is to look in C(/usr/lib/postgresql/<major>/bin),
        C(/usr/pgsql-<major>/bin), C(/var/cache/pgops-online-backup/pg17-tools/bin) (for 17) and E(PATH),
        and to use the first whose C(--version) has the backup's major version.
    type: path
  wal_archive:
    description:
      - A directory of archived WAL. When set, C(pg_verifybackup) also parses the backup's WAL range from
        it (C(-w)); otherwise WAL parsing is skipped (C(-n)).
    type: path
  record:
    description:
      - With O(state=verified), record the result as C(verification) in the backup's C(backup.json)
        (when it exists, and not in check mode). Recording does not count as a change.
    type: bool
    default: true
notes:
  - The manifest lists C(backup_label) and C(tablespace_map) but never C(backup_manifest), C(backup.json)
    or anything under C(pg_wal) (the WAL is in the archive, as with C(pg_basebackup -X none)).
  - Modification times are not checked by verification (neither C(pg_verifybackup) does).
  - The files must be readable by the user the module runs as (use C(become)).
seealso:
  - name: pg_verifybackup
    description: PostgreSQL documentation.
    link: https://www.postgresql.org/docs/current/app-pgverifybackup.html
  - name: Backup manifest format
    description: PostgreSQL documentation.
    link: https://www.postgresql.org/docs/current/backup-manifest-format.html
"""

EXAMPLES = r"""
- name: Write the manifest of a finished backup
  pgops.online_backup.pg_backup_manifest:
    path: /backup/pg/20261129T101500Z
  become: true
  become_user: postgres

- name: Write it with CRC32C checksums and explicit WAL range (before backup.json exists)
  pgops.online_backup.pg_backup_manifest:
    path: /backup/pg/20261129T101500Z
    checksum_algorithm: CRC32C
    timeline: 1
    start_lsn: 0/2000028
    stop_lsn: 0/2000100
    server_version_num: 170010
    system_identifier: "7441234567890123456"

- name: Verify a backup, also parsing its WAL from the archive
  pgops.online_backup.pg_backup_manifest:
    path: /backup/pg/20261129T101500Z
    state: verified
    wal_archive: /backup/wal
  register: check

- name: Report problems without failing
  pgops.online_backup.pg_backup_manifest:
    path: /backup/pg/20261129T101500Z
    state: verified
    fail_on_error: false
  register: check
"""

RETURN = r"""
from_copy_step:
  description: With O(state=present), whether sizes and checksums recorded by M(pgops.online_backup.pg_backup_copy)
    during the copy were used (no second read of the backup).
  returned: state is present
  type: bool
manifest:
  description: Manifest files written or read (the first is the one C(pg_verifybackup) reads by default).
  returned: always
  type: list
  elements: str
  sample: [/backup/pg/20261129T101500Z/data/backup_manifest, /backup/pg/20261129T101500Z/backup_manifest]
method:
  description: Backup method found (C(tar), C(cpio), C(rsync) or C(plain)).
  returned: always
  type: str
compression:
  description: Compression of the archives (C(none), C(gzip), C(zstd), C(lz4)).
  returned: always
  type: str
manifest_version:
  description: Version of the manifest format written or read.
  returned: when a manifest was written or read
  type: int
checksum_algorithm:
  description: Checksum algorithm of the files (comma-separated when a manifest mixes several).
  returned: when a manifest was written or read
  type: str
manifest_checksum:
  description: The manifest's own SHA-256 (its C(Manifest-Checksum)).
  returned: when a manifest was written or read
  type: str
files:
  description: Number of files listed (present) or checked (verified).
  returned: always
  type: int
bytes:
  description: Total size of those files.
  returned: always
  type: int
seconds:
  description: Time the task spent reading and checksumming.
  returned: always
  type: float
verified:
  description: Whether the backup matches its manifest (and C(pg_verifybackup) agreed, when it ran).
  returned: state is verified
  type: bool
problems:
  description:
    - One entry per problem found, sorted by path. C(problem) is C(missing), C(extra), C(size), C(checksum),
      or C(unreadable) (an archive or file that could not be read; C(actual) says why).
    - Paths are manifest paths (relative to the data directory); a missing or unreadable archive is
      named by its file name in the backup directory.
  returned: state is verified
  type: list
  elements: dict
  sample: [{path: base/5/16384, problem: checksum, expected: "9f86d0...", actual: "60303a..."}]
pg_verifybackup:
  description:
    - What C(pg_verifybackup) said. C(ran) false with a C(reason) when it did not run.
    - When it ran, C(path), C(version), C(command), C(rc), C(ok) and C(output) (its lines).
  returned: state is verified
  type: dict
verification:
  description: The record written to C(backup.json) (C(verified), C(at), C(problems_count), C(tool)).
  returned: state is verified and it was recorded
  type: dict
notes:
  description: Remarks about the layout (for example a C(backup_label) inside the base archive that was ignored).
  returned: always
  type: list
  elements: str
"""

import datetime
import os
import re
import shutil
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._backup_api import format_lsn, parse_lsn
from ansible_collections.pgops.online_backup.plugins.module_utils._errors import PgopsError
from ansible_collections.pgops.online_backup.plugins.module_utils._files import write_private_file
from ansible_collections.pgops.online_backup.plugins.module_utils._layout import (
    AGE_IDENTITY_OPTIONS,
    BACKUP_JSON,
    COPY_ENTRIES,
    LayoutError,
    read_backup,
    update_backup,
    use_age_identity,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._manifest import (
    ManifestError,
    build_manifest,
    collect_entries,
    detect_layout,
    entries_from_copy,
    parse_manifest,
    problem,
    verify_layout,
)
from ansible_collections.pgops.online_backup.plugins.module_utils._s3 import S3_OPTION_SPEC, config_from_params, is_s3
from ansible_collections.pgops.online_backup.plugins.module_utils._storage import SSH_OPTION_SPEC, remote_of, stage_backup_at

# subprocess, not run_command (ansible-core 2.21's pylint check ansible-bad-function): pg_verifybackup --version
# runs under a timeout (run_command has none); its check keeps stdout and stderr as one ordered stream.
# pylint: disable=ansible-bad-function

TOOL = "pgops.online_backup.pg_backup_manifest"
MAX_PROBLEMS_IN_MSG = 100
VERIFYBACKUP_DIRS = ("/usr/lib/postgresql/{major}/bin", "/usr/pgsql-{major}/bin")
# The PostgreSQL 17 client tools this collection's setup installs (no distribution package here).
VERIFYBACKUP_EXTRA = {17: ("/var/cache/pgops-online-backup/pg17-tools/bin",)}
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


# A backup in a bucket or on a repository host: where its verification is recorded (set by main).
REMOTE = {}


def _value(params: dict, info: dict, option: str, key: str | None = None):
    value = params.get(option)
    if value in (None, ""):
        value = info.get(key or option)
    return value


def server_version_num(module, layout, info: dict) -> int | None:
    num = _value(module.params, info, "server_version_num", "pg_version")
    if num not in (None, ""):
        try:
            return int(num)
        except (TypeError, ValueError):
            module.fail_json(msg=f"server version {num!r} is not a number like 170010")
    if layout.data_dir:
        try:
            with open(os.path.join(layout.data_dir, "PG_VERSION")) as f:
                return int(f.read().strip()) * 10000
        except (OSError, ValueError):
            return None
    return None


def common_result(layout) -> dict:
    return {"method": layout.method, "compression": layout.compression, "manifest": layout.manifest_paths, "notes": []}


def read_existing(paths: list) -> tuple:
    """(path, bytes) of the first existing manifest, or (None, None)."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                return path, f.read()
        except FileNotFoundError:
            continue
    return None, None


def manifest_facts(manifest) -> dict:
    algorithms = sorted({e.algorithm or "NONE" for e in manifest.files.values()})
    return {
        "manifest_version": manifest.version,
        "checksum_algorithm": algorithms[0] if len(algorithms) == 1 else ",".join(algorithms) or "NONE",
        "manifest_checksum": manifest.checksum,
    }


# -- state=present


def wal_range(module, info: dict) -> tuple:
    p = module.params
    out = {}
    for name in ("timeline", "start_lsn", "stop_lsn"):
        value = _value(p, info, name)
        if value in (None, ""):
            module.fail_json(msg=f"{name} is unknown: {BACKUP_JSON} does not have it; pass the {name} option")
        out[name] = value
    try:
        timeline = int(out["timeline"])
        start, stop = parse_lsn(str(out["start_lsn"])), parse_lsn(str(out["stop_lsn"]))
    except ValueError as e:
        module.fail_json(msg=f"invalid WAL range: {e}")
    if stop < start:
        module.fail_json(msg=f"stop_lsn {format_lsn(stop)} is before start_lsn {format_lsn(start)}")
    return timeline, start, stop


def present(module, layout, info: dict):
    p = module.params
    result = common_result(layout)
    began = time.monotonic()
    path, existing = read_existing(layout.manifest_paths)
    if existing is not None and not p["force"]:
        try:
            manifest = parse_manifest(existing)
        except ManifestError as e:
            module.fail_json(msg=f"the existing manifest {path} is invalid ({e}); use force=true to rewrite it", **result)
        # Keep the copies of a plain backup in step; never recompute over an existing manifest.
        absent = [m for m in layout.manifest_paths if not os.path.exists(m)]
        if absent and not module.check_mode:
            for m in absent:
                write_private_file(m, existing)
        result.update(manifest_facts(manifest), files=len(manifest.files), bytes=manifest.total_bytes)
        result["seconds"] = round(time.monotonic() - began, 3)
        what = f"copied to {', '.join(absent)}" if absent else "kept"
        module.exit_json(changed=bool(absent), msg=f"manifest {path} exists and was {what} (force=true rewrites it)", **result)

    timeline, start, stop = wal_range(module, info)
    version_num = server_version_num(module, layout, info)
    version = p["manifest_version"] or (2 if version_num and version_num >= 170000 else 1)
    sysid = _value(p, info, "system_identifier")
    if version >= 2:
        if sysid in (None, "") or not str(sysid).isdigit():
            module.fail_json(
                msg=f"a version 2 manifest needs the system identifier (got {sysid!r}); pass system_identifier", **result
            )
    if layout.missing:
        module.fail_json(msg=f"cannot write a manifest: the backup lacks {', '.join(layout.missing)}", **result)

    algorithm = p["checksum_algorithm"]
    # Check mode lists the files but does not read them. The copy step may have
    # recorded sizes and checksums as the data passed by: then nothing is read again.
    sidecar = os.path.join(layout.root, COPY_ENTRIES)
    collected = None
    if not module.check_mode and os.path.exists(sidecar):
        collected = entries_from_copy(layout, algorithm, sidecar)
    result["from_copy_step"] = collected is not None
    entries, errors = collected if collected is not None else collect_entries(layout, None if module.check_mode else algorithm)
    result["notes"] = sorted(set(layout.notes))
    if errors:
        listed = "; ".join(f"{e['path']}: {e['actual']}" for e in errors[:MAX_PROBLEMS_IN_MSG])
        module.fail_json(msg=f"cannot write a manifest: {listed}", problems=errors, **result)
    if not any(e.path == "backup_label" for e in entries):
        where = "data/backup_label" if layout.method == "rsync" else "backup_label at the backup root"
        module.fail_json(msg=f"cannot write a manifest: {where} is missing (write the label from the stop call first)", **result)
    result.update(files=len(entries), bytes=sum(e.size for e in entries), manifest_version=version, checksum_algorithm=algorithm)
    if module.check_mode:
        result["seconds"] = round(time.monotonic() - began, 3)
        module.exit_json(changed=True, msg=f"would write a manifest of {len(entries)} files", **result)
    try:
        data = build_manifest(entries, [(timeline, start, stop)], version=version, system_identifier=sysid)
    except ValueError as e:
        module.fail_json(msg=f"cannot write a manifest: {e}", **result)
    changed = False
    for m in layout.manifest_paths:
        old = None
        if os.path.exists(m):
            with open(m, "rb") as f:
                old = f.read()
        if old != data:
            write_private_file(m, data)
            changed = True
    if os.path.exists(sidecar):
        os.unlink(sidecar)  # served its purpose; the manifest is the record now
    result["manifest_checksum"] = parse_manifest(data).checksum
    result["seconds"] = round(time.monotonic() - began, 3)
    msg = f"manifest of {len(entries)} files ({algorithm}) " + ("written" if changed else "unchanged")
    module.exit_json(changed=changed, msg=msg, **result)


# -- state=verified


def tool_version(path: str) -> tuple:
    """(major, version text) from --version, or (None, error)."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    m = _VERSION_RE.search(out)
    if not m:
        return None, out.strip()
    return int(m.group(1)), out.strip()


def find_pg_verifybackup(module, major: int | None) -> tuple:
    """(path, version text, reason): the pg_verifybackup to run, or path None and why not."""
    given = module.params["pg_verifybackup"]
    if given:
        if not os.access(given, os.X_OK):
            module.fail_json(msg=f"pg_verifybackup {given} is not an executable file")
        found, text = tool_version(given)
        if major and found != major:
            module.warn(f"{given} is version {found}, the backup is from PostgreSQL {major}; running it as asked")
        return given, text, None
    if not major:
        return None, None, "the backup's PostgreSQL major version is unknown"
    if major < 13:
        return None, None, f"pg_verifybackup exists from PostgreSQL 13; this backup is from {major}"
    candidates = [os.path.join(d.format(major=major), "pg_verifybackup") for d in VERIFYBACKUP_DIRS]
    candidates += [os.path.join(d, "pg_verifybackup") for d in VERIFYBACKUP_EXTRA.get(major, ())]
    on_path = shutil.which("pg_verifybackup")
    if on_path:
        candidates.append(on_path)
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            found, text = tool_version(candidate)
            if found == major:
                return candidate, text, None
    return None, None, f"no pg_verifybackup of PostgreSQL {major} found (pass pg_verifybackup)"


def run_pg_verifybackup(module, layout, manifest_path: str, major: int | None) -> dict:
    p = module.params
    if not p["run_pg_verifybackup"]:
        return {"ran": False, "reason": "run_pg_verifybackup is false"}
    if layout.data_dir is None:
        return {"ran": False, "reason": f"{layout.method} backups are verified by this module only"}
    path, version, reason = find_pg_verifybackup(module, major)
    if path is None:
        return {"ran": False, "reason": reason}
    cmd = [path, "-m", manifest_path]
    cmd += ["-w", p["wal_archive"]] if p["wal_archive"] else ["-n"]
    cmd.append(layout.data_dir)
    env = dict(os.environ, LC_ALL="C", LANG="C")  # its messages in English, whatever the node's locale
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"ran": True, "path": path, "version": version, "command": cmd, "rc": proc.returncode,
            "ok": proc.returncode == 0, "output": lines}  # fmt: skip


def describe(problems: list, pgv: dict) -> str:
    words = {"missing": "missing", "extra": "not in the manifest", "size": "size differs",
             "checksum": "checksum mismatch", "unreadable": "unreadable"}  # fmt: skip
    parts = []
    for pr in problems[:MAX_PROBLEMS_IN_MSG]:
        text = f"{pr['path']}: {words.get(pr['problem'], pr['problem'])}"
        if pr["problem"] in ("size", "checksum"):
            text += f" (manifest {pr['expected']}, backup {pr['actual']})"
        elif pr["problem"] == "unreadable" and pr.get("actual"):
            text += f" ({pr['actual']})"
        parts.append(text)
    if len(problems) > MAX_PROBLEMS_IN_MSG:
        parts.append(f"and {len(problems) - MAX_PROBLEMS_IN_MSG} more (all are in problems)")
    if pgv.get("ran") and not pgv.get("ok"):
        parts.append("pg_verifybackup: " + " | ".join(pgv["output"][-MAX_PROBLEMS_IN_MSG:]))
    return "; ".join(parts)


def verified(module, layout, info: dict, info_exists: bool):
    result = common_result(layout)
    began = time.monotonic()
    path, data = read_existing(layout.manifest_paths)
    problems = []
    pgv = {"ran": False, "reason": "no usable manifest"}
    files = size = 0
    if data is None:
        problems.append(problem("backup_manifest", "missing"))
    else:
        result["manifest"] = [path] + [m for m in layout.manifest_paths if m != path]
        try:
            manifest = parse_manifest(data)
        except ManifestError as e:
            problems.append(problem("backup_manifest", "unreadable", None, str(e)))
            manifest = None
        if manifest is not None:
            result.update(manifest_facts(manifest))
            for other in layout.manifest_paths:
                if other != path and os.path.exists(other):
                    with open(other, "rb") as f:
                        if f.read() != data:
                            rel = os.path.relpath(other, layout.root)
                            problems.append(problem(rel, "checksum", f"same as {os.path.relpath(path, layout.root)}", "differs"))
            found, files, size = verify_layout(layout, manifest)
            problems += found
            pgv = run_pg_verifybackup(module, layout, path, (server_version_num(module, layout, info) or 0) // 10000 or None)
    result.update(files=files, bytes=size, seconds=round(time.monotonic() - began, 3), notes=sorted(set(layout.notes)))
    finish_verification(module, layout.root, result, problems, pgv, info_exists)


def finish_verification(module, root: str, result: dict, problems: list, pgv: dict, info_exists: bool):
    """Record the outcome in backup.json, then fail or succeed with every problem named."""
    p = module.params
    ok = not problems and (not pgv.get("ran") or pgv.get("ok"))
    result.update(verified=ok, problems=problems, pg_verifybackup=pgv)
    if info_exists and p["record"] and not module.check_mode:
        tool = TOOL + (f", {pgv['version']}" if pgv.get("ran") else "")
        record = {"verified": ok, "at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "problems_count": len(problems), "tool": tool}  # fmt: skip
        try:
            if REMOTE:
                # The record goes to the remote backup.json (read again: a drill may have written it meanwhile).
                st, bid = REMOTE["storage"], REMOTE["backup_id"]
                st.write_backup(bid, dict(st.read_backup(bid) or {}, verification=record))
            else:
                update_backup(root, verification=record)
            result["verification"] = record
        except (PgopsError, OSError) as e:
            module.warn(f"could not record the verification in {BACKUP_JSON}: {e}")
    root = REMOTE.get("where", root)
    if not ok:
        msg = f"backup {root} failed verification: {describe(problems, pgv)}"
        if p["fail_on_error"]:
            module.fail_json(msg=msg, **result)
        module.exit_json(changed=False, msg=msg, **result)
    checked = f"{result['files']} files, {result['bytes']} bytes" + (", pg_verifybackup agrees" if pgv.get("ran") else "")
    module.exit_json(changed=False, msg=f"backup {root} verified ({checked})", **result)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="str", required=True),
            state=dict(type="str", default="present", choices=["present", "verified"]),
            checksum_algorithm=dict(
                type="str", default="SHA256", choices=["NONE", "CRC32C", "SHA224", "SHA256", "SHA384", "SHA512"]
            ),
            manifest_version=dict(type="int", choices=[1, 2]),
            timeline=dict(type="int"),
            start_lsn=dict(type="str"),
            stop_lsn=dict(type="str"),
            system_identifier=dict(type="str"),
            server_version_num=dict(type="int"),
            force=dict(type="bool", default=False),
            fail_on_error=dict(type="bool", default=True),
            run_pg_verifybackup=dict(type="bool", default=True),
            pg_verifybackup=dict(type="path"),
            wal_archive=dict(type="path"),
            record=dict(type="bool", default=True),
            **AGE_IDENTITY_OPTIONS,
            **S3_OPTION_SPEC,
            **SSH_OPTION_SPEC,
        ),
        mutually_exclusive=[("age_identity", "age_identity_file")],
        supports_check_mode=True,
    )
    try:
        use_age_identity(module.params)
    except LayoutError as e:
        module.fail_json(msg=str(e))
    root = module.params["path"]
    remote = {}
    ssh = remote_of(module.params)
    if is_s3(root) or ssh:
        where = "a bucket" if is_s3(root) else "a repository host"
        if module.params["state"] != "verified":
            module.fail_json(msg=f"a backup in {where} gets its manifest when it is marked complete: state=verified reads it")
        if is_s3(root) and ssh:
            module.fail_json(msg="repository_host is for a repository reached over ssh, not for an s3:// path")
        try:
            st, bid, root, remote = stage_backup_at(root, config_from_params(module.params), ssh, prefix=".pgops-verify-")
        except PgopsError as e:
            module.fail_json(msg=str(e))
        REMOTE.update(storage=st, backup_id=bid, where=f"{ssh.target}:{module.params['path']}" if ssh else module.params["path"])
        if ssh and (read_backup(root) or {}).get("method") == "rsync":
            module.fail_json(
                msg=f"{REMOTE['where']} is an rsync backup: its data/ directory is verified where it is (run this module "
                "on the repository host, without repository_host)"
            )
        module.params["run_pg_verifybackup"] = False  # archives elsewhere: pg_verifybackup cannot read them
    if not os.path.isdir(root):
        module.fail_json(msg=f"backup directory {root} does not exist")
    info_path = os.path.join(root, BACKUP_JSON)
    info_exists = os.path.exists(info_path)
    info = read_backup(root) if info_exists else {}
    if info is None:
        module.fail_json(msg=f"{info_path} is not a JSON object")
    try:
        layout = detect_layout(root, info)
    except (LayoutError, OSError) as e:
        if module.params["state"] == "verified":
            # Not readable as a backup at all: a failed verification like any other.
            result = {"method": info.get("method"), "compression": info.get("compression"), "manifest": [], "notes": [],
                      "files": 0, "bytes": 0, "seconds": 0.0}  # fmt: skip
            why = {"ran": False, "reason": "the backup's layout is not readable"}
            finish_verification(module, root, result, [problem(".", "unreadable", None, str(e))], why, info_exists)
        module.fail_json(msg=str(e))
    for src in layout.sources:
        src.location = remote.get(src.location, src.location)  # a bucket's archives are streamed from it
    try:
        if module.params["state"] == "present":
            present(module, layout, info)
        else:
            verified(module, layout, info, info_exists)
    except OSError as e:
        # Typically a file the module's user may not read or write: run it as the backup's owner.
        module.fail_json(msg=f"{e.filename or root}: {e.strerror or e}")


if __name__ == "__main__":
    main()
