#!/usr/bin/env python3
"""Benchmark of incremental backups on PostgreSQL 17: our playbook against pg_basebackup
--incremental and pg_combinebackup, in the same run, on the same pgbench database.

    .venv/bin/python bench/bench_incremental.py --scale 300

Steps: a full backup with each tool; then about --change percent of pgbench_accounts is
updated (a contiguous range of accounts, so that about that share of the table's blocks
changes, plus the new row versions and index entries); then an incremental backup with each
tool. Prints the wall time (Ansible start-up included for the playbook) and the stored size of
each, the incremental's share of the full backup's time and size, and the incremental's time
against pg_basebackup --incremental's; then the time to restore (extract, or reconstruct a
chain, ready to start) the full backup and the chain with our restore playbook
(pg_restore_start: false) and with pg_combinebackup of pg_basebackup's two plain backups.

Targets (issue 15): incremental <= 0.25x the full's time and <= 0.15x its size, no slower
than pg_basebackup --incremental; restore of the chain <= 1.3x the restore of the full backup.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from harness.ansible import run_playbook  # noqa: E402
from harness.pg import Cluster, make_pg_dir  # noqa: E402
from harness.workload import pgbench_init  # noqa: E402

TOOLS = "/var/cache/pgops-online-backup/pg17-tools/bin"
INVENTORY = "[postgresql]\nlocalhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n"


def du(path: str) -> int:
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout.split()[0])


def fresh(path: str) -> str:
    os.makedirs(path)
    shutil.chown(path, "postgres", "postgres")
    return path


def as_pg(*cmd: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=300, help="pgbench scale (300 is about 4.5 GB)")
    ap.add_argument("--change", type=float, default=5.0, help="percent of pgbench_accounts updated between the backups")
    ap.add_argument("--compression", default="zstd", help="our backups' compression (none, zstd, lz4, gzip)")
    ap.add_argument("--tasks", action="store_true", help="also print each of our playbook's tasks' seconds")
    args = ap.parse_args()

    c = Cluster(17, name="bench")
    c.init(shared_buffers="'256MB'", max_wal_size="'8GB'", summarize_wal="on", autovacuum="off")
    c.start()
    work = make_pg_dir("pgops-bench-incr-")
    repo = os.path.join(work, "repo")
    os.makedirs(repo, mode=0o700)
    shutil.chown(repo, "postgres", "postgres")
    times, sizes, copies = {}, {}, {}
    try:
        print(f"loading pgbench scale {args.scale} ...", flush=True)
        pgbench_init(c, args.scale)
        c.sql("VACUUM ANALYZE")
        c.sql("CHECKPOINT")
        data_mb = (du(c.data) - du(os.path.join(c.data, "pg_wal"))) / 1e6
        print(f"data directory without pg_wal: {data_mb:.0f} MB", flush=True)

        def ours(name: str) -> dict:
            started, t0 = time.time(), time.monotonic()
            r = run_playbook(
                os.path.join(REPO, "playbooks", "backup.yml"),
                INVENTORY,
                extra_vars={
                    "pg_backup_repository": repo,
                    "pg_backup_login_unix_socket": c.sock,
                    "pg_backup_port": c.port,
                    "pg_backup_type": "incremental",
                    "pg_backup_method": "tar",
                    "pg_backup_compression": args.compression,
                    "pg_backup_fast_checkpoint": True,
                },
                workdir=fresh(os.path.join(work, f"run-{name}".replace(" ", "-"))),
                record=args.tasks,
            )
            times[name] = time.monotonic() - t0
            if r.rc != 0:
                raise SystemExit(f"backup playbook failed:\n{r.stdout[-3000:]}")
            if args.tasks:
                print(f"{name}:\n{r.timeline(started)}", flush=True)
            bid = max(n for n in os.listdir(repo) if n[0].isdigit())
            with open(os.path.join(repo, bid, "backup.json")) as f:
                info = json.load(f)
            sizes[name] = int(info["bytes"])
            copies[name] = float(info["copy_seconds"])
            return info

        def basebackup(name: str, *extra: str) -> str:
            d = os.path.join(work, name.replace(" ", "-"))
            t0 = time.monotonic()
            as_pg(f"{TOOLS}/pg_basebackup", "-h", c.sock, "-p", str(c.port), "-D", d, "-Fp", "-c", "fast", "-X", "none", *extra)
            times[name] = time.monotonic() - t0
            sizes[name] = du(d)
            return d

        full = ours("ours full")
        assert full["type"] == "full", full
        bb_full = basebackup("pg_basebackup full")

        accounts = args.scale * 100000
        changed = int(accounts * args.change / 100)
        print(f"updating {changed} of {accounts} accounts ...", flush=True)
        c.sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= %s", (changed,))

        inc = ours("ours incremental")
        assert inc["type"] == "incremental", inc.get("type_reason")
        bb_inc = basebackup("pg_basebackup incremental", f"--incremental={bb_full}/backup_manifest")

        def restore(name: str, backup_id: str) -> None:
            root = fresh(os.path.join(work, f"restore-{name}".replace(" ", "-")))
            t0 = time.monotonic()
            r = run_playbook(
                os.path.join(REPO, "playbooks", "restore.yml"),
                INVENTORY,
                extra_vars={
                    "pg_restore_repository": repo,
                    "pg_restore_backup": backup_id,
                    "pg_restore_data_directory": os.path.join(root, "data"),
                    "pg_restore_port": 0,
                    "pg_restore_wal_archive": c.archive,
                    "pg_restore_unix_socket_directory": root,
                    "pg_restore_start": False,
                },
                workdir=fresh(os.path.join(work, f"run-restore-{name}".replace(" ", "-"))),
                record=False,
            )
            times[f"restore {name}"] = time.monotonic() - t0
            if r.rc != 0:
                raise SystemExit(f"restore playbook failed:\n{r.stdout[-3000:]}")
            shutil.rmtree(root)

        restore("ours full", full["id"])
        restore("ours chain", inc["id"])
        out = os.path.join(work, "combined")
        t0 = time.monotonic()
        as_pg(f"{TOOLS}/pg_combinebackup", "--no-sync", "-o", out, bb_full, bb_inc)
        times["restore pg_combinebackup chain"] = time.monotonic() - t0

        print()
        print(f"{'':34} {'seconds':>9} {'copy step s':>12} {'stored MB':>10}")
        for name in ("ours full", "ours incremental", "pg_basebackup full", "pg_basebackup incremental"):
            copy = f"{copies[name]:12.2f}" if name in copies else " " * 12
            print(f"{name:34} {times[name]:9.2f} {copy} {sizes[name] / 1e6:10.1f}")
        for name in ("restore ours full", "restore ours chain", "restore pg_combinebackup chain"):
            print(f"{name:34} {times[name]:9.2f}")
        print()
        t_ratio = times["ours incremental"] / times["ours full"]
        s_ratio = sizes["ours incremental"] / sizes["ours full"]
        vs_bb = times["ours incremental"] / times["pg_basebackup incremental"]
        r_ratio = times["restore ours chain"] / times["restore ours full"]
        print(f"incremental / full, time:  {t_ratio:.3f}  (target <= 0.25)")
        print(f"incremental / full, copy step: {copies['ours incremental'] / copies['ours full']:.3f}")
        print(f"incremental / full, size:  {s_ratio:.3f}  (target <= 0.15)")
        print(f"incremental / pg_basebackup --incremental, time: {vs_bb:.2f}  (target <= 1)")
        print(f"restore chain / restore full: {r_ratio:.2f}  (target <= 1.3)")
        print(f"pg_basebackup: incremental / full, time {times['pg_basebackup incremental'] / times['pg_basebackup full']:.3f}, "
              f"size {sizes['pg_basebackup incremental'] / sizes['pg_basebackup full']:.3f}")  # fmt: skip
        print(f"ours incremental: {json.dumps(inc.get('incremental'))}")
    finally:
        c.destroy()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
