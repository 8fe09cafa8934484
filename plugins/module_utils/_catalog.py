# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backup catalog: the backup.json files of a repository.

Only backup.json is read (never the archives), and only a backup whose
backup.json says status "complete" is ever chosen as "latest".
"""

from __future__ import annotations

import os
import stat

from ._files import read_json, write_json

INFO_NAME = "backup.json"
STATUSES = ("running", "complete", "failed")
INVALID = "invalid"  # a backup.json that cannot be read as a JSON object


class CatalogError(Exception):
    pass


def disk_usage(path: str) -> int:
    """Bytes allocated under path, as du -s counts them (hard links once, symlinks not followed)."""
    total = 0
    seen = set()
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            st = os.lstat(current)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(current) as it:
                    stack.extend(e.path for e in it)
            except OSError:
                continue
    return total


def read_entry(backup_dir: str, size: bool = True) -> dict | None:
    """The catalog entry of one backup directory, or None when it has no backup.json."""
    info_path = os.path.join(backup_dir, INFO_NAME)
    if not os.path.isfile(info_path):
        return None
    doc = read_json(info_path)
    name = os.path.basename(backup_dir.rstrip("/"))
    if not isinstance(doc, dict):
        # Listed so that a damaged catalog is seen, but never trusted.
        entry = {"id": name, "status": INVALID, "error": f"{info_path} is not a JSON object"}
    else:
        entry = dict(doc)
        if not entry.get("id"):
            entry["id"] = name
    entry["path"] = backup_dir
    if size:
        entry["size_on_disk"] = disk_usage(backup_dir)
    return entry


def read_catalog(repository: str, size: bool = True) -> list:
    """Every backup of the repository, newest first (ids sort by time, e.g. 20261129T101500Z)."""
    if not os.path.isdir(repository):
        raise CatalogError(f"repository {repository} does not exist or is not a directory")
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


def latest(entries: list) -> dict | None:
    """The newest complete backup; running, failed and unreadable ones never count."""
    for entry in sort_newest_first(entries):
        if is_complete(entry):
            return entry
    return None


def select(entries: list, wanted: str) -> dict:
    """The backup named by wanted ("latest" or an id); raises CatalogError with the reason."""
    if wanted == "latest":
        found = latest(entries)
        if found is None:
            states = ", ".join(f"{e['id']} ({e.get('status')})" for e in entries[:5]) or "none"
            raise CatalogError(f"no complete backup in the repository (newest backups: {states})")
        return found
    for entry in entries:
        if str(entry.get("id")) == wanted:
            if not is_complete(entry):
                raise CatalogError(f"backup {wanted} is not complete (status: {entry.get('status')}); it cannot be trusted")
            return entry
    ids = ", ".join(str(e["id"]) for e in entries[:5]) or "none"
    raise CatalogError(f"backup {wanted} not found in the repository (newest: {ids})")


def filter_status(entries: list, statuses) -> list:
    if not statuses:
        return list(entries)
    return [e for e in entries if e.get("status") in statuses]


def update_backup_json(path: str, **fields) -> dict:
    """Set fields in a backup's backup.json atomically; path is the backup directory or the file.

    Used to record verification and drill results. Keeps the file's owner when
    run as root, so the user that owns the repository can still rewrite it.
    """
    info_path = path if os.path.basename(path) == INFO_NAME else os.path.join(path, INFO_NAME)
    try:
        st = os.stat(info_path)
    except FileNotFoundError:
        raise CatalogError(f"{info_path} does not exist") from None
    doc = read_json(info_path)
    if not isinstance(doc, dict):
        raise CatalogError(f"{info_path} is not a JSON object; not updating it")
    doc.update(fields)
    write_json(info_path, doc)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        os.chown(info_path, st.st_uid, st.st_gid)
    return doc
