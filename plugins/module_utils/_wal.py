# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection's WAL archive: the program behind archive_command (push) and
restore_command (get), installed on database hosts by the pg_archiving role as
`pgops-wal`.

Standard library only (plus the compressor binaries of _layout): it runs once
per WAL segment, so it starts fast and never imports the database driver.

    archive_command = 'pgops-wal push --repository /backup/pg --cluster <sysid> %p'
    restore_command = 'pgops-wal get --repository /backup/pg --cluster <sysid> %f %p'

Push compresses the file into <repository>/wal/<system identifier>/<name>[.zst]
through a temporary name, fsyncs it, links it into place (never over an
existing file) and fsyncs the directory. A file already archived with the same
content is success (PostgreSQL retries after a crash); different content under
the same name is refused loudly and the archived file is left untouched.

Get finds the file (compressed or not), decompresses it to a temporary name and
renames it to %p, so %p never holds part of a file. Exit codes follow
PostgreSQL: 0 found, 1 not found (recovery ends or waits cleanly), 126 when the
archive cannot be read at all (recovery stops instead of ending early at an
older point than the user asked for).

With --host the repository is on another host reached over ssh, where
pgops-wal is installed too: push streams the compressed file to `pgops-wal put`
there, get reads it from `pgops-wal cat`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import subprocess
import sys
import tempfile

from ._errors import PgopsError
from ._files import fsync_dir
from ._layout import COMPRESSION, compression_of_file, compressor, decompressor, wal_dir

CHUNK = 1 << 20
# What PostgreSQL archives: segments, partial segments (a promotion's last one),
# backup history files and timeline history files.
WAL_FILE_RE = re.compile(r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$")
EXIT_FOUND, EXIT_MISSING, EXIT_UNREADABLE = 0, 1, 126
SUFFIXES = [""] + [spec[0] for spec in COMPRESSION.values() if spec[0]]


class WalError(PgopsError):
    pass


def check_name(name: str) -> str:
    if not WAL_FILE_RE.match(name or ""):
        raise WalError(f"{name!r} is not a WAL file name PostgreSQL archives (segment, .partial, .backup or .history)")
    return name


def stored(directory: str, name: str):
    """(path, compression) of the archived copy of name, or None."""
    for suffix in SUFFIXES:
        path = os.path.join(directory, name + suffix)
        if os.path.isfile(path):
            return path, compression_of_file(path)
    return None


def _pipe(cmd: list, stdin, stdout) -> None:
    proc = subprocess.run(cmd, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise WalError(f"{os.path.basename(cmd[0])} exited {proc.returncode}: {err}")


def content_digest(path: str) -> str:
    """sha256 of what path holds once decompressed."""
    h = hashlib.sha256()
    dec = decompressor(path)
    with open(path, "rb") as f:
        if dec is None:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
            return h.hexdigest()
        proc = subprocess.Popen(dec, stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for chunk in iter(lambda: proc.stdout.read(CHUNK), b""):
            h.update(chunk)
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise WalError(f"cannot read the archived {path}: {dec[0]} exited {proc.returncode}: {err.decode().strip()}")
    return h.hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_or_refuse(existing: str, name: str, digest: str) -> str:
    if content_digest(existing) == digest:
        return f"{name} was already archived with the same content ({existing})"
    raise WalError(
        f"{existing} already holds a different {name}: refusing to overwrite it. Two clusters may be archiving into one "
        "place (check --cluster), or the archive was tampered with; investigate before archiving continues"
    )


def store(directory: str, name: str, fill, digest: str, compression: str) -> str:
    """Write name into directory through a temporary file (fill(fd) writes the
    stored bytes), fsynced, linked into place, the directory fsynced."""
    old = stored(directory, name)
    if old:
        return _same_or_refuse(old[0], name, digest)
    final = os.path.join(directory, name + COMPRESSION[compression][0])
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        fill(fd)
        os.fsync(fd)
        os.close(fd)
        fd = None
        try:
            os.link(tmp, final)  # never replaces: a concurrent push of the same name shows up here
        except FileExistsError:
            return _same_or_refuse(final, name, digest)
        fsync_dir(directory)
        return f"archived {name} as {final}"
    finally:
        if fd is not None:
            os.close(fd)
        os.unlink(tmp)


def ensure_wal_dir(repository: str, cluster: str) -> str:
    """<repository>/wal/<cluster> (0700); the repository itself must exist: a missing one is a typo."""
    if not os.path.isdir(repository):
        raise WalError(f"repository {repository} does not exist: create it (the backup role does), or fix the path")
    directory = wal_dir(repository, cluster)
    _private_dirs([os.path.dirname(directory), directory])
    return directory


def _private_dirs(paths: list) -> None:
    """Each directory, made 0700 when it is new (WAL holds every row of the cluster)."""
    for path in paths:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass


def push_local(source: str, repository: str, cluster: str, compression: str, level=None) -> str:
    name = check_name(os.path.basename(source))
    directory = ensure_wal_dir(repository, cluster)
    digest = file_digest(source)
    cmd = compressor(compression, level, threads=1)

    def fill(fd):
        with open(source, "rb") as src:
            if cmd:
                _pipe(cmd, src, fd)
            else:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    os.write(fd, chunk)

    return store(directory, name, fill, digest, compression)


def put(directory: str, name: str, compression: str, digest: str) -> str:
    """The repository host's side of a push: stdin holds the stored (compressed) bytes."""
    check_name(name)
    directory = directory.rstrip("/")
    repository = os.path.dirname(os.path.dirname(directory))
    if not os.path.isdir(repository):
        raise WalError(f"repository {repository} does not exist on this host: create it (the archiving role does)")
    _private_dirs([os.path.dirname(directory), directory])

    def fill(fd):
        for chunk in iter(lambda: sys.stdin.buffer.read(CHUNK), b""):
            os.write(fd, chunk)

    return store(directory, name, fill, digest, compression)


def get_local(repository: str, cluster: str, name: str, target: str) -> bool:
    check_name(name)
    directory = wal_dir(repository, cluster)
    if not os.path.isdir(os.path.dirname(directory)):
        raise WalError(f"the WAL archive {os.path.dirname(directory)} does not exist or cannot be read")
    found = stored(directory, name)
    if found is None:
        return False
    path, _compression = found
    with open(path, "rb") as src:
        _deliver(target, lambda fd: _decompress(path, src, fd))
    return True


def _decompress(path: str, src, fd) -> None:
    dec = decompressor(path)
    if dec:
        _pipe(dec, src, fd)
    else:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            os.write(fd, chunk)


def _deliver(target: str, fill) -> None:
    """Write target through a temporary name beside it: %p never holds part of a file."""
    fd, tmp = tempfile.mkstemp(prefix=".pgops-wal-", dir=os.path.dirname(os.path.abspath(target)))
    try:
        fill(fd)
        os.close(fd)
        fd = None
        os.rename(tmp, target)
        tmp = None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            os.unlink(tmp)


def cat(directory: str, name: str) -> int:
    """The repository host's side of a get: the decompressed file on stdout."""
    check_name(name)
    if not os.path.isdir(directory):
        return EXIT_UNREADABLE if not os.path.isdir(os.path.dirname(directory)) else EXIT_MISSING
    found = stored(directory, name)
    if found is None:
        return EXIT_MISSING
    sys.stdout.flush()
    with open(found[0], "rb") as src:
        _decompress(found[0], src, sys.stdout.buffer.fileno())
    return EXIT_FOUND


# -- over ssh


def ssh_command(host: str, port: int, options: list, remote: list) -> list:
    # BatchMode: an archive command can never answer a password prompt.
    return ["ssh", "-o", "BatchMode=yes", "-p", str(port), *options, host, "--", " ".join(shlex.quote(a) for a in remote)]


def push_remote(source, host, port, options, program, repository, cluster, compression, level=None) -> str:
    name = check_name(os.path.basename(source))
    digest = file_digest(source)
    remote = [program, "put", "--dir", wal_dir(repository, cluster), "--name", name, "--compression", compression,
              "--sha256", digest]  # fmt: skip
    cmd = compressor(compression, level, threads=1)
    with open(source, "rb") as src:
        if cmd:
            comp = subprocess.Popen(cmd, stdin=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            ssh = subprocess.run(ssh_command(host, port, options, remote), stdin=comp.stdout, capture_output=True, check=False)
            comp.stdout.close()
            _out, comp_err = comp.communicate()
            if comp.returncode != 0:
                raise WalError(f"{cmd[0]} exited {comp.returncode}: {comp_err.decode().strip()}")
        else:
            ssh = subprocess.run(ssh_command(host, port, options, remote), stdin=src, capture_output=True, check=False)
    if ssh.returncode != 0:
        raise WalError(f"pushing {name} to {host} failed (exit {ssh.returncode}): {ssh.stderr.decode().strip()}")
    return ssh.stdout.decode().strip()


def get_remote(host, port, options, program, repository, cluster, name, target) -> int:
    check_name(name)
    remote = [program, "cat", "--dir", wal_dir(repository, cluster), "--name", name]
    result = {}

    def fill(fd):
        proc = subprocess.run(ssh_command(host, port, options, remote), stdout=fd, stderr=subprocess.PIPE, check=False)
        result.update(rc=proc.returncode, err=proc.stderr.decode("utf-8", "replace").strip())
        if proc.returncode != 0:
            raise WalError(result["err"])

    try:
        _deliver(target, fill)
    except WalError:
        if result.get("rc") == EXIT_MISSING:
            return EXIT_MISSING
        raise
    return EXIT_FOUND


# -- the command line


def read_system_identifier(data_directory: str = ".") -> str:
    """The cluster's system identifier: the first 8 bytes of global/pg_control (PostgreSQL runs
    archive_command in the data directory)."""
    with open(os.path.join(data_directory, "global", "pg_control"), "rb") as f:
        return str(int.from_bytes(f.read(8), "little"))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pgops-wal", description="pgops.online_backup's WAL archive and restore commands")
    sub = ap.add_subparsers(dest="command", required=True)

    def where(p):
        p.add_argument("--repository", required=True, help="the backup repository (absolute path)")
        p.add_argument("--cluster", help="the cluster's system identifier (default: read from global/pg_control)")
        p.add_argument("--host", help="[user@]host of a repository host reached over ssh")
        p.add_argument("--ssh-port", type=int, default=22)
        p.add_argument("--ssh-option", action="append", default=[], help="one ssh argument (repeat, in order)")
        p.add_argument("--remote-program", default="pgops-wal", help="pgops-wal on the repository host")

    push = sub.add_parser("push", help="archive_command: push %%p")
    where(push)
    push.add_argument("--compression", default="zstd", choices=list(COMPRESSION))
    push.add_argument("--level", type=int)
    push.add_argument("path")
    get = sub.add_parser("get", help="restore_command: get %%f %%p")
    where(get)
    get.add_argument("--errors-as-missing", action="store_true", help="a standby: an unreadable archive means 'not there yet'")
    get.add_argument("name")
    get.add_argument("target")
    put_p = sub.add_parser("put", help="(repository host) store stdin as name")
    put_p.add_argument("--dir", required=True)
    put_p.add_argument("--name", required=True)
    put_p.add_argument("--compression", required=True, choices=list(COMPRESSION))
    put_p.add_argument("--sha256", required=True)
    cat_p = sub.add_parser("cat", help="(repository host) write name, decompressed, to stdout")
    cat_p.add_argument("--dir", required=True)
    cat_p.add_argument("--name", required=True)
    return ap


def _ssh_options(args) -> list:
    return list(args.ssh_option)  # one ssh argument each, in order: --ssh-option=-i --ssh-option=/path/key


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    err = sys.stderr
    try:
        if args.command == "put":
            sys.stdout.write(put(args.dir, args.name, args.compression, args.sha256) + "\n")
            return 0
        if args.command == "cat":
            return cat(args.dir, args.name)
        if not os.path.isabs(args.repository):
            raise WalError(f"--repository must be an absolute path, got {args.repository!r}")
        cluster = args.cluster or read_system_identifier()
        if args.command == "push":
            if args.host:
                msg = push_remote(args.path, args.host, args.ssh_port, _ssh_options(args), args.remote_program,
                                  args.repository, cluster, args.compression, args.level)  # fmt: skip
            else:
                msg = push_local(args.path, args.repository, cluster, args.compression, args.level)
            if msg.startswith(check_name(os.path.basename(args.path)) + " was already"):
                err.write(f"pgops-wal: {msg}\n")  # worth a line in the server log: a retry after a crash
            return 0
        try:
            if args.host:
                return get_remote(args.host, args.ssh_port, _ssh_options(args), args.remote_program, args.repository,
                                  cluster, args.name, args.target)  # fmt: skip
            return EXIT_FOUND if get_local(args.repository, cluster, args.name, args.target) else EXIT_MISSING
        except (PgopsError, OSError) as e:
            err.write(f"pgops-wal: cannot get {args.name}: {e}\n")
            return EXIT_MISSING if args.errors_as_missing else EXIT_UNREADABLE
    except (PgopsError, OSError) as e:
        err.write(f"pgops-wal: {args.command} failed: {e}\n")
        return 1
