"""The molecule fleet helper (tests/harness/fleet.py): what it tells molecule and
the playbooks, and that destroy cleans up whatever a create left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from harness import fleet
from harness.fleet import FLEET, REPO_USER, Fleet, addresses, host_vars, instance_config, ssh_options, sshd_config


def test_addresses_are_consecutive_loopback_only():
    assert addresses("127.0.0.61", 4) == ["127.0.0.61", "127.0.0.62", "127.0.0.63", "127.0.0.64"]
    for bad in ("10.0.0.5", "127.0.1.5", "127.0.0.x", "localhost", "127.0.0.1", "127.0.0.253"):
        with pytest.raises(ValueError):
            addresses(bad, 4)


def test_fleet_has_the_hosts_the_scenario_names():
    byname = {h.name: h for h in FLEET}
    assert byname["pg17-primary"].major == 17 and not byname["pg17-primary"].upstream
    assert byname["pg17-standby"].major == 17 and byname["pg17-standby"].upstream == "pg17-primary"
    assert byname["pg13-primary"].major == 13
    assert byname["repository"].major is None
    assert byname["pg13-primary"].repository_on == "repository"
    names = [h.name for h in FLEET]
    assert names.index("pg17-primary") < names.index("pg17-standby"), "a standby starts after its primary"
    assert names.index("repository") < names.index("pg13-primary"), "a repository host starts before its users"


def test_sshd_config_is_key_only_for_the_admin_user():
    text = sshd_config("127.0.0.61", 2222, "/tmp/x/ssh", "/tmp/x/keys")
    lines = set(text.splitlines())
    assert {
        "ListenAddress 127.0.0.61:2222",
        "PasswordAuthentication no",
        "AllowUsers pgopsadm",
        "PidFile /tmp/x/ssh/sshd.pid",
    } <= lines
    assert "AuthorizedKeysFile /tmp/x/keys/authorized_keys" in lines
    assert not any(line.startswith("Match") for line in lines)


def test_sshd_config_of_a_repository_host_takes_the_postgres_key_for_the_repository_user_only():
    text = sshd_config("127.0.0.61", 2222, "/tmp/x/ssh", "/tmp/x/keys", repository=True)
    assert f"AllowUsers pgopsadm {REPO_USER}" in text.splitlines()
    main, match = text.split(f"Match User {REPO_USER}\n")
    assert "repository_authorized_keys" not in main, "the postgres key must not open the admin user's door"
    assert match.strip() == "AuthorizedKeysFile /tmp/x/keys/authorized_keys /tmp/x/keys/repository_authorized_keys"


def test_ssh_options_check_the_host_key_strictly():
    opts = ssh_options({"pg_key": "/k/id", "pg_known_hosts": "/k/known_hosts"})
    assert opts[:2] == ["-i", "/k/id"]
    assert "StrictHostKeyChecking=yes" in opts and "UserKnownHostsFile=/k/known_hosts" in opts and "BatchMode=yes" in opts


STATE = {
    "base": "/tmp/pgops-fleet-test",
    "client_key": "/tmp/pgops-fleet-test/keys/client_ed25519",
    "hosts": [
        {
            "name": "pg17-standby",
            "groups": ["postgresql"],
            "address": "127.0.0.62",
            "ssh_port": 40001,
            "repository": "/tmp/pgops-fleet-test/pg17-standby/backup/repo",
            "scratch": "/tmp/pgops-fleet-test/pg17-standby/scratch",
            "upstream": "pg17-primary",
            "major": 17,
            "pg": {"major": 17, "port": 5433, "sock": "/s", "data": "/d", "archive": "/a", "bin": "/b"},
        },
        {
            "name": "repository",
            "groups": ["backup_repository"],
            "address": "127.0.0.64",
            "ssh_port": 40002,
            "repository": "/tmp/pgops-fleet-test/repository/backup/repo",
            "scratch": "/tmp/pgops-fleet-test/repository/scratch",
            "upstream": None,
            "major": None,
        },
    ],
}


def test_instance_config_reaches_each_host_as_the_admin_user_with_sudo():
    config = instance_config(STATE)
    assert config[0] == {
        "instance": "pg17-standby",
        "address": "127.0.0.62",
        "port": 40001,
        "user": "pgopsadm",
        "identity_file": "/tmp/pgops-fleet-test/keys/client_ed25519",
        "become_method": "sudo",
    }
    assert [c["instance"] for c in config] == ["pg17-standby", "repository"]


def test_host_vars_describe_the_cluster():
    v = host_vars(STATE["hosts"][0])
    assert v["fleet_pg_port"] == 5433 and v["fleet_pg_socket_dir"] == "/s" and v["fleet_pg_upstream"] == "pg17-primary"
    assert v["fleet_repository"].endswith("/pg17-standby/backup/repo")
    assert "fleet_repository_host" not in v
    assert "fleet_pg_port" not in host_vars(STATE["hosts"][1])


def test_host_vars_of_a_remote_repository_and_of_the_host_that_holds_it():
    db = dict(STATE["hosts"][0], name="pg13-primary", repository_host="repository", repository="/r/backup/pg13-primary",
              repository_ssh_port=40002, repository_ssh_options=["-i", "/k/id"])  # fmt: skip
    v = host_vars(db)
    assert v["fleet_repository_host"] == "repository" and v["fleet_repository_user"] == REPO_USER
    assert v["fleet_repository"] == "/r/backup/pg13-primary" and v["fleet_repository_ssh_port"] == 40002
    held = {"fleet_repository": "/r/backup/pg13-primary", "fleet_pg_archive": "/r/wal/pg13-primary", "fleet_pg_bin": "/b13"}
    repo = dict(STATE["hosts"][1], holds=[held])
    v = host_vars(repo)
    assert v["fleet_repository"] == "/r/backup/pg13-primary" and v["fleet_pg_archive"] == "/r/wal/pg13-primary"
    assert v["fleet_repository_user"] == REPO_USER


def test_destroy_without_a_fleet_does_nothing(tmp_path):
    assert Fleet(str(tmp_path)).destroy() == []


def test_destroy_stops_recorded_processes_and_removes_the_base(tmp_path, monkeypatch):
    base = tmp_path / "pgops-fleet-abc"
    (base / "h1").mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    state = {"base": str(base), "hosts": [{"name": "h1", "address": "127.0.0.61", "ssh_port": None, "sshd_pid": sleeper.pid}]}
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "fleet.json").write_text(json.dumps(state))
    (state_dir / "host_vars").mkdir()
    # Popen's child stays a zombie until waited for: count a zombie as stopped, as the helper does.
    assert Fleet(str(state_dir)).destroy() == []
    assert sleeper.wait(timeout=5) != 0
    assert not base.exists() and not (state_dir / "fleet.json").exists() and not (state_dir / "host_vars").exists()


def test_destroy_leaves_foreign_directories_alone(tmp_path):
    """Only a base made by create (pgops-fleet-*) is removed, whatever fleet.json says."""
    other = tmp_path / "precious"
    other.mkdir()
    (tmp_path / "fleet.json").write_text(json.dumps({"base": str(other), "hosts": []}))
    Fleet(str(tmp_path)).destroy()
    assert other.exists()


def test_cli_refuses_a_second_fleet_without_touching_the_first(tmp_path):
    recorded = {"base": "/nonexistent/pgops-fleet-x", "hosts": [{"name": "h1"}]}
    (tmp_path / "fleet.json").write_text(json.dumps(recorded))
    r = _cli(tmp_path, "create")
    assert r.returncode == 1 and "already recorded" in r.stderr
    assert json.loads((tmp_path / "fleet.json").read_text()) == recorded


def _cli(state_dir, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fleet.__file__)))
    cmd = [sys.executable, "-m", "harness.fleet", *args, "--state", str(state_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def test_cli_refuses_non_loopback_addresses(tmp_path):
    r = _cli(tmp_path, "create", "--first-address", "10.1.2.3")
    assert r.returncode != 0 and "127.0.0.x" in r.stderr
    assert not (tmp_path / "fleet.json").exists()
