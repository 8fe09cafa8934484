"""Backups written to a repository on another host (SSH from the database host)."""

from __future__ import annotations

import datetime
import glob
import json
import os
import pwd
import shutil
import stat
import subprocess
import time

import pytest
from harness.ansible import REPO, local_inventory
from harness.layout import restore_backup
from harness.pg import chown_pg, make_pg_dir
from harness.scratch import scratch_dir
from harness.ssh import ADMIN_USER
from harness.workload import Writer

BACKUP = os.path.join(REPO, "playbooks", "backup.yml")


@pytest.mark.ssh
@pytest.mark.parametrize(
    "method,compression,encrypted", [("tar", "zstd", False), ("rsync", "none", False), ("tar", "none", True)]
)
def test_backup_streams_to_a_repository_host(method, compression, encrypted, make_cluster, playbook, ssh_host):
    c = make_cluster(15)
    identity = public = None
    if encrypted:
        # Encrypted on the database host: only ciphertext crosses ssh and lands on the repository host.
        identity = os.path.join(scratch_dir("pgops-keys-"), "identity.txt")
        subprocess.run(["age-keygen", "-o", identity], check=True, capture_output=True)
        public = subprocess.run(["age-keygen", "-y", identity], check=True, capture_output=True, text=True).stdout.strip()
        marker = f"PGOPS-CLEARTEXT-MARKER-{os.urandom(6).hex()}"
        c.sql("CREATE TABLE secret AS SELECT %s::text AS t FROM generate_series(1, 50)", (marker,))
        c.sql("CHECKPOINT")
    host = ssh_host("127.0.0.5")
    # The database host's OS user (postgres) reaches the repository host with its own key.
    keydir = make_pg_dir("pgops-pgkey-")
    key = os.path.join(keydir, "id_backup")
    shutil.copyfile(host.private_key, key)
    os.chmod(key, 0o600)
    chown_pg(key)
    root = scratch_dir("pgops-remote-repo-")
    shutil.chown(root, ADMIN_USER, ADMIN_USER)
    repo = os.path.join(root, "repo")
    inventory = local_inventory() + host.inventory(group="repository", hostname="repo1")
    writer = Writer(c)
    writer.start()
    try:
        time.sleep(0.3)
        run = playbook(
            BACKUP,
            inventory,
            extra_vars={
                "pg_backup_repository": repo,
                "pg_backup_login_unix_socket": c.sock,
                "pg_backup_port": c.port,
                "pg_backup_fast_checkpoint": True,
                "pg_backup_method": method,
                "pg_backup_compression": compression,
                "pg_backup_encryption": "age" if encrypted else "none",
                "pg_backup_age_recipients": [public] if encrypted else [],
                "pg_backup_repository_host": "repo1",
                "pg_backup_repository_user": ADMIN_USER,
                "pg_backup_repository_ssh_port": host.port,
                "pg_backup_repository_ssh_options": [
                    "-i",
                    key,
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                ],
            },
        )
    finally:
        writer.stop()
        shutil.rmtree(keydir, ignore_errors=True)
    try:
        assert run.rc == 0, run
        (path,) = glob.glob(os.path.join(repo, "2*", "backup.json"))
        info = json.load(open(path))
        bdir = os.path.dirname(path)
        assert info["status"] == "complete" and info["repository_host"] == "repo1"
        assert info["manifest"]["files"] > 100
        for name in os.listdir(bdir):
            st = os.lstat(os.path.join(bdir, name))
            assert st.st_uid == pwd.getpwnam(ADMIN_USER).pw_uid, name
            assert stat.S_IMODE(st.st_mode) & 0o077 == 0, name
        label = os.path.join(bdir, "data/backup_label" if method == "rsync" else "backup_label")
        assert (
            open(label).read()
            == run.task("Stop the backup, write backup_label into it and wait for its WAL to be archived")["labelfile"]
        )
        assert not os.path.exists(os.path.join(bdir, ".pgops-copy-entries.json"))
        assert not glob.glob(os.path.join(repo, ".locks", "*.lock"))
        if encrypted:
            assert info["files"] == ["base.tar.age"] and info["encryption"]["recipients"] == [public], info
            for base, _dirs, names in os.walk(root):
                for name in names:
                    assert marker.encode() not in open(os.path.join(base, name), "rb").read(), f"cleartext in {name}"
        restored = restore_backup(bdir, c.archive, 15, identity=identity)
        try:
            got = {r[0] for r in restored.sql("SELECT id FROM writer_log")}
            assert writer.committed_before(datetime.datetime.fromisoformat(info["stop_requested_at"])) <= got
        finally:
            restored.destroy()
    finally:
        shutil.rmtree(root, ignore_errors=True)
