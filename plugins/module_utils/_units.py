# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Sizes and durations for people: 1.2 GiB, 2m05s. Used by the progress lines, the
sessions' waits and the report's tables; depends on nothing."""

from __future__ import annotations


def _amount(value) -> float | None:
    """A recorded number of bytes or seconds, or None when it is missing, not a number or negative."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


def human_bytes(value) -> str:
    """1.2 GiB (binary units, one decimal); - when unknown."""
    n = _amount(value)
    if n is None:
        return "-"
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            break
    return f"{n:.1f} {unit}"


def human_seconds(value) -> str:
    """2m05s, 1h02m, 3d04h; 4.2s under ten seconds; - when unknown."""
    s = _amount(value)
    if s is None:
        return "-"
    if s < 10:
        return f"{s:.1f}s"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
