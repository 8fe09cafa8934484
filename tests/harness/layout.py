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


def _unpack(archive: str, target: str, identity: str | None = None) -> None:
    """Decrypt (age -d -i, for base.tar.zst.age), decompress and unpack, piped as a DBA would type it."""
    os.makedirs(target, exist_ok=True)
    name = os.path.basename(archive)
    fmt = "cpio" if ".cpio" in name else "tar"
    stages = []
    if name.endswith(".age"):
        stages.append(["age", "-d", "-i", identity])
        name = name[: -len(".age")]
    suffix = os.path.splitext(name)[1]
    if suffix in DECOMPRESS:
        stages.append(DECOMPRESS[suffix])
    stages.append(["tar", "-xf", "-", "-C", target] if fmt == "tar" else ["cpio", "-idm", "--quiet", "-D", target])
    procs = []
    upstream = open(archive, "rb")  # noqa: SIM115 - closed below
    for i, cmd in enumerate(stages):
        p = subprocess.Popen(cmd, stdin=upstream, stdout=subprocess.PIPE if i < len(stages) - 1 else None)
        upstream.close()
        procs.append(p)
        upstream = p.stdout
    for p in procs:
        assert p.wait() == 0, p.args


def restore_backup(
    backup_dir: str, archive: str, major: int, target: str = "immediate", timeout: float = 90, identity: str | None = None
) -> Cluster:
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
        _unpack(os.path.join(backup_dir, base[0]), c.data, identity)
        for oid, new in spaces.items():
            (arch,) = [n for n in names if n.startswith(f"{oid}.")]
            _unpack(os.path.join(backup_dir, arch), new, identity)
        shutil.copyfile(os.path.join(backup_dir, "backup_label"), os.path.join(c.data, "backup_label"))
    if spaces:
        # tablespace_map: "<oid> <path>" per line; point each at its new place.
        with open(os.path.join(c.data, "tablespace_map"), "w") as f:
            f.write("".join(f"{oid} {path}\n" for oid, path in spaces.items()))
    return recover(c, archive, target, timeout)
