"""pg_archiving_check against real servers, through the real ansible-playbook: the active
proof (switch WAL, wait for that segment) and when it is skipped. changed is true exactly
when it switched WAL; the facts and their judging are shared with pg_archiving_info
(test_archiving_info.py)."""

from __future__ import annotations

import os
import time

import pytest
from harness.archiving import as_role, backup_roles, codes, current_wal, play
from harness.archiving import task as module_task
from harness.pg import Cluster, make_standby

MODULE = "pgops.online_backup.pg_archiving_check"


def task(name: str, cluster: Cluster, **params) -> dict:
    return module_task(MODULE, name, cluster, **params)


def module_results(run) -> list:
    return [e for e in run.results if "proof" in e["result"]]


def assert_changed_iff_switched(run) -> None:
    results = module_results(run)
    assert results, run
    for e in results:
        r = e["result"]
        assert r["changed"] is r["proof"]["switched"], (e["task"], r["changed"], r["proof"])
        if r["proof"]["switched"]:
            assert r["proof"]["performed"] is True, (e["task"], r["proof"])


def assert_no_session_left(c: Cluster) -> None:
    assert not c.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgops.online_backup%'")[0][0]
    assert not os.path.exists(os.path.join(c.data, "backup_label"))


@pytest.mark.parametrize("major", [13, 15, 18])
def test_proof_outcomes(major, make_cluster, playbook):
    good = make_cluster(major)
    failing = make_cluster(major, archive_command="'/bin/false'")
    slow = make_cluster(major, archive_command="'sleep 5'")
    off = make_cluster(major, archive_mode="off")
    funcs = backup_roles(good)
    clusters = (good, failing, slow, off)

    # 1. Every case where the proof must not run: nothing is switched, nothing changed.
    before = {c: current_wal(c) for c in clusters}
    run = playbook(
        play(
            [
                {**task("check mode", good, prove_timeout=30), "check_mode": True},
                {**task("failing check mode", failing), "check_mode": True},
                {"name": "bob", MODULE: as_role(good, "bob")},
                {"name": "carol", MODULE: as_role(good, "carol", prove_timeout=30)},
                task("off", off),
                {**task("zero timeout", good, prove_timeout=0), "ignore_errors": True},
            ]
        )
    )
    assert run.rc == 0, run
    assert {c: current_wal(c) for c in clusters} == before
    assert_changed_iff_switched(run)
    assert [e["task"] for e in run.results if e["result"].get("changed")] == []

    r = run.task("check mode")
    assert r["ok"] is True and r["problems"] == [] and r["changed"] is False, r["problems"]
    assert r["proof"]["performed"] is False and "check mode" in r["proof"]["skipped_reason"]
    r = run.task("failing check mode")
    assert r["ok"] is True and r["proof"]["performed"] is False, r  # an archiver that never ran has not failed yet

    r = run.task("bob")
    assert codes(r) == {"missing_backup_privilege"}, r["problems"]
    hint = r["problems"][0]["hint"]
    for f in [*funcs, "pg_switch_wal()"]:  # the proof needs pg_switch_wal() too
        assert f'GRANT EXECUTE ON FUNCTION {f} TO "bob";' in hint
    assert r["proof"]["performed"] is False and "pg_switch_wal()" in r["proof"]["skipped_reason"]

    r = run.task("carol")
    assert codes(r) == {"cannot_switch_wal"}, r["problems"]
    assert 'GRANT EXECUTE ON FUNCTION pg_switch_wal() TO "carol";' in r["problems"][0]["hint"]
    assert r["privileges"]["can_start_backup"] is True and r["privileges"]["can_switch_wal"] is False
    assert r["proof"]["performed"] is False and "carol" in r["proof"]["skipped_reason"]

    r = run.task("off")
    assert codes(r) == {"archive_mode_off"} and r["proof"]["performed"] is False
    assert "not set up" in r["proof"]["skipped_reason"]

    assert [e["status"] for e in run.results if e["task"] == "zero timeout"] == ["failed"]
    assert "prove_timeout must be greater than 0" in run.task("zero timeout")["msg"]

    # 2. The proofs: each switches WAL once, so changed, and reports that segment.
    wal = {c: current_wal(c) for c in clusters}
    run = playbook(
        play(
            [
                task("good", good, prove_timeout=30),
                {"name": "dave", MODULE: as_role(good, "dave", prove_timeout=30)},
                task("failing", failing, prove_timeout=30),
                {**task("failing again", failing, prove_timeout=30, fail_on_problems=True), "ignore_errors": True},
                task("slow", slow, prove_timeout=1.5),
            ]
        )
    )
    assert run.rc == 0, run
    assert_changed_iff_switched(run)

    r = run.task("good")
    assert r["ok"] is True and r["problems"] == [] and r["changed"] is True, r["problems"]
    proof = r["proof"]
    assert proof["performed"] and proof["switched"] and proof["archived"] and proof["outcome"] == "archived", proof
    assert proof["wal"] == wal[good] and proof["timeout"] == 30, proof
    assert os.path.exists(os.path.join(good.archive, proof["wal"])), proof
    assert r["archiver"]["failed_count"] == 0
    assert r["msg"].startswith("WAL archiving works") and proof["wal"] in r["msg"]
    # dave, not a superuser, proves it with the next segment.
    r = run.task("dave")
    assert r["ok"] is True and r["changed"] is True and r["privileges"]["superuser"] is False, r["problems"]
    assert r["proof"]["archived"] is True and r["proof"]["wal"] > wal[good], r["proof"]
    assert os.path.exists(os.path.join(good.archive, r["proof"]["wal"]))
    assert current_wal(good) > r["proof"]["wal"]

    r = run.task("failing")
    assert codes(r) == {"archive_proof_failed"}, r["problems"]
    proof = r["proof"]
    # Fail fast on the archiver's report, long before prove_timeout.
    assert proof["outcome"] == "failed" and proof["archived"] is False and proof["seconds"] < 15, proof
    assert r["changed"] is True and proof["wal"] == wal[failing]
    assert r["archiver"]["last_failed_wal"] == proof["wal"] and f"proof segment {proof['wal']}" in r["problems"][0]["message"]
    # Stuck on the first segment, the archiver holds up the second proof's segment: failed, not timeout.
    r = run.task("failing again")
    assert [e["status"] for e in run.results if e["task"] == "failing again"] == ["failed"]
    assert codes(r) == {"archive_proof_failed"} and r["changed"] is True, r["problems"]
    assert r["proof"]["outcome"] == "failed" and r["proof"]["seconds"] < 15 and r["proof"]["wal"] > wal[failing]
    assert wal[failing] in r["problems"][0]["message"] and "holds it up" in r["problems"][0]["message"]
    assert "archive_proof_failed:" in r["msg"] and "no backup was started" in r["msg"]
    assert current_wal(failing) > r["proof"]["wal"]
    assert os.listdir(failing.archive) == []

    r = run.task("slow")
    assert codes(r) == {"archive_proof_timeout"}, r["problems"]
    assert r["proof"]["outcome"] == "timeout" and 1.5 <= r["proof"]["seconds"] < 5, r["proof"]
    assert r["proof"]["timeout"] == 1.5 and r["changed"] is True
    assert "prove_timeout" in r["problems"][0]["hint"]
    assert current_wal(slow) > r["proof"]["wal"] == wal[slow]

    for c in clusters:
        assert_no_session_left(c)


def test_standby_skips_the_proof(make_cluster, playbook):
    primary = make_cluster(15)
    standby = None
    try:
        standby = make_standby(primary, own_archive=True)
        wal = current_wal(primary)
        run = playbook(play([task("standby", standby, prove_timeout=30)]))
        assert run.rc == 0, run
        assert_changed_iff_switched(run)
        r = run.task("standby")
        assert codes(r) == {"standby_archive_mode_not_always"}, r["problems"]
        assert r["in_recovery"] is True and r["changed"] is False
        assert r["proof"]["performed"] is False and "standby" in r["proof"]["skipped_reason"]
        assert current_wal(primary) == wal

        # With archive_mode=always the standby passes, still without a proof; the primary proves it.
        standby.set_conf(archive_mode="always")
        standby.stop()
        standby.start()
        standby.wait_ready()
        run = playbook(play([task("standby always", standby, prove_timeout=30), task("primary", primary, prove_timeout=30)]))
        assert run.rc == 0, run
        assert_changed_iff_switched(run)
        r = run.task("standby always")
        assert r["ok"] is True and r["archive_mode"] == "always" and r["changed"] is False, r["problems"]
        assert r["proof"]["performed"] is False and "standby" in r["proof"]["skipped_reason"]
        r = run.task("primary")
        assert r["ok"] is True and r["changed"] is True and r["proof"]["wal"] == wal, r["proof"]
        assert current_wal(primary) > wal
        # The standby archives the segment it received, too (archive_mode=always).
        deadline = time.monotonic() + 30
        while wal not in os.listdir(standby.archive):
            assert time.monotonic() < deadline, os.listdir(standby.archive)
            time.sleep(0.1)
        for c in (primary, standby):
            assert_no_session_left(c)
    finally:
        if standby is not None:
            standby.destroy()
