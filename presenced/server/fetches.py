"""The asking side of ``fetch``: pull a user's pending messages from every daemon that may
hold some, and answer only what is true.

A fetch sends a ``pull`` to this daemon and to every daemon with a live route, and keeps
going as more become reachable (right after a start, routes arrive with the first gossip
of the first peer link): each sweep and each route change sends pulls to the daemons not
asked yet. It answers once every daemon that could hold messages has answered
(``complete``), once the only ones left are down, or after
:data:`~presenced.core.answers.FETCH_ANSWER_S`, whichever comes first. The rules (who must
answer, what the reply says) are pure, in :mod:`presenced.core.answers`; this module reads
the daemon's liveness, routes and links, and sends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from presenced.core import peer_wire as wire
from presenced.core import protocol
from presenced.core.answers import (
    FETCH_ANSWER_S,
    ClusterView,
    FetchProgress,
    cluster_settled,
    known_nodes,
)
from presenced.core.liveness import DOWN, UP

if TYPE_CHECKING:
    from presenced.server.clients import ClientConnection
    from presenced.server.messaging import Messenger


@attrs.define
class _Fetch:
    """A fetch in progress: its progress, and the connection that waits for its answer."""

    conn: ClientConnection
    ref: protocol.Ref
    user: str
    progress: FetchProgress


class Fetches:
    """The fetches in progress on one daemon, by request id."""

    def __init__(self, messenger: Messenger) -> None:
        self.messenger = messenger
        self.node = messenger.node
        self._active: dict[str, _Fetch] = {}
        #: When the daemon started serving (the messenger's run): see ``cluster_settled``.
        self.started_at = self.node.clock()

    def __len__(self) -> int:
        return len(self._active)

    def get(self, request: str) -> FetchProgress | None:
        fetch = self._active.get(request)
        return None if fetch is None else fetch.progress

    def start(self, request: str, conn: ClientConnection, message: protocol.Fetch) -> None:
        now = self.node.clock()
        progress = FetchProgress(self.messenger.name, message.limit, now + FETCH_ANSWER_S)
        fetch = _Fetch(conn, message.ref, conn.user, progress)
        self._active[request] = fetch
        self._advance(request, fetch, self.view(now), now)

    def sweep(self, now: float) -> None:
        """Ask the daemons that became reachable; answer the fetches that are done."""
        if not self._active:
            return
        view = self.view(now)
        for request, fetch in list(self._active.items()):
            self._advance(request, fetch, view, now)

    def on_pulled(self, pulled: wire.Pulled) -> None:
        fetch = self._active.get(pulled.id)
        if fetch is None or not fetch.progress.on_answer(pulled.origin, pulled.remaining):
            return
        now = self.node.clock()
        view = self.view(now)
        if fetch.progress.finished(view, now):
            self._finish(pulled.id, fetch, view)

    def next_deadline(self) -> float | None:
        return min((fetch.progress.deadline for fetch in self._active.values()), default=None)

    def view(self, now: float) -> ClusterView:
        """The cluster as this daemon knows it now."""
        peers = self.node.gossip
        if peers is None:
            return ClusterView(settled=True, known=frozenset(), reachable=frozenset())
        statuses = [
            (replica.node, health.status == UP)
            for replica, health in self.node.liveness.table.items()
            if health.status in (UP, DOWN)
        ]
        routed = [state.node for state in peers.routes.states()]
        known, down = known_nodes(self.messenger.name, statuses, routed, peers.links)
        settled = cluster_settled(
            peered=True,
            synced_link=any(link.sent is not None for link in peers.links.values()),
            uptime_s=now - self.started_at,
        )
        return ClusterView(settled, known, peers.routes.reachable() & known, down)

    def _advance(self, request: str, fetch: _Fetch, view: ClusterView, now: float) -> None:
        progress = fetch.progress
        for dest in progress.to_ask(view):
            self.messenger.pull(request, dest, fetch.user, progress.limit)
            if request not in self._active:
                return  # answered already (this daemon's own pull completed it)
        if progress.finished(view, now):
            self._finish(request, fetch, view)

    def _finish(self, request: str, fetch: _Fetch, view: ClusterView) -> None:
        if self._active.pop(request, None) is None:
            return
        if fetch.conn in self.node.connections:
            fetch.conn.send(fetch.progress.reply(fetch.ref, view))


__all__ = ["Fetches"]
