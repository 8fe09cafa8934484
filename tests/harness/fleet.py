"""A fleet of loopback "hosts" for the molecule scenario (molecule/default):
one sshd per 127.0.0.x address, reached as the non-root sudo user pgopsadm,
with PostgreSQL clusters run by the postgres OS user on the hosts that have one,
and a repository host where a database host's backups (and its WAL archive)
go over ssh, owned there by the unprivileged user pgopsrepo.

    python -m harness.fleet create  --state DIR   # prints molecule's instance config (JSON)
    python -m harness.fleet destroy --state DIR   # stops by pid what create started, removes it

The hosts share this machine's filesystem, process table and users, so each one
gets its own address, free ports and directory under one base directory in
/tmp (the postgres user must reach it). DIR/fleet.json records everything that
was started, written after every step, so destroy also cleans up after a
create that failed half-way. DIR/host_vars/<host>.yml carries each host's
paths and ports for the playbooks (converge.yml loads them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import yaml

from harness.pg import PG_USER, TOOLS17, Cluster, as_postgres, chown_pg, free_port, pg_bin, process_gone
from harness.ssh import ADMIN_USER, SSHD, ensure_admin_user

STATE_FILE = "fleet.json"
# Owns the backups on the repository host; the database hosts' postgres user
# logs in as it with a key (no sudo, so a database host cannot become root there).
REPO_USER = "pgopsrepo"
# Where Ansible's ssh connection keeps its masters, as molecule's ansible.cfg
# names them (control_path = %(directory)s/%%h-%%p-%%r).
CONTROL_DIR = os.path.expanduser("~/.ansible/cp")


@dataclass(frozen=True)
class HostSpec:
    name: str
    groups: tuple
    major: int | None = None  # PostgreSQL major, None for a host without a cluster
    upstream: str | None = None  # for a streaming standby: the primary's host name
    repository_on: str | None = None  # the host that holds this cluster's backups and WAL archive (else itself)


# The scenario's fleet, in start order (a repository host and a primary before the hosts that use them).
FLEET = (
    HostSpec("repository", ("backup_repository",)),
    HostSpec("pg17-primary", ("postgresql",), 17),
    HostSpec("pg17-standby", ("postgresql",), 17, upstream="pg17-primary"),
    HostSpec("pg13-primary", ("postgresql", "remote_repository"), 13, repository_on="repository"),
)
SEED_ROWS = 1000


def addresses(first: str, count: int) -> list:
    """Consecutive loopback addresses from first: only ever 127.0.0.x."""
    parts = first.split(".")
    if len(parts) != 4 or parts[:3] != ["127", "0", "0"] or not parts[3].isdigit():
        raise ValueError(f"the fleet lives on 127.0.0.x addresses, not {first!r}")
    start = int(parts[3])
    if start < 2 or start + count - 1 > 254:
        raise ValueError(f"{count} addresses from {first} do not fit in 127.0.0.2-254")
    return [f"127.0.0.{start + i}" for i in range(count)]


def sshd_config(address: str, port: int, host_dir: str, keys: str, repository: bool = False) -> str:
    """repository: also let REPO_USER in, with the database hosts' postgres key (for it alone)."""
    lines = [
        f"ListenAddress {address}:{port}",
        f"PidFile {host_dir}/sshd.pid",
        f"HostKey {keys}/host_ed25519",
        f"AuthorizedKeysFile {keys}/authorized_keys",
        "StrictModes no",  # keys live under /tmp
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",  # pam_loginuid can fail without a real init; sudo has its own PAM stack
        f"AllowUsers {ADMIN_USER} {REPO_USER}" if repository else f"AllowUsers {ADMIN_USER}",
        "Subsystem sftp internal-sftp",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "PrintMotd no",
        "LogLevel VERBOSE",
    ]
    if repository:
        lines += [f"Match User {REPO_USER}", f"    AuthorizedKeysFile {keys}/authorized_keys {keys}/repository_authorized_keys"]
    return "\n".join(lines) + "\n"


def ensure_user(name: str) -> None:
    """An unprivileged login user (idempotent): key logins only, no password, not locked."""
    if _run(["id", "-u", name], check=False).returncode != 0:
        r = _run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=False)
        if r.returncode not in (0, 9):  # 9: created meanwhile
            raise RuntimeError(f"useradd {name} failed: {r.stderr}")
    if _run(["getent", "shadow", name]).stdout.split(":")[1].startswith("!"):
        _run(["usermod", "-p", "*", name])  # sshd without PAM refuses locked accounts


def ssh_options(state: dict) -> list:
    """How the postgres user of a database host reaches the host that holds its repository (port apart)."""
    return ["-i", state["pg_key"], "-o", f"UserKnownHostsFile={state['pg_known_hosts']}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes"]  # fmt: skip


def instance_config(state: dict) -> list:
    """What molecule's default driver needs to reach each host."""
    return [
        {
            "instance": h["name"],
            "address": h["address"],
            "port": h["ssh_port"],
            "user": ADMIN_USER,
            "identity_file": state["client_key"],
            "become_method": "sudo",
        }
        for h in state["hosts"]
    ]


def host_vars(host: dict) -> dict:
    """Facts about one host for the playbooks; the scenario maps them onto role variables."""
    v = {"fleet_address": host["address"], "fleet_groups": host["groups"]}
    if host.get("pg"):
        pg = host["pg"]
        v.update(
            fleet_pg_major=pg["major"],
            fleet_pg_port=pg["port"],
            fleet_pg_socket_dir=pg["sock"],
            fleet_pg_data=pg["data"],
            fleet_pg_archive=pg["archive"],
            fleet_pg_bin=pg["bin"],
            fleet_pg_upstream=host.get("upstream"),
        )
    v["fleet_repository"] = host["repository"]
    v["fleet_scratch"] = host["scratch"]
    if host.get("repository_host"):
        v.update(
            fleet_repository_host=host["repository_host"],
            fleet_repository_user=REPO_USER,
            fleet_repository_ssh_port=host["repository_ssh_port"],
            fleet_repository_ssh_options=host["repository_ssh_options"],
        )
    if host.get("holds"):
        # What a restore drill on this host needs: the repository it holds and that cluster's WAL and binaries.
        v.update(fleet_repository_user=REPO_USER, **host["holds"][0])
    return v


def stop_pid(pid: int | None, timeout: float = 10) -> None:
    if not pid or process_gone(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(0.05)


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, **kw)


class Fleet:
    def __init__(self, state_dir: str):
        self.state_dir = os.path.abspath(state_dir)
        self.state_path = os.path.join(self.state_dir, STATE_FILE)
        self.state: dict = {}

    # -- state

    def load(self) -> bool:
        try:
            with open(self.state_path) as f:
                self.state = json.load(f)
            return True
        except FileNotFoundError:
            return False

    def save(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=2)
        os.replace(tmp, self.state_path)

    # -- create

    def create(self, first_address: str) -> list:
        if self.load() and self.state.get("hosts"):
            raise RuntimeError(f"a fleet is already recorded in {self.state_path}: destroy it first")
        addrs = addresses(first_address, len(FLEET))
        ensure_admin_user()
        ensure_user(REPO_USER)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        base = tempfile.mkdtemp(prefix="pgops-fleet-", dir="/tmp")
        os.chmod(base, 0o755)
        # Where the archiving role installs pgops-wal on every host (they share this filesystem).
        program = os.path.join(base, "program")
        os.mkdir(program, 0o755)
        self.state = {"base": base, "hosts": [], "created_at": time.time(), "program": program}
        self.save()
        self._make_keys()
        for spec, address in zip(FLEET, addrs):
            self.state["hosts"].append(self._start_host(spec, address))
            self.save()
        self._trust_repository_hosts()
        for host in self.state["hosts"]:
            if host["major"]:
                self._start_cluster(host)
                self.save()
        self._write_host_vars()
        return instance_config(self.state)

    def _make_keys(self) -> None:
        keys = os.path.join(self.state["base"], "keys")
        os.mkdir(keys, 0o755)  # sshd reads authorized_keys as the target user
        for name in ("client_ed25519", "host_ed25519"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pgops-fleet-{name}", "-f", f"{keys}/{name}"])
        shutil.copyfile(f"{keys}/client_ed25519.pub", f"{keys}/authorized_keys")
        os.chmod(f"{keys}/authorized_keys", 0o644)
        # The database hosts' postgres user: its own key, accepted for REPO_USER on repository hosts only.
        pg_keys = os.path.join(keys, "postgres")
        os.mkdir(pg_keys, 0o700)
        chown_pg(pg_keys)
        as_postgres(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pgops-fleet-postgres", "-f", f"{pg_keys}/id_ed25519"])
        shutil.copyfile(f"{pg_keys}/id_ed25519.pub", f"{keys}/repository_authorized_keys")
        os.chmod(f"{keys}/repository_authorized_keys", 0o644)
        self.state.update(
            keys=keys,
            client_key=f"{keys}/client_ed25519",
            pg_key=f"{pg_keys}/id_ed25519",
            pg_known_hosts=f"{pg_keys}/known_hosts",
        )

    def _trust_repository_hosts(self) -> None:
        """known_hosts of the postgres user: the repository hosts' keys, so ssh checks them strictly."""
        with open(f"{self.state['keys']}/host_ed25519.pub") as f:
            host_key = " ".join(f.read().split()[:2])
        path = self.state["pg_known_hosts"]
        with open(path, "w") as f:
            for host in self.state["hosts"]:
                if host.get("holds") is not None:
                    f.write(f"[{host['address']}]:{host['ssh_port']} {host_key}\n")
        chown_pg(path)

    def _host_by_name(self, name: str) -> dict:
        return next(h for h in self.state["hosts"] if h["name"] == name)

    def _start_host(self, spec: HostSpec, address: str) -> dict:
        host_dir = os.path.join(self.state["base"], spec.name)
        os.mkdir(host_dir, 0o755)
        held = [s for s in FLEET if s.repository_on == spec.name]
        owner = REPO_USER if held else PG_USER
        # The repositories' parent belongs to their owner: the role creates each repository itself (0700).
        # Restore drills run their scratch servers in scratch/; wal/ holds the WAL archives of the held clusters.
        backup_dir, scratch, wal = (os.path.join(host_dir, d) for d in ("backup", "scratch", "wal"))
        for d in (backup_dir, scratch, wal):
            os.mkdir(d, 0o700)
            shutil.chown(d, owner, owner)
        host = {
            "name": spec.name,
            "groups": list(spec.groups),
            "address": address,
            "dir": host_dir,
            "repository": os.path.join(backup_dir, "repo"),
            "scratch": scratch,
            "upstream": spec.upstream,
            "major": spec.major,
            "repository_host": spec.repository_on,
            "holds": [] if held else None,
        }
        if spec.repository_on:
            store = self._host_by_name(spec.repository_on)  # started earlier: FLEET lists it first
            host.update(
                repository=os.path.join(store["dir"], "backup", spec.name),
                archive=os.path.join(store["dir"], "wal", spec.name),
                repository_owner=REPO_USER,
                repository_ssh_port=store["ssh_port"],
                repository_ssh_options=ssh_options(self.state),
            )
            _run(["install", "-d", "-m", "0700", "-o", REPO_USER, "-g", REPO_USER, host["archive"]])
            store["holds"].append(
                {
                    "fleet_held_for": spec.name,
                    "fleet_repository": host["repository"],
                    "fleet_pg_archive": host["archive"],
                    "fleet_pg_bin": pg_bin(spec.major),
                    "fleet_scratch": store["scratch"],
                }
            )
        ssh_dir = os.path.join(host_dir, "ssh")
        os.mkdir(ssh_dir, 0o700)
        port = free_port(address)
        config = os.path.join(ssh_dir, "sshd_config")
        with open(config, "w") as f:
            f.write(sshd_config(address, port, ssh_dir, self.state["keys"], repository=bool(held)))
        log = os.path.join(ssh_dir, "sshd.log")
        host.update(ssh_port=port, sshd_pidfile=os.path.join(ssh_dir, "sshd.pid"), sshd_log=log, sshd_pid=None)
        r = _run([SSHD, "-f", config, "-E", log], check=False, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"sshd for {spec.name} failed to start ({r.returncode}): {r.stderr}")
        host["sshd_pid"] = self._wait_sshd(host)
        return host

    @staticmethod
    def _wait_sshd(host: dict, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        pid = None
        while True:
            try:
                with open(host["sshd_pidfile"]) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                pass
            try:
                with socket.create_connection((host["address"], host["ssh_port"]), timeout=1):
                    if pid:
                        return pid
            except OSError:
                if pid and process_gone(pid):
                    raise RuntimeError(f"sshd of {host['name']} exited; see {host['sshd_log']}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd of {host['name']} not ready in {timeout}s; see {host['sshd_log']}")
            time.sleep(0.05)

    def _start_cluster(self, host: dict) -> None:
        root = os.path.join(host["dir"], "pg")
        os.mkdir(root, 0o755)
        chown_pg(root)
        c = Cluster(host["major"], root=root, host=host["address"])
        host["pg"] = {
            "major": c.major,
            "bin": c.bin,
            "root": root,
            "data": c.data,
            "archive": c.archive,
            "sock": c.sock,
            "log": c.log,
            "port": c.port,
        }
        if host["upstream"]:
            self._clone_standby(c, self._host_by_name(host["upstream"]))
        elif host["repository_host"]:
            # WAL goes to the repository host over ssh, as the postgres user, like the backups.
            store = self._host_by_name(host["repository_host"])
            target = ["-p", str(store["ssh_port"]), f"{REPO_USER}@{store['address']}"]
            ssh = " ".join(["ssh", *host["repository_ssh_options"], *target])
            wal = f"{host['archive']}/%f"
            put = f"umask 077 && test ! -f {wal} && cat > {wal}.part && mv {wal}.part {wal}"
            c.init(archive_command=f"""'{ssh} "{put}" < %p'""")
            host["pg"]["archive"] = host["archive"]
        else:
            c.init()
        self.save()  # before the start: destroy stops whatever pg_ctl may have started
        c.start()
        host["pg"]["postmaster_pid"] = c.postmaster_pid()
        c.wait_ready()
        if host["upstream"]:
            self._wait_streaming(c)
            self._settle_standby(c, self._host_by_name(host["upstream"]))
        else:
            c.sql("CREATE TABLE fleet_seed (id int PRIMARY KEY, note text NOT NULL)")
            c.sql("INSERT INTO fleet_seed SELECT g, 'row ' || g FROM generate_series(1, %s) g", (SEED_ROWS,))
        if host["repository_host"]:
            # The archiving playbook moves its WAL to pgops-wal: <repository>/wal/<system identifier> there.
            sysid = str(c.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
            host["archive"] = os.path.join(host["repository"], "wal", sysid)
            store = self._host_by_name(host["repository_host"])
            for held in store["holds"]:
                if held["fleet_held_for"] == host["name"]:
                    held["fleet_pg_archive"] = host["archive"]

    @staticmethod
    def _clone_standby(c: Cluster, primary: dict) -> None:
        """pg_basebackup -R from the primary, then the standby's own address, socket and archive."""
        p = primary["pg"]
        as_postgres(
            [f"{TOOLS17}/pg_basebackup", "-D", c.data, "-R", "-X", "stream", "-c", "fast", "--no-sync",
             "-h", primary["address"], "-p", str(p["port"]), "-U", PG_USER],
            timeout=120,
        )  # fmt: skip
        # Later lines win: the settings copied from the primary are overridden, not edited.
        c.set_conf(
            listen_addresses=f"'{c.host}'",
            port=c.port,
            unix_socket_directories=f"'{c.sock}'",
            archive_mode="always",
            archive_command=f"'test ! -f {c.archive}/%f && cp %p {c.archive}/%f'",
            hot_standby="on",
        )

    @staticmethod
    def _settle_standby(c: Cluster, primary: dict, timeout: float = 60) -> None:
        """Bring the new standby to the state of one that has run for a while: it has replayed a
        checkpoint made after it started archiving. A backup from a standby starts at its last
        restartpoint; until then that is pg_basebackup's checkpoint, whose WAL segment came with
        the clone and is in the primary's archive only, never in the standby's own."""
        p = primary["pg"]
        upstream = Cluster(p["major"], root=p["root"], host=primary["address"], port=p["port"])
        upstream.sql("CHECKPOINT")
        target = upstream.sql("SELECT pg_current_wal_lsn()")[0][0]
        deadline = time.monotonic() + timeout
        while not c.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,))[0][0]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"standby on port {c.port} did not replay up to {target}; see {c.log}")
            time.sleep(0.1)

    @staticmethod
    def _wait_streaming(c: Cluster, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            rows = c.sql("SELECT status FROM pg_stat_wal_receiver")
            if rows and rows[0][0] == "streaming":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"standby on port {c.port} is not streaming: {rows}; see {c.log}")
            time.sleep(0.1)

    def _write_host_vars(self) -> None:
        d = os.path.join(self.state_dir, "host_vars")
        os.makedirs(d, exist_ok=True)
        for host in self.state["hosts"]:
            with open(os.path.join(d, f"{host['name']}.yml"), "w") as f:
                f.write("---\n")
                yaml.safe_dump({**host_vars(host), "fleet_program_dir": self.state["program"]}, f, sort_keys=True)

    # -- destroy

    def destroy(self) -> list:
        """Stop what create started (by pid), remove its files; returns what went wrong."""
        if not self.load():
            return []
        problems = []
        # Standbys first, so no walreceiver retries against a stopped primary.
        for host in sorted(self.state.get("hosts", []), key=lambda h: not h.get("upstream")):
            if host.get("pg"):
                problems += self._stop_cluster(host)
        for host in self.state.get("hosts", []):
            self._close_masters(host)
            stop_pid(host.get("sshd_pid") or self._pid_from(host.get("sshd_pidfile")))
        base = self.state.get("base")
        if base and os.path.basename(base).startswith("pgops-fleet-"):
            shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(os.path.join(self.state_dir, "host_vars"), ignore_errors=True)
        os.unlink(self.state_path)
        return problems

    @staticmethod
    def _pid_from(path: str | None) -> int | None:
        try:
            with open(path) as f:
                return int(f.readline().strip())
        except (OSError, TypeError, ValueError):
            return None

    def _stop_cluster(self, host: dict) -> list:
        pg = host["pg"]
        pid = self._pid_from(os.path.join(pg["data"], "postmaster.pid")) or pg.get("postmaster_pid")
        if not pid or process_gone(pid):
            return []
        r = as_postgres(
            [f"{pg['bin']}/pg_ctl", "-D", pg["data"], "-m", "fast", "-w", "-t", "30", "stop"], check=False, timeout=60
        )
        # pg_ctl -w returns once postmaster.pid is unlinked, a moment before the postmaster exits.
        deadline = time.monotonic() + (10 if r.returncode == 0 else 0)
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not process_gone(pid):
            stop_pid(pid)
            return [f"{host['name']}: pg_ctl stop failed ({r.returncode}: {r.stderr.strip()}); postmaster {pid} was killed"]
        return []

    @staticmethod
    def _close_masters(host: dict) -> None:
        """Ansible's (and testinfra's) ssh masters outlive the run by ControlPersist."""
        if not host.get("ssh_port"):
            return
        path = os.path.join(CONTROL_DIR, f"{host['address']}-{host['ssh_port']}-{ADMIN_USER}")
        if os.path.exists(path):
            _run(["ssh", "-o", f"ControlPath={path}", "-O", "exit", host["address"]], check=False, timeout=10)


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.fleet", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["create", "destroy"])
    ap.add_argument("--state", required=True, help="directory for fleet.json and host_vars/ (molecule's ephemeral dir)")
    ap.add_argument("--first-address", default=os.environ.get("PGOPS_FLEET_ADDRESS", "127.0.0.61"))
    args = ap.parse_args(argv)
    fleet = Fleet(args.state)
    if args.action == "create":
        if fleet.load() and fleet.state.get("hosts"):
            print(f"a fleet is already recorded in {fleet.state_path}: destroy it first", file=sys.stderr)
            return 1
        try:
            config = fleet.create(args.first_address)
        except BaseException:
            fleet.destroy()  # leave nothing half-started behind
            raise
        json.dump(config, sys.stdout, indent=2)
        print()
        return 0
    problems = fleet.destroy()
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
