"""Fixtures for the molecule scenario's testinfra tests (molecule/default).

Molecule's testinfra verifier runs these with --connection=ansible and its
inventory; what create.yml started is described in
$MOLECULE_EPHEMERAL_DIRECTORY/fleet/fleet.json. Outside molecule they skip.
"""

from __future__ import annotations

import json
import os

import pytest

PSQL = "/var/cache/pgops-online-backup/pg17-tools/bin/psql"


def _fleet_file() -> str | None:
    ephemeral = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY")
    return os.path.join(ephemeral, "fleet", "fleet.json") if ephemeral else None


def pytest_collection_modifyitems(config, items):
    path = _fleet_file()
    if path and os.path.exists(path):
        return
    skip = pytest.mark.skip(reason="runs under molecule's testinfra verifier only (molecule/default)")
    for item in items:
        if "testinfra" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fleet() -> dict:
    """Host name -> what create.yml started there (address, ports, paths)."""
    with open(_fleet_file()) as f:
        return {h["name"]: h for h in json.load(f)["hosts"]}


@pytest.fixture
def me(host, fleet) -> dict:
    """This host's entry in the fleet."""
    return fleet[host.backend.host]


@pytest.fixture
def sql(host, me):
    """sql(query, via=None) -> rows (lists of strings), run on the host as postgres with psql:
    on this host's cluster over its Unix socket, or on another fleet host's cluster over TCP."""

    def run(query: str, via: dict | None = None) -> list:
        target = (via["address"], via["pg"]["port"]) if via else (me["pg"]["sock"], me["pg"]["port"])
        with host.sudo("postgres"):
            out = host.check_output(
                "%s -X -A -t -F '|' -h %s -p %s -U postgres -d postgres -c %s", PSQL, target[0], str(target[1]), query
            )
        return [line.split("|") for line in out.splitlines() if line]

    return run
