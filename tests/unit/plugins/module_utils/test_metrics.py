"""The Prometheus textfile rendered from backup.json entries, without a server."""

from __future__ import annotations

import datetime
import importlib
import os
import stat
import sys

from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
metrics = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._metrics")


def ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def parse(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def test_newest_complete_and_failed_backups_per_cluster():
    entries = [  # newest first, as read_catalog returns them
        {"id": "3", "system_identifier": "111", "status": "running"},
        {"id": "2", "system_identifier": "111", "status": "failed", "failed_at": "2026-11-29T10:05:00+00:00"},
        {"id": "1", "system_identifier": "111", "status": "complete", "completed_at": "2026-11-29T10:00:00+00:00",
         "duration": 12.5, "copy_seconds": 11.0, "bytes": 1000, "source_bytes": 5000, "wal_files": 2},
        {"id": "0", "system_identifier": "111", "status": "complete", "completed_at": "2026-11-28T10:00:00+00:00",
         "duration": 99, "bytes": 1},
        {"id": "9", "system_identifier": "222", "status": "failed", "failed_at": "2026-11-27T10:00:00+00:00"},
    ]  # fmt: skip
    text = metrics.render(entries, '/srv/"pg"')
    got = parse(text)
    a = 'cluster="111",repository="/srv/\\"pg\\""'
    b = 'cluster="222",repository="/srv/\\"pg\\""'
    assert got[f"pgops_backup_complete_backups{{{a}}}"] == 2
    assert got[f"pgops_backup_failed_backups{{{a}}}"] == 1
    assert got[f"pgops_backup_last_complete_timestamp_seconds{{{a}}}"] == ts("2026-11-29T10:00:00+00:00")
    assert got[f"pgops_backup_last_complete_duration_seconds{{{a}}}"] == 12.5
    assert got[f"pgops_backup_last_complete_bytes{{{a}}}"] == 1000
    assert got[f"pgops_backup_last_complete_wal_files{{{a}}}"] == 2
    assert got[f"pgops_backup_last_failure_timestamp_seconds{{{a}}}"] == ts("2026-11-29T10:05:00+00:00")
    # A cluster with no complete backup: counts and failure only, no made-up "last complete".
    assert got[f"pgops_backup_complete_backups{{{b}}}"] == 0
    assert not [k for k in got if k.startswith("pgops_backup_last_complete") and 'cluster="222"' in k]
    # Every series has its HELP and TYPE once.
    names = {k.split("{")[0] for k in got}
    for name in names:
        assert text.count(f"# TYPE {name} gauge") == 1 and text.count(f"# HELP {name} ") == 1


def test_publish_writes_what_render_renders_readable_by_the_collector(tmp_path):
    entries = [{"id": "1", "system_identifier": "111", "status": "complete", "completed_at": "2026-11-29T10:00:00+00:00"}]
    path = tmp_path / "pgops_backup.prom"
    path.write_text("stale")
    os.chmod(path, 0o600)
    old = os.umask(0o077)
    try:
        metrics.publish(str(path), entries, "/srv/pg")
    finally:
        os.umask(old)
    assert path.read_text() == metrics.render(entries, "/srv/pg")
    assert parse(path.read_text())['pgops_backup_complete_backups{cluster="111",repository="/srv/pg"}'] == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(tmp_path) == ["pgops_backup.prom"]  # no temporary file left


def test_render_of_an_empty_repository_and_odd_values():
    assert metrics.render([], "/r") == "\n"
    got = parse(
        metrics.render(
            [
                {"id": "2", "status": "complete", "completed_at": "not a time", "bytes": "n/a", "duration": "7"},
                {"id": "1", "status": "failed"},
            ],
            "/r",
        )
    )
    labels = 'cluster="unknown",repository="/r"'
    # Unreadable values are left out, never written as 0; a failure without a time is 0.
    assert got[f"pgops_backup_last_complete_duration_seconds{{{labels}}}"] == 7
    assert f"pgops_backup_last_complete_timestamp_seconds{{{labels}}}" not in got
    assert f"pgops_backup_last_complete_bytes{{{labels}}}" not in got
    assert got[f"pgops_backup_last_failure_timestamp_seconds{{{labels}}}"] == 0


def test_timestamps_keep_their_seconds():
    text = metrics.render(
        [{"id": "1", "system_identifier": "1", "status": "complete", "completed_at": "2026-11-29T10:00:01+00:00"}], "/r"
    )
    line = next(x for x in text.splitlines() if x.startswith("pgops_backup_last_complete_timestamp_seconds"))
    assert line.endswith(" " + str(int(ts("2026-11-29T10:00:01+00:00")))) and "e+" not in line
