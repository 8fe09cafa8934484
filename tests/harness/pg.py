"""Real PostgreSQL clusters for tests: one per call, owned by the postgres OS user."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

import psycopg2

from .scratch import scratch_dir

CACHE = os.environ.get("PGOPS_CACHE", "/var/cache/pgops-online-backup")
MAJORS = [12, 13, 14, 15, 16, 17, 18]
TOOLS17 = os.path.join(CACHE, "pg17-tools", "bin")
PG_USER = "postgres"


def process_gone(pid: int) -> bool:
    """Gone or a zombie (PID 1 here may reap late, so a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(")") + 2] in "ZX"


def tagged_processes(tag: str, keepers: bool | None = None) -> list:
    """Live processes whose environment holds tag ("NAME=value"): a test's playbook run and
    what it started. keepers: only session keepers (True), none of them (False), or all."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        comm, state = data[data.index("(") + 1 : data.rindex(")")], data[data.rindex(")") + 2]
        if state in "ZX" or tag.encode() not in environ:
            continue
        if keepers is None or keepers == (comm == "pgops-keeper"):
            found.append(int(name))
    return found


def stop_data_directory(data: str, timeout: float = 30) -> None:
    """Stop the server running in data (a restore's), if any: SIGINT (fast shutdown) and wait."""
    pid_file = os.path.join(data, "postmaster.pid")
    if os.path.exists(pid_file):
        os.kill(int(open(pid_file).readline()), signal.SIGINT)
        deadline = time.monotonic() + timeout
        while os.path.exists(pid_file) and time.monotonic() < deadline:
            time.sleep(0.1)


def pg_bin(major: int) -> str:
    return os.path.join(CACHE, "pg", str(major), "bin")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def as_postgres(cmd: list, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(["runuser", "-u", PG_USER, "--", *cmd], **kw)


def chown_pg(path: str) -> None:
    pw = pwd.getpwnam(PG_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def make_pg_dir(prefix: str, base: str | None = None) -> str:
    path = scratch_dir(prefix, base)
    os.chmod(path, 0o755)
    chown_pg(path)
    return path


class Cluster:
    """A throwaway cluster with WAL archiving to its own directory."""

    def __init__(self, major: int, root: str | None = None, host: str = "127.0.0.1", port: int | None = None, name: str = "pg"):
        self.major = major
        self.bin = pg_bin(major)
        self.root = root or make_pg_dir(f"pgops-{name}{major}-")
        self.data = os.path.join(self.root, "data")
        self.archive = os.path.join(self.root, "archive")
        self.sock = os.path.join(self.root, "sock")
        self.log = os.path.join(self.root, "server.log")
        self.host = host
        self.port = port or free_port(host)
        for d in (self.archive, self.sock):
            os.makedirs(d, exist_ok=True)
            chown_pg(d)

    # -- lifecycle

    def init(self, **settings) -> Cluster:
        as_postgres(
            [f"{self.bin}/initdb", "-D", self.data, "--no-sync", "-A", "trust", "-U", PG_USER, "-E", "UTF8", "--locale=C"]
        )
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": self.port,
            "unix_socket_directories": f"'{self.sock}'",
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": f"'test ! -f {self.archive}/%f && cp %p {self.archive}/%f'",
            "fsync": "off",
            "max_wal_senders": 5,
            "logging_collector": "off",
            "checkpoint_timeout": "30min",
        }
        conf.update(settings)
        self.set_conf(**conf)
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
            f.write(
                "local all all trust\n"
                "local replication all trust\n"
                "host all postgres 127.0.0.0/8 trust\n"
                "host replication all 127.0.0.0/8 trust\n"
                "host all all 127.0.0.0/8 scram-sha-256\n"
            )
        return self

    def set_conf(self, **settings) -> None:
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")

    def start(self, timeout: int = 60) -> Cluster:
        as_postgres([f"{self.bin}/pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", str(timeout), "start"])
        return self

    def stop(self, mode: str = "fast") -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            as_postgres([f"{self.bin}/pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"], check=False)

    def postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- SQL

    def connect(self, dbname: str = "postgres", user: str = PG_USER, autocommit: bool = True):
        conn = psycopg2.connect(host=self.sock, port=self.port, dbname=dbname, user=user)
        conn.autocommit = autocommit
        return conn

    def sql(self, query: str, args=None, dbname: str = "postgres"):
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sql("SELECT 1")
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def backups_in_progress(self) -> int:
        """Backends whose backup is running (keeper sessions by application_name)."""
        return self.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgops.online_backup keeper%%'")[0][0]

    def conn_vars(self) -> dict:
        return {"login_unix_socket": self.sock, "port": self.port, "login_user": PG_USER}


def recover(c: Cluster, archive: str, target: str = "immediate", timeout: float = 90) -> Cluster:
    """The end of PostgreSQL's documented manual restore, for a data directory
    already in place with its backup_label: restore_command from the archive,
    recovery.signal, start, wait until recovery ends."""
    for d in ("pg_wal", "pg_wal/archive_status"):
        os.makedirs(os.path.join(c.data, d), exist_ok=True)
    subprocess.run(["chown", "-R", f"{PG_USER}:", c.root], check=True)
    os.chmod(c.data, 0o700)
    with open(os.path.join(c.data, "postgresql.auto.conf"), "a") as f:
        f.write(f"restore_command = 'cp {archive}/%f %p'\n")
        if target == "immediate":
            f.write("recovery_target = 'immediate'\nrecovery_target_action = 'promote'\n")
    c.set_conf(port=c.port, unix_socket_directories=f"'{c.sock}'", listen_addresses="''", archive_mode="off")
    open(os.path.join(c.data, "recovery.signal"), "w").close()
    chown_pg(os.path.join(c.data, "recovery.signal"))
    try:
        c.start()
        deadline = time.monotonic() + timeout
        while c.sql("SELECT pg_is_in_recovery()")[0][0]:
            assert time.monotonic() < deadline, "recovery did not finish"
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - any failure: show the server log, then re-raise
        log = open(c.log).read()[-4000:] if os.path.exists(c.log) else ""
        c.destroy()
        raise AssertionError(f"restore failed; server log:\n{log}") from None
    return c


def restore_tar_backup(major: int, tar_path: str, label_dir: str, archive: str, target: str = "immediate") -> Cluster:
    """Manual restore of a plain tar of a data directory plus the label files in label_dir."""
    c = Cluster(major, name="restore")
    os.makedirs(c.data, mode=0o700)
    subprocess.run(["tar", "-xf", tar_path, "-C", c.data], check=True)
    for name in ("backup_label", "tablespace_map"):
        src = os.path.join(label_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(c.data, name))
    return recover(c, archive, target)


def make_standby(primary: Cluster, archive_mode: str | None = None, own_archive: bool = False) -> Cluster:
    """A streaming standby of primary (Debian's PG 15 pg_basebackup), started and ready.

    By default it archives into the primary's archive, as one cluster usually does
    (whoever comes second finds the same file); own_archive gives it its own."""
    s = Cluster(primary.major, name="standby")
    as_postgres(
        ["/usr/lib/postgresql/15/bin/pg_basebackup", "-h", primary.sock, "-p", str(primary.port), "-U", PG_USER,
         "-D", s.data, "-R", "-X", "stream", "-c", "fast"]
    )  # fmt: skip
    archive = s.archive if own_archive else primary.archive
    settings = {
        "port": s.port,
        "unix_socket_directories": f"'{s.sock}'",
        "listen_addresses": "'127.0.0.1'",
        "archive_command": f"'(test ! -f {archive}/%f && cp %p {archive}/%f) || cmp -s %p {archive}/%f'",
    }
    if archive_mode:
        settings["archive_mode"] = archive_mode
    s.set_conf(**settings)
    s.start()
    s.wait_ready()
    return s
