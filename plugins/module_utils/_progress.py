# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Progress of a backup's long steps: the copy's bytes done of expected, its rate and the time
left (a record the copy writes into its session's directory every second, which
pg_backup_progress, pg_backup_session_info and the metrics file read), and the lines a run
prints while the start waits for its checkpoint or the copy runs. Pure, but for the record's
file; no server, no Ansible."""

from __future__ import annotations

import datetime
import json
import os
import time

from ._units import human_bytes, human_seconds

PROGRESS_FILE = "progress.json"
# The rate is measured over this many seconds: it follows a copy that slows down (a compressor
# that meets incompressible data, a busy disk) without jumping at every sample.
RATE_WINDOW = 10.0


def utc_iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(timespec="milliseconds")


class Meter:
    """Bytes done over time, sampled by the caller: the rate over the last RATE_WINDOW seconds
    (over the whole copy while it is younger than that) and the time left at that rate."""

    def __init__(self, expected: int, started: float, wall: float | None = None):
        self.expected = max(0, int(expected))
        self.started = started
        self.started_wall = time.time() if wall is None else wall
        self.samples = [(started, 0)]

    def update(self, done: int, now: float, expected: int | None = None, phase: str = "copying") -> dict:
        if expected is not None:
            self.expected = max(0, int(expected))
        done = max(0, int(done))
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.pop(0)
        return record(done, self.expected, rate_of(self.samples), now - self.started, self.started_wall, phase)


def rate_of(samples: list) -> float | None:
    """Bytes per second between the first and the last sample; None before a second has passed."""
    (t0, b0), (t1, b1) = samples[0], samples[-1]
    if t1 - t0 < 1.0:
        return None
    return max(0.0, (b1 - b0) / (t1 - t0))


def eta(done: int, expected: int, rate: float | None) -> float | None:
    """Seconds left at this rate; 0 when done, None when the rate is unknown or nothing moves."""
    if done >= expected:
        return 0.0
    if not rate:
        return None
    return (expected - done) / rate


def percent(done: int, expected: int) -> float:
    if expected <= 0:
        return 100.0 if done else 0.0
    return round(min(100.0, 100.0 * done / expected), 1)


def record(done: int, expected: int, rate: float | None, seconds: float, started_wall: float, phase: str) -> dict:
    """What the copy writes: files grow while they are copied, so expected follows done past it."""
    expected = max(expected, done)
    left = eta(done, expected, rate)
    return {
        "step": "copy",
        "phase": phase,
        "bytes_done": done,
        "bytes_expected": expected,
        "percent": percent(done, expected),
        "rate_bytes_per_second": None if rate is None else round(rate),
        "eta_seconds": None if left is None else round(left, 1),
        "seconds": round(seconds, 1),
        "started_at": utc_iso(started_wall),
        "updated_at": utc_iso(time.time()),
        "pid": os.getpid(),
    }


def copy_line(rec: dict) -> str:
    """copy: 812.4 MiB of 1.6 GiB (51%), 402.1 MiB/s, about 2.0s left"""
    done, expected = rec.get("bytes_done") or 0, rec.get("bytes_expected") or 0
    text = f"copy: {human_bytes(done)} of {human_bytes(expected)} ({_pct(rec.get('percent'))})"
    phase = rec.get("phase") or "copying"
    if phase != "copying":
        return f"{text}, {phase}"
    rate = rec.get("rate_bytes_per_second")
    if rate is None:
        return f"{text}, {human_seconds(rec.get('seconds'))} so far"
    left = rec.get("eta_seconds")
    when = "" if left is None else f", about {human_seconds(left)} left"
    return f"{text}, {human_bytes(rate)}/s{when}"


def _pct(value) -> str:
    try:
        return f"{float(value):.0f}%"
    except (TypeError, ValueError):
        return "?%"


def start_line(info: dict, hint: str | None = None) -> str:
    """What a start that has not returned waits for (info: a session's state with
    start_waiting_seconds, as _keeper.describe gives it)."""
    waited = human_seconds(info.get("start_waiting_seconds"))
    stage = info.get("start_stage")
    if stage == "connect":
        return f"start: connecting to the server ({waited} so far)"
    if stage == "wal summaries":
        return f"start: the checkpoint is done; reading the WAL summaries for the incremental backup ({waited} so far)"
    if info.get("fast"):
        return f"start: waiting for the checkpoint (fast, requested {waited} ago)"
    tail = f"; {hint or 'fast=true'} starts at once" if hint != "" else ""
    return f"start: waiting for the checkpoint (spread, requested {waited} ago{tail})"


def write_progress(sdir: str, rec: dict, name: str = PROGRESS_FILE) -> None:
    """Replace a record (the progress; a handed-over copy's result), 0600. Not flushed to disk: after a
    crash it is worth nothing anyway."""
    path = os.path.join(sdir, name)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(rec, sort_keys=True).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_progress(sdir: str, name: str = PROGRESS_FILE) -> dict | None:
    try:
        with open(os.path.join(sdir, name), encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None
