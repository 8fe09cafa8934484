#!/usr/bin/env bash
# Ansible lint and packaging checks; scripts/test.sh (and so CI) runs this, and
# every step must exit 0:
#   1. ansible-lint with the production profile (.ansible-lint),
#      antsibull-docs lint-collection-docs (the docs ansible-doc renders), and
#      antsibull-changelog lint of the fragments and changelogs/changelog.yaml,
#      with CHANGELOG.md and CHANGELOG.rst as antsibull-changelog generates them
#   2. ansible-galaxy collection build, then install of that tarball into a
#      temporary ansible_collections/ tree
#   3. ansible-test sanity of the installed copy - exactly what users install -
#      for the ansible-core of the venv and then for each other supported one
#      (2.16-2.18, 2.20+ where setup.sh found a Python 3.12), in ansible-test's own virtualenvs
#   4. ansible-playbook --syntax-check of the installed copy's playbooks by FQCN
# Needs scripts/setup.sh first (the venv). Network: PyPI, for ansible-test's
# sanity requirements (cached in ~/.ansible/test after the first run).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${PGOPS_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0

work="$(mktemp -d /tmp/pgops-lint-XXXXXX)"
trap 'rm -rf "$work"' EXIT
log() { printf '== %s\n' "$*"; }

version="$(python -c 'import yaml; print(yaml.safe_load(open("galaxy.yml"))["version"])')"
python_version="$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

# ansible-lint resolves the collection's own modules and roles by FQCN.
mkdir -p "$work/src/ansible_collections/pgops"
ln -s "$ROOT" "$work/src/ansible_collections/pgops/online_backup"

log "ansible-lint (profile production)"
ANSIBLE_COLLECTIONS_PATH="$work/src" ansible-lint --nocolor

log "antsibull-docs lint-collection-docs (module, role and playbook docs render; references resolve)"
(cd "$work/src/ansible_collections/pgops/online_backup" && antsibull-docs lint-collection-docs --plugin-docs .)

log "antsibull-changelog lint (changelogs/fragments, changelogs/changelog.yaml; CHANGELOG.md/.rst generated from them)"
antsibull-changelog lint
antsibull-changelog lint-changelog-yaml changelogs/changelog.yaml
for format in md rst; do
  antsibull-changelog generate --output "$work/CHANGELOG.$format" --output-format "$format"
  if ! cmp -s "$work/CHANGELOG.$format" "CHANGELOG.$format"; then
    echo "CHANGELOG.$format differs from what antsibull-changelog generate makes of changelogs/changelog.yaml:" \
      "it is generated, never edited (CONTRIBUTING.md, Changelog)" >&2
    diff -u "CHANGELOG.$format" "$work/CHANGELOG.$format" | head -40 >&2 || true
    exit 1
  fi
done

log "ansible-galaxy collection build + install"
ansible-galaxy collection build --output-path "$work/dist" . >/dev/null
tarball="$work/dist/pgops-online_backup-$version.tar.gz"
ANSIBLE_COLLECTIONS_PATH="$work/installed" ansible-galaxy collection install --no-deps -p "$work/installed" "$tarball" >/dev/null
installed="$work/installed/ansible_collections/pgops/online_backup"
test -f "$installed/MANIFEST.json"
log "the built tarball ships COPYING and no empty directory"
python - "$tarball" <<'EOF_PY'
import sys
import tarfile

with tarfile.open(sys.argv[1]) as tar:
    members = tar.getmembers()
files = [m.name for m in members if not m.isdir()]
empty = sorted(m.name for m in members if m.isdir() and not any(f.startswith(m.name.rstrip("/") + "/") for f in files))
problems = (["COPYING is missing"] if "COPYING" not in files else []) + [f"empty directory {d}" for d in empty]
if problems:
    sys.exit(f"{sys.argv[1]}: " + "; ".join(problems) + " (galaxy.yml build_ignore decides what ships)")
print(f"ok: {len(files)} files, COPYING among them, no empty directory")
EOF_PY

# ansible-test bootstraps pip in each of its virtualenvs with a get-pip script
# it would download from a host outside the package registries, cached in
# ~/.ansible/test/cache. We never fetch it: a stand-in built from pip's own
# wheel on PyPI goes in that cache path (ansible-test's error message invites
# saving the script there by hand).
ensure_get_pip() {  # ensure_get_pip <python with that ansible-test> <target Python version>
  local pip_version cache script wheel
  pip_version="$("$1" -c 'from types import SimpleNamespace as N
from ansible_test._internal.python_requirements import get_venv_packages as p
print(p(N(version="'"$2"'"))["pip"])')"
  cache="$HOME/.ansible/test/cache"
  script="$cache/get_pip_${pip_version//./_}.py"
  [[ -s "$script" ]] && return 0
  mkdir -p "$cache"
  log "pip $pip_version bootstrap for ansible-test from PyPI's pip wheel"
  pip download -q --no-deps --only-binary=:all: -d "$cache" "pip==$pip_version"
  wheel="pip-$pip_version-py3-none-any.whl"
  test -f "$cache/$wheel"
  cat >"$script.tmp" <<EOF
"""Stand-in for get-pip.py $pip_version (written by pgops.online_backup scripts/lint.sh):
runs 'pip install' from the pip wheel beside this file, as get-pip does from its embedded copy."""
import os
import runpy
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "$wheel"))
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.argv = ["pip", "install", "--upgrade", "--force-reinstall", *args]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
EOF
  mv "$script.tmp" "$script"
}

log "ansible-test sanity (ansible-core $(ansible --version | sed -n '1s/.*core \([0-9.]*\).*/\1/p'), Python $python_version) of the installed collection"
ensure_get_pip python "$python_version"
(cd "$installed" && ansible-test sanity --venv --python "$python_version" --requirements --color no)

# The same with every other ansible-core the collection supports (meta/runtime.yml), each from its
# own virtualenv (scripts/setup.sh) and on that virtualenv's Python.
CACHE="${PGOPS_CACHE:-/var/cache/pgops-online-backup}"
for other in "$CACHE"/ansible-core/*/; do
  other_bin="${other%/}/bin"
  other_python="$("$other_bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  log "ansible-test sanity (ansible-core $(cat "${other%/}/.pinned"), Python $other_python) of the installed collection"
  ensure_get_pip "$other_bin/python" "$other_python"
  # ansible-test looks for python$other_python on PATH: the virtualenv's own comes first.
  (cd "$installed" && PATH="$other_bin:$PATH" ansible-test sanity --venv --python "$other_python" --requirements --color no)
done

log "ansible-playbook --syntax-check of the installed playbooks"
for playbook in "$installed"/playbooks/*.yml; do
  name="pgops.online_backup.$(basename "$playbook" .yml)"
  ANSIBLE_COLLECTIONS_PATH="$work/installed" ansible-playbook --syntax-check -i localhost, "$name" >/dev/null
  echo "ok: $name"
done
log "lint ok"
