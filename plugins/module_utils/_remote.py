# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The repository host, reached from the database host with ssh: the few
commands the copy and the ssh storage run there. Its own small module so that
the modules that only read or write a repository do not carry the copy engine.
"""

from __future__ import annotations

import os
import subprocess

from ._errors import PgopsError

# subprocess, not run_command (ansible-core 2.21's pylint check ansible-bad-function): module_utils
# have no AnsibleModule, and the copy's pipelines take these argv lists.
# pylint: disable=ansible-bad-function


class RemoteError(PgopsError):
    pass


def sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


class Remote:
    """The repository host, reached from the database host with ssh."""

    def __init__(self, target: str, port: int = 22, options: list | None = None):
        self.target = target
        self.ssh = ["ssh", "-p", str(port), "-o", "BatchMode=yes", *(options or [])]
        self.prefix = [*self.ssh, target]

    def run(self, command: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.prefix + [command], capture_output=True, check=False)
        if proc.returncode != 0:
            raise RemoteError(f"on {self.target}: {command!r} failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc

    def write(self, path: str, data: bytes) -> None:
        """Durably, as write_private_file does here: a whole file under a temporary name, synced, then
        renamed over path, and the directory synced (a backup marked complete after it keeps it)."""
        tmp, final, parent = sh_quote(f"{path}.tmp"), sh_quote(path), sh_quote(os.path.dirname(path))
        command = f"umask 077 && cat > {tmp} && sync {tmp} && mv -f {tmp} {final} && sync {parent}"
        proc = subprocess.run(self.prefix + [command], input=data, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RemoteError(f"cannot write {path} on {self.target}: {proc.stderr.decode(errors='replace').strip()}")

    def makedirs(self, path: str) -> None:
        self.run(f"mkdir -p -m 0700 {sh_quote(path)}")

    def symlink(self, target: str, path: str) -> None:
        self.run(f"ln -s {sh_quote(target)} {sh_quote(path)}")

    def is_dir(self, path: str) -> bool:
        return subprocess.run(self.prefix + [f"test -d {sh_quote(path)}"], capture_output=True, check=False).returncode == 0
