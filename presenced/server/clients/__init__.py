"""The clients wing: client WebSocket connections and the sessions they carry.

* :mod:`.handshake`: the server side of the WebSocket opening handshake (wsproto);
* :mod:`.connection`: one connection's tasks, reads (paced or as data arrives) and outbox;
  what a client may do is decided by :mod:`presenced.core.session`;
* :mod:`.paced`: the streaming clients the ticker reads at tick boundaries;
* :mod:`.sessions`: the liveness sweeper and the sessions waiting to be resumed.
"""

from presenced.server.clients.connection import PACED_IDLE_TICKS, ClientConnection
from presenced.server.clients.paced import PacedClients
from presenced.server.clients.sessions import Detached, Sessions, configure_keepalive

__all__ = [
    "PACED_IDLE_TICKS",
    "ClientConnection",
    "Detached",
    "PacedClients",
    "Sessions",
    "configure_keepalive",
]
