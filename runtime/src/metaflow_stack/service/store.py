"""The service's data access: Metaflow's service 2.5.x semantics, as one object for the routes.

The writes (``writes``), the task status they keep (``attempts``) and the
unpaginated reads (``reads``) share transactions and lookups (``access``).
"""

from __future__ import annotations

from metaflow_stack.service.reads import Reads
from metaflow_stack.service.writes import Writes


class Store(Writes, Reads):
    """Everything the routes read and write; ``on_commit`` runs after every committed write."""
