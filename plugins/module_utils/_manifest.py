# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PostgreSQL backup manifests, as pg_basebackup writes them and pg_verifybackup reads them.

Building the manifest text from (path, size, mtime, checksum) entries, parsing
and comparing, and streaming readers of the backups of our repository layout
(plain directories, tar and cpio archives, compressed or not). Archives are
read as streams and never extracted to disk. Nothing here knows about Ansible.

Paths are ``str`` relative to the data directory; bytes that are not UTF-8 are
kept as surrogates (``surrogateescape``) and written as ``Encoded-Path``.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import json
import os
import re
import stat
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

from ._checksum import ALGORITHMS, DIGEST_SIZES, default_algorithm, new_hasher
from ._errors import PgopsError
from ._files import write_private_file
from ._layout import BACKUP_JSON, LABEL_FILES, MANIFEST, LayoutError, PlainReader, find_archives, parse_archive_name

CHUNK = 1 << 20
VERSION_KEY = "PostgreSQL-Backup-Manifest-Version"
TOP_KEYS = {VERSION_KEY, "System-Identifier", "Files", "WAL-Ranges", "Manifest-Checksum"}
FILE_KEYS = {"Path", "Encoded-Path", "Size", "Last-Modified", "Checksum-Algorithm", "Checksum"}
WAL_KEYS = {"Timeline", "Start-LSN", "End-LSN"}
# Never part of a manifest: the manifest itself, our catalog entry, and WAL
# (pg_verifybackup ignores pg_wal; the archive holds the WAL).
EXCLUDED_ROOT_FILES = (MANIFEST, BACKUP_JSON)

Want = Callable[[str, int], "str | None"]


class ManifestError(PgopsError):
    """The manifest text is not a valid PostgreSQL backup manifest."""


class ArchiveError(PgopsError):
    """An archive cannot be read to its end."""


# -- entries and the manifest text


@dataclass
class FileEntry:
    path: str
    size: int
    mtime: int = 0
    algorithm: str | None = None
    checksum: str | None = None  # lower-case hex; None when not computed


@dataclass
class Manifest:
    version: int
    files: dict
    wal_ranges: list
    system_identifier: int | None = None
    checksum: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())


def path_to_bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def path_from_bytes(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def format_mtime(mtime: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S GMT", time.gmtime(int(mtime)))


def _path_field(path: str) -> str:
    raw = path_to_bytes(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        # The manifest is UTF-8 JSON: other names go hex-encoded, as PostgreSQL does.
        return f'"Encoded-Path": "{raw.hex()}"'
    return f'"Path": {json.dumps(path, ensure_ascii=False)}'


def _lsn_text(value) -> str:
    if isinstance(value, int):
        return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
    hi, sep, lo = str(value).strip().partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {value!r}")
    return f"{int(hi, 16):X}/{int(lo, 16):X}"


def build_manifest(entries, wal_ranges: list, version: int = 1, system_identifier=None) -> bytes:
    """The manifest bytes, laid out byte for byte as PostgreSQL's backup_manifest.c does.

    wal_ranges: [(timeline, start_lsn, end_lsn)], newest timeline first.
    """
    if version not in (1, 2):
        raise ValueError(f"manifest version must be 1 or 2, not {version}")
    if not wal_ranges:
        raise ValueError("a manifest needs at least one WAL range (timeline, start LSN, stop LSN)")
    out = [f'{{ "{VERSION_KEY}": {version},\n']
    if version >= 2:
        if system_identifier in (None, ""):
            raise ValueError("a version 2 manifest needs the system identifier")
        out.append(f'"System-Identifier": {int(system_identifier)},\n')
    out.append('"Files": [')
    for i, e in enumerate(sorted(entries, key=lambda e: path_to_bytes(e.path))):
        line = f'{"," if i else ""}\n{{ {_path_field(e.path)}, "Size": {int(e.size)}, "Last-Modified": "{format_mtime(e.mtime)}"'
        if e.algorithm and e.algorithm != "NONE":
            if e.checksum is None:
                raise ValueError(f"no {e.algorithm} checksum for {e.path!r}")
            line += f', "Checksum-Algorithm": "{e.algorithm}", "Checksum": "{e.checksum}"'
        out.append(line + " }")
    out.append('\n],\n"WAL-Ranges": [\n')
    out.append(
        ",\n".join(
            f'{{ "Timeline": {int(tli)}, "Start-LSN": "{_lsn_text(start)}", "End-LSN": "{_lsn_text(end)}" }}'
            for tli, start, end in wal_ranges
        )
    )
    out.append("\n],\n")
    body = "".join(out).encode("utf-8", "surrogateescape")
    # SHA-256 of every byte up to and including the newline before the checksum line.
    return body + f'"Manifest-Checksum": "{hashlib.sha256(body).hexdigest()}"}}\n'.encode()


def manifest_checksum_ok(data: bytes) -> tuple:
    """(stated checksum, actual checksum) as pg_verifybackup computes them."""
    if data.count(b"\n") < 2:
        raise ManifestError("could not parse backup manifest: expected at least 2 lines")
    if not data.endswith(b"\n"):
        raise ManifestError("could not parse backup manifest: last line not newline-terminated")
    penultimate = data.rindex(b"\n", 0, len(data) - 1)
    actual = hashlib.sha256(data[: penultimate + 1]).hexdigest()
    m = re.search(rb'"Manifest-Checksum"\s*:\s*"([^"]*)"', data[penultimate + 1 :])
    return (m.group(1).decode("ascii", "replace").lower() if m else None), actual


def _pairs_no_duplicates(pairs):
    keys = [k for k, _value in pairs]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ManifestError(f"duplicate key {sorted(dup)[0]!r}")
    return dict(pairs)


def parse_manifest(data: bytes) -> Manifest:
    """Parse and check a manifest as strictly as pg_verifybackup does."""
    stated, actual = manifest_checksum_ok(data)
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_pairs_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"could not parse backup manifest: {e}") from None
    if not isinstance(doc, dict) or not doc or next(iter(doc)) != VERSION_KEY:
        raise ManifestError(f"could not parse backup manifest: expected {VERSION_KEY} as the first field")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise ManifestError(f"could not parse backup manifest: unexpected field {sorted(unknown)[0]!r}")
    version = doc[VERSION_KEY]
    if version not in (1, 2) or isinstance(version, bool):
        raise ManifestError(f"unexpected manifest version {version!r}")
    if "System-Identifier" in doc and version < 2:
        raise ManifestError("System-Identifier is not allowed in a version 1 manifest")
    if version >= 2 and not isinstance(doc.get("System-Identifier"), int):
        raise ManifestError("a version 2 manifest needs an integer System-Identifier")
    if stated is None or "Manifest-Checksum" not in doc:
        raise ManifestError("manifest has no checksum")
    if doc["Manifest-Checksum"].lower() != actual:
        raise ManifestError(f"manifest checksum mismatch (stated {doc['Manifest-Checksum']}, computed {actual})")
    files = {}
    for item in _list_of_objects(doc, "Files"):
        entry = _parse_file(item)
        if entry.path in files:
            raise ManifestError(f"duplicate path name in backup manifest: {entry.path!r}")
        files[entry.path] = entry
    ranges = []
    for item in _list_of_objects(doc, "WAL-Ranges"):
        if set(item) != WAL_KEYS:
            raise ManifestError(f"WAL range needs exactly {sorted(WAL_KEYS)}: {item}")
        try:
            ranges.append({"timeline": int(item["Timeline"]), "start_lsn": _lsn_text(item["Start-LSN"]),
                           "end_lsn": _lsn_text(item["End-LSN"])})  # fmt: skip
        except (TypeError, ValueError) as e:
            raise ManifestError(f"invalid WAL range {item}: {e}") from None
    return Manifest(version, files, ranges, doc.get("System-Identifier"), doc["Manifest-Checksum"].lower())


def _list_of_objects(doc: dict, key: str) -> list:
    value = doc.get(key)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ManifestError(f"could not parse backup manifest: {key} must be a list of objects")
    return value


def _parse_file(item: dict) -> FileEntry:
    unknown = set(item) - FILE_KEYS
    if unknown:
        raise ManifestError(f"unexpected file field {sorted(unknown)[0]!r}")
    if ("Path" in item) == ("Encoded-Path" in item):
        raise ManifestError(f"a file needs exactly one of Path and Encoded-Path: {item}")
    if "Path" in item:
        path = item["Path"]
    else:
        try:
            path = path_from_bytes(bytes.fromhex(item["Encoded-Path"]))
        except (TypeError, ValueError):
            raise ManifestError(f"could not decode file name {item['Encoded-Path']!r}") from None
    size = item.get("Size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"missing or invalid size for {path!r}")
    algorithm = item.get("Checksum-Algorithm")
    checksum = item.get("Checksum")
    if checksum is not None and algorithm is None:
        raise ManifestError(f"checksum without algorithm for {path!r}")
    if algorithm is not None:
        algorithm = str(algorithm).upper()
        if algorithm not in ALGORITHMS:
            raise ManifestError(f"unrecognized checksum algorithm {item['Checksum-Algorithm']!r} for {path!r}")
        if algorithm == "NONE":
            algorithm, checksum = None, None
        elif (
            not isinstance(checksum, str)
            or not re.fullmatch(r"[0-9A-Fa-f]*", checksum)
            or len(checksum) != 2 * DIGEST_SIZES[algorithm]
        ):
            raise ManifestError(f"invalid {algorithm} checksum for {path!r}: {checksum!r}")
        else:
            checksum = checksum.lower()
    mtime = 0
    if isinstance(item.get("Last-Modified"), str):
        try:
            mtime = calendar.timegm(time.strptime(item["Last-Modified"], "%Y-%m-%d %H:%M:%S GMT"))
        except ValueError:
            mtime = 0  # informational only: pg_verifybackup does not check it either
    return FileEntry(path, size, mtime, algorithm, checksum)


# -- comparing


def problem(path: str, kind: str, expected=None, actual=None) -> dict:
    return {"path": path, "problem": kind, "expected": expected, "actual": actual}


def wanted_by(manifest: Manifest) -> Want:
    """Checksum a file only when the manifest has it with the same size (as pg_verifybackup)."""

    def want(path: str, size: int):
        e = manifest.files.get(path)
        return e.algorithm if e is not None and e.size == size else None

    return want


def compare(manifest: Manifest, entries) -> list:
    """Problems between the manifest and the files found: missing, extra, size, checksum."""
    problems = []
    seen = set()
    for e in entries:
        expected = manifest.files.get(e.path)
        if expected is None or e.path in seen:
            problems.append(problem(e.path, "extra", None, e.size))
            continue
        seen.add(e.path)
        if e.size != expected.size:
            problems.append(problem(e.path, "size", expected.size, e.size))
        elif expected.algorithm and e.checksum is not None and e.algorithm == expected.algorithm:
            if e.checksum != expected.checksum:
                problems.append(problem(e.path, "checksum", expected.checksum, e.checksum))
    for path, expected in manifest.files.items():
        if path not in seen:
            problems.append(problem(path, "missing", expected.size, None))
    return sorted(problems, key=lambda p: (path_to_bytes(p["path"]), p["problem"]))


# -- reading files and archives


def excluded(path: str) -> bool:
    """Files of a data directory that a manifest never lists."""
    return path in EXCLUDED_ROOT_FILES or path == "pg_wal" or path.startswith("pg_wal/")


def _hash_stream(read: Callable[[int], bytes], algorithm: str | None) -> tuple:
    """(bytes read, hex digest or None), reading to the end of the stream."""
    hasher = new_hasher(algorithm)
    n = 0
    while True:
        chunk = read(CHUNK)
        if not chunk:
            break
        n += len(chunk)
        if hasher is not None:
            hasher.update(chunk)
    return n, (hasher.hexdigest() if hasher is not None else None)


def _entry_from(path: str, size: int, mtime: int, algorithm: str | None, read) -> FileEntry:
    algorithm = algorithm if algorithm and algorithm != "NONE" else None
    n, digest = _hash_stream(read, algorithm)
    return FileEntry(path, n, int(mtime), algorithm, digest)


def scan_directory(top: str, prefix: str, want: Want, errors: list, skip: Callable[[str], bool] | None = None,
                   within: str | None = None) -> Iterator[FileEntry]:  # fmt: skip
    """Regular files under top, following symlinks as pg_verifybackup does.

    within: a symlink must resolve inside this directory (a backup must never
    point at live files).
    """
    stack = [(os.fsencode(top), "")]
    visited = set()
    while stack:
        absdir, rel = stack.pop()
        try:
            st = os.stat(absdir)
            if (st.st_dev, st.st_ino) in visited:
                continue  # a symlink loop
            visited.add((st.st_dev, st.st_ino))
            with os.scandir(absdir) as it:
                children = sorted(it, key=lambda d: d.name)
        except OSError as e:
            errors.append(problem(prefix + rel.rstrip("/"), "unreadable", None, str(e)))
            continue
        for child in reversed(children):
            relpath = rel + path_from_bytes(child.name)
            if skip is not None and skip(relpath):
                continue
            try:
                if within is not None and child.is_symlink():
                    target = os.path.realpath(child.path)
                    root = os.path.realpath(os.fsencode(within))
                    if not target.startswith(root + b"/"):
                        raise OSError(f"symbolic link to {path_from_bytes(target)}, outside the backup")
                cst = child.stat()
            except OSError as e:
                errors.append(problem(prefix + relpath, "unreadable", None, getattr(e, "strerror", None) or str(e)))
                continue
            if stat.S_ISDIR(cst.st_mode):
                stack.append((child.path, relpath + "/"))
            elif stat.S_ISREG(cst.st_mode):
                path = prefix + relpath
                algorithm = want(path, cst.st_size)
                if not algorithm or algorithm == "NONE":
                    yield FileEntry(path, cst.st_size, int(cst.st_mtime))
                    continue
                try:
                    with open(child.path, "rb") as f:
                        yield _entry_from(path, cst.st_size, cst.st_mtime, algorithm, f.read)
                except OSError as e:
                    errors.append(problem(path, "unreadable", None, e.strerror or str(e)))


def scan_file(abspath: str, path: str, want: Want, errors: list) -> Iterator[FileEntry]:
    try:
        st = os.stat(abspath)
        algorithm = want(path, st.st_size)
        if not algorithm or algorithm == "NONE":
            yield FileEntry(path, st.st_size, int(st.st_mtime))
            return
        with open(abspath, "rb") as f:
            entry = _entry_from(path, st.st_size, st.st_mtime, algorithm, f.read)
    except OSError as e:
        errors.append(problem(path, "unreadable", None, e.strerror or str(e)))
        return
    yield entry


class ArchiveStream:
    """An archive file as a plain, forward-only byte stream.

    age, zstd and lz4 run as child processes (they also decrypt and decompress
    while we hash); a gzip file that is not encrypted uses Python's gzip module.
    Reading to the end also checks the stored file's own integrity.
    """

    def __init__(self, path):
        """path: an archive file, or an object of a bucket (_storage.RemoteFile), streamed."""
        self.path = path
        self.remote = path if hasattr(path, "finish") else None
        self.reader = None
        self._file = None

    def __enter__(self):
        if self.remote is not None:
            self.reader = PlainReader(self.remote.name, source=self.remote.open())
            try:
                self._file = self.reader.__enter__()
            except LayoutError as e:
                self.remote.finish(stopped_early=True)
                raise ArchiveError(str(e)) from None
            return self._file
        if self.path.endswith(".gz"):
            self._file = gzip.open(self.path, "rb")
            return self._file
        if not os.access(self.path, os.R_OK):
            raise ArchiveError(f"cannot read {self.path}: permission denied")
        self.reader = PlainReader(self.path)
        try:
            self._file = self.reader.__enter__()
        except LayoutError as e:
            raise ArchiveError(str(e)) from None
        return self._file

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            # Readers stop at the end-of-archive marker: drain the padding
            # after it so the tools finish and report their status.
            while self._file.read(CHUNK):
                pass
        if self.reader is None:
            self._file.close()
            return False
        try:
            self.reader.__exit__(exc_type, exc, tb)
            if self.remote is not None:
                self.remote.finish(stopped_early=exc_type is not None)
        except PgopsError as e:
            if self.remote is not None:
                self.remote.finish(stopped_early=True)
            raise ArchiveError(str(e)) from None
        return False


def member_name(name: str) -> str:
    """Archive member name relative to the archived directory: GNU tar's "./" prefix stripped."""
    while name.startswith("./"):
        name = name[2:]
    name = name.lstrip("/")
    while name.endswith("/"):
        name = name[:-1]
    return "" if name == "." else name


def scan_tar(stream, prefix: str, want: Want, skip: Callable[[str], bool] | None = None) -> Iterator[FileEntry]:
    """Regular-file members of a tar stream; directories, symlinks and devices are not files of a manifest."""
    done = {}  # path -> (size, algorithm, checksum), for hard links (their data is in the first member)
    with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK, encoding="utf-8", errors="surrogateescape") as tf:
        for m in tf:
            name = member_name(m.name)
            if not name:
                continue
            path = prefix + name
            if m.islnk():
                if skip is not None and skip(path):
                    continue
                target = done.get(prefix + member_name(m.linkname))
                if target is None:
                    raise ArchiveError(f"hard link {path} to {m.linkname}, which is not earlier in the archive")
                size, algorithm, checksum = target
                if want(path, size) != algorithm:
                    checksum = None  # another algorithm would need a second read of the stream
                done[path] = target
                yield FileEntry(path, size, int(m.mtime), algorithm, checksum)
            elif m.isreg():
                if skip is not None and skip(path):
                    continue
                f = tf.extractfile(m)
                entry = _entry_from(path, m.size, m.mtime, want(path, m.size), f.read)
                done[path] = (entry.size, entry.algorithm, entry.checksum)
                yield entry


NEWC_MAGICS = (b"070701", b"070702")
NEWC_HEADER = 110


@dataclass
class CpioMember:
    name: bytes
    mode: int
    mtime: int
    size: int
    nlink: int
    ino: int
    dev: tuple
    offset: int = 0  # of the member's data in the (decompressed) stream
    data: object = field(default=None, repr=False)


class _Bounded:
    """Read at most n bytes of a stream."""

    def __init__(self, stream, n: int):
        self.stream = stream
        self.left = n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size < 0 else min(size, self.left)
        data = self.stream.read(size)
        self.left -= len(data)
        if not data and self.left:
            raise ArchiveError("unexpected end of archive inside a member")
        return data

    def skip(self) -> None:
        while self.read(CHUNK):
            pass


def _read_exact(stream, n: int, what: str) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise ArchiveError(f"unexpected end of archive in {what}")
        buf += chunk
    return buf


def iter_cpio(stream) -> Iterator[CpioMember]:
    """Members of a cpio archive in the SVR4 "newc" format (cpio -H newc), streamed."""
    pos = 0
    while True:
        hdr = _read_exact(stream, NEWC_HEADER, "a cpio header")
        if hdr[:6] not in NEWC_MAGICS:
            raise ArchiveError(f"not a cpio newc archive: bad header magic {hdr[:6]!r} at byte {pos}")
        try:
            v = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ArchiveError(f"corrupt cpio header at byte {pos}") from None
        ino, mode, _uid, _gid, nlink, mtime, size, devmaj, devmin, _rmaj, _rmin, namesize, _check = v
        name = _read_exact(stream, namesize, "a cpio member name").rstrip(b"\0")
        pos += NEWC_HEADER + namesize
        pad = -pos % 4
        _read_exact(stream, pad, "cpio padding")
        pos += pad
        if name == b"TRAILER!!!":
            return
        data = _Bounded(stream, size)
        yield CpioMember(name, mode, mtime, size, nlink, ino, (devmaj, devmin), pos, data)
        data.skip()
        pos += size
        pad = -pos % 4
        _read_exact(stream, pad, "cpio padding")
        pos += pad


def scan_cpio(stream, prefix: str, want: Want, skip: Callable[[str], bool] | None = None) -> Iterator[FileEntry]:
    """Regular-file members of a newc cpio stream.

    Hard links: newc stores the data once, with the last link; the earlier
    links come with size 0 and are completed when the data arrives.
    """
    pending = {}  # (dev, ino) -> [(path, mtime)]
    for m in iter_cpio(stream):
        if not stat.S_ISREG(m.mode):
            continue
        name = member_name(path_from_bytes(m.name))
        if not name:
            continue
        path = prefix + name
        if skip is not None and skip(path):
            continue
        key = (m.dev, m.ino)
        if m.nlink > 1 and m.size == 0:
            pending.setdefault(key, []).append((path, m.mtime))
            continue
        entry = _entry_from(path, m.size, m.mtime, want(path, m.size), m.data.read)
        yield entry
        for other, mtime in pending.pop(key, []) if m.nlink > 1 else []:
            same = want(other, entry.size) == entry.algorithm
            yield FileEntry(other, entry.size, int(mtime), entry.algorithm, entry.checksum if same else None)
    for links in pending.values():  # hard-linked empty files
        for path, mtime in links:
            yield _entry_from(path, 0, mtime, want(path, 0), lambda n: b"")


# -- our repository layout


@dataclass
class Source:
    kind: str  # file | dir | tar | cpio
    location: str  # absolute path on disk
    prefix: str  # manifest path prefix ("" or "pg_tblspc/<oid>/"); for a file, its manifest path
    name: str = ""  # how problems name it (relative to the backup)


@dataclass
class Layout:
    root: str
    method: str  # tar | cpio | rsync | plain
    compression: str
    data_dir: str | None  # a plain data directory (what pg_verifybackup reads)
    manifest_paths: list
    sources: list
    missing: list = field(default_factory=list)  # archives or directories the backup should have
    notes: list = field(default_factory=list)


def _tablespace_oids(info: dict | None) -> list:
    out = []
    for ts in (info or {}).get("tablespaces") or []:
        oid = ts.get("oid") if isinstance(ts, dict) else ts
        if oid not in (None, ""):
            out.append(str(oid))
    return out


def detect_layout(root: str, info: dict | None = None) -> Layout:
    """Where the files of a backup are: from backup.json's method, else from what is on disk."""
    root = os.path.abspath(root)
    method = (info or {}).get("method")
    if not method:
        if os.path.isdir(os.path.join(root, "data")):
            method = "rsync"
        elif find_archives(root, "tar"):
            method = "tar"
        elif find_archives(root, "cpio"):
            method = "cpio"
        elif os.path.isfile(os.path.join(root, "PG_VERSION")):
            method = "plain"
        else:
            raise LayoutError(f"{root} is not a backup: no backup.json method, data/, base.tar*, base.cpio* or PG_VERSION")
    if method in ("rsync", "plain"):
        data = os.path.join(root, "data") if method == "rsync" else root
        if not os.path.isdir(data):
            raise LayoutError(f"{root} has method {method} but no data directory {data}")
        layout = Layout(
            root, method, "none", data,
            [os.path.join(data, MANIFEST)] + ([os.path.join(root, MANIFEST)] if method == "rsync" else []),
            [Source("dir", data, "", "data" if method == "rsync" else ".")],
        )  # fmt: skip
        for oid in _tablespace_oids(info):
            if not os.path.isdir(os.path.join(data, "pg_tblspc", oid)):
                layout.missing.append(os.path.normpath(os.path.join(os.path.relpath(data, root), "pg_tblspc", oid)))
        return layout
    if method not in ("tar", "cpio"):
        raise LayoutError(f"unknown backup method {method!r} in {root}/backup.json (expected tar, rsync or cpio)")
    archives = find_archives(root, method)
    listed = [str(f) for f in (info or {}).get("files") or []]
    missing = [f for f in listed if parse_archive_name(f) and not os.path.isfile(os.path.join(root, f))]
    missing_keys = {parse_archive_name(f)[0] for f in missing}
    for key in ["base"] + _tablespace_oids(info):
        if key not in archives and key not in missing_keys:
            missing.append(f"{key}.{method}")
    compressions = {parse_archive_name(n)[2] for n in archives.values()}
    sources = [Source("file", os.path.join(root, n), n, n) for n in LABEL_FILES if os.path.isfile(os.path.join(root, n))]
    for key in sorted(archives, key=lambda k: (k != "base", k.zfill(10))):
        prefix = "" if key == "base" else f"pg_tblspc/{key}/"
        sources.append(Source(method, os.path.join(root, archives[key]), prefix, archives[key]))
    compression = compressions.pop() if len(compressions) == 1 else ("mixed" if compressions else "none")
    return Layout(root, method, compression, None, [os.path.join(root, MANIFEST)], sources, missing)


def scan_layout(layout: Layout, want: Want, errors: list) -> Iterator[FileEntry]:
    """Every file a manifest of this backup lists, in the backup's own order.

    Archive-level failures (unreadable, truncated, corrupt compression) are
    appended to errors as "unreadable" problems naming the archive.
    """
    root_files = {s.prefix for s in layout.sources if s.kind == "file"}
    base_skip = excluded
    if root_files:
        # backup_label / tablespace_map at the backup root win over copies inside base.*
        def base_skip(path: str) -> bool:
            if path in root_files:
                layout.notes.append(f"{path} inside the base archive ignored: the one at the backup root is used")
                return True
            return excluded(path)

    within = layout.root if layout.method == "rsync" else None
    for src in layout.sources:
        if src.kind == "file":
            yield from scan_file(src.location, src.prefix, want, errors)
        elif src.kind == "dir":
            skip = excluded if src.prefix == "" else None
            yield from scan_directory(src.location, src.prefix, want, errors, skip=skip, within=within)
        else:
            reader = scan_tar if src.kind == "tar" else scan_cpio
            skip = base_skip if src.prefix == "" else None
            try:
                with ArchiveStream(src.location) as stream:
                    yield from reader(stream, src.prefix, want, skip)
            except (ArchiveError, tarfile.TarError, EOFError, OSError, zlib.error) as e:
                errors.append(problem(src.name, "unreadable", None, str(e) or type(e).__name__))


def _read_sidecar(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def entries_from_copy(layout: Layout, algorithm: str, sidecar: str) -> tuple | None:
    """(entries, errors) from what the copy step recorded while the data passed
    by, plus the label files written after it; None when unusable (then the
    backup is read again)."""
    recorded = _read_sidecar(sidecar)
    if recorded is None or recorded.get("algorithm") != algorithm:
        return None
    entries = {}
    for e in recorded.get("entries") or []:
        if e["path"] in LABEL_FILES or excluded(e["path"]):
            continue
        entries[e["path"]] = FileEntry(e["path"], int(e["size"]), int(e["mtime"]), e.get("algorithm"), e.get("checksum"))
    errors = []
    label_dir = layout.data_dir if layout.method == "rsync" else layout.root
    for name in LABEL_FILES:
        path = os.path.join(label_dir, name)
        if os.path.isfile(path):
            for entry in scan_file(path, name, lambda _p, _s: algorithm, errors):
                entries[name] = entry
    return list(entries.values()), errors


def collect_entries(layout: Layout, algorithm: str | None) -> tuple:
    """(entries, errors) for writing a manifest; algorithm None skips checksums (check mode)."""
    errors = []
    entries = {}
    for e in scan_layout(layout, lambda path, size: algorithm, errors):
        if e.path in entries:
            errors.append(problem(e.path, "duplicate", None, "found twice in the backup"))
        entries[e.path] = e
    return list(entries.values()), errors


def verify_layout(layout: Layout, manifest: Manifest) -> tuple:
    """(problems, files checked, bytes checked)."""
    errors = []
    counted = {"files": 0, "bytes": 0}

    def counting(entries):
        for e in entries:
            counted["files"] += 1
            counted["bytes"] += e.size
            yield e

    problems = compare(manifest, counting(scan_layout(layout, wanted_by(manifest), errors)))
    problems = [problem(name, "missing") for name in layout.missing] + errors + problems
    return problems, counted["files"], counted["bytes"]


def write_backup_manifest(
    root: str, info: dict, algorithm: str, copy_entries_file: str | None = None, require_copy_entries: bool = False
) -> dict:
    """Write the manifest of a finished backup of our layout (used when the
    backup is marked complete). Takes the copy step's recorded checksums when
    they match the algorithm, else reads the backup."""
    began = time.monotonic()
    layout = detect_layout(root, info)
    if layout.missing:
        raise ManifestError(f"the backup lacks {', '.join(layout.missing)}")
    collected = None
    if algorithm == "auto":
        # Whatever the copy step chose on the database host, else this node's best.
        recorded = (_read_sidecar(copy_entries_file) or {}).get("algorithm") if copy_entries_file else None
        algorithm = recorded if recorded in ALGORITHMS else default_algorithm()
    if copy_entries_file and os.path.exists(copy_entries_file):
        collected = entries_from_copy(layout, algorithm, copy_entries_file)
    if collected is None and require_copy_entries:
        raise ManifestError(
            f"the copy step recorded no {algorithm} checksums for this backup, and its archives are not read back: "
            "take the backup with the manifest checksum the copy step uses (pg_backup_manifest_checksum)"
        )
    entries, errors = collected if collected is not None else collect_entries(layout, algorithm)
    if errors:
        raise ManifestError("; ".join(f"{e['path']}: {e['actual']}" for e in errors[:20]))
    if not any(e.path == "backup_label" for e in entries):
        raise ManifestError("backup_label is missing from the backup")
    version = 2 if int(info.get("pg_version") or 0) >= 170000 else 1
    data = build_manifest(
        entries,
        [(int(info["timeline"]), info["start_lsn"], info["stop_lsn"])],
        version=version,
        system_identifier=info.get("system_identifier"),
    )
    for path in layout.manifest_paths:
        write_private_file(path, data)
    if copy_entries_file and os.path.exists(copy_entries_file):
        os.unlink(copy_entries_file)
    return {
        "files": len(entries),
        "bytes": sum(e.size for e in entries),
        "manifest_version": version,
        "checksum_algorithm": algorithm,
        "from_copy_step": collected is not None,
        "seconds": round(time.monotonic() - began, 3),
    }
