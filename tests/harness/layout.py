"""Restore a backup of our repository layout by hand, the way PostgreSQL's
documentation describes it: no code of the collection is used here, so a
test that passes proves the layout alone is enough to restore."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from harness.pg import PG_USER, Cluster, chown_pg

DECOMPRESS = {".zst": ["zstd", "-dc"], ".lz4": ["lz4", "-dc"], ".gz": ["gzip", "-dc"]}


def _unpack(archive: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    suffix = os.path.splitext(archive)[1]
    fmt = "cpio" if ".cpio" in os.path.basename(archive) else "tar"
    unpack = ["tar", "-xf", "-", "-C", target] if fmt == "tar" else ["cpio", "-idm", "--quiet", "-D", target]
    with open(archive, "rb") as src:
        if suffix in DECOMPRESS:
            dec = subprocess.Popen(DECOMPRESS[suffix] + [archive], stdout=subprocess.PIPE)
            subprocess.run(unpack, stdin=dec.stdout, check=True)
            dec.stdout.close()
            assert dec.wait() == 0
        else:
            subprocess.run(unpack, stdin=src, check=True)


def restore_backup(backup_dir: str, archive: str, major: int, target: str = "immediate", timeout: float = 90) -> Cluster:
    """Unpack base and tablespaces into new places, remap tablespace_map,
    restore_command from the WAL archive, recovery.signal, start, wait."""
    info = json.load(open(os.path.join(backup_dir, "backup.json")))
    assert info["status"] == "complete", info["status"]
    c = Cluster(major, name="manual")
    spaces = {str(ts["oid"]): os.path.join(c.root, f"ts_{ts['oid']}") for ts in info.get("tablespaces") or []}
    if info["method"] == "rsync":
        shutil.copytree(os.path.join(backup_dir, "data"), c.data, symlinks=True)
        for oid, new in spaces.items():
            shutil.copytree(os.path.join(backup_dir, "tablespaces", oid), new, symlinks=True)
            os.unlink(os.path.join(c.data, "pg_tblspc", oid))
    else:
        names = os.listdir(backup_dir)
        base = [n for n in names if n.startswith("base.")]
        assert len(base) == 1, names
        _unpack(os.path.join(backup_dir, base[0]), c.data)
        for oid, new in spaces.items():
            (arch,) = [n for n in names if n.startswith(f"{oid}.")]
            _unpack(os.path.join(backup_dir, arch), new)
        shutil.copyfile(os.path.join(backup_dir, "backup_label"), os.path.join(c.data, "backup_label"))
    if spaces:
        # tablespace_map: "<oid> <path>" per line; point each at its new place.
        with open(os.path.join(c.data, "tablespace_map"), "w") as f:
            f.write("".join(f"{oid} {path}\n" for oid, path in spaces.items()))
    for d in ("pg_wal/archive_status",):
        os.makedirs(os.path.join(c.data, d), exist_ok=True)
    subprocess.run(["chown", "-R", f"{PG_USER}:", c.root], check=True)
    os.chmod(c.data, 0o700)
    with open(os.path.join(c.data, "postgresql.auto.conf"), "a") as f:
        f.write(f"restore_command = 'cp {archive}/%f %p'\n")
        if target == "immediate":
            f.write("recovery_target = 'immediate'\nrecovery_target_action = 'promote'\n")
    c.set_conf(port=c.port, unix_socket_directories=f"'{c.sock}'", listen_addresses="''", archive_mode="off")
    open(os.path.join(c.data, "recovery.signal"), "w").close()
    chown_pg(os.path.join(c.data, "recovery.signal"))
    try:
        c.start()
        deadline = time.monotonic() + timeout
        while c.sql("SELECT pg_is_in_recovery()")[0][0]:
            assert time.monotonic() < deadline, "recovery did not finish"
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - any failure: show the server log, then re-raise
        log = open(c.log).read()[-4000:] if os.path.exists(c.log) else ""
        c.destroy()
        raise AssertionError(f"restore failed; server log:\n{log}") from None
    return c
