"""Pure logic of the backup API: SQL per major, WAL names, labels, grants."""

from __future__ import annotations

import importlib
import sys

import pytest
from harness.ansible import collections_workspace

sys.path.insert(0, collections_workspace())
api = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._backup_api")
PgopsError = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._errors").PgopsError

SEG = 16 * 1024 * 1024


@pytest.mark.parametrize("major", [12, 13, 14])
def test_old_majors_never_use_exclusive_mode(major):
    assert api.start_sql(major) == "SELECT pg_start_backup(%s, %s, false)::text"
    assert "pg_stop_backup(false, false)" in api.stop_sql(major)


@pytest.mark.parametrize("major", [15, 16, 17, 18])
def test_new_majors_use_new_names_and_keep_the_label(major):
    assert api.start_sql(major) == "SELECT pg_backup_start(%s, %s)::text"
    # wait_for_archive=false: an unbounded server-side wait could be cancelled and lose the label.
    assert "pg_backup_stop(false)" in api.stop_sql(major)


def test_lsn_round_trip():
    assert api.parse_lsn("0/2000028") == 0x2000028
    assert api.parse_lsn("1A/FF000000") == (0x1A << 32) | 0xFF000000
    assert api.format_lsn(api.parse_lsn("16/B374D848")) == "16/B374D848"
    for junk in ("nonsense", "", None, "0/", "/1", "123456789/0", "0/2000028 extra"):
        with pytest.raises(api.BackupApiError, match="is not an LSN"):
            api.parse_lsn(junk)
    # Callers that catch ValueError or the collection's base class both see it.
    assert issubclass(api.BackupApiError, ValueError) and issubclass(api.BackupApiError, PgopsError)


def test_wal_file_name_matches_server_naming():
    assert api.wal_file_name(1, 0x2000028, SEG) == "000000010000000000000002"
    # Exactly at a segment boundary the stop location belongs to the previous segment.
    assert api.wal_file_name(1, 0x3000000, SEG, previous=True) == "000000010000000000000002"
    assert api.wal_file_name(1, 0x3000000, SEG) == "000000010000000000000003"
    assert api.wal_file_name(2, (0x1 << 32) | 0xFF000000, SEG) == "0000000200000001000000FF"
    # 1 GB segments: four per xlogid.
    assert api.wal_file_name(1, (0x5 << 32) | 0x80000000, 1 << 30) == "000000010000000500000002"


def test_backup_history_file_name_and_segment_count():
    assert api.backup_history_file_name("000000010000000000000002", 0x2000028, SEG) == "000000010000000000000002.00000028.backup"
    assert api.wal_segment_count("000000010000000000000002", "000000010000000000000002", SEG) == 1
    assert api.wal_segment_count("0000000100000000000000FE", "000000010000000100000001", SEG) == 4


@pytest.mark.parametrize(
    "label,problem",
    [("ok", None), ("", "empty"), ("a\x00b", "NUL"), ("a\nb", "line break"), ("é" * 513, "1026 bytes"), ("x" * 1024, None)],
)
def test_validate_label(label, problem):
    got = api.validate_label(label)
    assert (got is None) if problem is None else (problem in got)


def test_grants_per_major_quote_the_role():
    assert api.grant_statements(14, 'we"ird') == [
        'GRANT EXECUTE ON FUNCTION pg_start_backup(text, boolean, boolean) TO "we""ird";',
        'GRANT EXECUTE ON FUNCTION pg_stop_backup(boolean, boolean) TO "we""ird";',
    ]
    assert api.grant_statements(17, "b", switch_wal=True)[-1] == 'GRANT EXECUTE ON FUNCTION pg_switch_wal() TO "b";'


def test_parse_labelfile():
    text = (
        "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n"
        "BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-29 10:50:56 UTC\nLABEL: a: b\nSTART TIMELINE: 1\n"
    )
    f = api.parse_labelfile(text)
    assert f["start_wal"] == "000000010000000000000002" and f["start_lsn"] == "0/2000028"
    assert f["label"] == "a: b" and f["backup_from"] == "primary" and f["start_timeline"] == "1"


def test_explain_errors_say_how_to_fix():
    msg = api.explain_start_error("42501", "permission denied for function pg_backup_start", 16, "bk")
    assert 'GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO "bk";' in msg
    assert "wal_level = replica" in api.explain_start_error(
        "55000", "WAL level not sufficient for making an online backup", 15, "x"
    )


# -- WAL segment ranges

MB = 1024 * 1024


def _segnos(names, seg_size):
    return [api.wal_segno(n, seg_size) for n in names]


@pytest.mark.parametrize(
    "seg_size, first, last, expected",
    [
        # 16 MB: 0x100 segments per log id, ...FF is followed by the next log's ...00.
        (
            16 * MB,
            "0000000100000000000000FE",
            "000000010000000100000001",
            ["0000000100000000000000FE", "0000000100000000000000FF", "000000010000000100000000", "000000010000000100000001"],
        ),
        # 64 MB: only 0x40 segments per log id, so ...3F is followed by the next log's ...00.
        (
            64 * MB,
            "00000001000000000000003E",
            "000000010000000100000001",
            ["00000001000000000000003E", "00000001000000000000003F", "000000010000000100000000", "000000010000000100000001"],
        ),
        # 1 GB: four per log id.
        (
            1024 * MB,
            "000000010000000000000003",
            "000000010000000100000000",
            ["000000010000000000000003", "000000010000000100000000"],
        ),
        (16 * MB, "000000010000000000000007", "000000010000000000000007", ["000000010000000000000007"]),
    ],
)
def test_wal_segment_names_cross_log_files_by_segment_size(seg_size, first, last, expected):
    names = api.wal_segment_names(first, last, seg_size)
    assert names == expected
    assert len(names) == api.wal_segment_count(first, last, seg_size)
    segnos = _segnos(names, seg_size)
    assert segnos == list(range(segnos[0], segnos[0] + len(names)))  # consecutive, none skipped
    # A segment name never has a low part beyond the segments of one log id.
    assert all(int(n[16:], 16) < 0x100000000 // seg_size for n in names)


def test_64mb_segments_never_name_segments_past_3f():
    names = api.wal_segment_names("000000010000000000000030", "000000010000000200000010", 64 * MB)
    assert len(names) == (0x40 - 0x30) + 0x40 + 0x11
    assert "000000010000000000000040" not in names and "0000000100000000000000FF" not in names
    assert names[names.index("00000001000000000000003F") + 1] == "000000010000000100000000"
    assert names[names.index("00000001000000010000003F") + 1] == "000000010000000200000000"


@pytest.mark.parametrize("seg_size", [16 * MB, 64 * MB])
def test_wal_segment_names_with_a_timeline_change_at_the_end(seg_size):
    last_low = 0x100000000 // seg_size - 1  # FF for 16 MB, 3F for 64 MB
    first = f"00000001000000000000{last_low - 1:04X}"
    last = "000000020000000100000000"
    names = api.wal_segment_names(first, last, seg_size)
    # The range is walked on the first timeline; the stop segment keeps its own (later) timeline.
    assert names == [first, f"00000001000000000000{last_low:04X}", last]
    assert [n[:8] for n in names] == ["00000001", "00000001", "00000002"]
    assert api.wal_segment_count(first, last, seg_size) == 3


def test_wal_segno_refuses_what_is_not_a_segment_name():
    for junk in ("", None, "00000001000000000000000", "000000010000000000000002.partial", "0000000100000000000000fe"):
        with pytest.raises(api.BackupApiError, match="is not a WAL segment name"):
            api.wal_segno(junk, 16 * MB)
    with pytest.raises(api.BackupApiError):
        api.wal_segment_names("000000010000000000000002", "000000010000000000000003.partial", 16 * MB)


def test_a_bad_first_name_or_an_impossible_segment_is_a_backup_api_error():
    with pytest.raises(api.BackupApiError, match="is not a WAL segment name"):
        api.wal_segment_names("x", "000000010000000000000002", 16 * MB)
    # 64 MB segments: a log file holds 00..3F; ...40 cannot exist (it would alias the next log's ...00).
    with pytest.raises(api.BackupApiError, match="cannot exist with 64 MB segments"):
        api.wal_segno("000000010000000000000040", 64 * MB)
    with pytest.raises(api.BackupApiError):
        api.wal_segment_names("00000001000000000000003F", "000000010000000000000040", 64 * MB)


def test_wal_segment_name_and_segno_are_inverse():
    for seg_size in (1 * MB, 16 * MB, 64 * MB, 1024 * MB):
        for segno in (0, 1, 0x3F, 0x40, 0xFF, 0x100, 12345):
            name = api.wal_segment_name(3, segno, seg_size)
            assert api.wal_segno(name, seg_size) == segno and name[:8] == "00000003"


def test_wal_name_order():
    assert api.wal_name_le("0000000100000000000000FF", "000000010000000100000000")
    assert not api.wal_name_le("000000010000000100000000", "0000000100000000000000FF")
    assert api.wal_name_le("000000010000000000000002", "000000010000000000000002")
    # A later timeline comes later, whatever the position.
    assert api.wal_name_le("0000000100000005000000FF", "000000020000000000000001")
