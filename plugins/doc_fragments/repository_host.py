# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The options of modules that read a backup on a repository host over ssh (module_utils/_storage.SSH_OPTION_SPEC).
    DOCUMENTATION = r"""
options:
  repository_host:
    description:
      - The repository is on another host, reached with ssh as C([user@]host) by the OS user the module runs as, with
        a key (C(BatchMode=yes), so no password is ever prompted for). The user is the one that owns the repository
        there. The backup's path options are then paths on that host.
      - Its small files (C(backup.json), C(backup_label), C(tablespace_map), C(backup_manifest),
        C(backup_files.json)) are read into a private temporary directory; its archives are streamed with C(cat) over
        ssh straight into the tools that read them, and an rsync backup's C(data/) is copied by rsync over ssh. No copy
        of an archive is written on this host.
      - That host needs only an ssh server, C(cat), C(tar), C(find) (GNU) and C(mv); this host needs the ssh client.
    type: str
  ssh_port:
    description: ssh port of O(repository_host).
    type: int
    default: 22
  ssh_options:
    description: Further ssh arguments, one per item, e.g. C([-i, /var/lib/postgresql/.ssh/id_backup]).
    type: list
    elements: str
    default: []
"""
