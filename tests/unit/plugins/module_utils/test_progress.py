"""Progress of a backup's long steps without a server: the rate and time left of a copy, the
lines a run prints, the record a copy writes, what the copy's reading process has read, and the
copy's gauges in the metrics file."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import stat
import subprocess
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
progress = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._progress")
copy = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._copy")
metrics = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._metrics")
sessions = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._sessions")

MiB = 1 << 20


# -- rate and time left


def test_no_rate_before_a_second_has_passed():
    meter = progress.Meter(100 * MiB, 0.0, wall=0.0)
    rec = meter.update(5 * MiB, 0.5)
    assert rec["rate_bytes_per_second"] is None and rec["eta_seconds"] is None
    assert rec["bytes_done"] == 5 * MiB and rec["percent"] == 5.0 and rec["seconds"] == 0.5


def test_rate_and_time_left_over_the_last_seconds():
    meter = progress.Meter(100 * MiB, 0.0, wall=0.0)
    for t in range(1, 5):
        rec = meter.update(t * 10 * MiB, float(t))  # 10 MiB/s
    assert rec["rate_bytes_per_second"] == 10 * MiB
    assert rec["eta_seconds"] == pytest.approx(6.0)
    # It slows down to 1 MiB/s: after RATE_WINDOW seconds the rate is the new one, not the average.
    done = 40 * MiB
    for t in range(5, 5 + int(progress.RATE_WINDOW) + 2):
        done += MiB
        rec = meter.update(done, float(t))
    assert rec["rate_bytes_per_second"] == MiB
    assert rec["eta_seconds"] == pytest.approx((100 * MiB - done) / MiB)


def test_a_file_that_grows_during_the_copy_moves_expected_past_it():
    rec = progress.Meter(10, 0.0, wall=0.0).update(15, 2.0)
    assert rec["bytes_expected"] == 15 and rec["percent"] == 100.0 and rec["eta_seconds"] == 0.0


def test_expected_follows_what_an_incremental_copy_reads():
    meter = progress.Meter(100, 0.0, wall=0.0)
    assert meter.update(10, 1.0, expected=40)["percent"] == 25.0


@pytest.mark.parametrize(
    "done,expected,rate,left",
    [(0, 100, None, None), (0, 100, 0.0, None), (50, 100, 10.0, 5.0), (100, 100, None, 0.0), (0, 0, None, 0.0)],
)
def test_eta(done, expected, rate, left):
    assert progress.eta(done, expected, rate) == left


def test_percent_of_nothing_expected():
    assert progress.percent(0, 0) == 0.0 and progress.percent(5, 0) == 100.0


# -- lines for people


def test_copy_line():
    rec = {"bytes_done": 812 * MiB, "bytes_expected": 1600 * MiB, "percent": 50.75, "rate_bytes_per_second": 402 * MiB,
           "eta_seconds": 2.0, "seconds": 2.0, "phase": "copying"}  # fmt: skip
    assert progress.copy_line(rec) == "copy: 812.0 MiB of 1.6 GiB (51%), 402.0 MiB/s, about 2.0s left"
    assert progress.copy_line(dict(rec, eta_seconds=None)) == "copy: 812.0 MiB of 1.6 GiB (51%), 402.0 MiB/s"
    assert progress.copy_line(dict(rec, rate_bytes_per_second=None, seconds=0.5)).endswith("(51%), 0.5s so far")
    assert progress.copy_line(dict(rec, phase="checksums")) == "copy: 812.0 MiB of 1.6 GiB (51%), checksums"
    assert progress.copy_line(dict(rec, eta_seconds=4000)).endswith("about 1h06m left")


def test_start_line_names_the_spread_checkpoint_and_how_to_start_at_once():
    info = {"start_stage": "checkpoint", "start_waiting_seconds": 70.2, "fast": False}
    assert progress.start_line(info, "pg_backup_fast_checkpoint: true") == (
        "start: waiting for the checkpoint (spread, requested 1m10s ago; pg_backup_fast_checkpoint: true starts at once)"
    )
    assert progress.start_line(info).endswith("(spread, requested 1m10s ago; fast=true starts at once)")
    assert progress.start_line(dict(info, fast=True)) == "start: waiting for the checkpoint (fast, requested 1m10s ago)"
    assert progress.start_line(dict(info, start_stage="connect")) == "start: connecting to the server (1m10s so far)"
    assert "WAL summaries" in progress.start_line(dict(info, start_stage="wal summaries"))


# -- the record in the session's directory


def test_progress_record_is_private_and_replaced_whole(tmp_path):
    rec = progress.Meter(100, 0.0).update(10, 1.5)
    progress.write_progress(str(tmp_path), rec)
    path = tmp_path / progress.PROGRESS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert progress.read_progress(str(tmp_path)) == json.loads(json.dumps(rec))
    assert [p.name for p in tmp_path.iterdir()] == [progress.PROGRESS_FILE]  # no temporary file left
    path.write_text("{not json")
    assert progress.read_progress(str(tmp_path)) is None
    assert progress.read_progress(str(tmp_path / "missing")) is None


def test_a_running_session_lists_its_copy_progress(tmp_path, write_session, live_process):
    sdir = write_session(tmp_path, "s", status="running", pid=live_process[0], pid_starttime=live_process[1])
    assert "progress" not in sessions.list_sessions(str(tmp_path))[0]
    rec = progress.Meter(100, 0.0).update(10, 1.5)
    progress.write_progress(sdir, rec)
    (listed,) = sessions.list_sessions(str(tmp_path))
    assert listed["progress"]["bytes_done"] == 10 and listed["progress"]["bytes_expected"] == 100
    # What the list playbook prints of a running session says it too.
    assert listed["waiting_for"] == f"the stop (the copy runs meanwhile): {progress.copy_line(rec)}"
    progress.write_progress(sdir, dict(rec, finished=True))  # the copy ended: nothing to show
    assert "progress" not in sessions.list_sessions(str(tmp_path))[0]


def test_a_starting_session_says_how_long_its_start_has_waited(live_process):
    state = {"status": "starting", "pid": live_process[0], "pid_starttime": live_process[1],
             "checkpoint_requested_at": "2026-11-29T10:00:00+00:00", "start_stage": "checkpoint", "fast": False}  # fmt: skip
    now = datetime.datetime.fromisoformat("2026-11-29T10:01:10+00:00").timestamp()
    info = sessions.describe(state, now)
    assert info["start_waiting_seconds"] == 70.0 and info["waiting_for"].endswith("checkpoint_timeout), for 1m10s so far")
    assert "WAL summarizer" in sessions.describe(dict(state, start_stage="wal summaries"), now)["waiting_for"]


# -- what the copy's reading process has read


def test_copy_progress_counts_what_the_reading_processes_read(tmp_path):
    data = tmp_path / "data"
    data.write_bytes(os.urandom(3 * MiB))
    counter = copy.CopyProgress(6 * MiB)
    for _ in range(2):  # two processes one after the other, as rsync runs for a tablespace and the data directory
        proc = subprocess.Popen(["cat", str(data)], stdout=subprocess.DEVNULL)
        counter.reading(proc)
        counter.finished(proc)  # waits for it to exit, reads its count before it is reaped
        proc.wait()
    assert 6 * MiB <= counter.bytes_done() < 6 * MiB + 64 * 1024
    proc = subprocess.Popen(["sleep", "5"])
    counter.reading(proc)
    assert counter.bytes_done() >= 6 * MiB  # a running one that has read nothing yet
    proc.kill()
    proc.wait()
    counter.finished(proc)  # already reaped: what was seen of it counts
    assert counter.bytes_done() >= 6 * MiB


# -- the copy's gauges in the metrics file


def test_copy_gauges_come_and_go_beside_the_catalogs(tmp_path):
    prom = str(tmp_path / "b.prom")
    catalog = metrics.render(
        [{"id": "1", "system_identifier": "111", "status": "complete", "completed_at": "2026-11-29T10:00:00+00:00"}], "/r"
    )
    with open(prom, "w") as f:
        f.write(catalog)
    rec = progress.Meter(1000, 0.0, wall=1796000000.0).update(400, 2.0)
    assert metrics.write_copy_progress(prom, rec, "111", "/r") is True
    text = open(prom).read()
    assert text.startswith(catalog)
    assert 'pgops_backup_copy_bytes_done{cluster="111",repository="/r"} 400' in text
    assert 'pgops_backup_copy_bytes_expected{cluster="111",repository="/r"} 1000' in text
    assert 'pgops_backup_copy_started_timestamp_seconds{cluster="111",repository="/r"} 1796000000' in text
    assert "pgops_backup_copy_rate_bytes_per_second" in text and "# TYPE pgops_backup_copy_bytes_done gauge" in text
    assert 'pgops_backup_copy_eta_seconds{cluster="111",repository="/r"} 3' in text
    rec2 = progress.Meter(1000, 0.0).update(900, 2.0)
    metrics.write_copy_progress(prom, rec2, "111", "/r")
    text = open(prom).read()
    assert text.count("pgops_backup_copy_bytes_done{") == 1 and "} 900" in text
    assert metrics.write_copy_progress(prom, None, "111", "/r") is True
    assert open(prom).read() == catalog
    assert stat.S_IMODE(os.stat(prom).st_mode) == 0o644
    missing = str(tmp_path / "none.prom")
    assert metrics.write_copy_progress(missing, None, "111", "/r") is False and not os.path.exists(missing)
