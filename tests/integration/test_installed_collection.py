"""The built collection installs, and its playbooks run from the installed copy."""

from __future__ import annotations

import glob
import json
import os
import subprocess

import yaml
from harness.ansible import REPO, VENV_BIN
from harness.layout import restore_backup
from harness.pg import make_pg_dir


def test_built_tarball_installs_and_its_backup_playbook_runs(make_cluster, playbook, tmp_path):
    version = yaml.safe_load(open(os.path.join(REPO, "galaxy.yml")))["version"]
    galaxy = os.path.join(VENV_BIN, "ansible-galaxy")
    subprocess.run(
        [galaxy, "collection", "build", "--output-path", str(tmp_path / "dist"), REPO], check=True, capture_output=True
    )
    tarball = tmp_path / "dist" / f"pgops-online_backup-{version}.tar.gz"
    installed = tmp_path / "installed"
    subprocess.run(
        [galaxy, "collection", "install", "--no-deps", "-p", str(installed), str(tarball)], check=True, capture_output=True
    )
    root = installed / "ansible_collections" / "pgops" / "online_backup"
    assert (root / "MANIFEST.json").exists() and (root / "plugins" / "modules" / "pg_backup_session.py").exists()
    assert not (root / "tests" / "integration").exists(), "the developer test suite is not shipped"
    # The installed copy must be readable by the postgres user that runs the modules.
    subprocess.run(["chmod", "-R", "a+rX", str(tmp_path)], check=True)

    c = make_cluster(17)
    c.sql("CREATE TABLE t AS SELECT generate_series(1, 100) AS id")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    run = playbook(
        "pgops.online_backup.backup",
        extra_vars={
            "pg_backup_repository": repo,
            "pg_backup_login_unix_socket": c.sock,
            "pg_backup_port": c.port,
            "pg_backup_fast_checkpoint": True,
            "pg_backup_compression": "lz4",
        },
        env={"ANSIBLE_COLLECTIONS_PATH": str(installed)},
        args=["-vvv"],
    )
    assert run.rc == 0, run
    # Ansible names where it loaded the collection from: the installed copy, not the checkout.
    assert f"task path: {root}/roles/pg_backup/tasks/" in run.stdout, run.stdout[:3000]
    assert f"task path: {REPO}/" not in run.stdout
    (path,) = glob.glob(os.path.join(repo, "2*", "backup.json"))
    info = json.load(open(path))
    assert info["status"] == "complete" and info["manifest"]["manifest_version"] == 2  # v2 on 17+
    restored = restore_backup(os.path.dirname(path), c.archive, 17)
    try:
        assert restored.sql("SELECT count(*) FROM t")[0][0] == 100
    finally:
        restored.destroy()
