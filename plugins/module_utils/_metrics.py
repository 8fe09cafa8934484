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
    lines = []
    for name in sorted(series):
        lines.append(f"# HELP {PREFIX}_{name} {helps[name]}")
        lines.append(f"# TYPE {PREFIX}_{name} gauge")
        lines += [f"{PREFIX}_{name}{{{labels}}} {_value(value)}" for labels, value in series[name]]
    return "\n".join(lines) + "\n"


def publish(path: str, entries: list, repository: str) -> None:
    """Write the metrics file for the catalog entries atomically; readable by all
    (a collector runs as another user), it holds no secret: sizes, times and counts."""
    write_file_atomically(path, render(entries, repository).encode(), 0o644)
