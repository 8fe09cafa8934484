# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection's base exception class, in a file of its own so that the WAL
archive command (which runs once per segment and must start fast) does not
import the database driver; _postgres re-exports it for the modules."""

from __future__ import annotations


class PgopsError(Exception):
    """Base class of every error this collection's module_utils raise: a
    module catches it once and fails with its message, which says what is
    wrong and how to fix it."""
