# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One backup's record in a repository on this host, from open to complete or
failed: pg_backup_catalog does each step as a task of its own, and
pg_backup_session does the first with its start and the last with its stop."""

from __future__ import annotations

import os
import socket

from ._catalog import CatalogError
from ._files import COPY_ENTRIES_FILE, write_json
from ._manifest import write_backup_manifest
from ._metrics import publish
from ._repository import (
    COLLECTION_VERSION,
    SCHEMA,
    RepositoryError,
    acquire_lock,
    backup_json_path,
    caller_fields,
    create_backup_dir,
    dir_size,
    release_lock,
    retention,
    update_backup,
    utcnow,
)


def open_backup(repository: str, cluster: str, fields: dict, lock_grace: float, keeper_local: bool, warn) -> dict:
    """A new backup directory, the cluster's lock, backup.json "running"."""
    # The repository may be a shared mount point: create it private, accept it as it is.
    os.makedirs(repository, mode=0o700, exist_ok=True)
    bid, path = create_backup_dir(repository)
    try:
        lock, note = acquire_lock(repository, cluster, bid, lock_grace, keeper_local)
    except RepositoryError:
        os.rmdir(path)
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
    }
    info.update(caller_fields(fields))
    write_json(os.path.join(path, "backup.json"), info)
    return {"backup_id": bid, "path": path, "lock": lock, "backup": info}


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
    path = os.path.dirname(backup_json_path(repository, backup_id))
    info = update_backup(repository, backup_id, **caller_fields(fields))
    manifest = None
    if manifest_checksum:
        manifest = write_backup_manifest(path, info, manifest_checksum, os.path.join(path, COPY_ENTRIES_FILE))
    info = update_backup(
        repository, backup_id, status="complete", completed_at=utcnow(), size_on_disk=dir_size(path), manifest=manifest
    )
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
            publish(metrics_file, repository)
        except (OSError, CatalogError) as e:
            warn(f"backup {backup_id} is complete but the metrics file {metrics_file} could not be written: {e}")
    return {
        "backup_id": backup_id,
        "path": path,
        "backup": info,
        "removed": removed,
        "lock_released": released,
        "manifest": manifest,
    }
