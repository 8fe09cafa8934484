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
import shutil
import socket
import time

from ._errors import PgopsError
from ._files import ensure_private_dir, read_json, resolves_inside, write_json
from ._keeper import liveness
from ._layout import (
    BACKUP_JSON,
    COLLECTION_VERSION,
    COPY_ENTRIES,
    LOCK_DIR,
    SCHEMA,
    backup_dir,
    disk_usage,
    new_backup_id,
    read_backup,
    update_backup,
    valid_backup_id,
    write_backup,
)
from ._manifest import write_backup_manifest
from ._metrics import publish

INVALID = "invalid"  # a backup.json that cannot be read as a JSON object
# A lock no session has claimed yet (the run is between the record and the start)
# or whose session this process cannot see is trusted this long after its last sign of life.
DEFAULT_GRACE = 120
REMOTE_TRUST = 86400


class RepositoryError(PgopsError):
    pass


def utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def validate_repository(path: str, forbidden_roots: list) -> str | None:
    """Why path cannot be a repository (None when it can)."""
    if not path or not os.path.isabs(path):
        return f"repository {path!r} must be an absolute path"
    for root in forbidden_roots:
        if root and resolves_inside(path, root):
            return f"repository {path} is inside {root} (the data directory or a tablespace): the backup would copy itself"
    return None


def ensure_repository(path: str) -> None:
    """Create the repository itself (0700) but never a missing parent: that is a typo until proven otherwise."""
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


def lock_path(repository: str, cluster: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", cluster)
    return os.path.join(repository, LOCK_DIR, f"{safe}.lock")


def _last_touched(path: str) -> float:
    """Newest mtime in a backup's directory (its files are written as the run goes)."""
    newest = 0.0
    try:
        newest = os.stat(path).st_mtime
        with os.scandir(path) as it:
            for entry in it:
                try:
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                except OSError:
                    continue
    except OSError:
        pass
    return newest


def lock_holder(repository: str, path: str, lock: dict, grace: float, now: float | None = None) -> tuple:
    """(live, why) of the run that holds an existing lock.

    The holder is the backup's session (its keeper, then its archive wait):
    gone means the lock is free at once. Only a lock whose session has not
    started yet, or that this process cannot see (another host, another user),
    is trusted for a while by its last sign of life."""
    now = time.time() if now is None else now
    bid = lock.get("backup_id")
    info = read_backup(os.path.join(repository, bid)) if valid_backup_id(bid) else None
    if info is not None and info.get("status") in ("complete", "failed"):
        return False, f"its backup {bid} is {info['status']}"
    try:
        age = now - os.stat(path).st_mtime
    except OSError:
        return False, "it is gone"
    session = lock.get("session") or {}
    if lock.get("host") != socket.gethostname() or not session.get("runtime_dir"):
        # The session is on another host (a repository host's lock): nothing here can see it.
        return (age <= REMOTE_TRUST), f"its session is on another host; the lock was taken {int(age)}s ago"
    live, why = liveness(session["runtime_dir"], session["id"], grace, now)
    if live is not None:
        return live, why
    touched = _last_touched(os.path.join(repository, bid)) if valid_backup_id(bid) else 0.0
    quiet = now - max(touched, now - age)
    if quiet <= grace:
        return True, f"its run started {int(age)}s ago and its session has not started yet"
    return False, f"no session holds it and backup {bid} has not been touched for {int(quiet)}s"


def acquire_lock(repository: str, cluster: str, backup_id: str, grace: float, session: dict | None) -> tuple:
    """Take the cluster's lock in this repository; (path, note about a broken stale lock).

    The lock is written in full to a temporary name and linked into place, so
    nobody ever reads a half-written lock."""
    ensure_private_dir(os.path.join(repository, LOCK_DIR))
    path = lock_path(repository, cluster)
    content = {"backup_id": backup_id, "host": socket.gethostname(), "created_at": utcnow(), "session": session or {}}
    tmp = f"{path}.{backup_id}.{os.getpid()}"
    write_json(tmp, content)
    note = None
    try:
        for _attempt in range(2):
            try:
                os.link(tmp, path)
                return path, note
            except FileExistsError:
                lock = read_json(path) or {}
                live, why = lock_holder(repository, path, lock, grace)
                if live:
                    raise RepositoryError(
                        f"another backup of this cluster into {repository} is running: backup {lock.get('backup_id')} "
                        f"started at {lock.get('created_at')} on {lock.get('host')} holds the lock {path} ({why}). Wait "
                        "for it to finish, or end it: pgops.online_backup.pg_backup_session_info lists the sessions "
                        f"and pg_backup_session state=aborted session_id={(lock.get('session') or {}).get('id')} ends it"
                    ) from None
                note = f"removed a stale lock {path} ({why})"
                dead = lock.get("backup_id")
                if valid_backup_id(dead):
                    _mark_dead_run_failed(repository, dead, why)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        raise RepositoryError(f"could not take the lock {path}")
    finally:
        os.unlink(tmp)


def _mark_dead_run_failed(repository: str, backup_id: str, why: str) -> None:
    """A run that died holding the lock left a backup marked running: say what happened."""
    path = os.path.join(repository, backup_id)
    info = read_backup(path)
    if info is not None and info.get("status") == "running":
        info.update(status="failed", failed_at=utcnow(), error=f"the run died before finishing ({why})")
        write_backup(path, info)


def release_lock(repository: str, cluster: str, backup_id: str) -> bool:
    """Remove the lock if this backup holds it."""
    path = lock_path(repository, cluster)
    lock = read_json(path)
    if lock and lock.get("backup_id") == backup_id:
        os.unlink(path)
        return True
    return False


# -- the catalog


def read_entry(path: str, size: bool = False) -> dict | None:
    """The catalog entry of one backup directory, or None when it has no backup.json."""
    if not os.path.isfile(os.path.join(path, BACKUP_JSON)):
        return None
    doc = read_backup(path)
    name = os.path.basename(path.rstrip("/"))
    if doc is None:
        # Listed so that a damaged catalog is seen, but never trusted.
        entry = {"id": name, "status": INVALID, "error": f"{os.path.join(path, BACKUP_JSON)} is not a JSON object"}
    else:
        entry = dict(doc)
        entry.setdefault("id", name)
    entry["path"] = path
    if size:
        entry["size_on_disk"] = disk_usage(path)
    return entry


def read_catalog(repository: str, size: bool = False) -> list:
    """Every backup of the repository, newest first (ids sort by time, e.g. 20261129T101500Z)."""
    if not os.path.isdir(repository):
        raise RepositoryError(f"repository {repository} does not exist or is not a directory")
    entries = []
    for name in os.listdir(repository):
        path = os.path.join(repository, name)
        if name.startswith(".") or os.path.islink(path) or not os.path.isdir(path):
            continue  # lock files, temporary directories, links to elsewhere
        entry = read_entry(path, size=size)
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


def latest(entries: list, allow_unverified: bool = False, skipped: list | None = None) -> dict | None:
    """The newest complete backup that is not known to be damaged; running, failed and
    unreadable ones never count. Passed-over damaged ones are appended to skipped."""
    for entry in sort_newest_first(entries):
        if not is_complete(entry):
            continue
        why = None if allow_unverified else distrust(entry)
        if why is None:
            return entry
        if skipped is not None:
            skipped.append({"id": entry.get("id"), "reason": why})
    return None


def select(entries: list, wanted: str, allow_unverified: bool = False, skipped: list | None = None) -> dict:
    """The backup named by wanted ("latest" or an id); raises RepositoryError with the reason.

    A backup whose newest verification or drill failed is never chosen as latest, and
    is refused by id, unless allow_unverified."""
    if wanted == "latest":
        found = latest(entries, allow_unverified, skipped)
        if found is None:
            states = ", ".join(f"{e['id']} ({e.get('status')})" for e in entries[:5]) or "none"
            damaged = " (damaged ones were skipped)" if skipped else ""
            raise RepositoryError(f"no complete, trusted backup in the repository{damaged} (newest backups: {states})")
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


def open_backup(repository: str, cluster: str, fields: dict, lock_grace: float, session_runtime_dir: str | None, warn) -> dict:
    """A new backup directory, the cluster's lock, backup.json "running".

    session_runtime_dir: where the run starts this backup's session, with the
    session id returned here, so that the lock is free the moment that session is gone."""
    ensure_repository(repository)
    bid, path = new_backup_id(repository)
    # Unique across repositories and clusters: several may share one host's sessions directory.
    sid = f"{bid}-{secrets.token_hex(4)}"
    session = {"id": sid, "runtime_dir": session_runtime_dir} if session_runtime_dir else None
    try:
        lock, note = acquire_lock(repository, cluster, bid, lock_grace, session)
    except BaseException:
        os.rmdir(path)  # a refused run leaves nothing behind
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
        write_backup(path, info)
    except BaseException:
        release_lock(repository, cluster, bid)
        shutil.rmtree(path, ignore_errors=True)
        raise
    return {"backup_id": bid, "session_id": sid, "path": path, "lock": lock, "backup": info}


def complete_backup(
    repository: str,
    backup_id: str,
    cluster: str,
    fields: dict,
    manifest_checksum,
    keep: int,
    warn,
    metrics_file: str | None = None,
) -> dict:
    """Record fields, write the manifest (when manifest_checksum), mark the backup
    complete, then release the lock and apply retention."""
    path = backup_dir(repository, backup_id)
    info = read_backup(path)
    if info is None:
        raise RepositoryError(f"no backup {backup_id} in {repository}")
    if info.get("status") != "running":
        raise RepositoryError(f"backup {backup_id} is {info.get('status')}, not running: it cannot be marked complete")
    info = update_backup(path, **caller_fields(fields))
    manifest = None
    if manifest_checksum:
        manifest = write_backup_manifest(path, info, manifest_checksum, os.path.join(path, COPY_ENTRIES))
    info = update_backup(path, status="complete", completed_at=utcnow(), size_on_disk=disk_usage(path), manifest=manifest)
    # The backup is complete now: housekeeping problems are warnings, never a
    # failure that would make the caller's rescue discard a good backup.
    released, removed = False, []
    try:
        released = release_lock(repository, cluster, backup_id)
    except OSError as e:
        warn(f"backup {backup_id} is complete but its lock could not be released: {e}")
    try:
        removed = retention(repository, keep, info.get("system_identifier"))
    except (OSError, RepositoryError) as e:
        warn(f"backup {backup_id} is complete but retention failed: {e}")
    if metrics_file:
        try:
            publish(metrics_file, read_catalog(repository), repository)
        except (OSError, PgopsError) as e:
            warn(f"backup {backup_id} is complete but the metrics file {metrics_file} could not be written: {e}")
    return {
        "backup_id": backup_id,
        "path": path,
        "backup": info,
        "removed": removed,
        "lock_released": released,
        "manifest": manifest,
    }


def remove_payload(path: str) -> list:
    """Delete a failed backup's data, keep backup.json to say what happened."""
    removed = []
    for name in os.listdir(path):
        if name == BACKUP_JSON:
            continue
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            os.unlink(target)
        removed.append(name)
    return removed


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
    path = backup_dir(repository, backup_id)
    current = read_backup(path)
    if current is None:
        raise RepositoryError(f"no backup {backup_id} in {repository}")
    if current.get("status") == "complete":
        raise RepositoryError(f"backup {backup_id} is complete: refusing to mark it failed")
    info = update_backup(path, status="failed", error=error, failed_at=utcnow(), **caller_fields(fields))
    removed = [] if keep_files else remove_payload(path)
    released = release_lock(repository, cluster, backup_id)
    out = {"backup_id": backup_id, "path": path, "backup": info, "removed": removed, "lock_released": released}
    if metrics_file:
        try:
            publish(metrics_file, read_catalog(repository), repository)
        except (OSError, PgopsError) as e:
            out["metrics_error"] = f"the metrics file {metrics_file} could not be written: {e}"
    return out


# -- retention


def retention(repository: str, keep: int, system_identifier: str) -> list:
    """Keep the newest `keep` complete backups of this cluster; remove older
    complete ones and failed ones older than the oldest kept. Never touches a
    running backup or another cluster's."""
    if keep <= 0:
        return []
    if not system_identifier:
        raise RepositoryError("retention needs the cluster's system identifier: refusing to judge other clusters' backups")
    entries = [
        (e["id"], e.get("status"))
        for e in read_catalog(repository)
        if valid_backup_id(e["id"]) and e.get("system_identifier") == system_identifier
    ]
    complete = [n for n, s in entries if s == "complete"]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[keep - 1]
    doomed = [n for n, s in entries if n < oldest_kept and s in ("complete", "failed")]
    for name in doomed:
        shutil.rmtree(os.path.join(repository, name), ignore_errors=True)
    return doomed
