"""WAL archived by pgops-wal into a real S3 server (SeaweedFS), compressed and encrypted,
and fetched by recovery from there: point-in-time recovery of a backup under load."""

from __future__ import annotations

import datetime
import os
import pwd
import secrets
import subprocess
import time

from harness.ansible import REPO
from harness.backup import BACKUP, backup_vars, backups
from harness.pg import chown_pg, make_pg_dir, pg_bin, stop_data_directory
from harness.wal import install_pgops_wal
from harness.workload import Writer, pgbench_init, pgbench_start, pgbench_stop, written_ids

RESTORE = os.path.join(REPO, "playbooks", "restore.yml")
ARCHIVING = os.path.join(REPO, "playbooks", "archiving.yml")


def test_wal_to_s3_encrypted_and_point_in_time_recovery_from_it(make_cluster, playbook, s3_server, s3_bucket, tmp_path):
    bucket = s3_bucket
    url = f"s3://{bucket}/fleet/pg17"
    keys = make_pg_dir("pgops-keys-")
    identity = os.path.join(keys, "identity.txt")
    subprocess.run(["age-keygen", "-o", identity], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", identity], check=True, capture_output=True, text=True).stdout.strip()
    chown_pg(identity)
    config = s3_server.settings_file(keys)
    prog = install_pgops_wal(os.path.join(make_pg_dir("pgops-prog-"), "install"))
    where = ["--repository", url, "--s3-config", config]
    c = make_cluster(17)
    c.sql("ALTER SYSTEM SET archive_command = %s", (" ".join([prog, "push", *where, "--age-recipient", public, "%p"]),))
    c.sql("SELECT pg_reload_conf()")
    assert s3_server.access_key not in c.sql("SHOW archive_command")[0][0]
    sysid = str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    marker = f"PGOPS-CLEARTEXT-MARKER-{secrets.token_hex(8)}"
    c.sql("CREATE TABLE secret AS SELECT %s::text AS t FROM generate_series(1, 100)", (marker,))
    pgbench_init(c)
    bench = pgbench_start(c)
    writer = Writer(c)
    writer.start()
    local_repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        time.sleep(1)
        run = playbook(BACKUP, extra_vars=backup_vars(c, local_repo, pg_backup_compression="zstd"))
        assert run.rc == 0, run
        time.sleep(2)
        target = datetime.datetime.now(datetime.timezone.utc)
        time.sleep(2)
    finally:
        writer.stop()
        pgbench_stop(bench)
    c.sql("SELECT pg_switch_wal()")
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline and c.sql("SELECT last_archived_time > %s FROM pg_stat_archiver", (target,))[0][0] is not True
    ):
        time.sleep(0.5)
    (b,) = backups(local_repo)

    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"fleet/pg17/wal/{sysid}/")
    names = [o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])]
    assert f"{b['start_wal']}.zst.age" in names and f"{b['start_wal']}.zst.age.sha256" in names, names
    for obj in listed["Contents"]:
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        assert marker.encode() not in body, f"cleartext in {obj['Key']}"
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")

    # Recovery gets its WAL from the bucket with pgops-wal get and the private key.
    root = make_pg_dir("pgops-restore-")
    data = os.path.join(root, "data")
    get = " ".join([prog, "get", *where, "--age-identity-file", identity, "%f", "%p"])
    rv = {
        "pg_restore_repository": local_repo, "pg_restore_data_directory": data, "pg_restore_port": 0,
        "pg_restore_unix_socket_directory": root, "pg_restore_recovery_timeout": 120, "pg_restore_restore_command": get,
        "pg_restore_target": "time", "pg_restore_target_value": target.isoformat(sep=" "),
    }  # fmt: skip
    run = playbook(RESTORE, extra_vars=rv)
    try:
        assert run.rc == 0, run
        port = run.task(f"Restore backup {b['id']} into {data}")["port"]
        ids = written_ids(root, port)
        slack = datetime.timedelta(seconds=0.1)
        assert writer.committed_before(target - slack) <= ids <= writer.committed_before(target + slack)
        stopped = datetime.datetime.fromisoformat(b["stopped_at"].replace("Z", "+00:00"))
        assert writer.committed_before(stopped), "no rows were written while the backup ran"
    finally:
        stop_data_directory(data)

    # The command by hand: a missing name is exit 1; a repeated push is success, different content refused.
    missing = subprocess.run([prog, "get", *where, "--cluster", sysid, "0000000100000099000000FF", str(tmp_path / "x")])
    assert missing.returncode == 1
    plain = tmp_path / b["start_wal"]
    got = subprocess.run([prog, "get", *where, "--cluster", sysid, "--age-identity-file", identity, b["start_wal"], str(plain)])
    assert got.returncode == 0
    again = subprocess.run(
        [prog, "push", *where, "--cluster", sysid, "--age-recipient", public, str(plain)], capture_output=True, text=True
    )
    assert again.returncode == 0 and "already archived with the same content" in again.stderr, again
    with open(plain, "r+b") as f:
        f.write(b"different")
    clash = subprocess.run(
        [prog, "push", *where, "--cluster", sysid, "--age-recipient", public, str(plain)], capture_output=True, text=True
    )
    assert clash.returncode == 1 and "already holds a different" in clash.stderr, clash

    # Wrong credentials: recovery stops (126) instead of ending early, and says why.
    bad = s3_server.settings_file(str(tmp_path), s3_secret_key="wrong")
    denied_where = ["--repository", url, "--s3-config", bad, "--cluster", sysid]
    denied = subprocess.run([prog, "get", *denied_where, b["start_wal"], str(tmp_path / "y")], capture_output=True, text=True)
    assert denied.returncode == 126 and "credentials" in denied.stderr, denied.stderr


def test_archiving_role_to_s3_checks_the_bucket_before_it_changes_anything(make_cluster, playbook, s3_server, s3_bucket):
    bucket = s3_bucket
    c = make_cluster(13, archive_mode="off")
    base = make_pg_dir("pgops-prog-")
    os.chown(base, 0, 0)
    settings = os.path.join(base, "etc", "s3.json")
    v = {
        "pg_archiving_repository": f"s3://{bucket}/pg13", "pg_archiving_login_unix_socket": c.sock,
        "pg_archiving_port": c.port, "pg_archiving_restart": True,
        "pg_archiving_pg_ctl": os.path.join(pg_bin(13), "pg_ctl"), "pg_archiving_install_dir": os.path.join(base, "lib"),
        "pg_archiving_program": os.path.join(base, "pgops-wal"), "pg_archiving_s3_config": settings,
        **s3_server.role_vars("pg_archiving"),
    }  # fmt: skip
    wrong = "WRONG" + secrets.token_hex(8)
    denied = playbook(ARCHIVING, extra_vars={**v, "pg_archiving_s3_secret_key": wrong})
    assert denied.rc != 0 and "S3 credentials were refused" in denied.stdout, denied
    assert c.sql("SHOW archive_mode")[0][0] == "off", "PostgreSQL was changed before the bucket was checked"
    assert wrong not in denied.stdout, "the secret key appeared in the output"

    run = playbook(ARCHIVING, extra_vars={**v, "pg_archiving_s3_secret_key": s3_server.secret_key})
    assert run.rc == 0, run
    assert run.task("Prove that archiving works (switch WAL, wait until that segment is archived)")["proof"]["archived"]
    command = c.sql("SHOW archive_command")[0][0]
    assert f"--s3-config {settings}" in command and s3_server.secret_key not in command, command
    st = os.stat(settings)
    assert st.st_mode & 0o777 == 0o600 and pwd.getpwuid(st.st_uid).pw_name == "postgres"
    assert s3_server.secret_key not in run.stdout
    sysid = str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"pg13/wal/{sysid}/").get("Contents", [])]
    assert any(k.endswith(".zst") for k in keys), keys
