"""WAL archiving the collection owns: pgops-wal push/get against real servers and the
archiving, backup and restore playbooks together."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import time

import pytest
from harness.ansible import REPO
from harness.backup import BACKUP, backup_vars, backups
from harness.pg import make_pg_dir, pg_bin, stop_data_directory
from harness.wal import install_pgops_wal
from harness.workload import Writer, balances, pgbench_init, pgbench_start, pgbench_stop

ARCHIVING = os.path.join(REPO, "playbooks", "archiving.yml")
RESTORE = os.path.join(REPO, "playbooks", "restore.yml")


def archiving_vars(cluster, repo: str, program: dict, **extra) -> dict:
    v = {
        "pg_archiving_repository": repo,
        "pg_archiving_login_unix_socket": cluster.sock,
        "pg_archiving_port": cluster.port,
        "pg_archiving_restart": True,
        "pg_archiving_pg_ctl": os.path.join(pg_bin(cluster.major), "pg_ctl"),
        "pg_archiving_install_dir": program["install_dir"],
        "pg_archiving_program": program["program"],
    }
    v.update(extra)
    return v


def changed_tasks(run) -> list:
    return [r["task"] for r in run.results if r["result"].get("changed")]


@pytest.fixture
def program(tmp_path_factory):
    """Where the role installs pgops-wal in these tests (root-owned, outside /usr/local)."""
    base = make_pg_dir("pgops-prog-")
    os.chown(base, 0, 0)
    return {"install_dir": os.path.join(base, "lib"), "program": os.path.join(base, "bin-pgops-wal")}


@pytest.mark.parametrize("major", [13, 15, 17, 18])
def test_archiving_from_off_then_backup_under_load_then_pitr_with_only_pgops_wal(major, make_cluster, playbook, program):
    c = make_cluster(major, archive_mode="off")
    pgbench_init(c)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")

    run = playbook(ARCHIVING, extra_vars=archiving_vars(c, repo, program))
    assert run.rc == 0, run
    config = run.task("Set archive_mode and archive_command with ALTER SYSTEM")
    assert config["changed"] is True and config["pending_restart"] == ["archive_mode"], config
    assert "Restart PostgreSQL with pg_ctl (archive_mode or wal_level changed)" in changed_tasks(run)
    assert run.task("Prove that archiving works (switch WAL, wait until that segment is archived)")["proof"]["archived"]
    sysid = str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    assert c.sql("SHOW archive_mode")[0][0] == "on"
    assert c.sql("SHOW archive_command")[0][0].startswith(f"{program['program']} push --repository {repo} --cluster {sysid}")
    wal = os.path.join(repo, "wal", sysid)
    assert any(n.endswith(".zst") for n in os.listdir(wal))

    again = playbook(ARCHIVING, extra_vars=archiving_vars(c, repo, program))
    assert again.rc == 0, again
    assert changed_tasks(again) == [], f"a second run changed {changed_tasks(again)}"

    bench = pgbench_start(c)
    writer = Writer(c)
    writer.start()
    try:
        time.sleep(0.5)
        run = playbook(BACKUP, extra_vars=backup_vars(c, repo))
        assert run.rc == 0, run
        time.sleep(0.5)
        target = datetime.datetime.now(datetime.timezone.utc)
        time.sleep(0.5)
    finally:
        writer.stop()
        pgbench_stop(bench)
    (info,) = backups(repo)
    # The WAL around the target, complete and archived (the segment holding the byte before the switch's end).
    hi, lo = (int(x, 16) for x in c.sql("SELECT pg_switch_wal()::text")[0][0].split("/"))
    before = (hi << 32 | lo) - 1
    seg = c.sql("SELECT pg_walfile_name(%s::pg_lsn)", (f"{before >> 32:X}/{before & 0xFFFFFFFF:X}",))[0][0]
    deadline = time.monotonic() + 30
    while (c.sql("SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") < seg:
        assert time.monotonic() < deadline, f"the target's WAL ({seg}) was not archived"
        time.sleep(0.2)
    expected = writer.committed_before(target)
    assert [n for n, at in writer.committed if datetime.datetime.fromisoformat(info["started_at"]) < at < target]

    root = make_pg_dir("pgops-restore-")
    data = os.path.join(root, "data")
    ev = {
        "pg_restore_repository": repo, "pg_restore_data_directory": data, "pg_restore_port": 0,
        "pg_restore_unix_socket_directory": root, "pg_restore_recovery_timeout": 120,
        "pg_restore_target": "time", "pg_restore_target_value": target.isoformat(sep=" "),
        "pg_restore_wal_program": program["program"],
    }  # fmt: skip
    run = playbook(RESTORE, extra_vars=ev)
    try:
        assert run.rc == 0, run
        prepared = run.task(f"Restore backup {info['id']} into {data}")
        assert prepared["settings"]["restore_command"].startswith(f"{program['program']} get --repository {repo}")
        port = prepared["port"]
        import psycopg2

        conn = psycopg2.connect(host=root, port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM writer_log")
            ids = {r[0] for r in cur.fetchall()}
        assert expected <= ids, f"{len(expected - ids)} rows committed before the target are missing"
        assert not [n for n, at in writer.committed if at > target + datetime.timedelta(seconds=0.2) and n in ids]
        b = balances(conn)
        assert b[0] == b[1] == b[2] == b[3], b  # pgbench's invariant: the four balance sums agree
        conn.close()
    finally:
        stop_data_directory(data)


def _pgops_wal(prog: str, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([prog, *args], capture_output=True, text=True, **kw)


def test_push_is_idempotent_refuses_a_different_file_and_get_never_writes_part_of_a_file(tmp_path):
    prog = install_pgops_wal(str(tmp_path / "install"))
    repo = tmp_path / "repo"
    repo.mkdir()
    seg = tmp_path / "000000010000000000000003"
    seg.write_bytes(os.urandom(1 << 20) * 16)
    where = ["--repository", str(repo), "--cluster", "7000000000000000001"]
    first = _pgops_wal(prog, "push", *where, str(seg))
    assert first.returncode == 0, first.stderr
    stored = repo / "wal" / "7000000000000000001" / "000000010000000000000003.zst"
    before = stored.read_bytes()
    # PostgreSQL retries a push after a crash: the same content is success.
    again = _pgops_wal(prog, "push", *where, str(seg))
    assert again.returncode == 0 and "already archived with the same content" in again.stderr
    # A different file under the same name is refused; the archived one is untouched.
    other = tmp_path / "other" / "000000010000000000000003"
    other.parent.mkdir()
    other.write_bytes(b"\0" * (16 << 20))
    refused = _pgops_wal(prog, "push", *where, str(other))
    assert refused.returncode == 1 and "refusing to overwrite" in refused.stderr
    assert stored.read_bytes() == before
    # Get: found, decompressed byte for byte; missing: exit 1 and nothing at %p.
    target = tmp_path / "pg_wal" / "RECOVERYXLOG"
    target.parent.mkdir()
    got = _pgops_wal(prog, "get", *where, "000000010000000000000003", str(target))
    assert got.returncode == 0 and target.read_bytes() == seg.read_bytes()
    missing = tmp_path / "pg_wal" / "MISSING"
    gone = _pgops_wal(prog, "get", *where, "000000010000000000000004", str(missing))
    assert gone.returncode == 1 and not missing.exists()
    assert os.listdir(target.parent) == ["RECOVERYXLOG"], "no temporary file may be left beside %p"
    # An archive that cannot be read stops recovery (exit > 125) instead of ending it early.
    bad = _pgops_wal(prog, "get", "--repository", str(tmp_path / "nope"), "--cluster", "1", "000000010000000000000004",
                     str(missing))  # fmt: skip
    assert bad.returncode == 126 and not missing.exists()
    # A standby (--errors-as-missing) treats it as "not there yet".
    soft = _pgops_wal(prog, "get", "--errors-as-missing", "--repository", str(tmp_path / "nope"), "--cluster", "1",
                      "000000010000000000000004", str(missing))  # fmt: skip
    assert soft.returncode == 1
    # Every kind of file PostgreSQL archives, and nothing else.
    for name in ("00000002.history", "000000010000000000000003.00000028.backup", "000000010000000000000005.partial"):
        f = tmp_path / name
        f.write_bytes(b"x" * 100)
        assert _pgops_wal(prog, "push", *where, str(f)).returncode == 0, name
    junk = tmp_path / "not-wal"
    junk.write_bytes(b"x")
    assert _pgops_wal(prog, "push", *where, str(junk)).returncode == 1


def test_a_killed_push_leaves_nothing_under_the_final_name(tmp_path):
    prog = install_pgops_wal(str(tmp_path / "install"))
    repo = tmp_path / "repo"
    repo.mkdir()
    seg = tmp_path / "000000010000000000000007"
    seg.write_bytes(os.urandom(16 << 20))
    # gzip -9 of 16 MB of noise takes long enough to be killed halfway.
    proc = subprocess.Popen([prog, "push", "--repository", str(repo), "--cluster", "1", "--compression", "gzip",
                             "--level", "9", str(seg)], start_new_session=True)  # fmt: skip
    wal = repo / "wal" / "1"
    deadline = time.monotonic() + 10
    while not (wal.exists() and [n for n in os.listdir(wal) if n.endswith(".tmp")]):
        assert time.monotonic() < deadline, "the push never began writing"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not [n for n in os.listdir(wal) if not n.endswith(".tmp")], os.listdir(wal)
    # The retry PostgreSQL makes succeeds.
    assert _pgops_wal(prog, "push", "--repository", str(repo), "--cluster", "1", str(seg)).returncode == 0
    assert "000000010000000000000007.zst" in os.listdir(wal)


def test_a_full_disk_fails_the_push_and_postgresql_retries_it_once_there_is_space(make_cluster, playbook, program):
    c = make_cluster(15)
    mnt = make_pg_dir("pgops-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", mnt], check=True)
    try:
        subprocess.run(["chown", "postgres:postgres", mnt], check=True)
        prog = install_pgops_wal(program["install_dir"], program["program"])
        repo = os.path.join(mnt, "repo")
        os.mkdir(repo, 0o700)
        subprocess.run(["chown", "postgres:postgres", repo], check=True)
        # none: 16 MB segments do not fit in 6 MB.
        c.sql("ALTER SYSTEM SET archive_command = %s", (f"{prog} push --repository {repo} --compression none %p",))
        c.sql("SELECT pg_reload_conf()")
        time.sleep(0.5)
        before = c.sql("SELECT failed_count FROM pg_stat_archiver")[0][0]
        c.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")
        seg = c.sql("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        deadline = time.monotonic() + 30
        while c.sql("SELECT failed_count FROM pg_stat_archiver")[0][0] <= before:
            assert time.monotonic() < deadline, "the archiver did not report the failed push"
            time.sleep(0.2)
        sysid = str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
        assert seg not in os.listdir(os.path.join(repo, "wal", sysid)), "a failed push left a file under the final name"
        subprocess.run(["mount", "-o", "remount,size=200m", mnt], check=True)
        deadline = time.monotonic() + 90  # the archiver retries after a pause
        while (c.sql("SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") < seg:
            assert time.monotonic() < deadline, "PostgreSQL did not retry the push once space was back"
            time.sleep(0.5)
        assert seg in os.listdir(os.path.join(repo, "wal", sysid))
    finally:
        c.stop("immediate")
        subprocess.run(["umount", "-l", mnt], check=False)


def test_the_guard_reports_a_growing_backlog_and_publishes_it(make_cluster, playbook, tmp_path):
    c = make_cluster(17)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    os.mkdir(repo, 0o700)
    subprocess.run(["chown", "postgres:postgres", repo], check=True)
    prog = install_pgops_wal(os.path.join(make_pg_dir("pgops-prog-"), "install"))  # the postgres user runs it
    c.sql("ALTER SYSTEM SET archive_command = %s", (f"{prog} push --repository {repo} %p",))
    c.sql("SELECT pg_reload_conf()")
    time.sleep(0.5)
    c.sql("SELECT pg_switch_wal()")
    metrics = make_pg_dir("pgops-textfile-")
    ev = {
        "pg_backup_login_unix_socket": c.sock, "pg_backup_port": c.port, "pg_backup_repository": repo,
        "pg_backup_preflight_prove": False, "pg_archiving_backlog_max": 3, "pg_archiving_age_max": 2,
        "pg_archiving_metrics_file": os.path.join(metrics, "pgops_archive.prom"),
    }  # fmt: skip
    preflight = os.path.join(REPO, "playbooks", "preflight.yml")
    healthy = playbook(preflight, extra_vars=ev)
    assert healthy.rc == 0, healthy
    sysid = str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    guard = healthy.task("Check the server, its WAL archiving and the repository (read-only, no proof)")["guard"]
    assert guard["newest_in_repository"] and guard["newest_in_repository"] in "".join(
        os.listdir(os.path.join(repo, "wal", sysid))
    )
    text = open(ev["pg_archiving_metrics_file"]).read()
    assert f'pgops_archive_problems{{cluster="{sysid}",host="localhost"}} 0' in text, text
    # The archive becomes unwritable: segments pile up in pg_wal.
    wal_dir = os.path.join(repo, "wal", sysid)
    os.chmod(wal_dir, 0o500)
    try:
        for _ in range(5):
            c.sql("CREATE TABLE IF NOT EXISTS w (x int); INSERT INTO w SELECT generate_series(1, 1000)")
            c.sql("SELECT pg_switch_wal()")
        # Until the archiver has failed on them (a failure newer than its last success) and they wait in pg_wal.
        stuck_query = (
            "SELECT last_failed_time > coalesce(last_archived_time, '-infinity')"
            " AND (SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready') >= 4 FROM pg_stat_archiver"
        )
        deadline = time.monotonic() + 30
        while not c.sql(stuck_query)[0][0]:
            assert time.monotonic() < deadline, "the archiver did not fail on the unwritable archive"
            time.sleep(0.1)
        stuck = playbook(preflight, extra_vars=ev)
        assert stuck.rc != 0
        codes = {
            p["code"]
            for p in stuck.task("Check the server, its WAL archiving and the repository (read-only, no proof)")["problems"]
        }
        assert {"archive_backlog", "archiver_failing"} <= codes, codes
        text = open(ev["pg_archiving_metrics_file"]).read()
        assert f'pgops_archive_problem{{cluster="{sysid}",host="localhost",code="archive_backlog"}} 1' in text, text
        ready = [line for line in text.splitlines() if line.startswith("pgops_archive_ready_segments")]
        assert ready and float(ready[0].split()[-1]) >= 4, ready
    finally:
        os.chmod(wal_dir, 0o700)


def test_the_archiving_role_refuses_an_archive_library_and_ungranted_settings_and_reruns_cleanly(make_cluster, playbook, program):
    """Three setups the role must not half-change: an archive library in charge of the WAL (on 16+ an
    archive_command beside it stops archiving), a role that may not ALTER SYSTEM every setting, and a
    second run before the restart (archive_command reads "(disabled)" until then: no change to make)."""
    c = make_cluster(16, archive_mode="off")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    auto_conf = os.path.join(c.data, "postgresql.auto.conf")
    c.sql("ALTER SYSTEM SET archive_library = 'basic_archive'")
    c.sql("SELECT pg_reload_conf()")
    before = open(auto_conf).read()
    run = playbook(ARCHIVING, extra_vars=archiving_vars(c, repo, program))
    assert run.rc != 0 and "archive_library is set to basic_archive" in run.stdout, run
    assert open(auto_conf).read() == before, "nothing may change"
    c.sql("ALTER SYSTEM RESET archive_library")
    c.sql("SELECT pg_reload_conf()")

    # A login role granted archive_command but not archive_mode: refused before the first ALTER SYSTEM.
    c.sql("CREATE ROLE pgops_half LOGIN")
    c.sql("GRANT ALTER SYSTEM ON PARAMETER archive_command TO pgops_half")
    before = open(auto_conf).read()
    settings = {"archive_command": "/bin/true %p", "archive_mode": "on"}  # the granted one first
    half = playbook(
        [
            {
                "hosts": "postgresql",
                "gather_facts": False,
                "tasks": [
                    {
                        "name": "config",
                        "pgops.online_backup.pg_archiving_config": {
                            **c.conn_vars(),
                            "login_user": "pgops_half",
                            "settings": settings,
                        },
                    }
                ],
            }
        ]  # fmt: skip
    )
    assert half.rc != 0, half
    said = half.task("config")["msg"]
    assert "may not ALTER SYSTEM SET archive_mode:" in said and "nothing was changed" in said, said
    assert open(auto_conf).read() == before, "archive_command was written before archive_mode was refused"

    # Without the restart: the run says so; a second run has nothing to set.
    first = playbook(ARCHIVING, extra_vars=archiving_vars(c, repo, program, pg_archiving_restart=False))
    assert first.rc != 0 and "takes effect only when" in first.stdout, first
    assert first.task("Set archive_mode and archive_command with ALTER SYSTEM")["changed"] is True
    again = playbook(ARCHIVING, extra_vars=archiving_vars(c, repo, program, pg_archiving_restart=False))
    config = again.task("Set archive_mode and archive_command with ALTER SYSTEM")
    assert config["changed"] is False, config
