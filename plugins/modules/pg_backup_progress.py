#!/usr/bin/python
# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_backup_progress
short_description: Wait a while for the start or the copy of a backup, and say how far it is
version_added: 0.1.0
description:
  - A start (M(pgops.online_backup.pg_backup_session) O(pgops.online_backup.pg_backup_session#module:state=started))
    whose checkpoint takes longer than its
    O(pgops.online_backup.pg_backup_session#module:progress_interval), or a copy (M(pgops.online_backup.pg_backup_copy))
    that runs longer than its O(pgops.online_backup.pg_backup_copy#module:progress_interval), is handed over by its
    task and goes on by itself. This module waits up to O(wait) seconds for it to end and returns either its progress
    (RV(in_progress), RV(line)) or, once it has ended, the result its own task would have returned (the start's, or
    the copy's), failing as that task would have.
  - The action plugins of those two modules call it in turns and print RV(line) at each; it is rarely needed on its
    own, except to look at a copy from another run (without O(watch)).
  - Only one turn may read a step's end - a copy's result is removed once returned, and a start that failed is
    forgotten.
author:
  - pgops.online_backup contributors (@pgops)
extends_documentation_fragment:
  - pgops.online_backup.attributes
attributes:
  check_mode:
    support: full
    details: Waits and reports the same in check mode.
  diff_mode:
    support: none
  idempotent:
    support: none
    details: The step's end is returned once.
options:
  session_id:
    description: The backup's session (same host and OS user).
    type: str
    required: true
  runtime_dir:
    description: The keepers' directory, when not the default of M(pgops.online_backup.pg_backup_session).
    type: path
  copy_id:
    description:
      - The copy to wait for, as the handing-over M(pgops.online_backup.pg_backup_copy) task returned it (its
        C(copy_id)). Without it, the session's start is waited for.
    type: str
  wait:
    description: Seconds to wait for the step to end before returning its progress (V(0) looks once).
    type: float
    default: 0
  watch:
    description:
      - Attach to the session's keeper while waiting, as the run that waits for this backup - if this task is killed
        (Ctrl-C, a lost controller), the keeper ends the backup at once. A turn that returns while the step still runs
        promises the next within 30 seconds; when none comes, the keeper ends the backup, as its run is gone.
      - The action plugins set it; leave it unset to look from elsewhere.
    type: bool
    default: false
  spread_checkpoint_hint:
    description: What the line printed while a spread checkpoint is waited for names as the way to start at once.
    type: str
    default: fast=true
seealso:
  - module: pgops.online_backup.pg_backup_session
  - module: pgops.online_backup.pg_backup_copy
  - module: pgops.online_backup.pg_backup_session_info
"""

EXAMPLES = r"""
- name: How far is the copy of that backup? (from another run)
  pgops.online_backup.pg_backup_progress:
    session_id: 20261129T101500Z-0a1b2c3d
    copy_id: "{{ copy.copy_id }}"
  register: progress

- name: Say it
  ansible.builtin.debug:
    msg: "{{ progress.line }}"
"""

RETURN = r"""
in_progress:
  description: The step still runs; RV(line) and RV(progress) say how far it is.
  returned: always
  type: bool
line:
  description:
    - How far the step is, for people, for example C(copy 812.4 MiB of 1.6 GiB (51%), 402.1 MiB/s, about 2.0s left)
      or C(start waiting for the checkpoint (spread, requested 1m10s ago; fast=true starts at once)).
  returned: always
  type: str
progress:
  description:
    - The copy's record (C(bytes_done), C(bytes_expected), C(percent), C(rate_bytes_per_second), C(eta_seconds),
      C(seconds), C(phase), C(started_at), C(updated_at)), or the start's (C(start_stage), C(start_waiting_seconds),
      C(fast)).
  returned: always
  type: dict
session_id:
  description: The session.
  returned: always
  type: str
"""

import datetime
import os
import shutil
import signal
import threading
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pgops.online_backup.plugins.module_utils._errors import PgopsError
from ansible_collections.pgops.online_backup.plugins.module_utils._files import read_json
from ansible_collections.pgops.online_backup.plugins.module_utils._progress import copy_line, read_progress, start_line
from ansible_collections.pgops.online_backup.plugins.module_utils._sessions import (
    LIVE,
    RUNNING,
    STARTING,
    WATCH_GRACE,
    Attachment,
    default_runtime_dir,
    describe,
    mark_lost_if_dead,
    process_alive,
    read_state,
    session_dir,
    start_result,
)

LOOK_EVERY = 0.1  # seconds between looks while waiting
COPY_EXIT_GRACE = 60.0  # seconds a cancelled copy may take to stop before it is killed


def main():
    module = AnsibleModule(
        argument_spec=dict(
            session_id=dict(type="str", required=True),
            runtime_dir=dict(type="path"),
            copy_id=dict(type="str"),
            wait=dict(type="float", default=0),
            watch=dict(type="bool", default=False),
            spread_checkpoint_hint=dict(type="str", default="fast=true"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        sdir = session_dir(p["runtime_dir"] or default_runtime_dir(), p["session_id"])
    except PgopsError as e:
        module.fail_json(msg=str(e))
    if read_state(sdir) is None:
        module.fail_json(msg=f"unknown session id {p['session_id']}: no such session on this host for this OS user")
    ended = threading.Event()
    attached = None
    if p["watch"]:
        attached = Attachment(sdir, ended.set, op="watch")
        attached.start()  # refused when the session has ended: what follows reports why
    step = Copy(module, sdir, p["copy_id"]) if p["copy_id"] else Start(module, sdir)
    deadline = time.monotonic() + max(0.0, p["wait"])
    outcome = None
    try:
        while True:
            outcome = step.look()
            if outcome is not None or time.monotonic() >= deadline:
                break
            ended.wait(min(LOOK_EVERY, max(0.0, deadline - time.monotonic())))
    finally:
        if attached is not None:
            # Still running: this run promises its next turn (or the keeper ends the backup).
            attached.stop(back_within=WATCH_GRACE if outcome is None else None)
    if outcome is None:
        module.exit_json(changed=False, in_progress=True, session_id=p["session_id"], **step.progress())
    ok, result = outcome
    result = dict(result, session_id=p["session_id"], in_progress=False)
    if not ok:
        module.fail_json(**result)
    module.exit_json(**result)


class Start:
    """A handed-over start: running once the keeper says so, or failed as the start task would have."""

    def __init__(self, module, sdir: str):
        self.module = module
        self.sdir = sdir
        self.hint = module.params["spread_checkpoint_hint"]
        self.state = read_state(sdir) or {}

    def look(self):
        state = read_state(self.sdir)
        if state is None:
            return False, {"msg": "the session's state is gone: the backup did not start"}
        state = mark_lost_if_dead(self.sdir, state, write=not self.module.check_mode)
        self.state = state
        status = state.get("status")
        if status == STARTING:
            return None
        if status not in (STARTING, "failed", "aborted", "expired", "lost"):
            out = start_result(state)
            if out.get("incremental_refused"):
                self.module.warn(f"this backup is a full one, not an incremental: {out['incremental_refused']}")
            return True, dict(out, changed=True, line="start: the backup started", msg=f"backup started at {out['start_lsn']}")
        err = state.get("start_error")
        if err:
            if not self.module.check_mode:
                forget(self.sdir)  # nothing to stop, list or abort
            return False, {"msg": err["message"], "sqlstate": err.get("sqlstate"), "changed": False}
        reason = state.get("reason") or status
        return False, {"msg": f"the backup was aborted while it started: {reason}", "status": status, "changed": False}

    def progress(self) -> dict:
        info = describe(self.state)
        rec = {k: info.get(k) for k in ("start_stage", "start_waiting_seconds", "fast")}
        return {"progress": rec, "line": start_line(info, self.hint)}


class Copy:
    """A handed-over copy: its result once its process has written it."""

    def __init__(self, module, sdir: str, copy_id: str):
        self.module = module
        self.sdir = sdir
        self.copy_id = copy_id
        try:
            pid, starttime = copy_id.split(".", 1)
            self.pid, self.starttime = int(pid), int(starttime)
        except ValueError:
            module.fail_json(msg=f"invalid copy_id {copy_id!r}: use the copy_id pg_backup_copy returned")
        self.path = os.path.join(sdir, f"copy-{copy_id}.json")

    def look(self):
        out = self._result()
        if out is not None:
            return out
        if not process_alive(self.pid, self.starttime):
            out = self._result()  # written just before it ended
            if out is not None:
                return out
            return False, {"msg": f"copy failed: its process {self.pid} ended without a result{self._why()}"}
        state = read_state(self.sdir) or {}
        if state.get("status") not in LIVE and state.get("ended_at"):
            # The backup ended: the copy hears it and stops within seconds, then says why; unless it hangs.
            since = datetime.datetime.fromisoformat(state["ended_at"]).timestamp()
            if time.time() - since > COPY_EXIT_GRACE:
                try:
                    os.killpg(self.pid, signal.SIGKILL)  # the copy and its tar, compressor, ssh
                except OSError:
                    pass
                return False, {"msg": f"copy failed: it did not stop within {COPY_EXIT_GRACE:g}s{self._why()}"}
        return None

    def _result(self):
        out = read_json(self.path)
        if not isinstance(out, dict):
            return None
        if not self.module.check_mode:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if out.get("ok"):
            return True, dict(out["result"], changed=True)
        return False, {"msg": out.get("msg") or "copy failed"}

    def _why(self) -> str:
        state = read_state(self.sdir) or {}
        if state.get("status") in (STARTING, RUNNING):
            return ""
        return f": session {state.get('status')}, backup unusable: {state.get('reason')}"

    def progress(self) -> dict:
        rec = read_progress(self.sdir)
        return {"progress": rec or {}, "line": copy_line(rec) if rec else "copy: starting", "copy_id": self.copy_id}


def forget(sdir: str) -> None:
    shutil.rmtree(sdir, ignore_errors=True)


if __name__ == "__main__":
    main()
