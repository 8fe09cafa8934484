# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backup metrics in Prometheus' text format, for node_exporter's textfile
collector: rendered from the repository's backup.json files each time a
backup completes or fails, so the file always agrees with the catalog."""

from __future__ import annotations

import datetime

from ._files import write_file_atomically

PREFIX = "pgops_backup"
# name, help, from the newest complete backup's backup.json
LAST_COMPLETE = (
    ("last_complete_timestamp_seconds", "When the newest complete backup was marked complete.", "completed_at"),
    ("last_complete_duration_seconds", "Seconds from start to stop of the newest complete backup.", "duration"),
    ("last_complete_copy_seconds", "Seconds its copy step took.", "copy_seconds"),
    ("last_complete_bytes", "Bytes it stores (compressed).", "bytes"),
    ("last_complete_source_bytes", "Bytes of the cluster's files it copied.", "source_bytes"),
    ("last_complete_wal_files", "WAL segments it needs to be restored.", "wal_files"),
)


def _timestamp(value) -> float | None:
    try:
        return datetime.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _value(value: float) -> str:
    """Exactly: a timestamp must not lose its seconds to an exponent."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(entries: list, repository: str) -> str:
    """One series per cluster (system identifier) of the repository."""
    clusters = {}
    for e in entries:  # newest first
        clusters.setdefault(str(e.get("system_identifier") or "unknown"), []).append(e)
    series = {}  # metric name -> [(labels, value)]
    for cluster, backups in sorted(clusters.items()):
        labels = f'cluster="{_label(cluster)}",repository="{_label(repository)}"'
        complete = [b for b in backups if b.get("status") == "complete"]
        failed = [b for b in backups if b.get("status") == "failed"]
        series.setdefault("complete_backups", []).append((labels, len(complete)))
        series.setdefault("failed_backups", []).append((labels, len(failed)))
        last_failure = _timestamp(failed[0].get("failed_at")) if failed else None
        series.setdefault("last_failure_timestamp_seconds", []).append((labels, last_failure or 0))
        if complete:
            for name, _help, key in LAST_COMPLETE:
                value = _timestamp(complete[0].get(key)) if key.endswith("_at") else _number(complete[0].get(key))
                if value is not None:
                    series.setdefault(name, []).append((labels, value))
    helps = {name: text for name, text, _key in LAST_COMPLETE}
    helps.update(
        complete_backups="Complete backups in the repository.",
        failed_backups="Failed backups in the repository.",
        last_failure_timestamp_seconds="When the newest failed backup failed (0: none).",
    )
    return _text(PREFIX, series, helps)


def _text(prefix: str, series: dict, helps: dict) -> str:
    lines = []
    for name in sorted(series):
        lines.append(f"# HELP {prefix}_{name} {helps[name]}")
        lines.append(f"# TYPE {prefix}_{name} gauge")
        lines += [f"{prefix}_{name}{{{labels}}} {_value(value)}" for labels, value in series[name]]
    return "\n".join(lines) + "\n"


# While a copy runs, the copy itself keeps these in the same file (pg_backup_copy's metrics_file); the
# next rewrite from the catalog (complete or failed) has none of them.
COPY_GAUGES = (
    ("copy_bytes_done", "Bytes of the cluster's files the running copy has read so far.", "bytes_done"),
    ("copy_bytes_expected", "Bytes the running copy is expected to read.", "bytes_expected"),
    ("copy_rate_bytes_per_second", "The running copy's rate over its last seconds (absent while unknown).",
     "rate_bytes_per_second"),
    ("copy_eta_seconds", "Seconds the running copy needs still at that rate (absent while unknown).", "eta_seconds"),
    ("copy_started_timestamp_seconds", "When the running copy started.", "started_at"),
    ("copy_updated_timestamp_seconds", "When the running copy last reported its progress.", "updated_at"),
)  # fmt: skip


def render_copy_progress(rec: dict, cluster: str, repository: str) -> str:
    """A running copy's progress (a _progress record) as gauges with the catalog's labels."""
    labels = f'cluster="{_label(cluster)}",repository="{_label(repository)}"'
    series = {}
    for name, _help, key in COPY_GAUGES:
        value = _timestamp(rec.get(key)) if key.endswith("_at") else _number(rec.get(key))
        if value is not None:
            series[name] = [(labels, value)]
    return _text(PREFIX, series, {name: text for name, text, _key in COPY_GAUGES}) if series else ""


def with_copy_progress(existing: str, progress: str) -> str:
    """The file's other series as they are, its copy progress replaced (or removed: progress empty)."""
    names = tuple(f"{PREFIX}_{name}" for name, _help, _key in COPY_GAUGES)
    kept = []
    for line in existing.splitlines():
        bare = line[7:] if line.startswith(("# HELP ", "# TYPE ")) else line
        if not bare.startswith(names):
            kept.append(line)
    text = "\n".join(kept)
    text = text + "\n" if text else ""
    return text + progress


def write_copy_progress(path: str, rec: dict | None, cluster: str, repository: str) -> bool:
    """Put a running copy's progress into the metrics file (rec None: take it out again)."""
    try:
        with open(path, encoding="utf-8") as f:
            existing = f.read()
    except FileNotFoundError:
        if not rec:
            return False  # nothing to take out of a file that is not there
        existing = ""
    progress = render_copy_progress(rec, cluster, repository) if rec else ""
    return write_if_changed(path, with_copy_progress(existing, progress))


ARCHIVE_PREFIX = "pgops_archive"
ARCHIVE_GAUGES = (
    ("seconds_since_last_archived", "Seconds since the archiver last archived a file (-1: never)."),
    ("ready_segments", "WAL files waiting for the archiver (.ready in pg_wal/archive_status)."),
    ("ready_bytes", "Their size in bytes."),
    ("failed_total", "Failed archive attempts since the statistics were reset."),
    ("pg_wal_bytes", "Size of pg_wal in bytes."),
    ("max_wal_size_bytes", "max_wal_size in bytes."),
    ("seconds_since_newest_in_repository", "Age of the newest segment pgops-wal archived in the repository."),
)
ARCHIVE_KEYS = {
    "seconds_since_last_archived": "seconds_since_last_archived",
    "ready_segments": "ready_count",
    "ready_bytes": "ready_bytes",
    "failed_total": "failed_count",
    "pg_wal_bytes": "pg_wal_bytes",
    "max_wal_size_bytes": "max_wal_size_bytes",
    "seconds_since_newest_in_repository": "seconds_since_newest_in_repository",
}


def render_archive(facts: dict, host: str) -> str:
    """The archive guard of one cluster (pg_archiving_info's facts), and one series per problem code."""
    guard = facts.get("guard") or {}
    labels = f'cluster="{_label(facts.get("system_identifier") or "unknown")}",host="{_label(host)}"'
    series = {}
    for name, _help in ARCHIVE_GAUGES:
        value = guard.get(ARCHIVE_KEYS[name])
        if name == "seconds_since_last_archived" and value is None:
            value = -1
        if value is not None:
            series[name] = [(labels, float(value))]
    codes = sorted({p["code"] for p in facts.get("problems") or []})
    series["problem"] = [(labels + f',code="{_label(code)}"', 1) for code in codes]
    series["problems"] = [(labels, len(codes))]
    helps = dict(ARCHIVE_GAUGES)
    helps.update(problem="A problem the archive guard found (1), by code.", problems="Problems the guard found.")
    if not series["problem"]:
        del series["problem"]
    return _text(ARCHIVE_PREFIX, series, helps)


STATUS_PREFIX = "pgops_status"
STATUS_GAUGES = (
    ("newest_backup_timestamp_seconds", "When the newest complete backup stopped (0: none)."),
    ("complete_backups", "Complete backups of the cluster."),
    ("newest_failure_timestamp_seconds", "When the newest failed backup failed (0: none)."),
    ("window_seconds", "Length of the continuous point-in-time recovery window."),
    ("window_end_timestamp_seconds", "The newest moment it reaches (0: no window)."),
    ("wal_missing_segments", "WAL segments missing from the archive after its oldest one."),
    ("drill_timestamp_seconds", "When the newest passing restore drill ran (0: none)."),
    ("last_drill_passed", "Whether the newest restore drill passed (1) or failed (0); absent before the first."),
    ("drill_recovery_seconds", "Seconds the newest passing drill's server took to reach consistency and its target."),
    ("archive_problems", "Problems the archive guard found."),
    ("policy_violations", "Rules of the policy the cluster breaks."),
    ("policy_max_backup_age_seconds", "Policy: the newest complete backup may be this old (0: no rule)."),
    ("policy_min_window_seconds", "Policy: point-in-time recovery must cover this long (0: no rule)."),
    ("policy_max_drill_age_seconds", "Policy: the newest passing drill may be this old (0: no rule)."),
)


def render_status(rows: list, policy: dict, now: float) -> str:
    """The fleet's recoverability report (rows of _status.judge) as gauges per host and cluster;
    the policy is exported too, so alert rules compare against what the user set."""
    series = {}
    for r in rows:
        labels = f'cluster="{_label(r["cluster"])}",host="{_label(r["host"])}"'
        values = {
            "newest_backup_timestamp_seconds": _timestamp(r.get("newest_backup_at")) or 0,
            "complete_backups": r.get("complete_backups") or 0,
            "newest_failure_timestamp_seconds": _timestamp(r.get("newest_failure_at")) or 0,
            "window_seconds": round((r.get("window_hours") or 0) * 3600),
            "window_end_timestamp_seconds": _timestamp(r.get("window_end")) or 0,
            "wal_missing_segments": r.get("gaps") or 0,
            "drill_timestamp_seconds": _timestamp(r.get("drill_at")) or 0,
            "last_drill_passed": {"passed": 1, "failed": 0}.get(r.get("last_drill_result")),
            "drill_recovery_seconds": _number(r.get("drill_restore_seconds")),
            "archive_problems": len(r.get("archive_problems") or []),
            "policy_violations": len(r.get("violations") or []),
            "policy_max_backup_age_seconds": float(policy.get("max_backup_age") or 0) * 3600,
            "policy_min_window_seconds": float(policy.get("min_window") or 0) * 3600,
            "policy_max_drill_age_seconds": float(policy.get("max_drill_age") or 0) * 3600,
        }
        for name, value in values.items():
            if value is not None:
                series.setdefault(name, []).append((labels, value))
    helps = dict(STATUS_GAUGES)
    helps["report_timestamp_seconds"] = "When the status playbook wrote this report."
    text = _text(STATUS_PREFIX, series, helps) if series else ""
    # One series without labels: alert when the report itself goes stale.
    return text + _text(STATUS_PREFIX, {"report_timestamp_seconds": [("", round(now))]}, helps).replace("{}", "")


def write_if_changed(path: str, text: str, check_mode: bool = False) -> bool:
    """Write a metrics (or report) file atomically, only when its content changes;
    readable by all (a collector runs as another user), it holds no secret."""
    data = text.encode()
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    except OSError:
        pass
    if not check_mode:
        write_file_atomically(path, data, 0o644)
    return True


def publish(path: str, entries: list, repository: str) -> None:
    """Write the metrics file for the catalog entries atomically; readable by all
    (a collector runs as another user), it holds no secret: sizes, times and counts."""
    write_file_atomically(path, render(entries, repository).encode(), 0o644)
