# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The repository's on-disk format, in one place: backup ids, file names,
archive names and their compression suffixes, the tools that write and read
them, the one reader and writer of backup.json, and where WAL lives.

This is a documented contract (docs/repository.md): a backup must stay
restorable by hand with PostgreSQL's docs and standard tools.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time

from ._errors import PgopsError
from ._files import read_json, write_json

SCHEMA = 1
COLLECTION_VERSION = "0.1.0"

BACKUP_JSON = "backup.json"
MANIFEST = "backup_manifest"
LABEL_FILES = ("backup_label", "tablespace_map")
LOCK_DIR = ".locks"
WAL_DIR = "wal"
# Checksums the copy step took as the data passed by, for the manifest (removed once it is written).
COPY_ENTRIES = ".pgops-copy-entries.json"
# Method rsync: a ready data directory, and tablespaces beside it.
RSYNC_DATA = "data"
RSYNC_TABLESPACES = "tablespaces"

METHODS = ("tar", "cpio", "rsync")
STATUSES = ("running", "complete", "failed")

# compression name -> (file suffix, compressors (first found wins), decompressors (first found wins), default level)
COMPRESSION = {
    "none": ("", (), (), None),
    "gzip": (".gz", (["pigz", "-p", "{threads}", "-{level}"], ["gzip", "-{level}"]), (["pigz", "-dc"], ["gzip", "-dc"]), 6),
    "zstd": (".zst", (["zstd", "-q", "-T{threads}", "-{level}"],), (["zstd", "-dcq"],), 3),
    "lz4": (".lz4", (["lz4", "-q", "-{level}"],), (["lz4", "-dcq"],), 1),
}
COMPRESSIONS = tuple(COMPRESSION)
# base.tar, 16384.cpio.zst, ...: the data directory (base) or a tablespace (its oid).
ARCHIVE_RE = re.compile(r"^(base|[0-9]+)\.(tar|cpio)(\.gz|\.zst|\.lz4)?$")
_ID_RE = re.compile(r"^\d{8}T\d{6}Z(-\d{2})?$")


class LayoutError(PgopsError):
    """The repository or a backup in it is not in the expected format."""


# -- names


def valid_backup_id(bid) -> bool:
    return isinstance(bid, str) and bool(_ID_RE.match(bid))


def new_backup_id(repository: str) -> tuple:
    """Create a new, unique, sortable backup directory (0700): (id, path)."""
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(100):
        bid = base if n == 0 else f"{base}-{n:02d}"
        path = os.path.join(repository, bid)
        try:
            os.mkdir(path, 0o700)
            return bid, path
        except FileExistsError:
            continue
    raise LayoutError(f"cannot create a unique backup directory in {repository}")


def backup_dir(repository: str, backup_id: str) -> str:
    if not valid_backup_id(backup_id):
        raise LayoutError(f"invalid backup id {backup_id!r}: expected the form 20261129T101500Z")
    return os.path.join(repository, backup_id)


def suffix_of(compression: str) -> str:
    return COMPRESSION[compression][0]


def archive_name(key: str, method: str, compression: str) -> str:
    """base.tar.zst for the data directory, <oid>.tar.zst for a tablespace."""
    return f"{key}.{method}{suffix_of(compression)}"


def parse_archive_name(name: str):
    """(key, method, compression) of an archive file name, or None."""
    m = ARCHIVE_RE.match(name)
    if not m:
        return None
    return m.group(1), m.group(2), compression_of_suffix(m.group(3) or "")


def find_archives(path: str, method: str) -> dict:
    """{"base" or tablespace oid: file name} of the archives of this method in a backup directory."""
    found = {}
    for name in sorted(os.listdir(path)):
        parsed = parse_archive_name(name)
        if parsed and parsed[1] == method and os.path.isfile(os.path.join(path, name)):
            key = parsed[0]
            if key in found:
                raise LayoutError(f"two archives for {key} in {path}: {found[key]} and {name}")
            found[key] = name
    return found


def compression_of_suffix(suffix: str) -> str:
    for name, spec in COMPRESSION.items():
        if spec[0] == suffix:
            return name
    raise LayoutError(f"unknown compression suffix {suffix!r}")


def compression_of_file(path: str) -> str:
    for name, spec in COMPRESSION.items():
        if spec[0] and path.endswith(spec[0]):
            return name
    return "none"


def _first_installed(commands, what: str, verb: str) -> list:
    for cmd in commands:
        if shutil.which(cmd[0]):
            return list(cmd)
    tools = " or ".join(c[0] for c in commands)
    raise LayoutError(f"{what} needs {tools} on this host to be {verb}; install it")


def compressor(compression: str, level: int | None = None, threads: int = 0) -> list:
    """The command that compresses stdin to stdout ([] for none); LayoutError when not installed."""
    _suffix, commands, _dec, default_level = COMPRESSION[compression]
    if not commands:
        return []
    cmd = _first_installed(commands, f"compression {compression}", "compressed (or choose another compression)")
    lvl = level if level is not None else default_level
    return [part.format(threads=threads, level=lvl) for part in cmd]


def decompressor(path: str) -> list | None:
    """The command that decompresses path's format from stdin (None for a plain file)."""
    commands = COMPRESSION[compression_of_file(path)][2]
    if not commands:
        return None
    return _first_installed(commands, os.path.basename(path), "decompressed")


def decompress_command(path: str) -> list | None:
    """The command that writes path decompressed to stdout (None for a plain file)."""
    dec = decompressor(path)
    if dec is None:
        return None
    # zstd and lz4 take "--" before a name; pigz and gzip are given the name alone.
    return dec + (["--", path] if dec[0] in ("zstd", "lz4") else [path])


# A file pgops-wal stores: a segment, a .partial segment, a .backup history file or a timeline .history file,
# compressed or not.
STORED_WAL_RE = re.compile(
    r"^(?P<seg>[0-9A-F]{24})(?P<kind>\.partial|\.[0-9A-F]{8}\.backup)?(?:\.gz|\.zst|\.lz4)?$"
    r"|^(?P<tli>[0-9A-F]{8})\.history(?:\.gz|\.zst|\.lz4)?$"
)


def parse_stored_wal(name: str):
    """(segment name or None, kind) of a stored WAL file name (kind: segment, partial, backup or
    history), or None for anything else."""
    m = STORED_WAL_RE.match(name)
    if not m:
        return None
    if m.group("tli"):
        return None, "history"
    return m.group("seg"), {None: "segment", ".partial": "partial"}.get(m.group("kind"), "backup")


def wal_dir(repository: str, system_identifier: str) -> str:
    """Where the collection's archive command keeps a cluster's WAL."""
    if not str(system_identifier).isdigit():
        raise LayoutError(f"invalid system identifier {system_identifier!r}")
    return os.path.join(repository, WAL_DIR, str(system_identifier))


# -- backup.json: the one reader and the one writer


def backup_json(backup_path: str) -> str:
    return os.path.join(backup_path, BACKUP_JSON)


def read_backup(backup_path: str) -> dict | None:
    """backup.json of a backup directory as a dict; None when absent or not a JSON object."""
    doc = read_json(backup_json(backup_path))
    return doc if isinstance(doc, dict) else None


def write_backup(backup_path: str, info: dict) -> None:
    """Write backup.json atomically (0600). Run as root, the file keeps the
    owner of the backup directory, so the repository's user can rewrite it."""
    path = backup_json(backup_path)
    write_json(path, info)
    if os.geteuid() == 0:
        st = os.stat(backup_path)
        if (st.st_uid, st.st_gid) != (0, 0):
            os.chown(path, st.st_uid, st.st_gid)


def update_backup(backup_path: str, **fields) -> dict:
    """Set fields of an existing backup.json; LayoutError when it is missing or damaged."""
    info = read_backup(backup_path)
    if info is None:
        raise LayoutError(f"{backup_json(backup_path)} is missing or not a JSON object; not updating it")
    info.update(fields)
    write_backup(backup_path, info)
    return info


# -- sizes


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
