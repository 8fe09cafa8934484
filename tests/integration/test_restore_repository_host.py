"""Restore from a repository host (issue 16): backups of a PostgreSQL 16 cluster go over ssh to a repository
host (a full one, then a file-level incremental taken while rows are written), its WAL is archived there by
pgops-wal, and the restore playbook, run on a third host with another data directory and port, pulls the chain
from the repository host over ssh and recovers to a time between two inserts with pgops-wal getting the WAL from
there. Also: the verification over ssh, a drill from the repository host, and bad repository host settings
refused before anything runs."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time

import psycopg2
import pytest
from harness.ansible import REPO, local_inventory
from harness.backup import BACKUP, backup_vars
from harness.pg import as_postgres, chown_pg, free_port, make_pg_dir, stop_data_directory
from harness.scratch import scratch_dir
from harness.ssh import ADMIN_USER
from harness.wal import install_pgops_wal
from harness.workload import Writer

RESTORE = os.path.join(REPO, "playbooks", "restore.yml")
DRILL = os.path.join(REPO, "playbooks", "drill.yml")


def failures(run) -> str:
    return " | ".join(str(r["result"].get("msg")) for r in run.results if r["status"] == "failed")


def result_of(run, prefix: str) -> dict:
    found = [r["result"] for r in run.results if r["task"].startswith(prefix)]
    assert found, f"no task {prefix!r}: {[r['task'] for r in run.results]}"
    return found[-1]


def read_backup(repo: str, bid: str) -> dict:
    with open(os.path.join(repo, bid, "backup.json")) as f:
        return json.load(f)


def wait_archived(repo_wal: str, segment: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(repo_wal, segment + ".zst")):
        assert time.monotonic() < deadline, f"{segment} did not reach the repository host"
        time.sleep(0.1)


@pytest.mark.ssh
def test_restore_on_a_third_host_from_a_repository_host_with_pitr(make_cluster, playbook, ssh_host):
    began = time.monotonic()
    repo_host, new_host = ssh_host("127.0.0.11"), ssh_host("127.0.0.12")
    # The postgres OS user of the database host and of the restore host logs in to the repository host with a key.
    keydir = make_pg_dir("pgops-pgkey-")
    key = os.path.join(keydir, "id_repo")
    shutil.copyfile(repo_host.private_key, key)
    os.chmod(key, 0o600)
    chown_pg(key)
    ssh_options = ["-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    # The repository belongs to the repository host's own user.
    root = scratch_dir("pgops-repohost-")
    repo = os.path.join(root, "repo")
    os.mkdir(repo, 0o700)
    for d in (root, repo):
        shutil.chown(d, ADMIN_USER, ADMIN_USER)
    # pgops-wal, where the archiving role would have put it (one path on every host: they share this machine).
    prog_base = make_pg_dir("pgops-prog-")
    os.chown(prog_base, 0, 0)
    prog = install_pgops_wal(os.path.join(prog_base, "lib"), os.path.join(prog_base, "pgops-wal"))
    target_root = make_pg_dir("pgops-newhost-")
    data = os.path.join(target_root, "pgdata16")
    try:
        c = make_cluster(16)
        sysid = str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
        wal_dir = os.path.join(repo, "wal", sysid)
        where = f"--repository {repo} --cluster {sysid} --host {ADMIN_USER}@{repo_host.address} --ssh-port {repo_host.port} "
        where += " ".join(f"--ssh-option={o}" for o in ssh_options) + f" --remote-program {prog}"
        c.sql(f"ALTER SYSTEM SET archive_command = '{prog} push {where} --compression zstd %p'")
        c.sql("SELECT pg_reload_conf()")
        c.sql("CREATE TABLE marks (tag text)")
        bv = dict(pg_backup_repository_host="repo1", pg_backup_repository_user=ADMIN_USER,
                  pg_backup_repository_ssh_port=repo_host.port, pg_backup_repository_ssh_options=ssh_options,
                  pg_backup_method="tar", pg_backup_compression="zstd")  # fmt: skip
        inventory = local_inventory() + repo_host.inventory(group="repository", hostname="repo1")
        full = playbook(BACKUP, inventory, extra_vars=backup_vars(c, repo, **bv))
        assert full.rc == 0, full
        writer = Writer(c)
        writer.start()
        try:
            time.sleep(0.3)
            incr = playbook(BACKUP, inventory, extra_vars=backup_vars(c, repo, pg_backup_type="incremental", **bv))
            time.sleep(0.3)
        finally:
            writer.stop()
        assert incr.rc == 0, incr
        assert writer.error is None
        ids = sorted(n for n in os.listdir(repo) if n.startswith("2"))
        assert len(ids) == 2, ids
        info = read_backup(repo, ids[1])
        assert info["type"] == "incremental" and info["parent"] == ids[0], info
        stop = datetime.datetime.fromisoformat(info["stop_requested_at"])
        during = [n for n, at in writer.committed if datetime.datetime.fromisoformat(info["started_at"]) < at < stop]
        assert during, "nothing was written while the incremental backup ran: the test would prove nothing"
        c.sql("INSERT INTO marks VALUES ('A')")
        target = c.sql("SELECT clock_timestamp()::text")[0][0]
        time.sleep(0.3)
        c.sql("INSERT INTO marks VALUES ('B')")
        wait_archived(wal_dir, c.sql("SELECT pg_walfile_name(pg_switch_wal())")[0][0])

        inventory = repo_host.inventory(group="repository", hostname="repo1") + new_host.inventory(group="newdb", hostname="db2")
        port = free_port()
        assert port != c.port
        rv = {
            "pg_restore_hosts": "db2", "pg_restore_repository": repo, "pg_restore_repository_host": "repo1",
            "pg_restore_repository_user": ADMIN_USER, "pg_restore_repository_ssh_port": repo_host.port,
            "pg_restore_repository_ssh_options": ssh_options, "pg_restore_data_directory": data, "pg_restore_port": port,
            "pg_restore_unix_socket_directory": target_root, "pg_restore_target": "time",
            "pg_restore_target_value": target, "pg_restore_wal_program": prog,
            "pg_archiving_install_dir": os.path.join(prog_base, "lib"), "pg_restore_recovery_timeout": 120,
        }  # fmt: skip

        # The hosts share this machine's files, but the repository is private to the repository host's user:
        # the restore host's postgres reads it only over ssh (backup, chain, WAL check, recovery's WAL).
        assert as_postgres(["test", "-r", wal_dir], check=False).returncode != 0
        phases = {"setup and two backups": time.monotonic() - began}

        t0 = time.monotonic()
        run = playbook(RESTORE, inventory, extra_vars=rv)
        phases["restore"] = time.monotonic() - t0
        assert run.rc == 0, run
        found = result_of(run, "Find backup latest in repo1:")
        assert found["backup"]["id"] == ids[1], found  # the newest backup that stopped before the target
        verified = result_of(run, f"Verify backup {ids[1]}")
        assert verified["verified"] is True and verified["files"] > 0, verified
        assert read_backup(repo, ids[1])["verification"]["verified"] is True  # recorded on the repository host
        prepared = result_of(run, f"Restore backup {ids[1]}")
        assert f"from {ADMIN_USER}@{repo_host.address}" in prepared["msg"], prepared["msg"]
        assert prepared["chain"] == ids and prepared["data_directory"] == data and prepared["port"] == port
        assert prepared["taken_from"].get(ids[0]), prepared  # the unchanged files came from the full backup's archive
        command = prepared["settings"]["restore_command"]
        assert command.startswith(f"{prog} get --repository {repo} --cluster {sysid} --host {ADMIN_USER}@"), command
        server = result_of(run, "Start the restored server")
        assert server["state"] == "promoted" and server["recovery_stop"].startswith("recovery stopping"), server
        conn = psycopg2.connect(host=target_root, port=port, user="postgres", dbname="postgres")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT tag FROM marks")
                assert sorted(r[0] for r in cur.fetchall()) == ["A"]  # committed before the target; B after it
                cur.execute("SELECT id FROM writer_log")
                got = {r[0] for r in cur.fetchall()}
                cur.execute("SHOW data_directory")
                assert cur.fetchone()[0] == data
        finally:
            conn.close()
        assert writer.committed_before(stop) <= got, f"{len(writer.committed_before(stop) - got)} rows are missing"
        assert {n for n, _ in writer.committed} <= got  # every row committed before the target
        stop_data_directory(data)

        # The verification streamed over ssh (what an encrypted backup gets: checked where the key is), recorded there.
        play = [{"hosts": "db2", "gather_facts": False, "become": True, "become_user": "postgres", "tasks": [{
            "name": "verify over ssh", "pgops.online_backup.pg_backup_manifest": {
                "path": os.path.join(repo, ids[1]), "state": "verified", "repository_host": f"{ADMIN_USER}@{repo_host.address}",
                "ssh_port": repo_host.port, "ssh_options": ssh_options}}]}]  # fmt: skip
        before = read_backup(repo, ids[1])["verification"]["at"]
        time.sleep(1.1)
        t0 = time.monotonic()
        over = playbook(play, inventory)
        phases["verification over ssh"] = time.monotonic() - t0
        assert over.rc == 0, over
        result = over.task("verify over ssh")
        assert result["verified"] is True and result["files"] == verified["files"], result
        assert result["msg"].startswith(f"backup {ADMIN_USER}@{repo_host.address}:{repo}/{ids[1]} verified"), result["msg"]
        assert read_backup(repo, ids[1])["verification"]["at"] > before

        # A drill on the new host of the full backup (chosen by id), from the repository host: recorded there.
        dv = {k: v for k, v in rv.items() if not k.startswith(("pg_restore_target", "pg_restore_data", "pg_restore_port"))}
        t0 = time.monotonic()
        drill = playbook(DRILL, inventory, extra_vars=dict(dv, pg_restore_drill_host="db2", pg_restore_backup=ids[0]))
        phases["drill"] = time.monotonic() - t0
        assert drill.rc == 0, drill
        assert result_of(drill, "Restore the backup into the scratch directory")["backup_id"] == ids[0]
        assert read_backup(repo, ids[0])["drill"]["result"] == "passed"
    finally:
        stop_data_directory(data)
        for d in (target_root, root, keydir, prog_base):
            shutil.rmtree(d, ignore_errors=True)
    print(f"restore from a repository host: {time.monotonic() - began:.1f} s", {k: round(v, 1) for k, v in phases.items()})


def test_bad_repository_host_settings_are_refused_before_anything_runs(playbook):
    root = make_pg_dir("pgops-bad-")
    data = os.path.join(root, "data")
    try:
        ev = {"pg_restore_repository": "/backup/pg", "pg_restore_repository_host": "nosuchhost",
              "pg_restore_repository_user": "", "pg_restore_repository_ssh_port": 0,
              "pg_restore_data_directory": data, "pg_restore_port": 0}  # fmt: skip
        run = playbook(RESTORE, local_inventory(), extra_vars=ev)
        assert run.rc != 0, run
        msg = failures(run)
        assert "pg_restore_repository_host 'nosuchhost' is not a host of the inventory" in msg, msg
        assert "pg_restore_repository_host needs pg_restore_repository_user" in msg, msg
        assert "pg_restore_repository_ssh_port must be a port number (got 0)" in msg, msg
        assert [r["task"] for r in run.results if r["status"] == "failed"] == ["Validate the repository host settings"]
        assert not [r for r in run.results if r["task"].startswith(("Find backup", "Write the", "Create the"))], run.results
        drill = playbook(DRILL, local_inventory(), extra_vars=dict(ev, pg_restore_repository="s3://bucket/pg",
                                                                    pg_restore_repository_user="postgres"))  # fmt: skip
        assert drill.rc != 0, drill
        assert "pg_restore_repository_host is for a repository reached over ssh, not for an s3:// repository" in failures(drill)
        assert not os.path.exists(data)
    finally:
        shutil.rmtree(root, ignore_errors=True)
