# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Follow a tar (GNU format) or cpio (newc) stream as it passes by, and
record each regular file's size, mtime and checksum.

The copy step tees the archiver's output through one of these scanners, so
the manifest costs no second read of the backup.
"""

from __future__ import annotations

from ._checksum import new_hasher

BLOCK = 512


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _name(raw: bytes) -> str:
    name = raw.decode("utf-8", "surrogateescape")
    while name.startswith("./"):
        name = name[2:]
    return name


class _Scanner:
    # How the format's own tools end an archive once its end marker was seen:
    # END_EXTRA more zero bytes, then zeros up to a multiple of RECORD.
    RECORD = 512
    END_EXTRA = 0

    def __init__(self, prefix: str, algorithm: str):
        self.prefix = prefix
        self.algorithm = algorithm
        self.entries = []
        self._hdr = bytearray()
        self._remaining = 0  # bytes of the current member's data still to come
        self._skip = 0  # padding (or ignored data) still to come
        self._hash = None
        self._entry = None
        self.done = False

    def _begin(self, name: str, size: int, mtime: int) -> None:
        self._entry = {"path": self.prefix + name, "size": size, "mtime": mtime, "algorithm": self.algorithm, "checksum": None}
        self._hash = new_hasher(self.algorithm)
        self._remaining = size
        if size == 0:
            self._finish()

    def _finish(self) -> None:
        if self._hash is not None:
            self._entry["checksum"] = self._hash.hexdigest()
        self.entries.append(self._entry)
        self._entry = None
        self._hash = None

    def passable(self) -> int:
        """Bytes before the next header (member data and padding): they can go
        on before they are seen, as no end of archive can hide in them."""
        return 0 if self.done else self._remaining + self._skip

    def header_wanted(self) -> int:
        """Bytes still missing from the header being read."""
        return self.header_size() - len(self._hdr)

    def feed(self, chunk) -> None:
        view = memoryview(chunk)
        pos, n = 0, len(view)
        while pos < n and not self.done:
            if self._remaining:
                take = min(self._remaining, n - pos)
                if self._hash is not None:
                    self._hash.update(view[pos : pos + take])
                self._remaining -= take
                pos += take
                if not self._remaining:
                    self._finish()
            elif self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
            else:
                take = min(self.header_size() - len(self._hdr), n - pos)
                self._hdr += view[pos : pos + take]
                pos += take
                if len(self._hdr) == self.header_size():
                    self.header(bytes(self._hdr))


class TarScanner(_Scanner):
    """GNU tar: 512-byte headers, 'L' long names, data padded to 512 bytes."""

    RECORD = 10240  # tar's default blocking factor, 20
    END_EXTRA = BLOCK  # the end marker is two zero blocks; done is set at the first

    def __init__(self, prefix: str, algorithm: str):
        super().__init__(prefix, algorithm)
        self._long = None
        self._collect = None  # bytes of a long name being read

    def header_size(self) -> int:
        return BLOCK if self._collect is None else self._collect[0]

    def header(self, hdr: bytes) -> None:
        self._hdr = bytearray()
        if self._collect is not None:
            size = self._collect[1]
            self._long = _name(hdr[:size].split(b"\0", 1)[0])
            self._collect = None
            return
        if not any(hdr):
            self.done = True  # end-of-archive blocks
            return
        size = _octal(hdr[124:136])
        pad = (-size) % BLOCK
        kind = hdr[156:157]
        if kind == b"L":
            # The next header's name, in size bytes (read as one padded "header").
            self._collect = (size + pad, size)
            return
        name = self._long if self._long is not None else _name(hdr[:100].split(b"\0", 1)[0])
        if self._long is None and hdr[257:263] == b"ustar\0" and hdr[345]:
            name = _name(hdr[345:500].split(b"\0", 1)[0]) + "/" + name
        self._long = None
        if kind in (b"0", b"\0", b"7"):
            self._begin(name, size, _octal(hdr[136:148]))
            self._skip = pad
        else:  # directories, links, GNU extensions: nothing for the manifest
            self._skip = size + pad


_KINDS = {0o140000: "socket", 0o120000: "symbolic link", 0o060000: "block device", 0o020000: "character device", 0o010000: "FIFO"}


class CpioScanner(_Scanner):
    """cpio newc: 110-byte ASCII headers, name and data padded to 4 bytes.
    files_and_dirs_only: a guard, recording nothing: a member of any other kind raises ValueError as soon as
    its header is read (before the restore hands that header to cpio, which would write through a symbolic link)."""

    def __init__(self, prefix: str, algorithm: str, files_and_dirs_only: bool = False):
        super().__init__(prefix, algorithm)
        self._stage = None  # (namesize, filesize, mode, mtime) while the name is read
        self.files_and_dirs_only = files_and_dirs_only

    def header_size(self) -> int:
        if self._stage is None:
            return 110
        namesize = self._stage[0]
        return namesize + (-(110 + namesize)) % 4

    def header(self, hdr: bytes) -> None:
        self._hdr = bytearray()
        if self._stage is None:
            if hdr[:6] not in (b"070701", b"070702"):
                raise ValueError(f"not a newc cpio header: {hdr[:6]!r}")
            fields = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
            self._stage = (fields[11], fields[6], fields[1], fields[5])
            return
        namesize, filesize, mode, mtime = self._stage
        self._stage = None
        name = _name(hdr[: namesize - 1])
        if name == "TRAILER!!!":
            self.done = True
            return
        kind = mode & 0o170000
        if self.files_and_dirs_only and kind not in (0o100000, 0o040000):
            raise ValueError(f"{name} is a {_KINDS.get(kind, f'file of type {kind:o}')}")
        pad = (-filesize) % 4
        if kind == 0o100000 and not self.files_and_dirs_only:  # a guard keeps no entries (millions of files)
            self._begin(name, filesize, mtime)
            self._skip = pad
        else:
            self._skip = filesize + pad


def scanner_for(method: str, prefix: str, algorithm: str) -> _Scanner:
    return (TarScanner if method == "tar" else CpioScanner)(prefix, algorithm)
