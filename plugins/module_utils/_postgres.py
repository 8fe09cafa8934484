# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One PostgreSQL connection layer for every module of the collection.

The only importer of psycopg2. Option names follow community.postgresql so
users feel at home.
"""

from __future__ import annotations

import traceback
from urllib.parse import unquote

from ._errors import PgopsError

PSYCOPG2_IMP_ERR = None
try:
    import psycopg2
    import psycopg2.errorcodes  # noqa: F401  (imported before any fork)
    import psycopg2.extensions  # noqa: F401

    HAS_PSYCOPG2 = True
except ImportError:  # pragma: no cover - depends on the managed node
    psycopg2 = None
    HAS_PSYCOPG2 = False
    PSYCOPG2_IMP_ERR = traceback.format_exc()

# Kept alive over long copies: the keeper's session must survive idle minutes.
TCP_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 6,
}

SSL_MODES = ["allow", "disable", "prefer", "require", "verify-ca", "verify-full"]


def postgres_common_argument_spec() -> dict:
    """The connection options, shared by every module (doc fragment: connection)."""
    return dict(
        login_user=dict(type="str", default="postgres", aliases=["login"]),
        login_password=dict(type="str", default="", no_log=True),
        login_host=dict(type="str", default="", aliases=["host"]),
        login_unix_socket=dict(type="str", default="", aliases=["unix_socket"]),
        port=dict(type="int", default=5432, aliases=["login_port"]),
        login_db=dict(type="str", default="postgres", aliases=["db", "database"]),
        ssl_mode=dict(type="str", default="prefer", choices=SSL_MODES),
        ca_cert=dict(type="str", aliases=["ssl_rootcert"]),
        ssl_cert=dict(type="path"),
        ssl_key=dict(type="path", no_log=False),
        connect_params=dict(type="dict", default={}),
    )


def connection_kwargs(params: dict, application_name: str = "pgops.online_backup") -> dict:
    """Build libpq keyword arguments from module parameters (pure function).

    The password goes only into this dict, which psycopg2 hands to libpq in
    memory: never into argv or the environment.
    """
    kw = {
        "dbname": params.get("login_db") or "postgres",
        "user": params.get("login_user") or "postgres",
        "port": params.get("port") or 5432,
        "sslmode": params.get("ssl_mode") or "prefer",
        "application_name": application_name,
    }
    host = params.get("login_host")
    if params.get("login_unix_socket"):
        # libpq treats a host starting with "/" as a socket directory.
        host = params["login_unix_socket"]
    if host:
        kw["host"] = host
    if params.get("login_password"):
        kw["password"] = params["login_password"]
    for opt, key in (("ca_cert", "sslrootcert"), ("ssl_cert", "sslcert"), ("ssl_key", "sslkey")):
        if params.get(opt):
            kw[key] = params[opt]
    if host and not host.startswith("/"):
        kw.update(TCP_KEEPALIVES)
    kw.update(params.get("connect_params") or {})
    return kw


def cluster_key(params: dict) -> str:
    """A stable name for the server a set of parameters points at."""
    host = params.get("login_unix_socket") or params.get("login_host") or "local"
    return f"{host}:{params.get('port') or 5432}"


def ensure_driver(module) -> None:
    if not HAS_PSYCOPG2:
        # Imported here: tools without Ansible (the WAL archive command) use this file too.
        from ansible.module_utils.basic import missing_required_lib

        module.fail_json(
            msg=missing_required_lib(
                "psycopg2",
                reason="to talk to PostgreSQL (Debian/Ubuntu: apt-get install python3-psycopg2; "
                "RHEL: dnf install python3-psycopg2; or pip install psycopg2-binary)",
            ),
            exception=PSYCOPG2_IMP_ERR,
        )


def connect(kwargs: dict, autocommit: bool = True):
    conn = psycopg2.connect(**kwargs)
    conn.autocommit = autocommit
    return conn


def connect_or_fail(module, application_name: str = "pgops.online_backup"):
    """Connect with the module's parameters or fail with the driver's reason."""
    ensure_driver(module)
    try:
        return connect(connection_kwargs(module.params, application_name))
    except psycopg2.Error as e:
        module.fail_json(msg=f"unable to connect to database: {error_text(e)}")


def error_text(exc) -> str:
    """The driver's message on one line, without psycopg2's noise."""
    text = str(getattr(exc, "pgerror", None) or exc).strip()
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def query_one(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def query_all(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def query_dicts(conn, sql: str, args=None) -> list:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def parse_conninfo(text: str) -> dict:
    """Parse a libpq connection string (key=value pairs or a postgresql:// URI).

    libpq's own parser first; ours only when the node's libpq is older than
    the server and rejects a keyword it does not know (e.g. sslnegotiation,
    written by pg_basebackup 17). Several hosts come back as libpq takes
    them: host=h1,h2 port=5432,5433.
    """
    text = (text or "").strip()
    if HAS_PSYCOPG2:
        try:
            return dict(psycopg2.extensions.parse_dsn(text))
        except psycopg2.ProgrammingError:
            pass
    if text.startswith(("postgresql://", "postgres://")):
        return _parse_uri(text)
    return _parse_pairs(text)


def _parse_uri(text: str) -> dict:
    """postgresql://[user[:password]@][host][:port][,host[:port]...][/dbname][?param=value&...], as libpq reads it."""
    rest = text.split("://", 1)[1]
    rest, _q, query = rest.partition("?")
    authority, _slash, dbname = rest.partition("/")
    out = {}
    userinfo, at, hostlist = authority.rpartition("@")
    if at:
        user, _colon, password = userinfo.partition(":")
        if user:
            out["user"] = unquote(user)
        if password:
            out["password"] = unquote(password)
    hosts, ports = [], []
    for part in hostlist.split(","):
        if part.startswith("["):  # [::1]:5432
            host, _bracket, tail = part[1:].partition("]")
            port = tail[1:] if tail.startswith(":") else ""
        else:
            host, _colon, port = part.partition(":")
        hosts.append(unquote(host))
        ports.append(port)
    if any(hosts):
        out["host"] = ",".join(hosts)
    if any(ports):
        out["port"] = ",".join(ports)
    if dbname:
        out["dbname"] = unquote(dbname)
    for pair in query.split("&") if query else []:
        key, _eq, value = pair.partition("=")
        out[unquote(key)] = unquote(value)  # libpq decodes %XX only, never "+"
    return out


def _parse_pairs(text: str) -> dict:
    out = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        start = i
        while i < n and text[i] not in "= \t\n":
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if not key or i >= n or text[i] != "=":
            break
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value = []
        if i < n and text[i] == "'":
            i += 1
            while i < n and text[i] != "'":
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
            i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
        out[key] = "".join(value)
    return out


# The primary option of the modules that work on a standby (doc fragment pgops.online_backup.primary).
PRIMARY_SPEC = dict(
    type="dict",
    options=dict(
        login_host=dict(type="str"),
        login_unix_socket=dict(type="str"),
        port=dict(type="int"),
        login_user=dict(type="str"),
        login_password=dict(type="str", no_log=True),
        login_db=dict(type="str"),
    ),
)


def primary_params(params: dict, standby_conn) -> dict:
    """The connection options of a standby's primary: params["primary"], else the standby's
    primary_conninfo (host, port), the rest from the task's own connection options."""
    primary = {k: v for k, v in (params.get("primary") or {}).items() if v not in (None, "")}
    if not (primary.get("login_host") or primary.get("login_unix_socket")):
        try:
            info = query_one(standby_conn, "SELECT current_setting('primary_conninfo')")[0]
        except psycopg2.Error as e:
            why = error_text(e)
            raise PgopsError(f"cannot read primary_conninfo to find the primary ({why}); set the primary option") from None
        parsed = parse_conninfo(info)
        primary.setdefault("login_host", parsed.get("host", ""))
        port = parsed.get("port") or ""
        if "," in port:
            primary.setdefault("connect_params", {"port": port})  # a host list keeps its port list
        elif port and not primary.get("port"):
            primary["port"] = int(port)
    inherited = ("login_user", "login_password", "login_db", "ssl_mode", "ca_cert", "ssl_cert", "ssl_key")
    merged = {k: params.get(k) for k in inherited}
    merged.update(login_host="", login_unix_socket="", port=5432, connect_params={})
    merged.update({k: v for k, v in primary.items() if v not in (None, "")})
    return merged


def server_version(conn) -> tuple:
    """(numeric version, text version), e.g. (150018, '15.18')."""
    num = int(query_one(conn, "SELECT current_setting('server_version_num')")[0])
    text = query_one(conn, "SELECT current_setting('server_version')")[0]
    return num, text.split()[0]
