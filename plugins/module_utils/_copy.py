# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The copy step: which files of a running cluster to take, and the tar /
cpio / rsync pipelines that take them.

One walker decides the file list for every tool, so the three methods copy
exactly the same files, with pg_basebackup's exclusions and global/pg_control
last.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ._checksum import CRC32C_IMPLEMENTATION, default_algorithm, new_hasher
from ._errors import PgopsError
from ._files import fsync_dir, resolves_inside, write_all, write_json, write_private_file
from ._incremental import FILES_FILE, split_unchanged, stage_files
from ._layout import COPY_ENTRIES, RSYNC_DATA, RSYNC_TABLESPACES, LayoutError, archive_name, compressor, encryptor
from ._remote import Remote, sh_quote
from ._s3 import Store, is_s3, part_size_for
from ._stream import scanner_for

# subprocess, not run_command (ansible-core 2.21's pylint check ansible-bad-function): the copy streams tar/cpio
# | compressor | age into storage: bounded memory, progress and kill on abort need Popen; run_command buffers
# whole outputs.
# pylint: disable=ansible-bad-function

# Directories whose contents are never copied (the directory itself is).
EXCLUDE_CONTENTS = (
    "pg_wal",
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
)
# Kept as empty directories inside pg_wal.
WAL_SUBDIRS = ("pg_wal/archive_status", "pg_wal/summaries")
EXCLUDE_FILES = {
    "postmaster.pid",
    "postmaster.opts",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "backup_label.old",
    "recovery.signal",
    "standby.signal",
}
_TEMP_REL = re.compile(r"^t\d+_\d+")
_REL_FILE = re.compile(r"^(\d+)(_(fsm|vm|init))?(\.\d+)?$")
CONTROL = "global/pg_control"


class CopyError(PgopsError):
    pass


def _skip_file(name: str) -> bool:
    return (
        name in EXCLUDE_FILES
        or name.startswith("pg_internal.init")
        or name.startswith("pgsql_tmp")
        or bool(_TEMP_REL.match(name))
    )


def _unlogged(files: list) -> set:
    """Relation files of unlogged relations (those with an _init fork), except _init."""
    inits = {m.group(1) for f in files if (m := _REL_FILE.match(f)) and m.group(3) == "init"}
    if not inits:
        return set()
    return {f for f in files if (m := _REL_FILE.match(f)) and m.group(1) in inits and m.group(3) != "init"}


def walk_error(err: OSError) -> None:
    # A directory dropped while we walk is normal on a running cluster; one we
    # cannot read would silently leave data out of the backup.
    if not isinstance(err, FileNotFoundError):
        raise CopyError(f"cannot read {err.filename}: {err.strerror}")


def walk(root: str, is_data_dir: bool = True, extra_empty: tuple = (), linked: list | None = None, prune: tuple = ()) -> tuple:
    """Relative paths to copy under root (directories included, each before its
    contents), and the total bytes of regular files. pg_control comes last.

    Symlinked directories are followed (the archivers dereference them), so a
    pg_wal on another volume becomes an empty pg_wal directory in the backup,
    as pg_basebackup does, never a link back to the live cluster's WAL.
    Sockets, pipes and devices are left out, as pg_basebackup does (a socket of a server whose
    unix_socket_directories is the data directory). linked: gets the regular files with more than
    one hard link. prune: directories (relative) left out with everything below them.
    """
    if not os.access(root, os.R_OK | os.X_OK) or not os.path.isdir(root):
        raise CopyError(f"cannot read {root}: not a readable directory")
    out = []
    total = 0
    empty = set(EXCLUDE_CONTENTS + extra_empty) if is_data_dir else set()
    keep_dirs = set(WAL_SUBDIRS) if is_data_dir else set()
    control = False
    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error, followlinks=True):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir in empty:
            dirnames[:] = [d for d in dirnames if os.path.join(rel_dir, d) in keep_dirs]
            filenames = []
        elif rel_dir in keep_dirs:
            dirnames[:] = []
            filenames = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("pgsql_tmp") and os.path.join(rel_dir, d) not in prune)
        if rel_dir == "pg_tblspc" and is_data_dir:
            # Tablespaces are copied on their own; tablespace_map recreates the links.
            dirnames[:] = []
            filenames = []
        skip = _unlogged(filenames)
        for d in dirnames:
            out.append(os.path.join(rel_dir, d))
        for f in sorted(filenames):
            rel = os.path.join(rel_dir, f)
            if _skip_file(f) or f in skip:
                continue
            if rel == CONTROL:
                control = True
                continue
            try:
                st = os.stat(os.path.join(dirpath, f))
            except FileNotFoundError:
                continue  # dropped while we walked: normal on a running cluster
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                if linked is not None and st.st_nlink > 1:
                    linked.append(rel)
            elif not stat.S_ISDIR(st.st_mode):
                continue  # a socket, pipe or device: nothing a restore needs, and tar refuses sockets
            out.append(rel)
    if control:
        out.append(CONTROL)
        total += os.path.getsize(os.path.join(root, CONTROL))
    return out, total


def tablespace_subdir(location: str, major: int) -> str:
    """The cluster's own directory in a tablespace location (PG_<major>_<catversion>),
    as pg_basebackup copies it: never another cluster's or pg_upgrade's leftovers."""
    try:
        names = [n for n in os.listdir(location) if n.startswith(f"PG_{major}_")]
    except OSError as e:
        raise CopyError(f"cannot read tablespace {location}: {e.strerror}") from None
    if len(names) != 1:
        raise CopyError(f"tablespace {location} has {len(names)} directories PG_{major}_*: expected exactly one ({names})")
    return names[0]


def compressor_command(name: str, level: int | None, threads: int) -> list:
    try:
        return compressor(name, level, threads)
    except LayoutError as e:
        raise CopyError(str(e)) from None


_BENIGN = (
    "No such file or directory",
    "file changed as we read it",
    "File removed before we read it",
    "file vanished",
    "some files vanished",
    "blocks",  # cpio prints "N blocks"
    # GNU cpio on files that change under it (exit 0; the stream's checksums stay right)
    "was modified while being copied",
    "new bytes not copied",
    "shrunk by",
    # rsync's summary of the above (exit 23): a listed file gone by the time it is copied
    "some files/attrs were not transferred",
)


def _serious(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.strip() and not any(b in line for b in _BENIGN)]


def _archive_command(method: str, root: str, big_records: bool = False, staged=None) -> list:
    """big_records: 1 MiB writes instead of 10 KiB (tar) or 512 bytes (cpio), a
    fifth less CPU in the pipe; only where _tee cuts the padding back.
    staged: (directory, list file, names) - an incremental's INCREMENTAL files, taken from that
    directory after the files read from stdin, then names (global/pg_control) from root."""
    if method == "tar":
        tail = []
        if staged:
            stage_dir, list_file, last = staged
            # -C is positional: the staged files come from their own directory, pg_control stays last.
            tail = ["-C", stage_dir, "-T", list_file] + (["-C", root, *last] if last else [])
        # --ignore-failed-read: a file dropped after the walk is not an error;
        # stderr is still checked for anything else (e.g. permission denied).
        return [
            "tar",
            "-C",
            root,
            "-cf",
            "-",
            f"--blocking-factor={2048 if big_records else 20}",
            "--format=gnu",  # what _stream.TarScanner reads, whatever TAR_OPTIONS says
            "--dereference",  # a symlinked pg_wal is stored as a directory, never as a link
            "--hard-dereference",
            "--no-recursion",
            "--null",
            "-T",
            "-",
            "--ignore-failed-read",
            "--warning=no-file-changed",
            "--warning=no-file-removed",
            "--warning=no-file-shrank",
            *tail,
        ]
    if staged:
        raise CopyError(f"method {method} cannot store incremental files: use tar or rsync")
    if method == "cpio":
        return ["cpio", "-o", "-0", "-L", "-H", "newc", "--quiet"] + (["--block-size=2048"] if big_records else [])
    raise CopyError(f"unknown archive method {method}")


def archive(
    method: str,
    root: str,
    files: list,
    out_path: str,
    compression: str,
    level,
    threads: int,
    remote: list | None = None,
    scanner=None,
    cancel: Cancel | None = None,
    encrypt: list | None = None,
    upload=None,
    staged=None,
    progress: CopyProgress | None = None,
) -> dict:
    """Write root's files as one archive (optionally compressed) to out_path.

    remote: an ssh command prefix; the archive is then written on that host.
    scanner: a _stream scanner; the archive stream is teed through it on its
    way to the compressor, so the manifest needs no second read.
    encrypt: the encryption command, run after the compressor (ciphertext does not compress).
    upload: (an _s3.Store, name, part size): the stream goes into a multipart upload instead of a
    file; it is completed only when every step succeeded, and aborted otherwise.
    staged: (directory, relative paths) of an incremental's INCREMENTAL files, archived after files
    (without its global/pg_control, which stays last).
    progress: counts what the archiver reads.
    Written as <out_path>.partial and renamed when every step succeeded.
    """
    t0 = time.monotonic()
    comp = compressor_command(compression, level, threads)
    tmp = out_path + ".partial"
    tar_staged = None
    if staged:
        stage_dir, names = staged
        list_file = os.path.join(stage_dir, ".pgops-staged")
        write_private_file(list_file, b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names))
        last = [f for f in files if f == CONTROL]
        files = [f for f in files if f != CONTROL]
        tar_staged = (stage_dir, list_file, last)
    stages = [("archive", _archive_command(method, root, big_records=scanner is not None, staged=tar_staged))]
    if comp:
        stages.append(("compress", comp))
    if encrypt:
        stages.append(("encrypt", encrypt))
    if upload and len(stages) == 1 and scanner is not None:
        stages.append(("upload", ["cat"]))  # the tee writes into a pipe; the uploader reads the other end
    out_f = None
    writer = None
    if upload:
        writer = upload[0].open_write(upload[1], part_size=upload[2])
    elif remote:
        stages.append(("ssh", remote + [f"umask 077 && cat > {sh_quote(tmp)}"]))
    else:
        out_f = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    procs = []
    feeder = None
    pump = None
    upload_errors = []
    tee_error = None
    try:
        upstream = subprocess.PIPE
        for i, (name, cmd) in enumerate(stages):
            last = i == len(stages) - 1
            # stderr to files: a pipe nobody reads could stall the pipeline.
            err = tempfile.TemporaryFile()
            tee_here = scanner is not None and i == 1
            p = subprocess.Popen(
                cmd,
                cwd=root,
                stdin=subprocess.PIPE if tee_here else upstream,
                stdout=(
                    subprocess.PIPE
                    if (scanner is not None and i == 0) or not last or writer is not None
                    else out_f
                    if out_f is not None
                    else subprocess.DEVNULL
                ),
                stderr=err,
            )
            if i > 0 and not tee_here:
                upstream.close()  # only the next stage holds the read end
            procs.append((name, p, err))
            if cancel is not None:
                cancel.track(p)
            upstream = p.stdout
        if writer is not None:
            pump = threading.Thread(target=_pump, args=(procs[-1][1].stdout, writer, upload_errors))
            pump.start()
        archiver = procs[0][1]
        if progress is not None:
            progress.reading(archiver)
        # The file list goes in from a thread: the archiver reads it while we read its output.
        feeder = threading.Thread(
            target=_feed, args=(archiver.stdin, b"\0".join(f.encode("utf-8", "surrogateescape") for f in files) + b"\0")
        )
        feeder.start()
        if scanner is not None:
            sink = procs[1][1].stdin.fileno() if len(procs) > 1 else out_f
            try:
                _tee(archiver.stdout.fileno(), sink, scanner)
            except (OSError, ValueError) as e:
                # Nothing may wait on a pipe nobody reads: stop every stage first.
                for _name, proc, _err in procs:
                    proc.kill()
                tee_error = e
            archiver.stdout.close()
            if len(procs) > 1:
                procs[1][1].stdin.close()
        results = {}
        for name, p, err in procs:
            if progress is not None and p is procs[0][1]:
                progress.finished(p)
            p.wait()
            err.seek(0)
            results[name] = (p.returncode, err.read().decode(errors="replace"))
            err.close()
    finally:
        if feeder is not None:
            feeder.join()
        if pump is not None:
            pump.join()
        if out_f is not None:
            os.close(out_f)
        if cancel is not None:
            for _name, proc, _err in procs:
                cancel.untrack(proc)
    if writer is not None:
        return _finish_upload(writer, upload, results, method, upload_errors, scanner, cancel, t0)
    if cancel is not None and cancel.fired:
        _cleanup(tmp, remote)
        raise CopyError(CANCELLED)
    rc, err = results["archive"]
    serious = _serious(err)
    if tee_error is not None:
        serious.append(f"writing the archive failed: {tee_error}")
    if (rc not in (0, 1) or serious or any(r[0] for r in results.values())) and not remote and _full(os.path.dirname(out_path)):
        # tar only says "Wrote only N of M bytes": name the cause.
        serious.append(f"No space left on device: {os.path.dirname(out_path)} is full")
    ok_codes = (0, 1) if method == "tar" else (0, 2)
    if rc not in ok_codes or serious:
        _cleanup(tmp, remote)
        raise CopyError(f"{method} failed (exit {rc}): {' | '.join(serious) or err.strip()}")
    for name in ("compress", "encrypt", "ssh"):
        if name in results and results[name][0] != 0:
            _cleanup(tmp, remote)
            raise CopyError(f"{name} step failed (exit {results[name][0]}): {results[name][1].strip()}")
    if scanner is not None and not scanner.done:
        _cleanup(tmp, remote)
        raise CopyError(f"the {method} stream ended early: the archive is incomplete")
    if cancel is not None and cancel.fired:
        _cleanup(tmp, remote)
        raise CopyError(CANCELLED)
    if remote:
        done = subprocess.run(
            remote
            + [
                f"sync -- {sh_quote(tmp)} && mv {sh_quote(tmp)} {sh_quote(out_path)} && "
                f"sync -- {sh_quote(os.path.dirname(out_path))} && stat -c %s {sh_quote(out_path)}"
            ],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            raise CopyError(f"cannot finish {out_path} on the repository host: {done.stderr.decode(errors='replace').strip()}")
        size = int(done.stdout)
    else:
        # Accepted: on disk before the backup can be marked complete, as pg_basebackup does.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out_path)
        fsync_dir(os.path.dirname(out_path))
        size = os.path.getsize(out_path)
    return {"path": out_path, "bytes": size, "seconds": round(time.monotonic() - t0, 3), "warnings": err.strip()[:2000]}


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, ValueError):
        pass


def _grow_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer, larger hand-offs
    except OSError:
        pass


def _libc_tee():
    """tee(2): duplicates a pipe's data into another pipe inside the kernel."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).tee
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t
    return fn


_TEE = _libc_tee()
_CHUNK = 1 << 20


def _tee_some(src: int, sink: int, n: int) -> int:
    while True:
        got = _TEE(src, sink, n, 0)
        if got >= 0:
            return got
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _tee(src: int, sink: int, scanner) -> None:
    """Pass the archive from src on to sink, showing every byte to scanner.

    Member data goes through tee(2) when sink is a pipe: the compressor gets
    it without a copy through this process, which reads it once, for the
    checksums (a third of the overhead over a bare tar | zstd). Headers are
    read before they go on, so the archive ends where its format says: the
    archiver writes 1 MiB records, and its padding to them is cut back to
    what tar and cpio write by default (a decompressor piped into tar -x or
    cpio -i would otherwise die of SIGPIPE when they stop at the end marker).
    """
    _grow_pipe(src)
    _grow_pipe(sink)
    buf = memoryview(bytearray(_CHUNK))
    zero_copy = _TEE is not None and stat.S_ISFIFO(os.fstat(sink).st_mode)
    total = 0
    while not scanner.done:
        ahead = min(scanner.passable(), _CHUNK)
        if ahead and zero_copy:
            try:
                n = _tee_some(src, sink, ahead)
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                    raise
                zero_copy = False  # refused here (a sandbox, seccomp): read and write instead
                continue
            got = 0
            while got < n:
                got += os.readv(src, [buf[got:n]])
        else:
            n = os.readv(src, [buf[: ahead or scanner.header_wanted()]])
            write_all(sink, buf[:n])
        if not n:
            return  # ended early: the caller sees the scanner is not done
        scanner.feed(buf[:n])
        total += n
    end = -(-(total + scanner.END_EXTRA) // scanner.RECORD) * scanner.RECORD
    write_all(sink, memoryview(bytes(end - total)))
    while os.readv(src, [buf]):
        pass  # the archiver's own padding: zeros


def hash_tree(root: str, files: list, prefix: str, algorithm: str, workers: int = 2, cancel: Cancel | None = None) -> list:
    """Entries for files already copied to root (method rsync), hashed in parallel
    (hashlib releases the GIL on large buffers)."""

    def one(rel: str):
        _check(cancel)
        path = os.path.join(root, rel)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        h = new_hasher(algorithm)
        if h is not None:
            with open(path, "rb", buffering=0) as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
        return {
            "path": prefix + rel,
            "size": st.st_size,
            "mtime": int(st.st_mtime),
            "algorithm": algorithm,
            "checksum": h.hexdigest() if h is not None else None,
        }

    present = [f for f in files if os.path.lexists(os.path.join(root, f))]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [e for e in pool.map(one, present) if e is not None]


def _full(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1024 * 1024


def _cleanup(tmp: str, remote) -> None:
    if remote:
        subprocess.run(remote + [f"rm -f {sh_quote(tmp)}"], check=False)
    else:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def sync_filesystem(path: str, remote: Remote | None = None) -> None:
    """Flush a copied tree (method rsync) to disk: syncfs(2) of path's file system."""
    if remote:
        remote.run(f"sync -f -- {sh_quote(path)}")
        return
    proc = subprocess.run(["sync", "-f", "--", path], capture_output=True, check=False)
    if proc.returncode != 0:
        raise CopyError(f"cannot flush {path} to disk: {proc.stderr.decode(errors='replace').strip()}")


def rsync_tree(
    root: str,
    files: list,
    dest: str,
    remote: Remote | None = None,
    cancel: Cancel | None = None,
    link_dest: str | None = None,
    progress: CopyProgress | None = None,
) -> dict:
    """Copy the listed files of root into dest (a directory, here or on remote) with rsync.
    link_dest: files the same there (size and time) are hard-linked instead (relative to dest)."""
    t0 = time.monotonic()
    target = f"{remote.target}:{dest.rstrip('/')}/" if remote else dest.rstrip("/") + "/"
    # --checksum is not needed here: dest is always a new, empty directory.
    # --copy-links: a symlinked pg_wal becomes a directory, as with tar and cpio.
    cmd = ["rsync", "-a", "--copy-links", "--from0", "--files-from=-", "--inplace", "--whole-file"]
    if link_dest:
        cmd.append(f"--link-dest={link_dest}")
    if remote:
        cmd += ["-e", " ".join(shlex.quote(a) for a in remote.ssh)]
    cmd += [root.rstrip("/") + "/", target]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if cancel is not None:
        cancel.track(proc)
    if progress is not None:
        progress.reading(proc)
    try:
        _out, err_bytes = proc.communicate("\0".join(files).encode("utf-8", "surrogateescape") + b"\0")
    finally:
        if cancel is not None:
            cancel.untrack(proc)
        if progress is not None:
            progress.finished(proc)
    _check(cancel)
    err = err_bytes.decode(errors="replace")
    if proc.returncode not in (0, 23, 24) or (proc.returncode == 23 and _serious(err)):
        raise CopyError(f"rsync failed (exit {proc.returncode}): {' | '.join(_serious(err)) or err.strip()}")
    return {"path": dest, "seconds": round(time.monotonic() - t0, 3), "warnings": err.strip()[:2000]}


class Cancel:
    """Stops a copy from another thread (the session keeper's, when the backup
    is aborted or the run is gone): kills the processes the copy runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs = set()
        self.fired = False

    def track(self, proc) -> None:
        with self._lock:
            self._procs.add(proc)
            if self.fired:
                proc.kill()

    def untrack(self, proc) -> None:
        with self._lock:
            self._procs.discard(proc)

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            for proc in self._procs:
                try:
                    proc.kill()
                except OSError:
                    pass


def _read_bytes(pid: int) -> int | None:
    """Bytes a process has read so far (rchar of /proc/<pid>/io: its own user may read it)."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class CopyProgress:
    """Bytes of the cluster's files read so far: what the copy's reading process (tar, cpio, the
    sending rsync) has read, from the kernel's count (no byte passes through this process for
    it), plus what the ones before it read. expected shrinks by what an incremental copy does not
    read (files taken from the parent; relation files stored as their changed blocks). Read from
    another thread (the one that reports progress)."""

    def __init__(self, expected: int):
        self._lock = threading.Lock()
        self.expected = expected
        self.phase = "copying"
        self._done = 0  # read by processes that have ended
        self._proc = None
        self._last = 0  # what the running one had read at the last look

    def reading(self, proc) -> None:
        with self._lock:
            self._proc, self._last = proc, 0

    def finished(self, proc) -> None:
        """proc ended (or is about to be waited for): add what it read."""
        if proc.returncode is None:
            try:
                # Exited but not reaped: its counters are still there to read.
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            except (ChildProcessError, OSError):
                pass
        with self._lock:
            if self._proc is not proc:
                return
            got = _read_bytes(proc.pid) if proc.returncode is None else None
            self._done += max(self._last, got or 0)
            self._proc, self._last = None, 0

    def bytes_done(self) -> int:
        with self._lock:
            if self._proc is not None:
                got = _read_bytes(self._proc.pid)
                if got is not None:
                    self._last = max(self._last, got)
            return self._done + self._last


CANCELLED = "the copy was cancelled (the backup was aborted)"
CPIO_TRAILER = "TRAILER!!!"


def _pump(stream, writer, errors: list) -> None:
    """Read the pipeline's output into the upload. On a failure the pipe is closed, so the
    stages upstream stop (broken pipe) instead of waiting for a reader."""
    fd = stream.fileno()
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            writer.write(chunk)
    except Exception as e:  # noqa: BLE001 - any failure ends the copy, reported by the caller
        errors.append(e)
    finally:
        stream.close()


def _finish_upload(writer, upload, results: dict, method: str, upload_errors: list, scanner, cancel, t0) -> dict:
    """Complete the multipart upload only when every stage and the upload itself succeeded."""
    ok_codes = (0, 1) if method == "tar" else (0, 2)
    rc, err = results["archive"]
    problems = [f"uploading {upload[1]} failed: {e}" for e in upload_errors]
    serious = _serious(err)
    if rc not in ok_codes or serious:
        problems.append(f"{method} failed (exit {rc}): {' | '.join(serious) or err.strip()}")
    problems += [
        f"{name} step failed (exit {code}): {text.strip()}"
        for name, (code, text) in results.items()
        if name != "archive" and code
    ]
    if scanner is not None and not scanner.done and not problems:
        problems.append(f"the {method} stream ended early: the archive is incomplete")
    if cancel is not None and cancel.fired:
        problems.insert(0, CANCELLED)
    if problems:
        writer.abort()
        raise CopyError(problems[0] if problems[0] == CANCELLED else "; ".join(problems))
    try:
        writer.close()
    except PgopsError as e:
        raise CopyError(f"uploading {upload[1]} failed: {e}") from None
    path = upload[0].uri(upload[1])
    return {
        "path": path,
        "bytes": writer.bytes_written,
        "seconds": round(time.monotonic() - t0, 3),
        "warnings": err.strip()[:2000],
    }


def _check(cancel: Cancel | None) -> None:
    """Between steps of a copy: stop at once when it was cancelled."""
    if cancel is not None and cancel.fired:
        raise CopyError(CANCELLED)


# What a copy needs besides data_directory, tablespaces and dest (pg_backup_copy's options).
COPY_DEFAULTS = {
    "method": "tar",
    "compression": "none",
    "compression_level": None,
    "threads": 0,
    "server_version_num": 150000,
    "exclude_directories": [],
    "repository_host": None,
    "ssh_port": 22,
    "ssh_options": [],
    "manifest_checksum": None,
    "encryption": "none",
    "age_recipients": [],
    "s3": None,  # an s3:// dest's settings (_s3.config_from_params)
    "staging_dir": None,  # where a block-level incremental stages its INCREMENTAL files (staging_directory)
}


def _remote_of(spec: dict):
    return Remote(spec["repository_host"], spec["ssh_port"], spec["ssh_options"]) if spec["repository_host"] else None


def check_copy(spec: dict) -> str | None:
    """Why this copy cannot run (None when it can): checked before anything starts."""
    data, dest = spec["data_directory"], spec["dest"]
    if not data or not os.path.isfile(os.path.join(data, "PG_VERSION")):
        return f"{data} is not a PostgreSQL data directory (no PG_VERSION)"
    if is_s3(dest):
        if spec["method"] == "rsync":
            return "rsync copies into a directory: a backup into an s3:// repository uses method tar or cpio"
        if spec["repository_host"]:
            return "repository_host is for a repository reached over ssh, not for an s3:// dest"
        return _check_encryption(spec)
    remote = _remote_of(spec)
    if not (remote.is_dir(dest) if remote else os.path.isdir(dest)):
        where = f" on {spec['repository_host']}" if remote else ""
        return f"dest {dest} is not a directory{where} (or the host cannot be reached with ssh)"
    for ts in spec["tablespaces"]:
        if "oid" not in ts or "location" not in ts:
            return f"each tablespace needs oid and location, got {ts}"
    for root in [data] + [ts["location"] for ts in spec["tablespaces"]]:
        if resolves_inside(dest, root):
            return f"dest {dest} is inside {root}: the backup would copy itself"
    if spec["method"] == "rsync" and spec["compression"] != "none":
        return "rsync copies a plain data directory: compression must be none"
    return _check_encryption(spec)


def _check_encryption(spec: dict) -> str | None:
    if spec["encryption"] != "none":
        if spec["method"] == "rsync":
            return "rsync copies a plain data directory, which cannot be encrypted: use method tar or cpio with encryption"
        try:
            encryptor(spec["encryption"], spec["age_recipients"])
        except LayoutError as e:
            return f"nothing copied: {e}"
    return None


def plan_copy(spec: dict) -> dict:
    """Every file to copy, walked before the copy starts (CopyError when a directory cannot be read)."""
    major = spec["server_version_num"] // 10000
    extra = tuple(d.strip("/") for d in spec["exclude_directories"])
    linked = [] if spec["method"] == "cpio" else None
    # A tablespace inside the data directory goes into its own archive only, never twice.
    data_real = os.path.realpath(spec["data_directory"])
    inside = tuple(
        os.path.relpath(os.path.realpath(ts["location"]), data_real)
        for ts in spec["tablespaces"]
        if resolves_inside(ts["location"], data_real) and os.path.realpath(ts["location"]) != data_real
    )
    files, source_bytes = walk(spec["data_directory"], True, extra, linked, prune=inside)
    if linked:
        # GNU cpio's newc format defers every file with several links to the end of the archive: after
        # global/pg_control, whose minimum recovery point a standby backup's restore relies on.
        raise CopyError(
            f"{len(linked)} file(s) of the data directory have several hard links (e.g. {linked[0]}; after pg_upgrade "
            "--link while the old cluster is kept), which cpio writes after global/pg_control: use method tar or rsync"
        )
    if spec["method"] == "cpio" and CPIO_TRAILER in files:
        # cpio -i (and our scanner) would take it for the end of the archive.
        raise CopyError(f"{spec['data_directory']}/{CPIO_TRAILER} cannot be copied with cpio: use tar or rsync")
    spaces = []
    for ts in spec["tablespaces"]:
        loc = ts["location"]
        # Only the cluster's own PG_<major>_<catversion> directory, named as in the archive.
        sub = tablespace_subdir(loc, major)
        # A tablespace's own archive is written before base's: its deferred links still precede pg_control.
        tfiles, tsize = walk(os.path.join(loc, sub), False)
        spaces.append((str(ts["oid"]), loc, [sub] + [os.path.join(sub, f) for f in tfiles], tsize))
    return {
        "files": files,
        "spaces": spaces,
        "count": len(files) + sum(len(t[2]) for t in spaces),
        "source_bytes": source_bytes + sum(t[3] for t in spaces),
    }


def _run_copy(spec, plan, cancel, stage, remote, store, threads, algorithm, entries, written, progress) -> int:
    """The copy proper, by method; the bytes written."""
    data, dest, method = spec["data_directory"], spec["dest"], spec["method"]
    # Raises before anything is written when a tool or a key is missing: never a cleartext copy by mistake.
    encrypt = encryptor(spec["encryption"], spec["age_recipients"]) if method != "rsync" else []
    if method == "rsync":
        out = os.path.join(dest, RSYNC_DATA)
        mkdirs = remote.makedirs if remote else (lambda d: os.makedirs(d, mode=0o700, exist_ok=True))
        link = remote.symlink if remote else os.symlink
        mkdirs(out)
        mkdirs(os.path.join(out, "pg_tblspc"))
        for oid, loc, tfiles, _size in plan["spaces"]:
            tdir = os.path.join(dest, RSYNC_TABLESPACES, oid)
            mkdirs(tdir)
            tfiles, staged, linked = stage(oid, loc, tfiles, int(oid))
            rsync_tree(loc, tfiles, tdir, remote, cancel, progress=progress)
            if linked:
                parent_copy = os.path.join("..", "..", "..", spec["file_parent"]["id"], RSYNC_TABLESPACES, oid)
                rsync_tree(loc, linked, tdir, remote, cancel, link_dest=parent_copy, progress=progress)
                tfiles = tfiles + linked
            if staged:
                rsync_tree(staged[0], staged[1], tdir, remote, cancel, progress=progress)
                tfiles = tfiles + staged[1]
            # Relative link: the backup directory can move as a whole.
            link(os.path.join("..", "..", RSYNC_TABLESPACES, oid), os.path.join(out, "pg_tblspc", oid))
            if algorithm:
                _phase(progress, "checksums")
                entries += hash_tree(tdir, tfiles, f"pg_tblspc/{oid}/", algorithm, threads, cancel)
                _phase(progress, "copying")
        # rsync sorts its list: pg_control goes in a second run so it is copied last.
        files, staged, linked = stage("base", data, plan["files"])
        rsync_tree(data, [f for f in files if f != CONTROL], out, remote, cancel, progress=progress)
        if linked:
            # Unchanged files become hard links to the parent's copy: each backup is a complete directory.
            parent_copy = os.path.join("..", "..", spec["file_parent"]["id"], RSYNC_DATA)
            rsync_tree(data, linked, out, remote, cancel, link_dest=parent_copy, progress=progress)
            files = files + linked
        if staged:
            rsync_tree(staged[0], staged[1], out, remote, cancel, progress=progress)
            files = files + staged[1]
        if CONTROL in files:
            rsync_tree(data, [CONTROL], out, remote, cancel, progress=progress)
        if algorithm:
            _phase(progress, "checksums")
            entries += hash_tree(out, files, "", algorithm, threads, cancel)
        _check(cancel)
        # On disk before the backup can be marked complete, as pg_basebackup does.
        _phase(progress, "flushing to disk")
        sync_filesystem(dest, remote)
        written.append({"name": RSYNC_DATA, "bytes": plan["source_bytes"]})
        total = plan["source_bytes"]
    else:
        # Tablespaces first, base (with global/pg_control at its end) last, as pg_basebackup does.
        jobs = list(plan["spaces"])
        jobs.append(("base", data, plan["files"], plan["source_bytes"] - sum(size for *_rest, size in plan["spaces"])))
        total = 0
        for name, root, flist, size in jobs:
            flist, staged, _taken = stage(name, root, flist, None if name == "base" else int(name))
            out_name = archive_name(name, method, spec["compression"], spec["encryption"])
            scanner = scanner_for(method, "" if name == "base" else f"pg_tblspc/{name}/", algorithm) if algorithm else None
            r = archive(
                method,
                root,
                flist,
                out_name if store else os.path.join(dest, out_name),
                spec["compression"],
                spec["compression_level"],
                threads,
                remote=remote.prefix if remote else None,
                scanner=scanner,
                cancel=cancel,
                encrypt=encrypt,
                # Parts sized for the archive (S3 allows 10,000): a 16 MiB part holds 156 GiB in all.
                upload=(store, out_name, part_size_for(size)) if store else None,
                staged=staged,
                progress=progress,
            )
            if scanner is not None:
                entries += scanner.entries
            written.append({"name": out_name, "bytes": r["bytes"], "seconds": r["seconds"]})
            total += r["bytes"]
    return total


def _phase(progress: CopyProgress | None, phase: str) -> None:
    if progress is not None:
        progress.phase = phase


def staging_directory(spec: dict) -> str:
    """Where a block-level incremental copy stages its INCREMENTAL files until they are archived:
    staging_dir; else the backup's own directory when it is one on this host (the repository's file
    system, made to hold backups); else the system's temporary directory (often small, or in memory)."""
    if spec.get("staging_dir"):
        return spec["staging_dir"]
    if not is_s3(spec["dest"]) and not spec["repository_host"]:
        return spec["dest"]
    return tempfile.gettempdir()


def staging_problem(directory: str, blocks: int, relations: int, block_size: int) -> str | None:
    """Why the changed blocks cannot be staged in directory (None when they can): checked before
    anything is written, against their most (every changed block, a header block per relation)."""
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        return f"the incremental backup's changed blocks cannot be staged in {directory}: not a writable directory"
    most = (int(blocks) + int(relations)) * int(block_size)
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < most + 64 * 1024 * 1024:
        return (
            f"the incremental backup's changed blocks need up to {most // (1024 * 1024)} MiB of staging space, and "
            f"{directory} has {free // (1024 * 1024)} MiB free: set staging_dir (pg_backup_incremental_staging_dir) "
            "to a larger file system, or take a full backup"
        )
    return None


def run_copy(spec: dict, plan: dict | None = None, cancel: Cancel | None = None, progress: CopyProgress | None = None) -> dict:
    """Copy the data directory and tablespaces into dest with the spec's method;
    the result pg_backup_copy returns. Raises CopyError or OSError.
    progress: counts the bytes read (its expected is the plan's source bytes, less what an
    incremental copy does not read)."""
    t0 = time.monotonic()
    plan = plan or plan_copy(spec)
    dest, method = spec["dest"], spec["method"]
    remote = _remote_of(spec)
    store = Store(dest, spec["s3"]) if is_s3(dest) else None
    threads = spec["threads"] or os.cpu_count() or 1
    algorithm = default_algorithm() if spec["manifest_checksum"] == "auto" else spec["manifest_checksum"]
    if remote and method == "rsync":
        algorithm = None  # rsync writes straight to the other host: the manifest step reads the copy there
    entries = [] if algorithm else None
    written = []
    incr = spec.get("incremental")  # (BlockMap, its document) from the keeper: a block-level incremental
    fparent = spec.get("file_parent")  # the parent's files: a file-level incremental
    stage_root = None
    if incr:
        where = staging_directory(spec)
        why = staging_problem(where, incr[0].block_count(), len(incr[0].relations), incr[1]["block_size"])
        if why:
            raise CopyError(why)
        stage_root = tempfile.mkdtemp(prefix=".pgops-incremental-", dir=where)
    if incr:
        istats = {"mode": "block", "incremental_files": 0, "whole_files": 0, "blocks": 0, "bytes": 0, "replaced_bytes": 0}
    else:
        istats = {"mode": "file", "taken_files": 0, "taken_bytes": 0, "parent": (fparent or {}).get("id")}
    taken_all = {}

    def stage(name, root, flist, tsoid=None):
        """(files to copy, (stage directory, INCREMENTAL files) or None, files taken from the parent)."""
        out = _stage(name, root, flist, tsoid)
        if progress is not None:
            # What the copy will read: not the files taken from the parent, and the changed blocks
            # (staged as INCREMENTAL files) instead of the relation files they stand for.
            progress.expected = (
                plan["source_bytes"] - istats.get("taken_bytes", 0) - istats.get("replaced_bytes", 0) + istats.get("bytes", 0)
            )
        return out

    def _stage(name, root, flist, tsoid=None):
        if fparent:
            prefix = "" if name == "base" else f"pg_tblspc/{name}/"
            keep, taken = split_unchanged(root, flist, prefix, fparent, new_hasher if fparent.get("checksum") else None)
            taken_all.update(taken)
            istats["taken_files"] += len(taken)
            istats["taken_bytes"] += sum(t["size"] for t in taken.values())
            _check(cancel)
            return keep, None, [k[len(prefix) :] for k in taken]
        if not incr:
            return flist, None, []
        sdir = os.path.join(stage_root, name)
        os.makedirs(sdir, mode=0o700)
        _phase(progress, "staging the changed blocks")
        prefix = "" if name == "base" else f"pg_tblspc/{name}/"
        keep, staged, st = stage_files(root, flist, sdir, incr[0], incr[1], spec["parent_paths"], prefix, tsoid)
        _phase(progress, "copying")
        for k, v in st.items():
            istats[k] += v
        _check(cancel)
        return keep, (sdir, staged), []

    try:
        total = _run_copy(spec, plan, cancel, stage, remote, store, threads, algorithm, entries, written, progress)
    finally:
        if stage_root:
            shutil.rmtree(stage_root, ignore_errors=True)
    if method == "rsync" and incr:
        total += istats["bytes"] - istats["replaced_bytes"]
        written[-1]["bytes"] = total
    elif method == "rsync" and fparent:
        total -= istats["taken_bytes"]  # hard links to the parent's files take no space
        written[-1]["bytes"] = total
    _check(cancel)

    def put(name: str, doc: dict) -> None:
        if store:
            store.put_bytes(name, json.dumps(doc).encode())
        elif remote:
            remote.write(os.path.join(dest, name), json.dumps(doc).encode())
        else:
            write_json(os.path.join(dest, name), doc)

    if entries is not None:
        put(COPY_ENTRIES, {"algorithm": algorithm, "entries": entries})
    if fparent and method != "rsync":
        # What a restore takes from earlier backups; rsync's hard links make a complete directory instead.
        put(FILES_FILE, {"parent": fparent["id"], "taken": taken_all})
    seconds = round(time.monotonic() - t0, 3)
    return {
        "msg": f"copied {plan['count']} entries, {plan['source_bytes']} bytes in {seconds}s with {method}",
        "files": written,
        "bytes": total,
        "source_bytes": plan["source_bytes"],
        "file_count": plan["count"],
        "seconds": seconds,
        "manifest_checksum": algorithm,
        "encryption": spec["encryption"],
        "crc32c_implementation": CRC32C_IMPLEMENTATION,
        "type": "incremental" if incr or fparent else "full",
        "incremental": istats if incr or fparent else None,
    }
