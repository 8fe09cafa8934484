"""Loopback SSH "hosts": one sshd per 127.0.0.N address, reached as a non-root
sudo user (or root) with a test key, for ansible-playbook over real SSH.

Loopback hosts share the filesystem, process table and users with the
controller: each host gets its own directory, port and control sockets.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from harness.ansible import NODE_PYTHON
from harness.pg import free_port, process_gone

ADMIN_USER = "pgopsadm"
SUDOERS_FILE = f"/etc/sudoers.d/{ADMIN_USER}"
SSHD = "/usr/sbin/sshd"

_key_dir: str | None = None


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(cmd, **kw)


def key_dir() -> str:
    """Client key, host key and authorized_keys, made once per test session.

    sshd reads AuthorizedKeysFile as the target user, so the directory is
    0755 and authorized_keys 0644; the private keys stay 0600 (root).
    """
    global _key_dir
    if _key_dir is None:
        d = tempfile.mkdtemp(prefix="pgops-sshkeys-")
        os.chmod(d, 0o755)
        for name in ("client_ed25519", "host_ed25519"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pgops-test-{name}", "-f", os.path.join(d, name)])
        shutil.copyfile(os.path.join(d, "client_ed25519.pub"), os.path.join(d, "authorized_keys"))
        os.chmod(os.path.join(d, "authorized_keys"), 0o644)
        atexit.register(shutil.rmtree, d, True)
        _key_dir = d
    return _key_dir


def ensure_admin_user() -> None:
    """A non-root user with passwordless sudo (idempotent; safe if another test races us)."""
    if _run(["id", "-u", ADMIN_USER], check=False).returncode != 0:
        r = _run(["useradd", "--create-home", "--shell", "/bin/bash", ADMIN_USER], check=False)
        if r.returncode not in (0, 9):  # 9: created meanwhile by someone else
            raise RuntimeError(f"useradd {ADMIN_USER} failed: {r.stderr}")
    # useradd leaves the password locked ("!"); with UsePAM no, sshd refuses
    # locked accounts even for key logins. "*" means: no password, not locked.
    shadow = _run(["getent", "shadow", ADMIN_USER]).stdout.split(":")
    if shadow[1].startswith("!"):
        _run(["usermod", "-p", "*", ADMIN_USER])
    rule = f"{ADMIN_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n"
    try:
        with open(SUDOERS_FILE) as f:
            if f.read() == rule:
                return
    except FileNotFoundError:
        pass
    # Validated before it goes live, then renamed into place atomically.
    fd, tmp = tempfile.mkstemp(prefix=f".{ADMIN_USER}.", dir="/etc/sudoers.d")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(rule)
        os.chmod(tmp, 0o440)
        _run(["visudo", "-cf", tmp])
        os.rename(tmp, SUDOERS_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class SshHost:
    """One sshd on a loopback address: start(), inventory(), stop()."""

    def __init__(self, address: str = "127.0.0.2", port: int | None = None):
        # Only ever loopback: these hosts are the machine itself.
        if not address.startswith("127.") or len(address.split(".")) != 4:
            raise ValueError(f"SshHost only serves loopback 127.0.0.x addresses, not {address!r}")
        self.address = address
        self.port = port or free_port(address)
        self.dir = tempfile.mkdtemp(prefix=f"pgops-ssh-{address}-")
        self.config = os.path.join(self.dir, "sshd_config")
        self.pidfile = os.path.join(self.dir, "sshd.pid")
        self.log = os.path.join(self.dir, "sshd.log")
        self.control_dir = os.path.join(self.dir, "cm")
        os.makedirs(self.control_dir, mode=0o700)
        self.keys = key_dir()
        self.private_key = os.path.join(self.keys, "client_ed25519")
        self.pid: int | None = None

    def _write_config(self) -> None:
        lines = [
            f"ListenAddress {self.address}:{self.port}",
            f"PidFile {self.pidfile}",
            f"HostKey {self.keys}/host_ed25519",
            f"AuthorizedKeysFile {self.keys}/authorized_keys",
            "StrictModes no",  # keys live under /tmp
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            # PAM sessions (pam_loginuid) can fail without a real init; sudo uses its own PAM stack.
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {ADMIN_USER} root",
            "Subsystem sftp internal-sftp",  # Ansible's file transfer when pipelining is off
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "PrintMotd no",
            "LogLevel VERBOSE",
        ]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 20) -> SshHost:
        ensure_admin_user()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._write_config()
        # sshd daemonizes (stdio to /dev/null) and writes its pid file.
        r = _run([SSHD, "-f", self.config, "-E", self.log], check=False, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"sshd failed to start ({r.returncode}): {r.stderr}\n{self._log_tail()}")
        deadline = time.monotonic() + timeout
        while True:
            if self.pid is None:
                self.pid = self._read_pid()
            try:
                with socket.create_connection((self.address, self.port), timeout=1):
                    break
            except OSError:
                if self.pid is not None and process_gone(self.pid):
                    raise RuntimeError(f"sshd on {self.address}:{self.port} exited:\n{self._log_tail()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on {self.address}:{self.port} not accepting:\n{self._log_tail()}") from None
                time.sleep(0.05)
        while self.pid is None and time.monotonic() < deadline:
            time.sleep(0.05)
            self.pid = self._read_pid()
        return self

    def _read_pid(self) -> int | None:
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def _log_tail(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def common_args(self) -> str:
        # ControlPath here (not ~/.ansible/cp) so stop() can close the masters;
        # set in common args, Ansible adds no ControlPath of its own.
        return " ".join(
            [
                "-o StrictHostKeyChecking=no",
                "-o UserKnownHostsFile=/dev/null",
                "-o LogLevel=ERROR",
                "-o ControlMaster=auto",
                "-o ControlPersist=5s",
                f"-o ControlPath={self.control_dir}/%C",
            ]
        )

    def inventory(self, group: str = "postgresql", hostname: str = "db1", user: str = ADMIN_USER, **hostvars) -> str:
        """An INI inventory with this host in group."""
        hv = {
            "ansible_host": self.address,
            "ansible_port": self.port,
            "ansible_user": user,
            "ansible_ssh_private_key_file": self.private_key,
            "ansible_python_interpreter": NODE_PYTHON,
            "ansible_ssh_common_args": self.common_args(),
        }
        hv.update(hostvars)
        line = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in hv.items())
        return f"[{group}]\n{hostname} {line}\n"

    def ssh(self, command: str, user: str = ADMIN_USER, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command on the host over SSH (for checks outside Ansible)."""
        args = ["ssh", "-p", str(self.port), "-i", self.private_key, "-o", "BatchMode=yes", *shlex.split(self.common_args())]
        return _run([*args, f"{user}@{self.address}", command], check=False, timeout=timeout)

    def close_masters(self) -> None:
        for name in os.listdir(self.control_dir):
            path = os.path.join(self.control_dir, name)
            _run(["ssh", "-o", f"ControlPath={path}", "-O", "exit", self.address], check=False, timeout=10)

    def stop(self, timeout: float = 10) -> None:
        """Close control masters, stop sshd by its pid file, remove the host's files."""
        try:
            self.close_masters()
        finally:
            pid = self._read_pid() or self.pid
            if pid is not None and not process_gone(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while not process_gone(pid):
                    if time.monotonic() > deadline:
                        os.kill(pid, signal.SIGKILL)
                        break
                    time.sleep(0.05)
            shutil.rmtree(self.dir, ignore_errors=True)
