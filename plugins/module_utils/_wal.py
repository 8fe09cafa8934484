# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection's WAL archive: the program behind archive_command (push) and
restore_command (get), installed on database hosts by the pg_archiving role as
`pgops-wal`.

Standard library only (plus the compressor binaries of _layout): it runs once
per WAL segment, so it starts fast and never imports the database driver.

    archive_command = 'pgops-wal push --repository /backup/pg --cluster <sysid> %p'
    restore_command = 'pgops-wal get --repository /backup/pg --cluster <sysid> %f %p'
    archive_command = 'pgops-wal push --repository s3://bucket/pg --s3-config /etc/pgops/s3.json %p'

Push compresses the file into <repository>/wal/<system identifier>/<name>[.zst]
through a temporary name, fsyncs it, links it into place (never over an
existing file) and fsyncs the directory. A file already archived with the same
content is success (PostgreSQL retries after a crash); different content under
the same name is refused loudly and the archived file is left untouched.

With --age-recipient, push encrypts with age after compressing (<name>.zst.age)
and writes the plain content's sha256 beside it (<name>.zst.age.sha256), so a
second push compares without the private key. Get decrypts with
--age-identity-file.

Get finds the file (compressed, encrypted or not), decodes it to a temporary
name and renames it to %p, so %p never holds part of a file. Exit codes follow
PostgreSQL: 0 found, 1 not found (recovery ends or waits cleanly), 126 when the
archive cannot be read at all (recovery stops instead of ending early at an
older point than the user asked for).

With --host the repository is on another host reached over ssh, where
pgops-wal is installed too: push streams the stored bytes to `pgops-wal put`
there, get reads them from `pgops-wal cat` and decodes them here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

from ._errors import PgopsError
from ._files import fsync_dir, write_all
from ._layout import (
    AGE_SUFFIX,
    COMPRESSION,
    DIGEST_SUFFIX,
    STORED_SUFFIXES,
    LayoutError,
    PlainReader,
    compression_of_file,
    compressor,
    encryptor,
    is_encrypted,
    read_commands,
    run_pipeline,
    set_age_identity,
    wal_dir,
)

# subprocess, not run_command (ansible-core 2.21's pylint check ansible-bad-function): pgops-wal (the
# archive_command, no AnsibleModule) streams WAL through its compressor.
# pylint: disable=ansible-bad-function

CHUNK = 1 << 20
# What PostgreSQL archives: segments, partial segments (a promotion's last one),
# backup history files and timeline history files.
WAL_FILE_RE = re.compile(r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$")
EXIT_FOUND, EXIT_MISSING, EXIT_UNREADABLE = 0, 1, 126
# The repository host's cat says "not there" with a code of its own: 1 is also what a Python error or
# an error in words exits with, and taking those for "missing" would end a recovery early.
CAT_MISSING = 3


class WalError(PgopsError):
    pass


def check_name(name: str) -> str:
    if not WAL_FILE_RE.match(name or ""):
        raise WalError(f"{name!r} is not a WAL file name PostgreSQL archives (segment, .partial, .backup or .history)")
    return name


def stored(directory: str, name: str):
    """(path, compression) of the archived copy of name, or None."""
    for suffix in STORED_SUFFIXES:
        path = os.path.join(directory, name + suffix)
        if os.path.isfile(path):
            return path, compression_of_file(path)
    return None


def _pipeline(cmds: list, stdin, stdout) -> None:
    """cmds piped from stdin to stdout; with no command, a plain copy."""
    if not cmds:
        src = stdin if hasattr(stdin, "read") else os.fdopen(os.dup(stdin), "rb")
        for chunk in iter(lambda: src.read(CHUNK), b""):
            write_all(stdout if isinstance(stdout, int) else stdout.fileno(), chunk)
        return
    try:
        run_pipeline(cmds, stdin, stdout)
    except LayoutError as e:
        raise WalError(str(e)) from None


def content_digest(path: str) -> str:
    """sha256 of what path holds once decrypted and decompressed (for an encrypted file: what
    the digest file beside it says)."""
    if is_encrypted(path):
        try:
            with open(path + DIGEST_SUFFIX) as f:
                return f.read().strip()
        except FileNotFoundError:
            raise WalError(
                f"{path} is encrypted and {os.path.basename(path)}{DIGEST_SUFFIX} is missing beside it, so a second "
                "push cannot be compared with it; investigate (restore it, or remove both if the file is bad)"
            ) from None
    h = hashlib.sha256()
    try:
        with PlainReader(path) as stream:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                h.update(chunk)
    except LayoutError as e:
        raise WalError(f"cannot read the archived {path}: {e}") from None
    return h.hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _different(where: str, name: str) -> WalError:
    """The refusal of a push whose name the archive holds with other content (never overwritten)."""
    return WalError(
        f"{where} already holds a different {name}: refusing to overwrite it. Two clusters may be archiving into one "
        "place (check --cluster), or the archive was tampered with; investigate before archiving continues"
    )


def _same_or_refuse(existing: str, name: str, digest: str) -> str:
    if content_digest(existing) == digest:
        return f"{name} was already archived with the same content ({existing})"
    raise _different(existing, name)


def store(directory: str, name: str, fill, digest: str, compression: str, encrypted: bool = False) -> str:
    """Write name into directory through a temporary file (fill(fd) writes the
    stored bytes; it raises when they are not all there), fsynced, linked into
    place, the directory fsynced."""
    old = stored(directory, name)
    if old:
        return _same_or_refuse(old[0], name, digest)
    final = os.path.join(directory, name + COMPRESSION[compression][0] + (AGE_SUFFIX if encrypted else ""))
    if encrypted:
        # Claimed before the file itself and never replaced: the first push of a name decides what
        # its digest says, so a concurrent push of other content is refused, not believed.
        if _claim_digest(final + DIGEST_SUFFIX, digest) is not None:
            raise _different(final + DIGEST_SUFFIX, name)
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


def _claim_digest(path: str, digest: str) -> str | None:
    """Link path holding digest unless it exists: None when this call made it (or it already says
    the same), else what it says."""
    fd, tmp = tempfile.mkstemp(prefix=".digest.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        try:
            write_all(fd, digest.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            fsync_dir(os.path.dirname(path))
            return None
        except FileExistsError:
            with open(path) as f:
                theirs = f.read().strip()
            return None if theirs == digest else theirs
    finally:
        os.unlink(tmp)


def ensure_wal_dir(repository: str, cluster: str) -> str:
    """<repository>/wal/<cluster> (0700); the repository itself must exist: a missing one is a typo."""
    if not os.path.isdir(repository):
        raise WalError(f"repository {repository} does not exist: create it (the backup role does), or fix the path")
    directory = wal_dir(repository, cluster)
    _private_dirs([os.path.dirname(directory), directory])
    return directory


def _private_dirs(paths: list) -> None:
    """Each directory, made 0700 when it is new (WAL holds every row of the cluster), and its
    parent flushed: a segment fsynced into a directory that a crash forgets is lost too."""
    for path in paths:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        fsync_dir(os.path.dirname(path))


def store_commands(compression: str, level, recipients) -> list:
    """Compress, then encrypt when there are recipients (WalError before anything is written
    when a tool or a key is missing: nothing goes to the archive in clear by mistake)."""
    try:
        return [
            cmd for cmd in (compressor(compression, level, threads=1), encryptor("age", recipients) if recipients else []) if cmd
        ]
    except LayoutError as e:
        raise WalError(str(e)) from None


def push_local(source: str, repository: str, cluster: str, compression: str, level=None, recipients=None) -> str:
    name = check_name(os.path.basename(source))
    cmds = store_commands(compression, level, recipients)
    directory = ensure_wal_dir(repository, cluster)
    digest = file_digest(source)

    def fill(fd):
        with open(source, "rb") as src:
            _pipeline(cmds, src, fd)

    return store(directory, name, fill, digest, compression, encrypted=bool(recipients))


def put(
    directory: str, name: str, compression: str, digest: str, stored_sha256: str, stored_size: int, encrypted: bool = False
) -> str:
    """The repository host's side of a push: stdin holds the stored (compressed, maybe encrypted) bytes,
    stored_size of them with sha256 stored_sha256: anything else (a stream cut off by a dead
    compressor or a dropped connection) is refused before it is linked into place."""
    check_name(name)
    directory = directory.rstrip("/")
    repository = os.path.dirname(os.path.dirname(directory))
    if not os.path.isdir(repository):
        raise WalError(f"repository {repository} does not exist on this host: create it (the archiving role does)")
    _private_dirs([os.path.dirname(directory), directory])

    def fill(fd):
        h, size = hashlib.sha256(), 0
        for chunk in iter(lambda: sys.stdin.buffer.read(CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
            write_all(fd, chunk)
        if size != stored_size or h.hexdigest() != stored_sha256:
            raise WalError(
                f"received {size} bytes of {name} (sha256 {h.hexdigest()[:12]}...), the sender stored {stored_size} "
                f"(sha256 {stored_sha256[:12]}...): the stream was cut off or damaged; nothing was stored"
            )

    return store(directory, name, fill, digest, compression, encrypted)


def get_local(repository: str, cluster: str, name: str, target: str) -> bool:
    check_name(name)
    directory = wal_dir(repository, cluster)
    if not os.path.isdir(os.path.dirname(directory)):
        raise WalError(f"the WAL archive {os.path.dirname(directory)} does not exist or cannot be read")
    found = stored(directory, name)
    if found is None:
        return False
    path, _compression = found
    cmds = _decode_commands(path)
    with open(path, "rb") as src:
        _deliver(target, lambda fd: _pipeline(cmds, src, fd))
    return True


def _decode_commands(stored_name: str) -> list:
    """What turns the stored bytes (on stdin) of stored_name back into the WAL file."""
    try:
        return read_commands(stored_name, stdin=True)
    except LayoutError as e:
        raise WalError(str(e)) from None


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
    """The repository host's side of a get: a line with the stored file's name, then its stored
    bytes (the database host decrypts and decompresses: the key never has to be here)."""
    check_name(name)
    if not os.path.isdir(directory):
        return EXIT_UNREADABLE if not os.path.isdir(os.path.dirname(directory)) else CAT_MISSING
    found = stored(directory, name)
    if found is None:
        return CAT_MISSING
    out = sys.stdout.buffer
    out.write(os.path.basename(found[0]).encode() + b"\n")
    with open(found[0], "rb") as src:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            out.write(chunk)
    out.flush()
    return EXIT_FOUND


# -- over ssh


def ssh_command(host: str, port: int, options: list, remote: list) -> list:
    # BatchMode: an archive command can never answer a password prompt.
    return ["ssh", "-o", "BatchMode=yes", "-p", str(port), *options, host, "--", " ".join(shlex.quote(a) for a in remote)]


def push_remote(source, host, port, options, program, repository, cluster, compression, level=None, recipients=None) -> str:
    name = check_name(os.path.basename(source))
    cmds = store_commands(compression, level, recipients)
    digest = file_digest(source)
    # The stored bytes are made here first (one segment): the repository host checks it received all
    # of them, so a compressor or encryptor that dies midway can never leave a short file there.
    with open(source, "rb") as src, tempfile.TemporaryFile() as stored_bytes, tempfile.TemporaryFile() as out:
        _pipeline(cmds, src, stored_bytes.fileno())
        stored_bytes.seek(0)
        h, size = hashlib.sha256(), 0
        for chunk in iter(lambda: stored_bytes.read(CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
        stored_bytes.seek(0)
        remote = [
            program,
            "put",
            "--dir",
            wal_dir(repository, cluster),
            "--name",
            name,
            "--compression",
            compression,
            "--sha256",
            digest,
            "--stored-sha256",
            h.hexdigest(),
            "--stored-size",
            str(size),
        ]
        remote += ["--encrypted"] if recipients else []  # fmt: skip
        try:
            run_pipeline([ssh_command(host, port, options, remote)], stored_bytes, out)
        except LayoutError as e:
            raise WalError(f"pushing {name} to {host} failed: {e}") from None
        out.seek(0)
        return out.read().decode("utf-8", "replace").strip()


def get_remote(host, port, options, program, repository, cluster, name, target) -> int:
    check_name(name)
    remote = [program, "cat", "--dir", wal_dir(repository, cluster), "--name", name]
    result = {}

    def fill(fd):
        # Unbuffered: the first line (the stored name) is read here, the rest goes to the decoders.
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(ssh_command(host, port, options, remote), stdout=subprocess.PIPE, stderr=err, bufsize=0)
            try:
                header = b""
                while not header.endswith(b"\n"):
                    byte = proc.stdout.read(1)
                    if not byte:
                        break
                    header += byte
                if header.endswith(b"\n"):
                    stored_name = header.decode("utf-8", "replace").strip()
                    if stored_name.split(".")[0] != name.split(".")[0]:
                        raise WalError(f"{host} answered with {stored_name!r} for {name}: is pgops-wal there the same version?")
                    _pipeline(_decode_commands(stored_name), proc.stdout, fd)
            finally:
                proc.stdout.close()
                proc.wait()
            err.seek(0)
            result.update(rc=proc.returncode, err=err.read().decode("utf-8", "replace").strip())
        if proc.returncode != 0:
            raise WalError(result["err"] or f"ssh exited {proc.returncode}")
        if not header.endswith(b"\n"):
            raise WalError(f"{host} sent nothing for {name}")

    try:
        _deliver(target, fill)
    except WalError:
        if result.get("rc") == CAT_MISSING:
            return EXIT_MISSING
        raise
    return EXIT_FOUND


# -- in an S3 bucket (the same names under s3://bucket/prefix/wal/<system identifier>/)


def s3_store(repository: str, config_file: str | None):
    """The Store of an s3:// repository; its settings (endpoint, region, keys: never in argv,
    which pg_settings shows) from a JSON file of the s3_* options, else AWS's own chain."""
    from ._s3 import Store, config_from_params  # only S3 repositories need boto3

    params = {}
    if config_file:
        try:
            with open(config_file) as f:
                params = json.load(f)
        except (OSError, ValueError) as e:
            raise WalError(f"cannot read the S3 settings {config_file}: {e}") from None
    return Store(repository, config_from_params(params))


def _s3_wal_prefix(cluster: str) -> str:
    return wal_dir("", cluster).lstrip("/") + "/"


def stored_s3(store, cluster: str, name: str):
    """The path (relative to the repository) of name's archived copy in the bucket, or None."""
    prefix = _s3_wal_prefix(cluster) + name
    present = {path for path, _size in store.list(prefix)}
    for suffix in STORED_SUFFIXES:
        if prefix + suffix in present:
            return prefix + suffix
    return None


def _s3_digest(store, rel: str) -> str:
    if is_encrypted(rel):
        text = store.get_bytes(rel + DIGEST_SUFFIX)
        if text is None:
            raise WalError(f"{store.uri(rel)} is encrypted and its {DIGEST_SUFFIX} is missing: investigate")
        return text.decode().strip()
    with tempfile.TemporaryDirectory(prefix=".pgops-wal-") as tmp:
        local = os.path.join(tmp, os.path.basename(rel))  # the name says how to decode it
        store.download(rel, local)
        return content_digest(local)


def _s3_same_or_refuse(store, rel: str, name: str, digest: str) -> str:
    if _s3_digest(store, rel) == digest:
        return f"{name} was already archived with the same content ({store.uri(rel)})"
    raise _different(store.uri(rel), name)


def push_s3(source: str, store, cluster: str, compression: str, level=None, recipients=None) -> str:
    name = check_name(os.path.basename(source))
    cmds = store_commands(compression, level, recipients)
    digest = file_digest(source)
    old = stored_s3(store, cluster, name)
    if old:
        return _s3_same_or_refuse(store, old, name, digest)
    rel = _s3_wal_prefix(cluster) + name + COMPRESSION[compression][0] + (AGE_SUFFIX if recipients else "")
    with open(source, "rb") as src, tempfile.TemporaryFile() as out:
        _pipeline(cmds, src, out.fileno())
        out.seek(0)
        data = out.read()  # one segment (16 MB by default): one PUT, no multipart
    if recipients and not store.put_bytes(rel + DIGEST_SUFFIX, digest.encode() + b"\n", if_none_match=True):
        # Claimed before the object and never replaced: a concurrent push of other content is refused.
        if (store.get_bytes(rel + DIGEST_SUFFIX) or b"").decode().strip() != digest:
            raise _different(store.uri(rel + DIGEST_SUFFIX), name)
    # Conditional: a concurrent push of the same name (or a retried PUT) shows up here, never overwrites.
    if not store.put_bytes(rel, data, if_none_match=True):
        return _s3_same_or_refuse(store, rel, name, digest)
    return f"archived {name} as {store.uri(rel)}"


def get_s3(store, cluster: str, name: str, target: str) -> bool:
    check_name(name)
    rel = stored_s3(store, cluster, name)
    if rel is None:
        return False
    cmds = _decode_commands(rel)

    def fill(fd):
        with tempfile.TemporaryFile() as stored_bytes:
            store.download(rel, stored_bytes.fileno())
            stored_bytes.seek(0)
            _pipeline(cmds, stored_bytes, fd)

    _deliver(target, fill)
    return True


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
        p.add_argument("--s3-config", help="JSON file of the s3_* settings of an s3:// repository (keys never in argv)")

    push = sub.add_parser("push", help="archive_command: push %%p")
    where(push)
    push.add_argument("--compression", default="zstd", choices=list(COMPRESSION))
    push.add_argument("--level", type=int)
    push.add_argument("--age-recipient", action="append", default=[], help="encrypt with age for this public key (repeat)")
    push.add_argument("path")
    get = sub.add_parser("get", help="restore_command: get %%f %%p")
    where(get)
    get.add_argument("--errors-as-missing", action="store_true", help="a standby: an unreadable archive means 'not there yet'")
    get.add_argument("--age-identity-file", help="the age private key that decrypts encrypted WAL")
    get.add_argument("name")
    get.add_argument("target")
    check_p = sub.add_parser("check", help="the archive is reachable and writable (an s3:// bucket: credentials, bucket)")
    where(check_p)
    put_p = sub.add_parser("put", help="(repository host) store stdin as name")
    put_p.add_argument("--dir", required=True)
    put_p.add_argument("--name", required=True)
    put_p.add_argument("--compression", required=True, choices=list(COMPRESSION))
    put_p.add_argument("--sha256", required=True, help="sha256 of the segment itself")
    put_p.add_argument("--stored-sha256", required=True, help="sha256 of the bytes on stdin")
    put_p.add_argument("--stored-size", required=True, type=int, help="how many bytes stdin holds")
    put_p.add_argument("--encrypted", action="store_true", help="stdin is age-encrypted (stored as .age)")
    cat_p = sub.add_parser("cat", help="(repository host) write the stored name, a newline and its stored bytes to stdout")
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
            msg = put(args.dir, args.name, args.compression, args.sha256, args.stored_sha256, args.stored_size, args.encrypted)
            sys.stdout.write(msg + "\n")
            return 0
        if args.command == "cat":
            try:
                return cat(args.dir, args.name)
            except (PgopsError, OSError) as e:
                err.write(f"pgops-wal: cat failed: {e}\n")
                return EXIT_UNREADABLE
        s3 = args.repository.startswith("s3://")
        if not (s3 or os.path.isabs(args.repository)):
            raise WalError(f"--repository must be an absolute path or an s3:// URL, got {args.repository!r}")
        if s3 and args.host:
            raise WalError("--host is for a repository on another host over ssh, not for an s3:// repository")
        if args.command == "check":
            if s3:
                s3_store(args.repository, args.s3_config).check()
            elif not args.host and not os.path.isdir(args.repository):
                raise WalError(f"repository {args.repository} does not exist")
            sys.stdout.write(f"{args.repository} is reachable\n")
            return 0
        cluster = args.cluster or read_system_identifier()
        if args.command == "push":
            if s3:
                msg = push_s3(args.path, s3_store(args.repository, args.s3_config), cluster, args.compression, args.level,
                              args.age_recipient)  # fmt: skip
            elif args.host:
                msg = push_remote(args.path, args.host, args.ssh_port, _ssh_options(args), args.remote_program,
                                  args.repository, cluster, args.compression, args.level, args.age_recipient)  # fmt: skip
            else:
                msg = push_local(args.path, args.repository, cluster, args.compression, args.level, args.age_recipient)
            if msg.startswith(check_name(os.path.basename(args.path)) + " was already"):
                err.write(f"pgops-wal: {msg}\n")  # worth a line in the server log: a retry after a crash
            return 0
        try:
            set_age_identity(args.age_identity_file)
            if s3:
                found = get_s3(s3_store(args.repository, args.s3_config), cluster, args.name, args.target)
                return EXIT_FOUND if found else EXIT_MISSING
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
