"""The list playbook against a real PostgreSQL 17: a failed, a full (verified), an incremental and a running
backup, each printed with its type and status, the running backup's session printed from its database
host, nothing changed."""

from __future__ import annotations

import glob
import importlib
import os
import re
import signal
import sys

from harness.ansible import REPO, collections_workspace
from harness.backup import (
    BACKUP,
    backup_vars,
    backups,
    finish,
    running_keeper_pid,
    start_backup_in_background,
    wait_for_copy,
)
from harness.pg import make_pg_dir

sys.path.insert(0, collections_workspace())
status = importlib.import_module("ansible_collections.pgops.online_backup.plugins.module_utils._status")

LIST = os.path.join(REPO, "playbooks", "list.yml")
PRINT = "Print the backups and the running sessions"
SIZE = r"\d+(\.\d)? (B|KiB|MiB|GiB)"


def copy_processes(data_directory: str) -> list:
    """The copy's tar and compressor for this data directory. Found by tar's command line and its
    siblings, not by descent from the run: a copy that outlasts progress_interval is handed over to
    a detached process, which is no longer below the run."""

    def comm(pid):
        try:
            return open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            return None

    def ppid(pid):
        try:
            return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None

    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    parents = set()
    for pid in pids:
        if comm(pid) == "tar":
            try:
                args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if data_directory.encode() in args:
                parents.add(ppid(pid))
    return [pid for pid in pids if ppid(pid) in parents and comm(pid) in ("tar", "gzip", "pigz")]


def row_of(lines: list, backup_id: str) -> list:
    (line,) = [line for line in lines if line.startswith(backup_id + " ")]
    return line


def repository_state(repo: str) -> dict:
    return {p: open(p, "rb").read() for p in glob.glob(os.path.join(repo, "*", "backup.json"))}


def test_list_prints_every_backup_with_its_status_and_the_running_session(make_cluster, playbook, tmp_path):
    c = make_cluster(17, summarize_wal="on")  # WAL summaries: incremental backups
    # md5 text compresses slowly with gzip -9 on one thread: a background backup's copy takes seconds.
    c.sql("CREATE TABLE bulk AS SELECT g, md5(g::text) || md5((g * 7)::text) AS h FROM generate_series(1, 1500000) g")
    repo = os.path.join(make_pg_dir("pgops-repo-"), "repo")
    ev = {"pg_backup_repository": repo}

    # A failed backup: its keeper killed during the copy.
    proc = start_backup_in_background(c, repo, str(tmp_path / "failed"))
    wait_for_copy(repo)
    os.kill(running_keeper_pid(c), signal.SIGKILL)
    rc, out = finish(proc)
    assert rc != 0, out[-3000:]
    (failed,) = backups(repo)
    assert failed["status"] == "failed"

    # A complete backup, verified against its manifest.
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_compression="zstd"))
    assert run.rc == 0, run
    (done,) = [b for b in backups(repo) if b["status"] == "complete"]
    verify = playbook(
        [{"hosts": "postgresql", "gather_facts": False, "tasks": [
            {"name": "verify", "pgops.online_backup.pg_backup_manifest": {
                "path": os.path.join(repo, done["id"]), "state": "verified", "wal_archive": c.archive}}]}]
    )  # fmt: skip
    assert verify.rc == 0 and verify.task("verify")["verified"] is True, verify

    # An incremental backup on top of it.
    c.sql("UPDATE bulk SET h = upper(h) WHERE g <= 1000")
    run = playbook(BACKUP, extra_vars=backup_vars(c, repo, pg_backup_compression="zstd", pg_backup_type="incremental"))
    assert run.rc == 0, run
    incr = backups(repo)[-1]
    assert (incr["status"], incr.get("type"), incr.get("parent")) == ("complete", "incremental", done["id"]), incr

    # A backup held in its copy (tar and the compressor stopped) while the list runs; its sessions directory
    # is its own (other tests' sessions are in the default one), and the list reads it from pg_backup_runtime_dir.
    runtime = os.path.join(make_pg_dir("pgops-rt-"), "sessions")
    ev["pg_backup_runtime_dir"] = runtime
    proc = start_backup_in_background(c, repo, str(tmp_path / "running"), pg_backup_runtime_dir=runtime)
    try:
        running = wait_for_copy(repo)
        paused = copy_processes(c.data)
        assert paused, "no copy process found below the run"
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        try:
            before = repository_state(repo)
            listing = playbook(LIST, extra_vars=ev)
            after = repository_state(repo)
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
    finally:
        rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    assert listing.rc == 0, listing
    assert not any(r["result"].get("changed") for r in listing.results), "the list changes nothing"
    assert before == after

    lines = listing.task(PRINT)["msg"]
    text = "\n".join(lines)
    assert all(line in listing.stdout for line in ('"' + line + '"' for line in lines if line)), "printed line by line"
    assert lines[0] == f"4 backup(s) of 1 cluster(s) in {repo}", text
    sysid = str(done["system_identifier"])
    assert f"cluster {sysid} (localhost; PostgreSQL {done['pg_version_text']}; {c.data}): 4 backup(s), 2 complete" in text
    assert f"latest: {incr['id']}" in text
    ids = [line.split()[0] for line in lines if re.match(r"\d{8}T\d{6}Z ", line)]
    assert ids == [running["id"], incr["id"], done["id"], failed["id"]], "newest first: " + text
    assert row_of(lines, incr["id"]).split()[1:5] == ["incr", "of", done["id"], "complete"], text

    assert row_of(lines, failed["id"]).split()[1:3] == ["full", "failed"]
    assert f"  {failed['id']} failed: " in text and "session lost" in text, "the failed backup's error is a note"

    complete_row = row_of(lines, done["id"])
    assert complete_row.split()[1:3] == ["full", "complete"]
    assert re.search(rf"  {SIZE} / {SIZE}  ", complete_row), complete_row
    assert f"  {done['start_wal']} .. {done['stop_wal']}  " in complete_row
    assert re.search(r"  ok \d{4}-\d\d-\d\d \d\d:\d\d  never$", complete_row), "verified, never drilled: " + complete_row
    # The columns are what its backup.json says, formatted.
    assert complete_row.split("  ")[0] == done["id"]
    assert status.human_seconds(done["duration"]) in complete_row.split()
    assert f"{status.human_bytes(done['bytes'])} / {status.human_bytes(done['source_bytes'])}" in complete_row

    running_row = row_of(lines, running["id"])
    assert running_row.split()[1:3] == ["full", "running"] and " so far " in running_row, running_row

    # The session section of the database host: the running backup's session, what it waits for.
    assert "backup sessions running on localhost: 1" in lines, text
    (session,) = [line for line in lines if line.startswith(f"  {running['id']}-")]
    assert session.split()[1] == "running" and f"server {c.sock}:{c.port}" in session, session
    waits = lines[lines.index(session) + 1]
    assert "waits for the stop (the copy runs meanwhile)" in waits, waits

    # Once the running backup is complete, the list says so and no session is running any more.
    again = playbook(LIST, extra_vars=ev)
    assert again.rc == 0, again
    lines = again.task(PRINT)["msg"]
    assert row_of(lines, running["id"]).split()[1:3] == ["full", "complete"]
    assert "4 backup(s), 3 complete" in "\n".join(lines)
    assert [line for line in lines if line.startswith("backup sessions running on localhost: none")], lines


def test_list_refuses_a_relative_repository_before_reading_anything(playbook):
    run = playbook(LIST, extra_vars={"pg_backup_repository": "backups"})
    assert run.rc != 0
    (failed,) = [r for r in run.results if r["status"] == "failed"]
    assert failed["task"] == "Validate the input" and "absolute path or s3:// URL" in str(failed["result"]), failed
