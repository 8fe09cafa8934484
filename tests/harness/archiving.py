"""Helpers of the archiving tests (pg_archiving_info, pg_archiving_check)."""

from __future__ import annotations

from harness.pg import Cluster

PASSWORD = "s3cret-Pw"
PG15_CLIENT = "/usr/lib/postgresql/15/bin"


def task(module: str, name: str, cluster: Cluster, **params) -> dict:
    return {"name": name, module: {**cluster.conn_vars(), **params}}


def as_role(cluster: Cluster, role: str, **params) -> dict:
    # Non-postgres roles log in with scram over TCP (the harness's pg_hba.conf).
    return {
        "login_host": "127.0.0.1",
        "login_unix_socket": "",
        "port": cluster.port,
        "login_user": role,
        "login_password": PASSWORD,
        **params,
    }


def play(tasks: list) -> list:
    return [{"hosts": "postgresql", "gather_facts": False, "tasks": tasks}]


def codes(result: dict) -> set:
    return {p["code"] for p in result["problems"]}


def current_wal(c: Cluster) -> str:
    """The WAL file being written. Not pg_current_wal_lsn(): right after a switch it
    sits exactly on the segment boundary, where pg_walfile_name() names the segment
    just finished, so a switch would go unseen until more WAL is written."""
    return c.sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")[0][0]


def backup_roles(cluster: Cluster) -> list:
    """bob has nothing, carol may start and stop backups, dave may also switch WAL; returns the backup functions."""
    cluster.sql(
        "SET password_encryption = 'scram-sha-256';"
        + "".join(f"CREATE ROLE {r} LOGIN PASSWORD '{PASSWORD}';" for r in ("bob", "carol", "dave"))
    )
    funcs = ["pg_backup_start(text, boolean)", "pg_backup_stop(boolean)"]
    if cluster.major < 15:
        funcs = ["pg_start_backup(text, boolean, boolean)", "pg_stop_backup(boolean, boolean)"]
    for role in ("carol", "dave"):
        cluster.sql("".join(f"GRANT EXECUTE ON FUNCTION {f} TO {role};" for f in funcs))
    cluster.sql("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO dave")
    return funcs
