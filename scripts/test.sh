#!/usr/bin/env bash
# The test command: installs what is missing, lints, then runs every test
# against real PostgreSQL 12-18 servers and real ansible-playbook runs.
# Extra arguments go to pytest (e.g. scripts/test.sh -k session -x).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export PATH="${PGOPS_VENV:-$ROOT/.venv}/bin:$PATH"

echo "== ruff"
ruff check plugins tests bench scripts
ruff format --check plugins tests bench scripts

# ansible-lint and ansible-test sanity run beside the tests (they mostly wait on
# servers and playbooks): the suite's wall time is what CI's budget counts.
lint_log="$(mktemp)"
lint_pid=""
if [[ -x scripts/lint.sh ]]; then
  scripts/lint.sh >"$lint_log" 2>&1 &
  lint_pid=$!
fi

echo "== pytest"
# Exit code 5 (no tests collected) is a failure here, as any non-zero code.
rc=0
pytest -n "${PGOPS_TEST_WORKERS:-2}" --dist loadfile --durations=40 "$@" || rc=$?

lint_rc=0
if [[ -n "$lint_pid" ]]; then
  wait "$lint_pid" || lint_rc=$?
  echo "== ansible lint and sanity (ran beside the tests)"
  cat "$lint_log"
fi
rm -f "$lint_log"
if ((lint_rc)); then
  echo "lint failed (exit $lint_rc)" >&2
  exit "$lint_rc"
fi
exit "$rc"
