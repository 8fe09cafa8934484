"""pgops-wal's push and put without a server: a segment is a file of random bytes, the repository a
directory, and "ssh" a stand-in that runs the command here as sshd would run it on the repository host.
What is checked is what PostgreSQL trusts: an archive_command that returns 0 has stored the whole segment."""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import types

import pytest
from harness.ansible import collections_workspace

WS = collections_workspace()
sys.path.insert(0, WS)
wal = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._wal")

NAME = "000000010000000000000004"
CLUSTER = "7312000000000000001"


@pytest.fixture
def segment(tmp_path):
    path = tmp_path / "pg_wal" / NAME
    path.parent.mkdir()
    path.write_bytes(os.urandom(1 << 20) + b"\0" * (3 << 20))  # compressible, as real segments are
    return path


@pytest.fixture
def age_key(tmp_path):
    key = tmp_path / "age.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True).stdout.strip()
    return key, public


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    """`ssh ... host -- command` runs command with sh here; pgops-wal there is this checkout's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text('#!/bin/sh\nwhile [ "$1" != -- ]; do shift; done\nshift\nexec sh -c "$*"\n')
    ssh.chmod(0o755)
    program = bin_dir / "pgops-wal"
    program.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "from ansible_collections.pgops.online_backup.plugins.module_utils._wal import main; sys.exit(main())' "
        f'{WS} "$@"\n'
    )
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return str(program)


def _stored(repo) -> list:
    d = repo / "wal" / CLUSTER
    return sorted(os.listdir(d)) if d.is_dir() else []


def _broken_recipient(public: str) -> str:
    """A recipient that looks right but whose checksum is wrong: age refuses it only when it runs."""
    flipped = "q" if public[-1] != "q" else "p"
    return public[:-1] + flipped


def test_a_push_whose_encryptor_fails_stores_nothing_and_its_retry_stores_the_segment(tmp_path, segment, age_key, fake_ssh):
    """Over ssh: age dies on a bad recipient. Nothing may reach the repository host under the segment's
    name (before, a 0-byte .age file was linked there with a good digest beside it, and the retry was
    told "already archived"). The retry with a good recipient stores the segment, which decrypts to it."""
    key, public = age_key
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(wal.WalError):
        wal.push_remote(str(segment), "repo1", 22, [], fake_ssh, str(repo), CLUSTER, "zstd", None, [_broken_recipient(public)])
    assert [n for n in _stored(repo) if not n.startswith(".")] == []
    msg = wal.push_remote(str(segment), "repo1", 22, [], fake_ssh, str(repo), CLUSTER, "zstd", None, [public])
    assert msg.startswith(f"archived {NAME}"), msg
    stored = repo / "wal" / CLUSTER / f"{NAME}.zst.age"
    plain = subprocess.run(
        f"age -d -i {key} {stored} | zstd -d -q", shell=True, check=True, capture_output=True
    ).stdout  # fmt: skip
    assert plain == segment.read_bytes()


def test_put_refuses_a_stream_that_was_cut_off(tmp_path, segment, monkeypatch):
    """The repository host's put stores only what the sender says it sent: fewer bytes (a dropped
    connection, a compressor that died) are refused and nothing is linked; the full stream is stored."""
    directory = tmp_path / "repo" / "wal" / CLUSTER
    (tmp_path / "repo").mkdir()
    data = segment.read_bytes()
    digest = wal.file_digest(str(segment))
    stored_sha = wal.hashlib.sha256(data).hexdigest()

    def put(stdin: bytes) -> int:
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(stdin)))
        argv = ["put", "--dir", str(directory), "--name", NAME, "--compression", "none", "--sha256", digest]
        return wal.main(argv + ["--stored-sha256", stored_sha, "--stored-size", str(len(data))])

    assert put(data[: len(data) // 2]) == 1
    assert os.listdir(directory) == []
    assert put(data) == 0
    assert (directory / NAME).read_bytes() == data


def test_a_push_of_other_content_is_refused_when_a_digest_of_another_push_is_there(tmp_path, segment, age_key):
    """Two pushes of one name with different content (two clusters archiving into one place): the
    first to claim the digest decides; the other is refused, and the digest is never replaced (before,
    the second overwrote it and then took the first's file for its own)."""
    _key, public = age_key
    repo = tmp_path / "repo"
    repo.mkdir()
    directory = wal.ensure_wal_dir(str(repo), CLUSTER)
    other = "0" * 64
    # The other push claimed the name and has not linked its file yet.
    assert wal._claim_digest(os.path.join(directory, f"{NAME}.zst.age.sha256"), other) is None
    with pytest.raises(wal.WalError, match="different"):
        wal.push_local(str(segment), str(repo), CLUSTER, "zstd", None, [public])
    assert (repo / "wal" / CLUSTER / f"{NAME}.zst.age.sha256").read_text().strip() == other
    assert not (repo / "wal" / CLUSTER / f"{NAME}.zst.age").exists()


def test_a_retried_push_after_its_digest_was_claimed_completes(tmp_path, segment, age_key):
    """A push that claimed its digest and died before linking the segment: its retry (same content)
    finds its own digest and stores the segment."""
    _key, public = age_key
    repo = tmp_path / "repo"
    repo.mkdir()
    directory = wal.ensure_wal_dir(str(repo), CLUSTER)
    assert wal._claim_digest(os.path.join(directory, f"{NAME}.zst.age.sha256"), wal.file_digest(str(segment))) is None
    msg = wal.push_local(str(segment), str(repo), CLUSTER, "zstd", None, [public])
    assert msg.startswith(f"archived {NAME}"), msg
    assert (repo / "wal" / CLUSTER / f"{NAME}.zst.age").stat().st_size > 0


def test_get_over_ssh_tells_a_missing_segment_from_an_error(tmp_path, segment, fake_ssh):
    """restore_command over ssh: a segment that is not there is exit 1 (recovery ends there); any failure
    on the repository host (here its pgops-wal dies with exit 1, as a Python error does) is 126, so that
    recovery stops instead of ending early at an older point than asked for."""
    repo = tmp_path / "repo"
    repo.mkdir()
    wal.push_remote(str(segment), "repo1", 22, [], fake_ssh, str(repo), CLUSTER, "zstd")
    host = ["--repository", str(repo), "--cluster", CLUSTER, "--host", "repo1", "--remote-program", fake_ssh]
    target = tmp_path / "restored"
    assert wal.main(["get", *host, NAME, str(target)]) == 0
    assert target.read_bytes() == segment.read_bytes()
    assert wal.main(["get", *host, "000000010000000000000005", str(tmp_path / "next")]) == 1
    broken = tmp_path / "bin" / "broken-wal"
    broken.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\nexit 1\n")
    broken.chmod(0o755)
    host[-1] = str(broken)
    assert wal.main(["get", *host, NAME, str(tmp_path / "again")]) == 126
    assert not (tmp_path / "again").exists()
