"""Fixtures shared by the module_utils unit tests: backups in a repository and
session keepers' state files, written by hand into tmp_path."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
_sessions = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._sessions")


@pytest.fixture
def add_backup():
    """add_backup(repo, bid, status="complete", raw=None, **fields) -> the backup's directory.

    status None writes no backup.json (not a backup); raw writes that text as backup.json."""

    def add(repo, bid: str, status: str | None = "complete", raw: str | None = None, **fields):
        d = os.path.join(str(repo), bid)
        os.makedirs(d)
        if raw is not None:
            with open(os.path.join(d, "backup.json"), "w") as f:
                f.write(raw)
        elif status is not None:
            with open(os.path.join(d, "backup.json"), "w") as f:
                json.dump({"schema": 1, "id": bid, "status": status, "method": "tar", **fields}, f)
        with open(os.path.join(d, "base.tar"), "wb") as f:
            f.write(b"\0" * 10000)
        return d

    return add


@pytest.fixture
def live_process():
    """(pid, starttime) of this test process: a keeper that is alive."""
    return os.getpid(), _sessions.proc_stat(os.getpid())[1]


@pytest.fixture
def dead_process():
    """(pid, starttime) of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    starttime = _sessions.proc_stat(child.pid)[1]
    child.wait()
    assert _sessions.proc_stat(child.pid) is None
    return child.pid, starttime


@pytest.fixture
def write_session():
    """write_session(runtime_dir, sid, **state) -> the session directory, with its state.json."""

    def write(runtime_dir, sid: str, **state):
        sdir = os.path.join(str(runtime_dir), sid)
        os.makedirs(sdir, exist_ok=True)
        _sessions.write_state(sdir, {"session_id": sid, **state})
        return sdir

    return write
