"""Restore a backup of our repository layout by hand, the way PostgreSQL's
documentation describes it: no code of the collection is used here, so a
test that passes proves the layout alone is enough to restore."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from harness.pg import Cluster, recover

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
    return recover(c, archive, target, timeout)
