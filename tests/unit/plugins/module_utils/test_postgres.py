"""The connection layer without a server: libpq connection strings (libpq's parser
and our fallback for keywords an older libpq does not know), the keyword
arguments built from module parameters, and the name of a cluster."""

from __future__ import annotations

import importlib
import sys

import psycopg2.extensions
import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
pg = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._postgres")


def libpq(text: str) -> dict:
    return dict(psycopg2.extensions.parse_dsn(text))


# -- connection strings


def test_parse_conninfo_handles_quotes_unknown_keywords_and_uris():
    got = pg.parse_conninfo("user=rep passfile='/var/lib/p q/.pgpass' host=/tmp/s port=5433 sslnegotiation=postgres x='it\\'s'")
    assert got == {
        "user": "rep",
        "passfile": "/var/lib/p q/.pgpass",
        "host": "/tmp/s",
        "port": "5433",
        "sslnegotiation": "postgres",
        "x": "it's",
    }
    assert pg.parse_conninfo("host = 10.0.0.1  port= 5432")["host"] == "10.0.0.1"
    uri = pg.parse_conninfo("postgresql://rep@db1.example:5433/postgres?sslmode=require")
    assert uri == {"host": "db1.example", "port": "5433", "user": "rep", "sslmode": "require", "dbname": "postgres"}


def test_parse_conninfo_falls_back_only_when_libpq_refuses(monkeypatch):
    calls = []
    real = pg._parse_pairs
    monkeypatch.setattr(pg, "_parse_pairs", lambda text: calls.append(text) or real(text))
    assert pg.parse_conninfo("  host=h1,h2 port=5432,5433  ") == {"host": "h1,h2", "port": "5432,5433"}
    assert calls == []  # libpq knew every keyword
    assert pg.parse_conninfo("host=h pgops_unknown=1") == {"host": "h", "pgops_unknown": "1"}
    assert calls == ["host=h pgops_unknown=1"]
    assert pg.parse_conninfo("") == {} and pg.parse_conninfo(None) == {}


def test_parse_conninfo_multi_host_uri_without_libpq_keyword_support(monkeypatch):
    # An unknown query parameter makes libpq refuse the URI: our parser reads the host list the same way.
    uri = "postgresql://rep@h1:5432,h2:5433/db?pgops_unknown=1"
    assert pg.parse_conninfo(uri) == {"user": "rep", "host": "h1,h2", "port": "5432,5433", "dbname": "db", "pgops_unknown": "1"}
    monkeypatch.setattr(pg, "HAS_PSYCOPG2", False)  # a node without the driver
    assert pg.parse_conninfo("postgresql://rep@h1:5432,h2:5433/db") == {
        "user": "rep",
        "host": "h1,h2",
        "port": "5432,5433",
        "dbname": "db",
    }
    assert pg.parse_conninfo("postgres://h") == {"host": "h"}
    assert pg.parse_conninfo("host=h port=1") == {"host": "h", "port": "1"}


PAIRS = [
    ("host=h port=1", {"host": "h", "port": "1"}),
    ("  host = h\tport =1\n dbname= d  ", {"host": "h", "port": "1", "dbname": "d"}),
    ("host='a b' password='it\\'s'", {"host": "a b", "password": "it's"}),
    ("password='a\\\\b'", {"password": "a\\b"}),  # a quoted backslash, escaped
    ("password=a\\ b", {"password": "a b"}),  # an escaped space outside quotes
    ("password=\\'x", {"password": "'x"}),
    ("password='' host=h", {"password": "", "host": "h"}),
    ("application_name='a=b c'", {"application_name": "a=b c"}),
    ("host=", {"host": ""}),
    ("host= port=1", {"host": "port=1"}),  # as libpq: the value is the next word
]


@pytest.mark.parametrize("text, expected", PAIRS)
def test_parse_pairs_reads_what_libpq_reads(text, expected):
    assert pg._parse_pairs(text) == expected
    assert libpq(text) == expected


def test_parse_pairs_keeps_unknown_keywords_and_stops_at_junk():
    assert pg._parse_pairs("sslnegotiation=direct x='1 2'") == {"sslnegotiation": "direct", "x": "1 2"}
    assert pg._parse_pairs("host=h trailing words") == {"host": "h"}
    assert pg._parse_pairs("") == {}


URIS = [
    ("postgresql://h", {"host": "h"}),
    ("postgres://rep@h:5433/db", {"user": "rep", "host": "h", "port": "5433", "dbname": "db"}),
    ("postgresql://rep:s%40cr%3At@h/db", {"user": "rep", "password": "s@cr:t", "host": "h", "dbname": "db"}),
    ("postgresql://u:p:q@h/db", {"user": "u", "password": "p:q", "host": "h", "dbname": "db"}),
    ("postgresql://rep@h1:5432,h2:5433/db", {"user": "rep", "host": "h1,h2", "port": "5432,5433", "dbname": "db"}),
    ("postgresql://h1,h2:5433/db", {"host": "h1,h2", "port": ",5433", "dbname": "db"}),  # h1 on the default port
    ("postgresql://[::1]:5433/db", {"host": "::1", "port": "5433", "dbname": "db"}),
    ("postgresql://[::1]", {"host": "::1"}),
    ("postgresql://u@[::1]:5433,[fe80::1]/db", {"user": "u", "host": "::1,fe80::1", "port": "5433,", "dbname": "db"}),
    ("postgresql://h:5432,[::1]:5433/db", {"host": "h,::1", "port": "5432,5433", "dbname": "db"}),
    ("postgresql://%2Fvar%2Frun%2Fpostgresql/db", {"host": "/var/run/postgresql", "dbname": "db"}),
    ("postgresql:///db?host=/tmp&port=5433", {"host": "/tmp", "port": "5433", "dbname": "db"}),
    ("postgresql://rep@/my%20db", {"user": "rep", "dbname": "my db"}),
    ("postgresql://h/", {"host": "h"}),
    (
        "postgresql://h/db?sslmode=require&application_name=a%20b&connect_timeout=10",
        {"host": "h", "dbname": "db", "sslmode": "require", "application_name": "a b", "connect_timeout": "10"},
    ),
    ("postgresql://u@h/db?host=other&dbname=x", {"user": "u", "host": "other", "dbname": "x"}),  # the query wins
    # Found by review: "+" stays a plus, "#" belongs to the password, an empty user is no user.
    ("postgresql://h/db?application_name=a+b", {"host": "h", "dbname": "db", "application_name": "a+b"}),
    ("postgresql://u:pa#ss@h/db", {"user": "u", "password": "pa#ss", "host": "h", "dbname": "db"}),
    ("postgresql://:secret@h/db", {"password": "secret", "host": "h", "dbname": "db"}),
]


@pytest.mark.parametrize("text, expected", URIS)
def test_parse_uri_reads_what_libpq_reads(text, expected):
    assert pg._parse_uri(text) == expected
    assert libpq(text) == expected


def test_parse_uri_host_list_on_default_ports():
    # libpq says port "," (every host on the default port); no port at all means the same.
    assert pg._parse_uri("postgresql://h1,h2/db") == {"host": "h1,h2", "dbname": "db"}
    assert libpq("postgresql://h1,h2/db")["port"] == ","


# -- keyword arguments for libpq


PARAMS = {
    "login_user": "bk",
    "login_password": "s3cr=t 'x'",
    "login_host": "db.example",
    "login_unix_socket": "",
    "port": 5433,
    "login_db": "app",
    "ssl_mode": "verify-full",
    "ca_cert": "/etc/ca.pem",
    "ssl_cert": "/etc/c.pem",
    "ssl_key": "/etc/k.pem",
    "connect_params": {},
}


def test_connection_kwargs_maps_every_option():
    kw = pg.connection_kwargs(PARAMS, application_name="test app")
    assert {k: kw[k] for k in ("dbname", "user", "port", "host", "sslmode", "application_name")} == {
        "dbname": "app",
        "user": "bk",
        "port": 5433,
        "host": "db.example",
        "sslmode": "verify-full",
        "application_name": "test app",
    }
    assert (kw["sslrootcert"], kw["sslcert"], kw["sslkey"]) == ("/etc/ca.pem", "/etc/c.pem", "/etc/k.pem")


def test_connection_kwargs_defaults():
    kw = pg.connection_kwargs({})
    assert kw == {
        "dbname": "postgres",
        "user": "postgres",
        "port": 5432,
        "sslmode": "prefer",
        "application_name": "pgops.online_backup",
    }


def test_the_password_is_only_in_its_own_key():
    kw = pg.connection_kwargs(PARAMS)
    assert kw["password"] == PARAMS["login_password"]
    elsewhere = {k: v for k, v in kw.items() if k != "password"}
    assert not [k for k, v in elsewhere.items() if "s3cr" in str(v)], elsewhere
    assert "s3cr" not in repr(sorted(elsewhere.items()))
    # No empty password is sent (libpq would then skip .pgpass).
    assert "password" not in pg.connection_kwargs(dict(PARAMS, login_password=""))


def test_unix_socket_wins_over_host_and_gets_no_keepalives():
    kw = pg.connection_kwargs(dict(PARAMS, login_unix_socket="/run/postgresql"))
    assert kw["host"] == "/run/postgresql"
    assert not set(pg.TCP_KEEPALIVES) & set(kw)


def test_keepalives_only_over_tcp():
    tcp = pg.connection_kwargs(dict(PARAMS, login_host="10.0.0.1"))
    assert {k: tcp[k] for k in pg.TCP_KEEPALIVES} == pg.TCP_KEEPALIVES and tcp["keepalives"] == 1
    socket_dir_as_host = pg.connection_kwargs(dict(PARAMS, login_host="/tmp"))
    assert socket_dir_as_host["host"] == "/tmp" and not set(pg.TCP_KEEPALIVES) & set(socket_dir_as_host)
    no_host = pg.connection_kwargs(dict(PARAMS, login_host=""))
    assert "host" not in no_host and not set(pg.TCP_KEEPALIVES) & set(no_host)


def test_connect_params_come_last():
    kw = pg.connection_kwargs(dict(PARAMS, connect_params={"keepalives_idle": 5, "target_session_attrs": "read-write"}))
    assert kw["keepalives_idle"] == 5 and kw["target_session_attrs"] == "read-write"
    assert kw["keepalives_count"] == pg.TCP_KEEPALIVES["keepalives_count"]


def test_cluster_key():
    assert pg.cluster_key({"login_unix_socket": "/run/pg", "login_host": "h", "port": 5433}) == "/run/pg:5433"
    assert pg.cluster_key({"login_host": "h"}) == "h:5432"
    assert pg.cluster_key({}) == "local:5432"


def test_error_text_is_one_line():
    assert pg.error_text(Exception("ERROR:  boom\nDETAIL:  why\n\n")) == "ERROR:  boom DETAIL:  why"


def test_every_error_is_a_pgops_error():
    base = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._errors").PgopsError
    modules = ("_backup_api", "_files", "_keeper", "_layout", "_repository", "_copy", "_manifest", "_archiving", "_wal",
               "_restore_plan", "_restore_files", "_restore_server")  # fmt: skip
    errors = []
    for name in modules:
        mod = importlib.import_module(f"ansible_collections.pgops.online_backup.plugins.module_utils.{name}")
        errors += [v for k, v in vars(mod).items() if isinstance(v, type) and issubclass(v, Exception) and k.endswith("Error")]
    errors = [e for e in errors if e.__module__.startswith("ansible_collections.")]
    assert len(errors) >= 8, errors
    assert all(issubclass(e, base) for e in errors), [e for e in errors if not issubclass(e, base)]


def test_a_standbys_primary_comes_from_the_option_else_its_primary_conninfo(monkeypatch):
    """One owner for the standby proof and the standby stop: the primary option first; what it leaves
    out from primary_conninfo (a host list keeps its port list) and the task's own connection."""
    conninfo = {"text": "host=10.0.0.5 port=5433 user=replicator application_name=s1"}
    monkeypatch.setattr(pg, "query_one", lambda conn, sql, args=None: (conninfo["text"],))
    task = {"login_user": "backup", "login_password": "pw", "login_db": "postgres", "ssl_mode": "require"}
    got = pg.primary_params({**task, "primary": None}, object())
    assert (got["login_host"], got["port"], got["login_user"], got["ssl_mode"]) == ("10.0.0.5", 5433, "backup", "require")
    conninfo["text"] = "host=h1,h2 port=5432,5433"
    assert pg.primary_params(task, object())["connect_params"] == {"port": "5432,5433"}
    given = pg.primary_params({**task, "primary": {"login_host": "db-primary", "port": 6432, "login_user": ""}}, object())
    assert (given["login_host"], given["port"], given["login_user"]) == ("db-primary", 6432, "backup")
