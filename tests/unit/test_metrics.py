"""The Prometheus textfile rendered from backup.json entries, without a server."""

from __future__ import annotations

import datetime
import importlib
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
