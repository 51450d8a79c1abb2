"""What a fetch knows of the cluster: the daemon's liveness, routes and links, read.

A fetch (:class:`presenced.core.answers.Fetches`, driven by
:class:`presenced.core.direct.DirectMessages`) asks every daemon that may hold the user's
pending messages and answers only what is true; the rules are pure, in
:mod:`presenced.core.answers`. This module is the one place that reads the live daemon for
them, so the rules never see a peer link or a liveness table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from presenced.core.answers import ClusterView, cluster_settled, known_nodes
from presenced.core.liveness import DOWN, UP

if TYPE_CHECKING:
    from presenced.server.node import Node


def cluster_view(node: Node, me: str, uptime_s: float) -> ClusterView:
    """The other daemons as ``node`` (named ``me``) knows them, ``uptime_s`` after it
    started serving."""
    peers = node.gossip
    if peers is None:
        return ClusterView(settled=True, known=frozenset(), reachable=frozenset())
    statuses = [
        (replica.node, health.status == UP)
        for replica, health in node.liveness.table.items()
        if health.status in (UP, DOWN)
    ]
    routed = [state.node for state in peers.routes.states()]
    known, down = known_nodes(me, statuses, routed, peers.links)
    settled = cluster_settled(
        peered=True,
        synced_link=any(link.sent is not None for link in peers.links.values()),
        uptime_s=uptime_s,
    )
    return ClusterView(settled, known, peers.routes.reachable() & known, down)


__all__ = ["cluster_view"]
