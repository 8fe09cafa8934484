"""Fixtures shared by all tests: real clusters, real ansible-playbook."""

from __future__ import annotations

import os
import signal
import sys

import pytest
from harness import scratch
from harness.ansible import collections_workspace, local_inventory, run_playbook
from harness.pg import Cluster, tagged_processes

# Unit tests import the collection's Python as ansible_collections.pgops.online_backup.
sys.path.insert(0, collections_workspace())

OWNER = f"PGOPS_TEST_OWNER={os.getpid()}".encode()


def _keeper_pids() -> set:
    """Keepers started by this pytest process (other test runs may share the machine).

    run_playbook exports PGOPS_TEST_OWNER; a keeper inherits it unless become
    resets the environment, and those are caught by the server-side check.
    """
    return set(tagged_processes(OWNER.decode(), keepers=True))


@pytest.fixture(autouse=True, scope="session")
def _remove_the_sessions_scratch_dirs():
    """What module and session fixtures made (after their own teardown)."""
    yield
    scratch.remove_since(0)


@pytest.fixture(autouse=True)
def _remove_the_tests_scratch_dirs():
    """Scratch directories the test and its function fixtures made: set up before them (autouse
    comes first in its scope), so torn down after them, once their servers have stopped."""
    position = scratch.mark()
    yield
    scratch.remove_since(position)


@pytest.fixture(autouse=True)
def no_leftover_keepers():
    """Every test must end with no session keeper of its own still running."""
    before = _keeper_pids()
    yield
    left = _keeper_pids() - before
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"session keeper(s) left running: {sorted(left)}"


@pytest.fixture
def make_cluster():
    """Factory: make_cluster(major, start=True, **postgresql_conf) -> Cluster."""
    created = []

    def factory(major: int, start: bool = True, **settings) -> Cluster:
        c = Cluster(major)
        created.append(c)
        c.init(**settings)
        if start:
            c.start()
        return c

    yield factory
    leftovers = {}
    for c in created:
        try:
            left = c.sql(
                "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE 'pgops.online_backup keeper%%'"
            )
            if left:
                leftovers[c.root] = left
        except Exception:  # noqa: BLE001 - a test may have stopped its server
            pass
        c.destroy()
    assert not leftovers, f"backup sessions left open on the server: {leftovers}"


@pytest.fixture
def playbook(tmp_path):
    """playbook(plays_or_path, inventory=None, **kw) -> PlaybookRun, run in tmp_path."""

    def run(plays, inventory: str | None = None, **kw):
        # A test may run playbooks from several threads at once: the next free name is taken by mkdir itself.
        n = len(list(tmp_path.glob("run*")))
        while True:
            workdir = tmp_path / f"run{n}"
            try:
                workdir.mkdir()
                break
            except FileExistsError:
                n += 1
        return run_playbook(plays, inventory or local_inventory(), workdir=str(workdir), **kw)

    return run


@pytest.fixture
def ssh_host():
    """Factory: ssh_host('127.0.0.2') -> a started SshHost; sshd and its control masters stop afterwards."""
    from harness.ssh import SshHost

    hosts: list = []

    def factory(address: str = "127.0.0.2") -> SshHost:
        host = SshHost(address)
        hosts.append(host)
        return host.start()

    yield factory
    for host in hosts:
        host.stop()
