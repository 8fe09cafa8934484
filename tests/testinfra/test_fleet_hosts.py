"""Every host of the molecule fleet was reached the way users reach theirs: over
SSH as an unprivileged user that becomes others with sudo."""

from __future__ import annotations

import pytest

testinfra_hosts = ["ansible://all"]


def test_reached_as_the_unprivileged_admin_user(host):
    assert host.user().name == "pgopsadm"
    assert host.user().uid != 0
    with host.sudo():
        assert host.check_output("id -u") == "0"
    with host.sudo("postgres"):
        assert host.check_output("id -un") == "postgres"


def test_ssh_logins_were_key_logins_of_the_admin_user(host, me):
    with host.sudo():
        log = host.file(me["sshd_log"]).content_string
    assert "Accepted publickey for pgopsadm" in log, log[-2000:]
    assert "Accepted publickey for root" not in log and "Accepted password" not in log


def test_sshd_listens_on_the_host_address(host, me):
    assert host.socket(f"tcp://{me['address']}:{me['ssh_port']}").is_listening


def test_repository_host_is_reached_by_the_backup_user(host, me, fleet):
    """The database hosts' postgres user wrote the remote backups and WAL as the repository's
    unprivileged owner, with its own key (strict host key checking), never as the admin user."""
    if me.get("holds") is None:
        pytest.skip("not a repository host")
    owner = next(h["repository_owner"] for h in fleet.values() if h.get("repository_host") == me["name"])
    with host.sudo():
        log = host.file(me["sshd_log"]).content_string
    assert f"Accepted publickey for {owner}" in log, log[-2000:]
    assert owner != "pgopsadm" and not host.user(owner).gid == 0
    assert "sudo" not in host.user(owner).groups
