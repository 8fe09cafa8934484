"""The backup catalog (backup.json files of a repository), without a server."""

from __future__ import annotations

import importlib
import json
import os
import stat
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
cat = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._catalog")


def add_backup(repo, bid: str, status: str | None = "complete", raw: str | None = None, **fields):
    d = repo / bid
    d.mkdir(parents=True)
    if raw is not None:
        (d / "backup.json").write_text(raw)
    elif status is not None:
        doc = {"schema": 1, "id": bid, "status": status, "method": "tar", **fields}
        (d / "backup.json").write_text(json.dumps(doc))
    (d / "base.tar").write_bytes(b"\0" * 10000)
    return d


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    add_backup(r, "20261128T101500Z", "failed", error="copy failed")
    add_backup(r, "20261129T101500Z", "complete", stop_lsn="0/3000100")
    add_backup(r, "20261129T101500Z-01", "complete", stop_lsn="0/5000100")
    add_backup(r, "20261130T101500Z", "running")
    add_backup(r, "20261130T111500Z", raw="{not json")
    add_backup(r, "20261201T000000Z", status=None)  # no backup.json: not a backup
    (r / ".locks").mkdir()
    (r / "README").write_text("not a backup")
    return r


def test_newest_first_and_latest_is_newest_complete(repo):
    entries = cat.read_catalog(str(repo))
    assert [e["id"] for e in entries] == [
        "20261130T111500Z",
        "20261130T101500Z",
        "20261129T101500Z-01",
        "20261129T101500Z",
        "20261128T101500Z",
    ]
    assert entries[0]["status"] == cat.INVALID and "not a JSON object" in entries[0]["error"]
    assert cat.latest(entries)["id"] == "20261129T101500Z-01"
    e = entries[2]
    assert e["path"] == str(repo / "20261129T101500Z-01")
    assert e["stop_lsn"] == "0/5000100"
    assert e["size_on_disk"] >= 10000


def test_select(repo):
    entries = cat.read_catalog(str(repo), size=False)
    assert "size_on_disk" not in entries[0]
    assert cat.select(entries, "latest")["id"] == "20261129T101500Z-01"
    assert cat.select(entries, "20261129T101500Z")["stop_lsn"] == "0/3000100"
    with pytest.raises(cat.CatalogError, match="20261130T101500Z is not complete \\(status: running\\)"):
        cat.select(entries, "20261130T101500Z")
    with pytest.raises(cat.CatalogError, match="not complete \\(status: invalid\\)"):
        cat.select(entries, "20261130T111500Z")
    with pytest.raises(cat.CatalogError, match="20990101T000000Z not found"):
        cat.select(entries, "20990101T000000Z")


def test_latest_never_trusts_incomplete(tmp_path):
    repo = tmp_path / "r"
    add_backup(repo, "20261129T101500Z", "running")
    add_backup(repo, "20261130T101500Z", "failed")
    entries = cat.read_catalog(str(repo))
    assert cat.latest(entries) is None
    with pytest.raises(cat.CatalogError, match="no complete backup"):
        cat.select(entries, "latest")


def test_filter_status(repo):
    entries = cat.read_catalog(str(repo), size=False)
    assert [e["id"] for e in cat.filter_status(entries, ["failed", "running"])] == ["20261130T101500Z", "20261128T101500Z"]
    assert cat.filter_status(entries, None) == entries


def test_missing_repository(tmp_path):
    with pytest.raises(cat.CatalogError, match="does not exist"):
        cat.read_catalog(str(tmp_path / "nope"))
    assert cat.read_catalog(str(tmp_path)) == []


def test_id_falls_back_to_directory_name(tmp_path):
    add_backup(tmp_path, "20261129T101500Z", raw='{"status": "complete"}')
    assert cat.read_catalog(str(tmp_path))[0]["id"] == "20261129T101500Z"


def test_update_backup_json_is_atomic_and_private(repo):
    d = repo / "20261129T101500Z"
    doc = cat.update_backup_json(str(d), verification={"verified": True, "problems_count": 0})
    assert doc["verification"]["verified"] is True and doc["stop_lsn"] == "0/3000100"
    on_disk = json.loads((d / "backup.json").read_text())
    assert on_disk == doc
    assert stat.S_IMODE(os.stat(d / "backup.json").st_mode) == 0o600
    assert not [n for n in os.listdir(d) if ".tmp." in n]
    cat.update_backup_json(str(d / "backup.json"), drill={"passed": False})
    assert json.loads((d / "backup.json").read_text())["drill"] == {"passed": False}


def test_update_backup_json_refuses_missing_or_invalid(repo):
    with pytest.raises(cat.CatalogError, match="does not exist"):
        cat.update_backup_json(str(repo / "20261201T000000Z"), x=1)
    with pytest.raises(cat.CatalogError, match="not a JSON object"):
        cat.update_backup_json(str(repo / "20261130T111500Z"), x=1)
    assert (repo / "20261130T111500Z" / "backup.json").read_text() == "{not json"


def test_update_backup_json_keeps_the_owner(repo):
    assert os.geteuid() == 0, "the test suite runs as root (scripts/test.sh): it needs to own files as another user"
    d = repo / "20261129T101500Z"
    os.chown(d / "backup.json", 65534, 65534)
    cat.update_backup_json(str(d), x=1)
    st = os.stat(d / "backup.json")
    assert (st.st_uid, st.st_gid) == (65534, 65534)
