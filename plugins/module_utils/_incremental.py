# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Block-level incremental backups on PostgreSQL 17+, in PostgreSQL's own format.

The keeper reads the WAL summaries over the session it holds (what changed
between the parent's start LSN and this backup's start LSN); the copy step then
stores every relation file that summaries cover as INCREMENTAL.<name>, the way
pg_basebackup --incremental does, so that pg_combinebackup reconstructs a full
data directory from the chain. The format and the rules for when a file must be
copied whole follow PostgreSQL's basebackup_incremental.c and
pg_combinebackup/reconstruct.c:

  INCREMENTAL.<file>: uint32 magic 0xd3ae1f0d, uint32 block count, uint32
  truncation block length, uint32 relative block numbers (ascending); padded
  with zeros to a multiple of the block size when it holds any block; then
  the blocks, in the order of their numbers. Little-endian on x86 (native
  order, as the server writes it).
"""

from __future__ import annotations

import calendar
import json
import os
import re
import stat
import struct
import time

from ._backup_api import format_lsn, parse_lsn
from ._errors import PgopsError
from ._files import copy_range, write_all, write_private_file

MAGIC = 0xD3AE1F0D
PREFIX = "INCREMENTAL."
BLOCKS_FILE = "blocks.json"  # in the keeper's session directory
INVALID_BLOCK = 0xFFFFFFFF
GLOBAL_TABLESPACE = 1664
DEFAULT_TABLESPACE = 1663
FSM_FORK = 1
FORKS = {"": 0, "fsm": 1, "vm": 2, "init": 3}
# A file this share of whose blocks changed is copied whole, as the server decides (90 %).
WHOLE_FILE_SHARE = 0.9
# A file with no summarized change but modified this close to the start (or after it) may have
# been created after the start, which no summary knows of: copied whole.
MTIME_MARGIN = 2.0

_REL = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.(\d+))?$")


class IncrementalRefused(PgopsError):
    """Why this backup cannot be incremental (it is then taken in full)."""


# -- reading the summaries (in the keeper, over the backup's own session)


def summarizer_ready(query_one, start_lsn: int, timeout: float) -> None:
    """Wait until the WAL summarizer has summarized up to the backup's start, as the server's own
    incremental backup does; refuse (with the cause) when it is off or does not get there."""
    setting = query_one("SELECT current_setting('summarize_wal')")[0]
    if setting != "on":
        raise IncrementalRefused("summarize_wal is off on the server: set summarize_wal = on (a reload is enough)")
    deadline = time.monotonic() + timeout
    while True:
        summarized, pid = query_one("SELECT summarized_lsn::text, summarizer_pid FROM pg_get_wal_summarizer_state()")
        if summarized and parse_lsn(summarized) >= start_lsn:
            return
        if time.monotonic() >= deadline:
            running = "running" if pid else "not running"
            raise IncrementalRefused(
                f"the WAL summarizer ({running}) reached {summarized} within {timeout:g}s, "
                f"not the backup's start {format_lsn(start_lsn)}"
            )
        time.sleep(0.2)


def covering_summaries(rows: list, from_lsn: int, to_lsn: int) -> list:
    """The summary files (tli, start, end) that tile [from_lsn, to_lsn) without a gap, or a refusal naming the gap."""
    cursor = from_lsn
    chosen = []
    for tli, start, end in sorted(rows, key=lambda r: (r[1], r[2])):
        if end <= cursor or start >= to_lsn:
            continue
        if start > cursor:
            break
        chosen.append((tli, start, end))
        cursor = max(cursor, end)
        if cursor >= to_lsn:
            return chosen
    raise IncrementalRefused(
        f"the WAL summaries do not cover {format_lsn(from_lsn)} to {format_lsn(to_lsn)}: the first LSN without one is "
        f"{format_lsn(cursor)} (kept for wal_summary_keep_time; summarize_wal was off, or the parent is too old)"
    )


class BlockMap:
    """What changed since the parent: per relation fork its limit block (None: not truncated) and
    changed blocks, and the databases created since (every file of theirs is copied whole)."""

    def __init__(self):
        self.relations = {}  # (spc, db, rel, fork) -> [limit or None, set of blocks]
        self.databases = set()  # (spc, db)

    def add_summary(self, rows) -> None:
        """rows: (spc, db, relfilenode, fork, limit or None, [blocks]) of one summary file; summaries in
        LSN order. A limit forgets the blocks at or past it that earlier summaries marked."""
        for spc, db, rel, fork, limit, blocks in rows:
            if rel == 0:
                self.databases.add((spc, db))
                continue
            entry = self.relations.setdefault((spc, db, rel, fork), [None, set()])
            if limit is not None and (entry[0] is None or limit < entry[0]):
                entry[0] = limit
                entry[1] = {b for b in entry[1] if b < limit}
            entry[1].update(blocks or ())

    def to_json(self) -> dict:
        return {
            "databases": sorted([list(k) for k in self.databases]),
            "relations": [[*key, lim, sorted(blocks)] for key, (lim, blocks) in sorted(self.relations.items())],
        }

    @classmethod
    def from_json(cls, doc: dict) -> BlockMap:
        bm = cls()
        bm.databases = {tuple(k) for k in doc.get("databases", [])}
        for spc, db, rel, fork, limit, blocks in doc.get("relations", []):
            bm.relations[(spc, db, rel, fork)] = [limit, set(blocks)]
        return bm

    def block_count(self) -> int:
        return sum(len(b) for _lim, b in self.relations.values())


SUMMARY_ROWS = (
    "SELECT reltablespace::bigint, reldatabase::bigint, relfilenode::bigint, relforknumber::int,"
    " min(relblocknumber) FILTER (WHERE is_limit_block),"
    " coalesce(array_agg(relblocknumber) FILTER (WHERE NOT is_limit_block), '{}')"
    " FROM pg_wal_summary_contents(%s, %s::pg_lsn, %s::pg_lsn) GROUP BY 1, 2, 3, 4"
)


def read_block_map(query_one, query_all, parent_lsn: str, parent_tli: int, start_lsn: str, tli: int, timeout: float = 120):
    """(BlockMap, facts) of what changed from the parent's start to this backup's start, read with the
    given query functions (the keeper's session). IncrementalRefused says why it cannot be done."""
    frm, to = parse_lsn(parent_lsn), parse_lsn(start_lsn)
    if int(parent_tli) != int(tli):
        raise IncrementalRefused(f"the timeline changed since the parent backup ({parent_tli} to {tli}): a new chain starts")
    if frm >= to:
        raise IncrementalRefused(f"the parent backup starts at {parent_lsn}, not before this backup's start {start_lsn}")
    summarizer_ready(query_one, to, timeout)
    rows = query_all(
        "SELECT tli, start_lsn::text, end_lsn::text FROM pg_available_wal_summaries() WHERE tli = %s",
        (int(tli),),
    )
    chosen = covering_summaries([(r[0], parse_lsn(r[1]), parse_lsn(r[2])) for r in rows], frm, to)
    bm = BlockMap()
    for s_tli, start, end in chosen:
        bm.add_summary(query_all(SUMMARY_ROWS, (s_tli, format_lsn(start), format_lsn(end))))
    block_size = int(query_one("SELECT current_setting('block_size')")[0])
    # segment_size is counted in blocks (its unit is the block size).
    relseg = int(query_one("SELECT setting FROM pg_settings WHERE name = 'segment_size'")[0])
    facts = {
        "from_lsn": parent_lsn,
        "from_tli": int(parent_tli),
        "start_lsn": start_lsn,
        "summaries": len(chosen),
        "relations": len(bm.relations),
        "blocks": bm.block_count(),
        "databases_created": len(bm.databases),
        "block_size": block_size,
        "relseg_blocks": relseg,
    }
    return bm, facts


def save_block_map(sdir: str, bm: BlockMap, facts: dict, started_epoch: float) -> str:
    path = os.path.join(sdir, BLOCKS_FILE)
    doc = dict(facts, started_epoch=started_epoch, **bm.to_json())
    write_private_file(path, json.dumps(doc, separators=(",", ":")).encode())
    return path


def load_block_map(sdir: str) -> tuple:
    with open(os.path.join(sdir, BLOCKS_FILE), encoding="utf-8") as f:
        doc = json.load(f)
    return BlockMap.from_json(doc), doc


def label_lines(from_lsn: str, from_tli: int) -> str:
    """What the server's own incremental backup adds to backup_label, after START TIMELINE."""
    return f"INCREMENTAL FROM LSN: {from_lsn}\nINCREMENTAL FROM TLI: {int(from_tli)}\n"


# -- planning and writing incremental files (in the copy step)


def relation_of(rel_path: str, tablespace_oid: int | None = None):
    """(spc, db, relfilenode, fork, segno) of a relation file's path in the backup, else None.
    rel_path: base/<db>/<file>, global/<file>, or for a tablespace <PG_x_y>/<db>/<file>."""
    parts = rel_path.split("/")
    m = _REL.match(parts[-1])
    if not m or m.group(1) == "0":
        return None
    if tablespace_oid is not None:
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        spc, db = int(tablespace_oid), int(parts[1])
    elif len(parts) == 3 and parts[0] == "base" and parts[1].isdigit():
        spc, db = DEFAULT_TABLESPACE, int(parts[1])
    elif len(parts) == 2 and parts[0] == "global":
        spc, db = GLOBAL_TABLESPACE, 0
    else:
        return None
    return spc, db, int(m.group(1)), FORKS[m.group(2) or ""], int(m.group(3) or 0)


def plan_file(bm: BlockMap, key: tuple, size: int, mtime: float, started_epoch: float, block_size: int, relseg: int):
    """None: copy the file whole. Else (relative block numbers to store, truncation block length)."""
    spc, db, rel, fork, segno = key
    if size % block_size or size // block_size > relseg or fork == FSM_FORK:
        return None  # odd size, or the free space map (not WAL-logged)
    if (spc, db) in bm.databases:
        return None  # the database was created since the parent
    entry = bm.relations.get((spc, db, rel, fork))
    nblocks = size // block_size
    if entry is None:
        # No WAL-logged change since the parent. A file created after the start is unknown to the
        # summaries as well: a recent modification time means it is copied whole.
        if size == 0 or mtime >= started_epoch - MTIME_MARGIN:
            return None
        return [], nblocks
    limit, blocks = entry
    first = segno * relseg
    if limit is not None and limit <= first:
        return None
    wanted = sorted(b - first for b in blocks if first <= b < first + nblocks)
    if len(wanted) * block_size > size * WHOLE_FILE_SHARE:
        return None
    truncation = nblocks
    if limit is not None:
        truncation = min(max(truncation, limit - first), relseg)
    return wanted, truncation


def header_size(count: int, block_size: int) -> int:
    n = 12 + 4 * count
    if count and n % block_size:
        n += block_size - n % block_size
    return n


def write_incremental(src: str, dst: str, blocks: list, truncation: int, block_size: int) -> int:
    """Write dst as an INCREMENTAL file holding src's listed blocks; its size. A block the file no
    longer has (truncated while copied) is stored as zeros: WAL replay rewrites it."""
    head = struct.pack(f"=III{len(blocks)}I", MAGIC, len(blocks), truncation, *blocks)
    head += b"\0" * (header_size(len(blocks), block_size) - len(head))
    # src is opened first: a file dropped since the walk leaves no dst (FileNotFoundError), and
    # one dropped after this still reads to its end.
    with open(src, "rb", buffering=0) as f:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, head)
            for first, count in block_runs(blocks):
                want = count * block_size
                got = copy_range(f.fileno(), fd, first * block_size, want)
                if got < want:
                    write_all(fd, bytes(want - got))
        finally:
            os.close(fd)
    return len(head) + len(blocks) * block_size


def block_runs(blocks: list) -> list:
    """(first, count) of each run of consecutive block numbers in a sorted list: one copy each."""
    runs = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return runs


def incremental_name(rel_path: str) -> str:
    head, tail = os.path.split(rel_path)
    return os.path.join(head, PREFIX + tail)


def in_parent(parent_paths, path: str) -> bool:
    """Whether the parent backup holds this file, whole or as an INCREMENTAL file. pg_combinebackup
    rebuilds an INCREMENTAL file from the same file in each earlier backup of the chain and fails when
    one has neither, so a file the parent lacks is copied whole (the server's own rule)."""
    return path in parent_paths or incremental_name(path) in parent_paths


def stage_files(
    root: str, files: list, stage: str, bm: BlockMap, doc: dict, parent_paths, prefix: str = "", tablespace_oid: int | None = None
) -> tuple:
    """Write the INCREMENTAL files of root's relation files into stage (same relative directories).
    parent_paths: every path of the parent's manifest; prefix: root's place in the backup ("" for the
    data directory, "pg_tblspc/<oid>/" for a tablespace). Returns (files still to copy whole, staged
    relative paths, stats)."""
    bs, relseg, started = doc["block_size"], doc["relseg_blocks"], doc["started_epoch"]
    keep, staged = [], []
    stats = {"incremental_files": 0, "whole_files": 0, "blocks": 0, "bytes": 0, "replaced_bytes": 0}
    for rel in files:
        key = relation_of(rel, tablespace_oid)
        if key is None:
            keep.append(rel)
            continue
        if not in_parent(parent_paths, prefix + rel):
            # A segment the parent did not have: a relation that grew past 1 GB since the parent
            # (or after this backup's start, before the copy listed its files).
            keep.append(rel)
            stats["whole_files"] += 1
            continue
        src = os.path.join(root, rel)
        try:
            st = os.stat(src)
        except FileNotFoundError:
            continue  # dropped since the walk: normal on a running cluster
        planned = plan_file(bm, key, st.st_size, st.st_mtime, started, bs, relseg)
        if planned is None:
            keep.append(rel)
            stats["whole_files"] += 1
            continue
        blocks, truncation = planned
        name = incremental_name(rel)
        os.makedirs(os.path.join(stage, os.path.dirname(name)), mode=0o700, exist_ok=True)
        try:
            stats["bytes"] += write_incremental(src, os.path.join(stage, name), blocks, truncation, bs)
        except FileNotFoundError:
            continue
        staged.append(name)
        stats["replaced_bytes"] += st.st_size
        stats["incremental_files"] += 1
        stats["blocks"] += len(blocks)
    return keep, staged, stats


# -- file-level incremental backups (PostgreSQL 12 to 16, or any version by choice)

FILES_FILE = "backup_files.json"  # a file-level tar incremental: the files it takes from earlier backups


def _manifest_mtime(text) -> int | None:
    try:
        return calendar.timegm(time.strptime(str(text), "%Y-%m-%d %H:%M:%S GMT"))
    except ValueError:
        return None


def parent_file_map(parent_id: str, manifest: dict, files_doc: dict | None) -> dict:
    """path -> [size, mtime, id of the backup holding it, checksum, algorithm] of every file of the parent
    backup: those it stored (its manifest) and those it took from its own parents (its files list)."""
    out = {}
    for f in manifest.get("Files") or []:
        mtime = _manifest_mtime(f.get("Last-Modified"))
        if "Path" in f and mtime is not None:
            out[f["Path"]] = [int(f["Size"]), mtime, parent_id, f.get("Checksum"), f.get("Checksum-Algorithm")]
    for path, t in ((files_doc or {}).get("taken") or {}).items():
        out[path] = [t["size"], t["mtime"], t["from"], t.get("checksum"), t.get("algorithm")]
    return out


def unchanged(full: str, st, known, parent_started: float, algorithm_of) -> bool:
    """Whether a file is the same as in the parent: same size and modification time, and last
    modified before the second the parent started (a change within the second a copy was taken
    leaves the time as it was: pgBackRest's rule); or, with algorithm_of, the same checksum."""
    size, mtime, _holder, checksum, algorithm = known
    if st.st_size != size:
        return False
    if algorithm_of is not None:
        if not checksum or not algorithm:
            return False
        h = algorithm_of(algorithm)
        if h is None:
            return False
        with open(full, "rb", buffering=0) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest() == checksum
    return int(st.st_mtime) == mtime and mtime < int(parent_started)


def split_unchanged(root: str, files: list, prefix: str, parent: dict, algorithm_of=None) -> tuple:
    """(files to copy, {path in the backup: what the parent holds} of the files taken from it).
    Directories and pg_control are always copied."""
    copy, taken = [], {}
    pmap, started = parent["files"], parent["started_epoch"]
    for rel in files:
        known = pmap.get(prefix + rel)
        if known is None or rel == "global/pg_control":
            copy.append(rel)
            continue
        full = os.path.join(root, rel)
        try:
            st = os.stat(full)
        except FileNotFoundError:
            continue  # dropped since the walk
        if not stat.S_ISREG(st.st_mode) or not unchanged(full, st, known, started, algorithm_of):
            copy.append(rel)
            continue
        taken[prefix + rel] = {"size": known[0], "mtime": known[1], "from": known[2], "checksum": known[3], "algorithm": known[4]}
    return copy, taken
