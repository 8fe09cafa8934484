# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where a repository's files live: a directory (FileStorage) or an S3 bucket
(S3Storage), behind the few operations the catalog needs; and a directory on a
repository host reached over ssh (SshStorage), for what a restore or a
verification on another host reads. Paths are relative to the repository
("20261201T101500Z/backup.json", ".locks/7312.lock"); the names and formats
themselves are _layout's.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

from ._errors import PgopsError
from ._files import ensure_private_dir, fsync_dir, read_json, write_json, write_private_file
from ._layout import (
    BACKUP_JSON,
    COPY_ENTRIES,
    LABEL_FILES,
    MANIFEST,
    RSYNC_DATA,
    RSYNC_TABLESPACES,
    disk_usage,
    parse_archive_name,
    read_backup,
    update_backup,
    valid_backup_id,
    write_backup,
)
from ._manifest import write_backup_manifest
from ._remote import Remote

# subprocess, not run_command (ansible-core 2.21's pylint check ansible-bad-function): ssh streams to and from
# the repository host are Popen pipelines.
# pylint: disable=ansible-bad-function


class StorageError(PgopsError):
    pass


# The backup's files that are downloaded whole to read them (backup.json, the label files, the manifest).
SMALL_FILE = 64 * 1024 * 1024
# What a restore reads of an rsync backup's data/ before it copies the directory: the version, the port, the map.
RSYNC_PEEK = ("PG_VERSION", "postgresql.conf", "postgresql.auto.conf", "tablespace_map")
# The options of a module that reads a repository on another host over ssh (doc fragment repository_host).
SSH_OPTION_SPEC = {
    "repository_host": {"type": "str"},
    "ssh_port": {"type": "int", "default": 22},
    "ssh_options": {"type": "list", "elements": "str", "default": []},
}


class FileStorage:
    """A repository in a directory of this host."""

    kind = "file"

    def __init__(self, root: str):
        self.root = root.rstrip("/") or "/"
        self.url = self.root

    def path(self, rel: str = "") -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel))

    def list_dir(self, rel: str = "") -> list:
        try:
            return sorted(os.listdir(self.path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def backup_ids(self) -> list:
        return [n for n in self.list_dir() if valid_backup_id(n) and os.path.isdir(self.path(n))]

    def read_backup(self, backup_id: str) -> dict | None:
        return read_backup(self.path(backup_id))

    def write_backup(self, backup_id: str, info: dict) -> None:
        write_backup(self.path(backup_id), info)

    def has_backup_json(self, backup_id: str) -> bool:
        return os.path.isfile(os.path.join(self.path(backup_id), BACKUP_JSON))

    def read_json(self, rel: str):
        return read_json(self.path(rel))

    def write_file(self, rel: str, data: bytes) -> None:
        write_private_file(self.path(rel), data)

    def write_manifest(self, backup_id: str, info: dict, algorithm: str) -> dict:
        path = self.path(backup_id)
        return write_backup_manifest(path, info, algorithm, os.path.join(path, COPY_ENTRIES))

    def claim(self, rel: str, doc: dict) -> bool:
        """Create rel holding doc only if it does not exist (written in full first, then linked)."""
        path = self.path(rel)
        ensure_private_dir(os.path.dirname(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
        os.close(fd)
        try:
            write_json(tmp, doc)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def mtime(self, rel: str) -> float | None:
        try:
            return os.stat(self.path(rel)).st_mtime
        except OSError:
            return None

    def newest_mtime(self, rel: str) -> float:
        """Newest mtime of a directory and the files right in it (a backup's are written as the run goes)."""
        newest = self.mtime(rel) or 0.0
        try:
            with os.scandir(self.path(rel)) as it:
                for entry in it:
                    try:
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                    except OSError:
                        continue
        except OSError:
            pass
        return newest

    def delete(self, rel: str) -> None:
        try:
            os.unlink(self.path(rel))
        except FileNotFoundError:
            pass

    def delete_if(self, rel: str, doc: dict) -> bool:
        """Remove rel only while it still holds doc (a stale lock judged by what it said): it is
        moved aside atomically first, and put back when it turns out to be a newer one."""
        path = self.path(rel)
        aside = f"{path}.{os.getpid()}.{threading.get_ident()}.stale"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True  # someone else removed it
        try:
            if read_json(aside) == doc:
                return True
            try:
                os.link(aside, path)  # a newer lock taken meanwhile: back in place, unless yet another exists
            except FileExistsError:
                pass
            return False
        finally:
            os.unlink(aside)

    def delete_tree(self, rel: str) -> None:
        """Remove a backup's directory. It is renamed aside first, so a removal that fails half way
        never leaves a backup.json that still says complete over half the files."""
        path = self.path(rel)
        aside = os.path.join(os.path.dirname(path), f".removing-{os.path.basename(path)}-{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # gone already (another host's retention of the same cluster got there first)
        errors = []
        if sys.version_info >= (3, 12):
            shutil.rmtree(aside, onexc=lambda _f, p, e: errors.append(f"{p}: {e}"))
        else:
            shutil.rmtree(aside, onerror=lambda _f, p, e: errors.append(f"{p}: {e[1]}"))
        if errors:
            raise StorageError(
                f"{rel} was set aside as {aside} but could not be removed: {errors[0]} ({len(errors)} error(s)); "
                "it is no longer listed as a backup: remove that directory by hand"
            )

    def delete_payload(self, backup_id: str) -> list:
        """Everything of a backup but its backup.json."""
        removed = []
        for name in self.list_dir(backup_id):
            if name == BACKUP_JSON:
                continue
            target = os.path.join(self.path(backup_id), name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.unlink(target)
            removed.append(name)
        return removed

    def tree_size(self, rel: str) -> int:
        return disk_usage(self.path(rel))

    def abandon(self, backup_id: str) -> None:
        """A dead run's unfinished writes: a directory has none that outlive the run."""

    def files(self, rel: str) -> list:
        """[(name, mtime)] of the regular files right in directory rel."""
        out = []
        for name in self.list_dir(rel):
            try:
                st = os.stat(os.path.join(self.path(rel), name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((name, st.st_mtime))
        return out

    def delete_files(self, rel: str, names: list) -> None:
        for name in names:
            self.delete(os.path.join(rel, name))
        if names:
            fsync_dir(self.path(rel))


class S3Storage:
    """A repository at s3://bucket/prefix: the same names as on disk, one object per file."""

    kind = "s3"

    def __init__(self, url: str, config: dict | None = None):
        from ._s3 import Store  # boto3 only for S3 repositories

        self.store = Store(url, config or {})
        self.url = url.rstrip("/")

    def path(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def exists(self, rel: str) -> bool:
        return self.store.exists(rel) or bool(self.store.list(rel.rstrip("/") + "/"))

    def list_dir(self, rel: str = "") -> list:
        prefix = (rel.rstrip("/") + "/") if rel else ""
        names = {path[len(prefix) :].split("/", 1)[0] for path, _size in self.store.list(prefix)}
        return sorted(n for n in names if n)

    def backup_ids(self) -> list:
        return [n for n in self.store.list_dirs("") if valid_backup_id(n)]

    def read_backup(self, backup_id: str) -> dict | None:
        doc = self.read_json(f"{backup_id}/{BACKUP_JSON}")
        return doc if isinstance(doc, dict) else None

    def write_backup(self, backup_id: str, info: dict) -> None:
        self.store.put_bytes(f"{backup_id}/{BACKUP_JSON}", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())

    def has_backup_json(self, backup_id: str) -> bool:
        return self.store.exists(f"{backup_id}/{BACKUP_JSON}")

    def write_file(self, rel: str, data: bytes) -> None:
        self.store.put_bytes(rel, data)

    def write_manifest(self, backup_id: str, info: dict, algorithm: str) -> dict:
        """The manifest from the checksums the copy step took as the data streamed by (the
        archives are never read back from the bucket), written beside them."""
        with tempfile.TemporaryDirectory(prefix=".pgops-manifest-") as shadow:
            os.chmod(shadow, 0o700)
            for name in (COPY_ENTRIES, *LABEL_FILES):
                data = self.store.get_bytes(f"{backup_id}/{name}")
                if data is not None:
                    write_private_file(os.path.join(shadow, name), data)
            # Empty stand-ins so that the layout (which archives there are) reads as in the bucket.
            for name in info.get("files") or []:
                open(os.path.join(shadow, os.path.basename(name)), "wb").close()
            result = write_backup_manifest(shadow, info, algorithm, os.path.join(shadow, COPY_ENTRIES), require_copy_entries=True)
            with open(os.path.join(shadow, MANIFEST), "rb") as f:
                self.store.put_bytes(f"{backup_id}/{MANIFEST}", f.read())
        self.store.delete([f"{backup_id}/{COPY_ENTRIES}"])
        return result

    def read_json(self, rel: str):
        data = self.store.get_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def claim(self, rel: str, doc: dict) -> bool:
        # Conditional PUT (If-None-Match: *): one winner across hosts where the server enforces it.
        return self.store.put_bytes(rel, json.dumps(doc).encode(), if_none_match=True)

    def mtime(self, rel: str) -> float | None:
        return self.store.modified(rel)

    def newest_mtime(self, rel: str) -> float:
        return max([m for _p, _s, m in self.store.list_detailed(rel.rstrip("/") + "/")] or [0.0])

    def delete(self, rel: str) -> None:
        self.store.delete([rel])

    def delete_if(self, rel: str, doc: dict) -> bool:
        # No portable conditional delete: read again right before deleting (a narrow window remains).
        if self.read_json(rel) not in (None, doc):
            return False
        self.store.delete([rel])
        return True

    def delete_tree(self, rel: str) -> None:
        self.store.abort_uploads(rel.rstrip("/") + "/")
        # backup.json first: a removal that fails half way leaves no record saying complete over half the data.
        self.store.delete([rel.rstrip("/") + "/" + BACKUP_JSON])
        self.store.delete_prefix(rel)

    def delete_payload(self, backup_id: str) -> list:
        prefix = backup_id + "/"
        # An upload the failed run left open is data too: abort it (no orphaned parts are billed or kept).
        self.store.abort_uploads(prefix)
        doomed = [p for p, _s in self.store.list(prefix) if p != prefix + BACKUP_JSON]
        self.store.delete(doomed)
        return sorted({p[len(prefix) :].split("/", 1)[0] for p in doomed})

    def tree_size(self, rel: str) -> int:
        return sum(size for _p, size in self.store.list(rel.rstrip("/") + "/"))

    def abandon(self, backup_id: str) -> None:
        """A dead run's unfinished multipart uploads (a server that went away mid-upload could not
        be told to abort them): aborted, so no orphaned parts stay behind."""
        self.store.abort_uploads(backup_id + "/")

    def files(self, rel: str) -> list:
        prefix = rel.rstrip("/") + "/"
        return [(p[len(prefix) :], m) for p, _s, m in self.store.list_detailed(prefix, delimiter="/")]

    def delete_files(self, rel: str, names: list) -> None:
        self.store.delete([f"{rel.rstrip('/')}/{n}" for n in names])

    def entries(self, rel: str) -> list:
        """[(kind, size, name)] of what is right in rel (kind "f": an object; a bucket has no directories)."""
        prefix = rel.rstrip("/") + "/"
        return [("f", size, p[len(prefix) :]) for p, size in self.store.list(prefix) if "/" not in p[len(prefix) :]]

    def fetch_all(self, rel: str, names: list, directory: str) -> None:
        """The files rel/<name> into directory/<name> (each 0600)."""
        for name in names:
            self.store.download(f"{rel}/{name}", os.path.join(directory, name))

    def reader(self, rel: str):
        return RemoteFile(self.store, rel)


class SshStorage:
    """A repository in a directory of a repository host, reached over ssh as its owner (_remote.Remote, the
    same ssh the copy writes with): what a restore, or a verification, on another host reads, and the
    backup.json it records into. Each call is one command there (find, cat, mv)."""

    kind = "ssh"

    def __init__(self, root: str, remote: Remote):
        self.root = root.rstrip("/") or "/"
        self.remote = remote
        self.url = f"{remote.target}:{self.root}"

    def path(self, rel: str = "") -> str:
        """The path on the repository host."""
        return os.path.join(self.root, rel) if rel else self.root

    def _run(self, command: str, data: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.remote.prefix + [command], input=data, capture_output=True, check=False)

    def _fail(self, what: str, proc) -> StorageError:
        why = proc.stderr.decode("utf-8", "replace").strip() or f"ssh exited {proc.returncode}"
        return StorageError(f"{what} on {self.remote.target} failed: {why}")

    def entries(self, rel: str = "") -> list:
        """[(kind, size, name)] of what is right in directory rel (kind "f" a file, "d" a directory, as find
        prints it); [] when it does not exist."""
        where = shlex.quote(self.path(rel))
        proc = self._run(f"if [ -d {where} ]; then find {where} -mindepth 1 -maxdepth 1 -printf '%y %s %f\\n'; fi")
        if proc.returncode != 0:
            raise self._fail(f"listing {self.path(rel)}", proc)
        out = []
        for line in proc.stdout.decode("utf-8", "surrogateescape").splitlines():
            kind, size, name = line.split(" ", 2)
            out.append((kind, int(size), name))
        return sorted(out, key=lambda e: e[2])

    def files(self, rel: str) -> list:
        """[(name, None)] of the regular files right in directory rel (their times are not read)."""
        return [(name, None) for kind, _size, name in self.entries(rel) if kind == "f"]

    def read_bytes(self, rel: str) -> bytes | None:
        """A file's content; None when there is no such file."""
        where = shlex.quote(self.path(rel))
        proc = self._run(f"if [ -f {where} ]; then exec cat -- {where}; else exit 3; fi")
        if proc.returncode == 3:
            return None
        if proc.returncode != 0:
            raise self._fail(f"reading {self.path(rel)}", proc)
        return proc.stdout

    def fetch_all(self, rel: str, names: list, directory: str) -> None:
        """The files rel/<name> into directory/<name> (each 0600), all in one tar over ssh: one connection, not one
        per file."""
        if not names:
            return
        quoted = " ".join(shlex.quote(n) for n in names)
        err = tempfile.TemporaryFile()
        with (
            err,
            subprocess.Popen(
                self.remote.prefix + [f"cd {shlex.quote(self.path(rel))} && exec tar -cf - -- {quoted}"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            ) as proc,
        ):
            untar = subprocess.run(
                ["tar", "-xf", "-", "-C", directory, "--no-same-owner"], stdin=proc.stdout, capture_output=True, check=False
            )
            proc.stdout.close()
            proc.wait()
            err.seek(0)
            why = err.read().decode("utf-8", "replace").strip()
        if proc.returncode != 0 or untar.returncode != 0:
            why = why or untar.stderr.decode("utf-8", "replace").strip() or f"ssh exited {proc.returncode}"
            raise StorageError(f"reading {', '.join(names)} of {self.path(rel)} on {self.remote.target} failed: {why}")
        for name in names:
            os.chmod(os.path.join(directory, name), 0o600)

    def read_json(self, rel: str):
        data = self.read_bytes(rel)
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    def read_backup(self, backup_id: str) -> dict | None:
        doc = self.read_json(f"{backup_id}/{BACKUP_JSON}")
        return doc if isinstance(doc, dict) else None

    def write_backup(self, backup_id: str, info: dict) -> None:
        """backup.json replaced whole: written beside it (0600), then renamed over it."""
        final = shlex.quote(self.path(f"{backup_id}/{BACKUP_JSON}"))
        tmp = shlex.quote(self.path(f"{backup_id}/.{BACKUP_JSON}.{os.getpid()}.tmp"))
        data = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()
        proc = self._run(f"umask 077 && cat > {tmp} && mv -f -- {tmp} {final}", data)
        if proc.returncode != 0:
            raise self._fail(f"writing {self.path(f'{backup_id}/{BACKUP_JSON}')}", proc)

    def reader(self, rel: str):
        return SshFile(self.remote, self.path(rel))


class SshFile:
    """A file on a repository host, read as a stream as RemoteFile reads an object: `cat` there over ssh,
    whose output the caller's tools take as their stdin. A directory (an rsync backup's data/) is
    copied by rsync over the same ssh (rsync_source)."""

    def __init__(self, remote: Remote, path: str):
        self.remote = remote
        self.path = path
        self.name = os.path.basename(path.rstrip("/"))  # its suffixes say how to decode it
        self._proc = None
        self._err = None

    def __str__(self) -> str:
        return f"{self.remote.target}:{self.path}"

    def open(self):
        """A readable file object of the file's bytes (call finish() once done with it)."""
        self._err = tempfile.TemporaryFile()  # closed by finish()
        self._proc = subprocess.Popen(  # waited for by finish()
            self.remote.prefix + [f"exec cat -- {shlex.quote(self.path)}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._err,
        )
        return self._proc.stdout

    def finish(self, stopped_early: bool = False) -> None:
        """Wait for ssh; StorageError when the read failed (a reader that stopped early ends it on purpose)."""
        if self._proc is None:
            return
        proc, err, self._proc, self._err = self._proc, self._err, None, None
        if stopped_early and proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        err.seek(0)
        why = err.read().decode("utf-8", "replace").strip()
        err.close()
        if proc.returncode != 0 and not stopped_early:
            raise StorageError(f"reading {self} failed (ssh exited {proc.returncode}): {why}")

    def rsync_source(self) -> tuple:
        """(rsync options, source) that copy this directory's content from the repository host."""
        return ["-e", " ".join(shlex.quote(a) for a in self.remote.ssh)], f"{self.remote.target}:{self.path.rstrip('/')}/"


def remote_of(params: dict):
    """The repository host of a module's SSH_OPTION_SPEC options (None without repository_host)."""
    if not params.get("repository_host"):
        return None
    return Remote(params["repository_host"], params["ssh_port"], params["ssh_options"])


class RemoteFile:
    """An object in a bucket, read as a stream: a thread downloads it (ranged GETs in parallel,
    written in order) into a pipe whose read end the caller's tools take as their stdin."""

    def __init__(self, store, rel: str):
        self.store = store
        self.rel = rel
        self.name = rel.rsplit("/", 1)[-1]  # its suffixes say how to decode it
        self._thread = None
        self._error = None

    def __str__(self) -> str:
        return self.store.uri(self.rel)

    def open(self):
        """A readable file object of the object's bytes (call finish() once done with it)."""
        read_fd, write_fd = os.pipe()

        def download():
            try:
                self.store.download(self.rel, write_fd)
            except BaseException as e:  # noqa: BLE001 - reported by finish()
                self._error = e
            finally:
                os.close(write_fd)

        self._thread = threading.Thread(target=download, daemon=True)
        self._thread.start()
        return os.fdopen(read_fd, "rb")

    def finish(self, stopped_early: bool = False) -> None:
        """Wait for the download; StorageError when it failed (a reader that stopped early
        breaks the pipe on purpose: that is no failure)."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if self._error is not None and not (stopped_early and isinstance(self._error, BrokenPipeError)):
            raise StorageError(f"reading {self} failed: {self._error}")


def stage_backup(st, backup_id: str, directory: str) -> dict:
    """Fetch a backup's small files (backup.json, backup_label, tablespace_map, backup_manifest, ...) from a
    bucket or a repository host (st: S3Storage or SshStorage) into directory and stand an empty file in for
    each archive (an empty directory for an rsync backup's data/ and each tablespace, holding only what
    RSYNC_PEEK names), so that the backup's layout reads as on disk; {stand-in path: reader} of the
    archives and directories, which are streamed (or copied with rsync) when read."""
    readers, small = {}, []
    for kind, size, name in st.entries(backup_id):
        rel, path = f"{backup_id}/{name}", os.path.join(directory, name)
        if kind == "d" and name in (RSYNC_DATA, RSYNC_TABLESPACES):
            os.mkdir(path, 0o700)
            if name == RSYNC_DATA:
                present = {n for k, _s, n in st.entries(rel) if k == "f"}
                small += [f"{name}/{peek}" for peek in RSYNC_PEEK if peek in present]
                readers[path] = st.reader(rel)
                continue
            for k, _s, oid in st.entries(rel):
                if k == "d" and oid.isdigit():
                    os.mkdir(os.path.join(path, oid), 0o700)
                    readers[os.path.join(path, oid)] = st.reader(f"{rel}/{oid}")
        elif kind != "f":
            continue
        elif parse_archive_name(name):
            open(path, "wb").close()
            readers[path] = st.reader(rel)
        elif size <= SMALL_FILE:
            small.append(name)
    st.fetch_all(backup_id, small, directory)
    return readers


def stage_backup_at(backup_path: str, s3_config: dict | None = None, remote: Remote | None = None, prefix: str = ".pgops-"):
    """A backup in a bucket (s3://bucket/prefix/<backup id>) or on a repository host (remote; backup_path is
    a path there) made readable here: (its storage, its id, a private directory where its layout reads as
    on disk, {stand-in: reader}) - see stage_backup. The directory is removed when the process ends."""
    repository, backup_id = split_backup_url(backup_path)
    st = SshStorage(repository or "/", remote) if remote else open_storage(repository, s3_config)
    staging = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, staging, True)
    return st, backup_id, staging, stage_backup(st, backup_id, staging)


def split_backup_url(url: str) -> tuple:
    """(repository, backup id) of s3://bucket/prefix/<backup id>."""
    repository, backup_id = url.rstrip("/").rsplit("/", 1)
    return repository, backup_id


def update_backup_at(backup_path: str, s3_config: dict | None = None, **fields) -> dict:
    """Set fields of the backup.json of a backup directory or of s3://bucket/prefix/<backup id>."""
    if not is_s3_url(backup_path):
        return update_backup(backup_path, **fields)
    repository, backup_id = split_backup_url(backup_path)
    st = S3Storage(repository, s3_config)
    info = st.read_backup(backup_id)
    if info is None:
        raise StorageError(f"{backup_path}/{BACKUP_JSON} is missing or not a JSON object; not updating it")
    info.update(fields)
    st.write_backup(backup_id, info)
    return info


def is_s3_url(repository) -> bool:
    return isinstance(repository, str) and repository.startswith("s3://")


def open_storage(repository, s3_config: dict | None = None):
    """The storage of a repository: a Storage as is, an s3:// URL, or a directory path."""
    if isinstance(repository, (FileStorage, S3Storage)):
        return repository
    if is_s3_url(repository):
        return S3Storage(repository, s3_config)
    return FileStorage(repository)
