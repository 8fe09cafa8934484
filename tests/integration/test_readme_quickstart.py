"""The README, followed as a new user would: the collection built and installed with the Install
section's command, then every command of its Quick start run exactly as written (the bash blocks, in
order, each one verbatim through bash) against a throwaway PostgreSQL 17 cluster standing in for
db1.example.com. The test writes only the inventory, as a user does: the README's own group variables,
plus where this machine's cluster listens and where pgops-wal goes (outside /usr/local).

The README's paths are real paths on this machine, so the test owns them for its run: /backup (the
repository /backup/pg) and /var/lib/postgresql/17 (the restore's parent), each marked as the test's
own; it refuses to run where they exist and are not its own (a real installation), and removes them
afterwards, stopping the restored server on port 5433 first."""

from __future__ import annotations

import datetime
import json
import os
import pwd
import re
import shutil
import subprocess

import pytest
import yaml
from harness.ansible import NODE_PYTHON, REPO, VENV_BIN
from harness.pg import Cluster, make_pg_dir
from harness.workload import Writer

from integration.test_restore import query, stop_server

README = os.path.join(REPO, "README.md")
MARK = ".pgops-readme-quickstart"  # in each path the test owns: a leftover of an interrupted run, not a user's
OWNED = ("/backup", "/var/lib/postgresql/17")
RESTORED = "/var/lib/postgresql/17/restored"
RESTORED_SOCKETS = "/var/run/postgresql"  # the restore role's default unix_socket_directories


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def blocks(text: str, lang: str) -> list:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.S | re.M)


def claim(path: str) -> None:
    """Takes path for the test: absent, or a leftover of an interrupted run of it (removed)."""
    if os.path.exists(path):
        if not os.path.exists(os.path.join(path, MARK)):
            pytest.fail(f"{path} exists and is not this test's: it runs the README's commands, which use {path}; move it away")
        if os.path.isdir(os.path.join(path, "restored")):
            stop_server(os.path.join(path, "restored"))
        shutil.rmtree(path)


@pytest.fixture
def owned_paths():
    for path in OWNED:
        claim(path)
    yield
    stop_server(RESTORED)
    for path in OWNED:
        shutil.rmtree(path, ignore_errors=True)


def test_the_readme_quick_start_commands_run_as_written(owned_paths, tmp_path):
    with open(README) as f:
        readme = f.read()
    install = blocks(section(readme, "Install"), "bash")[0].splitlines()
    quick = section(readme, "Quick start")
    (inventory_yaml,) = blocks(quick, "yaml")
    commands = blocks(quick, "bash")
    assert len(commands) >= 8, commands  # the file, archiving, pre-flight, backup, list, info, restore, drill, status

    # A PostgreSQL 17 as a DBA has it: archiving on (the role takes archive_command over), a parent for restores.
    live = Cluster(17, name="readme")
    live.init().start()
    pg = pwd.getpwnam("postgres")
    os.makedirs("/var/lib/postgresql/17")
    for path in OWNED[1:]:
        open(os.path.join(path, MARK), "w").close()
        os.chown(path, pg.pw_uid, pg.pw_gid)
    program = make_pg_dir("pgops-readme-prog-")
    os.chown(program, 0, 0)
    collections = tmp_path / "collections"
    try:
        # Install: the first line of the README's install block, in a copy of the checkout (the second, from
        # GitHub, cannot run here: this machine reaches no git host).
        assert install[0].startswith("ansible-galaxy collection build && ansible-galaxy collection install"), install
        checkout = tmp_path / "checkout"
        shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(".git", ".venv", "output", "*.tar.gz", "__pycache__"))
        env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ["PATH"], ANSIBLE_COLLECTIONS_PATH=str(collections),
                   ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_HOST_KEY_CHECKING="False",
                   ANSIBLE_LOCAL_TEMP=str(tmp_path / "local-tmp"))  # fmt: skip
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", install[0]], cwd=checkout, env=env, capture_output=True,
                             text=True)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert os.path.exists(collections / "ansible_collections" / "pgops" / "online_backup" / "MANIFEST.json")

        # The inventory: the README's group and its variables, db1.example.com being this machine's cluster.
        readme_inventory = yaml.safe_load(inventory_yaml)
        group = readme_inventory["postgresql"]
        assert "db1.example.com" in group["hosts"], group
        hostvars = {
            "ansible_connection": "local",
            "ansible_python_interpreter": NODE_PYTHON,
            "pg_backup_login_unix_socket": live.sock,
            "pg_backup_port": live.port,
            "pg_archiving_login_unix_socket": live.sock,
            "pg_archiving_port": live.port,
            "pg_archiving_install_dir": os.path.join(program, "lib"),
            "pg_archiving_program": os.path.join(program, "pgops-wal"),
            "pg_restore_wal_program": os.path.join(program, "pgops-wal"),
        }
        inventory = {"postgresql": {"hosts": {"db1.example.com": hostvars}, "vars": group["vars"]}}
        with open(tmp_path / "inventory.yml", "w") as f:
            yaml.safe_dump(inventory, f)

        def step(command: str) -> str:
            run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=600)  # fmt: skip
            assert run.returncode == 0, f"$ {command}\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
            return run.stdout

        writer = Writer(live)
        for command in commands:
            if "pgops.online_backup.backup" in command:
                writer.start()
                try:
                    out = step(command)
                finally:
                    writer.stop()
            else:
                out = step(command)
            if "ansible.builtin.file" in command:  # 1: the repository, as the roles want it
                st = os.stat("/backup/pg")
                assert (st.st_uid, oct(st.st_mode & 0o777)) == (pg.pw_uid, "0o700")
                open(os.path.join("/backup", MARK), "w").close()
            elif "pgops.online_backup.archiving" in command:
                assert live.sql("SHOW archive_command")[0][0].startswith(hostvars["pg_archiving_program"] + " push"), out
            elif "pgops.online_backup.backup" in command:
                (bid,) = [n for n in os.listdir("/backup/pg") if n[0].isdigit()]
                with open(os.path.join("/backup/pg", bid, "backup.json")) as f:
                    info = json.load(f)
                assert info["status"] == "complete" and f"backup {bid} complete in /backup/pg/{bid}" in out, out
                started = datetime.datetime.fromisoformat(info["started_at"])
                # What a backup promises: every commit that returned before pg_backup_stop() was called.
                stop_requested = datetime.datetime.fromisoformat(info["stop_requested_at"])
                before_stop = writer.committed_before(stop_requested)
                during = {n for n, at in writer.committed if started < at < stop_requested}
                assert during, "the writer committed nothing while the backup ran: the test would prove nothing"
            elif "pgops.online_backup.list" in command:  # 5: the table people read
                assert re.search(rf"{bid}\s+full\s+complete\s", out), out
                # The host's session list is the postgres user's: other tests' sessions may run meanwhile.
                # None is this cluster's (its backup ended; its server's socket is named in a session's line).
                assert "backup sessions running on db1.example.com:" in out and live.sock not in out, out
            elif "pg_backup_info" in command:
                assert f'"id": "{bid}"' in out, out
            elif "pgops.online_backup.restore" in command:  # 6: the restored server, with every row of the backup
                assert f"restored backup {bid}" in out, out
                ids = {r[0] for r in query(RESTORED_SOCKETS, 5433, "SELECT id FROM writer_log")}
                assert before_stop <= ids, sorted(before_stop - ids)[:20]
            elif "pgops.online_backup.drill" in command:
                with open(os.path.join("/backup/pg", bid, "backup.json")) as f:
                    assert json.load(f)["drill"]["result"] == "passed"
            elif "pgops.online_backup.status" in command:
                assert bid in out, out
        assert "pgops.online_backup.restore" in "".join(commands) and "pgops.online_backup.drill" in "".join(commands)
    finally:
        stop_server(RESTORED)
        live.destroy()
        shutil.rmtree(program, ignore_errors=True)
