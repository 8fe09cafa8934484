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

if [[ -x scripts/lint.sh ]]; then
  echo "== ansible lint and sanity"
  scripts/lint.sh
fi

echo "== pytest"
# Exit code 5 (no tests collected) is a failure here, as any non-zero code.
pytest -n "${PGOPS_TEST_WORKERS:-2}" --dist loadfile "$@"
