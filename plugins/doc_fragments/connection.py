# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The connection options, documented once for every module.
    DOCUMENTATION = r"""
options:
  login_user:
    description:
      - The role to connect as.
      - Starting and stopping a backup needs a superuser or EXECUTE on the backup functions.
    type: str
    default: postgres
    aliases: [login]
  login_password:
    description:
      - The password of O(login_user). Never logged, never put on a command line or in the environment.
    type: str
    default: ''
  login_host:
    description:
      - Host name or address of the server. Empty means the default Unix socket.
    type: str
    default: ''
    aliases: [host]
  login_unix_socket:
    description:
      - Directory of the server's Unix socket. Takes precedence over O(login_host).
    type: str
    default: ''
    aliases: [unix_socket]
  port:
    description:
      - Port of the server (also names the Unix socket file).
    type: int
    default: 5432
    aliases: [login_port]
  login_db:
    description:
      - Database to connect to.
    type: str
    default: postgres
    aliases: [db, database]
  ssl_mode:
    description:
      - libpq C(sslmode).
    type: str
    default: prefer
    choices: [allow, disable, prefer, require, verify-ca, verify-full]
  ca_cert:
    description:
      - File with the certificate authorities that sign the server's certificate (libpq C(sslrootcert)).
    type: str
    aliases: [ssl_rootcert]
  ssl_cert:
    description:
      - Client certificate file (libpq C(sslcert)).
    type: path
  ssl_key:
    description:
      - Client key file (libpq C(sslkey)).
    type: path
  connect_params:
    description:
      - Any other libpq connection parameters, for example C(connect_timeout).
    type: dict
    default: {}
requirements:
  - psycopg2 on the managed node (Debian C(python3-psycopg2)).
"""
