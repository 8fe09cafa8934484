# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backup repository: the per-cluster lock, the catalog (every backup's
backup.json), one backup's record from running to complete or failed, and
retention. File names and backup.json itself belong to _layout.

Only a backup whose backup.json says status "complete" is ever trusted.
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import socket
import time

from ._backup_api import BackupApiError, major_of, wal_segment_name, wal_segment_names, wal_segno
from ._errors import PgopsError
from ._files import resolves_inside
from ._incremental import FILES_FILE, parent_file_map
from ._layout import (
    BACKUP_JSON,
    COLLECTION_VERSION,
    DIGEST_SUFFIX,
    LOCK_DIR,
    MANIFEST,
    RSYNC_DATA,
    SCHEMA,
    backup_dir,
    is_encrypted,
    new_backup_id,
    parse_stored_wal,
    valid_backup_id,
    wal_dir,
)
from ._metrics import publish
from ._s3 import parse_url
from ._sessions import liveness
from ._storage import is_s3_url, open_storage

INVALID = "invalid"  # a backup.json that cannot be read as a JSON object
# A lock no session has claimed yet (the run is between the record and the start)
# or whose session this process cannot see is trusted this long after its last sign of life.
DEFAULT_GRACE = 120
REMOTE_TRUST = 86400
DEFAULT_SEGMENT_SIZE = 16 << 20  # a backup.json of an older version does not say


class RepositoryError(PgopsError):
    pass


def utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def validate_repository(path: str, forbidden_roots: list) -> str | None:
    """Why path cannot be a repository (None when it can)."""
    if is_s3_url(path):
        try:
            parse_url(path)
        except PgopsError as e:
            return str(e)
        return None
    if not path or not os.path.isabs(path):
        return f"repository {path!r} must be an absolute path or an s3://bucket/prefix URL"
    for root in forbidden_roots:
        if root and resolves_inside(path, root):
            return f"repository {path} is inside {root} (the data directory or a tablespace): the backup would copy itself"
    return None


def ensure_repository(repository) -> None:
    """Create the repository itself (0700) but never a missing parent: that is a typo until proven otherwise.
    A bucket is checked instead (it must exist, the keys must work)."""
    st = open_storage(repository)
    if st.kind == "s3":
        st.store.check()
        return
    path = st.root
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if not os.path.isdir(path):
        if not os.path.isdir(parent):
            raise RepositoryError(
                f"the parent directory {parent} of repository {path} does not exist: check the path for a typo, or "
                "create the parent first (only the repository itself is created)"
            )
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass


# -- the lock


def lock_rel(cluster: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", cluster)
    return f"{LOCK_DIR}/{safe}.lock"


def lock_path(repository, cluster: str) -> str:
    return open_storage(repository).path(lock_rel(cluster))


def lock_holder(repository, rel: str, lock: dict, grace: float, now: float | None = None) -> tuple:
    """(live, why) of the run that holds an existing lock.

    The holder is the backup's session (its keeper, then its archive wait):
    gone means the lock is free at once. Only a lock whose session has not
    started yet, or that this process cannot see (another host, another user),
    is trusted for a while by its last sign of life."""
    st = open_storage(repository)
    now = time.time() if now is None else now
    bid = lock.get("backup_id")
    info = st.read_backup(bid) if valid_backup_id(bid) else None
    if info is not None and info.get("status") in ("complete", "failed"):
        return False, f"its backup {bid} is {info['status']}"
    taken = st.mtime(rel)
    if taken is None:
        return False, "it is gone"
    age = now - taken
    session = lock.get("session") or {}
    if lock.get("host") != socket.gethostname() or not session.get("runtime_dir"):
        # The session is on another host (a repository host's lock): nothing here can see it. Its sign of
        # life is the lock or what its copy writes into the backup, whichever is newer: a copy that runs
        # longer than a day keeps its lock as long as it writes.
        touched = st.newest_mtime(bid) if valid_backup_id(bid) else 0.0
        quiet = now - max(touched, taken)
        return (quiet <= REMOTE_TRUST), (
            f"its session is on another host; the lock was taken {int(age)}s ago, its backup last written {int(quiet)}s ago"
        )
    live, why = liveness(session["runtime_dir"], session["id"], grace, now)
    if live is not None:
        return live, why
    touched = st.newest_mtime(bid) if valid_backup_id(bid) else 0.0
    quiet = now - max(touched, now - age)
    if quiet <= grace:
        return True, f"its run started {int(age)}s ago and its session has not started yet"
    return False, f"no session holds it and backup {bid} has not been touched for {int(quiet)}s"


def acquire_lock(repository, cluster: str, backup_id: str, grace: float, session: dict | None) -> tuple:
    """Take the cluster's lock in this repository; (path, note about a broken stale lock).

    The lock is created only where none exists (written in full, then linked into
    place; in a bucket, a conditional PUT), so nobody ever reads a half-written lock."""
    st = open_storage(repository)
    rel = lock_rel(cluster)
    content = {"backup_id": backup_id, "host": socket.gethostname(), "created_at": utcnow(), "session": session or {}}
    note = None
    for _attempt in range(3):  # claim; break a stale lock (or see a newer one); claim again
        if st.claim(rel, content):
            return st.path(rel), note
        lock = st.read_json(rel) or {}
        live, why = lock_holder(st, rel, lock, grace)
        if live:
            raise RepositoryError(
                f"another backup of this cluster into {st.url} is running: backup {lock.get('backup_id')} "
                f"started at {lock.get('created_at')} on {lock.get('host')} holds the lock {st.path(rel)} ({why}). Wait "
                "for it to finish, or end it: pgops.online_backup.pg_backup_session_info lists the sessions "
                f"and pg_backup_session state=aborted session_id={(lock.get('session') or {}).get('id')} ends it"
            ) from None
        if not st.delete_if(rel, lock):
            continue  # another run replaced the stale lock meanwhile: judge that one
        note = f"removed a stale lock {st.path(rel)} ({why})"
        dead = lock.get("backup_id")
        if valid_backup_id(dead):
            _mark_dead_run_failed(st, dead, why)
    raise RepositoryError(f"could not take the lock {st.path(rel)}")


def _mark_dead_run_failed(st, backup_id: str, why: str) -> None:
    """A run that died holding the lock left a backup marked running: say what happened."""
    info = st.read_backup(backup_id)
    if info is not None and info.get("status") == "running":
        info.update(status="failed", failed_at=utcnow(), error=f"the run died before finishing ({why})")
        st.write_backup(backup_id, info)
        st.abandon(backup_id)


def release_lock(repository, cluster: str, backup_id: str) -> bool:
    """Remove the lock if this backup holds it."""
    st = open_storage(repository)
    rel = lock_rel(cluster)
    lock = st.read_json(rel)
    if lock and lock.get("backup_id") == backup_id:
        st.delete(rel)
        return True
    return False


# -- the catalog


def read_entry(repository, backup_id: str, size: bool = False) -> dict | None:
    """The catalog entry of one backup, or None when it has no backup.json."""
    st = open_storage(repository)
    if not st.has_backup_json(backup_id):
        return None
    doc = st.read_backup(backup_id)
    path = st.path(backup_id)
    if doc is None:
        # Listed so that a damaged catalog is seen, but never trusted.
        entry = {"id": backup_id, "status": INVALID, "error": f"{path}/{BACKUP_JSON} is not a JSON object"}
    else:
        entry = dict(doc)
        entry.setdefault("id", backup_id)
    entry["path"] = path
    if size:
        entry["size_on_disk"] = st.tree_size(backup_id)
    return entry


def read_catalog(repository, size: bool = False) -> list:
    """Every backup of the repository, newest first (ids sort by time, e.g. 20261129T101500Z)."""
    st = open_storage(repository)
    if st.kind == "file" and not os.path.isdir(st.root):
        raise RepositoryError(f"repository {st.root} does not exist or is not a directory")
    entries = []
    for name in st.list_dir() if st.kind == "file" else st.backup_ids():
        if st.kind == "file":
            path = st.path(name)
            if name.startswith(".") or os.path.islink(path) or not os.path.isdir(path):
                continue  # lock files, temporary directories, links to elsewhere
        entry = read_entry(st, name, size=size)
        if entry is not None:
            entries.append(entry)
    return sort_newest_first(entries)


def sort_newest_first(entries: list) -> list:
    return sorted(entries, key=lambda e: str(e.get("id")), reverse=True)


def is_complete(entry: dict) -> bool:
    return entry.get("status") == "complete"


def distrust(entry: dict) -> str | None:
    """Why a complete backup is known to be damaged (its newest verification or drill
    failed), else None. A later check that passed clears an earlier failure."""
    checks = []
    verification = entry.get("verification")
    if isinstance(verification, dict) and verification.get("at"):
        bad = verification.get("verified") is False
        why = f"its verification at {verification['at']} found {verification.get('problems_count', 'some')} problem(s)"
        checks.append((str(verification["at"]), bad, why))
    drill = entry.get("drill")
    if isinstance(drill, dict) and drill.get("at"):
        bad = drill.get("result") == "failed"
        why = f"its restore drill at {drill['at']} failed: {drill.get('error') or 'see its backup.json'}"
        checks.append((str(drill["at"]), bad, why))
    if not checks:
        return None
    _at, bad, why = max(checks)
    return why if bad else None


def latest(
    entries: list, allow_unverified: bool = False, skipped: list | None = None, before: float | None = None
) -> dict | None:
    """The newest complete backup that is not known to be damaged, nor is any backup an
    incremental one is restored from (and, with before, that stopped before that time: the one a
    point-in-time recovery to it starts from); running, failed and unreadable ones never count.
    Passed-over damaged ones are appended to skipped."""
    by_id = {e.get("id"): e for e in entries}
    for entry in sort_newest_first(entries):
        if not is_complete(entry):
            continue
        if before is not None and not (_when(entry.get("stopped_at")) or before) < before:
            continue
        why = (None if allow_unverified else distrust(entry)) or chain_problem(by_id, entry, allow_unverified)
        if why is None:
            return entry
        if skipped is not None:
            skipped.append({"id": entry.get("id"), "reason": why})
    return None


def restored_with_parent(entry: dict) -> bool:
    """Whether restoring this backup needs its parent: every incremental one but a file-level rsync
    one, which is a complete directory (its unchanged files are hard links to the parent's)."""
    if entry.get("type") != "incremental":
        return False
    return not (entry.get("method") == "rsync" and (entry.get("incremental") or {}).get("mode") == "file")


def chain_problem(by_id: dict, entry: dict, allow_unverified: bool = False) -> str | None:
    """Why an incremental backup cannot be restored for one of its parents (missing, not complete, or
    known to be damaged), else None."""
    child, seen = entry, set()
    while restored_with_parent(child):
        pid = child.get("parent")
        if pid in seen:
            return f"its chain of parents loops at {pid}"
        seen.add(pid)
        parent = by_id.get(pid)
        if parent is None:
            return f"its parent {pid} is not in the repository"
        if not is_complete(parent):
            return f"its parent {pid} is {parent.get('status')}"
        why = None if allow_unverified else distrust(parent)
        if why:
            return f"its parent {pid} is known to be damaged: {why}"
        child = parent
    return None


def choose_parent(entries: list, cluster: str, method: str, pg_version) -> tuple:
    """(the parent of an incremental backup, None) or (None, why there is none): the newest complete,
    trusted backup of the cluster whose own parents are all there and trusted, when it was taken the same
    way (method, major) and has a manifest."""
    mine = [e for e in entries if e.get("system_identifier") == cluster]
    newest = latest(mine)
    if newest is None:
        return None, "there is no complete, trusted backup of this cluster to be its parent"
    bid = newest["id"]
    if newest.get("method") != method:
        return None, f"the newest backup {bid} was taken with method {newest.get('method')}, this one with {method}"
    try:
        same_major = major_of(newest.get("pg_version") or "") == major_of(pg_version)
    except BackupApiError:
        same_major = False
    if not same_major or not newest.get("start_lsn") or not newest.get("timeline"):
        return None, f"the newest backup {bid} is of PostgreSQL {newest.get('pg_version')} or lacks its start LSN and timeline"
    if not newest.get("manifest"):
        return None, f"the newest backup {bid} has no backup_manifest, which pg_combinebackup needs"
    if (
        major_of(pg_version) >= 17
        and newest.get("type") == "incremental"
        and (newest.get("incremental") or {}).get("mode") == "file"
    ):
        return None, f"the newest backup {bid} is a file-level incremental, which pg_combinebackup cannot take as a parent"
    parent = {"id": bid, "start_lsn": newest["start_lsn"], "timeline": newest["timeline"], "type": newest.get("type", "full")}
    return dict(parent, started_at=newest.get("started_at")), None


def parent_files(repository, parent_id: str) -> dict:
    """Every file of a backup, for a file-level incremental: those it stored (its manifest) and those it
    took from earlier backups (its files list). RepositoryError when its manifest cannot be read."""
    st = open_storage(repository)
    manifest = st.read_json(f"{parent_id}/{MANIFEST}")
    if not isinstance(manifest, dict):
        raise RepositoryError(f"the parent backup {parent_id} has no readable backup_manifest")
    return parent_file_map(parent_id, manifest, st.read_json(f"{parent_id}/{FILES_FILE}"))


def chain_of(entries: list, backup: dict) -> list:
    """The parents an incremental backup is restored from, oldest (its full one) first, as far as the
    catalog holds them: a restore verifies each before it trusts it (a missing one is refused there)."""
    by_id = {e.get("id"): e for e in entries}
    chain, child = [], backup
    while child.get("type") == "incremental" and child.get("parent") in by_id and len(chain) < 1000:
        child = by_id[child["parent"]]
        if any(c is child for c in chain):
            break
        chain.insert(0, child)
    return chain


def select(
    entries: list, wanted: str, allow_unverified: bool = False, skipped: list | None = None, before: float | None = None
) -> dict:
    """The backup named by wanted ("latest" or an id); raises RepositoryError with the reason.

    A backup whose newest verification or drill failed is never chosen as latest, and
    is refused by id, unless allow_unverified."""
    if wanted == "latest":
        found = latest(entries, allow_unverified, skipped, before)
        if found is None:
            states = ", ".join(f"{e['id']} ({e.get('status')})" for e in entries[:5]) or "none"
            damaged = " (damaged ones were skipped)" if skipped else ""
            when = " that stopped before the recovery target" if before is not None else ""
            raise RepositoryError(f"no complete, trusted backup{when} in the repository{damaged} (newest backups: {states})")
        return found
    for entry in entries:
        if str(entry.get("id")) == wanted:
            if not is_complete(entry):
                raise RepositoryError(f"backup {wanted} is not complete (status: {entry.get('status')}); it cannot be trusted")
            why = None if allow_unverified else distrust(entry)
            if why:
                raise RepositoryError(
                    f"backup {wanted} is known to be damaged: {why}. Choose another backup, or set allow_unverified "
                    "(pg_restore_force_unverified: true) to restore it anyway"
                )
            return entry
    ids = ", ".join(str(e["id"]) for e in entries[:5]) or "none"
    raise RepositoryError(f"backup {wanted} not found in the repository (newest: {ids})")


def filter_status(entries: list, statuses) -> list:
    if not statuses:
        return list(entries)
    return [e for e in entries if e.get("status") in statuses]


# -- one backup's record


# Set by this file alone: a caller's fields never override them.
RESERVED = ("id", "status", "schema", "completed_at", "failed_at", "manifest", "size_on_disk")


def caller_fields(fields: dict | None) -> dict:
    return {k: v for k, v in (fields or {}).items() if k not in RESERVED}


def note_parent(repository: str, backup_id: str, parent_id: str) -> dict:
    """Record in a running backup the parent it was given, so that retention (which may run
    meanwhile, from another play) keeps that parent; completion records the final one."""
    st = open_storage(repository)
    info = st.read_backup(backup_id)
    if not isinstance(info, dict) or info.get("status") != "running":
        raise RepositoryError(f"backup {backup_id} is not running; its parent is not recorded")
    info["parent"] = parent_id
    st.write_backup(backup_id, info)
    return info


def open_backup(repository: str, cluster: str, fields: dict, lock_grace: float, session_runtime_dir: str | None, warn) -> dict:
    """A new backup directory, the cluster's lock, backup.json "running".

    session_runtime_dir: where the run starts this backup's session, with the
    session id returned here, so that the lock is free the moment that session is gone."""
    st = open_storage(repository)
    ensure_repository(st)
    if st.kind == "file":
        bid, path = new_backup_id(st.root)
    else:
        bid, path = _claim_backup_id(st)
    # Unique across repositories and clusters: several may share one host's sessions directory.
    sid = f"{bid}-{secrets.token_hex(4)}"
    session = {"id": sid, "runtime_dir": session_runtime_dir} if session_runtime_dir else None
    try:
        lock, note = acquire_lock(st, cluster, bid, lock_grace, session)
    except BaseException:
        st.delete_tree(bid)  # a refused run leaves nothing behind
        raise
    if note:
        warn(note)
    info = {
        "schema": SCHEMA,
        "id": bid,
        "status": "running",
        "host": socket.gethostname(),
        "collection_version": COLLECTION_VERSION,
        "created_at": utcnow(),
        "system_identifier": cluster,
        "session_id": sid,
    }
    info.update(caller_fields(fields))
    try:
        st.write_backup(bid, info)
    except BaseException:
        release_lock(st, cluster, bid)
        st.delete_tree(bid)
        raise
    return {"backup_id": bid, "session_id": sid, "path": path, "lock": lock, "backup": info}


def _claim_backup_id(st) -> tuple:
    """A new, unique, sortable backup id in a bucket: claimed with a conditional PUT of its backup.json."""
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(100):
        bid = base if n == 0 else f"{base}-{n:02d}"
        if st.claim(f"{bid}/{BACKUP_JSON}", {"id": bid, "status": "running"}):
            return bid, st.path(bid)
    raise RepositoryError(f"cannot claim a unique backup id in {st.url}")


def complete_backup(
    repository: str,
    backup_id: str,
    cluster: str,
    fields: dict,
    manifest_checksum,
    keep: int,
    warn,
    metrics_file: str | None = None,
    keep_days: float = 0,
    label_files: dict | None = None,
) -> dict:
    """Record fields, write the manifest (when manifest_checksum), mark the backup
    complete, then release the lock and apply retention (and WAL expiry).
    label_files: {name: text} written into the backup first (a bucket's or a repository host's; backup_label,
    tablespace_map)."""
    st = open_storage(repository)
    backup_dir(st.url, backup_id)  # validates the id
    path = st.path(backup_id)
    info = st.read_backup(backup_id)
    if info is None:
        raise RepositoryError(f"no backup {backup_id} in {st.url}")
    if info.get("status") != "running":
        raise RepositoryError(f"backup {backup_id} is {info.get('status')}, not running: it cannot be marked complete")
    info.update(caller_fields(fields))
    st.write_backup(backup_id, info)
    # Where a restore looks for them: beside the archives, or in an rsync backup's data directory.
    label_dir = f"{backup_id}/{RSYNC_DATA}" if info.get("method") == "rsync" else backup_id
    for name, text in (label_files or {}).items():
        if text:
            st.write_file(f"{label_dir}/{name}", text.encode())
    manifest = None
    if manifest_checksum:
        manifest = st.write_manifest(backup_id, info, manifest_checksum)
    info.update(status="complete", completed_at=utcnow(), size_on_disk=st.tree_size(backup_id), manifest=manifest)
    st.write_backup(backup_id, info)
    # The backup is complete now: housekeeping problems are warnings, never a
    # failure that would make the caller's rescue discard a good backup.
    released, kept = False, {"removed": [], "wal_removed": []}
    try:
        released = release_lock(st, cluster, backup_id)
    except (OSError, PgopsError) as e:
        warn(f"backup {backup_id} is complete but its lock could not be released: {e}")
    try:
        kept = retention(st, info.get("system_identifier"), keep, keep_days)
        if kept.get("wal_kept_because") and (keep or keep_days):
            warn(f"WAL expiry: {kept['wal_kept_because']}")
    except (OSError, PgopsError) as e:
        warn(f"backup {backup_id} is complete but retention failed: {e}")
    if metrics_file:
        try:
            publish(metrics_file, read_catalog(st), st.url)
        except (OSError, PgopsError) as e:
            warn(f"backup {backup_id} is complete but the metrics file {metrics_file} could not be written: {e}")
    return {
        "backup_id": backup_id,
        "path": path,
        "backup": info,
        "removed": kept["removed"],
        "retention": kept,
        "lock_released": released,
        "manifest": manifest,
    }


def fail_backup(
    repository: str,
    backup_id: str,
    cluster: str,
    error: str,
    keep_files: bool,
    fields: dict | None = None,
    metrics_file: str | None = None,
) -> dict:
    """Never leave anything that looks usable, and never touch a complete backup."""
    st = open_storage(repository)
    backup_dir(st.url, backup_id)  # validates the id
    path = st.path(backup_id)
    current = st.read_backup(backup_id)
    if current is None:
        raise RepositoryError(f"no backup {backup_id} in {st.url}")
    if current.get("status") == "complete":
        raise RepositoryError(f"backup {backup_id} is complete: refusing to mark it failed")
    info = dict(current, status="failed", error=error, failed_at=utcnow(), **caller_fields(fields))
    st.write_backup(backup_id, info)
    removed = [] if keep_files else st.delete_payload(backup_id)
    released = release_lock(st, cluster, backup_id)
    out = {"backup_id": backup_id, "path": path, "backup": info, "removed": removed, "lock_released": released}
    if metrics_file:
        try:
            publish(metrics_file, read_catalog(st), st.url)
        except (OSError, PgopsError) as e:
            out["metrics_error"] = f"the metrics file {metrics_file} could not be written: {e}"
    return out


# -- pins


def pin_backup(repository, backup_id: str, pinned: bool, reason: str = "", by: str = "", dry_run: bool = False) -> tuple:
    """(changed, backup.json) after pinning a complete backup (retention never removes it) or unpinning it;
    dry_run checks and says the same, and writes nothing."""
    st = open_storage(repository)
    backup_dir(st.url, backup_id)  # validates the id
    info = st.read_backup(backup_id)
    if info is None:
        raise RepositoryError(f"no backup {backup_id} in {st.url}")
    if pinned and info.get("status") != "complete":
        raise RepositoryError(f"backup {backup_id} is {info.get('status')}: only a complete backup can be pinned")
    current = info.get("pinned")
    if pinned:
        if current and current.get("reason") == reason:
            return False, info
        info["pinned"] = {"at": utcnow(), "by": by or None, "reason": reason}
        if not dry_run:
            st.write_backup(backup_id, info)
        return True, info
    if not current:
        return False, info
    info.pop("pinned")
    if not dry_run:
        st.write_backup(backup_id, info)
    return True, info


# -- retention


def _when(value) -> float | None:
    try:
        return datetime.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def plan_retention(
    entries: list, system_identifier: str, keep: int = 0, keep_days: float = 0, now: float | None = None, restorable=None
) -> dict:
    """What retention keeps and removes of one cluster's backups, and why (pure: entries in, a plan out).

    A complete backup is kept when it is pinned, is the newest complete one, is among the newest
    `keep`, or is needed for point-in-time recovery to any moment of the last `keep_days` days
    (every backup that stopped inside the window, and the newest one that stopped before it).
    Both rules set: a backup either keeps is kept. Neither set: everything is kept, failed
    backups too (they say why a run failed until a rule retires them). Running
    backups are never touched; failed ones go once they are older than the oldest kept backup
    (and, with a window, older than the window).

    Backups a restore would trust count first: one known to be damaged (its newest verification or
    drill failed) or whose chain of parents is broken is kept by the newest and `keep` rules, or as
    the window's base, only where too few good ones are left (never instead of a good one, and never
    fewer backups than before). The newest damaged one, when no rule keeps it and it is newer than
    the oldest backup those rules keep, stays for inspection: it is marked so, and neither its WAL
    nor its start holds back WAL expiry. restorable: the ids whose WAL is all in this repository's archive (None: not
    known here); when no kept backup is among them, the newest trusted one that is stays too."""
    now = time.time() if now is None else now
    mine = [e for e in sort_newest_first(entries) if e.get("system_identifier") == system_identifier]
    complete = [e for e in mine if is_complete(e)]
    by_id = {e["id"]: e for e in mine}
    damaged = {e["id"]: distrust(e) or chain_problem(by_id, e) for e in complete}
    trusted = [e for e in complete if not damaged[e["id"]]]
    ranked = trusted + [e for e in complete if damaged[e["id"]]]  # good ones first, each newest first
    reasons = {}

    def why(entry, reason):
        reasons.setdefault(entry["id"], []).append(reason)

    if ranked:
        why(ranked[0], "the newest complete backup" if ranked[0] is complete[0] else "the newest trusted backup")
    window_start = now - keep_days * 86400 if keep_days else None
    if not keep and not keep_days:
        for e in complete:
            why(e, "no retention rule is set")
    if keep:
        for e in ranked[:keep]:
            why(e, f"among the newest {keep}")
    if window_start is not None:
        before = []
        for e in complete:
            stopped = _when(e.get("stopped_at")) or _when(e.get("completed_at"))
            if stopped is not None and stopped >= window_start:
                why(e, f"stopped inside the {keep_days:g}-day window")
            else:
                before.append(e)
        base = next((e for e in before if not damaged[e["id"]]), before[0] if before else None)
        if base is not None:
            why(base, f"the base for point-in-time recovery to the start of the {keep_days:g}-day window")
    by_rule = [e for e in complete if e["id"] in reasons]
    for e in complete:
        if e.get("pinned"):
            why(e, f"pinned ({(e['pinned'] or {}).get('reason') or 'no reason given'})")
    if restorable is not None and not any(e["id"] in restorable for e in trusted if e["id"] in reasons):
        for e in trusted:
            if e["id"] in restorable:
                why(e, "the newest backup whose WAL is all archived here (the newer ones kept lack some)")
                break
    # A kept incremental keeps its whole chain: without its parents it cannot be restored.
    by_id = {e["id"]: e for e in complete}
    for e in mine:  # a running incremental's parent (recorded when it was chosen) too
        if e.get("status") == "running" and e.get("parent") in by_id:
            why(by_id[e["parent"]], f"the parent of running backup {e['id']}")
    for e in complete:  # newest first: a parent kept here is seen again further down
        if e["id"] in reasons and e.get("type") == "incremental" and e.get("parent") in by_id:
            why(by_id[e["parent"]], f"the parent of incremental backup {e['id']}")
    inspect_only = set()
    newest_damaged = next((e for e in complete if damaged[e["id"]]), None)
    oldest_by_rule = by_rule[-1]["id"] if by_rule else None
    if (
        newest_damaged is not None
        and newest_damaged["id"] not in reasons
        and oldest_by_rule
        and newest_damaged["id"] > oldest_by_rule
    ):
        why(newest_damaged, f"known to be damaged ({damaged[newest_damaged['id']]}): the newest such, kept for inspection")
        inspect_only.add(newest_damaged["id"])
    kept = [e for e in complete if e["id"] in reasons]
    restored_from = [e for e in kept if e["id"] not in inspect_only]
    oldest_kept = restored_from[-1]["id"] if restored_from else None
    remove = []
    for e in mine:
        if e["id"] in reasons or e.get("status") == "running":
            continue
        if is_complete(e):
            bad = damaged[e["id"]]
            reason = f"known to be damaged: {bad}" if bad else "no rule keeps it"
            remove.append({"id": e["id"], "status": "complete", "reason": reason})
        elif e.get("status") in ("failed", INVALID) and (keep or keep_days):
            old_enough = oldest_kept is None or e["id"] < oldest_kept
            if window_start is not None:
                at = _when(e.get("failed_at")) or _when(e.get("created_at")) or 0
                old_enough = old_enough and at < window_start
            if old_enough:
                remove.append({"id": e["id"], "status": e.get("status"), "reason": "failed, older than what is kept"})
    return {
        "keep": [{"id": e["id"], "reasons": reasons[e["id"]], "inspection_only": e["id"] in inspect_only} for e in kept],
        "remove": remove,
        "oldest_kept": restored_from[-1] if restored_from else None,
        "window_start": window_start,
        "keep_rule": bool(keep or keep_days),
    }


def retention(
    repository: str, system_identifier: str, keep: int = 0, keep_days: float = 0, dry_run: bool = False, now: float | None = None
) -> dict:
    """Apply plan_retention to the repository, then expire the WAL no kept backup needs.
    Never touches another cluster's backups; dry_run removes nothing and says what it would."""
    if not system_identifier:
        raise RepositoryError("retention needs the cluster's system identifier: refusing to judge other clusters' backups")
    st = open_storage(repository)
    entries = [e for e in read_catalog(st) if valid_backup_id(e["id"])]
    restorable = _restorable(st, entries, system_identifier)
    plan = plan_retention(entries, system_identifier, keep, keep_days, now, restorable=restorable)
    if not dry_run:
        for r in plan["remove"]:
            st.delete_tree(r["id"])
    out = {
        "removed": [r["id"] for r in plan["remove"]],
        "remove": plan["remove"],
        "kept": plan["keep"],
        "window_start": plan["window_start"],
        "dry_run": dry_run,
    }
    out.update(expire_wal(st, system_identifier, plan, dry_run))
    return out


def _restorable(st, entries: list, system_identifier: str):
    """The ids of the cluster's complete backups whose WAL is all in this repository's archive, or
    None when nothing is archived here (the archive is elsewhere: not known)."""
    files = wal_files(st, wal_dir("", system_identifier).lstrip("/"))
    complete = [e for e in entries if e.get("system_identifier") == system_identifier and is_complete(e)]
    if not files or not complete:
        return None
    seg_size = int(complete[0].get("wal_segment_size") or DEFAULT_SEGMENT_SIZE)
    report = coverage(sort_newest_first(complete), files, seg_size)
    newest = sort_newest_first(complete)[0]
    try:
        current = wal_segno(report["newest_segment"], seg_size) >= wal_segno(newest["start_wal"], seg_size)
    except (KeyError, TypeError, PgopsError):
        current = False
    if not current:
        return None  # the archive here stopped before the newest backup began (it moved elsewhere): not judged here
    return {b["id"] for b in report["backups"] if b["wal_complete"]}


def expire_wal(repository: str, system_identifier: str, plan: dict, dry_run: bool) -> dict:
    """WAL before the lowest start segment of the kept and running backups goes (the lowest by
    position, not the oldest by id: a backup taken on a newer timeline forked from the past, or from
    a lagging standby, starts before older ones), unless a kept backup's own WAL range is
    incomplete: then nothing goes, and why is said."""
    st = open_storage(repository)
    directory = wal_dir("", system_identifier).lstrip("/")
    files = wal_files(st, directory)
    if not (plan["keep_rule"]):
        return {"wal_removed": [], "wal_kept_because": "no retention rule is set (keep, keep_days)"}
    if not files or plan["oldest_kept"] is None:
        return {"wal_removed": [], "wal_kept_because": None if files else "no WAL archived by pgops-wal here"}
    catalog = read_catalog(st)
    kept = [e for e in catalog if e["id"] in {k["id"] for k in plan["keep"] if not k.get("inspection_only")}]
    seg_size = int(plan["oldest_kept"].get("wal_segment_size") or DEFAULT_SEGMENT_SIZE)
    report = coverage(sort_newest_first(kept), files, seg_size)
    broken = [b for b in report["backups"] if not b["wal_complete"]]
    if broken:
        names = ", ".join(f"{b['id']} (missing {', '.join(b['missing'][:3]) or 'its WAL range'})" for b in broken)
        return {"wal_removed": [], "wal_kept_because": f"kept backups lack WAL, so none was expired: {names}"}
    mine = [e for e in catalog if e.get("system_identifier") == system_identifier]
    running = [e for e in mine if e.get("status") == "running" and e.get("start_wal")]
    floor = min((e["start_wal"] for e in kept + running), key=lambda name: wal_segno(name, seg_size))
    doomed = plan_wal_expiry(files, floor, seg_size)
    if not dry_run:
        # An encrypted segment's digest goes with it.
        st.delete_files(directory, [f for n in doomed for f in ((n, n + DIGEST_SUFFIX) if is_encrypted(n) else (n,))])
    return {"wal_removed": doomed, "wal_kept_because": None, "wal_kept_from": floor}


# -- the WAL archive of a cluster (what pgops-wal wrote into <repository>/wal/<system identifier>/)


def wal_files(repository_or_directory, directory: str | None = None) -> list:
    """[(file name, segment name or None, kind, mtime)] of a WAL directory; kind is segment,
    partial, backup or history. wal_files(path) reads a directory; wal_files(storage, rel) a
    repository's (a bucket's too)."""
    if directory is None:
        st, directory = open_storage(repository_or_directory), ""
    else:
        st = open_storage(repository_or_directory)
    out = []
    for name, mtime in st.files(directory):
        parsed = parse_stored_wal(name)
        if parsed is not None:
            out.append((name, parsed[0], parsed[1], mtime))
    return out


def coverage(backups: list, files: list, seg_size: int) -> dict:
    """What the archive lets one restore (pure: the cluster's complete backups, newest first, and
    wal_files() in; a report out). Segments count by their position on any timeline: after a
    promotion the new timeline's segments continue where the old one's stopped."""
    segments = {}  # position -> (name, mtime), the highest timeline's
    timelines = {}  # position -> the timelines that have it
    for _name, seg, kind, mtime in files:
        if kind == "segment":
            pos = wal_segno(seg, seg_size)
            timelines.setdefault(pos, set()).add(int(seg[:8], 16))
            if pos not in segments or seg > segments[pos][0]:
                segments[pos] = (seg, mtime)
    reports = []
    for b in backups:
        try:
            needed = wal_segment_names(b["start_wal"], b["stop_wal"], seg_size)
            first_tli, last_tli = int(b["start_wal"][:8], 16), int(b["stop_wal"][:8], 16)
        except (KeyError, TypeError, ValueError, PgopsError):
            reports.append({"id": b.get("id"), "wal_complete": False, "missing": [], "error": "no WAL range recorded"})
            continue
        # The backup's own timeline (and, when a standby was promoted while it ran, the ones up to
        # its stop's): the same position on another timeline is other WAL.
        missing = [n for n in needed if not any(first_tli <= t <= last_tli for t in timelines.get(wal_segno(n, seg_size), ()))]
        reports.append(
            {
                "id": b["id"],
                "start_wal": b["start_wal"],
                "stop_wal": b["stop_wal"],
                "wal_complete": not missing,
                "missing": missing,
            }
        )
    newest = max(segments) if segments else None
    window = None
    restorable = [(b, r) for b, r in zip(backups, reports) if r["wal_complete"]]
    if restorable:
        base, _r = restorable[-1]  # the oldest restorable backup
        pos = wal_segno(base["stop_wal"], seg_size)
        while pos + 1 in segments:
            pos += 1
        window = {
            "from_backup": base["id"],
            "start": base.get("stopped_at"),
            "end_wal": segments[pos][0],
            "end": datetime.datetime.fromtimestamp(segments[pos][1], datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        start = _when(base.get("stopped_at"))
        window["seconds"] = round(segments[pos][1] - start, 1) if start is not None else None
        window["start_timestamp"], window["end_timestamp"] = start, segments[pos][1]
    gaps = []
    if segments:
        # One pass over the positions present; a hole's size is arithmetic (a gap of hours in an
        # archive of millions of segments must not take hours).
        present = sorted(segments)
        for before, after in zip(present, present[1:]):
            if after - before > 1 and len(gaps) <= 50:
                tli = int(segments[before][0][:8], 16)
                missing = [wal_segment_name(tli, p, seg_size) for p in range(before + 1, min(after, before + 21))]
                gaps.append({"after": segments[before][0], "missing": missing, "count": after - before - 1})
    return {
        "backups": reports,
        "window": window,
        "gaps": gaps,
        "segments": len(segments),
        "newest_segment": segments[newest][0] if newest is not None else None,
        "oldest_segment": segments[min(segments)][0] if segments else None,
    }


def plan_wal_expiry(files: list, floor: str, seg_size: int) -> list:
    """WAL files before the floor segment's position (the lowest start of what is kept), on any
    timeline; timeline history files always stay."""
    limit = wal_segno(floor, seg_size)
    return sorted(name for name, seg, kind, _mtime in files if kind != "history" and wal_segno(seg, seg_size) < limit)
