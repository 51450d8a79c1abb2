"""The two wings the node holds, as the node and the other wings use them through it.

The daemon (:mod:`presenced.server.daemon`) builds the peer manager
(:class:`~presenced.server.peers.PeerManager`) and the messenger
(:class:`~presenced.server.messaging.Messenger`) around the node and hands both to
:meth:`~presenced.server.node.Node.wire`. The node types them with these protocols, which
name only core types: the node imports nothing from the wings, so no wing sits in an import
cycle with it, and each protocol lists exactly what is called through the node.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Protocol

from presenced.core import peer_wire
from presenced.core.client_wire import Fetch, MarkRead, Send
from presenced.core.crdt import ReplicaId
from presenced.core.kicks import Kick
from presenced.core.presence import Member
from presenced.core.routing import RouteTable


class LinkSync(Protocol):
    """One peer link, as a fetch reads it (whether the link is in sync yet)."""

    @property
    def sent(self) -> dict[ReplicaId, int] | None:
        """Per replica, the clock the peer is believed to hold; None before its first
        digest."""
        ...


class PeerLayer(Protocol):
    """The peer wing: what the node's outputs call per change or per tick, and what
    messaging reads (routes, links) and sends (routed messages)."""

    @property
    def routes(self) -> RouteTable:
        """The routes to every daemon, direct or relayed."""
        ...

    @property
    def links(self) -> Mapping[str, LinkSync]:
        """Peer node name -> its live link."""
        ...

    def local_changed(self) -> None:
        """Own entries changed outside a boundary's reads: links send them now."""
        ...

    def awaiting_batches(self) -> bool:
        """Whether a near peer's batch of this tick is still awaited."""
        ...

    def paced_pending(self) -> bool:
        """Whether a paced link's batch of this tick has not been read yet."""
        ...

    def request_digests(self) -> None:
        """Every link exchanges digests now."""
        ...

    def flood(self, message: peer_wire.RoomBroadcast) -> None:
        """Send a room broadcast made here to every peer."""
        ...

    def flood_kick(self, message: Kick) -> None:
        """Send a disconnect by the server API made here to every peer."""
        ...

    def replica_up(self, replica: ReplicaId) -> None:
        """A replica is (back) up: dial it again now if its link was lost."""
        ...

    def replica_gone(self, replica: ReplicaId) -> None:
        """A replica is down, purged or retired: routes through it go."""
        ...

    def send_routed(self, hop: str, message: peer_wire.PeerMessage) -> bool:
        """Queue a routed message on the link to ``hop``; False if it is gone or full."""
        ...


class DirectMessaging(Protocol):
    """The messaging wing: client requests (from client connections), routed messages
    and route changes (from the peer wing), users appearing (from the node)."""

    @property
    def pending_users(self) -> Container[str]:
        """Recipients with pending reliable messages."""
        ...

    def send(self, conn: Member, message: Send) -> None:
        """A client's ``send``."""
        ...

    def mark_read(self, conn: Member, message: MarkRead) -> None:
        """A client's ``mark_read``."""
        ...

    def fetch(self, conn: Member, message: Fetch) -> None:
        """A client's ``fetch``."""
        ...

    def user_appeared(self, user: str) -> None:
        """A user with pending messages appeared: deliver to them now."""
        ...

    def routes_changed(self) -> None:
        """Links or routes changed: retry every pending recipient."""
        ...

    def on_routed(self, message: peer_wire.Routed, link: str) -> None:
        """A routed message arrived from the peer ``link``."""
        ...


class DetachedSessions(Protocol):
    """The client wing's sessions as the node's server-API disconnect uses them."""

    def end_detached(self, user: str, session: str) -> None:
        """End ``user``'s detached sessions (``session`` "": all of them) at once."""
        ...
