"""Restore and drills against real servers, through the real playbooks: full restores (tar + zstd with a
remapped tablespace, rsync), point-in-time recovery to a time, a restore point and an LSN, a target past the
archived WAL, refusals that change nothing, and drills on good and corrupted backups."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import time

import psycopg2
import pytest
from harness.ansible import REPO, local_inventory, run_playbook
from harness.pg import Cluster, chown_pg, make_pg_dir
from harness.workload import Writer

BACKUP = os.path.join(REPO, "playbooks", "backup.yml")
RESTORE = os.path.join(REPO, "playbooks", "restore.yml")
DRILL = os.path.join(REPO, "playbooks", "drill.yml")
# What an idle server still writes by itself (a standby snapshot record every 15 s goes to the current WAL segment).
LIVE_SKIP = ("pg_wal", "pg_stat_tmp")


# -- helpers


def take_backup(cluster: Cluster, repo: str, workdir: str | None = None, **extra) -> dict:
    """One backup through the backup playbook; returns its backup.json."""
    ev = dict(pg_backup_repository=repo, pg_backup_login_unix_socket=cluster.sock, pg_backup_port=cluster.port,
              pg_backup_fast_checkpoint=True, **extra)  # fmt: skip
    run = run_playbook(BACKUP, local_inventory(), extra_vars=ev, workdir=workdir)
    assert run.rc == 0, run
    return newest_backup(repo)


def newest_backup(repo: str) -> dict:
    bid = max(n for n in os.listdir(repo) if not n.startswith("."))
    with open(os.path.join(repo, bid, "backup.json")) as f:
        return json.load(f)


def archive_current_wal(cluster: Cluster, timeout: float = 30) -> None:
    """Switch WAL and wait until that segment is in the archive, so recovery can replay everything so far."""
    wal = cluster.sql("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(cluster.archive, wal)):
        assert time.monotonic() < deadline, f"{wal} was not archived"
        time.sleep(0.05)


def result_of(run, prefix: str) -> dict:
    """The result of the task whose (templated) name starts with prefix."""
    found = [r for r in run.results if r["task"].startswith(prefix)]
    assert found, f"no task {prefix!r}: {[r['task'] for r in run.results]}\n{run.stdout[-3000:]}"
    return found[-1]["result"]


def failure_message(run) -> str:
    return " | ".join(str(r["result"].get("msg")) for r in run.results if r["status"] == "failed")


def postmaster_pid(data_dir: str) -> int | None:
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            pid = int(f.readline())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def processes_mentioning(text: str) -> list:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


def stop_server(data_dir: str) -> None:
    pid = postmaster_pid(data_dir)
    if pid:
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown: a test's restored server holds nothing of value
        deadline = time.monotonic() + 30
        while postmaster_pid(data_dir) and time.monotonic() < deadline:
            time.sleep(0.05)


def query(root: str, port: int, sql: str, dbname: str = "postgres"):
    conn = psycopg2.connect(host=root, port=port, user="postgres", dbname=dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def snapshot(path: str, skip: tuple = ()) -> dict:
    """Every entry under path with its size and modification time."""
    out = {}
    for dirpath, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(dirpath, d), path) not in skip]
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return out


def wait_archiver_idle(cluster: Cluster, timeout: float = 30) -> None:
    """No segment left to archive: the archiver renames nothing in the live data directory from now on."""
    status = os.path.join(cluster.data, "pg_wal", "archive_status")
    deadline = time.monotonic() + timeout
    while any(n.endswith(".ready") for n in os.listdir(status)):
        assert time.monotonic() < deadline, "the archiver did not catch up"
        time.sleep(0.05)


def corrupt(path: str, offset: int | None = None) -> None:
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        at = size // 2 if offset is None else offset
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def restore_root():
    """Factory of destination roots (postgres-owned); their servers are stopped and the roots removed afterwards."""
    roots = []

    def make() -> str:
        root = make_pg_dir("pgops-restored-")
        roots.append(root)
        return root

    yield make
    for root in roots:
        stop_server(os.path.join(root, "data"))
        shutil.rmtree(root, ignore_errors=True)


def restore_vars(repo: str, cluster: Cluster, root: str, **extra) -> dict:
    ev = dict(pg_restore_repository=repo, pg_restore_data_directory=os.path.join(root, "data"), pg_restore_port=0,
              pg_restore_wal_archive=cluster.archive, pg_restore_unix_socket_directory=root,
              pg_restore_recovery_timeout=60)  # fmt: skip
    ev.update(extra)
    return ev


# -- one PostgreSQL 15 cluster, one tar+zstd backup taken under writes, then A, a time, a restore point, an LSN, B


@pytest.fixture(scope="module")
def pitr(tmp_path_factory):
    c = Cluster(15)
    c.init().start()
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    ts_dir = os.path.join(c.root, "ts_fast")
    os.makedirs(ts_dir)
    chown_pg(ts_dir)
    try:
        c.sql(f"CREATE TABLESPACE fast LOCATION '{ts_dir}'")
        c.sql("CREATE TABLE t (id int, tag text)")
        c.sql("CREATE TABLE in_fast (id int) TABLESPACE fast")
        c.sql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 1000) g")
        c.sql("INSERT INTO in_fast SELECT generate_series(1, 500)")
        writer = Writer(c)
        writer.start()
        info = take_backup(c, repo, str(tmp_path_factory.mktemp("backup")), pg_backup_method="tar", pg_backup_compression="zstd")
        writer.stop()
        assert writer.error is None and writer.committed
        c.sql("INSERT INTO t VALUES (1, 'A')")
        c.sql("SELECT pg_create_restore_point('before_b')")
        lsn = c.sql("SELECT pg_current_wal_insert_lsn()::text")[0][0]
        when = c.sql("SELECT clock_timestamp()::text")[0][0]
        time.sleep(0.2)
        c.sql("INSERT INTO t VALUES (2, 'B')")
        archive_current_wal(c)
        yield {"cluster": c, "repo": repo, "info": info, "writer": writer, "time": when, "lsn": lsn, "ts_dir": ts_dir}
    finally:
        c.destroy()
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def test_tar_zstd_backup_restored_with_rows_written_during_the_backup_and_a_moved_tablespace(pitr, playbook, restore_root):
    c, info, writer = pitr["cluster"], pitr["info"], pitr["writer"]
    assert info["method"] == "tar" and info["compression"] == "zstd" and len(info["tablespaces"]) == 1
    oid = str(info["tablespaces"][0]["oid"])
    started = datetime.datetime.fromisoformat(info["started_at"])
    stopped = datetime.datetime.fromisoformat(info["stopped_at"])
    during = [n for n, at in writer.committed if started < at < stopped]
    assert during, "the writer committed nothing while the backup ran: the test would prove nothing"
    live_pid = c.postmaster_pid()
    root = restore_root()
    new_ts = os.path.join(root, "ts_moved")

    run = playbook(RESTORE, extra_vars=restore_vars(pitr["repo"], c, root, pg_restore_tablespace_map={oid: new_ts}))
    assert run.rc == 0, run
    prepared = result_of(run, "Restore backup")
    server = result_of(run, "Start the restored server")
    assert prepared["tablespaces"] == [{"oid": oid, "name": "fast", "location": pitr["ts_dir"], "path": new_ts}]
    assert server["state"] == "promoted" and server["timeline"] == 2 and server["reached_lsn"]
    port = prepared["port"]
    assert port != c.port
    rows = dict(query(root, port, "SELECT tag, count(*) FROM t GROUP BY tag"))
    assert rows == {"before": 1000, "A": 1, "B": 1}
    ids = {r[0] for r in query(root, port, "SELECT id FROM writer_log")}
    assert ids == {n for n, _ in writer.committed}  # every commit, including those during the backup
    assert query(root, port, "SELECT count(*) FROM in_fast") == [(500,)]
    assert os.readlink(os.path.join(root, "data", "pg_tblspc", oid)) == new_ts
    with open(os.path.join(root, "data", "tablespace_map.old")) as f:  # the server renames it once used
        assert f.read() == f"{oid} {new_ts}\n"
    # Kept away from the original: no archiving into its archive, only where asked.
    settings = dict(query(root, port, "SELECT name, setting FROM pg_settings WHERE name IN "
                                      "('archive_mode', 'listen_addresses', 'port', 'unix_socket_directories')"))  # fmt: skip
    assert settings == {"archive_mode": "off", "listen_addresses": "", "port": str(port), "unix_socket_directories": root}
    archived = set(os.listdir(c.archive))
    query(root, port, "SELECT pg_switch_wal()")
    assert set(os.listdir(c.archive)) == archived
    assert c.postmaster_pid() == live_pid and c.sql("SELECT count(*) FROM t")[0][0] == 1002


@pytest.mark.parametrize("target", ["time", "name", "lsn"])
def test_point_in_time_recovery_has_a_and_not_b(target, pitr, playbook, restore_root):
    c = pitr["cluster"]
    value = {"time": pitr["time"], "name": "before_b", "lsn": pitr["lsn"]}[target]
    root = restore_root()
    new_ts = os.path.join(root, "ts")
    ev = restore_vars(pitr["repo"], c, root, pg_restore_target=target, pg_restore_target_value=value,
                      pg_restore_tablespace_map={"fast": new_ts})  # fmt: skip
    run = playbook(RESTORE, extra_vars=ev)
    assert run.rc == 0, run
    server = result_of(run, "Start the restored server")
    assert server["state"] == "promoted"
    assert server["recovery_stop"].startswith("recovery stopping"), server
    port = result_of(run, "Restore backup")["port"]
    assert dict(query(root, port, "SELECT tag, count(*) FROM t GROUP BY tag")) == {"before": 1000, "A": 1}
    with open(os.path.join(root, "data", "postgresql.auto.conf")) as f:
        auto = f.read()
    assert auto.count("recovery_target_") == 3  # the target, the action and the timeline
    assert f"recovery_target_{target} = '{value}'" in auto


def test_target_beyond_the_archived_wal_fails_quickly_and_clearly(pitr, playbook, restore_root):
    c = pitr["cluster"]
    root = restore_root()
    future = c.sql("SELECT (now() + interval '1 hour')::text")[0][0]
    ev = restore_vars(pitr["repo"], c, root, pg_restore_target="time", pg_restore_target_value=future,
                      pg_restore_tablespace_map={"fast": os.path.join(root, "ts")})  # fmt: skip
    began = time.monotonic()
    run = playbook(RESTORE, extra_vars=ev)
    elapsed = time.monotonic() - began
    assert run.rc != 0
    msg = failure_message(run)
    assert "the restored server stopped during recovery" in msg
    assert "FATAL: recovery ended before configured recovery target was reached" in msg
    assert elapsed < 45, f"took {elapsed:.0f} s: the timeout is 60 s, the failure must come from the server, not a wait"
    assert postmaster_pid(os.path.join(root, "data")) is None


def test_non_empty_target_is_refused_and_left_untouched_unless_forced(pitr, playbook, restore_root):
    c = pitr["cluster"]
    root = restore_root()
    data = os.path.join(root, "data")
    os.makedirs(os.path.join(data, "sub"))
    with open(os.path.join(data, "keep.txt"), "w") as f:
        f.write("precious")
    with open(os.path.join(data, "sub", "more.txt"), "w") as f:
        f.write("also precious")
    shutil.chown(data, "postgres")
    before = snapshot(root)
    ts = {"fast": os.path.join(root, "ts")}

    for check in (True, False):
        run = playbook(RESTORE, extra_vars=restore_vars(pitr["repo"], c, root, pg_restore_tablespace_map=ts), check=check)
        assert run.rc != 0
        msg = failure_message(run)
        assert f"restore refused, nothing was changed: data directory {data} is not empty (keep.txt, sub)" in msg, msg
        assert snapshot(root) == before

    # Content this user cannot remove (root's sub/) is found before any of it is removed.
    forced = restore_vars(pitr["repo"], c, root, pg_restore_tablespace_map=ts, pg_restore_force=True,
                          pg_restore_target="immediate")  # fmt: skip
    run = playbook(RESTORE, extra_vars=forced)
    assert run.rc != 0 and f"cannot be emptied: {data}/sub is not writable" in failure_message(run), failure_message(run)
    assert snapshot(root) == before

    subprocess.run(["chown", "-R", "postgres:", data], check=True)
    before = snapshot(root)

    # The original server's port is refused before anything is written (read from the start of base.tar.zst).
    run = playbook(RESTORE, extra_vars=restore_vars(pitr["repo"], c, root, pg_restore_tablespace_map=ts,
                                                    pg_restore_force=True, pg_restore_port=c.port))  # fmt: skip
    assert run.rc != 0 and f"port {c.port} is the original server's port" in failure_message(run)
    assert snapshot(root) == before

    # Without a tablespace map, the running original's tablespace directory is never overwritten, even with force.
    run = playbook(RESTORE, extra_vars=restore_vars(pitr["repo"], c, root, pg_restore_force=True))
    assert run.rc != 0 and "which the original server" in failure_message(run) and "is using" in failure_message(run)
    assert snapshot(root) == before

    run = playbook(RESTORE, extra_vars=forced)
    assert run.rc == 0, failure_message(run)
    assert not os.path.exists(os.path.join(data, "keep.txt")) and not os.path.exists(os.path.join(data, "sub"))
    port = result_of(run, "Restore backup")["port"]
    assert query(root, port, "SELECT count(*) FROM t WHERE tag = 'before'") == [(1000,)]


def test_drill_fails_with_the_cause_on_a_corrupted_archive(pitr, playbook, tmp_path):
    c = pitr["cluster"]
    info = pitr["info"]
    repo = os.path.join(make_pg_dir("pgops-repo-bad-"), "repo")
    try:
        shutil.copytree(os.path.join(pitr["repo"], info["id"]), os.path.join(repo, info["id"]), symlinks=True)
        subprocess.run(["chown", "-R", "postgres:", os.path.dirname(repo)], check=True)
        corrupt(os.path.join(repo, info["id"], "base.tar.zst"))
        live_pid = c.postmaster_pid()
        for verify in (True, False):
            # The second drill goes for the backup its first drill found damaged: latest passes over such a
            # backup unless asked not to.
            ev = dict(pg_restore_repository=repo, pg_restore_wal_archive=c.archive, pg_restore_drill_verify_manifest=verify,
                      pg_restore_force_unverified=not verify)  # fmt: skip
            run = playbook(DRILL, extra_vars=ev)
            assert run.rc != 0
            scratch = result_of(run, "Create the scratch directory")["path"]
            msg = failure_message(run)
            where = "Verify the backup against its manifest" if verify else "Restore the backup into the scratch directory"
            assert f"restore drill of backup {info['id']} failed at {where}" in msg, msg
            assert "base.tar.zst" in msg and "zstd" in msg
            drill = newest_backup(repo)["drill"]
            assert drill["result"] == "failed" and where in drill["error"]
            assert not os.path.exists(scratch) and not processes_mentioning(scratch)
        assert c.postmaster_pid() == live_pid
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


# -- rsync, PostgreSQL 15


def test_rsync_backup_restored_then_drilled_good_and_corrupted(make_cluster, playbook, restore_root, tmp_path):
    c = make_cluster(15, autovacuum="off")  # an idle live cluster whose files must not change during drills
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        c.sql("CREATE TABLE t (id int primary key, tag text)")
        c.sql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 2000) g")
        writer = Writer(c)
        writer.start()
        info = take_backup(c, repo, pg_backup_method="rsync")
        writer.stop()
        c.sql("INSERT INTO t VALUES (0, 'after')")
        archive_current_wal(c)

        root = restore_root()
        run = playbook(RESTORE, extra_vars=restore_vars(repo, c, root))
        assert run.rc == 0, run
        port = result_of(run, "Restore backup")["port"]
        assert dict(query(root, port, "SELECT tag, count(*) FROM t GROUP BY tag")) == {"before": 2000, "after": 1}
        assert {r[0] for r in query(root, port, "SELECT id FROM writer_log")} == {n for n, _ in writer.committed}
        stop_server(os.path.join(root, "data"))

        c.sql("CHECKPOINT")
        wait_archiver_idle(c)
        live_pid, live_files = c.postmaster_pid(), snapshot(c.data, skip=LIVE_SKIP)
        run = playbook(DRILL, extra_vars=dict(pg_restore_repository=repo, pg_restore_wal_archive=c.archive))
        assert run.rc == 0, run
        drill = newest_backup(repo)["drill"]
        assert drill["result"] == "passed" and drill["error"] is None
        assert {"manifest", "recovery", "query postgres", "query template1"} <= {ch["name"] for ch in drill["checks"]}

        relfile = c.sql("SELECT pg_relation_filepath('t')")[0][0]
        corrupt(os.path.join(repo, info["id"], "data", relfile), offset=8192 + 100)
        run = playbook(DRILL, extra_vars=dict(pg_restore_repository=repo, pg_restore_wal_archive=c.archive))
        assert run.rc != 0
        msg = failure_message(run)
        assert f"{relfile}: checksum mismatch" in msg, msg
        drill = newest_backup(repo)["drill"]
        assert drill["result"] == "failed" and f"{relfile}: checksum mismatch" in drill["error"]
        assert newest_backup(repo)["verification"]["verified"] is False
        scratch = result_of(run, "Create the scratch directory")["path"]
        assert not os.path.exists(scratch) and not processes_mentioning(scratch)
        assert c.postmaster_pid() == live_pid and snapshot(c.data, skip=LIVE_SKIP) == live_files
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def test_cpio_backup_with_a_tablespace_restored_with_rows_written_during_the_backup(make_cluster, playbook, restore_root):
    """A cpio backup's members reach cpio through the guard that refuses anything but files and directories
    (cpio would write through a symbolic link): a real backup, its tablespace included, passes it whole."""
    c = make_cluster(15)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    loc = make_pg_dir("pgops-ts-")
    c.sql(f"CREATE TABLESPACE tsc LOCATION '{loc}'")
    c.sql("CREATE TABLE t (id int primary key, tag text) TABLESPACE tsc")
    c.sql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 5000) g")
    writer = Writer(c)
    writer.start()
    take_backup(c, repo, pg_backup_method="cpio", pg_backup_compression="zstd")
    writer.stop()
    archive_current_wal(c)
    root = restore_root()
    moved = os.path.join(root, "tsc")
    run = playbook(RESTORE, extra_vars=restore_vars(repo, c, root, pg_restore_tablespace_map={"tsc": moved}))
    assert run.rc == 0, run
    port = result_of(run, "Restore backup")["port"]
    assert query(root, port, "SELECT count(*) FROM t")[0][0] == 5000
    assert {r[0] for r in query(root, port, "SELECT id FROM writer_log")} == {n for n, _ in writer.committed}
    assert query(root, port, "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'tsc'")[0][0] == moved


def test_a_drill_that_fails_for_a_problem_of_its_host_is_inconclusive_not_a_damaged_backup(make_cluster, playbook):
    """Missing server binaries (like no free space or a busy port) say nothing about the backup: the run fails
    and says so, the drill is recorded inconclusive, and latest still restores from that backup."""
    c = make_cluster(15)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    c.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g")
    info = take_backup(c, repo, pg_backup_method="tar")
    ev = dict(pg_restore_repository=repo, pg_restore_wal_archive=c.archive, pg_restore_bin_dir="/nonexistent/pgops/bin")
    run = playbook(DRILL, extra_vars=ev)
    assert run.rc != 0
    msg = failure_message(run)
    assert "bin_dir /nonexistent/pgops/bin cannot run this PostgreSQL 15 backup" in msg, msg
    assert "as inconclusive: a problem of this host, not of the backup, which is not marked damaged" in msg, msg
    recorded = newest_backup(repo)
    assert "drill" not in recorded, "an inconclusive drill is kept apart from the drill verdicts"
    drill = recorded["inconclusive_drill"]
    assert drill["result"] == "inconclusive" and "bin_dir /nonexistent/pgops/bin" in drill["error"]
    run = playbook(DRILL, extra_vars=dict(pg_restore_repository=repo, pg_restore_wal_archive=c.archive))
    assert run.rc == 0, run
    assert result_of(run, "Find backup")["backup"]["id"] == info["id"]
    assert newest_backup(repo)["drill"]["result"] == "passed"


def test_a_tablespace_inside_the_data_directory_is_copied_once_and_restores(make_cluster, playbook, restore_root):
    """PostgreSQL allows (with a warning) a tablespace inside the data directory: the copy leaves it out of
    base.tar, so it is stored once, in its own archive, and never as a stale copy inside the restored data
    directory that WAL replay would not touch."""
    c = make_cluster(15)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    inside = os.path.join(c.data, "ts_inside")
    os.mkdir(inside, 0o700)
    chown_pg(inside)
    c.sql(f"CREATE TABLESPACE tsi LOCATION '{inside}'")
    oid = str(c.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'tsi'")[0][0])
    c.sql("CREATE TABLE t TABLESPACE tsi AS SELECT g FROM generate_series(1, 3000) g")
    info = take_backup(c, repo, pg_backup_method="tar", pg_backup_compression="none")
    backup_dir = os.path.join(repo, info["id"])
    base = subprocess.run(["tar", "-tf", os.path.join(backup_dir, "base.tar")], capture_output=True, text=True, check=True)
    assert not [n for n in base.stdout.split() if "ts_inside" in n], "the tablespace is not in base.tar"
    own = subprocess.run(["tar", "-tf", os.path.join(backup_dir, f"{oid}.tar")], capture_output=True, text=True, check=True)
    assert any(n.startswith("PG_15_") and n.count("/") >= 2 for n in own.stdout.split()), own.stdout[:500]
    archive_current_wal(c)
    root = restore_root()
    moved = os.path.join(root, "tsi")
    run = playbook(RESTORE, extra_vars=restore_vars(repo, c, root, pg_restore_tablespace_map={"tsi": moved}))
    assert run.rc == 0, run
    port = result_of(run, "Restore backup")["port"]
    assert query(root, port, "SELECT count(*) FROM t")[0][0] == 3000
    assert not os.path.exists(os.path.join(root, "data", "ts_inside"))


# -- PostgreSQL 17: pg_amcheck in the drill; a check failing after the scratch server started


def test_drill_on_17_runs_pg_amcheck_and_always_cleans_up(make_cluster, playbook):
    c = make_cluster(17)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        c.sql("CREATE DATABASE app")
        c.sql("CREATE TABLE t (id int primary key, v text)", dbname="app")
        c.sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g", dbname="app")
        info = take_backup(c, repo, pg_backup_method="tar")
        live_pid = c.postmaster_pid()

        run = playbook(DRILL, extra_vars=dict(pg_restore_repository=repo, pg_restore_wal_archive=c.archive))
        assert run.rc == 0, run
        drill = newest_backup(repo)["drill"]
        checks = {ch["name"]: ch for ch in drill["checks"]}
        assert drill["result"] == "passed" and drill["target"] == "immediate"
        assert {"manifest", "recovery", "query app", "query postgres", "query template1", "pg_amcheck"} == set(checks)
        assert all(ch["ok"] for ch in checks.values())
        assert "pg17-tools/bin/pg_amcheck: no corruption found in 3 databases" in checks["pg_amcheck"]["detail"]
        assert result_of(run, "Start the scratch server")["recovery_stop"] == "recovery stopping after reaching consistency"
        scratch = result_of(run, "Create the scratch directory")["path"]
        assert not os.path.exists(scratch) and not processes_mentioning(scratch)

        # A check that fails once the scratch server runs: it is still stopped and removed.
        ev = dict(pg_restore_repository=repo, pg_restore_wal_archive=c.archive, pg_restore_backup=info["id"],
                  pg_restore_drill_query="SELECT count(*) FROM no_such_table", pg_restore_drill_amcheck="never")  # fmt: skip
        run = playbook(DRILL, extra_vars=ev)
        assert run.rc != 0
        assert result_of(run, "Stop the scratch server")["shutdown"] == "fast"
        scratch = result_of(run, "Create the scratch directory")["path"]
        assert not os.path.exists(scratch) and not processes_mentioning(scratch)
        drill = newest_backup(repo)["drill"]
        assert drill["result"] == "failed" and 'relation "no_such_table" does not exist' in drill["error"]
        assert c.postmaster_pid() == live_pid
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def test_a_drill_of_a_logical_subscriber_never_connects_to_its_publisher(make_cluster, playbook):
    """Once promoted, a drill's copy of a subscriber would start its subscription's apply worker, which
    connects to the live publisher with the original's slot and confirms changes that the live subscriber
    then never gets. The drill runs with no apply workers: its publisher gets no replication connection
    while the subscriber is down, and the slot still holds every change for the subscriber."""
    pub = make_cluster(16, wal_level="logical", log_replication_commands="on")
    sub = make_cluster(16)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    pub.sql("CREATE TABLE t (id int primary key)")
    pub.sql("CREATE PUBLICATION p FOR TABLE t")
    pub.sql("INSERT INTO t SELECT generate_series(1, 10)")
    sub.sql("CREATE TABLE t (id int primary key)")
    sub.sql(f"CREATE SUBSCRIPTION s CONNECTION 'host={pub.sock} port={pub.port} dbname=postgres user=postgres' PUBLICATION p")
    deadline = time.monotonic() + 60
    while sub.sql("SELECT count(*) FROM t")[0][0] < 10:
        assert time.monotonic() < deadline, "the subscription did not copy the table"
        time.sleep(0.2)
    take_backup(sub, repo, pg_backup_method="tar")
    sub.stop()  # the live subscriber is down: its slot is free for whoever connects
    pub.sql("INSERT INTO t SELECT generate_series(11, 20)")
    confirmed = pub.sql("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's'")[0][0]
    log_size = os.path.getsize(pub.log)

    run = playbook(DRILL, extra_vars=dict(pg_restore_repository=repo, pg_restore_wal_archive=sub.archive))
    assert run.rc == 0, run
    assert newest_backup(repo)["drill"]["result"] == "passed"
    with open(pub.log, errors="replace") as f:
        f.seek(log_size)
        during = f.read()
    assert "START_REPLICATION" not in during, f"the drill's server connected to the publisher:\n{during[-2000:]}"
    assert pub.sql("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's'")[0][0] == confirmed
    sub.start()  # the live subscriber gets what was written while it was down
    deadline = time.monotonic() + 60
    while sub.sql("SELECT count(*) FROM t")[0][0] < 20:
        assert time.monotonic() < deadline, "the live subscriber did not get the rows written while it was down"
        time.sleep(0.2)


def test_a_standbys_cleanup_command_never_runs_on_the_restored_server(make_cluster, playbook, restore_root):
    """A backup of a server whose configuration has archive_cleanup_command (as a standby's has) and
    hot_standby off: archive recovery runs archive_cleanup_command at every restartpoint, so left as it
    was it would delete WAL from the original's archive. The restored server gets it (and
    recovery_end_command) empty, and hot standby on so the run can watch the recovery (off, PostgreSQL
    14+ refuses every connection until recovery ends, and turns a pause into a shutdown)."""
    marker_dir = make_pg_dir("pgops-cleanup-")
    command = f"touch {marker_dir}/cleanup-ran-%r"
    # lc_messages: the run reads the restored server's messages, so they are in English (C) whatever the original's
    # (only C and POSIX exist on this machine: the change of setting is what can be checked here).
    c = make_cluster(16, hot_standby="off", archive_cleanup_command=f"'{command}'", recovery_end_command=f"'{command}-end'",
                     lc_messages="'POSIX'")  # fmt: skip
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        c.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        take_backup(c, repo)
        c.sql("INSERT INTO t VALUES (1001)")
        archive_current_wal(c)
        root = restore_root()
        run = playbook(RESTORE, extra_vars=restore_vars(repo, c, root))
        assert run.rc == 0, run
        port = result_of(run, "Restore backup")["port"]
        assert query(root, port, "SELECT count(*) FROM t") == [(1001,)]
        settings = dict(query(root, port, "SELECT name, setting FROM pg_settings WHERE name IN "
                              "('archive_cleanup_command', 'recovery_end_command', 'hot_standby', 'lc_messages')"))  # fmt: skip
        expected = {"archive_cleanup_command": "", "recovery_end_command": "", "hot_standby": "on", "lc_messages": "C"}
        assert settings == expected, settings
        assert os.listdir(marker_dir) == []
        # The original keeps its own settings: only the restored copy is changed.
        assert c.sql("SHOW archive_cleanup_command")[0][0] == command
        stop_server(os.path.join(root, "data"))
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)
        shutil.rmtree(marker_dir, ignore_errors=True)
