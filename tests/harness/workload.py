"""Writes that run while a backup is taken: pgbench, and a writer thread that
remembers when each of its commits returned."""

from __future__ import annotations

import datetime
import signal
import subprocess
import threading
import time

import psycopg2

PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"  # a client: works against 12-18


def pgbench_init(cluster, scale: int = 1) -> None:
    subprocess.run(
        [PGBENCH, "-i", "-q", "-s", str(scale), "-h", cluster.sock, "-p", str(cluster.port), "-U", "postgres", "postgres"],
        check=True,
        capture_output=True,
    )


def pgbench_start(cluster, clients: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        [
            PGBENCH,
            "-n",
            "-c",
            str(clients),
            "-T",
            "600",
            "-h",
            cluster.sock,
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
            "postgres",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def pgbench_stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def balances(conn) -> tuple:
    """pgbench's invariant: the four sums are equal in any consistent state."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers),"
            " (SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
        )
        return tuple(int(v) for v in cur.fetchone())


def written_ids(host: str, port: int, table: str = "writer_log") -> set:
    """The ids a Writer's rows have in a (restored) server reached at host:port."""
    conn = psycopg2.connect(host=host, port=port, user="postgres", dbname="postgres")
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT id FROM {table}")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


class Writer(threading.Thread):
    """Inserts rows one commit at a time; remembers (id, UTC time the commit returned)."""

    def __init__(self, cluster, table: str = "writer_log", dbname: str = "postgres"):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.table = table
        self.dbname = dbname
        self.committed = []
        self.error = None
        self._halt = threading.Event()
        cluster.sql(f"CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, payload text)", dbname=dbname)

    def run(self) -> None:
        try:
            conn = self.cluster.connect(self.dbname)
            n = 0
            while not self._halt.is_set():
                n += 1
                with conn.cursor() as cur:
                    cur.execute(f"INSERT INTO {self.table} VALUES (%s, repeat('x', 200))", (n,))
                self.committed.append((n, datetime.datetime.now(datetime.timezone.utc)))
                time.sleep(0.002)
            conn.close()
        except psycopg2.Error as e:  # the server may be stopped on purpose by a test
            self.error = e

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def committed_before(self, when: datetime.datetime) -> set:
        return {i for i, t in self.committed if t < when}
