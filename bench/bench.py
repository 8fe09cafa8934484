#!/usr/bin/env python3
"""Benchmark: our backup playbook against pg_basebackup and a raw tar | zstd,
in the same run, on the same pgbench database.

    .venv/bin/python bench/bench.py --scale 100

Prints, per contender, the whole wall time (Ansible start-up included for the
playbook), the copy step, the fixed cost (whole - copy), MB/s of the data
directory's size, and the ratios of the whole time to pg_basebackup -Ft
--compress=client-zstd -c fast, to pg_basebackup --compress=server-zstd:workers=2,
to raw tar | zstd -T2 and to pgBackRest. For the contenders that are one
program, the copy is the whole run.

"Ansible's floor" is the backup play's connection, become and pipelining running
six module tasks of four distinct modules that do nothing (import AnsibleModule,
exit): what any playbook of our role's shape costs before it does any work. Its
whole time is fixed cost, the bound below which the playbook's cannot go.

pgBackRest (a full backup, zst, process-max 2) is measured when it is installed
(`apt-get install -y pgbackrest`; Debian 12's 2.45 supports PostgreSQL up to 15)
and skipped with a note otherwise. When it runs, its configuration, repository,
logs and locks live in a temporary directory (never /etc/pgbackrest), and the
cluster's archive_command is pgBackRest's archive-push for every contender, so
all of them run with the same archiving.
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

PG15 = "/usr/lib/postgresql/15/bin"
PGBR_ROW = "pgbackrest full zst (process-max 2)"
CLIENT_ROW = "pg_basebackup -Ft client-zstd -c fast"
SERVER_ROW = "pg_basebackup server-zstd:workers=2"
RAW_ROW = "raw tar | zstd -T2"
FLOOR_ROW = "Ansible's floor: 6 no-op module tasks"
FLOOR_MODULES = ("noop_check", "noop_catalog", "noop_session", "noop_copy")
FLOOR_TASKS = ("noop_check", "noop_catalog", "noop_session", "noop_copy", "noop_session", "noop_catalog")
NOOP_MODULE = """#!/usr/bin/python
from ansible.module_utils.basic import AnsibleModule

AnsibleModule(argument_spec={"x": {"type": "str"}}, supports_check_mode=True).exit_json(changed=False)
"""
# Managed-node Pythons: Debian's (python3-crc32c, a software CRC-32C) and the one setup.sh
# makes with the hardware-accelerated crc32c from PyPI.
NODE_PYTHON = "/usr/bin/python3"
FAST_NODE_PYTHON = "/var/cache/pgops-online-backup/node-python/bin/python"


def du(path: str) -> int:
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout.split()[0])


def timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=100, help="pgbench scale (100 is about 1.5 GB)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each contender; the best is reported")
    ap.add_argument(
        "--quick", action="store_true", help="only the three baselines, the playbook with tar+zstd and Ansible's floor"
    )
    ap.add_argument("--tasks", action="store_true", help="also print each of our playbook's tasks' seconds")
    args = ap.parse_args()

    c = Cluster(15, name="bench")
    c.init(shared_buffers="'256MB'", max_wal_size="'4GB'")
    c.start()
    work = make_pg_dir("pgops-bench-")
    pgbr_dir = None
    rows = []
    try:
        print(f"loading pgbench scale {args.scale} ...", flush=True)
        pgbench_init(c, args.scale)
        c.sql("CHECKPOINT")
        # What every contender copies: the data directory without pg_wal.
        size = du(c.data) - du(os.path.join(c.data, "pg_wal"))
        mb = size / 1e6
        print(f"data directory without pg_wal: {mb:.0f} MB", flush=True)

        def fresh(name: str) -> str:
            d = os.path.join(work, name)
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            shutil.chown(d, "postgres", "postgres")
            return d

        def basebackup():
            d = fresh("pgbb")
            subprocess.run(
                ["runuser", "-u", "postgres", "--", f"{PG15}/pg_basebackup", "-h", c.sock, "-p", str(c.port), "-D", d,
                 "-Ft", "--compress=client-zstd", "-c", "fast", "-X", "none"],
                check=True,
            )  # fmt: skip

        def basebackup_server():
            d = fresh("pgbb-server")
            subprocess.run(
                ["runuser", "-u", "postgres", "--", f"{PG15}/pg_basebackup", "-h", c.sock, "-p", str(c.port), "-D", d,
                 "-Ft", "--compress=server-zstd:workers=2", "-c", "fast", "-X", "none"],
                check=True,
            )  # fmt: skip

        def raw_tar():
            d = fresh("raw")
            cmd = f"tar -C {c.data} -cf - --exclude=./pg_wal/* . | zstd -q -T2 > {d}/base.tar.zst"
            subprocess.run(cmd, shell=True, check=True)

        def ours(method: str, compression: str, python: str = NODE_PYTHON, **more):
            def run():
                repo = fresh(f"ours-{method}-{compression}")
                started = time.time()
                r = run_playbook(
                    os.path.join(REPO, "playbooks", "backup.yml"),
                    f"[postgresql]\nlocalhost ansible_connection=local ansible_python_interpreter={python}\n",
                    extra_vars={
                        "pg_backup_repository": repo,
                        "pg_backup_login_unix_socket": c.sock,
                        "pg_backup_port": c.port,
                        "pg_backup_method": method,
                        "pg_backup_compression": compression,
                        "pg_backup_fast_checkpoint": True,
                        **more,
                    },
                    workdir=fresh(f"playbook-{method}-{compression}"),  # removed with the rest of the bench
                    record=args.tasks,  # without --tasks: plain ansible-playbook, as a user runs it
                )
                if r.rc != 0:
                    raise SystemExit(f"backup playbook failed:\n{r.stdout[-3000:]}")
                if args.tasks:
                    print(r.timeline(started), flush=True)
                (bid,) = [n for n in os.listdir(repo) if n[0].isdigit()]
                info = json.load(open(os.path.join(repo, bid, "backup.json")))
                run.copy_seconds = float(info["copy_seconds"])
                run.manifest_seconds = float((info.get("manifest") or {}).get("seconds") or 0)
                run.checksum = (info.get("manifest") or {}).get("checksum_algorithm") or "none"
                if run.checksum == "CRC32C":
                    run.checksum += f" {info.get('crc32c_implementation')}"

            return run

        def ansible_floor():
            """What Ansible alone costs for our role's shape: the backup play's connection, become and
            pipelining running six module tasks of four distinct modules (pre-flight, record, start, copy,
            stop, complete) that do nothing: each imports AnsibleModule and exits."""
            d = fresh("floor")
            os.makedirs(os.path.join(d, "library"))
            for name in FLOOR_MODULES:
                with open(os.path.join(d, "library", name + ".py"), "w") as f:
                    f.write(NOOP_MODULE)
            play = {
                "name": "Ansible's floor",
                "hosts": "postgresql",
                "gather_facts": False,
                "become": True,
                "become_user": "postgres",
                "vars": {"ansible_pipelining": True},
                "tasks": [{name: {"x": "a"}} for name in FLOOR_TASKS],
            }
            r = run_playbook(
                [play], f"[postgresql]\nlocalhost ansible_connection=local ansible_python_interpreter={NODE_PYTHON}\n",
                workdir=d, record=False,
            )  # fmt: skip
            if r.rc != 0:
                raise SystemExit(f"floor playbook failed:\n{r.stdout[-3000:]}")

        ansible_floor.copy_seconds = 0.0  # all of it is fixed cost

        contenders = [
            (CLIENT_ROW, basebackup),
            (SERVER_ROW, basebackup_server),
            (RAW_ROW, raw_tar),
            ("playbook tar+zstd", ours("tar", "zstd")),
            ("playbook tar+zstd, hardware crc32c", ours("tar", "zstd", python=FAST_NODE_PYTHON)),
            ("playbook tar+zstd, manifest NONE", ours("tar", "zstd", pg_backup_manifest_checksum="NONE")),
            ("playbook tar (none)", ours("tar", "none")),
            ("playbook rsync", ours("rsync", "none")),
            (FLOOR_ROW, ansible_floor),
        ]
        if args.quick:
            quick = (CLIENT_ROW, SERVER_ROW, RAW_ROW, "playbook tar+zstd", FLOOR_ROW)
            contenders = [row for row in contenders if row[0] in quick]

        if shutil.which("pgbackrest") is None:
            print(f"skipped {PGBR_ROW}: pgbackrest is not installed (apt-get install -y pgbackrest)", flush=True)
        else:
            # Everything pgBackRest writes stays in this directory; --config keeps /etc/pgbackrest.conf out.
            pgbr_dir = make_pg_dir("pgops-bench-pgbr-")
            for sub in ("repo", "log", "lock"):
                os.makedirs(os.path.join(pgbr_dir, sub), mode=0o750)
                shutil.chown(os.path.join(pgbr_dir, sub), "postgres", "postgres")
            conf = os.path.join(pgbr_dir, "pgbackrest.conf")
            with open(conf, "w") as f:
                f.write(
                    "[global]\n"
                    f"repo1-path={pgbr_dir}/repo\n"
                    f"log-path={pgbr_dir}/log\n"
                    f"lock-path={pgbr_dir}/lock\n"
                    "log-level-console=warn\n"
                    "start-fast=y\n"
                    "compress-type=zst\n"
                    "compress-level=3\n"
                    "process-max=2\n"
                    "archive-check=y\n"
                    "\n[bench]\n"
                    f"pg1-path={c.data}\n"
                    f"pg1-socket-path={c.sock}\n"
                    f"pg1-port={c.port}\n"
                )
            shutil.chown(conf, "postgres", "postgres")

            def pgbackrest(*cmd: str) -> None:
                r = subprocess.run(
                    ["runuser", "-u", "postgres", "--", "pgbackrest", f"--config={conf}", "--stanza=bench", *cmd],
                    capture_output=True,
                    text=True,
                )
                if r.returncode != 0:
                    raise SystemExit(f"pgbackrest {' '.join(cmd)} failed (rc {r.returncode}):\n{r.stdout}{r.stderr}")

            pgbackrest("stanza-create")
            # Its backup's archive check needs the WAL in its own repository; set before any contender
            # runs so that all of them archive the same way.
            c.sql("ALTER SYSTEM SET archive_command = %s", (f"pgbackrest --config={conf} --stanza=bench archive-push %p",))
            c.sql("SELECT pg_reload_conf()")
            time.sleep(1)  # the archiver rereads its configuration asynchronously
            # Proves archive-push works (switches WAL and waits for it) before anything is timed.
            pgbackrest("check")
            contenders.append((PGBR_ROW, lambda: pgbackrest("--type=full", "backup")))
        # Rounds interleave the contenders: a slow spell of a shared machine hits them all alike.
        times = {name: [] for name, _fn in contenders}
        for rnd in range(args.rounds):
            for name, fn in contenders:
                secs = timed(fn)
                times[name].append(secs)
                extra = ""
                if hasattr(fn, "copy_seconds"):
                    fn.best_copy = min(getattr(fn, "best_copy", fn.copy_seconds), fn.copy_seconds)
                    extra = f"copy step {fn.copy_seconds:.2f} s"
                    if hasattr(fn, "checksum"):
                        extra += f", manifest ({fn.checksum}) {fn.manifest_seconds:.2f} s"
                print(f"  round {rnd + 1}: {name}: {secs:.2f} s {extra}", flush=True)
        for name, fn in contenders:
            rows.append((name, min(times[name]), getattr(fn, "best_copy", None)))
    finally:
        c.destroy()  # first: its archiver may still be pushing into pgbr_dir
        shutil.rmtree(work, ignore_errors=True)
        if pgbr_dir:
            shutil.rmtree(pgbr_dir, ignore_errors=True)

    best = {name: secs for name, secs, _copy in rows}
    refs = [("client-zstd", CLIENT_ROW), ("server-zstd", SERVER_ROW), ("raw", RAW_ROW), ("pgBackRest", PGBR_ROW)]
    refs = [(label, best[name]) for label, name in refs if name in best]
    print()
    print(f"scale {args.scale}, {mb:.0f} MB, best of {args.rounds}; ratios are of the whole time")
    head = f"{'contender':40} {'whole s':>8} {'copy s':>7} {'fixed s':>7} {'MB/s':>7}"
    print(head + "".join(f" {'vs ' + label:>14}" for label, _secs in refs))
    for name, secs, copy in rows:
        copy = copy if copy is not None else secs
        line = f"{name:40} {secs:8.2f} {copy:7.2f} {secs - copy:7.2f} {mb / secs:7.1f}"
        print(line + "".join(f" {secs / ref:14.2f}" for _label, ref in refs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
