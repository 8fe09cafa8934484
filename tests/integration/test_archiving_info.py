"""pg_archiving_info against real servers, through the real ansible-playbook: the facts,
how they are judged, and that the module is strictly read-only (no WAL switch, never changed).
The active proof is pg_archiving_check's (test_archiving_check.py)."""

from __future__ import annotations

import os
import time

import pytest
from harness.archiving import as_role, backup_roles, codes, current_wal, play
from harness.archiving import task as module_task
from harness.pg import Cluster, chown_pg, make_standby

MODULE = "pgops.online_backup.pg_archiving_info"
CHECK_MODULE = "pgops.online_backup.pg_archiving_check"


def task(name: str, cluster: Cluster, module: str = MODULE, **params) -> dict:
    return module_task(module, name, cluster, **params)


def archiver(c: Cluster) -> dict:
    row = c.sql("SELECT archived_count, failed_count, last_archived_wal FROM pg_stat_archiver")[0]
    return dict(zip(("archived_count", "failed_count", "last_archived_wal"), row))


def wait_for(what: str, probe, timeout: float = 30):
    """probe() until it returns something truthy (13's statistics collector lags)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def switch_and_settle(c: Cluster, failing: bool = False) -> str:
    """Test setup (not the module): finish the current segment by hand, wait until
    the archiver has archived it (or failed on it), and return its name."""
    before = archiver(c)
    c.sql("CREATE TABLE IF NOT EXISTS filler AS SELECT 1 AS x")  # the segment is not empty
    wal = current_wal(c)
    c.sql("SELECT pg_switch_wal()")
    key = "failed_count" if failing else "archived_count"
    wait_for(f"{wal} to be {'refused' if failing else 'archived'}", lambda: archiver(c)[key] > before[key])
    return wal


def assert_nothing_started(c: Cluster) -> None:
    """No session of ours is left and a backup can be started and stopped at once."""
    left = c.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgops.online_backup%'")[0][0]
    assert left == 0
    assert not os.path.exists(os.path.join(c.data, "backup_label"))
    if c.sql("SHOW wal_level")[0][0] == "minimal":
        return
    conn = c.connect()
    try:
        with conn.cursor() as cur:
            if c.major >= 15:
                cur.execute("SELECT pg_backup_start('after preflight', true)")
                cur.execute("SELECT lsn FROM pg_backup_stop(false)")
            else:
                cur.execute("SELECT pg_is_in_backup()")  # exclusive backups only
                assert cur.fetchone()[0] is False
                cur.execute("SELECT pg_start_backup('after preflight', true, false)")
                cur.execute("SELECT lsn FROM pg_stop_backup(false, false)")
    finally:
        conn.close()


@pytest.mark.parametrize("major", [13, 15, 18])
def test_good_and_bad_configurations(major, make_cluster, playbook, tmp_path):
    good = make_cluster(major)
    off = make_cluster(major, archive_mode="off")
    empty = make_cluster(major, archive_command="''")
    failing = make_cluster(major, archive_command="'/bin/false'")
    minimal = make_cluster(major, wal_level="minimal", archive_mode="off", max_wal_senders=0)
    # The archiver of "failing" has refused a segment before the module looks (no proof here).
    refused = switch_and_settle(failing, failing=True)

    tsdir = os.path.join(good.root, "ts")
    os.mkdir(tsdir)
    chown_pg(tsdir)
    good.sql(f"CREATE TABLESPACE fast LOCATION '{tsdir}'")
    funcs = backup_roles(good)
    link = tmp_path / "link-to-data"
    link.symlink_to(good.data, target_is_directory=True)
    wal_before = {c: current_wal(c) for c in (good, off, empty, failing)}

    run = playbook(
        play(
            [
                task("good", good, destination=str(tmp_path / "backups" / "new")),
                {**task("good check mode", good), "check_mode": True},
                task("dest relative", good, destination="backups"),
                task("dest in data", good, destination=os.path.join(good.data, "backup")),
                task("dest via link", good, destination=str(link / "backup")),
                task("dest in tablespace", good, destination=os.path.join(tsdir, "x", "y")),
                task("dest too small", good, destination=str(tmp_path), space_margin=1e9),
                {"name": "bob", MODULE: as_role(good, "bob")},
                {"name": "bob checks only", MODULE: {**as_role(good, "bob"), "require_privileges": False}},
                {"name": "carol", MODULE: as_role(good, "carol")},
                {"name": "dave", MODULE: as_role(good, "dave")},
                task("off", off),
                {**task("off fails", off, fail_on_problems=True), "ignore_errors": True},
                task("empty", empty),
                task("failing", failing),
                task("minimal", minimal),
            ]
        )
    )
    assert run.rc == 0, run
    # Read-only, whatever it found: no task reported a change or switched WAL.
    assert [e["task"] for e in run.results if e["result"].get("changed")] == []
    assert {c: current_wal(c) for c in wal_before} == wal_before

    r = run.task("good")
    assert r["ok"] is True and r["problems"] == [], r["problems"]
    assert r["changed"] is False
    proof = r["proof"]
    assert proof["performed"] is False and proof["switched"] is False and proof["outcome"] is None, proof
    assert "pg_archiving_check" in proof["skipped_reason"], proof
    assert r["server_version_num"] // 10000 == major and r["server_version"].startswith(str(major))
    assert (r["in_recovery"], r["wal_level"], r["archive_mode"]) == (False, "replica", "on")
    assert r["archive_command"].startswith("test ! -f") and r["full_page_writes"] is True
    assert r["archive_library"] == (None if major < 15 else "")
    assert r["archive_timeout"] == 0 and r["wal_segment_size"] == 16 * 1024 * 1024
    assert r["data_directory"] == good.data and r["ready_count"] == 0
    assert r["system_identifier"] == str(good.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    assert r["archiver"]["failed_count"] == 0 and r["archiver"]["last_failed_wal"] is None
    assert [(t["name"], t["location"]) for t in r["tablespaces"]] == [("fast", tsdir)]
    assert r["database_size_bytes"] > 1_000_000 and r["expected_backup_bytes"] >= r["database_size_bytes"]
    privs = r["privileges"]
    assert privs["superuser"] and privs["can_start_backup"] and privs["can_switch_wal"] and privs["can_read_data_directory"]
    assert r["destination"]["free_bytes"] > r["destination"]["required_bytes"] > 0
    assert not (tmp_path / "backups").exists()  # the destination is looked at, not created

    r = run.task("good check mode")
    assert r["changed"] is False and r["ok"] is True
    assert r["proof"]["performed"] is False and "pg_archiving_check" in r["proof"]["skipped_reason"]

    assert codes(run.task("dest relative")) == {"destination_not_absolute"}
    assert codes(run.task("dest in data")) == {"destination_inside_data_directory"}
    assert codes(run.task("dest via link")) == {"destination_inside_data_directory"}
    r = run.task("dest in tablespace")
    assert codes(r) == {"destination_inside_tablespace"} and "fast" in r["problems"][0]["message"]
    r = run.task("dest too small")
    assert codes(r) == {"destination_insufficient_space"} and r["problems"][0]["message"].count(" MB") >= 2
    assert r["changed"] is False

    r = run.task("bob")
    assert codes(r) == {"missing_backup_privilege"}, r["problems"]
    hint = r["problems"][0]["hint"]
    for f in funcs:
        assert f'GRANT EXECUTE ON FUNCTION {f} TO "bob";' in hint
    # Reading needs no WAL switch, so its grant is not asked for.
    assert "pg_switch_wal" not in hint and "pg_switch_wal" not in r["problems"][0]["message"]
    assert r["privileges"] == {
        "role": "bob", "superuser": False, "can_start_backup": False, "can_switch_wal": False,
        "can_read_data_directory": False, "can_read_archive_status": False,
    }  # fmt: skip
    assert r["data_directory"] is None and r["ready_count"] is None and r["changed"] is False
    r = run.task("bob checks only")
    assert r["ok"] is True and r["problems"] == [] and r["privileges"]["can_start_backup"] is False
    # carol may not switch WAL, which only the proof needs.
    r = run.task("carol")
    assert r["ok"] is True and r["problems"] == [] and r["privileges"]["can_switch_wal"] is False, r["problems"]
    assert r["privileges"]["can_start_backup"] is True and r["proof"]["performed"] is False
    r = run.task("dave")
    assert r["ok"] is True and r["privileges"]["can_switch_wal"] is True and r["changed"] is False, r["problems"]
    assert r["proof"]["performed"] is False

    r = run.task("off")
    assert codes(r) == {"archive_mode_off"} and "restart" in r["problems"][0]["hint"]
    assert r["changed"] is False and r["proof"]["performed"] is False
    r = run.task("off fails")
    assert [e["status"] for e in run.results if e["task"] == "off fails"] == ["failed"]
    assert r["wal_level"] == "replica" and r["ok"] is False and codes(r) == {"archive_mode_off"}
    assert "archive_mode_off: archive_mode is off" in r["msg"] and "restart PostgreSQL" in r["msg"]
    assert r["changed"] is False

    r = run.task("empty")
    assert codes(r) == {"archive_command_empty"}
    assert "pg_reload_conf()" in r["problems"][0]["hint"] and "no restart" in r["problems"][0]["hint"]

    r = run.task("failing")
    assert codes(r) == {"archiver_failing"} and r["changed"] is False, r["problems"]
    assert r["archiver"]["last_failed_wal"] == refused and refused in r["problems"][0]["message"]
    assert r["proof"]["performed"] is False

    r = run.task("minimal")
    assert codes(r) == {"wal_level_minimal", "archive_mode_off"}
    assert "wal_level = replica" in r["problems"][0]["hint"] and r["changed"] is False

    for c in (good, off, empty, failing, minimal):
        assert_nothing_started(c)


@pytest.mark.parametrize("major", [13, 15, 18])
def test_it_never_switches_wal_and_refuses_prove(major, make_cluster, playbook):
    c = make_cluster(major)
    switch_and_settle(c)  # the archiver is idle and its statistics are current
    c.sql("INSERT INTO filler SELECT generate_series(1, 1000)")  # a switch now would finish this segment
    wal, stats = current_wal(c), archiver(c)
    archive = sorted(os.listdir(c.archive))

    run = playbook(
        play(
            [
                task("read", c),
                task("read again, failing on problems", c, fail_on_problems=True),
                {**task("prove", c, prove=True), "ignore_errors": True},
                {**task("prove_timeout", c, prove_timeout=5), "ignore_errors": True},
            ]
        )
    )
    assert run.rc == 0, run
    for name in ("read", "read again, failing on problems"):
        r = run.task(name)
        assert r["changed"] is False and r["ok"] is True, r
        assert r["proof"]["performed"] is False and r["proof"]["switched"] is False
        assert "pg_archiving_check" in r["proof"]["skipped_reason"]
        assert r["archiver"]["failed_count"] == 0
    for option in ("prove", "prove_timeout"):
        assert [e["status"] for e in run.results if e["task"] == option] == ["failed"]
        r = run.task(option)
        assert "Unsupported parameters" in r["msg"] and option in r["msg"], r["msg"]
        assert "problems" not in r  # refused before it looked at the server

    # No WAL switch: the same segment is being written and nothing more was archived.
    assert current_wal(c) == wal
    time.sleep(1)  # time enough for the archiver to archive a segment a switch would have finished
    assert archiver(c) == stats and sorted(os.listdir(c.archive)) == archive

    # Control: the same observations do see the WAL switch pg_archiving_check makes.
    run = playbook(play([task("check", c, module=CHECK_MODULE, prove_timeout=30)]))
    assert run.rc == 0, run
    r = run.task("check")
    assert r["changed"] is True and r["proof"]["switched"] is True and r["proof"]["wal"] == wal, r["proof"]
    assert current_wal(c) > wal
    wait_for("the proof segment in pg_stat_archiver", lambda: archiver(c)["archived_count"] > stats["archived_count"])
    assert wal in os.listdir(c.archive)
    assert_nothing_started(c)


def test_standby_settings(make_cluster, playbook):
    primary = make_cluster(15)
    standby = None
    try:
        standby = make_standby(primary, own_archive=True)
        primary_wal = current_wal(primary)
        run = playbook(play([task("primary", primary), task("standby", standby)]))
        assert run.rc == 0, run
        r = run.task("primary")
        assert r["ok"] is True and r["in_recovery"] is False and r["changed"] is False
        r = run.task("standby")
        assert codes(r) == {"standby_archive_mode_not_always"}, r["problems"]
        assert r["in_recovery"] is True and r["archive_mode"] == "on" and r["changed"] is False
        assert r["proof"]["performed"] is False
        assert "archive_mode = 'always'" in r["problems"][0]["hint"]
        assert r["system_identifier"] == run.task("primary")["system_identifier"]

        # The fix named in the hint makes the problem go away.
        standby.set_conf(archive_mode="always")
        standby.stop()
        standby.start()
        standby.wait_ready()
        run = playbook(play([task("standby always", standby)]))
        r = run.task("standby always")
        assert r["ok"] is True and r["archive_mode"] == "always" and r["changed"] is False, r["problems"]
        assert current_wal(primary) == primary_wal
        for c in (primary, standby):
            assert not c.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgops.online_backup%'")[0][0]
    finally:
        if standby is not None:
            standby.destroy()


def test_the_postgresql_action_group_takes_the_connection_from_module_defaults(make_cluster, playbook):
    """meta/runtime.yml's group: one module_defaults entry gives every module that connects to PostgreSQL
    its connection, as with community.postgresql's group."""
    c = make_cluster(15)
    tasks = [
        {"name": "read", "pgops.online_backup.pg_archiving_info": {}},
        {"name": "check", "pgops.online_backup.pg_archiving_check": {"prove_timeout": 30}},
        {"name": "config", "pgops.online_backup.pg_archiving_config": {"settings": {"archive_mode": "on"}}},
    ]
    defaults = {"group/pgops.online_backup.postgresql": c.conn_vars()}
    run = playbook([{"hosts": "postgresql", "gather_facts": False, "module_defaults": defaults, "tasks": tasks}])
    assert run.rc == 0, run
    assert run.task("read")["ok"] is True and run.task("read")["changed"] is False
    assert run.task("check")["proof"]["archived"] is True
    assert run.task("config")["changed"] is False  # archive_mode is on already: nothing to set
    # Control: without the defaults the same modules connect to the default socket and port, where nothing listens.
    run = playbook(play([{**tasks[0], "ignore_errors": True}]))
    assert [e["status"] for e in run.results if e["task"] == "read"] == ["failed"], run
