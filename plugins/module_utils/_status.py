# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The recoverability report: one cluster's catalog entries, WAL coverage and archive
guard judged against a policy (hours; 0 is no rule). Pure: data in, a row and the
rules it breaks out. Also the catalog for people: the report's table and the backup
list (aligned columns, sizes like 1.2 GiB, durations like 2m05s)."""

from __future__ import annotations

import datetime

from ._repository import latest
from ._units import human_bytes, human_seconds

POLICY = ("max_backup_age", "min_window", "max_drill_age")


def when(value) -> datetime.datetime | None:
    try:
        moment = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else None


def _hours(a, b) -> float | None:
    return round((b - a).total_seconds() / 3600, 2) if a and b else None


def newest_drills(entries: list) -> list:
    """(backup id, drill record) of every recorded drill, oldest first."""
    drills = [(str(e.get("id")), e["drill"]) for e in entries if isinstance(e.get("drill"), dict) and e["drill"].get("at")]
    return sorted(drills, key=lambda d: str(d[1]["at"]))


def judge(host: str, cluster: str, entries: list, coverage: dict, archiving: dict, policy: dict, now) -> tuple:
    mine = [e for e in entries if str(e.get("system_identifier")) == cluster]
    complete = sorted((e for e in mine if e.get("status") == "complete"), key=lambda e: str(e.get("id")), reverse=True)
    # The newest backup a restore would use: not one known to be damaged, nor one whose chain is broken.
    passed_over = []
    newest = latest(mine, skipped=passed_over)
    newest_at = when(newest.get("stopped_at") or newest.get("completed_at")) if newest else None
    drills = newest_drills(mine)
    passed = [d for d in drills if d[1].get("result") == "passed"]
    drill_id, drill = passed[-1] if passed else (None, None)
    window = (coverage or {}).get("window") or {}
    gaps = (coverage or {}).get("gaps") or []
    failed = [e for e in mine if e.get("status") == "failed"]
    row = {
        "host": host,
        "cluster": cluster,
        "newest_backup": newest["id"] if newest else None,
        "newest_backup_at": newest_at.isoformat() if newest_at else None,
        "backup_age_hours": _hours(newest_at, now),
        "complete_backups": len(complete),
        "newest_failure_at": max((str(e.get("failed_at")) for e in failed if e.get("failed_at")), default=None),
        "window_start": window.get("start"),
        "window_end": window.get("end"),
        "window_hours": _hours(when(window.get("start")), when(window.get("end"))) or 0.0,
        "gaps": sum(g.get("count", 0) for g in gaps),
        "first_missing": gaps[0]["missing"][0] if gaps and gaps[0].get("missing") else None,
        "newest_drill": drill_id,
        "drill_at": drill.get("at") if drill else None,
        "drill_age_hours": _hours(when(drill.get("at")), now) if drill else None,
        "drill_target": (drill.get("target_time") or drill.get("target")) if drill else None,
        "drill_reached_time": drill.get("reached_time") if drill else None,
        "drill_restore_seconds": drill.get("recovery_seconds") if drill else None,
        "last_drill_result": drills[-1][1].get("result") if drills else None,
        "archive_problems": sorted({str(p.get("code")) for p in (archiving or {}).get("problems") or []}),
    }
    violations = []
    if policy.get("max_backup_age"):
        if newest is None:
            violations.append("no complete backup")
        elif row["backup_age_hours"] > policy["max_backup_age"]:
            violations.append(
                f"the newest complete backup {newest['id']} is {row['backup_age_hours']} hours old "
                f"(max_backup_age {policy['max_backup_age']:g})"
            )
    # Judged on the exact span: the row's hours are rounded to 0.01 (36 s) for reading.
    start, end = when(window.get("start")), when(window.get("end"))
    window_exact = (end - start).total_seconds() / 3600 if start and end else 0.0
    if policy.get("min_window") and window_exact < policy["min_window"]:
        why = f", because segment {row['first_missing']} is missing" if row["first_missing"] else ""
        violations.append(f"point-in-time recovery covers {row['window_hours']} hours (min_window {policy['min_window']:g}){why}")
    if policy.get("max_drill_age"):
        if drill is None:
            violations.append("no restore drill has passed")
        elif row["drill_age_hours"] > policy["max_drill_age"]:
            violations.append(
                f"the newest passing drill is {row['drill_age_hours']} hours old (max_drill_age {policy['max_drill_age']:g})"
            )
    if row["last_drill_result"] == "failed":
        violations.append(f"the newest restore drill failed ({drills[-1][0]})")
    drill_said = row["last_drill_result"] == "failed" and passed_over and drills[-1][0] == passed_over[0]["id"]
    if passed_over and complete and complete[0]["id"] == passed_over[0]["id"] and not drill_said:
        violations.append(f"the newest complete backup {passed_over[0]['id']} cannot be restored: {passed_over[0]['reason']}")
    # Only when this repository holds the archive: with none here, every backup would look short of WAL.
    own_wal = {b.get("id"): b for b in (coverage or {}).get("backups") or []} if (coverage or {}).get("segments") else {}
    if newest is not None and newest["id"] in own_wal and not own_wal[newest["id"]].get("wal_complete"):
        lacking = ", ".join(own_wal[newest["id"]].get("missing", [])[:3]) or "its WAL range"
        violations.append(f"the newest usable backup {newest['id']} lacks WAL in the archive ({lacking}): it cannot be restored")
    if row["gaps"] and not any("missing" in v for v in violations):
        violations.append(f"the WAL archive misses {row['gaps']} segment(s), the first {row['first_missing']}")
    if archiving and not archiving.get("system_identifier"):
        row["archive_problems"] = ["server_unreadable"]
        violations.append(f"the server could not be read: {archiving.get('msg') or 'no answer'}")
    elif row["archive_problems"]:
        violations.append(f"the archive guard reports {', '.join(row['archive_problems'])}")
    row["violations"] = violations
    return row, violations


def drill_order(entries: list) -> list:
    """Clusters with a complete backup, the one whose newest drill is oldest (or never) first."""
    clusters = {}
    for e in entries:
        if e.get("status") == "complete" and e.get("system_identifier"):
            clusters.setdefault(str(e["system_identifier"]), [])
    for e in entries:
        drill = e.get("drill")
        if str(e.get("system_identifier")) in clusters and isinstance(drill, dict) and drill.get("at"):
            clusters[str(e["system_identifier"])].append(str(drill["at"]))
    order = [{"system_identifier": c, "last_drill_at": max(ats) if ats else None} for c, ats in clusters.items()]
    return sorted(order, key=lambda c: (c["last_drill_at"] is not None, c["last_drill_at"] or "", c["system_identifier"]))


def table(rows: list) -> list:
    """The report as lines of text, one per cluster, for the controller's output."""
    head = ("host", "cluster", "newest backup", "age h", "PITR window h", "gaps", "newest drill", "age h", "archive", "policy")
    body = []
    for r in rows:
        body.append(
            (
                r["host"],
                r["cluster"],
                r["newest_backup"] or "-",
                _text(r["backup_age_hours"]),
                _text(r["window_hours"]),
                f"{r['gaps']} from {r['first_missing']}" if r["gaps"] else "0",
                f"{r['newest_drill']} ({r['last_drill_result']})" if r["newest_drill"] else (r["last_drill_result"] or "never"),
                _text(r["drill_age_hours"]),
                ",".join(r["archive_problems"]) or "ok",
                "; ".join(r["violations"]) or "ok",
            )
        )
    return columns(head, body)


def _text(value) -> str:
    return "-" if value is None else f"{value:g}"


def columns(head: tuple, body: list) -> list:
    """head and the body's rows as lines of left-aligned columns two spaces apart."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + body]


# -- the backup list (pg_backup_info format=table, the list playbook)

LIST_HEAD = ("id", "type", "status", "started (UTC)", "duration", "stored / source", "WAL range", "verified", "last drill")
NOTE_MAX = 200  # characters of a failed backup's error in its note; the whole error is in backup.json


def _minute(value) -> str:
    """A recorded time as 2026-11-29 10:15 (UTC); the text itself when it is not an ISO time."""
    if not value:
        return "-"
    moment = when(value)
    if moment is None:
        return str(value)
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _kind(entry: dict) -> str:
    """full (also a backup.json from before incremental backups, which has no type) or incr of <parent>."""
    if entry.get("status") == "invalid":
        return "-"  # an unreadable backup.json says nothing
    kind = entry.get("type") or "full"
    if kind == "incremental":
        return f"incr of {entry.get('parent') or '?'}"
    return str(kind)


def _duration(entry: dict, now) -> str:
    if entry.get("duration") is not None:
        return human_seconds(entry["duration"])
    began = when(entry.get("started_at") or entry.get("created_at"))
    status = entry.get("status")
    if began is None:
        return "-"
    if status == "running" and now is not None:
        return human_seconds((now - began).total_seconds()) + " so far"
    ended = when(entry.get("failed_at") if status == "failed" else entry.get("stopped_at") or entry.get("completed_at"))
    return human_seconds((ended - began).total_seconds()) if ended else "-"


def _sizes(entry: dict) -> str:
    stored = entry.get("bytes") if entry.get("bytes") is not None else entry.get("size_on_disk")
    if stored is None and entry.get("source_bytes") is None:
        return "-"
    return f"{human_bytes(stored)} / {human_bytes(entry.get('source_bytes'))}"


def _wal_range(entry: dict) -> str:
    start, stop = entry.get("start_wal"), entry.get("stop_wal")
    if not start and not stop:
        return "-"
    return f"{start or '?'} .. {stop or '?'}"


def _verified(entry: dict) -> str:
    v = entry.get("verification")
    if isinstance(v, dict) and v.get("at"):
        if v.get("verified") is True:
            return f"ok {_minute(v['at'])}"
        if v.get("verified") is False:
            return f"FAILED {_minute(v['at'])}"
        return f"unknown {_minute(v['at'])}"
    return "never" if entry.get("status") == "complete" else "-"


def _last_drill(entry: dict) -> str:
    """The newest of the drill (passed or failed) and the inconclusive one."""
    drills = [d for d in (entry.get("drill"), entry.get("inconclusive_drill")) if isinstance(d, dict) and d.get("at")]
    if not drills:
        return "never" if entry.get("status") == "complete" else "-"
    newest = max(drills, key=lambda d: str(d["at"]))
    return f"{newest.get('result') or '?'} {_minute(newest['at'])}"


def list_row(entry: dict, now=None) -> tuple:
    """One backup.json as the list's columns (LIST_HEAD); now: for a running backup's time so far."""
    return (
        str(entry.get("id")),
        _kind(entry),
        str(entry.get("status") or "-"),
        _minute(entry.get("started_at") or entry.get("created_at")),
        _duration(entry, now),
        _sizes(entry),
        _wal_range(entry),
        _verified(entry),
        _last_drill(entry),
    )


def _notes(entries: list) -> list:
    notes = []
    for e in entries:
        error = e.get("error")
        if error and e.get("status") in ("failed", "invalid"):
            text = " ".join(str(error).split())
            text = text if len(text) <= NOTE_MAX else text[: NOTE_MAX - 3] + "..."
            notes.append(f"  {e.get('id')} {e.get('status')}: {text}")
        if isinstance(e.get("pinned"), dict):
            why = e["pinned"].get("reason") or "no reason given"
            notes.append(f"  {e.get('id')} pinned: {why}")
    return notes


def _cluster_heading(cluster: str, mine: list, latest_id) -> str:
    known = next((e for e in mine if e.get("pg_version_text") or e.get("pg_version") or e.get("data_directory")), {})
    hosts = sorted({str(e["inventory_hostname"]) for e in mine if e.get("inventory_hostname")})
    about = [", ".join(hosts)] if hosts else []
    if known.get("pg_version_text") or known.get("pg_version"):
        about.append(f"PostgreSQL {known.get('pg_version_text') or known.get('pg_version')}")
    if known.get("data_directory"):
        about.append(str(known["data_directory"]))
    complete = sum(1 for e in mine if e.get("status") == "complete")
    name = f"cluster {cluster}" if cluster != "unknown" else "backups of no known cluster"
    head = f"{name} ({'; '.join(about)})" if about else name
    if latest_id is None:
        pick = ""
    else:
        pick = f"; latest: {latest_id or 'none (no complete backup that is not known to be damaged)'}"
    return f"{head}: {len(mine)} backup(s), {complete} complete{pick}"


def backup_table(entries: list, now=None, latest: dict | None = None, repository: str | None = None) -> list:
    """The catalog for people: per cluster (system identifier) a heading, a table of its backups
    newest first (LIST_HEAD) and notes (a failed backup's error, pins). latest: cluster -> the id a
    restore of latest takes (a cluster missing from it has none; latest None: not said)."""
    clusters = {}
    for e in sorted(entries, key=lambda e: str(e.get("id")), reverse=True):
        clusters.setdefault(str(e.get("system_identifier") or "unknown"), []).append(e)
    where = f" in {repository}" if repository else ""
    if not clusters:
        return [f"no backups{where}"]
    lines = [f"{len(entries)} backup(s) of {len(clusters)} cluster(s){where}"]
    for cluster in sorted(clusters, key=lambda c: (c == "unknown", c)):
        mine = clusters[cluster]
        lines += ["", _cluster_heading(cluster, mine, None if latest is None else latest.get(cluster, ""))]
        lines += columns(LIST_HEAD, [list_row(e, now) for e in mine])
        lines += _notes(mine)
    return lines
