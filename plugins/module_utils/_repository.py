# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backup repository on disk: backup ids, backup.json, the per-cluster
lock and retention. The layout is a documented contract (README, DESIGN)."""

from __future__ import annotations

import datetime
import fcntl
import os
import re
import shutil
import socket
import time

from ._catalog import CatalogError
from ._files import ensure_private_dir, read_json, resolves_inside, write_json
from ._metrics import publish

SCHEMA = 1
COLLECTION_VERSION = "0.1.0"
BACKUP_JSON = "backup.json"
LOCK_DIR = ".locks"
_ID_RE = re.compile(r"^\d{8}T\d{6}Z(-\d{2})?$")


class RepositoryError(Exception):
    pass


def utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def valid_backup_id(bid: str) -> bool:
    return bool(bid) and bool(_ID_RE.match(bid))


def validate_repository(path: str, forbidden_roots: list) -> str | None:
    """Why path cannot be a repository (None when it can)."""
    if not path or not os.path.isabs(path):
        return f"repository {path!r} must be an absolute path"
    for root in forbidden_roots:
        if root and resolves_inside(path, root):
            return f"repository {path} is inside {root} (the data directory or a tablespace): the backup would copy itself"
    return None


def create_backup_dir(repository: str) -> tuple:
    """A new, unique, sortable backup directory (0700)."""
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(100):
        bid = base if n == 0 else f"{base}-{n:02d}"
        path = os.path.join(repository, bid)
        try:
            os.mkdir(path, 0o700)
            return bid, path
        except FileExistsError:
            continue
    raise RepositoryError(f"cannot create a unique backup directory in {repository}")


def lock_path(repository: str, cluster: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", cluster)
    return os.path.join(repository, LOCK_DIR, f"{safe}.lock")


def _lock_holder_alive(path: str) -> bool:
    """Whether some process (the backup's session keeper) holds a flock on the lock file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the flock we may have taken
    return False


def _last_touched(backup_dir: str) -> float:
    """Newest mtime in the backup's directory (its files are written as the run goes)."""
    newest = 0.0
    try:
        with os.scandir(backup_dir) as it:
            for entry in it:
                try:
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                except OSError:
                    continue
        newest = max(newest, os.stat(backup_dir).st_mtime)
    except OSError:
        pass
    return newest


def _lock_is_stale(repository: str, path: str, lock: dict, grace: float) -> str | None:
    """Why an existing lock no longer protects a running backup (None if it does)."""
    bid = lock.get("backup_id")
    info = read_json(os.path.join(repository, bid, BACKUP_JSON)) if bid and valid_backup_id(bid) else None
    if info is not None and info.get("status") in ("complete", "failed"):
        return f"its backup {bid} is {info['status']}"
    if lock.get("keeper_local", True) and lock.get("host") == socket.gethostname() and _lock_holder_alive(path):
        return None
    now = time.time()
    try:
        age = now - os.stat(path).st_mtime
    except OSError:
        return "it is gone"
    if not lock.get("keeper_local", True) or lock.get("host") != socket.gethostname():
        # A keeper on another host cannot be seen from here: trust the lock for a day.
        return f"it is {int(age)}s old" if age > 86400 else None
    # Just taken (the keeper starts next) or just stopped (the manifest is being written).
    if age <= grace or (bid and valid_backup_id(bid) and now - _last_touched(os.path.join(repository, bid)) <= grace):
        return None
    return f"no session keeper holds it and backup {bid} has not been touched for {int(age)}s"


def acquire_lock(repository: str, cluster: str, backup_id: str, grace: float = 120, keeper_local: bool = True) -> tuple:
    """Take the cluster's lock in this repository; (path, note about a broken stale lock).

    The lock is written in full to a temporary name and linked into place, so
    nobody ever reads a half-written lock."""
    ensure_private_dir(os.path.join(repository, LOCK_DIR))
    path = lock_path(repository, cluster)
    content = {"backup_id": backup_id, "host": socket.gethostname(), "created_at": utcnow(), "keeper_local": keeper_local}
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
                why = _lock_is_stale(repository, path, lock, grace)
                if why is None:
                    raise RepositoryError(
                        f"another backup of this cluster into {repository} is running: backup {lock.get('backup_id')} "
                        f"started at {lock.get('created_at')} on {lock.get('host')} holds the lock {path}. Wait for it to "
                        "finish; if its run was interrupted, its session keeper still holds the backup: end it with "
                        "pgops.online_backup.pg_backup_session state=aborted (state=status lists the sessions)"
                    ) from None
                note = f"removed a stale lock {path} ({why})"
                dead = lock.get("backup_id")
                if dead and valid_backup_id(dead):
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
    info = read_json(os.path.join(repository, backup_id, BACKUP_JSON))
    if info is not None and info.get("status") == "running":
        info.update(status="failed", failed_at=utcnow(), error=f"the run died before finishing ({why})")
        write_json(os.path.join(repository, backup_id, BACKUP_JSON), info)


def release_lock(repository: str, cluster: str, backup_id: str) -> bool:
    """Remove the lock if this backup holds it."""
    path = lock_path(repository, cluster)
    lock = read_json(path)
    if lock and lock.get("backup_id") == backup_id:
        os.unlink(path)
        return True
    return False


def backup_json_path(repository: str, backup_id: str) -> str:
    if not valid_backup_id(backup_id):
        raise RepositoryError(f"invalid backup id {backup_id!r}")
    return os.path.join(repository, backup_id, BACKUP_JSON)


def update_backup(repository: str, backup_id: str, **fields) -> dict:
    path = backup_json_path(repository, backup_id)
    info = read_json(path)
    if info is None:
        raise RepositoryError(f"no backup {backup_id} in {repository}")
    info.update(fields)
    write_json(path, info)
    return info


def remove_payload(backup_dir: str) -> list:
    """Delete a failed backup's data, keep backup.json to say what happened."""
    removed = []
    for name in os.listdir(backup_dir):
        if name == BACKUP_JSON:
            continue
        path = os.path.join(backup_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
        removed.append(name)
    return removed


def dir_size(path: str) -> int:
    total = 0
    for dirpath, _dirnames, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def retention(repository: str, keep: int, system_identifier: str) -> list:
    """Keep the newest `keep` complete backups of this cluster; remove older
    complete ones and failed ones older than the oldest kept. Never touches a
    running backup or another cluster's."""
    if keep <= 0:
        return []
    if not system_identifier:
        raise RepositoryError("retention needs the cluster's system identifier: refusing to judge other clusters' backups")
    entries = []
    for name in sorted(os.listdir(repository), reverse=True):
        if not valid_backup_id(name):
            continue
        info = read_json(os.path.join(repository, name, BACKUP_JSON))
        if info is None or info.get("system_identifier") != system_identifier:
            continue
        entries.append((name, info.get("status")))
    complete = [n for n, s in entries if s == "complete"]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[keep - 1]
    doomed = [n for n, s in entries if n < oldest_kept and s in ("complete", "failed")]
    for name in doomed:
        shutil.rmtree(os.path.join(repository, name), ignore_errors=True)
    return doomed


# Set by this module's callers alone (_record, pg_backup_catalog): a caller's fields never override them.
RESERVED = ("id", "status", "schema", "completed_at", "failed_at", "manifest")


def caller_fields(fields: dict | None) -> dict:
    return {k: v for k, v in (fields or {}).items() if k not in RESERVED}


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
    path = os.path.dirname(backup_json_path(repository, backup_id))
    current = read_json(backup_json_path(repository, backup_id)) or {}
    if current.get("status") == "complete":
        raise RepositoryError(f"backup {backup_id} is complete: refusing to mark it failed")
    info = update_backup(repository, backup_id, status="failed", error=error, failed_at=utcnow(), **caller_fields(fields))
    removed = [] if keep_files else remove_payload(path)
    released = release_lock(repository, cluster, backup_id)
    out = {"backup_id": backup_id, "path": path, "backup": info, "removed": removed, "lock_released": released}
    if metrics_file:
        try:
            publish(metrics_file, repository)
        except (OSError, CatalogError) as e:
            out["metrics_error"] = f"the metrics file {metrics_file} could not be written: {e}"
    return out
