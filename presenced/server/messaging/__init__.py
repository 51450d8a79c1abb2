"""The direct-message wing of the shell: the SQLite store, the trio side of the machine, and
what a fetch reads of the cluster.

The decisions are in :mod:`presenced.core.direct`; this package does their I/O. Callers
outside the wing import from here.
"""

from presenced.core.direct import COMMIT_INTERVAL_S, HOP_LIMIT
from presenced.core.direct_store import StoredMessage, StoreError, StoreFull
from presenced.server.messaging.messenger import Messenger
from presenced.server.messaging.store import MessageStore

__all__ = [
    "COMMIT_INTERVAL_S",
    "HOP_LIMIT",
    "MessageStore",
    "Messenger",
    "StoreError",
    "StoreFull",
    "StoredMessage",
]
