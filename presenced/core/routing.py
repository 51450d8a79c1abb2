"""Link-state routing: who is linked to whom, and the shortest live path to every node.

Each daemon advertises its live peer links with their measured round trip
(:class:`LinkState`); the advertisements are gossiped, so every daemon holds the whole graph
and computes the same shortest paths (OSPF inside one small autonomous system). Direct
messages then go hop by hop: each daemon forwards to its own :meth:`RouteTable.next_hop`.

Why it is built this way:

* **Two-way check.** An edge counts only if both ends advertise it, at the larger of the two
  costs. When a link dies, the first end to notice re-advertises without it and the edge is
  gone everywhere, even while the other end's stale advertisement is still circulating.
* **Deterministic ties.** Among equally short paths the one whose sequence of node names
  (from the source) is lexicographically smallest wins. That choice is consistent along
  sub-paths (if ``s, a, ..., d`` is the smallest shortest path from ``s``, then
  ``a, ..., d`` is the smallest from ``a``), so when tables agree, hop-by-hop forwarding
  follows exactly the source's path: no loops, and the hop count is the path length. It also
  makes the result independent of the order in which advertisements arrived.
* **Hysteresis.** RTTs jitter; re-advertising on every ping would flood the cluster and make
  routes flap. A new advertisement is made only when the set of neighbours changes or a cost
  moves by at least 25 % and 2 ms from the last advertised one.
* **Lazy, cached.** ``next_hop`` runs for every forwarded message, the graph changes rarely:
  the shortest-path tree is computed on the first lookup after a change and lookups are then
  dictionary reads.

Pure: no I/O, no clock; callers pass measured RTTs in.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Final

import attrs

#: Cost of a link whose RTT is not measured yet (100 ms, in microseconds).
DEFAULT_COST_US: Final = 100_000
#: A cost change is material when it moves by at least this fraction...
COST_CHANGE_RATIO: Final = 0.25
#: ...and at least this many microseconds.
COST_CHANGE_MIN_US: Final = 2_000


@attrs.frozen
class LinkState:
    """One node's advertisement: its live links and their costs (µs of RTT)."""

    node: str
    #: The advertising daemon's incarnation: new at every start, larger is newer.
    incarnation: int
    #: Increases with every new advertisement of one incarnation.
    seq: int
    #: (neighbour, cost in µs >= 1), sorted by neighbour.
    links: tuple[tuple[str, int], ...] = ()

    def newer_than(self, other: LinkState) -> bool:
        """Whether this advertisement supersedes ``other``: a restarted daemon starts its
        ``seq`` again, so the incarnation is compared first."""
        return (self.incarnation, self.seq) > (other.incarnation, other.seq)

    def cost(self, neighbour: str) -> int | None:
        """The advertised cost of the link to ``neighbour``, None if not advertised."""
        for name, cost in self.links:
            if name == neighbour:
                return cost
        return None


def cost_us(rtt: float | None) -> int:
    """A link's cost from its measured RTT in seconds (unmeasured: DEFAULT_COST_US).

    Never below 1: Dijkstra and the loop-freedom argument need strictly positive costs.
    """
    if rtt is None:
        return DEFAULT_COST_US
    return max(1, round(rtt * 1_000_000))


class RouteTable:
    """Every node's advertisement, and this node's shortest paths to each of them."""

    def __init__(self, node: str, incarnation: int) -> None:
        self.node = node
        self._states: dict[str, LinkState] = {node: LinkState(node, incarnation, 1)}
        #: dest -> path from this node; None when stale (recomputed on the next lookup).
        self._paths: dict[str, tuple[str, ...]] | None = None
        #: dest -> total cost in µs; valid whenever ``_paths`` is.
        self._distances: dict[str, int] = {}
        #: dest -> neighbour to forward to; valid whenever ``_paths`` is.
        self._next_hops: dict[str, str] = {}

    @property
    def own(self) -> LinkState:
        """This node's advertisement currently in force."""
        return self._states[self.node]

    # ------------------------------------------------------------------ advertisements

    def advertise(self, links: Mapping[str, float | None]) -> LinkState | None:
        """Set this node's live links (neighbour -> RTT seconds, None if not measured).

        Returns the new advertisement (``seq + 1``) when it changed materially: another set
        of neighbours, or a cost that moved by >= 25 % and >= 2 ms from the last advertised
        one. Otherwise returns None and the old advertisement stays in force, so jitter is
        measured against what the cluster routes by, and slow drift still adds up to a
        re-advertisement eventually. A link to this node itself is ignored.
        """
        old = self.own
        new_links = tuple(
            sorted((name, cost_us(rtt)) for name, rtt in links.items() if name != self.node)
        )
        old_costs = dict(old.links)
        if set(old_costs) == {name for name, _ in new_links} and not any(
            _material(old_costs[name], cost) for name, cost in new_links
        ):
            return None
        state = LinkState(self.node, old.incarnation, old.seq + 1, new_links)
        self._states[self.node] = state
        self._invalidate()
        return state

    def learn(self, state: LinkState) -> bool:
        """Take another node's advertisement if it is newer than the one held (or none is).

        Returns True if taken. Advertisements of this node itself are ignored: only this
        table makes them, and a stale copy relayed back must not replace the live one.
        """
        if state.node == self.node:
            return False
        held = self._states.get(state.node)
        if held is not None and not state.newer_than(held):
            return False
        self._states[state.node] = state
        self._invalidate()
        return True

    def forget(self, node: str) -> bool:
        """Drop a node's advertisement (it is down or purged); True if one was held.

        This node's own advertisement is never dropped (False).
        """
        if node == self.node or node not in self._states:
            return False
        del self._states[node]
        self._invalidate()
        return True

    def get(self, node: str) -> LinkState | None:
        """The advertisement held for ``node``, if any."""
        return self._states.get(node)

    def states(self) -> list[LinkState]:
        """Every advertisement held, this node's included, sorted by node (for gossip)."""
        return [self._states[name] for name in sorted(self._states)]

    # ------------------------------------------------------------------ paths

    def next_hop(self, dest: str) -> str | None:
        """The neighbour to forward to for ``dest``; None if unreachable or ``dest`` is us."""
        self._routes()
        return self._next_hops.get(dest)

    def path(self, dest: str) -> tuple[str, ...] | None:
        """(this node, ..., dest); ``(this node,)`` for itself; None if there is no path."""
        return self._routes().get(dest)

    def distance(self, dest: str) -> int | None:
        """Total cost of the path to ``dest`` in µs (0 for this node), None if unreachable."""
        self._routes()
        return self._distances.get(dest)

    def reachable(self) -> frozenset[str]:
        """Nodes with a live path, this node excluded."""
        self._routes()
        return frozenset(self._next_hops)

    def routes(self) -> dict[str, tuple[str, ...]]:
        """dest -> path for every reachable node (this node included, as ``(node,)``)."""
        return dict(self._routes())

    # ------------------------------------------------------------------ internals

    def _invalidate(self) -> None:
        self._paths = None

    def _routes(self) -> dict[str, tuple[str, ...]]:
        """The cached shortest-path tree, recomputed first if an advertisement changed."""
        if self._paths is None:
            self._paths, self._distances = self._dijkstra()
            self._next_hops = {dest: path[1] for dest, path in self._paths.items() if len(path) > 1}
        return self._paths

    def _graph(self) -> dict[str, dict[str, int]]:
        """The usable edges: both ends advertise each other; cost is the larger of the two.

        Self-links and costs below 1 (malformed advertisements) are ignored or clamped, since
        the shortest-path argument needs strictly positive costs.
        """
        advertised = {name: dict(state.links) for name, state in self._states.items()}
        graph: dict[str, dict[str, int]] = {}
        for name, links in advertised.items():
            for other, cost in links.items():
                if other == name:
                    continue
                back = advertised.get(other, {}).get(name)
                if back is not None:
                    graph.setdefault(name, {})[other] = max(1, cost, back)
        return graph

    def _dijkstra(self) -> tuple[dict[str, tuple[str, ...]], dict[str, int]]:
        """Shortest paths by (cost, node-name sequence).

        The priority is a total order that extending a path preserves (costs are positive,
        and two different paths to the same node differ before their common last hop), so
        the first path popped for a node is the smallest by (cost, names) of all its paths.
        """
        graph = self._graph()
        paths: dict[str, tuple[str, ...]] = {}
        distances: dict[str, int] = {}
        queue: list[tuple[int, tuple[str, ...]]] = [(0, (self.node,))]
        while queue:
            cost, path = heapq.heappop(queue)
            here = path[-1]
            if here in paths:
                continue
            paths[here] = path
            distances[here] = cost
            for other, edge in graph.get(here, {}).items():
                if other not in paths:
                    heapq.heappush(queue, (cost + edge, (*path, other)))
        return paths, distances


def _material(old: int, new: int) -> bool:
    """Whether a cost moved enough to be worth re-advertising (both thresholds must hold)."""
    change = abs(new - old)
    return change >= COST_CHANGE_MIN_US and change >= COST_CHANGE_RATIO * old
