"""Block-level incremental backups on PostgreSQL 17 against a real server: a full backup, then two
incrementals (rows written while each ran, a table changed in part, one truncated, one dropped, one
created, a database created, a tablespace), stored in PostgreSQL's own incremental format. Proven by
PostgreSQL's pg_combinebackup and pg_verifybackup on the stored files by hand, by the restore playbook
(every table equal to the source's, every row written during the backups there) and by a drill;
and the fallbacks to a full backup, each with its reason."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tarfile

import pytest
from harness.backup import BACKUP, backup_vars, backups
from harness.pg import Cluster, as_postgres, chown_pg, make_pg_dir
from harness.workload import Writer, written_ids

from integration.test_restore import (  # noqa: F401 - restore_root is a fixture
    DRILL,
    RESTORE,
    archive_current_wal,
    newest_backup,
    query,
    restore_root,
    restore_vars,
    result_of,
    stop_server,
)

TOOLS = "/var/cache/pgops-online-backup/pg17-tools/bin"
TABLES = ("big", "small", "emptied", "born", "in_ts", "writer_log")


def contents(c_or_conn, dbname: str = "postgres") -> dict:
    """table -> md5 of its rows in order (absent tables left out)."""
    out = {}
    for t in TABLES:
        sql = f"SELECT md5(coalesce(string_agg(x::text, ',' ORDER BY x::text), '')) FROM {t} x"
        try:
            out[t] = c_or_conn(sql)[0][0]
        except Exception:  # noqa: BLE001 - a dropped table is simply absent
            continue
    return out


def take(c: Cluster, repo: str, playbook, **extra) -> dict:
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_type="incremental", **extra))
    assert run.rc == 0, run
    return newest_backup(repo)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """PostgreSQL 17: full, incremental, incremental (tar + zstd, a tablespace), rows written during each."""
    from harness.ansible import local_inventory, run_playbook

    def playbook(path, extra_vars):
        return run_playbook(path, local_inventory(), extra_vars=extra_vars, workdir=str(tmp_path_factory.mktemp("run")))

    c = Cluster(17)
    c.init(summarize_wal="on", autovacuum="off")
    c.start()
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    ts_dir = os.path.join(c.root, "ts")
    os.makedirs(ts_dir)
    chown_pg(ts_dir)
    try:
        c.sql(f"CREATE TABLESPACE ts LOCATION '{ts_dir}'")
        c.sql("CREATE TABLE big (id int PRIMARY KEY, v text) WITH (fillfactor = 50)")
        c.sql("INSERT INTO big SELECT g, repeat('b', 100) FROM generate_series(1, 60000) g")
        c.sql("CREATE TABLE small (id int, v text)")
        c.sql("INSERT INTO small SELECT g, 's' FROM generate_series(1, 100) g")
        c.sql("CREATE TABLE emptied (id int)")
        c.sql("INSERT INTO emptied SELECT generate_series(1, 5000)")
        c.sql("CREATE TABLE dropped (id int)")
        c.sql("CREATE TABLE in_ts (id int, v text) TABLESPACE ts")
        c.sql("INSERT INTO in_ts SELECT g, 't' FROM generate_series(1, 20000) g")
        c.sql("CHECKPOINT")
        writer = Writer(c)
        writer.start()
        infos = [take(c, repo, playbook, pg_backup_method="tar", pg_backup_compression="zstd")]
        # About 5 % of big changes; one table emptied, one dropped, one created, a database created.
        c.sql("UPDATE big SET v = repeat('c', 100) WHERE id <= 3000")
        c.sql("TRUNCATE emptied")
        c.sql("DROP TABLE dropped")
        c.sql("CREATE TABLE born AS SELECT g AS id FROM generate_series(1, 1000) g")
        c.sql("CREATE DATABASE newdb")
        c.sql("CREATE TABLE t_new AS SELECT 1 AS one", dbname="newdb")
        c.sql("UPDATE in_ts SET v = 'u' WHERE id <= 100")
        infos.append(take(c, repo, playbook, pg_backup_method="tar", pg_backup_compression="zstd"))
        c.sql("UPDATE big SET v = repeat('d', 100) WHERE id BETWEEN 30000 AND 30500")
        c.sql("INSERT INTO emptied VALUES (42)")
        infos.append(take(c, repo, playbook, pg_backup_method="tar", pg_backup_compression="zstd"))
        writer.stop()
        assert writer.error is None and writer.committed
        archive_current_wal(c)
        yield {"cluster": c, "repo": repo, "infos": infos, "writer": writer, "playbook": playbook}
    finally:
        c.destroy()
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def test_each_incremental_names_its_parent_and_stores_only_changed_blocks(chain):
    full, inc1, inc2 = chain["infos"]
    assert full["type"] == "full" and full.get("parent") is None
    assert full["type_reason"].startswith("there is no complete, trusted backup"), full["type_reason"]
    assert (inc1["type"], inc1["parent"]) == ("incremental", full["id"])
    assert (inc2["type"], inc2["parent"]) == ("incremental", inc1["id"])
    assert inc1["incremental"]["from_lsn"] == full["start_lsn"] and inc2["incremental"]["from_lsn"] == inc1["start_lsn"]
    assert inc1["incremental"]["incremental_files"] > 0 and inc1["incremental"]["blocks"] > 0
    # Far smaller than the full backup, which holds the same database.
    assert inc2["bytes"] < full["bytes"] / 4, (inc2["bytes"], full["bytes"])
    repo = chain["repo"]
    with open(os.path.join(repo, inc1["id"], "backup_label")) as f:
        label = f.read()
    assert f"INCREMENTAL FROM LSN: {full['start_lsn']}\nINCREMENTAL FROM TLI: {full['timeline']}\n" in label, label
    # The stored INCREMENTAL files are PostgreSQL's format: magic, count, truncation, block numbers.
    manifest = json.load(open(os.path.join(repo, inc1["id"], "backup_manifest")))
    inc_paths = [f["Path"] for f in manifest["Files"] if "/INCREMENTAL." in f["Path"]]
    assert inc_paths and any(p.startswith("pg_tblspc/") for p in inc_paths), inc_paths[:5]
    for entry in manifest["Files"]:
        assert not entry["Path"].startswith("pg_wal/summaries/") or entry["Size"] == 0


def _unpack(archive: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    z = subprocess.run(["zstd", "-dc", archive], check=True, capture_output=True).stdout
    tmp = dest + ".tar"
    with open(tmp, "wb") as f:
        f.write(z)
    with tarfile.open(tmp) as t:
        t.extractall(dest, filter="fully_trusted")
    os.unlink(tmp)


def test_pg_combinebackup_reconstructs_the_chain_by_hand_and_pg_verifybackup_accepts_it(chain, tmp_path):
    """A restore with only PostgreSQL's tools and tar/zstd, as docs/repository.md describes."""
    repo, infos = chain["repo"], chain["infos"]
    work = make_pg_dir("pgops-byhand-")
    try:
        dirs = []
        for i, info in enumerate(infos):
            d = os.path.join(work, str(i))
            bdir = os.path.join(repo, info["id"])
            _unpack(os.path.join(bdir, "base.tar.zst"), d)
            for name in ("backup_label", "backup_manifest"):
                shutil.copy(os.path.join(bdir, name), d)
            for ts in info["tablespaces"]:
                tdir = os.path.join(work, f"{i}.ts")
                _unpack(os.path.join(bdir, f"{ts['oid']}.tar.zst"), tdir)
                os.symlink(tdir, os.path.join(d, "pg_tblspc", str(ts["oid"])))
            dirs.append(d)
        subprocess.run(["chown", "-R", "postgres:postgres", work], check=True)
        out = os.path.join(work, "combined")
        new_ts = os.path.join(work, "combined_ts")
        done = as_postgres([f"{TOOLS}/pg_combinebackup", "-o", out, "-T", f"{work}/2.ts={new_ts}", *dirs], check=False)
        assert done.returncode == 0, done.stderr
        ok = as_postgres([f"{TOOLS}/pg_verifybackup", "-n", out], check=False)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        with open(os.path.join(out, "backup_label")) as f:
            assert "INCREMENTAL" not in f.read()
        # An incremental alone is refused by the server's own tool chain: it needs its parents.
        alone = as_postgres([f"{TOOLS}/pg_combinebackup", "-o", os.path.join(work, "x"), dirs[1]], check=False)
        assert alone.returncode != 0 and "incremental" in alone.stderr, alone.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_restore_playbook_combines_the_chain_and_every_table_equals_the_source(chain, restore_root):  # noqa: F811
    c, repo, writer = chain["cluster"], chain["repo"], chain["writer"]
    root = restore_root()
    new_ts = os.path.join(root, "ts")
    oid = str(chain["infos"][0]["tablespaces"][0]["oid"])
    run = chain["playbook"](RESTORE, restore_vars(repo, c, root, pg_restore_tablespace_map={oid: new_ts}))
    assert run.rc == 0, run
    prepared = result_of(run, "Restore backup")
    assert prepared["chain"] == [i["id"] for i in chain["infos"]], prepared
    port = prepared["port"]
    restored = contents(lambda sql: query(root, port, sql))
    assert restored == contents(c.sql), (restored, contents(c.sql))
    assert "dropped" not in [r[0] for r in query(root, port, "SELECT relname FROM pg_class WHERE relkind = 'r'")]
    assert query(root, port, "SELECT one FROM t_new", dbname="newdb") == [(1,)]
    assert {i for i, _t in writer.committed} <= written_ids(root, port)
    stop_server(os.path.join(root, "data"))
    assert not [n for n in os.listdir(root) if n.startswith(".pgops-combine-")], os.listdir(root)


def test_drill_restores_the_newest_incremental_with_its_chain(chain):
    run = chain["playbook"](DRILL, {"pg_restore_repository": chain["repo"], "pg_restore_wal_archive": chain["cluster"].archive})
    assert run.rc == 0, run
    newest = {b["id"]: b for b in backups(chain["repo"])}[chain["infos"][-1]["id"]]
    assert newest["drill"]["result"] == "passed", newest["drill"]


def test_rsync_incremental_is_a_directory_pg_combinebackup_reads(make_cluster, playbook, restore_root):  # noqa: F811
    c = make_cluster(17, summarize_wal="on")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        c.sql("CREATE TABLE big (id int PRIMARY KEY, v text)")
        c.sql("INSERT INTO big SELECT g, 'x' FROM generate_series(1, 40000) g")
        full = take(c, repo, playbook, pg_backup_method="rsync")
        c.sql("UPDATE big SET v = 'y' WHERE id <= 500")
        writer = Writer(c)
        writer.start()
        inc = take(c, repo, playbook, pg_backup_method="rsync")
        writer.stop()
        archive_current_wal(c)
        assert (inc["type"], inc["parent"]) == ("incremental", full["id"])
        data = os.path.join(repo, inc["id"], "data")
        staged = [os.path.join(d, f) for d, _s, fs in os.walk(data) for f in fs if f.startswith("INCREMENTAL.")]
        assert staged, "no INCREMENTAL files in the rsync backup"
        with open(staged[0], "rb") as f:
            assert struct.unpack("=I", f.read(4))[0] == 0xD3AE1F0D
        root = restore_root()
        run = playbook(RESTORE, extra_vars=restore_vars(repo, c, root))
        assert run.rc == 0, run
        prepared = result_of(run, "Restore backup")
        assert prepared["chain"] == [full["id"], inc["id"]], prepared
        port = prepared["port"]
        assert query(root, port, "SELECT count(*) FILTER (WHERE v = 'y'), count(*) FROM big") == [(500, 40000)]
        assert {i for i, _t in writer.committed} <= written_ids(root, port)
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def test_incremental_falls_back_to_full_saying_why(make_cluster, playbook):
    c = make_cluster(17, summarize_wal="off")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        take(c, repo, playbook)
        run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_type="incremental"))
        assert run.rc == 0, run
        second = newest_backup(repo)
        assert second["type"] == "full" and second.get("parent") is None
        assert "summarize_wal is off" in second["type_reason"], second["type_reason"]
        assert "summarize_wal is off" in run.stdout, run.stdout[-2000:]
        # cpio stores whole files: a full one as well.
        run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_type="incremental", pg_backup_method="cpio"))
        assert run.rc == 0, run
        assert newest_backup(repo)["type_reason"] == "method cpio stores whole files only"
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def test_incremental_after_a_different_method_is_full(make_cluster, playbook):
    c = make_cluster(17, summarize_wal="on")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        take(c, repo, playbook, pg_backup_method="rsync")
        second = take(c, repo, playbook, pg_backup_method="tar")
        assert second["type"] == "full" and "method rsync" in second["type_reason"], second["type_reason"]
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def _tables(c: Cluster) -> None:
    c.sql("CREATE TABLE big (id int PRIMARY KEY, v text)")
    c.sql("INSERT INTO big SELECT g, repeat('b', 100) FROM generate_series(1, 30000) g")
    c.sql("CREATE TABLE small (id int, v text)")
    c.sql("INSERT INTO small SELECT g, 's' FROM generate_series(1, 100) g")
    c.sql("CREATE TABLE emptied (id int)")
    c.sql("INSERT INTO emptied SELECT generate_series(1, 5000)")
    c.sql("CREATE TABLE dropped (id int)")


def _change(c: Cluster) -> None:
    c.sql("UPDATE small SET v = 'changed' WHERE id <= 10")
    c.sql("TRUNCATE emptied")
    c.sql("DROP TABLE IF EXISTS dropped")
    c.sql("CREATE TABLE IF NOT EXISTS born AS SELECT g AS id FROM generate_series(1, 1000) g")
    c.sql("INSERT INTO born VALUES (-1)")


def test_file_level_tar_chain_on_16_takes_unchanged_files_from_its_parents(make_cluster, playbook, restore_root):  # noqa: F811
    c = make_cluster(16, autovacuum="off")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        _tables(c)
        c.sql("CHECKPOINT")
        full = take(c, repo, playbook, pg_backup_compression="zstd")
        _change(c)
        writer = Writer(c)
        writer.start()
        inc1 = take(c, repo, playbook, pg_backup_compression="zstd")
        c.sql("INSERT INTO emptied VALUES (7)")
        inc2 = take(c, repo, playbook, pg_backup_compression="zstd", pg_backup_incremental_checksum=True)
        writer.stop()
        archive_current_wal(c)
        assert (inc1["type"], inc1["parent"], inc1["incremental"]["mode"]) == ("incremental", full["id"], "file")
        assert inc2["parent"] == inc1["id"] and inc2["incremental"]["taken_files"] > 0
        with open(os.path.join(repo, inc2["id"], "backup_files.json")) as f:
            taken = json.load(f)["taken"]
        holders = {t["from"] for t in taken.values()}
        assert full["id"] in holders, holders  # big never changed: still held by the full backup
        assert not any(p.startswith("pg_wal/") or p == "global/pg_control" for p in taken)
        assert inc1["bytes"] < full["bytes"] / 3, (inc1["bytes"], full["bytes"])
        root = restore_root()
        run = playbook(RESTORE, extra_vars=restore_vars(repo, c, root))
        assert run.rc == 0, run
        prepared = result_of(run, "Restore backup")
        assert prepared["chain"] == [full["id"], inc1["id"], inc2["id"]] and prepared["taken_from"], prepared
        restored = contents(lambda sql: query(root, prepared["port"], sql))
        assert restored == contents(c.sql) and "born" in restored, restored
        assert {i for i, _t in writer.committed} <= written_ids(root, prepared["port"])
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def test_file_level_rsync_on_12_hard_links_unchanged_files_to_the_parent(make_cluster, playbook, restore_root):  # noqa: F811
    c = make_cluster(12, autovacuum="off")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        _tables(c)
        c.sql("CHECKPOINT")
        full = take(c, repo, playbook, pg_backup_method="rsync")
        _change(c)
        inc = take(c, repo, playbook, pg_backup_method="rsync")
        archive_current_wal(c)
        assert (inc["type"], inc["parent"], inc["incremental"]["mode"]) == ("incremental", full["id"], "file")
        relpath = c.sql("SELECT pg_relation_filepath('big')")[0][0]
        a, b = (os.stat(os.path.join(repo, bid, "data", relpath)) for bid in (full["id"], inc["id"]))
        assert a.st_ino == b.st_ino, "an unchanged file is a hard link to the parent's copy"
        relpath = c.sql("SELECT pg_relation_filepath('small')")[0][0]
        a, b = (os.stat(os.path.join(repo, bid, "data", relpath)) for bid in (full["id"], inc["id"]))
        assert a.st_ino != b.st_ino, "a changed file is copied"
        shutil.rmtree(os.path.join(repo, full["id"]))  # a complete directory: it restores without its parent
        root = restore_root()
        run = playbook(RESTORE, extra_vars=restore_vars(repo, c, root))
        assert run.rc == 0, run
        port = result_of(run, "Restore backup")["port"]
        assert contents(lambda sql: query(root, port, sql)) == contents(c.sql)
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)
