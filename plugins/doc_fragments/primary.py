# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # How a module working on a standby reaches its primary, documented once.
    DOCUMENTATION = r"""
options:
  primary:
    description:
      - On a standby, how to reach the primary, which must switch WAL so that the segment waited for reaches the
        standby's archive (a standby cannot switch WAL). Options left out are taken from the standby's
        C(primary_conninfo) (host, port) and from this task's connection options.
    type: dict
    suboptions:
      login_host:
        description: Host of the primary.
        type: str
      login_unix_socket:
        description: Unix socket directory of the primary.
        type: str
      port:
        description: Port of the primary.
        type: int
      login_user:
        description: Role on the primary (needs EXECUTE on C(pg_switch_wal())).
        type: str
      login_password:
        description: Password of that role.
        type: str
      login_db:
        description: Database on the primary.
        type: str
"""
