"""A long backup says what it waits for while it waits: the start's spread checkpoint, then the
copy's progress (bytes of expected, rate, time left) at a steady interval, in the run's output,
in pg_backup_session_info and in the metrics file; the summary keeps its figures."""

from __future__ import annotations

import os
import re
import subprocess
import threading

from harness.backup import backups, start_backup_in_background
from harness.pg import make_pg_dir
from harness.workload import PGBENCH

COPY_LINE = re.compile(r"^\[localhost\] copy: ([\d.]+) (B|KiB|MiB|GiB) of ([\d.]+) (B|KiB|MiB|GiB) \((\d+)%\), (.*)$")
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def session_info(playbook) -> list:
    run = playbook(
        [
            {
                "hosts": "postgresql",
                "gather_facts": False,
                "become": True,
                "become_user": "postgres",
                "tasks": [{"name": "info", "pgops.online_backup.pg_backup_session_info": {}}],
            }
        ]
    )
    assert run.rc == 0, run
    return run.task("info")["sessions"]


def test_a_long_backup_says_it_waits_for_the_checkpoint_then_how_far_the_copy_is(make_cluster, playbook, tmp_path):
    # A scale-100 pgbench database (1.5 GB; generated in the server, no keys: what the copy reads is the same).
    c = make_cluster(16, checkpoint_timeout="30s", checkpoint_completion_target="0.9")
    subprocess.run(
        [PGBENCH, "-i", "-q", "-I", "dtG", "-s", "100", "-h", c.sock, "-p", str(c.port), "-U", "postgres", "postgres"],
        check=True,
        capture_output=True,
    )
    c.sql("CHECKPOINT")
    # About 80 dirty pages: a spread checkpoint paces them over seconds (a fast one writes them at once).
    c.sql("CREATE TABLE dirty AS SELECT g, md5(g::text) AS h FROM generate_series(1, 5000) g")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    prom = os.path.join(make_pg_dir("pgops-prom-"), "pgops_backup.prom")
    proc = start_backup_in_background(
        c,
        repo,
        str(tmp_path / "w"),
        pg_backup_fast_checkpoint=False,
        pg_backup_progress_interval=0.5,
        # zstd -6 on one thread: a copy of some seconds however idle the machine (-3 takes two).
        pg_backup_compression="zstd",
        pg_backup_compression_level=6,
        pg_backup_compression_threads=1,
        pg_backup_metrics_file=prom,
    )
    lines, seen_gauges, listed = [], [], {}
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if COPY_LINE.match(lines[-1]):
            if os.path.exists(prom):
                seen_gauges.append("pgops_backup_copy_bytes_done{" in open(prom).read())
            if not listed:  # once: what pg_backup_session_info says while the copy runs
                listed["thread"] = threading.Thread(target=lambda: listed.update(sessions=session_info(playbook)))
                listed["thread"].start()
    assert proc.wait() == 0, "\n".join(lines[-60:])
    out = "\n".join(lines)

    # The start: at least one line while the spread checkpoint ran, naming the way to start at once.
    waits = [x for x in lines if "start: waiting for the checkpoint (spread, requested" in x]
    assert waits, out[-5000:]
    assert all(x.endswith("ago; pg_backup_fast_checkpoint: true starts at once)") for x in waits), waits
    summary = lines[next(i for i, x in enumerate(lines) if "TASK [pgops.online_backup.pg_backup : Summary]" in x) :]
    assert any("for its spread checkpoint" in x for x in summary), summary

    # The copy: a line every half second or so, bytes growing, before the summary, which keeps its figures.
    copy_lines = [m for m in (COPY_LINE.match(x) for x in lines[: lines.index(summary[0])]) if m]
    done = [float(m.group(1)) * UNITS[m.group(2)] for m in copy_lines]
    assert len(done) >= 3 and done == sorted(done) and done[0] < done[-1], "\n".join(m.group(0) for m in copy_lines)
    (info,) = backups(repo)
    assert info["status"] == "complete"
    # Of what the copy reads: the data directory's files (as printed, to a tenth of a unit).
    assert all(abs(float(m.group(3)) * UNITS[m.group(4)] / info["source_bytes"] - 1) < 0.05 for m in copy_lines), out
    assert all(re.search(r"[\d.]+ (B|KiB|MiB|GiB)/s(, about \S+ left)?$", m.group(6)) for m in copy_lines[1:]), out
    assert re.search(r"method tar, compression zstd: [\d.]+ MB copied in [\d.]+ s \([\d.]+ MB/s\), [\d.]+ MB stored", out)

    # pg_backup_session_info, while the copy ran: its progress.
    listed["thread"].join(60)
    (mine,) = [s for s in listed["sessions"] if s["session_id"].startswith(info["id"])]
    assert mine["status"] == "running" and 0 < mine["progress"]["bytes_done"] <= mine["progress"]["bytes_expected"], mine
    assert mine["progress"]["phase"] == "copying" and mine["progress"]["percent"] > 0, mine

    # The metrics file: the copy's gauges while it ran, none once the backup is recorded complete.
    assert any(seen_gauges), seen_gauges
    final = open(prom).read()
    assert "pgops_backup_copy_" not in final and "pgops_backup_complete_backups{" in final
