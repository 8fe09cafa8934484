#!/usr/bin/env python3
"""Benchmark: backups into S3 (a local SeaweedFS over https), in one run on one pgbench database:
our playbook (tar+zstd, with and without age encryption) against a raw
`tar | zstd -T2 | boto3 upload_fileobj` pipeline and pgBackRest with repo1-type=s3.

    .venv/bin/python bench/bench_s3.py --scale 100

Every contender writes to the same server over TLS (the server's own CA). The
cluster archives with pgBackRest's archive-push for all of them (its backup
checks its own archive), as in bench/bench.py. Prints the whole wall time
(Ansible start-up included for the playbook), MB/s of the data directory, and the
ratios to the raw pipeline and to pgBackRest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from harness.ansible import run_playbook  # noqa: E402
from harness.pg import Cluster, make_pg_dir  # noqa: E402
from harness.s3 import SeaweedS3  # noqa: E402
from harness.workload import pgbench_init  # noqa: E402

RAW_ROW = "raw tar | zstd -T2 | boto3 upload"
PGBR_ROW = "pgbackrest full zst, repo1-type=s3"
NODE_PYTHON = "/usr/bin/python3"
# The "S3 client cp -" of the raw pipeline: boto3's managed multipart upload from stdin.
UPLOADER = """
import sys, boto3
from botocore.config import Config
endpoint, ca, bucket, name = sys.argv[1:5]  # the keys come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
s3 = boto3.client("s3", endpoint_url=endpoint, verify=ca, region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}))
s3.upload_fileobj(sys.stdin.buffer, bucket, name)
"""


def du(path: str) -> int:
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout.split()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=100, help="pgbench scale (100 is about 1.5 GB)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each contender; the best is reported")
    ap.add_argument("--tasks", action="store_true", help="also print each of our playbook's tasks' seconds")
    args = ap.parse_args()

    c = Cluster(15, name="bench-s3")
    c.init(shared_buffers="'256MB'", max_wal_size="'4GB'")
    c.start()
    s3 = SeaweedS3(tls=True)
    work = make_pg_dir("pgops-bench-s3-")
    rows = []
    try:
        s3.start()
        bucket = s3.create_bucket("pgops-bench")
        # The server's CA, readable by the postgres user (pgBackRest and the modules run as postgres).
        ca = os.path.join(work, "ca.pem")
        shutil.copyfile(s3.ca_bundle, ca)
        os.chmod(ca, 0o644)
        print(f"loading pgbench scale {args.scale} ...", flush=True)
        pgbench_init(c, args.scale)
        c.sql("CHECKPOINT")
        mb = (du(c.data) - du(os.path.join(c.data, "pg_wal"))) / 1e6
        print(f"data directory without pg_wal: {mb:.0f} MB", flush=True)

        pgbr = os.path.join(work, "pgbr")
        for sub in ("log", "lock"):
            os.makedirs(os.path.join(pgbr, sub))
        conf = os.path.join(pgbr, "pgbackrest.conf")
        with open(conf, "w") as f:
            f.write(
                "[global]\nrepo1-type=s3\nrepo1-path=/pgbackrest\n"
                f"repo1-s3-bucket={bucket}\nrepo1-s3-endpoint=127.0.0.1\nrepo1-storage-port={s3.s3_port}\n"
                f"repo1-s3-region=us-east-1\nrepo1-s3-key={s3.access_key}\nrepo1-s3-key-secret={s3.secret_key}\n"
                # pgBackRest 2.45 matches only DNS names of the certificate (ours has the IP 127.0.0.1): TLS
                # without verification for it; the other contenders verify against the CA.
                "repo1-s3-uri-style=path\nrepo1-storage-verify-tls=n\n"
                f"log-path={pgbr}/log\nlock-path={pgbr}/lock\nlog-level-console=warn\n"
                "start-fast=y\ncompress-type=zst\ncompress-level=3\nprocess-max=2\n"
                f"\n[bench]\npg1-path={c.data}\npg1-socket-path={c.sock}\npg1-port={c.port}\n"
            )
        os.chmod(conf, 0o600)
        subprocess.run(["chown", "-R", "postgres:postgres", pgbr], check=True)

        def pgbackrest(*cmd: str) -> None:
            r = subprocess.run(["runuser", "-u", "postgres", "--", "pgbackrest", f"--config={conf}", "--stanza=bench", *cmd],
                               capture_output=True, text=True)  # fmt: skip
            if r.returncode != 0:
                raise SystemExit(f"pgbackrest {' '.join(cmd)} failed (rc {r.returncode}):\n{r.stdout}{r.stderr}")

        have_pgbr = shutil.which("pgbackrest") is not None
        if have_pgbr:
            pgbackrest("stanza-create")
            c.sql("ALTER SYSTEM SET archive_command = %s", (f"pgbackrest --config={conf} --stanza=bench archive-push %p",))
            c.sql("SELECT pg_reload_conf()")
            time.sleep(1)
            pgbackrest("check")
        else:
            print(f"skipped {PGBR_ROW}: pgbackrest is not installed", flush=True)

        counter = iter(range(1000))

        def raw():
            name = f"raw/{next(counter)}/base.tar.zst"
            cmd = (
                f"tar -C {c.data} -cf - --exclude=./pg_wal/* . | zstd -q -T2 | "
                f"{sys.executable} -c '{UPLOADER}' {s3.endpoint} {ca} {bucket} {name}"
            )
            keys = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
            subprocess.run(cmd, shell=True, check=True, env={**os.environ, **keys})

        identity = os.path.join(work, "identity.txt")
        subprocess.run(["age-keygen", "-o", identity], check=True, capture_output=True)
        public = subprocess.run(["age-keygen", "-y", identity], check=True, capture_output=True, text=True).stdout.strip()

        def ours(**more):
            def run():
                url = f"s3://{bucket}/ours-{next(counter)}"
                started = time.time()
                r = run_playbook(
                    os.path.join(REPO, "playbooks", "backup.yml"),
                    f"[postgresql]\nlocalhost ansible_connection=local ansible_python_interpreter={NODE_PYTHON}\n",
                    extra_vars={
                        "pg_backup_repository": url,
                        "pg_backup_s3_endpoint": s3.endpoint,
                        "pg_backup_s3_ca_bundle": ca,
                        "pg_backup_s3_access_key": s3.access_key,
                        "pg_backup_s3_secret_key": s3.secret_key,
                        "pg_backup_login_unix_socket": c.sock,
                        "pg_backup_port": c.port,
                        "pg_backup_compression": "zstd",
                        "pg_backup_fast_checkpoint": True,
                        **more,
                    },  # fmt: skip
                    workdir=tempfile.mkdtemp(dir=work),
                    record=args.tasks,
                )
                if r.rc != 0:
                    raise SystemExit(f"backup playbook failed:\n{r.stdout[-3000:]}")
                if args.tasks:
                    print(r.timeline(started), flush=True)
                prefix = url.split("/", 3)[3]
                client = s3.client()
                keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
                (key,) = [k for k in keys if k.endswith("/backup.json")]
                info = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
                run.copy_seconds = float(info["copy_seconds"])

            return run

        contenders = [
            (RAW_ROW, raw),
            ("playbook tar+zstd to s3", ours()),
            ("playbook tar+zstd+age to s3", ours(pg_backup_encryption="age", pg_backup_age_recipients=[public])),
        ]
        if have_pgbr:
            contenders.append((PGBR_ROW, lambda: pgbackrest("--type=full", "backup")))
        times = {name: [] for name, _fn in contenders}
        for rnd in range(args.rounds):
            for name, fn in contenders:
                t0 = time.monotonic()
                fn()
                times[name].append(time.monotonic() - t0)
                copy = f", copy step {fn.copy_seconds:.2f} s" if hasattr(fn, "copy_seconds") else ""
                print(f"  round {rnd + 1}: {name}: {times[name][-1]:.2f} s{copy}", flush=True)
        rows = [(name, min(times[name])) for name, _fn in contenders]
    finally:
        c.destroy()
        s3.stop(grace=2)
        shutil.rmtree(work, ignore_errors=True)

    best = dict(rows)
    refs = [(label, best[name]) for label, name in (("raw", RAW_ROW), ("pgBackRest", PGBR_ROW)) if name in best]
    print()
    print(f"scale {args.scale}, {mb:.0f} MB, best of {args.rounds}; ratios are of the whole time")
    print(f"{'contender':36} {'whole s':>8} {'MB/s':>7}" + "".join(f" {'vs ' + label:>14}" for label, _s in refs))
    for name, secs in rows:
        print(f"{name:36} {secs:8.2f} {mb / secs:7.1f}" + "".join(f" {secs / ref:14.2f}" for _label, ref in refs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
