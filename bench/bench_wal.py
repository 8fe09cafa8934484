#!/usr/bin/env python3
"""Benchmark: WAL push, ours against a cp + sync one-liner and pgBackRest's
synchronous archive-push, on the same real 16 MB segments, in one run; then our
push as the archive_command of a server under pgbench load, watching the
.ready backlog.

    .venv/bin/python bench/bench_wal.py --segments 32 --seconds 60

Prints seconds per segment and segments per second for each contender and the
ratio to pgBackRest (when it is installed: apt-get install -y pgbackrest), and
for the load run the WAL rate pgbench produced, the rate archived and the
largest .ready backlog seen.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from harness.pg import Cluster, as_postgres, make_pg_dir  # noqa: E402
from harness.wal import install_pgops_wal  # noqa: E402
from harness.workload import pgbench_init, pgbench_start, pgbench_stop  # noqa: E402


def timed(cmds: list) -> float:
    t0 = time.monotonic()
    for cmd in cmds:
        as_postgres(["sh", "-c", cmd])
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=32, help="real WAL segments each contender pushes")
    ap.add_argument("--seconds", type=int, default=60, help="length of the pgbench run with our push archiving")
    args = ap.parse_args()

    work = make_pg_dir("pgops-bench-wal-")
    prog = install_pgops_wal(os.path.join(work, "install"))
    c = Cluster(15, name="benchwal")
    # synchronous_commit off: pgbench writes WAL as fast as this machine lets it (the archiver's hardest case).
    c.init(shared_buffers="'256MB'", max_wal_size="'2GB'", synchronous_commit="off")
    c.start()
    rows = []
    try:
        # Real segments: pgbench's WAL, collected by a plain copying archive_command.
        pgbench_init(c, 10)
        stage = os.path.join(work, "segments")
        os.makedirs(stage)
        shutil.chown(stage, "postgres", "postgres")
        c.sql("ALTER SYSTEM SET archive_command = %s", (f"cp %p {stage}/%f",))
        c.sql("SELECT pg_reload_conf()")
        bench = pgbench_start(c)
        while len([n for n in os.listdir(stage) if len(n) == 24]) < args.segments:
            time.sleep(0.5)
        pgbench_stop(bench)
        segs = sorted(n for n in os.listdir(stage) if len(n) == 24)[: args.segments]
        size = sum(os.path.getsize(os.path.join(stage, n)) for n in segs)
        print(f"{len(segs)} segments of pgbench WAL, {size / 1e6:.0f} MB", flush=True)

        def target(name: str) -> str:
            d = os.path.join(work, name)
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            shutil.chown(d, "postgres", "postgres")
            return d

        push = f"{prog} push --cluster 1 --repository"
        repo = target("repo-zstd")
        rows.append(("pgops-wal push zstd", timed([f"{push} {repo} {stage}/{n}" for n in segs])))
        repo = target("repo-none")
        rows.append(("pgops-wal push none", timed([f"{push} {repo} --compression none {stage}/{n}" for n in segs])))
        d = target("cp")
        one_liner = [f"test ! -f {d}/{n} && cp {stage}/{n} {d}/{n} && sync {d}/{n}" for n in segs]
        rows.append(("cp + sync one-liner", timed(one_liner)))
        if shutil.which("pgbackrest"):
            pgbr = target("pgbr")
            for sub in ("repo", "log", "lock"):
                os.makedirs(os.path.join(pgbr, sub))
                shutil.chown(os.path.join(pgbr, sub), "postgres", "postgres")
            conf = os.path.join(pgbr, "pgbackrest.conf")
            with open(conf, "w") as f:
                f.write(
                    f"[global]\nrepo1-path={pgbr}/repo\nlog-path={pgbr}/log\nlock-path={pgbr}/lock\nlog-level-console=warn\n"
                    f"compress-type=zst\ncompress-level=3\narchive-async=n\n\n[bench]\npg1-path={c.data}\n"
                    f"pg1-socket-path={c.sock}\npg1-port={c.port}\n"
                )
            shutil.chown(conf, "postgres", "postgres")
            as_postgres(["pgbackrest", f"--config={conf}", "--stanza=bench", "stanza-create"])
            # archive-push checks the segment belongs to this cluster: it must run against c's data directory.
            cmds = [f"cd {c.data} && pgbackrest --config={conf} --stanza=bench archive-push {stage}/{n}" for n in segs]
            rows.append(("pgbackrest archive-push zst (sync)", timed(cmds)))
        else:
            print("skipped pgbackrest archive-push: pgbackrest is not installed (apt-get install -y pgbackrest)", flush=True)

        # Under load: our push is the archive_command; does the backlog grow?
        repo = target("repo-load")
        c.sql("ALTER SYSTEM SET archive_command = %s", (f"{prog} push --repository {repo} %p",))
        c.sql("SELECT pg_reload_conf()")
        time.sleep(1)
        start_lsn = c.sql("SELECT pg_current_wal_lsn()::text")[0][0]
        archived0 = c.sql("SELECT archived_count FROM pg_stat_archiver")[0][0]
        bench = pgbench_start(c)
        peak, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            ready = c.sql("SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%%.ready'")[0][0]
            peak = max(peak, ready)
            time.sleep(0.5)
        pgbench_stop(bench)
        elapsed = time.monotonic() - t0
        produced = float(c.sql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (start_lsn,))[0][0]) / (16 << 20)
        archived = c.sql("SELECT archived_count FROM pg_stat_archiver")[0][0] - archived0
        ready_end = c.sql("SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%%.ready'")[0][0]
    finally:
        c.destroy()
        shutil.rmtree(work, ignore_errors=True)

    ref = dict(rows).get("pgbackrest archive-push zst (sync)")
    print()
    print(f"{len(segs)} segments of 16 MB, pushed one at a time as archive_command runs them")
    print(f"{'contender':38} {'s/segment':>10} {'segments/s':>11}" + (f" {'vs pgBackRest':>14}" if ref else ""))
    for name, secs in rows:
        per = secs / len(segs)
        line = f"{name:38} {per:10.3f} {len(segs) / secs:11.1f}"
        print(line + (f" {secs / ref:14.2f}" if ref else ""))
    print()
    print(
        f"pgbench for {elapsed:.0f} s with pgops-wal push zstd as archive_command: WAL produced {produced / elapsed:.2f} "
        f"segments/s, archived {archived / elapsed:.2f} segments/s; .ready backlog peak {peak}, at the end {ready_end}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
