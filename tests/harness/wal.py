"""pgops-wal installed for tests as the role pg_archiving installs it: the collection's
module_utils files as a package, and a launcher."""

from __future__ import annotations

import os
import shutil

from harness.ansible import NODE_PYTHON, REPO

FILES = ("_errors.py", "_files.py", "_layout.py", "_s3.py", "_wal.py")


def install_pgops_wal(install_dir: str, program: str | None = None) -> str:
    """Install into install_dir (readable by all, as the role does); return the launcher's path."""
    package = os.path.join(install_dir, "pgops_wal")
    os.makedirs(package, mode=0o755, exist_ok=True)
    for name in FILES:
        shutil.copyfile(os.path.join(REPO, "plugins", "module_utils", name), os.path.join(package, name))
        os.chmod(os.path.join(package, name), 0o644)
    open(os.path.join(package, "__init__.py"), "w").close()
    program = program or os.path.join(install_dir, "pgops-wal")
    launcher = [f"#!{NODE_PYTHON} -I", "import sys", f"sys.path.insert(0, {install_dir!r})"]
    launcher += ["from pgops_wal._wal import main", "sys.exit(main())"]
    with open(program, "w") as f:
        f.write("\n".join(launcher) + "\n")
    os.chmod(program, 0o755)
    for d in (install_dir, package):
        os.chmod(d, 0o755)
    return program
