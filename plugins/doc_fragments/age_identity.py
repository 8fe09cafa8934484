# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The options of modules that read age-encrypted backups (module_utils/_layout.AGE_IDENTITY_OPTIONS).
    DOCUMENTATION = r"""
options:
  age_identity:
    description:
      - The age private key (the text of an identity file, C(AGE-SECRET-KEY-1...)) that decrypts a backup written with
        encryption V(age). It is written to a temporary file readable only by the module's user and removed when the
        module ends; it never appears in a command line or in the task's output.
      - Mutually exclusive with O(age_identity_file).
    type: str
  age_identity_file:
    description:
      - An age identity file on the managed node (as C(age -d -i) reads it) that decrypts an encrypted backup.
    type: path
"""
