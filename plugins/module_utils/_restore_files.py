# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The file work of a restore: checking and preparing the target directories
(and undoing that after a failure), extracting a backup's archives (or copying
an rsync backup), placing the label files, tidying the restored data
directory, linking tablespaces, reading its configuration files, and checking
the WAL archive.

What to restore where is decided in _restore_plan; the on-disk format of a
backup (archive names, decompressors, backup.json) is _layout's.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading

from ._backup_api import WAL_NAME_RE, wal_segment_count, wal_segment_names
from ._errors import PgopsError
from ._files import existing_ancestor, resolves_inside, write_private_file
from ._layout import (
    BACKUP_JSON,
    LABEL_FILES,
    MANIFEST,
    RSYNC_DATA,
    RSYNC_TABLESPACES,
    STORED_SUFFIXES,
    LayoutError,
    PlainReader,
    parse_archive_name,
    read_commands,
)
from ._restore_plan import HostRefusal, RestoreError, conf_key, conf_value
from ._restore_server import running_postmaster
from ._stream import CpioScanner

# subprocess, not run_command (ansible-core 2.21's pylint check ansible-bad-function): extraction streams the
# stored archive through its decompressor (Popen pipelines).
# pylint: disable=ansible-bad-function

# Files of the original server that must not come along (most are never copied; old backups may hold them).
STALE_FILES = ("postmaster.pid", "postmaster.opts", "recovery.conf", "standby.signal", "recovery.signal", "backup_label.old")
EMPTY_DIRS = ("pg_wal", "pg_wal/archive_status", "pg_replslot", "pg_tblspc")
# The segment sizes PostgreSQL allows (initdb --wal-segsize): powers of two, 1 MB to 1 GB.
WAL_SEGMENT_SIZES = tuple(1 << n for n in range(20, 31))
MAX_WAL_CHECKED = 10001  # more segments than this: only the two ends are checked


# -- target directories


def directory_state(path: str) -> tuple:
    """("absent"|"empty"|"not_empty"|"not_a_directory", a few names found)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent", []
    if stat.S_ISLNK(st.st_mode) and os.path.isdir(path):
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return "not_a_directory", []
    names = sorted(os.listdir(path))
    if not names or names == ["lost+found"]:
        return "empty", []
    return "not_empty", names[:8]


def check_targets(data_dir: str, spaces: list, force: bool, backup_dir: str, live: dict | None = None) -> list:
    """Refuse what must not be overwritten; returns [(path, state)] for the plan. Changes nothing."""
    states = []
    targets = [("data directory", data_dir)] + [(f"tablespace {ts['oid']} directory", ts["path"]) for ts in spaces]
    for what, path in targets:
        if resolves_inside(path, backup_dir) or resolves_inside(backup_dir, path):
            raise RestoreError(f"{what} {path} overlaps the backup {backup_dir}")
        state, names = directory_state(path)
        if state == "not_a_directory":
            raise RestoreError(f"{what} {path} exists and is not a directory")
        pid = running_postmaster(path) if state == "not_empty" else None
        if pid:
            raise RestoreError(
                f"{what} {path} belongs to a running PostgreSQL server (pid {pid}); never restored over, even with force"
            )
        if state == "not_empty" and not force:
            raise RestoreError(
                f"{what} {path} is not empty ({', '.join(names)}{', ...' if len(names) == 8 else ''}); "
                "restore into an empty or absent directory, or set force to replace its content"
            )
        if state == "not_empty":
            why = unremovable(path)
            if why:
                raise RestoreError(f"{what} {path} cannot be emptied: {why}")
        states.append((path, state))
    for what, path in targets:
        # force empties the whole tree: never one that holds a running server (a target one level too high).
        if directory_state(path)[0] == "not_empty" and force:
            inside = running_server_inside(path)
            if inside:
                raise RestoreError(
                    f"{what} {path} holds the data directory {inside[0]} of a running PostgreSQL server (pid {inside[1]}); "
                    "never emptied, even with force: restore into a directory of its own"
                )
    for ts in spaces:
        if resolves_inside(ts["path"], data_dir):
            raise RestoreError(f"tablespace {ts['oid']} directory {ts['path']} is inside the data directory {data_dir}")
    if live:
        # The original server still runs here: its tablespaces are live files too.
        pid = running_postmaster(live.get("data_directory") or "")
        if pid:
            for ts in spaces:
                if os.path.realpath(ts["path"]) == os.path.realpath(ts["location"] or ""):
                    raise RestoreError(
                        f"tablespace {ts['oid']} would be restored into {ts['path']}, which the original server "
                        f"(pid {pid}, {live['data_directory']}) is using; map it elsewhere (pg_restore_tablespace_map)"
                    )
            if resolves_inside(data_dir, live["data_directory"]):
                raise RestoreError(f"the data directory {data_dir} is the running original server's ({pid})")
            # Nor a target inside one of its tablespaces, or one that holds it (force would empty it).
            for what, path in targets:
                for ts in spaces:
                    location = ts.get("location") or ""
                    if location and (resolves_inside(path, location) or resolves_inside(location, path)):
                        raise RestoreError(
                            f"{what} {path} overlaps {location}, tablespace {ts['oid']} of the running original server "
                            f"(pid {pid}, {live['data_directory']}); map it elsewhere (pg_restore_tablespace_map)"
                        )
    return states


def running_server_inside(path: str) -> tuple | None:
    """(data directory, pid) of a running PostgreSQL server at or below path, or None."""
    for dirpath, dirnames, filenames in os.walk(path):
        if "postmaster.pid" in filenames:
            pid = running_postmaster(dirpath)
            if pid:
                return dirpath, pid
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return None


def unremovable(path: str) -> str | None:
    """Why the content of path cannot all be removed by this user (None when it can): checked before removing any."""
    errors = []
    for dirpath, dirnames, _filenames in os.walk(path, onerror=errors.append):
        if not os.access(dirpath, os.W_OK | os.X_OK):
            return f"{dirpath} is not writable by uid {os.geteuid()}"
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    if errors:
        return f"{errors[0].filename} cannot be read by uid {os.geteuid()}"
    return None


def writable_parent(path: str) -> str | None:
    """Why path cannot be created or written by this user (None when it can)."""
    probe = existing_ancestor(path)
    if os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK):
        return None
    return f"{probe} is not writable by uid {os.geteuid()}: create {path} for this user first, or run as its owner"


def clear_directory(path: str) -> list:
    """Remove everything inside path but a mount point's lost+found; path itself stays (with its
    owner and mode). Goes on past what cannot be removed; returns those problems."""
    problems = []
    for name in os.listdir(path):
        if name == "lost+found":
            continue  # the file system's own (a target that is a mount point), never ours to remove
        full = os.path.join(path, name)
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
        except OSError as e:
            problems.append(f"{full}: {e.strerror}")
    return problems


def prepare_directory(path: str, state: str) -> None:
    if state == "absent":
        os.makedirs(path, mode=0o700)
    elif state == "not_empty":
        problems = clear_directory(path)
        if problems:
            raise RestoreError(f"{path} cannot be emptied: {'; '.join(problems[:3])}")
    os.chmod(path, 0o700)


def undo_directory(path: str, state: str) -> list:
    """Empty (or remove, when it was absent) a target after a failed restore; what could not be removed."""
    try:
        if state == "absent":
            shutil.rmtree(path)
        elif os.path.isdir(path):
            return clear_directory(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return [f"{path}: {e.strerror}"]
    return []


# -- the backup


def backup_sources(backup_dir: str, info: dict) -> dict:
    """{"method", "compression", "base": archive or directory, "spaces": {oid: archive or directory}}."""
    method = info.get("method")
    if method not in ("tar", "cpio", "rsync"):
        raise RestoreError(f"{backup_dir}/{BACKUP_JSON} has method {method!r}; expected tar, cpio or rsync")
    out = {"method": method, "compression": info.get("compression") or "none", "spaces": {}}
    if method == "rsync":
        data = os.path.join(backup_dir, RSYNC_DATA)
        if not os.path.isfile(os.path.join(data, "PG_VERSION")):
            raise RestoreError(f"backup {backup_dir} has method rsync but {data} is not a data directory (no PG_VERSION)")
        out["base"] = data
        base = os.path.join(backup_dir, RSYNC_TABLESPACES)
        for oid in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            if oid.isdigit() and os.path.isdir(os.path.join(base, oid)):
                out["spaces"][oid] = os.path.join(base, oid)
        return out
    for name in sorted(os.listdir(backup_dir)):
        parsed = parse_archive_name(name)  # (key, method, compression)
        if not parsed or parsed[1] != method:
            continue
        key = parsed[0]
        if key in out["spaces"] or (key == "base" and "base" in out):
            raise RestoreError(f"backup {backup_dir} has two archives for {key}")
        if key == "base":
            out["base"] = os.path.join(backup_dir, name)
        else:
            out["spaces"][key] = os.path.join(backup_dir, name)
    if "base" not in out:
        raise RestoreError(f"backup {backup_dir} has no base.{method}[.gz|.zst|.lz4] archive")
    return out


def needed_tools(sources: dict) -> list:
    """Check that every program the restore needs is installed before anything changes."""
    method = sources["method"]
    paths = [sources["base"]] + list(sources["spaces"].values())
    tools = {"rsync": "rsync"}.get(method, method)
    missing = [] if shutil.which(tools) else [tools]
    for path in paths if method != "rsync" else []:
        try:
            if hasattr(path, "finish"):
                read_commands(path.name, stdin=True)
            else:
                read_commands(path)
        except LayoutError as e:
            missing.append(str(e))
    if missing:
        raise HostRefusal(f"cannot restore this {method} backup here: missing {'; '.join(missing)}")
    return paths


def _run_pipeline(stages: list, what: str, cwd: str, stdin=None, guard=None) -> None:
    """Run commands piped into each other (the first from stdin, a file object, when given);
    RestoreError naming the failing stage and its message. guard: a stream scanner the last stage's
    input passes through first (it raises ValueError on what must not reach that stage)."""
    procs = []
    upstream = stdin
    relay, refused = None, []
    try:
        for i, (cmd, stdin_path) in enumerate(stages):
            err = tempfile.TemporaryFile()
            last = i == len(stages) - 1
            stdin = open(stdin_path, "rb") if stdin_path else upstream  # noqa: SIM115 - closed below
            if last and guard is not None:
                p = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
                relay = threading.Thread(target=_relay, args=(stdin, p.stdin, guard, refused), daemon=True)
                relay.start()
            else:
                out = subprocess.DEVNULL if last else subprocess.PIPE
                p = subprocess.Popen(cmd, cwd=cwd, stdin=stdin, stdout=out, stderr=err)
                if stdin is not None:
                    stdin.close()  # only the child holds it now
            procs.append((cmd, p, err))
            upstream = p.stdout
        if relay is not None:
            relay.join()
        if refused:
            raise RestoreError(
                f"{what} cannot be restored: {refused[0]} (the copy stores files and directories only, in newc format: "
                "the backup was changed after it was taken); cpio never got that member; restore another backup"
            )
        failures = []
        for cmd, p, err in procs:
            p.wait()
            err.seek(0)
            text = err.read().decode("utf-8", "replace").strip()
            if p.returncode != 0:
                failures.append(f"{os.path.basename(cmd[0])} exited {p.returncode}: {' | '.join(text.splitlines()[-5:])}")
    finally:
        for _cmd, p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
    if failures:
        raise RestoreError(f"extracting {what} failed: {'; '.join(failures)}")


def _relay(src, dst, guard, refused: list) -> None:
    """Copy src into dst, each chunk through guard before it goes on; what guard refuses ends the copy."""
    try:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            guard.feed(chunk)
            dst.write(chunk)
    except ValueError as e:
        refused.append(str(e))
    except OSError:
        pass  # the last stage ended early: its own error is reported
    finally:
        for f in (dst, src):
            try:
                f.close()
            except OSError:
                pass


def refuse_links(dest: str, what: str) -> None:
    """The copy stores no symbolic links (it follows them), but for an rsync backup's pg_tblspc/<oid> ->
    ../../tablespaces/<oid>. Any other came from a backup changed after it was taken and could point
    anywhere (a running cluster's files, which recovery would then write)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                rel, target = os.path.relpath(full, dest), os.readlink(full)
                oid = rel[len("pg_tblspc/") :] if rel.startswith("pg_tblspc/") else ""
                if not (oid.isdigit() and target == os.path.join("..", "..", RSYNC_TABLESPACES, oid)):
                    found.append(f"{rel} -> {target}")
    if found:
        raise RestoreError(
            f"{what} holds symbolic links ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): the copy stores "
            "none, so the backup was changed after it was taken; restore another backup"
        )


def extract(source: str, dest: str, method: str, names: list | None = None) -> None:
    """Extract one archive (or copy one directory for rsync backups) into dest, which exists and is empty.
    names: only these members (tar), each of which must be there."""
    what = os.path.basename(str(source).rstrip("/"))
    if names is not None:
        if method != "tar":
            raise RestoreError(f"taking single files from a {method} backup is not supported")
        with tempfile.NamedTemporaryFile(prefix=".pgops-names-") as listing:
            listing.write(b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names))
            listing.flush()
            _extract(source, dest, method, what, ["--null", "--verbatim-files-from", "-T", listing.name])
    else:
        _extract(source, dest, method, what, [])
    refuse_links(dest, what)


def _extract(source, dest: str, method: str, what: str, tar_names: list) -> None:
    if method == "rsync":
        # A directory on a repository host (_storage.SshFile) is copied over ssh, straight into dest.
        options, src = source.rsync_source() if hasattr(source, "rsync_source") else ([], source.rstrip("/") + "/")
        _run_pipeline([(["rsync", "-a", *options, "--", src, dest.rstrip("/") + "/"], None)], what, dest)
        return
    unpack = {
        # Names in our archives are relative (maybe "./"); tar refuses ".." and absolute names by default.
        "tar": ["tar", "-x", "-f", "-", "--no-same-owner", "--delay-directory-restore", *tar_names],
        "cpio": ["cpio", "-i", "-d", "-m", "-u", "--no-absolute-filenames", "--quiet"],
    }[method]
    remote = source if hasattr(source, "finish") else None  # in a bucket or on a repository host (_storage), streamed
    try:
        reads = read_commands(remote.name if remote else source, stdin=remote is not None)
    except LayoutError as e:
        raise RestoreError(str(e)) from None
    # cpio writes through a symbolic link it extracted earlier: no member but files and directories reaches it.
    guard = CpioScanner("", None, files_and_dirs_only=True) if method == "cpio" else None
    if remote is None:
        stages = [(cmd, None) for cmd in reads] + [(unpack, None)] if reads else [(unpack, source)]
        _run_pipeline(stages, what, dest, guard=guard)
        return
    stream = remote.open()
    try:
        _run_pipeline([(cmd, None) for cmd in reads] + [(unpack, None)], what, dest, stdin=stream, guard=guard)
    except RestoreError:
        remote.finish(stopped_early=True)
        raise
    try:
        remote.finish()
    except PgopsError as e:
        raise RestoreError(f"extracting {what} failed: {e}") from None


def combine_chain(members: list, data_dir: str, spaces: list, combine: str) -> list:
    """Restore an incremental backup: extract every backup of its chain (oldest first, each a dict with
    backup_dir and sources) into a private scratch directory beside data_dir, each a data directory with
    its backup_label and backup_manifest (and its tablespaces linked from pg_tblspc), then let
    PostgreSQL's pg_combinebackup reconstruct the newest one into data_dir and the tablespaces' new
    paths. The scratch directory is removed whatever happens. Returns the ids combined."""
    scratch = tempfile.mkdtemp(prefix=".pgops-combine-", dir=os.path.dirname(data_dir.rstrip("/")))
    try:
        dirs = []
        mapping = []
        for i, m in enumerate(members):
            method = m["sources"]["method"]
            d = os.path.join(scratch, str(i))
            os.mkdir(d, 0o700)
            extract(m["sources"]["base"], d, method)
            place_label_files(m["backup_dir"], d, method)
            manifest = os.path.join(m["backup_dir"], MANIFEST)
            if os.path.exists(manifest):
                shutil.copyfile(manifest, os.path.join(d, MANIFEST))
            for oid, src in m["sources"]["spaces"].items():
                tdir = os.path.join(scratch, f"{i}.tablespaces", oid)
                os.makedirs(tdir, 0o700)
                extract(src, tdir, method)
                link = os.path.join(d, "pg_tblspc", oid)
                if os.path.lexists(link):
                    os.unlink(link) if os.path.islink(link) else shutil.rmtree(link)
                os.symlink(tdir, link)
                if i == len(members) - 1:
                    paths = [ts["path"] for ts in spaces if ts["oid"] == oid]
                    if not paths:
                        raise RestoreError(
                            f"backup {m['info'].get('id')} holds an archive of tablespace {oid}, which its record does not "
                            "list: the backup is inconsistent; restore another one"
                        )
                    mapping += ["-T", f"{tdir}={paths[0]}"]
            dirs.append(d)
        cmd = [combine, "--no-sync", "-o", data_dir, *mapping, *dirs]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-5:]
            raise RestoreError(f"pg_combinebackup could not reconstruct the chain: {' | '.join(lines)}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [m["info"].get("id") for m in members]


def take_from_parents(members: list, taken: dict, data_dir: str, spaces: list) -> dict:
    """A file-level incremental (tar): after its own archives, extract from each earlier backup of its
    chain (dicts with info and sources) the files it took from that one. {backup id: files}."""
    by_holder = {}
    for path, t in taken.items():
        by_holder.setdefault(t["from"], []).append(path)
    where = {ts["oid"]: ts["path"] for ts in spaces}
    out = {}
    for m in members:
        bid = m["info"].get("id")
        paths = by_holder.pop(bid, [])
        if not paths:
            continue
        groups = {}
        for path in paths:
            parts = path.split("/", 2)
            key = parts[1] if parts[0] == "pg_tblspc" and len(parts) == 3 else "base"
            groups.setdefault(key, []).append(parts[2] if key != "base" else path)
        for key, names in groups.items():
            source = m["sources"]["base"] if key == "base" else m["sources"]["spaces"].get(key)
            if source is None or (key != "base" and key not in where):
                raise RestoreError(f"backup {bid} holds no tablespace {key}, which the incremental backup takes from it")
            extract(source, data_dir if key == "base" else where[key], m["sources"]["method"], names)
        out[bid] = len(paths)
    if by_holder:
        raise RestoreError(f"the incremental backup takes files from {', '.join(sorted(by_holder))}, not in its chain")
    return out


def peek_tar_config(archive: str, limit: int = 5000) -> dict:
    """{name: text} of postgresql.conf / postgresql.auto.conf at the top of a (compressed) tar, without extracting.

    The copy puts the data directory's top-level files first, so this reads only the start of the stream.
    """
    import tarfile  # only needed here

    wanted = {"postgresql.conf", "postgresql.auto.conf"}
    found = {}
    remote = archive if hasattr(archive, "finish") else None  # in a bucket or on a repository host, streamed
    try:
        reader = PlainReader(remote.name, source=remote.open()) if remote else PlainReader(archive)
        with reader as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
            for n, member in enumerate(tf):
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                if name in wanted and member.isreg():
                    found[name] = tf.extractfile(member).read().decode("utf-8", "replace")
                if len(found) == len(wanted) or n > limit:
                    break
            reader.abandon()  # the rest of the archive is not needed
    except (LayoutError, OSError, tarfile.TarError, EOFError):
        return found
    finally:
        if remote is not None:
            try:
                remote.finish(stopped_early=True)
            except PgopsError:
                pass
    return found


# -- the restored data directory


def place_label_files(backup_dir: str, data_dir: str, method: str) -> list:
    """backup_label and tablespace_map from the backup root into the restored data directory (tar, cpio)."""
    placed = []
    if method == "rsync":
        return placed  # data/ already holds them
    for name in LABEL_FILES:
        src = os.path.join(backup_dir, name)
        dst = os.path.join(data_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o600)
            placed.append(name)
        elif name == "tablespace_map" and os.path.exists(dst):
            os.unlink(dst)  # a map inside the archive without one at the root would be stale
    return placed


def tidy_data_directory(data_dir: str, major: int) -> list:
    """Remove what must not come from the original server; create the directories the server needs."""
    removed = []
    for name in STALE_FILES:
        path = os.path.join(data_dir, name)
        if os.path.lexists(path):
            os.unlink(path)
            removed.append(name)
    for sub in EMPTY_DIRS + (("pg_wal/summaries",) if major >= 17 else ()):
        path = os.path.join(data_dir, sub)
        if os.path.islink(path):
            # A backup that carried a link (e.g. pg_wal on another volume, made by
            # another tool) must never lead us into the original's directory.
            os.unlink(path)
            removed.append(f"{sub} (link)")
        os.makedirs(path, mode=0o700, exist_ok=True)
    slots = os.path.join(data_dir, "pg_replslot")
    for name in os.listdir(slots):
        shutil.rmtree(os.path.join(slots, name), ignore_errors=True)
        removed.append(f"pg_replslot/{name}")
    wal = os.path.join(data_dir, "pg_wal")
    for name in os.listdir(wal):
        full = os.path.join(wal, name)
        if os.path.isfile(full) and (WAL_NAME_RE.match(name) or name.endswith(".partial")):
            os.unlink(full)  # WAL comes from the archive; an old segment here would be replayed first
            removed.append(f"pg_wal/{name}")
    return removed


def link_tablespaces(data_dir: str, spaces: list) -> None:
    """pg_tblspc/<oid> → the new location (the server would recreate them from tablespace_map too)."""
    tblspc = os.path.join(data_dir, "pg_tblspc")
    for ts in spaces:
        link = os.path.join(tblspc, ts["oid"])
        if os.path.lexists(link):
            if os.path.isdir(link) and not os.path.islink(link):
                shutil.rmtree(link)
            else:
                os.unlink(link)
        os.symlink(ts["path"], link)


def write_minimal_configs(data_dir: str) -> list:
    """Data directories whose configuration lives elsewhere (Debian's /etc/postgresql): give the server minimal files."""
    created = []
    defaults = {
        "postgresql.conf": "# Created by pgops.online_backup.pg_restore_prepare: the backed-up data directory had no\n"
        "# postgresql.conf (its configuration lived elsewhere). Settings are in postgresql.auto.conf.\n",
        "pg_hba.conf": "# Created by pgops.online_backup.pg_restore_prepare (the backup had none): local OS users only.\n"
        "local all all peer\n",
        "pg_ident.conf": "",
    }
    for name, text in defaults.items():
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            write_private_file(path, text.encode("utf-8"))
            created.append(name)
    return created


# -- its configuration files


def conf_texts(data_dir: str) -> list:
    """postgresql.conf then postgresql.auto.conf of a data directory (the ones that exist)."""
    texts = []
    for name in ("postgresql.conf", "postgresql.auto.conf"):
        try:
            with open(os.path.join(data_dir, name), encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        except OSError:
            continue
    return texts


def read_conf(data_dir: str) -> dict:
    """Settings of a data directory's postgresql.conf overridden by postgresql.auto.conf (active lines only)."""
    out = {}
    for text in conf_texts(data_dir):
        for line in text.splitlines():
            key = conf_key(line)
            if key:
                value = conf_value(line, key)
                if value is not None:
                    out[key] = value
    return out


def config_port(texts: list):
    """The port the configuration texts (in reading order) set, or None when none sets it."""
    port = None
    for text in texts:
        value = conf_value(text, "port")
        if value is not None and value.isdigit():
            port = int(value)
    return port


def original_port(data_dir: str) -> int:
    """The port the backed-up server used, from its copied configuration (PostgreSQL's default 5432)."""
    return config_port(conf_texts(data_dir)) or 5432


# -- WAL archive


def wal_files_needed(start_wal: str, stop_wal: str, seg_size=None) -> list:
    """Segments from start to stop; without the segment size (backup.json may not say), only when
    they share a log file (otherwise, and for a very long range, the two ends only)."""
    if not (WAL_NAME_RE.match(start_wal or "") and WAL_NAME_RE.match(stop_wal or "")):
        return []
    seg_size = int(seg_size) if str(seg_size or "").isdigit() else None
    if seg_size not in WAL_SEGMENT_SIZES:
        if start_wal[:16] != stop_wal[:16]:
            return [start_wal, stop_wal]
        # Within one log file a segment's number is the same for every size; the smallest
        # size has the most segments there, so it names any of them.
        seg_size = WAL_SEGMENT_SIZES[0]
    if not 1 <= wal_segment_count(start_wal, stop_wal, seg_size) <= MAX_WAL_CHECKED:
        return [start_wal, stop_wal]
    return wal_segment_names(start_wal, stop_wal, seg_size)


def missing_wal(archive: str, names: list, present: set | None = None, plain: bool = False) -> list:
    """Names not found in a WAL archive directory: each must be there under its exact name, or
    compressed (name.gz, .zst, .lz4), encrypted or not (.age) - only under its exact name when plain
    (what a plain cp restore_command can use). Other files that share its stem (the backup's own
    <segment>.<offset>.backup history file, a .partial) do not stand in for it."""
    if present is None:
        try:
            present = set(os.listdir(archive))
        except OSError as e:
            raise RestoreError(f"WAL archive {archive} cannot be read: {e.strerror}") from None
    suffixes = ("",) if plain else STORED_SUFFIXES
    return [n for n in names if not any(n + suffix in present for suffix in suffixes)]
