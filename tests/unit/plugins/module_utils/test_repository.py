"""The repository without a server: its path, the per-cluster lock and the
sessions it names, the catalog of backup.json files, one backup's record from
running to complete or failed, and retention."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import stat
import sys
import time

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
r = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._repository")
layout = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._layout")

CLUSTER = "7441234567890123456"
HOUR = 3600


def status_of(repo, bid: str):
    return (layout.read_backup(os.path.join(str(repo), bid)) or {}).get("status")


def iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()


def age(path, seconds: float) -> None:
    """Make a file or a backup directory (and what is in it) look untouched for this long."""
    when = time.time() - seconds
    paths = [path] + ([os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [])
    for p in paths:
        os.utime(p, (when, when))


# -- the repository itself


def test_validate_repository(tmp_path):
    assert "absolute" in r.validate_repository("rel/x", [])
    data = tmp_path / "data"
    data.mkdir()
    assert "inside" in r.validate_repository(str(data / "b"), [str(data)])
    link = tmp_path / "link"
    link.symlink_to(data)
    assert "inside" in r.validate_repository(str(link / "b"), [str(data)])
    assert r.validate_repository(str(tmp_path / "datax"), [str(data)]) is None


def test_ensure_repository_creates_only_the_repository(tmp_path):
    with pytest.raises(r.RepositoryError, match="parent directory .*/typo of repository .* does not exist"):
        r.ensure_repository(str(tmp_path / "typo" / "repo"))
    assert not (tmp_path / "typo").exists()
    old = os.umask(0)
    try:
        r.ensure_repository(str(tmp_path / "repo"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "repo").st_mode) == 0o700
    # An existing repository is left as it is.
    os.chmod(tmp_path / "repo", 0o750)
    r.ensure_repository(str(tmp_path / "repo") + "/")
    assert stat.S_IMODE(os.stat(tmp_path / "repo").st_mode) == 0o750


# -- the lock


def test_lock_without_a_session_is_held_within_grace_and_breaks_after_it(tmp_path, add_backup):
    """A lock whose session has not started yet (nothing in the runtime directory) counts while
    its run shows signs of life; past lock_grace it is stale and its backup is marked failed."""
    repo, runtime = str(tmp_path / "repo"), str(tmp_path / "sessions")
    first = "20261129T101500Z"
    add_backup(repo, first, "running")
    path, note = r.acquire_lock(repo, CLUSTER, first, 120, {"id": first, "runtime_dir": runtime})
    assert note is None and os.path.exists(path) and path == r.lock_path(repo, CLUSTER)
    with open(path) as f:
        lock = json.load(f)
    assert lock["backup_id"] == first and lock["session"] == {"id": first, "runtime_dir": runtime}
    with pytest.raises(r.RepositoryError, match="another backup of this cluster into .* is running") as err:
        r.acquire_lock(repo, CLUSTER, "20261129T101600Z", 120, None)
    assert "its session has not started yet" in str(err.value) and first in str(err.value)
    # Untouched for longer than lock_grace (the lock, and the backup's own files).
    age(path, 200)
    age(os.path.join(repo, first), 200)
    live, why = r.lock_holder(repo, path, lock, 120)
    assert live is False and "not been touched for 2" in why
    # A backup file written recently keeps the lock even though the lock file itself is old.
    os.utime(os.path.join(repo, first, "base.tar"))
    assert r.lock_holder(repo, path, lock, 120)[0] is True
    age(os.path.join(repo, first), 200)
    second = "20261129T101600Z"
    add_backup(repo, second, "running")
    _, note = r.acquire_lock(repo, CLUSTER, second, 120, None)
    assert note.startswith(f"removed a stale lock {path}") and "no session holds it" in note
    dead = layout.read_backup(os.path.join(repo, first))
    assert dead["status"] == "failed" and "the run died before finishing" in dead["error"] and dead["failed_at"]
    assert not [n for n in os.listdir(os.path.dirname(path)) if n != os.path.basename(path)]  # no temporary lock left


FIRST = "20261129T101500Z"


@pytest.fixture
def session_lock(tmp_path, add_backup, write_session):
    """session_lock(keeper, grace) -> (repo, runtime dir, lock path): backup FIRST is running
    and holds the cluster's lock, which names its session; keeper is the session's (pid, starttime)."""

    def make(keeper, grace: float = HOUR):
        repo, runtime = str(tmp_path / "repo"), str(tmp_path / "sessions")
        add_backup(repo, FIRST, "running")
        write_session(runtime, FIRST, status="running", pid=keeper[0], pid_starttime=keeper[1])
        path, note = r.acquire_lock(repo, CLUSTER, FIRST, grace, {"id": FIRST, "runtime_dir": runtime})
        assert note is None
        return repo, runtime, path

    return make


def test_lock_of_a_dead_keeper_is_free_at_once(session_lock, add_backup, dead_process):
    repo, runtime, _ = session_lock(dead_process)
    # Well within the grace period: the session's keeper is gone, so nothing holds the lock.
    second = "20261129T101600Z"
    add_backup(repo, second, "running")
    path, note = r.acquire_lock(repo, CLUSTER, second, HOUR, {"id": second, "runtime_dir": runtime})
    pid = dead_process[0]
    assert f"its session keeper (pid {pid}) is gone" in note
    dead = layout.read_backup(os.path.join(repo, FIRST))
    assert dead["status"] == "failed" and f"pid {pid}) is gone" in dead["error"]
    with open(path) as f:
        assert json.load(f)["backup_id"] == second
    assert status_of(repo, second) == "running"


def test_lock_of_a_live_keeper_is_refused_and_says_how_to_end_it(session_lock, live_process):
    repo, _, path = session_lock(live_process, grace=0)
    age(path, 10 * HOUR)
    age(os.path.join(repo, FIRST), 10 * HOUR)
    # No grace needed, however old: the keeper runs.
    with pytest.raises(r.RepositoryError) as err:
        r.acquire_lock(repo, CLUSTER, "20261129T101600Z", 0, None)
    msg = str(err.value)
    assert f"its keeper (pid {live_process[0]}) is running" in msg
    assert "pgops.online_backup.pg_backup_session_info" in msg and f"session_id={FIRST}" in msg
    assert status_of(repo, FIRST) == "running"


def test_lock_of_a_stopped_session(session_lock, write_session, live_process):
    """Stopped, the session still holds the lock while its stop task waits for the archive,
    and for lock_grace after it delivered the label (the run is completing the record)."""
    repo, runtime, path = session_lock(live_process, grace=60)
    with open(path) as f:
        lock = json.load(f)
    pid, starttime = live_process
    write_session(runtime, FIRST, status="stopped", archive_wait={"pid": pid, "pid_starttime": starttime})
    assert r.lock_holder(repo, path, lock, 60) == (True, "its stop task waits for the WAL archive")
    now = time.time()
    write_session(runtime, FIRST, status="stopped", delivered=True, delivered_at=iso(now - 30))
    assert r.lock_holder(repo, path, lock, 60, now=now)[0] is True
    assert r.lock_holder(repo, path, lock, 20, now=now)[0] is False


def test_lock_of_another_host_is_trusted_for_a_day_after_its_last_sign_of_life(tmp_path, add_backup):
    repo = str(tmp_path / "repo")
    bid = "20261129T101500Z"
    add_backup(repo, bid, "running")
    path, _ = r.acquire_lock(repo, CLUSTER, bid, 0, {"id": bid, "runtime_dir": str(tmp_path / "sessions")})
    lock = {"backup_id": bid, "host": "elsewhere.example", "session": {"id": bid, "runtime_dir": str(tmp_path)}}
    backup = os.path.join(repo, bid)
    age(backup, 30 * HOUR)
    age(path, 23 * HOUR)
    live, why = r.lock_holder(repo, path, lock, 0)
    assert live is True and "another host" in why
    age(path, 25 * HOUR)
    assert r.lock_holder(repo, path, lock, 0)[0] is False
    # A copy that runs longer than a day keeps writing its archive: the lock holds while it does.
    with open(os.path.join(backup, "base.tar.zst.partial"), "wb") as f:
        f.write(b"x")
    age(backup, HOUR)  # the directory and what is in it, the new archive too
    live, why = r.lock_holder(repo, path, lock, 0)
    assert live is True and "last written 3600s ago" in why, why
    age(backup, 25 * HOUR)
    assert r.lock_holder(repo, path, lock, 0)[0] is False
    # The same for a lock that names no session (the run's session is not on this host).
    assert r.lock_holder(repo, path, dict(lock, host=socket.gethostname(), session={}), 0)[0] is False
    age(path, HOUR)
    assert r.lock_holder(repo, path, dict(lock, host=socket.gethostname(), session={}), 0)[0] is True


def test_a_stale_lock_is_removed_only_while_it_is_still_the_one_judged(tmp_path):
    """Two runs judge the same stale lock: the first replaces it with its own; the second must not then
    delete that fresh lock (both would hold it). delete_if moves the lock aside atomically and puts it
    back when it is not the one judged."""
    st = r.open_storage(str(tmp_path))
    stale = {"backup_id": "20261129T101500Z", "host": "h"}
    fresh = {"backup_id": "20261129T101700Z", "host": "h"}
    assert st.claim(".locks/c.lock", stale)
    assert st.delete_if(".locks/c.lock", stale) is True and st.read_json(".locks/c.lock") is None
    assert st.claim(".locks/c.lock", fresh)
    assert st.delete_if(".locks/c.lock", stale) is False
    assert st.read_json(".locks/c.lock") == fresh
    assert sorted(os.listdir(tmp_path / ".locks")) == ["c.lock"]  # nothing left aside
    assert st.delete_if(".locks/missing.lock", stale) is True


def test_lock_of_a_finished_backup_is_stale(session_lock, live_process):
    repo, _, _ = session_lock(live_process)
    layout.update_backup(os.path.join(repo, FIRST), status="failed")
    second = "20261129T101700Z"
    _, note = r.acquire_lock(repo, CLUSTER, second, HOUR, None)
    assert "stale" in note and f"its backup {FIRST} is failed" in note
    assert r.release_lock(repo, CLUSTER, FIRST) is False  # not its lock any more
    assert r.release_lock(repo, CLUSTER, second) is True
    assert not os.path.exists(r.lock_path(repo, CLUSTER))
    assert r.release_lock(repo, CLUSTER, second) is False


def test_locks_are_per_cluster_with_a_safe_name(tmp_path):
    repo = str(tmp_path)
    assert os.path.dirname(r.lock_path(repo, "../../etc/x")) == os.path.join(repo, ".locks")
    a, _ = r.acquire_lock(repo, "111", "20261129T101500Z", HOUR, None)
    b, _ = r.acquire_lock(repo, "222", "20261129T101500Z", HOUR, None)
    assert a != b
    assert stat.S_IMODE(os.stat(tmp_path / ".locks").st_mode) == 0o700


# -- the catalog


@pytest.fixture
def repo(tmp_path, add_backup):
    r_ = tmp_path / "repo"
    add_backup(r_, "20261128T101500Z", "failed", error="copy failed")
    add_backup(r_, "20261129T101500Z", "complete", stop_lsn="0/3000100")
    add_backup(r_, "20261129T101500Z-01", "complete", stop_lsn="0/5000100")
    add_backup(r_, "20261130T101500Z", "running")
    add_backup(r_, "20261130T111500Z", raw="{not json")
    add_backup(r_, "20261201T000000Z", status=None)  # no backup.json: not a backup
    (r_ / ".locks").mkdir()
    (r_ / "README").write_text("not a backup")
    return r_


def test_newest_first_and_latest_is_newest_complete(repo):
    entries = r.read_catalog(str(repo), size=True)
    assert [e["id"] for e in entries] == [
        "20261130T111500Z",
        "20261130T101500Z",
        "20261129T101500Z-01",
        "20261129T101500Z",
        "20261128T101500Z",
    ]
    assert entries[0]["status"] == r.INVALID and "not a JSON object" in entries[0]["error"]
    assert r.latest(entries)["id"] == "20261129T101500Z-01"
    e = entries[2]
    assert e["path"] == str(repo / "20261129T101500Z-01")
    assert e["stop_lsn"] == "0/5000100"
    assert e["size_on_disk"] >= 10000


def test_select(repo):
    entries = r.read_catalog(str(repo))
    assert "size_on_disk" not in entries[0]
    assert r.select(entries, "latest")["id"] == "20261129T101500Z-01"
    assert r.select(entries, "20261129T101500Z")["stop_lsn"] == "0/3000100"
    with pytest.raises(r.RepositoryError, match="20261130T101500Z is not complete \\(status: running\\)"):
        r.select(entries, "20261130T101500Z")
    with pytest.raises(r.RepositoryError, match="not complete \\(status: invalid\\)"):
        r.select(entries, "20261130T111500Z")
    with pytest.raises(r.RepositoryError, match="20990101T000000Z not found"):
        r.select(entries, "20990101T000000Z")


def test_latest_never_trusts_incomplete(tmp_path, add_backup):
    repo = tmp_path / "r"
    add_backup(repo, "20261129T101500Z", "running")
    add_backup(repo, "20261130T101500Z", "failed")
    entries = r.read_catalog(str(repo))
    assert r.latest(entries) is None
    with pytest.raises(r.RepositoryError, match="no complete, trusted backup"):
        r.select(entries, "latest")


def test_latest_passes_over_a_backup_whose_newest_check_failed():
    good = {"id": "20261129T101500Z", "status": "complete", "drill": {"at": "2026-11-29T12:00:00Z", "result": "passed"}}
    failed_check = {"at": "2026-11-30T11:00:00Z", "verified": False}
    bad_verify = {"id": "20261130T101500Z", "status": "complete", "verification": failed_check}
    # A drill that failed, then a verification that passed later: the newest check decides.
    recovered = {
        "id": "20261201T101500Z", "status": "complete",
        "drill": {"at": "2026-12-01T11:00:00Z", "result": "failed", "error": "boom"},
        "verification": {"at": "2026-12-01T12:00:00Z", "verified": True},
    }  # fmt: skip
    skipped = []
    assert r.latest([good, bad_verify], skipped=skipped)["id"] == good["id"]
    assert skipped == [{"id": bad_verify["id"], "reason": r.distrust(bad_verify)}] and "verification" in skipped[0]["reason"]
    assert r.latest([good, bad_verify, recovered])["id"] == recovered["id"]
    assert r.latest([good, bad_verify], allow_unverified=True)["id"] == bad_verify["id"]
    with pytest.raises(r.RepositoryError, match="is known to be damaged"):
        r.select([good, bad_verify], bad_verify["id"])
    assert r.select([good, bad_verify], bad_verify["id"], allow_unverified=True) is bad_verify


def test_filter_status(repo):
    entries = r.read_catalog(str(repo), size=False)
    assert [e["id"] for e in r.filter_status(entries, ["failed", "running"])] == ["20261130T101500Z", "20261128T101500Z"]
    assert r.filter_status(entries, None) == entries


def test_missing_repository(tmp_path):
    with pytest.raises(r.RepositoryError, match="does not exist"):
        r.read_catalog(str(tmp_path / "nope"))
    assert r.read_catalog(str(tmp_path)) == []


def test_id_falls_back_to_directory_name(tmp_path, add_backup):
    add_backup(tmp_path, "20261129T101500Z", raw='{"status": "complete"}')
    assert r.read_catalog(str(tmp_path))[0]["id"] == "20261129T101500Z"


def test_read_entry(repo):
    assert r.read_entry(str(repo), "20261201T000000Z") is None
    assert r.read_entry(str(repo) + "/", "20261129T101500Z")["id"] == "20261129T101500Z"
    assert r.read_entry(str(repo), "20261130T111500Z")["status"] == r.INVALID


def test_catalog_skips_links_and_hidden_directories(tmp_path, add_backup):
    repo = tmp_path / "repo"
    elsewhere = add_backup(tmp_path / "other", "20261129T101500Z")
    add_backup(repo, ".20261130T101500Z.tmp")
    repo.mkdir(exist_ok=True)
    os.symlink(elsewhere, repo / "20261129T101500Z")
    assert r.read_catalog(str(repo)) == []


# -- one backup's record


def test_open_backup_takes_the_lock_and_records_running(tmp_path):
    repo, runtime = str(tmp_path / "repo"), str(tmp_path / "sessions")
    warnings = []
    fields = {"label": "nightly", "method": "tar", "status": "complete", "id": "forged", "completed_at": "x"}
    out = r.open_backup(repo, CLUSTER, fields, 120, runtime, warnings.append)
    bid = out["backup_id"]
    assert layout.valid_backup_id(bid) and out["path"] == os.path.join(repo, bid)
    info = layout.read_backup(out["path"])
    assert info == out["backup"]
    # The caller's fields are recorded, never over what this file alone sets.
    assert (info["status"], info["id"], info["label"], info["system_identifier"]) == ("running", bid, "nightly", CLUSTER)
    assert "completed_at" not in info
    sid = out["session_id"]
    assert sid.startswith(bid + "-") and len(sid) == len(bid) + 9 and info["session_id"] == sid
    with open(out["lock"]) as f:
        assert json.load(f)["session"] == {"id": sid, "runtime_dir": runtime}
    # Two clusters backed up in the same second get two sessions (one host's sessions directory is shared).
    assert r.open_backup(str(tmp_path / "repo2"), CLUSTER, {}, 120, runtime, warnings.append)["session_id"] != sid
    assert warnings == []
    # Without a local session the lock names none.
    other = r.open_backup(repo, "other", {}, 120, None, warnings.append)
    with open(other["lock"]) as f:
        assert json.load(f)["session"] == {}


def test_open_backup_that_loses_the_lock_leaves_no_directory(tmp_path, add_backup):
    repo = str(tmp_path / "repo")
    holder = "20261129T101500Z"
    add_backup(repo, holder, "running")
    r.acquire_lock(repo, CLUSTER, holder, HOUR, None)
    before = sorted(os.listdir(repo))
    with pytest.raises(r.RepositoryError, match="another backup of this cluster"):
        r.open_backup(repo, CLUSTER, {}, HOUR, None, lambda msg: None)
    assert sorted(os.listdir(repo)) == before
    assert sorted(os.listdir(os.path.join(repo, ".locks"))) == [os.path.basename(r.lock_path(repo, CLUSTER))]


def test_open_backup_warns_about_a_broken_stale_lock(tmp_path, add_backup, write_session, dead_process):
    repo, runtime = str(tmp_path / "repo"), str(tmp_path / "sessions")
    holder = "20261129T101500Z"
    add_backup(repo, holder, "running")
    write_session(runtime, holder, status="starting", pid=dead_process[0], pid_starttime=dead_process[1])
    r.acquire_lock(repo, CLUSTER, holder, HOUR, {"id": holder, "runtime_dir": runtime})
    warnings = []
    out = r.open_backup(repo, CLUSTER, {}, HOUR, runtime, warnings.append)
    assert len(warnings) == 1 and "removed a stale lock" in warnings[0]
    assert status_of(repo, holder) == "failed" and status_of(repo, out["backup_id"]) == "running"


def test_complete_backup(tmp_path):
    repo = str(tmp_path / "repo")
    opened = r.open_backup(repo, CLUSTER, {"method": "tar"}, 120, None, lambda msg: None)
    bid = opened["backup_id"]
    with open(os.path.join(opened["path"], "base.tar"), "wb") as f:
        f.write(os.urandom(20000))
    metrics = str(tmp_path / "backup.prom")
    warnings = []
    out = r.complete_backup(repo, bid, CLUSTER, {"stop_lsn": "0/3000100", "status": "failed"}, None, 0, warnings.append, metrics)
    assert warnings == []
    info = layout.read_backup(opened["path"])
    assert info["status"] == "complete" and info["stop_lsn"] == "0/3000100" and info["completed_at"]
    assert info["size_on_disk"] >= 20000 and info["manifest"] is None
    assert out["lock_released"] is True and not os.path.exists(opened["lock"])
    with open(metrics) as f:
        assert f'pgops_backup_complete_backups{{cluster="{CLUSTER}",repository="{repo}"}} 1' in f.read()


def test_complete_backup_refuses_a_backup_that_is_not_running(tmp_path, add_backup):
    repo = str(tmp_path / "repo")
    for bid, status in (("20261129T101500Z", "failed"), ("20261129T101600Z", "complete")):
        add_backup(repo, bid, status, system_identifier=CLUSTER)
        with pytest.raises(r.RepositoryError, match=f"backup {bid} is {status}, not running: it cannot be marked complete"):
            r.complete_backup(repo, bid, CLUSTER, {"x": 1}, None, 0, None)
        assert status_of(repo, bid) == status and "x" not in layout.read_backup(os.path.join(repo, bid))
    with pytest.raises(r.RepositoryError, match="no backup 20261129T101700Z"):
        r.complete_backup(repo, "20261129T101700Z", CLUSTER, {}, None, 0, None)
    with pytest.raises(layout.LayoutError, match="invalid backup id"):
        r.complete_backup(repo, "../x", CLUSTER, {}, None, 0, None)


def test_fail_backup_keeps_only_the_record(tmp_path):
    repo = str(tmp_path / "repo")
    opened = r.open_backup(repo, CLUSTER, {}, 120, None, lambda msg: None)
    os.makedirs(os.path.join(opened["path"], "data", "base"))
    with open(os.path.join(opened["path"], "base.tar"), "wb") as f:
        f.write(b"x")
    out = r.fail_backup(repo, opened["backup_id"], CLUSTER, "copy failed", False, {"status": "complete"})
    assert sorted(out["removed"]) == ["base.tar", "data"] and out["lock_released"] is True
    assert os.listdir(opened["path"]) == ["backup.json"]
    info = layout.read_backup(opened["path"])
    assert (info["status"], info["error"]) == ("failed", "copy failed") and info["failed_at"]


def test_fail_backup_never_touches_a_complete_one(tmp_path, add_backup):
    repo = str(tmp_path / "repo")
    d = add_backup(repo, "20261129T101500Z", "complete")
    with pytest.raises(r.RepositoryError, match="is complete: refusing to mark it failed"):
        r.fail_backup(repo, "20261129T101500Z", CLUSTER, "oops", False)
    assert sorted(os.listdir(d)) == ["backup.json", "base.tar"] and status_of(repo, "20261129T101500Z") == "complete"
    kept = add_backup(repo, "20261129T101600Z", "running")
    out = r.fail_backup(repo, "20261129T101600Z", CLUSTER, "oops", True)
    assert out["removed"] == [] and "base.tar" in os.listdir(kept)


# -- retention


def test_retention_keeps_newest_complete_and_never_running(tmp_path, add_backup):
    repo = str(tmp_path)
    for bid, status in [
        ("20261101T000000Z", "complete"),
        ("20261102T000000Z", "failed"),
        ("20261103T000000Z", "complete"),
        ("20261104T000000Z", "complete"),
        ("20261105T000000Z", "running"),
    ]:
        add_backup(repo, bid, status, system_identifier="1")
    add_backup(repo, "20261100T000000Z", "complete", system_identifier="other")
    removed = r.retention(repo, "1", keep=2)["removed"]
    assert sorted(removed) == ["20261101T000000Z", "20261102T000000Z"]
    assert sorted(os.listdir(repo)) == ["20261100T000000Z", "20261103T000000Z", "20261104T000000Z", "20261105T000000Z"]
    assert r.retention(repo, "1")["removed"] == []  # no rule: everything stays
    with pytest.raises(r.RepositoryError, match="system identifier"):
        r.retention(repo, "", keep=1)


DAY = 86400
NOW = 1796169600.0  # 2026-12-02T00:00:00Z


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="seconds")


def _entry(bid: str, days_ago: float, status: str = "complete", **more) -> dict:
    return {"id": bid, "status": status, "system_identifier": "1", "stopped_at": _iso(NOW - days_ago * DAY), **more}


def test_a_recovery_window_keeps_the_backup_it_starts_from():
    entries = [
        _entry("20261201T000000Z", 1), _entry("20261128T000000Z", 4), _entry("20261125T000000Z", 7.5),
        _entry("20261120T000000Z", 12), _entry("20261115T000000Z", 17), _entry("20261110T000000Z", 22, "failed"),
        _entry("20261126T000000Z", 6, "running"),
    ]  # fmt: skip
    plan = r.plan_retention(entries, "1", keep_days=7, now=NOW)
    kept = [k["id"] for k in plan["keep"]]
    # Inside the window: 1 and 4 days; the newest before it (7.5 days) is the base for PITR to the window's start.
    assert kept == ["20261201T000000Z", "20261128T000000Z", "20261125T000000Z"], plan
    assert sorted(x["id"] for x in plan["remove"]) == ["20261110T000000Z", "20261115T000000Z", "20261120T000000Z"]
    assert "20261126T000000Z" not in kept + [x["id"] for x in plan["remove"]]  # running: never touched
    # Count and window together: a backup either rule keeps stays.
    both = r.plan_retention(entries, "1", keep=4, keep_days=7, now=NOW)
    assert [k["id"] for k in both["keep"]][-1] == "20261120T000000Z"
    # No rule: nothing goes, not even a failed backup older than every complete one.
    none = r.plan_retention(entries + [_entry("20261102T000000Z", 30, "failed")], "1", now=NOW)
    assert none["remove"] == [] and len(none["keep"]) == 5, none


def test_a_pinned_backup_and_the_newest_are_never_removed():
    entries = [_entry("20261201T000000Z", 1), _entry("20261101T000000Z", 31, pinned={"reason": "audit", "by": "dba"})]
    plan = r.plan_retention(entries, "1", keep=1, now=NOW)
    assert [k["id"] for k in plan["keep"]] == ["20261201T000000Z", "20261101T000000Z"]
    assert any("pinned (audit)" in reason for reason in plan["keep"][1]["reasons"])
    only = r.plan_retention([_entry("20261101T000000Z", 31)], "1", keep_days=7, now=NOW)
    assert [k["id"] for k in only["keep"]] == ["20261101T000000Z"]  # the newest complete backup, even outside the window


SEG = 16 << 20


def _wal(names: list) -> list:
    return [(n, layout.parse_stored_wal(n)[0], layout.parse_stored_wal(n)[1], NOW - 60) for n in names]


def test_coverage_names_each_gap_and_ends_the_window_at_the_first():
    files = _wal(
        [f"0000000100000000000000{i:02X}.zst" for i in range(2, 8)] + [f"0000000100000000000000{i:02X}.zst" for i in (9, 10)]
        + ["00000002.history.zst", "000000010000000000000003.00000028.backup.zst"]
    )  # fmt: skip
    seg = "0000000100000000000000"
    backups = [
        {"id": "b2", "start_wal": f"{seg}09", "stop_wal": f"{seg}0A", "stopped_at": _iso(NOW - 100)},
        {"id": "b1", "start_wal": f"{seg}03", "stop_wal": f"{seg}04", "stopped_at": _iso(NOW - 900)},
    ]
    report = r.coverage(backups, files, SEG)
    assert [b["wal_complete"] for b in report["backups"]] == [True, True]
    assert report["gaps"] == [{"after": "000000010000000000000007", "missing": ["000000010000000000000008"], "count": 1}]
    # From the oldest restorable backup's stop, as far as the segments run without a hole.
    assert report["window"]["from_backup"] == "b1" and report["window"]["end_wal"] == "000000010000000000000007"
    assert report["newest_segment"] == "00000001000000000000000A" and report["segments"] == 8
    broken = r.coverage([{**backups[1], "stop_wal": "000000010000000000000008"}], files, SEG)
    assert broken["backups"][0]["missing"] == ["000000010000000000000008"] and broken["window"] is None


def test_wal_expiry_keeps_history_and_what_the_oldest_kept_backup_needs():
    files = _wal(
        ["000000010000000000000001.zst", "000000010000000000000002.partial.zst", "000000010000000000000003.zst",
         "000000010000000000000003.00000028.backup.zst", "00000001.history", "000000020000000000000002.zst"]
    )  # fmt: skip
    assert r.plan_wal_expiry(files, "000000010000000000000003", SEG) == [
        "000000010000000000000001.zst", "000000010000000000000002.partial.zst", "000000020000000000000002.zst",
    ]  # fmt: skip


def test_wal_expiry_refuses_while_a_kept_backup_lacks_wal(tmp_path, add_backup):
    repo = str(tmp_path)
    for bid, start, stop in (("20261101T000000Z", "02", "03"), ("20261102T000000Z", "05", "06")):
        add_backup(repo, bid, "complete", system_identifier="1",
                   start_wal=f"0000000100000000000000{start}", stop_wal=f"0000000100000000000000{stop}")  # fmt: skip
    wal = tmp_path / "wal" / "1"
    wal.mkdir(parents=True)
    for i in (1, 2, 3, 5):  # 06, which the newer backup needs, is missing
        (wal / f"0000000100000000000000{i:02X}.zst").write_bytes(b"x")
    out = r.retention(repo, "1", keep=1)
    # The older backup is the only one whose WAL is all here: it stays, and so does every segment.
    assert out["removed"] == [] and out["wal_removed"] == []
    assert any("whose WAL is all archived here" in why for k in out["kept"] for why in k["reasons"]), out["kept"]
    assert "20261102T000000Z (missing 000000010000000000000006)" in out["wal_kept_because"]
    (wal / "000000010000000000000006.zst").write_bytes(b"x")
    out = r.retention(repo, "1", keep=1, dry_run=True)
    assert out["wal_removed"] == ["000000010000000000000001.zst", "000000010000000000000002.zst",
                                  "000000010000000000000003.zst"]  # fmt: skip
    assert len(os.listdir(wal)) == 5, "a dry run removes nothing"
    r.retention(repo, "1", keep=1)
    assert sorted(os.listdir(wal)) == ["000000010000000000000005.zst", "000000010000000000000006.zst"]


def test_wal_expiry_starts_at_the_lowest_start_of_what_is_kept(tmp_path, add_backup):
    """A newer backup on a timeline forked from the past (a point-in-time restore) starts before an
    older one: its WAL stays, whatever the ids' order."""
    repo = str(tmp_path)
    add_backup(repo, "20261101T000000Z", "complete", system_identifier="1",
               start_wal="00000001000000000000005A", stop_wal="00000001000000000000005B")  # fmt: skip
    add_backup(repo, "20261102T000000Z", "complete", system_identifier="1",
               start_wal="000000020000000000000037", stop_wal="000000020000000000000038")  # fmt: skip
    wal = tmp_path / "wal" / "1"
    wal.mkdir(parents=True)
    names = [f"00000001{0:08X}{i:08X}.zst" for i in range(0x30, 0x5C)]
    names += [f"00000002{0:08X}{i:08X}.zst" for i in range(0x32, 0x39)]
    for n in names + ["00000002.history"]:
        (wal / n).write_bytes(b"x")
    out = r.retention(repo, "1", keep=2)
    assert out["wal_kept_from"] == "000000020000000000000037", out
    assert out["wal_removed"] == sorted(n for n in names if int(n[16:24], 16) < 0x37)
    left = set(os.listdir(wal))
    assert {"000000020000000000000037.zst", "000000020000000000000038.zst", "00000001000000000000005A.zst"} <= left


def test_coverage_counts_only_the_backups_own_timeline_and_finds_long_gaps_at_once():
    files = _wal(["000000010000000000000005.zst", "000000020000000000000006.zst", "000000010000000000000007.zst"])
    report = r.coverage([_entry("20261101T000000Z", 1, start_wal="000000010000000000000005",
                                stop_wal="000000010000000000000006")], files, SEG)  # fmt: skip
    assert report["backups"][0]["missing"] == ["000000010000000000000006"]  # timeline 2's 06 is other WAL
    promoted = r.coverage([_entry("20261101T000000Z", 1, start_wal="000000010000000000000005",
                                  stop_wal="000000020000000000000006")], files, SEG)  # fmt: skip
    assert promoted["backups"][0]["wal_complete"], "a standby promoted during the backup stops on the next timeline"
    far = _wal(["000000010000000000000001.zst", "000000010000000100000000.zst"])  # 02 to FF missing: one hole
    (gap,) = r.coverage([], far, SEG)["gaps"]
    assert gap["count"] == 0xFE and gap["after"] == "000000010000000000000001" and len(gap["missing"]) == 20


def test_retention_never_keeps_a_damaged_backup_instead_of_a_good_one():
    failed_check = {"at": "2026-11-30T00:00:00+00:00", "verified": False, "problems_count": 2}
    entries = [
        _entry("20261201T000000Z", 1, verification=failed_check),
        _entry("20261130T000000Z", 2, verification=failed_check),
        _entry("20261129T000000Z", 3), _entry("20261128T000000Z", 4),
    ]  # fmt: skip
    plan = r.plan_retention(entries, "1", keep=2, now=NOW)
    kept = {k["id"]: k["reasons"] for k in plan["keep"]}
    assert "among the newest 2" in kept["20261129T000000Z"] and "among the newest 2" in kept["20261128T000000Z"]
    assert any("kept for inspection" in why for why in kept["20261201T000000Z"]), "the newest damaged one"
    assert [k["id"] for k in plan["keep"] if k["inspection_only"]] == ["20261201T000000Z"]
    assert [x["id"] for x in plan["remove"]] == ["20261130T000000Z"]
    assert plan["oldest_kept"]["id"] == "20261128T000000Z"
    older_damaged = [_entry("20261201T000000Z", 1), _entry("20261130T000000Z", 2, verification=failed_check)]
    (gone,) = r.plan_retention(older_damaged, "1", keep=1, now=NOW)["remove"]
    assert gone["id"] == "20261130T000000Z" and gone["reason"].startswith("known to be damaged")


def sort_newest(entries: list) -> list:
    return sorted(entries, key=lambda e: e["id"], reverse=True)


def test_retention_never_keeps_fewer_backups_because_some_are_damaged():
    """Damaged backups fill in where too few good ones are left: a damaged full backup (and so its whole
    chain) never leaves the cluster with nothing, and one old good backup does not make every damaged
    backup since then stay."""
    failed_drill = {"at": "2026-11-30T00:00:00+00:00", "result": "failed", "error": "scratch disk full"}
    all_damaged = [_entry(f"202611{d:02d}T000000Z", 30 - d, drill=failed_drill) for d in range(20, 30)]
    plan = r.plan_retention(all_damaged, "1", keep=7, now=NOW)
    assert [k["id"] for k in plan["keep"]] == [e["id"] for e in sort_newest(all_damaged)[:7]], plan["keep"]
    chain = [_entry("20261120T000000Z", 10, type="full", verification={"at": "2026-11-30T00:00:00+00:00", "verified": False})]
    chain += [_inc(f"202611{d:02d}T000000Z", 30 - d, f"202611{d - 1:02d}T000000Z") for d in range(21, 30)]
    kept = [k["id"] for k in r.plan_retention(chain, "1", keep=3, now=NOW)["keep"]]
    assert kept[:3] == ["20261129T000000Z", "20261128T000000Z", "20261127T000000Z"] and len(kept) == 10, "the chain stays whole"
    pinned_long_ago = [_entry("20251201T000000Z", 365, pinned={"reason": "audit"})]
    monthly = [_entry(f"2026{m:02d}01T000000Z", 30 * (12 - m), drill=failed_drill) for m in range(1, 13)]
    plan = r.plan_retention(pinned_long_ago + monthly, "1", keep=2, now=NOW)
    assert [k["id"] for k in plan["keep"]] == ["20261201T000000Z", "20251201T000000Z"], plan["keep"]
    assert len(plan["remove"]) == 11, "the damaged ones between go: only the newest is kept"


def _inc(bid: str, days_ago: float, parent: str, **more) -> dict:
    return _entry(bid, days_ago, type="incremental", parent=parent, **more)


def test_retention_keeps_every_parent_of_a_kept_incremental_and_removes_whole_chains():
    entries = [
        _inc("20261201T000000Z", 1, "20261130T000000Z"), _inc("20261130T000000Z", 2, "20261129T000000Z"),
        _entry("20261129T000000Z", 3, type="full"),
        _inc("20261128T000000Z", 4, "20261127T000000Z"), _entry("20261127T000000Z", 5, type="full"),
    ]  # fmt: skip
    plan = r.plan_retention(entries, "1", keep=1, now=NOW)
    assert [k["id"] for k in plan["keep"]] == ["20261201T000000Z", "20261130T000000Z", "20261129T000000Z"], plan
    assert any("parent of incremental backup 20261201T000000Z" in why for why in plan["keep"][1]["reasons"])
    assert sorted(x["id"] for x in plan["remove"]) == ["20261127T000000Z", "20261128T000000Z"]
    # The oldest kept backup (WAL expiry starts from it) is the chain's full backup.
    assert plan["oldest_kept"]["id"] == "20261129T000000Z"


def test_retention_keeps_the_parent_a_running_incremental_was_given():
    """Retention run from another play while an incremental is being taken: the parent recorded in its
    running record is kept (the backup would otherwise complete with its parent deleted)."""
    entries = [
        _entry("20261202T000000Z", 0, status="running", parent="20261129T000000Z"),
        _entry("20261201T000000Z", 1, type="full"), _entry("20261129T000000Z", 3, type="full"),
        _entry("20261128T000000Z", 4, type="full"),
    ]  # fmt: skip
    plan = r.plan_retention(entries, "1", keep=1, now=NOW)
    assert [k["id"] for k in plan["keep"]] == ["20261201T000000Z", "20261129T000000Z"], plan
    assert any("parent of running backup 20261202T000000Z" in why for why in plan["keep"][1]["reasons"])
    assert [x["id"] for x in plan["remove"]] == ["20261128T000000Z"]


def test_note_parent_records_it_in_the_running_backup_only(repo):
    repo = str(repo)
    st = r.open_storage(repo)
    bid = "20261202T000000Z"
    os.mkdir(os.path.join(repo, bid))
    st.write_backup(bid, {"id": bid, "status": "running", "system_identifier": "1"})
    assert r.note_parent(repo, bid, "20261201T000000Z")["parent"] == "20261201T000000Z"
    assert st.read_backup(bid)["parent"] == "20261201T000000Z"
    st.write_backup(bid, {"id": bid, "status": "complete", "system_identifier": "1"})
    with pytest.raises(r.RepositoryError, match="not running"):
        r.note_parent(repo, bid, "20261201T000000Z")


def test_choose_parent_is_the_newest_trusted_backup_taken_the_same_way():
    base = {"method": "tar", "pg_version": 170010, "start_lsn": "0/5000028", "timeline": 1, "manifest": {"files": 9}}
    newest = _entry("20261201T000000Z", 1, **base)
    parent, why = r.choose_parent([newest, _entry("20261130T000000Z", 2, **base)], "1", "tar", 170002)
    want = {"id": "20261201T000000Z", "start_lsn": "0/5000028", "timeline": 1, "type": "full", "started_at": None}
    assert why is None and parent == want
    assert r.choose_parent([], "1", "tar", 170002) == (
        None,
        "there is no complete, trusted backup of this cluster to be its parent",
    )
    assert "method tar, this one with rsync" in r.choose_parent([newest], "1", "rsync", 170002)[1]
    assert "PostgreSQL 170010" in r.choose_parent([newest], "1", "tar", 180000)[1]
    assert "no backup_manifest" in r.choose_parent([dict(newest, manifest=None)], "1", "tar", 170002)[1]
    # A damaged newest backup is passed over, as for a restore: the one before it is the parent.
    damaged = dict(newest, verification={"at": "2026-12-01T01:00:00+00:00", "verified": False})
    assert r.choose_parent([damaged, _entry("20261130T000000Z", 2, **base)], "1", "tar", 170002)[0]["id"] == "20261130T000000Z"
    assert r.choose_parent([_entry("20261201T000000Z", 1, system_identifier="2", **base)], "1", "tar", 170002)[0] is None
    # On 17+, a file-level incremental (taken with the module directly) cannot be a block-level one's parent.
    file_level = dict(newest, type="incremental", parent="20261130T000000Z", incremental={"mode": "file"})
    assert "file-level incremental" in r.choose_parent([file_level, _entry("20261130T000000Z", 2, **base)], "1", "tar", 170002)[1]
    sixteen = dict(file_level, pg_version=160010)
    assert r.choose_parent([sixteen, _entry("20261130T000000Z", 2, **base)], "1", "tar", 160002)[0]["id"] == newest["id"]


def test_latest_and_choose_parent_pass_over_a_backup_whose_chain_is_broken():
    """An incremental whose parent (or any earlier backup of its chain) is missing, not complete or known
    to be damaged cannot be restored: latest passes over it (a restore of "latest" starts from a usable
    backup instead of failing), and a new incremental does not chain onto it (it is a full backup or
    takes an older, sound parent)."""
    base = {"method": "tar", "pg_version": 170010, "start_lsn": "0/5000028", "timeline": 1, "manifest": {"files": 9}}
    full = _entry("20261201T000000Z", 1, type="full", **base)
    inc1 = _inc("20261202T000000Z", 1, full["id"], **base)
    inc2 = _inc("20261203T000000Z", 1, inc1["id"], **base)
    assert r.latest([inc2, inc1, full])["id"] == inc2["id"]
    damaged_full = dict(full, drill={"at": "2026-12-03T01:00:00+00:00", "result": "failed", "error": "boom"})
    skipped = []
    assert r.latest([inc2, inc1, damaged_full], skipped=skipped) is None
    assert [x["id"] for x in skipped] == [inc2["id"], inc1["id"], full["id"]]
    assert f"its parent {full['id']} is known to be damaged" in skipped[0]["reason"]
    assert r.latest([inc2, inc1, damaged_full], allow_unverified=True)["id"] == inc2["id"]
    older = _entry("20261130T000000Z", 1, type="full", **base)
    assert r.latest([inc2, dict(inc1, status="failed"), full, older])["id"] == full["id"]
    assert r.latest([inc2, full])["id"] == full["id"]  # inc1 is gone
    assert r.chain_problem({}, inc2) == f"its parent {inc1['id']} is not in the repository"
    # A file-level rsync incremental is a complete directory: it restores without its parent.
    rsync_file = dict(inc2, method="rsync", incremental={"mode": "file"})
    assert r.chain_problem({}, rsync_file) is None and r.latest([rsync_file])["id"] == inc2["id"]
    parent, why = r.choose_parent([inc2, inc1, damaged_full, older], "1", "tar", 170002)
    assert why is None and parent["id"] == older["id"]


def test_chain_of_lists_an_incrementals_parents_full_first_as_far_as_the_catalog_holds_them():
    full = {"id": "20261201T000000Z", "type": "full"}
    inc1 = {"id": "20261201T010000Z", "type": "incremental", "parent": full["id"]}
    inc2 = {"id": "20261201T020000Z", "type": "incremental", "parent": inc1["id"]}
    other = {"id": "20261201T030000Z", "type": "full"}
    entries = [other, inc2, inc1, full]
    assert r.chain_of(entries, inc2) == [full, inc1]
    assert r.chain_of(entries, inc1) == [full]
    assert r.chain_of(entries, full) == [] and r.chain_of(entries, other) == []
    # A parent the catalog lacks ends the chain there (the restore refuses it, naming it).
    assert r.chain_of([inc2, inc1], inc2) == [inc1]
    # A loop in a damaged catalog ends too.
    looped = {"id": "20261201T040000Z", "type": "incremental", "parent": "20261201T050000Z"}
    back = {"id": "20261201T050000Z", "type": "incremental", "parent": looped["id"]}
    assert r.chain_of([looped, back], looped) == [looped, back]


def test_a_backup_removal_that_fails_half_way_leaves_no_backup_listed(tmp_path, add_backup, monkeypatch):
    """The directory is set aside before it is removed: whatever stays behind is not a backup."""
    repo = str(tmp_path)
    add_backup(repo, "20261101T000000Z", "complete", system_identifier="1")
    storage = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._storage")

    def rmtree_that_fails(path, onerror=None, onexc=None):  # as a file the repository's owner may not unlink
        err = PermissionError(13, "Permission denied")
        if onexc:
            onexc(os.unlink, os.path.join(path, "base.tar"), err)
        else:
            onerror(os.unlink, os.path.join(path, "base.tar"), (PermissionError, err, None))

    monkeypatch.setattr(storage.shutil, "rmtree", rmtree_that_fails)
    with pytest.raises(storage.StorageError, match="was set aside as .*removing-20261101T000000Z.*Permission denied"):
        storage.open_storage(repo).delete_tree("20261101T000000Z")
    assert [e["id"] for e in r.read_catalog(repo)] == [], "a half-removed backup must not be listed"


def test_a_pin_preview_checks_what_the_pin_would_and_writes_nothing(tmp_path, add_backup):
    repo = str(tmp_path)
    add_backup(repo, "20261101T000000Z", "complete", system_identifier="1")
    add_backup(repo, "20261102T000000Z", "failed", system_identifier="1")
    before = (tmp_path / "20261101T000000Z" / "backup.json").read_bytes()
    changed, info = r.pin_backup(repo, "20261101T000000Z", True, "audit", dry_run=True)
    assert changed and info["pinned"]["reason"] == "audit"
    assert (tmp_path / "20261101T000000Z" / "backup.json").read_bytes() == before, "a preview writes nothing"
    with pytest.raises(r.RepositoryError, match="is failed: only a complete backup can be pinned"):
        r.pin_backup(repo, "20261102T000000Z", True, "audit", dry_run=True)
    with pytest.raises(r.RepositoryError, match="no backup 20261103T000000Z"):
        r.pin_backup(repo, "20261103T000000Z", True, "audit", dry_run=True)
    r.pin_backup(repo, "20261101T000000Z", True, "audit")
    assert r.pin_backup(repo, "20261101T000000Z", True, "legal hold", dry_run=True)[0], "a new reason is a change"


def test_a_backup_kept_for_inspection_holds_back_no_wal_expiry(tmp_path, add_backup):
    """Its drill failed because its WAL is missing: it stays to be looked at, but nothing restores from it,
    so its gap does not stop expiry of the WAL the good backups do not need."""
    repo = str(tmp_path)
    for bid, start, stop, more in (
        ("20261101T000000Z", "03", "04", {}),
        (
            "20261102T000000Z",
            "06",
            "07",
            {"drill": {"at": "2026-11-02T01:00:00+00:00", "result": "failed", "error": "missing 07"}},
        ),
        ("20261103T000000Z", "09", "0A", {}),
    ):
        add_backup(repo, bid, "complete", system_identifier="1", start_wal=f"0000000100000000000000{start}",
                   stop_wal=f"0000000100000000000000{stop}", **more)  # fmt: skip
    wal = tmp_path / "wal" / "1"
    wal.mkdir(parents=True)
    for i in (1, 2, 3, 4, 5, 6, 8, 9, 10):  # 07 is missing
        (wal / f"0000000100000000000000{i:02X}.zst").write_bytes(b"x")
    out = r.retention(repo, "1", keep=2)
    assert [k["id"] for k in out["kept"] if k["inspection_only"]] == ["20261102T000000Z"], out["kept"]
    assert out["wal_kept_because"] is None and out["wal_removed"] == [
        "000000010000000000000001.zst",
        "000000010000000000000002.zst",
    ]


def test_an_archive_that_moved_elsewhere_keeps_no_old_backup_forever(tmp_path, add_backup):
    """WAL stopped arriving here before the newer backups began (archive_command now points elsewhere):
    which backups are restorable is not known here, so no old backup is kept for its WAL."""
    repo = str(tmp_path)
    for bid, start, stop in (
        ("20261101T000000Z", "02", "03"),
        ("20261102T000000Z", "08", "09"),
        ("20261103T000000Z", "0C", "0D"),
    ):
        add_backup(repo, bid, "complete", system_identifier="1",
                   start_wal=f"0000000100000000000000{start}", stop_wal=f"0000000100000000000000{stop}")  # fmt: skip
    wal = tmp_path / "wal" / "1"
    wal.mkdir(parents=True)
    for i in (1, 2, 3, 4):
        (wal / f"0000000100000000000000{i:02X}.zst").write_bytes(b"x")
    assert r.retention(repo, "1", keep=2, dry_run=True)["removed"] == ["20261101T000000Z"]
