"""pg_archiving_info against real servers, through the real ansible-playbook."""

from __future__ import annotations

import os

import pytest
from harness.pg import PG_USER, Cluster, as_postgres, chown_pg

MODULE = "pgops.online_backup.pg_archiving_info"
PG15_CLIENT = "/usr/lib/postgresql/15/bin"
PASSWORD = "s3cret-Pw"


def task(name: str, cluster: Cluster, **params) -> dict:
    return {"name": name, MODULE: {**cluster.conn_vars(), **params}}


def as_role(cluster: Cluster, role: str) -> dict:
    # Non-postgres roles log in with scram over TCP (the harness's pg_hba.conf).
    return {
        "login_host": "127.0.0.1",
        "login_unix_socket": "",
        "port": cluster.port,
        "login_user": role,
        "login_password": PASSWORD,
    }


def play(tasks: list) -> list:
    return [{"hosts": "postgresql", "gather_facts": False, "tasks": tasks}]


def codes(result: dict) -> set:
    return {p["code"] for p in result["problems"]}


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

    tsdir = os.path.join(good.root, "ts")
    os.mkdir(tsdir)
    chown_pg(tsdir)
    good.sql(f"CREATE TABLESPACE fast LOCATION '{tsdir}'")
    # bob has nothing, carol may start and stop backups, dave may also switch WAL.
    good.sql(
        "SET password_encryption = 'scram-sha-256';"
        + "".join(f"CREATE ROLE {r} LOGIN PASSWORD '{PASSWORD}';" for r in ("bob", "carol", "dave"))
    )
    funcs = ["pg_backup_start(text, boolean)", "pg_backup_stop(boolean)"]
    if major < 15:
        funcs = ["pg_start_backup(text, boolean, boolean)", "pg_stop_backup(boolean, boolean)"]
    for role in ("carol", "dave"):
        good.sql("".join(f"GRANT EXECUTE ON FUNCTION {f} TO {role};" for f in funcs))
    good.sql("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO dave")
    link = tmp_path / "link-to-data"
    link.symlink_to(good.data, target_is_directory=True)

    run = playbook(
        play(
            [
                task("good", good, prove_timeout=30, destination=str(tmp_path / "backups" / "new")),
                {**task("good check mode", good), "check_mode": True},
                task("dest relative", good, prove=False, destination="backups"),
                task("dest in data", good, prove=False, destination=os.path.join(good.data, "backup")),
                task("dest via link", good, prove=False, destination=str(link / "backup")),
                task("dest in tablespace", good, prove=False, destination=os.path.join(tsdir, "x", "y")),
                task("dest too small", good, prove=False, destination=str(tmp_path), space_margin=1e9),
                {"name": "bob", MODULE: as_role(good, "bob")},
                {"name": "carol", MODULE: as_role(good, "carol")},
                {"name": "dave", MODULE: {**as_role(good, "dave"), "prove_timeout": 30}},
                task("off", off),
                {**task("off fails", off, fail_on_problems=True), "ignore_errors": True},
                task("empty", empty),
                task("false prove", failing, prove_timeout=30),
                task("false later", failing, prove=False),
                task("minimal", minimal),
            ]
        )
    )
    assert run.rc == 0, run

    r = run.task("good")
    assert r["ok"] is True and r["problems"] == [], r["problems"]
    assert r["changed"] is True
    proof = r["proof"]
    assert proof["performed"] and proof["switched"] and proof["archived"] and proof["outcome"] == "archived"
    assert os.path.exists(os.path.join(good.archive, proof["wal"])), proof
    assert r["server_version_num"] // 10000 == major and r["server_version"].startswith(str(major))
    assert (r["in_recovery"], r["wal_level"], r["archive_mode"]) == (False, "replica", "on")
    assert r["archive_command"].startswith("test ! -f") and r["full_page_writes"] is True
    assert r["archive_library"] == (None if major < 15 else "")
    assert r["archive_timeout"] == 0 and r["wal_segment_size"] == 16 * 1024 * 1024
    assert r["data_directory"] == good.data and r["ready_count"] == 0
    assert r["system_identifier"] == str(good.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    # archive_status/.done can beat the statistics (13's collector lags): check only what cannot lag.
    assert r["archiver"]["failed_count"] == 0
    assert [(t["name"], t["location"]) for t in r["tablespaces"]] == [("fast", tsdir)]
    assert r["database_size_bytes"] > 1_000_000 and r["expected_backup_bytes"] >= r["database_size_bytes"]
    privs = r["privileges"]
    assert privs["superuser"] and privs["can_start_backup"] and privs["can_switch_wal"] and privs["can_read_data_directory"]
    assert r["destination"]["free_bytes"] > r["destination"]["required_bytes"] > 0

    r = run.task("good check mode")
    assert r["changed"] is False and r["ok"] is True
    assert r["proof"]["performed"] is False and "check mode" in r["proof"]["skipped_reason"]

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
    for f in [*funcs, "pg_switch_wal()"]:
        assert f'GRANT EXECUTE ON FUNCTION {f} TO "bob";' in hint
    assert r["privileges"] == {
        "role": "bob", "superuser": False, "can_start_backup": False, "can_switch_wal": False,
        "can_read_data_directory": False, "can_read_archive_status": False,
    }  # fmt: skip
    assert r["data_directory"] is None and r["ready_count"] is None and r["changed"] is False
    r = run.task("carol")
    assert codes(r) == {"cannot_switch_wal"} and 'pg_switch_wal() TO "carol"' in r["problems"][0]["hint"]
    r = run.task("dave")
    assert r["ok"] is True and r["proof"]["archived"] is True and r["changed"] is True, r["problems"]

    r = run.task("off")
    assert codes(r) == {"archive_mode_off"} and "restart" in r["problems"][0]["hint"]
    assert r["changed"] is False and r["proof"]["performed"] is False
    r = run.task("off fails")
    assert [e["status"] for e in run.results if e["task"] == "off fails"] == ["failed"]
    assert r["wal_level"] == "replica" and r["ok"] is False and codes(r) == {"archive_mode_off"}
    assert "archive_mode_off: archive_mode is off" in r["msg"] and "restart PostgreSQL" in r["msg"]

    r = run.task("empty")
    assert codes(r) == {"archive_command_empty"}
    assert "pg_reload_conf()" in r["problems"][0]["hint"] and "no restart" in r["problems"][0]["hint"]

    r = run.task("false prove")
    assert codes(r) == {"archive_proof_failed"}, r["problems"]
    # Fail fast on the archiver's report, long before prove_timeout.
    assert r["proof"]["outcome"] == "failed" and r["proof"]["seconds"] < 15 and r["changed"] is True
    assert r["proof"]["wal"] in r["problems"][0]["message"]
    r = run.task("false later")
    assert codes(r) == {"archiver_failing"} and r["changed"] is False
    assert r["archiver"]["last_failed_wal"] in r["problems"][0]["message"]

    r = run.task("minimal")
    assert codes(r) == {"wal_level_minimal", "archive_mode_off"}
    assert "wal_level = replica" in r["problems"][0]["hint"] and r["changed"] is False

    for c in (good, off, empty, failing, minimal):
        assert_nothing_started(c)


def test_standby_and_slow_archiver(make_cluster, playbook):
    primary = make_cluster(15)
    slow = make_cluster(15, archive_command="'sleep 5'")
    standby = Cluster(15, name="standby")
    try:
        as_postgres(
            [f"{PG15_CLIENT}/pg_basebackup", "-D", standby.data, "-R", "-X", "stream", "-c", "fast",
             "-h", "127.0.0.1", "-p", str(primary.port), "-U", PG_USER]
        )  # fmt: skip
        standby.set_conf(
            port=standby.port,
            unix_socket_directories=f"'{standby.sock}'",
            listen_addresses="'127.0.0.1'",
            # Its own archive: with archive_mode=always it archives what the primary archived too.
            archive_command=f"'test ! -f {standby.archive}/%f && cp %p {standby.archive}/%f'",
        )
        standby.start()
        standby.wait_ready()
        run = playbook(
            play(
                [
                    task("primary", primary, prove_timeout=30),
                    task("standby", standby, prove_timeout=30),
                    task("slow", slow, prove_timeout=1.5),
                ]
            )
        )
        assert run.rc == 0, run
        assert run.task("primary")["ok"] is True
        r = run.task("standby")
        assert codes(r) == {"standby_archive_mode_not_always"}, r["problems"]
        assert r["in_recovery"] is True and r["archive_mode"] == "on" and r["changed"] is False
        assert r["proof"]["performed"] is False and "standby" in r["proof"]["skipped_reason"]
        assert "archive_mode = 'always'" in r["problems"][0]["hint"]
        r = run.task("slow")
        assert codes(r) == {"archive_proof_timeout"}, r["problems"]
        assert r["proof"]["outcome"] == "timeout" and 1.5 <= r["proof"]["seconds"] < 5

        # The fix named in the hint makes the problem go away.
        standby.set_conf(archive_mode="always")
        standby.stop()
        standby.start()
        standby.wait_ready()
        run = playbook(play([task("standby always", standby)]))
        r = run.task("standby always")
        assert r["ok"] is True and r["archive_mode"] == "always" and r["changed"] is False, r["problems"]
        for c in (primary, standby):
            assert not c.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgops.online_backup%'")[0][0]
    finally:
        standby.destroy()
