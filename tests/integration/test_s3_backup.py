"""Backups into a real S3 server (SeaweedFS): streamed from the copy into multipart uploads
under load, the catalog and the lock in the bucket, restored by hand from what any S3 client
downloads; a server killed mid-upload leaves no upload behind once the next run has passed;
wrong credentials and a missing bucket are refused before the start."""

from __future__ import annotations

import datetime
import glob
import json
import os
import secrets
import shutil
import subprocess
import time

import pytest
from harness.ansible import REPO
from harness.backup import BACKUP, backup_vars, finish, start_backup_in_background
from harness.layout import restore_backup
from harness.pg import make_pg_dir, stop_data_directory
from harness.s3 import SeaweedS3
from harness.scratch import scratch_dir
from harness.wal import install_pgops_wal
from harness.workload import Writer, pgbench_init, pgbench_start, pgbench_stop, written_ids

RESTORE = os.path.join(REPO, "playbooks", "restore.yml")
DRILL = os.path.join(REPO, "playbooks", "drill.yml")
STATUS = os.path.join(REPO, "playbooks", "status.yml")
EXPIRE = os.path.join(REPO, "playbooks", "expire.yml")
PIN = os.path.join(REPO, "playbooks", "pin.yml")

BUCKET = "pgops-backups"


def s3_vars(server, url: str, **extra) -> dict:
    return {"pg_backup_repository": url, **server.role_vars("pg_backup"), **extra}


def objects(server, bucket: str, prefix: str) -> dict:
    """{key: size} of what a plain S3 client lists."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def bucket_json(server, bucket: str, key: str) -> dict:
    return json.loads(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def download_backup(server, bucket: str, prefix: str, backup_id: str) -> str:
    """The backup's objects into a local directory, with boto3 alone (as any S3 client would)."""
    target = scratch_dir("pgops-s3-download-")
    client = server.client()
    for key in objects(server, bucket, f"{prefix}/{backup_id}/"):
        client.download_file(bucket, key, os.path.join(target, key.rsplit("/", 1)[1]))
    return target


@pytest.mark.parametrize("major,encrypted", [(13, False), (17, True)])
def test_backup_streams_into_s3_under_load_and_restores_by_hand(major, encrypted, make_cluster, playbook, s3_server, s3_bucket):
    bucket = s3_bucket
    prefix = f"fleet/pg{major}"
    c = make_cluster(major)
    pgbench_init(c, scale=5)
    identity = public = None
    extra = {"pg_backup_compression": "zstd"}
    if encrypted:
        identity = os.path.join(scratch_dir("pgops-keys-"), "identity.txt")
        subprocess.run(["age-keygen", "-o", identity], check=True, capture_output=True)
        public = subprocess.run(["age-keygen", "-y", identity], check=True, capture_output=True, text=True).stdout.strip()
        extra.update(pg_backup_encryption="age", pg_backup_age_recipients=[public], pg_backup_compression="none")
        marker = f"PGOPS-CLEARTEXT-MARKER-{secrets.token_hex(8)}"
        c.sql("CREATE TABLE secret AS SELECT %s::text AS t FROM generate_series(1, 100)", (marker,))
        c.sql("CHECKPOINT")
    bench = pgbench_start(c)
    writer = Writer(c)
    writer.start()
    try:
        time.sleep(0.5)
        run = playbook(BACKUP, extra_vars=backup_vars(c, "/unused", **s3_vars(s3_server, f"s3://{bucket}/{prefix}", **extra)))
    finally:
        writer.stop()
        pgbench_stop(bench)
    assert run.rc == 0, run
    assert s3_server.secret_key not in run.stdout
    listed = objects(s3_server, bucket, prefix + "/")
    (bid,) = {k.split("/")[2] for k in listed if not k.split("/")[2].startswith(".")}
    info = bucket_json(s3_server, bucket, f"{prefix}/{bid}/backup.json")
    assert info["status"] == "complete" and info["encryption"]["type"] == ("age" if encrypted else "none"), info
    names = {k.rsplit("/", 1)[1] for k in listed if k.startswith(f"{prefix}/{bid}/")}
    expected_base = "base.tar.age" if encrypted else "base.tar.zst"
    assert {"backup.json", "backup_label", "backup_manifest", expected_base} <= names, names
    assert ".pgops-copy-entries.json" not in names
    assert info["manifest"]["files"] > 100 and info["manifest"]["from_copy_step"] is True, info["manifest"]
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert not [k for k in listed if "/.locks/" in k], "the lock was not released"
    if encrypted:
        client = s3_server.client()
        for key in listed:
            assert marker.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read(), f"cleartext in {key}"

    local = download_backup(s3_server, bucket, prefix, bid)
    try:
        restored = restore_backup(local, c.archive, major, identity=identity)
        try:
            got = {r[0] for r in restored.sql("SELECT id FROM writer_log")}
            stop = datetime.datetime.fromisoformat(info["stop_requested_at"])
            assert writer.committed_before(stop) <= got and got, "rows written while the backup ran are missing"
        finally:
            restored.destroy()
    finally:
        shutil.rmtree(local, ignore_errors=True)


def test_wrong_credentials_and_missing_bucket_are_refused_before_the_start(make_cluster, playbook, s3_server, s3_bucket):
    bucket = s3_bucket
    c = make_cluster(16)
    wrong = "WRONG" + secrets.token_hex(8)
    cases = [
        (s3_vars(s3_server, f"s3://{bucket}/pg", pg_backup_s3_secret_key=wrong), "credentials were refused"),
        (s3_vars(s3_server, "s3://pgops-no-such-bucket/pg"), "bucket pgops-no-such-bucket does not exist"),
        (s3_vars(s3_server, f"s3://{bucket}/pg", pg_backup_method="rsync"), "a backup into an s3:// repository uses tar or cpio"),
    ]
    for extra, said in cases:
        run = playbook(BACKUP, extra_vars=backup_vars(c, "/unused", **extra))
        assert run.rc != 0 and said in run.stdout, (extra, run)
        assert wrong not in run.stdout
        assert c.backups_in_progress() == 0
    assert objects(s3_server, bucket, "") == {}


def test_server_killed_mid_upload_then_the_next_run_succeeds(make_cluster, playbook, tmp_path):
    c = make_cluster(15)
    # md5 text barely compresses and gzip -9 on one thread is slow: the upload runs for seconds, in many parts.
    c.sql("CREATE TABLE bulk AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h FROM generate_series(1, 1500000) g")
    server = SeaweedS3()
    try:
        server.start()
        bucket = server.create_bucket(BUCKET)
        url = f"s3://{bucket}/pg15"
        extra = s3_vars(server, url)
        proc = start_backup_in_background(c, "/unused", str(tmp_path), **extra)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not server.client().list_multipart_uploads(Bucket=bucket).get("Uploads"):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        assert server.client().list_multipart_uploads(Bucket=bucket).get("Uploads"), "the upload never started"
        server.kill()
        killed_at = time.monotonic()
        rc, out = finish(proc)
        assert rc != 0, out
        assert "uploading base.tar failed" in out or "cannot reach the S3 endpoint" in out, out[-3000:]
        assert c.backups_in_progress() == 0, "the session was not ended"
        server.start()
        # The dead run could not mark its record failed (the server was down): its lock is trusted for
        # pg_backup_lock_grace after its last sign of life (120 s by default), then broken. Its last
        # sign of life came before the kill: 3 s after the kill is past the grace of 2 s given below
        # (the failed run's end and the restart usually take that long already).
        time.sleep(max(0.0, killed_at + 3 - time.monotonic()))
        again = backup_vars(c, "/unused", **extra, pg_backup_compression="zstd", pg_backup_lock_grace=2)
        run = playbook(BACKUP, extra_vars=again)
        assert run.rc == 0, run
        client = server.client()
        assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads"), "an orphaned upload was left"
        infos = []
        for key in objects(server, bucket, "pg15/"):
            if key.endswith("/backup.json"):
                infos.append(bucket_json(server, bucket, key))
        assert sorted(i["status"] for i in infos) == ["complete", "failed"], infos
        failed = next(i for i in infos if i["status"] == "failed")
        assert "the run died before finishing" in failed["error"], failed
        assert "removed a stale lock" in run.stderr, run
        assert not [k for k in objects(server, bucket, f"pg15/{failed['id']}/") if not k.endswith("backup.json")]
    finally:
        server.stop(grace=2)


@pytest.mark.parametrize("major,encrypted", [(13, False), (17, True)])
def test_restore_and_drill_from_s3_with_pitr_and_wal_from_the_bucket(
    major, encrypted, make_cluster, playbook, s3_server, s3_bucket, tmp_path
):
    bucket = s3_bucket
    top = f"pg{major}"
    url = f"s3://{bucket}/{top}"
    c = make_cluster(major)
    keys, age_push, age_backup, age_restore = make_pg_dir("pgops-keys-"), "", {}, {}
    if encrypted:
        identity = os.path.join(keys, "identity.txt")
        subprocess.run(["age-keygen", "-o", identity], check=True, capture_output=True)
        public = subprocess.run(["age-keygen", "-y", identity], check=True, capture_output=True, text=True).stdout.strip()
        age_push = f" --age-recipient {public}"
        age_backup = {"pg_backup_encryption": "age", "pg_backup_age_recipients": [public]}
        age_restore = {"pg_restore_age_identity": open(identity).read()}
    prog = install_pgops_wal(os.path.join(make_pg_dir("pgops-prog-"), "install"))
    settings = s3_server.settings_file(make_pg_dir("pgops-s3cfg-"))
    c.sql("ALTER SYSTEM SET archive_command = %s", (f"{prog} push --repository {url} --s3-config {settings}{age_push} %p",))
    c.sql("SELECT pg_reload_conf()")
    pgbench_init(c)
    bench = pgbench_start(c)
    writer = Writer(c)
    writer.start()
    try:
        bv = backup_vars(c, "/unused", **s3_vars(s3_server, url, pg_backup_compression="lz4", **age_backup))
        run = playbook(BACKUP, extra_vars=bv)
        assert run.rc == 0, run
        time.sleep(1.5)
        target = datetime.datetime.now(datetime.timezone.utc)
        time.sleep(1.5)
    finally:
        writer.stop()
        pgbench_stop(bench)
    c.sql("SELECT pg_switch_wal()")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not c.sql("SELECT last_archived_time > %s FROM pg_stat_archiver", (target,))[0][0]:
        time.sleep(0.5)
    creds = {
        **s3_server.role_vars("pg_restore"), "pg_restore_wal_program": prog, "pg_restore_recovery_timeout": 120, **age_restore,
    }  # fmt: skip
    root = make_pg_dir("pgops-restore-")
    data = os.path.join(root, "data")
    rv = {
        "pg_restore_repository": url, "pg_restore_data_directory": data, "pg_restore_port": 0,
        "pg_restore_unix_socket_directory": root, "pg_restore_target": "time",
        "pg_restore_target_value": target.isoformat(sep=" "), **creds,
    }  # fmt: skip
    before = set(glob.glob("/tmp/*.s3.json"))
    run = playbook(RESTORE, extra_vars=rv)
    try:
        assert run.rc == 0, run
        assert s3_server.secret_key not in run.stdout
        bid = run.task(f"Find backup latest in {url}")["backup"]["id"]
        assert run.task(f"Verify backup {bid} against its manifest before anything changes")["verified"] is True
        port = run.task(f"Restore backup {bid} into {data}")["port"]
        ids = written_ids(root, port)
        slack = datetime.timedelta(seconds=0.1)
        assert writer.committed_before(target - slack) <= ids <= writer.committed_before(target + slack)
    finally:
        stop_data_directory(data)
    assert set(glob.glob("/tmp/*.s3.json")) == before, "the temporary S3 settings file was left behind"

    drill = playbook(DRILL, extra_vars={"pg_restore_repository": url, **creds})
    assert drill.rc == 0, drill
    info = bucket_json(s3_server, bucket, f"{top}/{bid}/backup.json")
    assert info["encryption"]["type"] == ("age" if encrypted else "none")
    assert info["drill"]["result"] == "passed" and info["verification"]["verified"] is True, info

    # The recoverability report reads the bucket; retention expires backups and WAL there.
    second = playbook(BACKUP, extra_vars=bv)
    assert second.rc == 0, second
    files = tmp_path / "status"
    files.mkdir()
    sv = {**bv, "pg_status_max_backup_age": 1, "pg_status_max_drill_age": 1, "pg_status_report_file": str(files / "s.json"),
          "pg_status_metrics_file": str(files / "s.prom")}  # fmt: skip
    status = playbook(STATUS, extra_vars=sv)
    assert status.rc == 0, status
    (row,) = json.loads((files / "s.json").read_text())["clusters"]
    newest = second.task("Open the backup's record and take the cluster's lock")["backup_id"]
    assert (row["newest_backup"], row["gaps"]) == (newest, 0) and row["window_start"], row
    wal_before = [k for k in objects(s3_server, bucket, f"{top}/wal/")]
    expire = playbook(EXPIRE, extra_vars={**bv, "pg_backup_keep": 1})
    assert expire.rc == 0, expire
    assert f"{top}/{bid}/backup.json" not in objects(s3_server, bucket, f"{top}/"), "the older backup was not removed"
    wal_after = [k for k in objects(s3_server, bucket, f"{top}/wal/")]
    gone = sorted(set(wal_before) - set(wal_after))
    start = bucket_json(s3_server, bucket, f"{top}/{newest}/backup.json")["start_wal"]
    assert gone and all(k.rsplit("/", 1)[1][:24] < start for k in gone), (gone, start)

    # A pin in the bucket's backup.json, with why.
    pin = playbook(PIN, extra_vars={**bv, "pg_backup_pin_backup": newest, "pg_backup_pin_reason": "audit"})
    assert pin.rc == 0, pin
    assert bucket_json(s3_server, bucket, f"{top}/{newest}/backup.json")["pinned"]["reason"] == "audit"
