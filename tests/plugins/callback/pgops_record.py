# Test-only callback: appends every task result as one JSON line to
# $PGOPS_RECORD_FILE so tests assert on real module results.
from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: pgops_record
type: aggregate
short_description: record task results for tests
description: Writes task results as JSON lines to PGOPS_RECORD_FILE.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "pgops_record"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._started = time.time()

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._started = time.time()  # the benchmarks print each task's time from these

    v2_playbook_on_handler_task_start = v2_playbook_on_task_start

    @staticmethod
    def _task_name(result) -> str:
        """The task's own name: ansible-core 2.21 prefixes a role's tasks with '<role> : '."""
        task = result._task
        name = result.task_name if hasattr(result, "task_name") else task.get_name()
        role = getattr(task, "_role", None)
        if role is not None:
            prefix = role.get_name() + " : "
            if name.startswith(prefix):
                return name[len(prefix) :]
        return name

    def _record(self, result, status):
        path = os.environ.get("PGOPS_RECORD_FILE")
        if not path:
            return
        entry = {
            "task": self._task_name(result),
            "host": result._host.get_name(),
            "status": status,
            "result": result._result,
            "started": self._started,
            "ended": time.time(),
        }
        with open(path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")
