"""backup ids, the lock and retention of the repository."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from ansible_collections.pgops.online_backup.plugins.module_utils import _repository as r


def make_backup(repo, bid, status, sysid="1"):
    os.makedirs(os.path.join(repo, bid))
    with open(os.path.join(repo, bid, "backup.json"), "w") as f:
        json.dump({"id": bid, "status": status, "system_identifier": sysid}, f)


def test_validate_repository(tmp_path):
    assert "absolute" in r.validate_repository("rel/x", [])
    data = tmp_path / "data"
    data.mkdir()
    assert "inside" in r.validate_repository(str(data / "b"), [str(data)])
    link = tmp_path / "link"
    link.symlink_to(data)
    assert "inside" in r.validate_repository(str(link / "b"), [str(data)])
    assert r.validate_repository(str(tmp_path / "datax"), [str(data)]) is None


def test_lock_refuses_a_second_run_and_breaks_a_stale_one(tmp_path):
    repo = str(tmp_path)
    make_backup(repo, "20261129T101500Z", "running")
    path, note = r.acquire_lock(repo, "42", "20261129T101500Z")
    assert note is None and os.path.exists(path)
    # Within the grace period (the keeper is about to start) the lock holds.
    with pytest.raises(r.RepositoryError, match="another backup of this cluster"):
        r.acquire_lock(repo, "42", "20261129T101600Z")
    # Past it, only a living holder of the flock (the session keeper) keeps it.
    holder = os.open(path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_SH)
    with pytest.raises(r.RepositoryError, match="its session keeper still holds the backup"):
        r.acquire_lock(repo, "42", "20261129T101600Z", grace=0)
    os.close(holder)
    make_backup(repo, "20261129T101650Z", "running")
    _, note = r.acquire_lock(repo, "42", "20261129T101650Z", grace=0)
    assert "no session keeper holds it" in note
    # The dead run's backup no longer claims to be running.
    with open(os.path.join(repo, "20261129T101500Z", "backup.json")) as f:
        dead = json.load(f)
    assert dead["status"] == "failed" and "the run died" in dead["error"]
    # The owner finished (or died and was marked failed): the lock is stale.
    make_backup(repo, "20261129T101700Z", "running")
    with open(os.path.join(repo, "20261129T101500Z", "backup.json"), "w") as f:
        json.dump({"status": "failed"}, f)
    with open(os.path.join(repo, "20261129T101650Z", "backup.json"), "w") as f:
        json.dump({"status": "failed"}, f)
    _, note = r.acquire_lock(repo, "42", "20261129T101700Z")
    assert "stale" in note and "is failed" in note
    assert r.release_lock(repo, "42", "20261129T101700Z") is True
    assert not os.path.exists(path)


def test_retention_keeps_newest_complete_and_never_running(tmp_path):
    repo = str(tmp_path)
    for bid, status in [
        ("20261101T000000Z", "complete"),
        ("20261102T000000Z", "failed"),
        ("20261103T000000Z", "complete"),
        ("20261104T000000Z", "complete"),
        ("20261105T000000Z", "running"),
    ]:
        make_backup(repo, bid, status)
    make_backup(repo, "20261100T000000Z", "complete", sysid="other")
    removed = r.retention(repo, 2, "1")
    assert sorted(removed) == ["20261101T000000Z", "20261102T000000Z"]
    assert sorted(os.listdir(repo)) == ["20261100T000000Z", "20261103T000000Z", "20261104T000000Z", "20261105T000000Z"]
    assert r.retention(repo, 0, "1") == []
    with pytest.raises(r.RepositoryError, match="system identifier"):
        r.retention(repo, 1, "")
