"""Fixtures for the molecule scenario's testinfra tests (molecule/default).

Molecule's testinfra verifier runs these with --connection=ansible and its
inventory; what create.yml started is described in
$MOLECULE_EPHEMERAL_DIRECTORY/fleet/fleet.json. Outside molecule they skip.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import testinfra

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


@dataclass
class Store:
    """Where a database host's backups are: a testinfra host, the repository path there, its owner,
    the WAL archive path there, and the scratch directory of a drill run there."""

    host: object
    name: str
    repository: str
    owner: str
    archive: str
    scratch: str

    def run(self, command: str, *args) -> str:
        """A command on the store host as the repository's owner; its output (fails on a non-zero exit)."""
        with self.host.sudo(self.owner):
            return self.host.check_output(command, *args)

    def read(self, path: str) -> str:
        with self.host.sudo(self.owner):
            return self.host.file(path).content_string


@pytest.fixture
def store(request, host, me, fleet) -> Store:
    """The repository of this host's backups: on the host itself, or on its repository host."""
    name = me.get("repository_host")
    if not name:
        return Store(host, me["name"], me["repository"], "postgres", me["pg"]["archive"], me["scratch"])
    inventory = request.config.option.ansible_inventory
    other = testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")
    return Store(other, name, me["repository"], me["repository_owner"], me["archive"], fleet[name]["scratch"])


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
