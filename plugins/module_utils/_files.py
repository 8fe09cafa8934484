# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Private files and directories: everything we write is readable only by its owner."""

from __future__ import annotations

import json
import os
import stat

from ._errors import PgopsError


class UnsafePathError(PgopsError):
    pass


def path_inside(path: str, parent: str) -> bool:
    """path is parent or below it (both already resolved and absolute)."""
    parent = parent.rstrip(os.sep) or os.sep
    return path == parent or path.startswith(parent if parent == os.sep else parent + os.sep)


def existing_ancestor(path: str) -> str:
    """path, or its nearest ancestor that exists (where it would be created)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def resolves_inside(path: str, parent: str) -> bool:
    """path is parent or below it once symlinks are resolved."""
    return path_inside(os.path.realpath(path), os.path.realpath(parent))


def ensure_private_dir(path: str) -> str:
    """Create path (0700; missing parents as makedirs makes them) or accept an existing one only
    if no other user could tamper with it. Never changes an existing directory's
    mode: that could cut others off from a shared directory (e.g. a socket dir)."""
    if not os.path.isabs(path):
        raise UnsafePathError(f"{path} must be an absolute path")
    parent = os.path.dirname(path.rstrip("/"))
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a directory (a symlink is not accepted)")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} belongs to uid {st.st_uid}, not to uid {os.geteuid()} that runs this")
    if st.st_mode & 0o077:
        raise UnsafePathError(
            f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}): choose a private directory, or chmod 700 it"
        )
    return path


def write_private_file(path: str, data: bytes) -> None:
    """Write bytes exactly, mode 0600, atomically (a reader never sees half a file)."""
    write_file_atomically(path, data, 0o600)


def write_file_atomically(path: str, data: bytes, mode: int) -> None:
    """Write bytes exactly with this mode (whatever the umask), atomically and durably."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def write_all(fd: int, data) -> None:
    """os.write until every byte is written (a short write on a full disk must not pass as done)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def copy_range(src: int, dst: int, offset: int, length: int) -> int:
    """Copy length bytes of src from offset to dst's position, in the kernel where it can
    (copy_file_range: no trip through Python, shared extents where the filesystem has them);
    returns the bytes copied, fewer only at src's end."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < length:
        if use_kernel:
            try:
                n = os.copy_file_range(src, dst, length - done, offset + done)
            except OSError:  # another filesystem, or not supported there: copy through Python
                use_kernel = False
                continue
        else:
            chunk = os.pread(src, min(length - done, 1 << 20), offset + done)
            write_all(dst, chunk)
            n = len(chunk)
        if n == 0:
            if use_kernel and offset + done < os.fstat(src).st_size:
                use_kernel = False  # the kernel copied nothing before the end: let Python read it
                continue
            break
        done += n
    return done


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in path survive a crash."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, data: dict) -> None:
    write_private_file(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None  # a stray file where a directory was expected reads as nothing there
    except ValueError:
        return None
