# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Checksums of backup manifests: SHA-2 from hashlib, CRC-32C from a C
extension when the node has one (crc32c, google-crc32c), else pure Python."""

from __future__ import annotations

import hashlib
import re
import struct

ALGORITHMS = ("NONE", "CRC32C", "SHA224", "SHA256", "SHA384", "SHA512")
DIGEST_SIZES = {"CRC32C": 4, "SHA224": 28, "SHA256": 32, "SHA384": 48, "SHA512": 64}


def _crc32c_table() -> list:
    table = []
    for i in range(256):
        c = i
        for _bit in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_T0 = _crc32c_table()
# Slicing-by-8 tables: eight input bytes per step instead of one (about 1.5x faster in CPython).
_TABLES = [_T0]
for _k in range(7):
    _TABLES.append([(v >> 8) ^ _T0[v & 0xFF] for v in _TABLES[-1]])
_EIGHT = struct.Struct("<II")


def _crc32c_update(reg: int, view) -> int:
    """Feed bytes into the CRC register (no pre/post inversion), eight at a time."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _TABLES
    end = len(view) - len(view) % 8
    for a, b in _EIGHT.iter_unpack(view[:end]):
        a ^= reg
        reg = (
            t7[a & 0xFF] ^ t6[(a >> 8) & 0xFF] ^ t5[(a >> 16) & 0xFF] ^ t4[a >> 24]
            ^ t3[b & 0xFF] ^ t2[(b >> 8) & 0xFF] ^ t1[(b >> 16) & 0xFF] ^ t0[b >> 24]
        )  # fmt: skip
    for byte in view[end:]:
        reg = t0[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


# Feeding zero bytes is a linear map of the register: for runs of zeros (free
# space in pages, FSM and VM forks: about half of a data directory) apply the
# map for 32768, 4096, 512 or 64 zeros at once as four byte-table lookups.
_ZERO_RUN = 64
_ZEROS = b"\0" * _ZERO_RUN
_NONZERO = re.compile(rb"[^\x00]")
_ZERO_OPS: list = []


def _apply(op: tuple, reg: int) -> int:
    return op[0][reg & 0xFF] ^ op[1][(reg >> 8) & 0xFF] ^ op[2][(reg >> 16) & 0xFF] ^ op[3][reg >> 24]


def _operator(image) -> tuple:
    """Byte tables of the linear map whose value on bit i is image(1 << i)."""
    cols = [image(1 << i) for i in range(32)]
    tables = []
    for k in range(4):
        table = [0] * 256
        for v in range(1, 256):
            low = v & -v
            table[v] = table[v ^ low] ^ cols[8 * k + low.bit_length() - 1]
        tables.append(table)
    return tuple(tables)


def _zero_ops() -> list:
    if not _ZERO_OPS:
        op = _operator(lambda reg: _crc32c_update(reg, _ZEROS))
        ops = [(_ZERO_RUN, op)]
        for _step in range(3):  # 512, 4096, 32768 zeros: the previous map applied 8 times
            prev = ops[-1][1]

            def eight(reg, prev=prev):
                for _time in range(8):
                    reg = _apply(prev, reg)
                return reg

            ops.append((ops[-1][0] * 8, _operator(eight)))
        _ZERO_OPS.extend(reversed(ops))
    return _ZERO_OPS


def _crc32c_extend_py(crc: int, data) -> int:
    """Continue a finished CRC-32C (Castagnoli, reflected) over data."""
    reg = crc ^ 0xFFFFFFFF
    view = memoryview(data).cast("B")
    raw = data if isinstance(data, bytes) else view.tobytes()
    pos, n = 0, len(view)
    while pos < n:
        run = raw.find(_ZEROS, pos)
        if run < 0:
            return _crc32c_update(reg, view[pos:]) ^ 0xFFFFFFFF
        reg = _crc32c_update(reg, view[pos:run])
        m = _NONZERO.search(raw, run + _ZERO_RUN)
        pos = n if m is None else m.start()
        left = pos - run
        for size, op in _zero_ops():
            while left >= size:
                reg = _apply(op, reg)
                left -= size
        reg = _crc32c_update(reg, _ZEROS[:left])
    return reg ^ 0xFFFFFFFF


def _candidates() -> list:
    """(name, extend) of the C implementations this node has, fastest first."""
    found = []
    try:
        import crc32c as _ext  # type: ignore

        kind = "hardware" if getattr(_ext, "hardware_based", False) else "software"
        found.append((kind == "software", f"crc32c ({kind})", lambda crc, data: _ext.crc32c(data, crc)))
    except Exception:  # noqa: BLE001 - optional accelerator
        pass
    try:
        import google_crc32c  # type: ignore

        # Its pure-Python fallback is slower than ours: only the C library counts.
        if getattr(google_crc32c, "implementation", "") == "c":
            found.append((False, "google-crc32c", google_crc32c.extend))
    except Exception:  # noqa: BLE001 - optional accelerator
        pass
    return [(name, fn) for _slow, name, fn in sorted(found, key=lambda c: c[0])]


def _accelerated_crc32c() -> tuple:
    """The first implementation that gives the right answer; buffers are passed
    as they are when it accepts them (no copy of each chunk)."""
    for name, fn in _candidates():
        for extend in (fn, lambda crc, data, fn=fn: fn(crc, bytes(data))):
            try:
                if extend(extend(0, memoryview(b"1234")), memoryview(b"56789")) == 0xE3069283:
                    return name, extend
            except Exception:  # noqa: BLE001 - an unusable accelerator is just skipped
                continue
    return "python", None


CRC32C_IMPLEMENTATION, _fast = _accelerated_crc32c()
crc32c_extend = _fast or _crc32c_extend_py


def default_algorithm() -> str:
    """CRC32C (pg_basebackup's default) when a C implementation is here, else
    SHA256: pure-Python CRC-32C runs at a few MB/s."""
    return "SHA256" if _fast is None else "CRC32C"


class Crc32c:
    """hashlib-like CRC-32C. digest() is the raw uint32 in little-endian byte
    order: PostgreSQL memcpy()s the value into the manifest's checksum buffer."""

    name = "crc32c"
    digest_size = 4

    def __init__(self, data: bytes = b""):
        self.value = 0
        if data:
            self.update(data)

    def update(self, data) -> None:
        self.value = crc32c_extend(self.value, data)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "little")

    def hexdigest(self) -> str:
        return self.digest().hex()


def new_hasher(algorithm: str | None):
    """A hasher for a manifest algorithm name, or None for NONE."""
    if not algorithm or algorithm == "NONE":
        return None
    if algorithm == "CRC32C":
        return Crc32c()
    if algorithm in DIGEST_SIZES:
        return hashlib.new(algorithm.lower())
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
