"""Client-side encryption with age that fails closed: backups and WAL written only as ciphertext
(no byte of a marker row anywhere in the repository), restored and drilled only with the private key."""

from __future__ import annotations

import datetime
import glob
import os
import pwd
import secrets
import subprocess
import time

import psycopg2
from harness.ansible import REPO
from harness.backup import BACKUP, backup_vars, backups
from harness.pg import make_pg_dir, stop_data_directory
from harness.wal import install_pgops_wal
from harness.workload import Writer

RESTORE = os.path.join(REPO, "playbooks", "restore.yml")
DRILL = os.path.join(REPO, "playbooks", "drill.yml")


def keypair(directory: str, owner: str | None = None) -> tuple:
    """(identity file, its text, public key) made by age-keygen."""
    path = os.path.join(directory, "identity.txt")
    subprocess.run(["age-keygen", "-o", path], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", path], check=True, capture_output=True, text=True).stdout.strip()
    if owner:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o600)
    return path, open(path).read(), public


def files_holding(root: str, needle: bytes) -> list:
    found = []
    for base, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(path)
    return found


def holding_key(directory: str, identity: str) -> list:
    """The *.age-key files in directory that hold this identity."""
    found = []
    for path in glob.glob(os.path.join(directory, "*.age-key")):
        try:
            with open(path) as f:
                if identity.strip() in f.read():
                    found.append(path)
        except OSError:
            continue  # removed meanwhile
    return found


def make_repository() -> str:
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    os.mkdir(repo, 0o700)
    subprocess.run(["chown", "postgres:postgres", repo], check=True)
    return repo


def test_encrypted_backup_and_wal_restore_only_with_the_key(make_cluster, playbook, tmp_path):
    keys = make_pg_dir("pgops-keys-")
    identity_file, identity, public = keypair(keys, owner="postgres")
    c = make_cluster(16)
    prog = install_pgops_wal(os.path.join(make_pg_dir("pgops-prog-"), "install"))
    repo = make_repository()
    # No compression anywhere: in clear, the marker would be in the archive and in the WAL byte for byte.
    push = f"{prog} push --repository {repo} --compression none --age-recipient {public} %p"
    c.sql("ALTER SYSTEM SET archive_command = %s", (push,))
    c.sql("SELECT pg_reload_conf()")
    marker = f"PGOPS-CLEARTEXT-MARKER-{secrets.token_hex(8)}"
    c.sql("CREATE TABLE secret (t text)")
    c.sql("INSERT INTO secret SELECT %s FROM generate_series(1, 50)", (marker,))
    c.sql("CHECKPOINT")
    # The test can fail: the marker is in the cluster's own files, which a cleartext copy would hold.
    assert files_holding(os.path.join(c.data, "base"), marker.encode()), "the marker must be in the source files"
    writer = Writer(c)
    writer.start()
    try:
        v = backup_vars(c, repo, pg_backup_encryption="age", pg_backup_age_recipients=[public], pg_backup_compression="none")
        run = playbook(BACKUP, extra_vars=v)
        assert run.rc == 0, run
        c.sql("INSERT INTO secret VALUES (%s)", (marker + "-after",))
    finally:
        writer.stop()
    # The segment holding the row written after the backup reaches the archive.
    (seg,) = c.sql("SELECT pg_walfile_name(pg_switch_wal())")[0]
    deadline = time.monotonic() + 30
    while (c.sql("SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") < seg:
        assert time.monotonic() < deadline, f"{seg} was not archived"
        time.sleep(0.1)
    (b,) = backups(repo)
    assert b["encryption"] == {"type": "age", "recipients": [public]}, b
    assert b["files"] == ["base.tar.age"], b
    assert "encrypted with age for 1 key(s)" in run.stdout
    sysid = b["system_identifier"]
    wal = sorted(os.listdir(os.path.join(repo, "wal", sysid)))
    assert wal and all(n.endswith((".age", ".age.sha256")) for n in wal), wal
    assert not files_holding(repo, marker.encode()), "cleartext of the data found in the repository"

    # Without the key: refused before anything changes, saying what is missing.
    root = make_pg_dir("pgops-restore-")
    data = os.path.join(root, "data")
    rv = {
        "pg_restore_repository": repo, "pg_restore_data_directory": data, "pg_restore_port": 0,
        "pg_restore_unix_socket_directory": root, "pg_restore_recovery_timeout": 120, "pg_restore_wal_program": prog,
    }  # fmt: skip
    refused = playbook(RESTORE, extra_vars=rv)
    assert refused.rc != 0
    assert f"backup {b['id']} is encrypted with age (for {public})" in refused.stdout, refused
    assert not os.path.exists(data)
    # The key's text lives in a file for this run only: a server left paused in recovery would lose it.
    paused = {**rv, "pg_restore_age_identity": identity, "pg_restore_target": "immediate", "pg_restore_target_action": "pause"}
    refused = playbook(RESTORE, extra_vars=paused)
    assert refused.rc != 0 and "pg_restore_target_action pause leaves the server in recovery" in refused.stdout, refused
    assert not os.path.exists(data)

    # With the key's text: the backup and its WAL decrypt, every row committed before the backup ended is there.
    run = playbook(RESTORE, extra_vars={**rv, "pg_restore_age_identity": identity})
    try:
        assert run.rc == 0, run
        assert identity.split("\n")[-2] not in run.stdout, "the private key appeared in the output"
        port = run.task(f"Restore backup {b['id']} into {data}")["port"]
        conn = psycopg2.connect(host=root, port=port, user="postgres", dbname="postgres")
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM writer_log")
            ids = {r[0] for r in cur.fetchall()}
            cur.execute("SELECT count(*) FROM secret WHERE t = %s", (marker + "-after",))
            after = cur.fetchone()[0]
        conn.close()
        stopped = datetime.datetime.fromisoformat(b["stopped_at"].replace("Z", "+00:00"))
        assert writer.committed_before(stopped) <= ids and ids, "rows written while the backup ran are missing"
        assert after == 1, "WAL archived (encrypted) after the backup was not replayed"
    finally:
        stop_data_directory(data)
    # Other tests may hold key files of their own meanwhile: this run's is the one with this key.
    assert not holding_key("/tmp", identity), "the temporary key file was left behind"

    # A drill with a key file; a wrong key fails clearly.
    dv = {"pg_restore_repository": repo, "pg_restore_wal_program": prog, "pg_restore_recovery_timeout": 120}
    drill = playbook(DRILL, extra_vars={**dv, "pg_restore_age_identity_file": identity_file})
    assert drill.rc == 0, drill
    assert backups(repo)[0]["drill"]["result"] == "passed"
    other_dir = make_pg_dir("pgops-keys-")
    _f, other, _p = keypair(other_dir)
    wrong = playbook(DRILL, extra_vars={**dv, "pg_restore_age_identity": other})
    assert wrong.rc != 0 and "no identity matched any of the recipients" in wrong.stdout, wrong

    # The archive command with encryption: the same file again is success, different content refused.
    name = sorted(n for n in wal if n.endswith(".age") and len(n.split(".")[0]) == 24)[0].split(".")[0]
    plain = os.path.join(str(tmp_path), name)
    where = ["--repository", repo, "--cluster", sysid]
    got = subprocess.run([prog, "get", *where, "--age-identity-file", identity_file, name, plain], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    again = subprocess.run([prog, "push", *where, "--age-recipient", public, plain], capture_output=True, text=True)
    assert again.returncode == 0 and "already archived with the same content" in again.stderr, again
    with open(plain, "r+b") as f:
        f.write(b"different")
    clash = subprocess.run([prog, "push", *where, "--age-recipient", public, plain], capture_output=True, text=True)
    assert clash.returncode == 1 and "already holds a different" in clash.stderr, clash


def test_encryption_fails_closed_before_the_start(make_cluster, playbook):
    c = make_cluster(13, archive_mode="on", archive_command="true")
    repo = make_repository()
    good = keypair(make_pg_dir("pgops-keys-"))[2]
    cases = [
        ({"pg_backup_age_recipients": ["age1notakey"]}, "age cannot encrypt on this host"),
        ({"pg_backup_age_recipients": []}, "pg_backup_encryption age needs pg_backup_age_recipients"),
        ({"pg_backup_age_recipients": [good], "pg_backup_method": "rsync"}, "which cannot be encrypted"),
    ]
    for extra, said in cases:
        run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_encryption="age", **extra))
        assert run.rc != 0 and said in run.stdout, (extra, run)
        assert "nothing was started" in run.stdout, run
        # Nothing was written: no backup directory, no session.
        assert not glob.glob(os.path.join(repo, "2*")), os.listdir(repo)
        assert c.backups_in_progress() == 0


def test_an_encrypted_backup_is_refused_while_wal_is_archived_in_clear(make_cluster, playbook):
    """pg_backup_encryption age with an archive_command that pushes WAL without --age-recipient: a restore
    needs that WAL, so the backup would be readable without the key. Refused before the start, saying how
    to fix it; with the recipient in archive_command the same backup runs."""
    c = make_cluster(15)
    prog = install_pgops_wal(os.path.join(make_pg_dir("pgops-prog-"), "install"))
    repo = make_repository()
    public = keypair(make_pg_dir("pgops-keys-"))[2]
    c.sql("ALTER SYSTEM SET archive_command = %s", (f"{prog} push --repository {repo} --compression none %p",))
    c.sql("SELECT pg_reload_conf()")
    v = backup_vars(c, repo, pg_backup_encryption="age", pg_backup_age_recipients=[public])
    run = playbook(BACKUP, extra_vars=v)
    assert run.rc != 0 and "archive_command stores WAL in clear" in run.stdout and "nothing was started" in run.stdout, run
    assert not glob.glob(os.path.join(repo, "2*")) and c.backups_in_progress() == 0
    # WAL encrypted, but for another key only: the backups' escrow key could not decrypt it.
    escrow = keypair(make_pg_dir("pgops-keys-"))[2]
    c.sql("ALTER SYSTEM SET archive_command = %s", (f"{prog} push --repository {repo} --age-recipient {public} %p",))
    c.sql("SELECT pg_reload_conf()")
    both = backup_vars(c, repo, pg_backup_encryption="age", pg_backup_age_recipients=[public, escrow])
    run = playbook(BACKUP, extra_vars=both)
    assert run.rc != 0, run
    assert f"archive_command encrypts WAL for other keys: {escrow} (of pg_backup_age_recipients)" in run.stdout, run
    assert not glob.glob(os.path.join(repo, "2*")) and c.backups_in_progress() == 0
    run = playbook(BACKUP, extra_vars=v)
    assert run.rc == 0, run
