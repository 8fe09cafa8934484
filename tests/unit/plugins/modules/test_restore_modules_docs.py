"""The restore modules import (every name they take from module_utils exists), and their documentation
and the pg_restore role's render with ansible-doc."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

from harness.ansible import VENV_BIN, collections_workspace


def test_module_and_role_docs_render():
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections_workspace(), ANSIBLE_NOCOLOR="1")
    doc = os.path.join(VENV_BIN, "ansible-doc")
    for name in ("pg_restore_prepare", "pg_restore_server", "pg_restore_drill"):
        out = subprocess.run([doc, f"pgops.online_backup.{name}"], env=env, capture_output=True, text=True, check=False)
        assert out.returncode == 0 and "OPTIONS" in out.stdout and not out.stderr.strip(), out.stderr
    out = subprocess.run(
        [doc, "-t", "role", "pgops.online_backup.pg_restore"], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and re.search(r"ENTRY POINT:\W*drill", out.stdout) and "pg_restore_tablespace_map" in out.stdout, (
        out.stderr
    )


def test_restore_modules_import():
    sys.path.insert(0, collections_workspace())
    for name in ("pg_restore_prepare", "pg_restore_server", "pg_restore_drill"):
        module = importlib.import_module(f"ansible_collections.pgops.online_backup.plugins.modules.{name}")
        assert callable(module.main)
