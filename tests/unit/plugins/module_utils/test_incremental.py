"""Block-level incremental backups without a server: which summaries cover a range, what a limit block
forgets, when a relation file is copied whole, and PostgreSQL's INCREMENTAL file format."""

from __future__ import annotations

import importlib
import os
import struct
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
inc = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._incremental")

BS, SEG = 8192, 131072


def test_summaries_must_tile_the_range_without_a_gap():
    rows = [(1, 100, 200), (1, 200, 300), (1, 300, 400), (1, 0, 100)]
    assert inc.covering_summaries(rows, 150, 350) == [(1, 100, 200), (1, 200, 300), (1, 300, 400)]
    with pytest.raises(inc.IncrementalRefused, match="first LSN without one is 0/C8"):
        inc.covering_summaries([(1, 100, 200), (1, 250, 400)], 150, 350)
    with pytest.raises(inc.IncrementalRefused, match="first LSN without one is 0/12C"):
        inc.covering_summaries([(1, 100, 300)], 150, 350)


def test_a_limit_block_forgets_blocks_at_or_past_it_that_earlier_summaries_marked():
    bm = inc.BlockMap()
    key = (1663, 5, 16384, 0)
    bm.add_summary([(*key, None, [1, 7, 9])])
    bm.add_summary([(*key, 5, [2])])  # truncated to 5 blocks, then block 2 written
    assert bm.relations[key] == [5, {1, 2}]
    bm.add_summary([(*key, 8, [6])])  # a higher limit later changes nothing already forgotten
    assert bm.relations[key] == [5, {1, 2, 6}]
    bm.add_summary([(1663, 16390, 0, 0, 0, [])])  # relfilenode 0: a database created
    assert (1663, 16390) in bm.databases
    assert inc.BlockMap.from_json(bm.to_json()).relations == bm.relations


def test_relation_paths_in_base_global_and_a_tablespace():
    assert inc.relation_of("base/5/16384") == (1663, 5, 16384, 0, 0)
    assert inc.relation_of("base/5/16384_vm") == (1663, 5, 16384, 2, 0)
    assert inc.relation_of("base/5/16384_fsm.3") == (1663, 5, 16384, 1, 3)
    assert inc.relation_of("global/1262") == (1664, 0, 1262, 0, 0)
    assert inc.relation_of("PG_17_202406281/5/16400.1", 16385) == (16385, 5, 16400, 0, 1)
    for other in ("global/pg_control", "base/5/PG_VERSION", "pg_xact/0000", "base/5/pg_filenode.map", "base/5/t3_16384"):
        assert inc.relation_of(other) is None, other


def _plan(bm, key, size, mtime=0.0):
    return inc.plan_file(bm, key, size, mtime, 1000.0, BS, SEG)


def test_which_files_are_copied_whole_and_what_an_incremental_holds():
    bm = inc.BlockMap()
    bm.add_summary([(1663, 5, 100, 0, None, [0, 3]), (1663, 5, 101, 0, 2, []), (1663, 5, 102, 0, None, list(range(10)))])
    bm.add_summary([(1663, 16390, 0, 0, 0, [])])
    assert _plan(bm, (1663, 5, 100, 0, 0), 10 * BS) == ([0, 3], 10)
    assert _plan(bm, (1663, 5, 101, 0, 0), 4 * BS) == ([], 4)  # truncated to 2, regrown without WAL: 4
    assert _plan(bm, (1663, 5, 101, 0, 0), 1 * BS) == ([], 2)  # shorter now than its limit: the limit holds
    assert _plan(bm, (1663, 5, 102, 0, 0), 10 * BS) is None  # more than 90 % changed
    assert _plan(bm, (1663, 5, 100, 1, 0), 10 * BS) is None  # the free space map
    assert _plan(bm, (1663, 16390, 200, 0, 0), 10 * BS) is None  # a database created since the parent
    assert _plan(bm, (1663, 5, 100, 0, 0), 10 * BS + 1) is None  # not whole blocks
    # No summarized change: an unchanged file, unless it may have been created after the start.
    assert _plan(bm, (1663, 5, 300, 0, 0), 3 * BS, mtime=500.0) == ([], 3)
    assert _plan(bm, (1663, 5, 300, 0, 0), 3 * BS, mtime=999.0) is None
    assert _plan(bm, (1663, 5, 300, 0, 0), 0) is None
    # Second segment: block numbers relative to it; a limit below it means the whole segment.
    bm.add_summary([(1663, 5, 400, 0, None, [SEG + 4, 3])])
    assert _plan(bm, (1663, 5, 400, 0, 1), 8 * BS) == ([4], 8)
    bm.add_summary([(1663, 5, 401, 0, SEG - 1, [])])
    assert _plan(bm, (1663, 5, 401, 0, 1), 8 * BS) is None


def test_incremental_file_is_postgresql_format(tmp_path):
    src = tmp_path / "16384"
    src.write_bytes(b"".join(bytes([i]) * BS for i in range(6)))
    dst = tmp_path / "INCREMENTAL.16384"
    size = inc.write_incremental(str(src), str(dst), [1, 4, 9], 6, BS)
    data = dst.read_bytes()
    assert size == len(data) == BS + 3 * BS  # the header padded to a block, then three blocks
    magic, count, truncation = struct.unpack_from("=III", data)
    assert (magic, count, truncation) == (0xD3AE1F0D, 3, 6)
    assert struct.unpack_from("=3I", data, 12) == (1, 4, 9)
    assert data[BS : 2 * BS] == bytes([1]) * BS and data[2 * BS : 3 * BS] == bytes([4]) * BS
    assert data[3 * BS :] == b"\0" * BS  # block 9 is past the file's end now: zeros, WAL replay rewrites it
    empty = tmp_path / "INCREMENTAL.e"
    assert inc.write_incremental(str(src), str(empty), [], 6, BS) == 12  # no blocks: no padding
    assert os.path.getsize(empty) == 12
    # Runs of consecutive blocks are copied in one piece each; a run that crosses the end is zero-filled.
    assert inc.block_runs([0, 1, 2, 4, 5, 9]) == [[0, 3], [4, 2], [9, 1]]
    runs = tmp_path / "INCREMENTAL.r"
    assert inc.write_incremental(str(src), str(runs), [0, 1, 2, 4, 5, 6, 7], 8, BS) == BS + 7 * BS
    body = runs.read_bytes()[BS:]
    assert body == b"".join(bytes([i]) * BS for i in (0, 1, 2, 4, 5)) + b"\0" * (2 * BS)
    assert inc.label_lines("0/5000028", 1) == "INCREMENTAL FROM LSN: 0/5000028\nINCREMENTAL FROM TLI: 1\n"


def test_stage_files_replaces_relation_files_and_keeps_the_rest(tmp_path):
    root = tmp_path / "data"
    (root / "base" / "5").mkdir(parents=True)
    (root / "base" / "5" / "100").write_bytes(b"a" * (4 * BS))
    (root / "base" / "5" / "PG_VERSION").write_text("17\n")
    os.utime(root / "base" / "5" / "100", (10, 10))
    bm = inc.BlockMap()
    bm.add_summary([(1663, 5, 100, 0, None, [2])])
    doc = {"block_size": BS, "relseg_blocks": SEG, "started_epoch": 1000.0}
    stage = tmp_path / "stage"
    keep, staged, stats = inc.stage_files(
        str(root), ["base", "base/5", "base/5/100", "base/5/PG_VERSION", "base/5/gone"], str(stage), bm, doc, {"base/5/100"}
    )
    assert keep == ["base", "base/5", "base/5/PG_VERSION", "base/5/gone"]
    assert staged == ["base/5/INCREMENTAL.100"] and (stage / "base/5/INCREMENTAL.100").stat().st_size == 2 * BS
    assert stats == {"incremental_files": 1, "whole_files": 0, "blocks": 1, "bytes": 2 * BS, "replaced_bytes": 4 * BS}


def test_a_relation_file_the_parent_does_not_hold_is_copied_whole(tmp_path):
    """pg_combinebackup rebuilds an INCREMENTAL file from the same file in every earlier backup of the
    chain: a segment the parent lacks (the relation grew past 1 GB since, or after this backup's start)
    is copied whole even when the summaries know the relation; one the parent holds whole or as an
    INCREMENTAL file is stored incrementally. Tablespace files are looked up under pg_tblspc/<oid>/."""
    root = tmp_path / "data"
    (root / "base" / "5").mkdir(parents=True)
    for name in ("100", "100.1", "200"):
        (root / "base" / "5" / name).write_bytes(b"a" * (4 * BS))
        os.utime(root / "base" / "5" / name, (10, 10))
    ts = tmp_path / "ts" / "PG_17_202406281" / "5"
    ts.mkdir(parents=True)
    (ts / "300").write_bytes(b"t" * (4 * BS))
    os.utime(ts / "300", (10, 10))
    bm = inc.BlockMap()
    # Relation 100 changed in its first segment only; 200 and 300 did not change at all.
    bm.add_summary([(1663, 5, 100, 0, None, [2])])
    doc = {"block_size": BS, "relseg_blocks": SEG, "started_epoch": 1000.0}
    parent = {"base/5/100", "base/5/INCREMENTAL.200", "pg_tblspc/16400/PG_17_202406281/5/300"}
    keep, staged, stats = inc.stage_files(
        str(root), ["base/5/100", "base/5/100.1", "base/5/200"], str(tmp_path / "stage"), bm, doc, parent
    )
    assert keep == ["base/5/100.1"]
    assert staged == ["base/5/INCREMENTAL.100", "base/5/INCREMENTAL.200"]
    assert stats["whole_files"] == 1 and stats["incremental_files"] == 2
    tkeep, tstaged, _ = inc.stage_files(
        str(tmp_path / "ts"), ["PG_17_202406281/5/300"], str(tmp_path / "tstage"), bm, doc, parent, "pg_tblspc/16400/", 16400
    )
    assert tkeep == [] and tstaged == ["PG_17_202406281/5/INCREMENTAL.300"]
    # The same tablespace file when the parent does not hold it: whole.
    tkeep, tstaged, _ = inc.stage_files(
        str(tmp_path / "ts"), ["PG_17_202406281/5/300"], str(tmp_path / "tstage2"), bm, doc, set(), "pg_tblspc/16400/", 16400
    )
    assert tkeep == ["PG_17_202406281/5/300"] and tstaged == []
