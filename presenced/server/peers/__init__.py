"""The peer wing: links to other daemons, the gossip over them, and the transports they use.

* :mod:`.manager`: :class:`PeerManager` accepts and dials links (redialling with backoff),
  keeps one per peer node, runs the heartbeat, relays, routes, room broadcasts and byes.
* :mod:`.links`: :class:`PeerLink`, one live link: its reader and writer tasks and the paced
  reads of near peers. What it sends and how it merges is its
  :class:`~presenced.core.gossip.PeerView` (pure).
* :mod:`.transport`: the seam (:class:`PeerChannel`, :class:`PeerTransport`): production runs
  WebSocket over mutual TLS (:mod:`.tls`, :mod:`.tls_channel`, :mod:`.tls_contexts`), tests an
  in-memory network (:mod:`presenced.testing.simnet`).

The TLS modules are imported from their own names (``presenced.server.peers.tls``): the
start-up checks load contexts from :mod:`.tls_contexts` without pulling in the transport.
"""

from presenced.server.peers.links import PeerLink
from presenced.server.peers.manager import LinkRefused, PeerManager
from presenced.server.peers.transport import (
    ChannelClosed,
    ChannelHandler,
    PeerChannel,
    PeerTransport,
)

__all__ = [
    "ChannelClosed",
    "ChannelHandler",
    "LinkRefused",
    "PeerChannel",
    "PeerLink",
    "PeerManager",
    "PeerTransport",
]
