# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The action of pg_backup_session and pg_backup_copy: run the module; when it hands its step over
(a start whose checkpoint takes longer than progress_interval, a copy that runs longer), wait for
the step in turns of pg_backup_progress, printing how far it is at each, and return the step's
result as the task's own. Ansible prints nothing while a task runs; this prints a line per turn."""

from __future__ import annotations

import time

from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible.utils.vars import merge_hash

display = Display()

PROGRESS = "pgops.online_backup.pg_backup_progress"


class InTurns(ActionBase):
    _supports_check_mode = True
    _supports_async = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp  # tmp no longer has any effect
        wrap_async = self._task.async_val and not self._connection.has_native_async
        args = None
        if self._task.async_val:
            args = dict(self._task.args, progress_interval=0)  # with async the step runs within its task
        result = merge_hash(result, self._execute_module(module_args=args, task_vars=task_vars, wrap_async=wrap_async))
        if not wrap_async:
            try:
                result = self._in_turns(result, task_vars or {})
            finally:
                self._remove_tmp_path(self._connection._shell.tmpdir)
        return result

    def _in_turns(self, result: dict, task_vars: dict) -> dict:
        if not result.get("in_progress") or result.get("failed"):
            return result
        task_args = self._task.args
        turn = {
            "session_id": result["session_id"],
            "runtime_dir": task_args.get("runtime_dir"),
            "wait": float(task_args.get("progress_interval") or 0),
            "watch": True,
        }
        if result.get("copy_id"):
            turn["copy_id"] = result["copy_id"]
        else:
            turn["spread_checkpoint_hint"] = task_args.get("spread_checkpoint_hint") or "fast=true"
        invocation = result.get("invocation")
        host = task_vars.get("inventory_hostname", "")
        interval = turn["wait"]
        overhead = 0.3  # what a turn costs beyond its wait (starting the module), learnt as the turns go
        while result.get("in_progress") and not result.get("failed"):
            if result.get("line") and not self._task.no_log:
                display.display(f"[{host}] {result['line']}")
            # A line every interval: each turn waits that long less what a turn costs.
            turn["wait"] = round(max(0.2, interval - overhead), 3)
            began = time.monotonic()
            result = self._execute_module(module_name=PROGRESS, module_args=turn, task_vars=task_vars)
            if result.get("in_progress"):
                overhead = (overhead + max(0.0, time.monotonic() - began - turn["wait"])) / 2
        for key in ("in_progress", "line", "progress", "copy_id"):
            result.pop(key, None)
        if invocation is not None:
            result["invocation"] = invocation
        return result
