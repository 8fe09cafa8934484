"""pg_backup_manifest and pg_backup_info against real backups of real servers, through real ansible-playbook.

One online backup per major (15: Debian's pg_verifybackup, 17: the PostgreSQL 17 client tools) is taken
with pg_backup_session and copied three ways while it runs: rsync (data/ + tablespaces/<oid>/), tar and
cpio, in the repository layout the pg_backup role writes. pg_verifybackup is the judge of our manifests.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from harness import scratch
from harness.ansible import collections_workspace, local_inventory, run_playbook
from harness.pg import TOOLS17, Cluster, make_pg_dir

sys.path.insert(0, collections_workspace())
from ansible_collections.pgops.online_backup.plugins.module_utils import _checksum  # noqa: E402
from ansible_collections.pgops.online_backup.plugins.module_utils import _layout as layout  # noqa: E402
from ansible_collections.pgops.online_backup.plugins.module_utils import _manifest as mf  # noqa: E402

MANIFEST = "pgops.online_backup.pg_backup_manifest"
INFO = "pgops.online_backup.pg_backup_info"
SESSION = "pgops.online_backup.pg_backup_session"
VERIFYBACKUP = {15: "/usr/lib/postgresql/15/bin/pg_verifybackup", 17: os.path.join(TOOLS17, "pg_verifybackup")}
ARCHIVES = {15: ("gz", None), 17: ("zst", "lz4")}  # (tar compression, cpio compression) per major
IDS = {"rsync": "20261129T101500Z", "tar": "20261129T101501Z", "cpio": "20261129T101502Z"}
FLIP = "import sys; f = open(sys.argv[1], 'r+b'); f.seek(1000); b = f.read(1); f.seek(1000); f.write(bytes([b[0] ^ 255]))"
EXCLUDES_FIND = r"\( -path './pg_wal/*' -o -name postmaster.pid -o -name postmaster.opts \) -prune -o -print"
TAR_EXCLUDES = "--exclude=./pg_wal/* --exclude=./postmaster.pid --exclude=./postmaster.opts"


def play(tasks: list, **vars) -> list:
    return [{"hosts": "postgresql", "gather_facts": False, "vars": vars, "tasks": tasks}]


def run(plays: list, workdir) -> object:
    os.makedirs(workdir, exist_ok=True)
    r = run_playbook(plays, local_inventory(), workdir=str(workdir), timeout=300)
    failed = [
        f"{e['task']}: {e['result'].get('msg')} {e['result'].get('stderr', '')}" for e in r.results if e["status"] == "failed"
    ]
    assert r.rc == 0, "\n".join(failed) or repr(r)
    return r


def suffix(compression: str | None) -> str:
    return f".{compression}" if compression else ""


def compressor(compression: str | None) -> str:
    return {None: "cat", "gz": "gzip -1", "zst": "zstd -q -1", "lz4": "lz4 -q"}[compression]


class BackupSet:
    """One online backup of a cluster with a tablespace, in rsync, tar and cpio layouts."""

    def __init__(self, major: int, base):
        self.major = major
        # Made inside the first test that asks for them, kept for the module: destroy() removes them.
        self.cluster = Cluster(major)
        scratch.keep(self.cluster.root)
        self.ts_dir = scratch.keep(make_pg_dir(f"pgops-ts{major}-"))
        try:
            self._make(base)
        except BaseException:
            self.destroy()  # never leave a server running after a failed setup
            raise

    def _make(self, base) -> None:
        major = self.major
        c = self.cluster.init()
        c.start()
        c.sql(f"CREATE TABLESPACE ts LOCATION '{self.ts_dir}'")
        c.sql("CREATE TABLE t_main AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g")
        c.sql("CREATE TABLE t_ts TABLESPACE ts AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g")
        c.sql("CHECKPOINT")
        self.oid = str(c.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")[0][0])
        self.main_file = c.sql("SELECT pg_relation_filepath('t_main')")[0][0]  # base/<db>/<relfilenode>
        ts_file = c.sql("SELECT pg_relation_filepath('t_ts')")[0][0]  # pg_tblspc/<oid>/PG_.../<db>/<relfilenode>
        self.ts_file = ts_file
        self.ts_member = ts_file.split("/", 2)[2]  # relative to the tablespace directory
        self.base = str(base)
        self.repo = os.path.join(self.base, "repo")
        self.dirs = {m: os.path.join(self.repo, i) for m, i in IDS.items()}
        for d in self.dirs.values():
            os.makedirs(d)
        self.tar_comp, self.cpio_comp = ARCHIVES[major]
        self.stop = self._take(base)
        self._finish()

    def _take(self, base) -> dict:
        c, d, oid = self.cluster, self.dirs, self.oid
        tar_s, cpio_s = suffix(self.tar_comp), suffix(self.cpio_comp)
        conn = c.conn_vars()
        sh = {"executable": "/bin/bash"}
        copy = [
            {"name": "rsync data", "ansible.builtin.shell": {
                "cmd": f"rsync -a --exclude=/pg_wal/* --exclude=/postmaster.pid --exclude=/postmaster.opts "
                       f"{c.data}/ {d['rsync']}/data/ || [ $? -eq 24 ]", **sh}},
            {"name": "rsync tablespace", "ansible.builtin.shell":
                f"mkdir -p {d['rsync']}/tablespaces && rsync -a {self.ts_dir}/ {d['rsync']}/tablespaces/{oid}/"},
            {"name": "relink tablespace", "ansible.builtin.file": {
                "src": f"../../tablespaces/{oid}", "dest": f"{d['rsync']}/data/pg_tblspc/{oid}", "state": "link", "force": True}},
            {"name": "tar data", "ansible.builtin.shell": {
                "cmd": f"tar -C {c.data} -cf - {TAR_EXCLUDES} --warning=no-file-changed --warning=no-file-removed . "
                       f"| {compressor(self.tar_comp)} > {d['tar']}/base.tar{tar_s}; s=(${{PIPESTATUS[@]}}); "
                       "[ ${s[0]} -le 1 ] && [ ${s[1]} -eq 0 ]", **sh}},
            {"name": "tar tablespace", "ansible.builtin.shell": {
                "cmd": f"set -o pipefail; tar -C {self.ts_dir} -cf - . "
                       f"| {compressor(self.tar_comp)} > {d['tar']}/{oid}.tar{tar_s}", **sh}},
            {"name": "cpio data", "ansible.builtin.shell": {
                "cmd": f"set -o pipefail; cd {c.data} && find . {EXCLUDES_FIND} | cpio -o -H newc --quiet "
                       f"| {compressor(self.cpio_comp)} > {d['cpio']}/base.cpio{cpio_s}", **sh}},
            {"name": "cpio tablespace", "ansible.builtin.shell": {
                "cmd": f"set -o pipefail; cd {self.ts_dir} && find . | cpio -o -H newc --quiet "
                       f"| {compressor(self.cpio_comp)} > {d['cpio']}/{oid}.cpio{cpio_s}", **sh}},
        ]  # fmt: skip
        tasks = [
            {"name": "start", SESSION: {"state": "started", "label": f"manifest test {self.major}", "fast": True, **conn},
             "register": "b"},
            {"block": copy + [
                {"name": "stop", SESSION: {"state": "stopped", "session_id": "{{ b.session_id }}", "dest": d["rsync"],
                                           "archive_timeout": 60, **conn}},
            ], "rescue": [
                {"name": "abort", SESSION: {"state": "aborted", "session_id": "{{ b.session_id }}"}},
                {"name": "fail", "ansible.builtin.fail": {"msg": "backup failed"}},
            ]},
        ]  # fmt: skip
        r = run(play(tasks), os.path.join(str(base), "take"))
        return r.task("stop")

    def _finish(self) -> None:
        s, d = self.stop, self.dirs
        for name in ("backup_label", "tablespace_map"):
            for dest in (os.path.join(d["rsync"], "data"), d["tar"], d["cpio"]):
                shutil.copy2(os.path.join(d["rsync"], name), os.path.join(dest, name))
        comps = {"rsync": None, "tar": self.tar_comp, "cpio": self.cpio_comp}
        for method, bid in IDS.items():
            files = [] if method == "rsync" else sorted(n for n in os.listdir(d[method]) if layout.parse_archive_name(n))
            self.write_info(d[method], {
                "schema": 1, "id": bid, "label": s["label"], "status": "complete", "method": method,
                "compression": compression_name(comps[method]), "started_at": s["started_at"],
                "stopped_at": s["stopped_at"], "start_lsn": s["start_lsn"], "stop_lsn": s["stop_lsn"],
                "start_wal": s["start_wal"], "stop_wal": s["stop_wal"], "timeline": s["timeline"],
                "system_identifier": s["system_identifier"], "pg_version": s["server_version_num"],
                "pg_version_text": s["server_version"], "data_directory": self.cluster.data,
                "tablespaces": [{"oid": int(self.oid), "name": "ts", "location": self.ts_dir}],
                "bytes": 0, "host": "localhost", "collection_version": "0.1.0", "files": files,
            })  # fmt: skip

    @staticmethod
    def write_info(path: str, doc: dict) -> None:
        with open(os.path.join(path, "backup.json"), "w") as f:
            json.dump(doc, f)

    def info(self, method: str) -> dict:
        with open(os.path.join(self.dirs[method], "backup.json")) as f:
            return json.load(f)

    def destroy(self) -> None:
        self.cluster.destroy()
        shutil.rmtree(self.ts_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def backups(tmp_path_factory):
    made = {}

    def get(major: int) -> BackupSet:
        if major not in made:
            made[major] = BackupSet(major, tmp_path_factory.mktemp(f"manifest{major}"))
        return made[major]

    yield get
    for b in made.values():
        b.destroy()


def pg_verifybackup(major: int, data_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VERIFYBACKUP[major], *args, "-n", data_dir], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}
    )


def failed(r, name: str) -> bool:
    """Whether the task failed (the recorder keeps the status beside the result)."""
    return [e["status"] for e in r.results if e["task"] == name][-1] == "failed"


def problems_of(result: dict) -> list:
    return [(p["path"], p["problem"]) for p in result["problems"]]


@pytest.mark.parametrize("major", [15, 17])
def test_plain_backup_manifest_accepted_and_corruption_found_by_both(major, backups, tmp_path):
    bs = backups(major)
    b = bs.dirs["rsync"]
    data = os.path.join(b, "data")
    flipped = os.path.join(data, bs.main_file)
    removed = os.path.join(b, "tablespaces", bs.oid, bs.ts_member)
    removed_path = bs.ts_file  # pg_tblspc/<oid>/..., as both tools name it
    # A copy for CRC32C, with names that need JSON escaping and one that is not UTF-8 (Encoded-Path).
    crc = os.path.join(bs.base, "crc32c")
    shutil.copytree(b, crc, symlinks=True)
    odd = [os.path.join(os.fsencode(crc), b"data/base/1/caf\xe9"), os.path.join(os.fsencode(crc), b'data/base/1/we"ird\tname')]
    for path in odd:
        with open(path, "wb") as f:
            f.write(b"odd")
    verify = {"path": b, "state": "verified"}
    lenient = {**verify, "fail_on_error": False}
    tasks = [
        {"name": "would write", MANIFEST: {"path": b}, "check_mode": True},
        {"name": "write", MANIFEST: {"path": b}},
        {"name": "write again", MANIFEST: {"path": b}},
        {"name": "verify good", MANIFEST: verify},
        {"name": "verify with WAL", MANIFEST: {**verify, "wal_archive": bs.cluster.archive}},
        {"name": "flip a byte", "ansible.builtin.command": {"argv": ["python3", "-c", FLIP, flipped]}},
        {"name": "verify flipped", MANIFEST: lenient},
        {"name": "verify flipped and fail", MANIFEST: verify, "ignore_errors": True},
        {"name": "flip it back", "ansible.builtin.command": {"argv": ["python3", "-c", FLIP, flipped]}},
        {"name": "remove a file", "ansible.builtin.command": {"argv": ["mv", removed, f"{b}.moved"]}},
        {"name": "verify removed", MANIFEST: lenient},
        {"name": "put it back", "ansible.builtin.command": {"argv": ["mv", f"{b}.moved", removed]}},
        {"name": "add a file", "ansible.builtin.copy": {"content": "new", "dest": f"{data}/base/1/99999"}},
        {"name": "verify added", MANIFEST: lenient},
        {"name": "remove the added file", "ansible.builtin.file": {"path": f"{data}/base/1/99999", "state": "absent"}},
        {"name": "verify restored", MANIFEST: verify},
        {"name": "write crc32c", MANIFEST: {"path": crc, "checksum_algorithm": "CRC32C", "force": True}},
        {"name": "verify crc32c", MANIFEST: {"path": crc, "state": "verified"}},
    ]
    r = run(play(tasks), tmp_path / "pb")

    assert r.task("would write")["changed"] is True
    w = r.task("write")
    assert w["changed"] is True
    assert w["manifest"] == [os.path.join(data, "backup_manifest"), os.path.join(b, "backup_manifest")]
    assert (w["method"], w["manifest_version"], w["checksum_algorithm"]) == ("rsync", 2 if major >= 17 else 1, "SHA256")
    assert w["files"] > 500 and w["bytes"] > 5_000_000
    assert r.task("write again")["changed"] is False
    with open(os.path.join(data, "backup_manifest"), "rb") as f:
        text = f.read()
    with open(os.path.join(b, "backup_manifest"), "rb") as f:
        assert f.read() == text
    assert oct(os.stat(os.path.join(b, "backup_manifest")).st_mode & 0o777) == "0o600"
    manifest = mf.parse_manifest(text)
    assert manifest.version == (2 if major >= 17 else 1)
    if major >= 17:
        assert str(manifest.system_identifier) == bs.stop["system_identifier"]
    assert manifest.wal_ranges == [{"timeline": 1, "start_lsn": bs.stop["start_lsn"], "end_lsn": bs.stop["stop_lsn"]}]
    assert {"backup_label", "tablespace_map", "global/pg_control", bs.main_file, removed_path} <= set(manifest.files)
    assert not [p for p in manifest.files if p.startswith("pg_wal/") or p in ("backup_manifest", "backup.json")]

    good = r.task("verify good")
    assert good["verified"] is True and good["problems"] == []
    pgv = good["pg_verifybackup"]
    assert pgv["ran"] and pgv["ok"], pgv
    assert pgv["path"] == VERIFYBACKUP[major] and f"(PostgreSQL) {major}." in pgv["version"]
    assert "-n" in pgv["command"] and pgv["output"] == ["backup successfully verified"]
    with_wal = r.task("verify with WAL")["pg_verifybackup"]
    assert with_wal["ok"] and "-w" in with_wal["command"], with_wal  # pg_waldump parsed our WAL range

    # Each damage is named by our verify and by pg_verifybackup.
    cases = [
        ("verify flipped", bs.main_file, "checksum", f'checksum mismatch for file "{bs.main_file}"'),
        ("verify removed", removed_path, "missing", f'"{removed_path}" is present in the manifest but not on disk'),
        ("verify added", "base/1/99999", "extra", '"base/1/99999" is present on disk but not in the manifest'),
    ]
    for task, path, kind, pg_says in cases:
        res = r.task(task)
        assert res["verified"] is False and not failed(r, task)
        assert problems_of(res) == [(path, kind)], res["problems"]
        assert res["pg_verifybackup"]["ran"] and not res["pg_verifybackup"]["ok"]
        assert any(pg_says in line for line in res["pg_verifybackup"]["output"]), res["pg_verifybackup"]["output"]
    assert failed(r, "verify flipped and fail")
    msg = r.task("verify flipped and fail")["msg"]
    assert f"{bs.main_file}: checksum mismatch" in msg and "pg_verifybackup: " in msg
    assert r.task("verify restored")["verified"] is True

    # pg_verifybackup on its own accepts the backup, and the last verification is recorded.
    direct = pg_verifybackup(major, data)
    assert direct.returncode == 0, direct.stderr
    rec = bs.info("rsync")["verification"]
    assert rec["verified"] is True and rec["problems_count"] == 0 and f"PostgreSQL) {major}." in rec["tool"]

    # CRC32C (byte order as PostgreSQL writes it) and Encoded-Path are accepted by pg_verifybackup.
    assert r.task("write crc32c")["changed"] is True and r.task("verify crc32c")["pg_verifybackup"]["ok"]
    with open(os.path.join(crc, "data", "backup_manifest"), "rb") as f:
        crc_text = f.read()
    assert b'"Checksum-Algorithm": "CRC32C"' in crc_text and b'"Encoded-Path": "626173652f312f636166e9"' in crc_text
    assert b'"Path": "base/1/we\\"ird\\tname"' in crc_text
    direct = pg_verifybackup(major, os.path.join(crc, "data"))
    assert direct.returncode == 0, direct.stderr
    crc_manifest = mf.parse_manifest(crc_text)
    with open(os.path.join(crc, "data", "PG_VERSION"), "rb") as f:
        assert crc_manifest.files["PG_VERSION"].checksum == _checksum.Crc32c(f.read()).hexdigest()


def compression_name(suffix) -> str:
    """zst -> zstd, None -> none: the name backup.json records for an archive suffix."""
    return layout.compression_of_file(f"x.{suffix}") if suffix else "none"


DECOMPRESS = {"gz": ["gzip", "-dc"], "zst": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}
COMPRESS = {"gz": ["gzip", "-1c"], "zst": ["zstd", "-qc1"], "lz4": ["lz4", "-qc"]}


def corrupt_member(archive: str, member: str, kind: str) -> None:
    """Flip one byte of a member's data inside a (compressed) archive, keeping everything else."""
    comp = layout.suffix_of(layout.compression_of_file(archive)).lstrip(".") or None
    with open(archive, "rb") as f:
        blob = f.read()
    if comp:
        blob = subprocess.run(DECOMPRESS[comp], input=blob, capture_output=True, check=True).stdout
    if kind == "tar":
        with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
            offset = next(m.offset_data for m in tf if mf.member_name(m.name) == member)
    else:
        offset = next(m.offset for m in mf.iter_cpio(io.BytesIO(blob)) if mf.member_name(os.fsdecode(m.name)) == member)
    buf = bytearray(blob)
    buf[offset + 1000] ^= 0xFF
    blob = bytes(buf)
    if comp:
        blob = subprocess.run(COMPRESS[comp], input=blob, capture_output=True, check=True).stdout
    with open(archive, "wb") as f:
        f.write(blob)


def extract_and_pg_verifybackup(bs: BackupSet, method: str, tmp_path) -> subprocess.CompletedProcess:
    """Restore by hand (PostgreSQL docs + our layout) and let pg_verifybackup judge our archive manifest."""
    src = bs.dirs[method]
    data = tmp_path / "restored"
    ts = tmp_path / "restored_ts"
    data.mkdir()
    ts.mkdir()
    comp = {"tar": bs.tar_comp, "cpio": bs.cpio_comp}[method]
    unpack = {None: "cat", "gz": "gzip -dc", "zst": "zstd -dcq", "lz4": "lz4 -dcq"}[comp]
    extract = "tar -xf -" if method == "tar" else "cpio -idm --quiet"
    for name, dest in ((f"base.{method}{suffix(comp)}", data), (f"{bs.oid}.{method}{suffix(comp)}", ts)):
        subprocess.run(
            f"set -o pipefail; {unpack} {src}/{name} | {extract}", shell=True, cwd=dest, check=True, executable="/bin/bash"
        )
    link = data / "pg_tblspc" / bs.oid
    link.unlink()
    link.symlink_to(ts)
    for name in ("backup_label", "tablespace_map", "backup_manifest"):
        shutil.copy(os.path.join(src, name), data / name)
    return pg_verifybackup(bs.major, str(data))


@pytest.mark.parametrize("major", [15, 17])
def test_tar_and_cpio_backups(major, backups, tmp_path):
    bs = backups(major)
    tar, cpio = bs.dirs["tar"], bs.dirs["cpio"]
    tasks = [
        {"name": "write tar", MANIFEST: {"path": tar}},
        {"name": "verify tar", MANIFEST: {"path": tar, "state": "verified"}},
        {"name": "write cpio", MANIFEST: {"path": cpio, "checksum_algorithm": "CRC32C"}},
        {"name": "verify cpio", MANIFEST: {"path": cpio, "state": "verified"}},
    ]
    r = run(play(tasks), tmp_path / "pb1")
    for name, method, comp in (("tar", "tar", bs.tar_comp), ("cpio", "cpio", bs.cpio_comp)):
        w, v = r.task(f"write {name}"), r.task(f"verify {name}")
        assert (w["method"], w["compression"]) == (method, compression_name(comp))
        assert w["manifest"] == [os.path.join(bs.dirs[method], "backup_manifest")]
        assert v["verified"] is True and v["problems"] == [] and v["files"] == w["files"]
        assert v["pg_verifybackup"] == {"ran": False, "reason": f"{method} backups are verified by this module only"}
    with open(os.path.join(tar, "backup_manifest"), "rb") as f:
        tar_manifest = mf.parse_manifest(f.read())
    assert {"backup_label", "tablespace_map", bs.main_file, bs.ts_file} <= set(tar_manifest.files)
    assert not [p for p in tar_manifest.files if p.startswith(("./", "pg_wal/")) or p == f"pg_tblspc/{bs.oid}"]

    # The archive's manifest paths are those of the restored data directory: pg_verifybackup agrees.
    method = "tar" if major == 17 else "cpio"
    checked = extract_and_pg_verifybackup(bs, method, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    corrupt_member(os.path.join(tar, f"base.tar{suffix(bs.tar_comp)}"), bs.main_file, "tar")
    corrupt_member(os.path.join(cpio, f"{bs.oid}.cpio{suffix(bs.cpio_comp)}"), bs.ts_member, "cpio")
    # A backup without its label, and a directory that is no backup at all.
    nolabel = tmp_path / "nolabel"
    (nolabel / "src").mkdir(parents=True)
    (nolabel / "src" / "PG_VERSION").write_text("15\n")
    subprocess.run(["tar", "-C", str(nolabel / "src"), "-cf", str(nolabel / "base.tar"), "."], check=True)
    BackupSet.write_info(str(nolabel), {**bs.info("tar"), "method": "tar", "files": ["base.tar"], "tablespaces": []})
    tasks = [
        {"name": "verify tar", MANIFEST: {"path": tar, "state": "verified", "fail_on_error": False}},
        {"name": "verify cpio in check mode", MANIFEST: {"path": cpio, "state": "verified", "fail_on_error": False},
         "check_mode": True},
        {"name": "verify cpio", MANIFEST: {"path": cpio, "state": "verified"}, "ignore_errors": True},
        {"name": "write without label", MANIFEST: {"path": str(nolabel)}, "ignore_errors": True},
        {"name": "verify without manifest", MANIFEST: {"path": str(nolabel), "state": "verified", "fail_on_error": False}},
        {"name": "verify no backup", MANIFEST: {"path": str(tmp_path), "state": "verified", "fail_on_error": False}},
    ]  # fmt: skip
    r = run(play(tasks), tmp_path / "pb2")
    bad_tar = r.task("verify tar")
    assert bad_tar["verified"] is False and problems_of(bad_tar) == [(bs.main_file, "checksum")]
    assert bad_tar["problems"][0]["expected"] == tar_manifest.files[bs.main_file].checksum
    bad_cpio = r.task("verify cpio")
    assert failed(r, "verify cpio") and problems_of(bad_cpio) == [(bs.ts_file, "checksum")]
    assert f"{bs.ts_file}: checksum mismatch" in bad_cpio["msg"]
    assert bs.info("cpio")["verification"]["verified"] is False
    assert bs.info("cpio")["verification"]["problems_count"] == 1
    assert problems_of(r.task("verify cpio in check mode")) == [(bs.ts_file, "checksum")]
    assert "verification" not in r.task("verify cpio in check mode")  # check mode records nothing
    assert (
        failed(r, "write without label") and "backup_label at the backup root is missing" in r.task("write without label")["msg"]
    )
    assert problems_of(r.task("verify without manifest")) == [("backup_manifest", "missing")]
    assert not os.path.exists(nolabel / "backup_manifest")
    nothing = r.task("verify no backup")
    assert nothing["verified"] is False and problems_of(nothing) == [(".", "unreadable")]
    assert "is not a backup" in nothing["problems"][0]["actual"]


def test_pg_basebackup_manifest_is_read_like_ours(backups, tmp_path):
    """PostgreSQL's own CRC32C manifest of a plain pg_basebackup: our parser and our checksums agree with it."""
    bs = backups(15)
    out, ts = tmp_path / "bb", tmp_path / "bb_ts"
    subprocess.run(
        ["/usr/lib/postgresql/15/bin/pg_basebackup", "-D", str(out), "-Fp", "-X", "none", "-c", "fast", "--no-sync",
         "--manifest-checksums=CRC32C", "-h", "127.0.0.1", "-p", str(bs.cluster.port), "-U", "postgres",
         "-T", f"{bs.ts_dir}={ts}"],
        check=True, capture_output=True,
    )  # fmt: skip
    with open(out / "backup_manifest", "rb") as f:
        theirs = mf.parse_manifest(f.read())
    layout = mf.detect_layout(str(out))
    assert layout.method == "plain"
    # Every path, size and CRC32C PostgreSQL wrote is what our readers compute from the files.
    problems, files, _ = mf.verify_layout(layout, theirs)
    assert problems == [] and files == len(theirs.files)
    assert any(p.startswith(f"pg_tblspc/{bs.oid}/PG_15_") for p in theirs.files)


def test_backup_info(backups, tmp_path):
    """The catalog over a repository holding real backups and some that must never be trusted."""
    bs = backups(15)
    repo = bs.repo
    for bid, status in (("20261130T101500Z", "running"), ("20261128T101500Z", "failed")):
        os.makedirs(os.path.join(repo, bid))
        BackupSet.write_info(os.path.join(repo, bid), {"schema": 1, "id": bid, "status": status, "method": "tar"})
    os.makedirs(os.path.join(repo, "20261201T000000Z"))  # a damaged catalog entry
    os.makedirs(os.path.join(repo, "20261202T000000Z"))  # no backup.json (yet): not a backup
    with open(os.path.join(repo, "20261201T000000Z", "backup.json"), "w") as f:
        f.write("{")
    tasks = [
        {"name": "all", INFO: {"repository": repo}},
        {"name": "complete only", INFO: {"repository": repo, "status": ["complete"], "size_on_disk": False}},
        {"name": "latest", INFO: {"repository": repo, "backup": "latest"}},
        # An earlier test here found this backup damaged (recorded): asked for by id, it is refused unless allowed.
        {"name": "by id", INFO: {"repository": repo, "backup": IDS["tar"], "allow_unverified": True}},
        {"name": "running one", INFO: {"repository": repo, "backup": "20261130T101500Z"}, "ignore_errors": True},
        {"name": "unknown", INFO: {"repository": repo, "backup": "20990101T000000Z"}, "ignore_errors": True},
        {"name": "no repository", INFO: {"repository": f"{repo}-nope"}, "ignore_errors": True},
        {"name": "check mode", INFO: {"repository": repo}, "check_mode": True},
    ]
    before = {d: os.stat(os.path.join(repo, d, "backup.json")).st_mtime_ns for d in os.listdir(repo) if d != "20261202T000000Z"}
    r = run(play(tasks), tmp_path / "pb")
    everything = r.task("all")
    assert everything["changed"] is False
    assert [e["id"] for e in everything["backups"]] == [
        "20261201T000000Z", "20261130T101500Z", IDS["cpio"], IDS["tar"], IDS["rsync"], "20261128T101500Z",
    ]  # fmt: skip
    assert [e["status"] for e in everything["backups"]][:2] == ["invalid", "running"]
    # Earlier tests here corrupted and verified some of these backups: latest is the newest not known to be damaged.
    damaged = {e["id"] for e in everything["backups"] if (e.get("verification") or {}).get("verified") is False}
    trusted = next(i for i in (IDS["cpio"], IDS["tar"], IDS["rsync"]) if i not in damaged)
    assert everything["latest"] == trusted and everything["count"] == 6
    assert {s["id"] for s in everything["passed_over"]} == {i for i in damaged if i > trusted}
    rsync = next(e for e in everything["backups"] if e["id"] == IDS["rsync"])
    assert rsync["path"] == bs.dirs["rsync"] and rsync["size_on_disk"] > 5_000_000
    assert rsync["stop_lsn"] == bs.stop["stop_lsn"] and rsync["method"] == "rsync"
    complete = r.task("complete only")
    assert [e["id"] for e in complete["backups"]] == [IDS["cpio"], IDS["tar"], IDS["rsync"]]
    assert "size_on_disk" not in complete["backups"][0] and complete["count"] == 3
    assert r.task("latest")["backup"]["id"] == trusted
    assert r.task("by id")["backup"]["method"] == "tar"
    running = r.task("running one")
    assert failed(r, "running one") and "is not complete (status: running)" in running["msg"]
    assert failed(r, "unknown") and "20990101T000000Z not found" in r.task("unknown")["msg"]
    assert "does not exist" in r.task("no repository")["msg"]
    assert r.task("check mode")["count"] == 6
    # The catalog only reads.
    assert before == {d: os.stat(os.path.join(repo, d, "backup.json")).st_mtime_ns for d in before}
