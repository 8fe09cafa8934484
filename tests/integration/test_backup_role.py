"""The backup playbook (role pg_backup) against real servers, under load,
restored by hand from our layout, and its failure paths."""

from __future__ import annotations

import datetime
import glob
import os
import signal
import subprocess
import time

import pytest
from harness.backup import (
    BACKUP,
    assert_nothing_left,
    backup_vars,
    backups,
    descendants,
    finish,
    running_keeper_pid,
    slow_cluster,
    start_backup_in_background,
    wait_for_copy,
    wait_for_output,
)
from harness.layout import restore_backup
from harness.pg import MAJORS, TOOLS17, make_pg_dir
from harness.scratch import scratch_dir
from harness.workload import Writer, balances, pgbench_init, pgbench_start, pgbench_stop

AMCHECK = {15: "/usr/lib/postgresql/15/bin/pg_amcheck", 17: os.path.join(TOOLS17, "pg_amcheck")}


def utc(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


CASES = [(15, "tar", comp) for comp in ("none", "gzip", "zstd", "lz4")]
CASES += [(15, "rsync", "none"), (15, "cpio", "none"), (15, "cpio", "zstd")]
CASES += [(m, "tar", "zstd") for m in MAJORS if m != 15]


@pytest.mark.parametrize("major,method,compression", CASES)
def test_backup_under_load_restores_by_hand(major, method, compression, make_cluster, playbook):
    c = make_cluster(major)
    pgbench_init(c)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    writer = Writer(c)
    writer.start()
    bench = pgbench_start(c)
    try:
        time.sleep(0.5)
        before_start = writer.committed_before(datetime.datetime.now(datetime.timezone.utc))
        run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_method=method, pg_backup_compression=compression))
        time.sleep(0.3)  # keep writing after the stop too
    finally:
        writer.stop()
        pgbench_stop(bench)
    assert run.rc == 0, run
    assert writer.error is None, writer.error
    (info,) = backups(repo)
    assert info["status"] == "complete" and info["method"] == method and info["compression"] == compression
    assert int(info["pg_version"]) // 10000 == major
    assert info["wal_archived"] is True
    assert not os.path.exists(os.path.join(c.data, "backup_label"))
    bdir = os.path.join(repo, info["id"])
    assert oct(os.stat(bdir).st_mode & 0o777) == "0o700"
    for name in os.listdir(bdir):
        if os.path.isfile(os.path.join(bdir, name)):
            assert os.stat(os.path.join(bdir, name)).st_mode & 0o077 == 0, name

    must_have = writer.committed_before(utc(info["stop_requested_at"]))
    during = must_have - before_start
    assert before_start and during, "the writer must have committed rows before and during the backup"
    restored = restore_backup(bdir, c.archive, major)
    try:
        got = {r[0] for r in restored.sql("SELECT id FROM writer_log")}
        missing = must_have - got
        assert not missing, f"{len(missing)} committed rows missing, e.g. {sorted(missing)[:5]}"
        assert got <= {i for i, _ in writer.committed}
        a, t, b, h = balances(restored.connect())
        assert a == t == b == h, (a, t, b, h)
        assert restored.sql("SELECT count(*) FROM pgbench_history")[0][0] > 0
        if major in AMCHECK:
            check = subprocess.run(
                [
                    AMCHECK[major],
                    "--install-missing",
                    "-h",
                    restored.sock,
                    "-p",
                    str(restored.port),
                    "-U",
                    "postgres",
                    "postgres",
                ],
                capture_output=True,
                text=True,
            )
            assert check.returncode == 0, check.stdout + check.stderr
    finally:
        restored.destroy()


@pytest.mark.parametrize("method", ["tar", "rsync"])
def test_two_tablespaces_one_written_during_backup(method, make_cluster, playbook):
    c = make_cluster(16)
    locs = [make_pg_dir("pgops-ts-") for _ in range(2)]
    for i, loc in enumerate(locs):
        c.sql(f"CREATE TABLESPACE ts{i} LOCATION '{loc}'")
    c.sql("CREATE TABLE in_ts0 TABLESPACE ts0 AS SELECT g AS id FROM generate_series(1, 5000) g")
    c.sql("CREATE DATABASE db_ts1 TABLESPACE ts1")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    writer = Writer(c, table="busy", dbname="db_ts1")
    writer.start()
    try:
        time.sleep(0.3)
        run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_method=method))
    finally:
        writer.stop()
    assert run.rc == 0, run
    (info,) = backups(repo)
    assert sorted(t["name"] for t in info["tablespaces"]) == ["ts0", "ts1"]
    bdir = os.path.join(repo, info["id"])
    spcmap = open(os.path.join(bdir, "backup_label" if method == "tar" else "data/backup_label")).read()
    assert "LABEL:" in spcmap
    restored = restore_backup(bdir, c.archive, 16)
    try:
        assert restored.sql("SELECT count(*) FROM in_ts0")[0][0] == 5000
        got = {r[0] for r in restored.sql("SELECT id FROM busy", dbname="db_ts1")}
        assert writer.committed_before(utc(info["stop_requested_at"])) <= got
        locations = {
            r[0] for r in restored.sql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname LIKE 'ts%%'")
        }
        assert all(loc.startswith(restored.root) for loc in locations), locations
    finally:
        restored.destroy()
        for loc in locs:
            subprocess.run(["rm", "-rf", loc], check=False)


# -- faults in the middle: a slow copy gives the test time to strike


def test_keeper_killed_mid_copy(make_cluster, tmp_path):
    """While the run waits for the copy in turns (it printed its progress): the copy hears the session
    end and stops, and the turn fails the task with the copy's own words, printed once by the rescue."""
    c = slow_cluster(make_cluster)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    proc = start_backup_in_background(c, repo, str(tmp_path / "w"), pg_backup_progress_interval=1)
    wait_for_copy(repo)
    wait_for_output(proc, "[localhost] copy: ")
    os.kill(running_keeper_pid(c), signal.SIGKILL)
    rc, out = finish(proc)
    assert rc != 0
    assert "session lost, backup unusable" in out, out[-3000:]
    fails = [line for line in out.splitlines() if line.startswith("fatal:") and "failed at 'Copy the data directory" in line]
    assert len(fails) == 1, fails
    assert "copy failed: the copy was cancelled (the backup was aborted): session lost" in fails[0], fails
    (after,) = backups(repo)
    assert after["status"] == "failed" and "session lost" in after["error"]
    assert os.listdir(os.path.join(repo, after["id"])) == ["backup.json"], "partial data must be removed"
    assert_nothing_left(c, repo)


def test_server_stopped_mid_copy(make_cluster, tmp_path):
    c = slow_cluster(make_cluster)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    proc = start_backup_in_background(c, repo, str(tmp_path / "w"))
    wait_for_copy(repo)
    c.stop("fast")
    rc, out = finish(proc)
    assert rc != 0, out[-3000:]
    assert "failed at" in out
    (after,) = backups(repo)
    assert after["status"] == "failed"
    assert_nothing_left(c, repo)


def test_postmaster_killed_mid_copy_restarts_cleanly(make_cluster, tmp_path):
    c = slow_cluster(make_cluster)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    proc = start_backup_in_background(c, repo, str(tmp_path / "w"))
    wait_for_copy(repo)
    os.kill(c.postmaster_pid(), signal.SIGKILL)
    rc, out = finish(proc)
    assert rc != 0
    assert not os.path.exists(os.path.join(c.data, "backup_label")), "the live cluster must never get a backup_label"
    # A crashed primary restarts by crash recovery, not from a backup label.
    time.sleep(0.5)
    os.unlink(os.path.join(c.data, "postmaster.pid"))
    c.start()
    assert c.sql("SELECT count(*) FROM bulk")[0][0] == 1500000
    assert "could not locate required checkpoint record" not in open(c.log).read()
    assert backups(repo)[0]["status"] == "failed"
    assert_nothing_left(c, repo)


def test_second_run_on_same_cluster_is_refused_by_the_lock(make_cluster, playbook, tmp_path):
    c = slow_cluster(make_cluster)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    first = start_backup_in_background(c, repo, str(tmp_path / "w"))
    running = wait_for_copy(repo)
    second = playbook(BACKUP, extra_vars=backup_vars(c, repo))
    assert second.rc != 0
    out = second.stdout
    assert "another backup of this cluster" in out and running["id"] in out, out[-3000:]
    rc, out1 = finish(first)
    assert rc == 0, out1[-3000:]
    assert [b["status"] for b in backups(repo)] == ["complete"]
    assert not glob.glob(os.path.join(repo, ".locks", "*.lock"))
    assert c.backups_in_progress() == 0


def test_destination_fills_up(make_cluster, playbook, tmp_path):
    c = make_cluster(15)
    c.sql("CREATE TABLE filler AS SELECT g, md5(g::text) AS h FROM generate_series(1, 300000) g")
    mnt = make_pg_dir("pgops-small-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", mnt], check=True)
    try:
        subprocess.run(["chown", "postgres:", mnt], check=True)
        repo = os.path.join(mnt, "repo")
        # The free-space pre-flight would refuse this; a tiny margin lets the copy hit the wall.
        run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_space_margin=0.0001))
        assert run.rc != 0
        assert "No space left on device" in run.stdout, run.stdout[-3000:]
        (info,) = backups(repo)
        assert info["status"] == "failed"
        assert_nothing_left(c, repo)
        # With the default margin the pre-flight refuses before anything starts.
        refused = playbook(BACKUP, extra_vars=backup_vars(c, repo))
        assert refused.rc != 0
        assert "destination_insufficient_space" in refused.stdout
        assert len(backups(repo)) == 1
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)


def test_a_copy_that_cannot_be_planned_fails_the_backup_cleanly_and_the_next_run_proceeds(make_cluster, playbook):
    """The copy plans once attached to the keeper (a long walk cannot outlast the lease): a plan refused
    (cpio and a file with several hard links) fails the backup naming the cause, ends the session and frees
    the lock; a tar backup of the same cluster then succeeds."""
    c = make_cluster(15)
    os.link(os.path.join(c.data, "PG_VERSION"), os.path.join(c.data, "pgops_test_hard_link"))
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_method="cpio"))
    assert run.rc != 0
    assert "nothing copied: 2 file(s) of the data directory have several hard links" in run.stdout, run.stdout[-3000:]
    (info,) = backups(repo)
    assert info["status"] == "failed"
    assert_nothing_left(c, repo)
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_method="tar"))
    assert run.rc == 0, run
    assert sorted(b["status"] for b in backups(repo)) == ["complete", "failed"]


def test_unwritable_repository(make_cluster, playbook, tmp_path):
    c = make_cluster(15)
    repo = tempfile_root_dir()
    run = playbook(BACKUP, extra_vars=backup_vars(c, os.path.join(repo, "r")))
    assert run.rc != 0
    assert "Permission denied" in run.stdout, run.stdout[-3000:]
    assert c.backups_in_progress() == 0
    assert not os.path.exists(os.path.join(repo, "r"))
    os.rmdir(repo)


def tempfile_root_dir() -> str:
    d = scratch_dir("pgops-rootonly-")
    os.chmod(d, 0o755)  # owned by root: the postgres user cannot write here
    return d


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({"pg_backup_method": "zip"}, "pg_backup_method"),
        ({"pg_backup_compression": "bzip2"}, "pg_backup_compression"),
        ({"pg_backup_repository": "relative/path"}, "must be an absolute path"),
        ({"pg_backup_label": "x" * 1100}, "pg_backup_label is 1100 bytes in UTF-8; PostgreSQL accepts at most 1024 bytes"),
        # 700 characters, 1400 bytes: the limit is PostgreSQL's, in bytes.
        ({"pg_backup_label": "é" * 700}, "pg_backup_label is 1400 bytes in UTF-8"),
        ({"pg_backup_label": "a\nb"}, "pg_backup_label must be one line"),
        ({"pg_backup_method": "rsync", "pg_backup_compression": "zstd"}, "compression must be none"),
        # Refused before the copy, not by retention once the backup is complete (its rescue would delete it).
        ({"pg_backup_keep": -1}, "pg_backup_keep (a count of backups) and pg_backup_keep_days (days) must be 0 (off) or more"),
        ({"pg_backup_keep_days": "nan"}, "must be 0 (off) or more (got 0 and nan)"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(extra, expected, make_cluster, playbook):
    c = make_cluster(15)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    archived = c.sql("SELECT archived_count FROM pg_stat_archiver")[0][0]
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, **extra))
    assert run.rc != 0
    assert expected in run.stdout, run.stdout[-3000:]
    assert not os.path.exists(repo)
    assert c.backups_in_progress() == 0
    assert c.sql("SELECT archived_count FROM pg_stat_archiver")[0][0] == archived, "not even the archiving proof may run"


def test_repository_inside_data_directory_is_refused(make_cluster, playbook):
    c = make_cluster(15)
    run = playbook(BACKUP, extra_vars=backup_vars(c, os.path.join(c.data, "backups")))
    assert run.rc != 0
    assert "destination_inside_data_directory" in run.stdout, run.stdout[-3000:]
    assert not os.path.exists(os.path.join(c.data, "backups"))
    assert c.backups_in_progress() == 0


def _metrics(path: str) -> dict:
    out = {}
    for line in open(path).read().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series.split("{")[0]] = float(value)
    return out


def test_metrics_file_follows_complete_and_failed_backups(make_cluster, playbook, tmp_path):
    c = make_cluster(16)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    prom_dir = make_pg_dir("pgops-prom-")
    prom = os.path.join(prom_dir, "pgops_backup.prom")
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_compression="zstd", pg_backup_metrics_file=prom))
    assert run.rc == 0, run
    (info,) = backups(repo)
    got = _metrics(prom)
    assert oct(os.stat(prom).st_mode & 0o777) == "0o644"  # node_exporter reads it as another user
    assert got["pgops_backup_complete_backups"] == 1 and got["pgops_backup_failed_backups"] == 0
    completed = datetime.datetime.fromisoformat(info["completed_at"]).timestamp()
    assert got["pgops_backup_last_complete_timestamp_seconds"] == completed
    assert got["pgops_backup_last_complete_bytes"] == info["bytes"] > 0
    assert got["pgops_backup_last_complete_wal_files"] == info["wal_files"]
    assert got["pgops_backup_last_failure_timestamp_seconds"] == 0
    # A failure (here: the catalog module, as the role's rescue calls it) updates the same file.
    fail = playbook(
        [
            {
                "hosts": "postgresql",
                "gather_facts": False,
                "become": True,
                "become_user": "postgres",
                "tasks": [
                    {
                        "name": "open",
                        "pgops.online_backup.pg_backup_catalog": {
                            "repository": repo,
                            "state": "running",
                            "cluster": info["system_identifier"],
                        },
                        "register": "r",
                    },
                    {
                        "name": "fail",
                        "pgops.online_backup.pg_backup_catalog": {
                            "repository": repo,
                            "state": "failed",
                            "backup_id": "{{ r.backup_id }}",
                            "cluster": info["system_identifier"],
                            "error": "test",
                            "metrics_file": prom,
                        },
                    },
                ],
            }
        ]
    )
    assert fail.rc == 0, fail
    got = _metrics(prom)
    assert got["pgops_backup_complete_backups"] == 1 and got["pgops_backup_failed_backups"] == 1
    assert got["pgops_backup_last_failure_timestamp_seconds"] > 0
    assert got["pgops_backup_last_complete_timestamp_seconds"] == completed


def test_check_mode_runs_preflight_and_starts_nothing(make_cluster, playbook):
    c = make_cluster(15)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo), check=True)
    assert run.rc == 0, run
    assert "would back up" in run.stdout
    assert not os.path.exists(repo)
    assert c.backups_in_progress() == 0


@pytest.mark.parametrize("method,compression", [("tar", "zstd"), ("cpio", "lz4"), ("rsync", "none")])
def test_manifest_recorded_during_copy_verifies(method, compression, make_cluster, playbook):
    c = make_cluster(15)
    loc = make_pg_dir("pgops-ts-")
    c.sql(f"CREATE TABLESPACE tsm LOCATION '{loc}'")
    c.sql("CREATE TABLE m TABLESPACE tsm AS SELECT g FROM generate_series(1, 20000) g")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_method=method, pg_backup_compression=compression))
    assert run.rc == 0, run
    # The repository is on the database host: the stop writes the manifest and completes the backup.
    manifest = run.task("Write the manifest, mark the backup complete and apply retention")["manifest"]
    assert manifest["from_copy_step"] is True
    # CRC32C, pg_basebackup's default, as the node has a C implementation of it (python3-crc32c).
    assert manifest["checksum_algorithm"] == "CRC32C"
    (info,) = backups(repo)
    bdir = os.path.join(repo, info["id"])
    assert not os.path.exists(os.path.join(bdir, ".pgops-copy-entries.json"))
    verify = playbook(
        [
            {
                "hosts": "postgresql",
                "gather_facts": False,
                "tasks": [
                    {
                        "name": "verify",
                        "pgops.online_backup.pg_backup_manifest": {"path": bdir, "state": "verified", "wal_archive": c.archive},
                    },
                ],
            }
        ]
    )
    assert verify.rc == 0, verify
    assert verify.task("verify")["verified"] is True
    if method == "rsync":
        tool = subprocess.run(
            ["/usr/lib/postgresql/15/bin/pg_verifybackup", "-w", c.archive, os.path.join(bdir, "data")],
            capture_output=True,
            text=True,
        )
        assert tool.returncode == 0, tool.stdout + tool.stderr
    subprocess.run(["rm", "-rf", loc], check=False)


def test_killed_run_mid_copy_frees_the_lock_at_once_and_the_next_run_proceeds(make_cluster, playbook, tmp_path):
    """Ctrl-C or a lost controller mid-copy: the copy task dies with its run, its keeper sees
    the copy's connection close and ends the backup at once; the next run, started right
    away, finds the lock's session ended, marks the dead backup failed and succeeds."""
    c = slow_cluster(make_cluster)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    # The default lease and lock grace: neither may be what frees the lock.
    proc = start_backup_in_background(c, repo, str(tmp_path / "w"))
    wait_for_copy(repo)
    assert c.backups_in_progress() == 1
    # The whole run with its module processes (sudo runs them in a session of their own: a
    # signal to the run's process group misses them), as Ctrl-C or a dropped ssh connection
    # leaves it. The keeper is not among them: it is a daemon of its own.
    for pid in [proc.pid] + descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    killed = time.monotonic()
    deadline = killed + 5
    while c.backups_in_progress():
        assert time.monotonic() < deadline, "the keeper did not end the backup when its copy task died"
        time.sleep(0.1)
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo))
    assert run.rc == 0, run
    assert "removed a stale lock" in run.stdout + run.stderr
    statuses = sorted((b["id"], b["status"]) for b in backups(repo))
    assert [s for _, s in statuses] == ["failed", "complete"], statuses
    dead = backups(repo)[0]
    assert "the copy task attached to this backup went away" in dead["error"], dead["error"]
    assert c.backups_in_progress() == 0


def test_lease_is_renewed_through_a_long_copy(make_cluster, playbook):
    c = slow_cluster(make_cluster)
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    extra = dict(pg_backup_lease=5, pg_backup_compression="gzip", pg_backup_compression_level=9, pg_backup_compression_threads=1)
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, **extra))
    assert run.rc == 0, run
    (info,) = backups(repo)
    assert info["status"] == "complete" and float(info["copy_seconds"]) > 5, info["copy_seconds"]
