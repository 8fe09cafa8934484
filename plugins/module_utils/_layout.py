# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The repository's on-disk format, in one place: backup ids, file names,
archive names and their compression suffixes, the tools that write and read
them, the one reader and writer of backup.json, and where WAL lives.

This is a documented contract (docs/repository.md): a backup must stay
restorable by hand with PostgreSQL's docs and standard tools.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time

from ._errors import PgopsError
from ._files import read_json, write_json

# subprocess, not run_command (ansible-core 2.21's pylint check ansible-bad-function): stored archives are read
# through decompressor pipelines (Popen), never buffered whole.
# pylint: disable=ansible-bad-function

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
# Client-side encryption: age, after compression (ciphertext does not compress), as a last suffix.
ENCRYPTIONS = ("none", "age")
AGE_SUFFIX = ".age"
# An age X25519 recipient (bech32), or an SSH public key age accepts.
AGE_RECIPIENT_RE = re.compile(r"^(age1[02-9ac-hj-np-z]{58}|ssh-(ed25519|rsa) [A-Za-z0-9+/=]+( \S.*)?)$")
# Beside an encrypted WAL file: the sha256 of its plain content, so that a second push can be compared
# without the private key (which is never on a database host that only archives).
DIGEST_SUFFIX = ".sha256"
# What may follow a WAL file's name in the archive: compression, then encryption.
STORED_SUFFIXES = tuple(spec[0] + enc for enc in ("", ".age") for spec in COMPRESSION.values())
# base.tar, 16384.cpio.zst, base.tar.zst.age, ...: the data directory (base) or a tablespace (its oid).
ARCHIVE_RE = re.compile(r"^(base|[0-9]+)\.(tar|cpio)(\.gz|\.zst|\.lz4)?(\.age)?$")
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


def archive_name(key: str, method: str, compression: str, encryption: str = "none") -> str:
    """base.tar.zst for the data directory, <oid>.tar.zst for a tablespace (.age appended when encrypted)."""
    return f"{key}.{method}{suffix_of(compression)}{AGE_SUFFIX if encryption == 'age' else ''}"


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


def is_encrypted(path: str) -> bool:
    return path.endswith(AGE_SUFFIX)


def compression_of_file(path: str) -> str:
    if is_encrypted(path):
        path = path[: -len(AGE_SUFFIX)]
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


def bad_recipients(recipients) -> str | None:
    """Why these age recipients cannot encrypt (None when they can): checked before anything is written."""
    if not recipients:
        return "encryption age needs at least one public key in the recipients (age-keygen -y <identity file> prints one)"
    wrong = [r for r in recipients if not (isinstance(r, str) and AGE_RECIPIENT_RE.match(r.strip()))]
    if wrong:
        return f"not an age public key (age1... or ssh-ed25519/ssh-rsa ...): {', '.join(repr(w) for w in wrong)}"
    return None


def encryptor(encryption: str, recipients) -> list:
    """The command that encrypts stdin to stdout ([] for none); LayoutError when it cannot run, so that
    nothing is ever written in clear when encryption was asked for."""
    if encryption == "none":
        return []
    if encryption != "age":
        raise LayoutError(f"unknown encryption {encryption!r}: expected one of {', '.join(ENCRYPTIONS)}")
    why = bad_recipients(recipients)
    if why:
        raise LayoutError(why)
    if not shutil.which("age"):
        raise LayoutError("encryption age needs the age tool on this host (Debian package age); nothing was written")
    cmd = ["age"]
    for r in recipients:
        cmd += ["-r", r.strip()]
    return cmd


# Restores and verification decrypt with this key file (set_age_identity); one per process.
_age_identity = {"file": None}


def set_age_identity(path: str | None) -> None:
    """The age identity (private key) file that decrypts .age files in this process."""
    if path is not None and not os.path.isfile(path):
        raise LayoutError(f"age identity file {path} does not exist")
    _age_identity["file"] = path


# The options of modules that read encrypted files (merged into their argument_spec).
AGE_IDENTITY_OPTIONS = {
    "age_identity": {"type": "str", "no_log": True},
    "age_identity_file": {"type": "path"},
}


def use_age_identity(params: dict) -> None:
    """Decrypt with the module's age_identity (the key text, written to a private temporary file
    that is removed when the module exits) or age_identity_file."""
    text, path = params.get("age_identity"), params.get("age_identity_file")
    if text:
        fd, path = tempfile.mkstemp(prefix=".pgops-age-", suffix=".key")  # 0600: the key never sits in argv
        try:
            os.write(fd, text.strip().encode() + b"\n")
        finally:
            os.close(fd)
        atexit.register(_remove_quietly, path)
    set_age_identity(path)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def decryptor(path: str) -> list:
    """age -d with the identity; LayoutError naming what is missing."""
    if not shutil.which("age"):
        raise LayoutError(f"{os.path.basename(path)} is encrypted with age: install the age tool (Debian package age)")
    if not _age_identity["file"]:
        raise LayoutError(
            f"{os.path.basename(path)} is encrypted with age: give the private key (pg_restore_age_identity or "
            "pg_restore_age_identity_file; the module option age_identity_file)"
        )
    return ["age", "-d", "-i", _age_identity["file"]]


def read_commands(path: str, stdin: bool = False) -> list:
    """Commands, piped in this order, that write path's plain content to stdout ([] for a plain
    file); the first one reads path (or, with stdin, every one reads its stdin: path is then only
    the stored name). LayoutError when a tool or the age identity is missing."""
    cmds = []
    if is_encrypted(path):
        cmds.append(decryptor(path) + ([] if stdin else [path]))
    dec = decompressor(path)
    if dec is not None:
        # zstd and lz4 take "--" before a name; pigz and gzip are given the name alone.
        cmds.append(dec if cmds or stdin else dec + (["--", path] if dec[0] in ("zstd", "lz4") else [path]))
    return cmds


def run_pipeline(cmds: list, stdin, stdout) -> None:
    """Run commands piped into each other from stdin to stdout (files or fds); LayoutError naming
    each tool that failed, with its message."""
    procs = []
    upstream = stdin
    try:
        for i, cmd in enumerate(cmds):
            last = i == len(cmds) - 1
            err = tempfile.TemporaryFile()
            p = subprocess.Popen(cmd, stdin=upstream, stdout=stdout if last else subprocess.PIPE, stderr=err)
            if i > 0:
                upstream.close()  # only the next stage holds it
            procs.append((p, err))
            upstream = p.stdout
        failures = []
        for p, err in procs:
            p.wait()
            err.seek(0)
            if p.returncode != 0:
                text = err.read().decode("utf-8", "replace").strip()
                failures.append(f"{os.path.basename(p.args[0])} exited {p.returncode}: {text}")
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
    if failures:
        raise LayoutError("; ".join(failures))


class PlainReader:
    """path's plain content as a forward-only stream (decrypted, decompressed by child processes).
    On a clean exit every child must have succeeded (LayoutError naming the tool otherwise)."""

    def __init__(self, path: str, source=None):
        """source: a readable file object of the stored bytes (a download); path then only names them."""
        self.path = path
        self.source = source
        self.procs = []  # (process, its stderr file)
        self.stream = None
        self.abandoned = False

    def __enter__(self):
        cmds = read_commands(self.path, stdin=self.source is not None)
        if not cmds:
            self.stream = self.source or open(self.path, "rb")  # noqa: SIM115 - closed in __exit__
            return self.stream
        upstream = self.source if self.source is not None else subprocess.DEVNULL
        for cmd in cmds:
            err = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads it while the stream flows
            p = subprocess.Popen(cmd, stdin=upstream, stdout=subprocess.PIPE, stderr=err)
            if upstream is not subprocess.DEVNULL:
                upstream.close()  # only the next stage holds it (the first: the download's pipe)
            self.procs.append((p, err))
            upstream = p.stdout
        self.stream = upstream
        return self.stream

    def abandon(self) -> None:
        """Stop reading early: the tools are stopped and their exit is not judged."""
        for p, _err in self.procs:
            if p.poll() is None:
                p.kill()
        self.abandoned = True

    def __exit__(self, exc_type, exc, tb):
        self.stream.close()
        failures = []
        for p, err_file in self.procs:
            if exc_type is not None and issubclass(exc_type, Exception) and not self.abandoned:
                # A tool that already gave up (wrong key, garbage, truncated input) explains
                # the reader's error better than the reader can.
                try:
                    p.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
            killed = p.poll() is None and (exc_type is not None or self.abandoned)
            if killed:
                p.kill()
            p.wait()
            err_file.seek(0)
            err = err_file.read().decode("utf-8", "replace").strip()
            err_file.close()
            if p.returncode and not (killed or self.abandoned):
                failures.append(f"{p.args[0]} failed on {os.path.basename(self.path)} (exit {p.returncode}): {err}")
        if failures:
            raise LayoutError("; ".join(failures))
        return False


# A file pgops-wal stores: a segment, a .partial segment, a .backup history file or a timeline .history file,
# compressed or not.
STORED_WAL_RE = re.compile(
    r"^(?P<seg>[0-9A-F]{24})(?P<kind>\.partial|\.[0-9A-F]{8}\.backup)?(?:\.gz|\.zst|\.lz4)?(?:\.age)?$"
    r"|^(?P<tli>[0-9A-F]{8})\.history(?:\.gz|\.zst|\.lz4)?(?:\.age)?$"
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
