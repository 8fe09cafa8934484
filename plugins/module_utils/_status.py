# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The recoverability report: one cluster's catalog entries, WAL coverage and archive
guard judged against a policy (hours; 0 is no rule). Pure: data in, a row and the
rules it breaks out."""

from __future__ import annotations

import datetime

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
    newest = complete[0] if complete else None
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
    if policy.get("min_window") and row["window_hours"] < policy["min_window"]:
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
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head] + body]


def _text(value) -> str:
    return "-" if value is None else f"{value:g}"
