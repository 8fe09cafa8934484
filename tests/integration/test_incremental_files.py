"""Incremental backups other than 17+ block level, against real servers: file-level on PostgreSQL 13
and 15 (tar: unchanged files taken from the parents, restored from the backup that holds each; rsync:
hard links, a complete directory), with pgbench and a writer running during the backups and a table
truncated, one dropped, one created, a database and a tablespace added in between; and the fallbacks
to a full backup, each with its reason (summarize_wal off, cpio, another method)."""

from __future__ import annotations

import json
import os
import shutil

import psycopg2
from harness.backup import BACKUP, backup_vars
from harness.pg import Cluster, make_pg_dir
from harness.workload import Writer, balances, pgbench_init, pgbench_start, pgbench_stop, written_ids

from integration.test_incremental import contents, make_tablespace, take
from integration.test_restore import (  # noqa: F401 - restore_root is a fixture
    RESTORE,
    archive_current_wal,
    newest_backup,
    query,
    restore_root,
    restore_vars,
    result_of,
)


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
        # After a backup taken another way, the next incremental has no parent.
        again = take(c, repo, playbook, pg_backup_method="tar")
        assert again["type"] == "full" and "method cpio, this one with tar" in again["type_reason"], again["type_reason"]
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def _tables(c: Cluster) -> None:
    pgbench_init(c, 1)
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
    if not c.sql("SELECT 1 FROM pg_database WHERE datname = 'newdb'"):
        c.sql("CREATE DATABASE newdb")
        c.sql("CREATE TABLE t_new AS SELECT 1 AS one", dbname="newdb")
        make_tablespace(c, "ts2")
        c.sql("CREATE TABLE in_ts2 TABLESPACE ts2 AS SELECT g AS id FROM generate_series(1, 3000) g")


def _tsmap(info: dict, root: str) -> dict:
    return {str(ts["oid"]): os.path.join(root, f"ts{ts['oid']}") for ts in info["tablespaces"]}


def _balances_agree(root: str, port: int) -> None:
    conn = psycopg2.connect(host=root, port=port, user="postgres", dbname="postgres")
    try:
        sums = balances(conn)
    finally:
        conn.close()
    assert len(set(sums)) == 1 and sums[0] != 0, sums


def test_file_level_tar_chain_on_15_takes_unchanged_files_from_its_parents(make_cluster, playbook, restore_root):  # noqa: F811
    c = make_cluster(15, autovacuum="off")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        _tables(c)
        c.sql("CHECKPOINT")
        writer = Writer(c)
        writer.start()
        bench = pgbench_start(c)
        try:
            full = take(c, repo, playbook, pg_backup_compression="zstd")
            _change(c)
            inc1 = take(c, repo, playbook, pg_backup_compression="zstd")
            c.sql("INSERT INTO emptied VALUES (7)")
            inc2 = take(c, repo, playbook, pg_backup_compression="zstd", pg_backup_incremental_checksum=True)
        finally:
            pgbench_stop(bench)
            writer.stop()
        archive_current_wal(c)
        assert (inc1["type"], inc1["parent"], inc1["incremental"]["mode"]) == ("incremental", full["id"], "file")
        assert inc2["parent"] == inc1["id"] and inc2["incremental"]["taken_files"] > 0
        with open(os.path.join(repo, inc2["id"], "backup_files.json")) as f:
            taken = json.load(f)["taken"]
        holders = {t["from"] for t in taken.values()}
        assert full["id"] in holders, holders  # big never changed: still held by the full backup
        assert not any(p.startswith("pg_wal/") or p == "global/pg_control" for p in taken)
        # big never changed: its files, at least, are taken rather than stored again.
        big = c.sql("SELECT pg_total_relation_size('big')")[0][0]
        assert inc1["incremental"]["taken_bytes"] >= big and inc1["bytes"] < full["bytes"], (inc1["incremental"], big)
        root = restore_root()
        run = playbook(RESTORE, extra_vars=restore_vars(repo, c, root, pg_restore_tablespace_map=_tsmap(inc2, root)))
        assert run.rc == 0, run
        prepared = result_of(run, "Restore backup")
        assert prepared["chain"] == [full["id"], inc1["id"], inc2["id"]] and prepared["taken_from"], prepared
        restored = contents(lambda sql: query(root, prepared["port"], sql))
        assert restored == contents(c.sql) and "born" in restored and "in_ts2" in restored, restored
        assert {i for i, _t in writer.committed} <= written_ids(root, prepared["port"])
        assert query(root, prepared["port"], "SELECT one FROM t_new", dbname="newdb") == [(1,)]
        _balances_agree(root, prepared["port"])
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def test_file_level_rsync_on_13_hard_links_unchanged_files_to_the_parent(make_cluster, playbook, restore_root):  # noqa: F811
    c = make_cluster(13, autovacuum="off")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        _tables(c)
        c.sql("CHECKPOINT")
        full = take(c, repo, playbook, pg_backup_method="rsync")
        _change(c)
        bench = pgbench_start(c)
        try:
            inc = take(c, repo, playbook, pg_backup_method="rsync")
        finally:
            pgbench_stop(bench)
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
        run = playbook(RESTORE, extra_vars=restore_vars(repo, c, root, pg_restore_tablespace_map=_tsmap(inc, root)))
        assert run.rc == 0, run
        port = result_of(run, "Restore backup")["port"]
        assert contents(lambda sql: query(root, port, sql)) == contents(c.sql)
        _balances_agree(root, port)
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)
