"""A restored server, without PostgreSQL: finding binaries, ports and sockets, a running postmaster,
stopping one, and what the server log says about a recovery."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
server = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._restore_server")
files = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._restore_files")
RestoreError = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._restore_plan").RestoreError


# -- a running server


def test_stale_postmaster_pid_is_not_a_running_server(tmp_path):
    (tmp_path / "postmaster.pid").write_text("999999999\n")
    assert server.running_postmaster(str(tmp_path)) is None
    (tmp_path / "postmaster.pid").write_text(f"{os.getpid()}\n")  # alive, but not running in this directory
    assert server.running_postmaster(str(tmp_path)) is None


def test_data_major_and_stopping_a_postmaster(tmp_path):
    assert server.data_major(str(tmp_path)) is None
    (tmp_path / "PG_VERSION").write_text("16\n")
    assert server.data_major(str(tmp_path)) == 16
    # SIGINT's default action: a run started in the background by a non-interactive shell inherits it ignored.
    proc = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    reaper = threading.Thread(target=proc.wait)  # a postmaster is not our child: it leaves no zombie behind
    reaper.start()
    try:
        assert server.stop_postmaster(proc.pid, 5) == "fast"  # SIGINT ends it, as it ends a postmaster's fast shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
        reaper.join()


# -- binaries


def fake_bin(path, version: str):
    path.mkdir(parents=True)
    for name in ("pg_ctl", "postgres", "pg_amcheck"):
        f = path / name
        f.write_text(f"#!/bin/sh\necho '{name} (PostgreSQL) {version}'\n")
        f.chmod(0o755)
    return str(path)


def test_bin_dir_is_found_by_major_version(tmp_path):
    d15 = fake_bin(tmp_path / "15" / "bin", "15.20")
    d17 = fake_bin(tmp_path / "17" / "bin", "17.4 (Debian)")
    candidates = (str(tmp_path / "missing" / "{major}"), str(tmp_path / "{major}" / "bin"))
    assert server.find_bin_dir(15, None, candidates) == d15
    assert server.find_bin_dir(17, None, candidates) == d17
    with pytest.raises(RestoreError, match="no PostgreSQL 16 server binaries found"):
        server.find_bin_dir(16, None, candidates)
    with pytest.raises(RestoreError, match=r"cannot run this PostgreSQL 17 backup: .*PostgreSQL 15"):
        server.find_bin_dir(17, d15)
    assert server.find_tool("pg_amcheck", 17, d17) == os.path.join(d17, "pg_amcheck")


# -- ports


def test_port_in_use_and_free_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "in use on 127.0.0.1" in server.port_in_use(port, str(tmp_path), ["127.0.0.1"])
        assert server.port_in_use(port, str(tmp_path), []) is None  # Unix socket only: the TCP port does not matter
        with socket.socket(socket.AF_UNIX) as u:
            u.bind(str(tmp_path / f".s.PGSQL.{port}"))
            u.listen()
            assert "already listens" in server.port_in_use(port, str(tmp_path), [])
    free = server.pick_free_port(str(tmp_path), ["127.0.0.1"], avoid=(5432,))
    assert free >= 1024 and server.port_in_use(free, str(tmp_path), ["127.0.0.1"]) is None
    assert server.listen_hosts("") == [] and server.listen_hosts("localhost, 127.0.0.2") == ["127.0.0.1", "127.0.0.2"]


# -- the server log

LOG_NOT_REACHED = """\
2026-11-29 11:03:21.111 UTC [1421] LOG:  consistent recovery state reached at 0/2000100
2026-11-29 11:03:21.117 UTC [1421] LOG:  redo done at 0/3000090 system usage: CPU: user: 0.00 s
2026-11-29 11:03:21.117 UTC [1421] LOG:  last completed transaction was at log time 2026-11-29 11:03:19.482397+00
2026-11-29 11:03:21.117 UTC [1421] FATAL:  recovery ended before configured recovery target was reached
2026-11-29 11:03:21.121 UTC [1417] LOG:  startup process (PID 1421) exited with exit code 1
"""
LOG_REACHED = """\
2026-11-29 11:03:30.102 UTC [1780] LOG:  consistent recovery state reached at 0/2000100
2026-11-29 11:03:30.102 UTC [1780] LOG:  recovery stopping at restore point "before_b", time 2026-11-29 11:03:29.5+00
2026-11-29 11:03:30.110 UTC [1780] LOG:  selected new timeline ID: 2
2026-11-29 11:03:30.104 UTC [1777] LOG:  shutdown at recovery target
"""


def test_server_log_facts():
    assert server.fatal_lines(LOG_NOT_REACHED) == ["FATAL: recovery ended before configured recovery target was reached"]
    facts = server.recovery_facts(LOG_NOT_REACHED)
    assert facts["redo_done"] == "0/3000090" and facts["consistent"] == "0/2000100"
    assert "recovery_stop" not in facts
    facts = server.recovery_facts(LOG_REACHED)
    assert facts["recovery_stop"].startswith('recovery stopping at restore point "before_b"')
    assert facts["new_timeline"] == "2" and facts["shutdown_at_target"] == "shutdown at recovery target"
    assert server.fatal_lines(LOG_REACHED) == []


def test_server_log_reads_only_what_this_start_wrote(tmp_path):
    path = tmp_path / "server.log"
    path.write_text("LOG:  redo done at 0/1000000\n")
    log = server.ServerLog(str(tmp_path), str(path))
    with open(path, "a") as f:
        f.write("FATAL:  recovery ended before configured recovery target was reached\n")
    assert server.fatal_lines(log.text()) == ["FATAL: recovery ended before configured recovery target was reached"]
    assert "redo_done" not in server.recovery_facts(log.text())


def test_expected_end_and_server_address(tmp_path):
    (tmp_path / "postgresql.conf").write_text("port = 5432\nunix_socket_directories = '/a, /b'\n")
    (tmp_path / "postgresql.auto.conf").write_text(
        "port = 6000\nrecovery_target_lsn = '0/3000060'\nrecovery_target_action = 'shutdown'\n"
    )
    conf = files.read_conf(str(tmp_path))
    assert server.expected_end(conf) == ("lsn", "shutdown")
    assert server.expected_end({}) == ("latest", "pause")
    assert server.server_address(conf) == (6000, "/a")
    assert server.server_address(conf, 7000, "/c") == (7000, "/c")
