"""The recoverability report's judgement, the drill rotation's order, the table and the
pgops_status_* metrics, without a server; and the alert rules read only series we write."""

from __future__ import annotations

import datetime
import importlib
import os
import re
import sys

import yaml
from harness.ansible import REPO, collections_workspace

sys.path.insert(0, collections_workspace())
status = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._status")
metrics = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._metrics")

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.timezone.utc)
RULES = os.path.join(REPO, "monitoring", "prometheus", "pgops-alerts.yml")


def entries():
    return [  # newest first
        {"id": "20261201T100000Z", "system_identifier": "7", "status": "complete", "stopped_at": "2026-12-01T10:00:00+00:00"},
        {"id": "20261201T090000Z", "system_identifier": "7", "status": "failed", "failed_at": "2026-12-01T09:00:05+00:00"},
        {
            "id": "20261130T100000Z", "system_identifier": "7", "status": "complete", "stopped_at": "2026-11-30T10:00:00+00:00",
            "drill": {"result": "passed", "at": "2026-11-30T12:00:00Z", "target": "random",
                      "target_time": "2026-11-30 11:00:00+00", "recovery_seconds": 3.5},
        },
        {
            "id": "20261129T100000Z", "system_identifier": "7", "status": "complete", "stopped_at": "2026-11-29T10:00:00+00:00",
            "drill": {"result": "failed", "at": "2026-11-29T12:00:00Z", "error": "checks failed"},
        },
        {"id": "20261201T110000Z", "system_identifier": "8", "status": "complete", "stopped_at": "2026-12-01T11:00:00+00:00"},
    ]  # fmt: skip


WINDOW = {"window": {"start": "2026-11-29T10:00:00+00:00", "end": "2026-12-01T11:30:00+00:00"}, "gaps": []}
HEALTHY = {"system_identifier": "7", "problems": []}


def test_a_cluster_within_its_policy():
    policy = {"max_backup_age": 3, "min_window": 48, "max_drill_age": 48}
    row, violations = status.judge("db1", "7", entries(), WINDOW, HEALTHY, policy, NOW)
    assert violations == []
    assert row["newest_backup"] == "20261201T100000Z" and row["backup_age_hours"] == 2.0
    assert row["complete_backups"] == 3 and row["newest_failure_at"] == "2026-12-01T09:00:05+00:00"
    assert row["window_hours"] == 49.5 and row["gaps"] == 0
    # The newest passing drill counts, with its random target and recovery time.
    assert (row["newest_drill"], row["drill_age_hours"]) == ("20261130T100000Z", 24.0)
    assert row["drill_target"] == "2026-11-30 11:00:00+00"
    assert row["drill_restore_seconds"] == 3.5 and row["last_drill_result"] == "passed"


def test_every_rule_broken_is_named():
    policy = {"max_backup_age": 1, "min_window": 72, "max_drill_age": 12}
    missing = ["00000001000000000000000A", "00000001000000000000000B"]
    gap = {"window": WINDOW["window"], "gaps": [{"after": "000000010000000000000009", "count": 2, "missing": missing}]}
    guard = {"system_identifier": "7", "problems": [{"code": "archive_stale"}, {"code": "archive_stale"}]}
    row, violations = status.judge("db1", "7", entries(), gap, guard, policy, NOW)
    assert violations == [
        "the newest complete backup 20261201T100000Z is 2.0 hours old (max_backup_age 1)",
        "point-in-time recovery covers 49.5 hours (min_window 72), because segment 00000001000000000000000A is missing",
        "the newest passing drill is 24.0 hours old (max_drill_age 12)",
        "the archive guard reports archive_stale",
    ]
    assert row["gaps"] == 2 and row["first_missing"] == "00000001000000000000000A"
    # Without a window rule a gap is still a violation of its own.
    _row, violations = status.judge("db1", "7", entries(), gap, HEALTHY, {}, NOW)
    assert violations == ["the WAL archive misses 2 segment(s), the first 00000001000000000000000A"]


def test_nothing_to_judge_and_an_unreadable_server():
    policy = {"max_backup_age": 26, "min_window": 1, "max_drill_age": 1}
    row, violations = status.judge("db9", "9", entries(), {}, {"msg": "connection refused"}, policy, NOW)
    assert row["newest_backup"] is None and row["window_hours"] == 0.0 and row["archive_problems"] == ["server_unreadable"]
    assert violations == [
        "no complete backup",
        "point-in-time recovery covers 0.0 hours (min_window 1)",
        "no restore drill has passed",
        "the server could not be read: connection refused",
    ]
    # No rule set: nothing to break.
    assert status.judge("db9", "9", entries(), {}, {"system_identifier": "9"}, {}, NOW)[1] == []


def test_a_failed_newest_drill_breaks_the_policy_even_without_rules():
    e = entries()
    e[0]["drill"] = {"result": "failed", "at": "2026-12-01T11:00:00Z"}
    row, violations = status.judge("db1", "7", e, WINDOW, HEALTHY, {}, NOW)
    assert row["last_drill_result"] == "failed" and row["newest_drill"] == "20261130T100000Z"
    assert violations == ["the newest restore drill failed (20261201T100000Z)"]


def test_a_damaged_or_walless_newest_backup_breaks_the_policy_even_without_rules():
    e = entries()
    e[0]["verification"] = {"at": "2026-12-01T11:00:00Z", "verified": False, "problems_count": 3}
    row, violations = status.judge("db1", "7", e, WINDOW, HEALTHY, {}, NOW)
    assert row["newest_backup"] == "20261130T100000Z", "the newest one a restore would use"
    assert violations == ["the newest complete backup 20261201T100000Z cannot be restored: its verification at "
                          "2026-12-01T11:00:00Z found 3 problem(s)"]  # fmt: skip
    short = {**WINDOW, "segments": 9, "backups": [{"id": "20261201T100000Z", "wal_complete": False,
                                                   "missing": ["000000010000000000000009"]}]}  # fmt: skip
    violations = status.judge("db1", "7", entries(), short, HEALTHY, {}, NOW)[1]
    assert violations == ["the newest usable backup 20261201T100000Z lacks WAL in the archive (000000010000000000000009): "
                          "it cannot be restored"]  # fmt: skip
    elsewhere = {**short, "segments": 0}  # the archive is not in this repository: not judged here
    assert status.judge("db1", "7", entries(), elsewhere, HEALTHY, {}, NOW)[1] == []


def test_drill_order_never_drilled_first_then_oldest():
    e = entries() + [
        {"id": "x", "system_identifier": "6", "status": "complete", "drill": {"result": "passed", "at": "2026-11-01T00:00:00Z"}},
        {"id": "y", "system_identifier": "5", "status": "failed"},
    ]
    order = status.drill_order(e)
    assert [c["system_identifier"] for c in order] == ["8", "6", "7"]
    assert order[2]["last_drill_at"] == "2026-11-30T12:00:00Z"


def test_table_has_one_line_per_cluster_with_its_verdict():
    policy = {"max_backup_age": 1}
    rows = [
        status.judge("db1", "7", entries(), WINDOW, HEALTHY, policy, NOW)[0],
        status.judge("db2", "8", entries(), {}, HEALTHY, {}, NOW)[0],
    ]
    lines = status.table(rows)
    assert lines[0].split()[:2] == ["host", "cluster"] and len(lines) == 3
    assert lines[1].startswith("db1") and "max_backup_age 1" in lines[1] and lines[2].endswith("ok")


def test_status_metrics_carry_the_policy_and_every_row():
    policy = {"max_backup_age": 26, "min_window": 168, "max_drill_age": 0}
    rows = [
        status.judge("db1", "7", entries(), WINDOW, HEALTHY, policy, NOW)[0],
        status.judge("db2", "8", entries(), {}, HEALTHY, policy, NOW)[0],
    ]
    text = metrics.render_status(rows, policy, NOW.timestamp())
    got = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            got[series] = float(value)
    a, b = '{cluster="7",host="db1"}', '{cluster="8",host="db2"}'
    stopped = datetime.datetime(2026, 12, 1, 10, tzinfo=datetime.timezone.utc).timestamp()
    assert got[f"pgops_status_newest_backup_timestamp_seconds{a}"] == stopped
    assert got[f"pgops_status_window_seconds{a}"] == 49.5 * 3600 and got[f"pgops_status_window_seconds{b}"] == 0
    assert got[f"pgops_status_last_drill_passed{a}"] == 1 and f"pgops_status_last_drill_passed{b}" not in got
    assert got[f"pgops_status_drill_recovery_seconds{a}"] == 3.5
    assert got[f"pgops_status_policy_min_window_seconds{b}"] == 168 * 3600
    assert got[f"pgops_status_policy_max_drill_age_seconds{a}"] == 0
    assert got[f"pgops_status_policy_violations{b}"] == 1  # min_window
    assert got["pgops_status_report_timestamp_seconds"] == NOW.timestamp()
    assert metrics.render_status([], policy, 5.0).splitlines()[-1] == "pgops_status_report_timestamp_seconds 5"


def test_alert_rules_read_only_series_the_collection_writes():
    rules = yaml.safe_load(open(RULES))["groups"][0]["rules"]
    used = {name for r in rules for name in re.findall(r"\bpgops_[a-z_]+", r["expr"])}
    row = status.judge("h", "1", entries(), WINDOW, HEALTHY, {}, NOW)[0]
    row.update(last_drill_result="passed")
    catalog = entries()
    catalog[0]["completed_at"] = "2026-12-01T10:00:01+00:00"
    written = metrics.render_status([row], {}, 0) + metrics.render(catalog, "/r")
    written += metrics.render_archive({"system_identifier": "1", "problems": [{"code": "archive_stale"}], "guard": {}}, "h")
    names = {line.split("{")[0].split(" ")[0] for line in written.splitlines() if not line.startswith("#")}
    assert used and used <= names, used - names


def test_a_short_window_is_judged_on_its_exact_length_not_the_rounded_hours():
    # 20 s of PITR shows as 0.01 hours, 10 s as 0.0: a policy of 0.001 h (3.6 s) is met by both, 30 s by neither.
    for seconds, shown in ((20, 0.01), (10, 0.0)):
        end = (NOW + datetime.timedelta(seconds=seconds)).isoformat()
        cov = {"window": {"start": NOW.isoformat(), "end": end}, "gaps": []}
        row, violations = status.judge("db1", "7", entries(), cov, HEALTHY, {"min_window": 0.001}, NOW)
        assert row["window_hours"] == shown and violations == [], (seconds, violations)
        row, violations = status.judge("db1", "7", entries(), cov, HEALTHY, {"min_window": 30 / 3600}, NOW)
        assert violations == [f"point-in-time recovery covers {shown} hours (min_window {30 / 3600:g})"], violations
