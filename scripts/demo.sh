#!/usr/bin/env bash
# Sets everything up on a fresh Debian machine, then runs a real backup and
# restore check against a throwaway local PostgreSQL cluster (see demo.py).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo.py"
