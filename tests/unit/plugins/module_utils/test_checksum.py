"""Manifest checksums: CRC-32C (pure Python and whichever C implementation is here) and SHA-2."""

from __future__ import annotations

import hashlib
import importlib
import os
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
ck = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._checksum")


@pytest.mark.parametrize(
    "data, crc",
    [(b"", 0), (b"123456789", 0xE3069283), (b"\x00" * 32, 0x8A9136AA), (b"\xff" * 32, 0x62A8AB43)],
)
def test_crc32c_known_values(data, crc):
    # RFC 3720 B.4 vectors and the classic check value.
    assert ck._crc32c_extend_py(0, data) == crc
    assert ck.crc32c_extend(0, data) == crc


def test_crc32c_digest_is_little_endian_like_postgres():
    # PostgreSQL memcpy()s the uint32 into the manifest: 0xE3069283 is written "839206e3".
    assert ck.Crc32c(b"123456789").hexdigest() == "839206e3"


def test_crc32c_in_pieces_equals_whole():
    data = os.urandom(100_003)
    h = ck.Crc32c()
    for i in range(0, len(data), 4097):
        h.update(data[i : i + 4097])
    assert h.value == ck._crc32c_extend_py(0, data)


def crc32c_bytewise(data: bytes) -> int:
    """The textbook definition, one bit at a time: the reference for the fast paths."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("zeros", [0, 7, 63, 64, 65, 511, 512, 4097, 32768, 32768 * 3 + 129])
def test_crc32c_zero_runs_match_the_definition(zeros):
    # Zero runs take the precomputed-operator path; everything else slicing-by-8.
    data = os.urandom(13) + b"\0" * zeros + os.urandom(9) + b"\0" * (zeros // 2) + b"\1"
    assert ck._crc32c_extend_py(0, data) == crc32c_bytewise(data)
    assert ck._crc32c_extend_py(ck._crc32c_extend_py(0, data[:100]), data[100:]) == crc32c_bytewise(data)


@pytest.mark.parametrize("algo", ["SHA224", "SHA256", "SHA384", "SHA512"])
def test_sha_hashers(algo):
    h = ck.new_hasher(algo)
    h.update(b"abc")
    assert h.hexdigest() == hashlib.new(algo.lower(), b"abc").hexdigest()
    assert len(h.digest()) == ck.DIGEST_SIZES[algo]


def test_none_and_unknown_algorithms():
    assert ck.new_hasher("NONE") is None
    assert ck.new_hasher(None) is None
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        ck.new_hasher("MD5")


def test_the_accelerated_crc32c_takes_buffers_without_copying_and_agrees():
    # This venv has the crc32c package (requirements-dev.txt): the C path must be the one in use.
    assert ck.CRC32C_IMPLEMENTATION.startswith("crc32c ("), ck.CRC32C_IMPLEMENTATION
    data = bytearray(os.urandom(300_001))
    view = memoryview(data)
    assert ck.crc32c_extend(ck.crc32c_extend(0, view[:1000]), view[1000:]) == ck._crc32c_extend_py(0, bytes(data))


def test_default_algorithm_is_crc32c_only_with_a_c_implementation(monkeypatch):
    assert ck.default_algorithm() == "CRC32C"
    monkeypatch.setattr(ck, "_fast", None)
    assert ck.default_algorithm() == "SHA256"


def test_a_wrong_accelerator_is_never_used(monkeypatch):
    monkeypatch.setattr(ck, "_candidates", lambda: [("broken", lambda crc, data: 42)])
    assert ck._accelerated_crc32c() == ("python", None)
