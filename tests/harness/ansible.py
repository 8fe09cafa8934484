"""Run the real ansible-playbook with this collection on the collections path."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

import yaml

from .scratch import scratch_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)
CALLBACKS = os.path.join(REPO, "tests", "plugins", "callback")
NODE_PYTHON = "/usr/bin/python3"  # managed nodes use Debian's python3-psycopg2


def collections_workspace() -> str:
    ws = os.environ.get("PGOPS_COLLECTIONS_WS")
    if ws:
        return ws
    ws = tempfile.mkdtemp(prefix="pgops-ws-")
    atexit.register(shutil.rmtree, ws, True)  # by the process that made it (xdist workers inherit it)
    os.makedirs(os.path.join(ws, "ansible_collections", "pgops"))
    os.symlink(REPO, os.path.join(ws, "ansible_collections", "pgops", "online_backup"))
    os.environ["PGOPS_COLLECTIONS_WS"] = ws
    return ws


class PlaybookRun:
    def __init__(self, proc: subprocess.CompletedProcess, results: list):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.results = results

    def task(self, name: str, host: str | None = None) -> dict:
        """The last result of the task with this name."""
        found = [r for r in self.results if r["task"] == name and (host is None or r["host"] == host)]
        assert found, f"no result for task {name!r}; tasks: {[r['task'] for r in self.results]}\n{self.stdout[-4000:]}"
        return found[-1]["result"]

    def timeline(self, started: float) -> str:
        """Each task's seconds (from its start to its last host's result), with Ansible's start-up
        (started: time.time() before the run) and the time between tasks; for the benchmarks' --tasks."""
        tasks, order = {}, []
        for r in self.results:
            if r["task"] not in tasks:
                order.append(r["task"])
                tasks[r["task"]] = [r["started"], r["ended"]]
            tasks[r["task"]][1] = max(tasks[r["task"]][1], r["ended"])
        lines, last = [], started
        for name in order:
            begin, end = tasks[name]
            if begin - last > 0.005:
                lines.append(f"{begin - last:7.2f}  ({'start-up' if last == started else 'between tasks'})")
            lines.append(f"{end - begin:7.2f}  {name}")
            last = end
        return "\n".join(lines)

    def __repr__(self) -> str:
        # The failures first: a long run's output is cut to its end.
        failures = [line[:2000] for line in self.stdout.splitlines() if line.startswith(("fatal:", "failed:", "[ERROR]"))]
        head = "\n".join(failures[:10])
        return f"PlaybookRun(rc={self.rc})\nFAILURES:\n{head}\nSTDOUT:\n{self.stdout[-6000:]}\nSTDERR:\n{self.stderr[-3000:]}"


def run_playbook(
    playbook,
    inventory: str,
    extra_vars: dict | None = None,
    check: bool = False,
    workdir: str | None = None,
    args: list | None = None,
    env: dict | None = None,
    timeout: int = 600,
    record: bool = True,
    bin_dir: str | None = None,
) -> PlaybookRun:
    """playbook: a path, a collection playbook name, or a list of plays (written to a file).
    bin_dir: the bin directory of another ansible-core's virtualenv (default: this venv's)."""
    bin_dir = bin_dir or VENV_BIN
    workdir = workdir or scratch_dir("pgops-pb-")
    if isinstance(playbook, list):
        path = os.path.join(workdir, "playbook.yml")
        with open(path, "w") as f:
            yaml.safe_dump(playbook, f, sort_keys=False)
        playbook = path
    inv = os.path.join(workdir, "inventory.ini")
    with open(inv, "w") as f:
        f.write(inventory)
    results_file = os.path.join(workdir, "results.jsonl")
    cmd = [os.path.join(bin_dir, "ansible-playbook"), "-i", inv, playbook]
    if extra_vars:
        vars_file = os.path.join(workdir, "extra_vars.json")
        with open(vars_file, "w") as f:
            json.dump(extra_vars, f)
        cmd += ["-e", f"@{vars_file}"]
    if check:
        cmd.append("--check")
    cmd += args or []
    full_env = dict(os.environ)
    full_env.update(
        ANSIBLE_COLLECTIONS_PATH=collections_workspace(),
        PGOPS_TEST_OWNER=str(os.getpid()),
        ANSIBLE_HOST_KEY_CHECKING="False",
        ANSIBLE_RETRY_FILES_ENABLED="False",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LOCAL_TEMP=os.path.join(workdir, "local-tmp"),
        ANSIBLE_SSH_ARGS="-o ControlMaster=auto -o ControlPersist=5s -o UserKnownHostsFile=/dev/null",
        PATH=bin_dir + os.pathsep + full_env.get("PATH", ""),
    )
    if record:  # every task's result, for the test's asserts
        full_env.update(
            ANSIBLE_CALLBACK_PLUGINS=CALLBACKS, ANSIBLE_CALLBACKS_ENABLED="pgops_record", PGOPS_RECORD_FILE=results_file
        )
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=timeout)
    results = []
    if os.path.exists(results_file):
        with open(results_file) as f:
            results = [json.loads(line) for line in f if line.strip()]
    return PlaybookRun(proc, results)


def local_inventory(host: str = "localhost", **hostvars) -> str:
    extra = " ".join(f"{k}={v}" for k, v in hostvars.items())
    return f"[postgresql]\n{host} ansible_connection=local ansible_python_interpreter={NODE_PYTHON} {extra}\n"
