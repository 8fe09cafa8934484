"""`molecule test` of the scenario molecule/default: a fleet of loopback SSH hosts
(PostgreSQL 17 primary and streaming standby, PostgreSQL 13 primary, a repository
host) backed up by the collection's playbooks, checked by pytest-testinfra."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from harness.ansible import REPO, VENV_BIN, collections_workspace
from harness.fleet import Fleet

pytestmark = [pytest.mark.slow, pytest.mark.ssh]

BUDGET = 600  # seconds; the scenario takes about a minute on an idle machine


def test_molecule_default_scenario(tmp_path):
    env = dict(os.environ)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=collections_workspace(),
        # Its own working directory: runs from other checkouts or at the same time never meet.
        MOLECULE_EPHEMERAL_DIRECTORY=str(tmp_path / "molecule"),
        PATH=VENV_BIN + os.pathsep + env.get("PATH", ""),  # molecule looks up ansible-* on PATH
        VIRTUAL_ENV=os.path.dirname(VENV_BIN),
        NO_COLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [os.path.join(VENV_BIN, "molecule"), "test", "--scenario-name", "default"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=BUDGET,
        )
    finally:
        # molecule destroys on failure too; this covers a run killed by the timeout.
        if (tmp_path / "molecule" / "fleet" / "fleet.json").exists():
            Fleet(str(tmp_path / "molecule" / "fleet")).destroy()
    elapsed = time.monotonic() - t0
    log = tmp_path / "molecule.log"
    log.write_text(proc.stdout)
    tail = proc.stdout[-12000:]
    assert proc.returncode == 0, f"molecule test failed (rc={proc.returncode}, {elapsed:.0f} s, log {log}):\n{tail}"
    # verify really ran its tests (a verifier that finds none is skipped, not failed)
    assert " passed" in proc.stdout and "Verifier completed successfully" in proc.stdout, proc.stdout[-4000:]
