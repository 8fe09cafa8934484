# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""pg_backup_session, with progress lines while its step runs longer than progress_interval (see plugin_utils._in_turns)."""

from __future__ import annotations

from ansible_collections.pgops.online_backup.plugins.plugin_utils._in_turns import InTurns


class ActionModule(InTurns):
    pass
