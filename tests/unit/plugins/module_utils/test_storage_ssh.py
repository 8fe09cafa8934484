"""A repository on a repository host, read over ssh (_storage.SshStorage / SshFile), without a server: here
"ssh" is a stand-in that runs the command on this machine, as sshd would run it on the repository host."""

from __future__ import annotations

import importlib
import json
import os
import stat
import subprocess
import sys
import tarfile

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
storage = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._storage")
files = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._restore_files")
Remote = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._remote").Remote

BID = "20261129T101500Z"


@pytest.fixture
def remote(tmp_path):
    """A Remote whose ssh is `fake-ssh [-l user] host command...`: the host is dropped and the command run by sh, here."""
    fake = tmp_path / "fake-ssh"
    fake.write_text('#!/bin/sh\nif [ "$1" = -l ]; then shift 2; fi\nshift\nexec sh -c "$*"\n')
    fake.chmod(0o755)
    r = Remote("repo@repo1", 22, [])
    r.ssh = [str(fake)]
    r.prefix = [str(fake), r.target]
    return r


def tar_backup(repo) -> str:
    bdir = repo / BID
    bdir.mkdir(parents=True)
    (bdir / "backup.json").write_text(json.dumps({"id": BID, "status": "complete", "method": "tar", "compression": "zstd"}))
    (bdir / "backup_label").write_text("START WAL LOCATION: 0/2000028\n")
    (bdir / "backup_manifest").write_text("{}")
    src = repo / "src"
    (src / "base" / "1").mkdir(parents=True)
    (src / "PG_VERSION").write_text("16\n")
    (src / "base" / "1" / "1259").write_bytes(os.urandom(50000))
    with tarfile.open(repo / "base.tar", "w") as tf:
        tf.add(src, arcname=".")
    subprocess.run(["zstd", "-q", "--rm", str(repo / "base.tar"), "-o", str(bdir / "base.tar.zst")], check=True)
    return str(bdir)


def test_a_tar_backup_is_staged_small_files_only_and_its_archive_streamed_over_ssh(tmp_path, remote):
    bdir = tar_backup(tmp_path / "repo")
    st, bid, staging, readers = storage.stage_backup_at(bdir, None, remote, prefix=".pgops-test-")
    assert bid == BID and st.kind == "ssh" and st.url == f"repo@repo1:{tmp_path / 'repo'}"
    assert sorted(os.listdir(staging)) == ["backup.json", "backup_label", "backup_manifest", "base.tar.zst"]
    stand_in = os.path.join(staging, "base.tar.zst")
    assert os.path.getsize(stand_in) == 0  # no copy of the archive here
    assert stat.S_IMODE(os.stat(os.path.join(staging, "backup_label")).st_mode) == 0o600
    reader = readers[stand_in]
    assert str(reader) == f"repo@repo1:{bdir}/base.tar.zst" and reader.name == "base.tar.zst"
    dest = tmp_path / "restored"
    dest.mkdir()
    files.extract(reader, str(dest), "tar")
    assert (dest / "base" / "1" / "1259").read_bytes() == (tmp_path / "repo" / "src" / "base" / "1" / "1259").read_bytes()
    assert files.peek_tar_config(reader) == {}  # read from the stream, stopped early, no error


def test_an_rsync_backup_is_copied_with_rsync_over_the_same_ssh(tmp_path, remote):
    bdir = tmp_path / "repo" / BID
    (bdir / "data" / "base" / "1").mkdir(parents=True)
    (bdir / "tablespaces" / "16385" / "PG_16_x").mkdir(parents=True)
    (bdir / "backup.json").write_text(json.dumps({"id": BID, "status": "complete", "method": "rsync"}))
    (bdir / "data" / "PG_VERSION").write_text("16\n")
    (bdir / "data" / "postgresql.conf").write_text("port = 5433\n")
    (bdir / "data" / "base" / "1" / "1259").write_bytes(b"x" * 1000)
    (bdir / "tablespaces" / "16385" / "PG_16_x" / "t").write_bytes(b"y" * 10)
    _st, _bid, staging, readers = storage.stage_backup_at(str(bdir), None, remote)
    # Only what a restore reads before the copy: the version and the configuration, not the data.
    assert sorted(os.listdir(os.path.join(staging, "data"))) == ["PG_VERSION", "postgresql.conf"]
    assert files.original_port(os.path.join(staging, "data")) == 5433
    sources = files.backup_sources(staging, {"method": "rsync"})
    assert list(sources["spaces"]) == ["16385"]
    dest = tmp_path / "restored"
    dest.mkdir()
    files.extract(readers[sources["base"]], str(dest), "rsync")
    assert (dest / "base" / "1" / "1259").read_bytes() == b"x" * 1000
    ts = tmp_path / "ts"
    ts.mkdir()
    files.extract(readers[sources["spaces"]["16385"]], str(ts), "rsync")
    assert (ts / "PG_16_x" / "t").read_bytes() == b"y" * 10


def test_backup_json_is_read_and_replaced_whole_and_a_missing_file_is_told(tmp_path, remote):
    bdir = tar_backup(tmp_path / "repo")
    st = storage.SshStorage(str(tmp_path / "repo"), remote)
    info = st.read_backup(BID)
    assert info["status"] == "complete"
    st.write_backup(BID, dict(info, verification={"verified": True}))
    assert json.loads((tmp_path / "repo" / BID / "backup.json").read_text())["verification"] == {"verified": True}
    assert stat.S_IMODE(os.stat(os.path.join(bdir, "backup.json")).st_mode) == 0o600
    assert [n for n in os.listdir(bdir) if n.startswith(".")] == []
    assert st.read_bytes(f"{BID}/nothing") is None and st.files("nowhere") == []
    assert ("backup_label", None) in st.files(BID)
    gone = storage.SshFile(remote, f"{bdir}/base.tar.lz4")
    with gone.open() as stream:
        assert stream.read() == b""
    with pytest.raises(storage.StorageError, match=r"reading repo@repo1:.*base\.tar\.lz4 failed"):
        gone.finish()
