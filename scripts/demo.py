#!/usr/bin/env python3
"""A real backup and restore check against a throwaway local cluster.

Creates a PostgreSQL 15 cluster with WAL archiving, keeps writes running,
takes an online backup with the backup playbook, verifies it, restores it
into a second throwaway cluster and checks the rows, then removes everything.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from harness.ansible import local_inventory, run_playbook  # noqa: E402
from harness.pg import Cluster, make_pg_dir  # noqa: E402
from harness.workload import Writer, balances, pgbench_init, pgbench_start, pgbench_stop  # noqa: E402


def main() -> int:
    major = int(os.environ.get("PGOPS_DEMO_MAJOR", "15"))
    live = Cluster(major, name="demo").init().start()
    repo_root = make_pg_dir("pgops-demo-repo-")
    repo = os.path.join(repo_root, "backups")
    restored = None
    try:
        print(f"== throwaway PostgreSQL {major} cluster in {live.root} (port {live.port}), WAL archive {live.archive}")
        pgbench_init(live, 5)
        writer = Writer(live)
        writer.start()
        bench = pgbench_start(live)
        print("== backup playbook while pgbench and a writer run")
        try:
            run = run_playbook(
                os.path.join(REPO, "playbooks", "backup.yml"),
                local_inventory(),
                extra_vars={
                    "pg_backup_repository": repo,
                    "pg_backup_login_unix_socket": live.sock,
                    "pg_backup_port": live.port,
                    "pg_backup_compression": "zstd",
                    "pg_backup_fast_checkpoint": True,
                },
                workdir=make_pg_dir("pgops-demo-run-"),
            )
        finally:
            writer.stop()
            pgbench_stop(bench)
        print(run.stdout[run.stdout.find("TASK [pgops.online_backup.pg_backup : Summary]") :])
        if run.rc != 0:
            print(run.stdout[-4000:])
            return 1
        (bid,) = [n for n in os.listdir(repo) if n[0].isdigit()]
        print(f"== restore drill of {bid} (drill playbook: restore into a scratch directory, recover, check, clean up)")
        drill = run_playbook(
            os.path.join(REPO, "playbooks", "drill.yml"),
            local_inventory(),
            extra_vars={"pg_restore_repository": repo, "pg_restore_wal_archive": live.archive},
            workdir=make_pg_dir("pgops-demo-drill-"),
        )
        info = json.load(open(os.path.join(repo, bid, "backup.json")))
        print(f"   drill: {json.dumps(info.get('drill'), indent=None)[:600]}")
        if drill.rc != 0:
            print(drill.stdout[-4000:])
            return 1
        print(f"== row check of {bid} (status {info['status']}): a manual restore from the documented layout")
        from harness.layout import restore_backup

        restored = restore_backup(os.path.join(repo, bid), live.archive, major)
        must = writer.committed_before(datetime.datetime.fromisoformat(info["stop_requested_at"]))
        got = {r[0] for r in restored.sql("SELECT id FROM writer_log")}
        a, t, b, h = balances(restored.connect())
        ok = must <= got and a == t == b == h
        print(f"   rows committed before the stop: {len(must)}, restored: {len(got & must)}; pgbench balances {a} {t} {b} {h}")
        print("== RESULT:", "restore check passed" if ok else "restore check FAILED")
        return 0 if ok else 1
    finally:
        if restored:
            restored.destroy()
        live.destroy()
        shutil.rmtree(repo_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
