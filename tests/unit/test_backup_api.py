"""Pure logic of the backup API: SQL per major, WAL names, labels, grants."""

from __future__ import annotations

import pytest

from ansible_collections.pgops.online_backup.plugins.module_utils import _backup_api as api

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
    with pytest.raises(ValueError):
        api.parse_lsn("nonsense")


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


def test_parse_conninfo_handles_quotes_unknown_keywords_and_uris():
    from ansible_collections.pgops.online_backup.plugins.module_utils._postgres import parse_conninfo

    got = parse_conninfo("user=rep passfile='/var/lib/p q/.pgpass' host=/tmp/s port=5433 sslnegotiation=postgres x='it\\'s'")
    assert got == {
        "user": "rep",
        "passfile": "/var/lib/p q/.pgpass",
        "host": "/tmp/s",
        "port": "5433",
        "sslnegotiation": "postgres",
        "x": "it's",
    }
    assert parse_conninfo("host = 10.0.0.1  port= 5432")["host"] == "10.0.0.1"
    uri = parse_conninfo("postgresql://rep@db1.example:5433/postgres?sslmode=require")
    assert uri == {"host": "db1.example", "port": "5433", "user": "rep", "sslmode": "require"}
