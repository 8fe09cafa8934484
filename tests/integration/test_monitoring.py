"""The shipped Prometheus alert rules, checked and unit-tested by Debian's promtool; the metrics
files the collection writes, read by a real node_exporter's textfile collector."""

from __future__ import annotations

import os
import subprocess

import yaml
from harness.ansible import REPO
from harness.monitoring import PROMTOOL, samples, scrape_textfiles

RULES_DIR = os.path.join(REPO, "monitoring", "prometheus")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)


def test_alert_rules_are_valid_and_each_rule_is_tested():
    check = promtool("check", "rules", "pgops-alerts.yml")
    assert check.returncode == 0 and "SUCCESS: 10 rules found" in check.stdout, check.stdout + check.stderr
    tested = promtool("test", "rules", "pgops-alerts.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # Every alert of the rules file has at least one test that expects it to fire.
    rules = {r["alert"] for g in yaml.safe_load(open(os.path.join(RULES_DIR, "pgops-alerts.yml")))["groups"] for r in g["rules"]}
    cases = yaml.safe_load(open(os.path.join(RULES_DIR, "pgops-alerts.test.yml")))["tests"]
    firing = {t["alertname"] for c in cases for t in c["alert_rule_test"] if t.get("exp_alerts")}
    assert rules == firing, rules ^ firing


def test_node_exporter_serves_the_backup_and_archive_textfiles(playbook, tmp_path):
    """The archive guard textfile pg_archiving_metrics writes parses in node_exporter, labels escaped."""
    facts = {
        "system_identifier": "7441",
        "problems": [{"code": "archive_backlog"}],
        "guard": {"ready_count": 70, "seconds_since_last_archived": 12.5, "backlog_max": 64},
    }
    run = playbook(
        [
            {
                "hosts": "postgresql",
                "gather_facts": False,
                "tasks": [
                    {
                        "name": "publish",
                        "pgops.online_backup.pg_archiving_metrics": {
                            "path": str(tmp_path / "pgops_archive.prom"),
                            "facts": facts,
                            "host": 'db"1',
                        },
                    }
                ],
            }
        ]
    )
    assert run.rc == 0, run
    got = samples(scrape_textfiles(str(tmp_path)))
    labels = 'cluster="7441",host="db\\"1"'
    assert got[f"pgops_archive_ready_segments{{{labels}}}"] == 70
    assert got['pgops_archive_problem{cluster="7441",code="archive_backlog",host="db\\"1"}'] == 1
    assert got[f"pgops_archive_seconds_since_last_archived{{{labels}}}"] == 12.5
    assert got["node_textfile_scrape_error"] == 0
