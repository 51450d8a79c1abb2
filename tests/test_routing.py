"""Link-state route table: shortest paths, two-way check, hysteresis, deterministic ties.

The property tests build one RouteTable per node from the same advertisements (learned in a
random order each) and check what the messaging layer relies on: hop-by-hop forwarding
follows the source's path exactly, so it never loops and takes len(path) - 1 hops.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presenced.core.routing import DEFAULT_COST_US, LinkState, RouteTable, cost_us

MS = 0.001

# ---------------------------------------------------------------------------- helpers


def link_states(
    links: Mapping[str, Mapping[str, int]], incarnation: int = 1, seq: int = 2
) -> dict[str, LinkState]:
    """One advertisement per node from node -> {neighbour: cost µs} (one-sided allowed)."""
    return {
        node: LinkState(node, incarnation, seq, tuple(sorted(neighbours.items())))
        for node, neighbours in links.items()
    }


def symmetric(edges: Iterable[tuple[str, str, int]]) -> dict[str, dict[str, int]]:
    """Both ends advertise every edge at the same cost."""
    links: dict[str, dict[str, int]] = {}
    for a, b, cost in edges:
        links.setdefault(a, {})[b] = cost
        links.setdefault(b, {})[a] = cost
    return links


def table(
    node: str, states: Mapping[str, LinkState], order: Iterable[str] | None = None
) -> RouteTable:
    """``node``'s table: its own links advertised, everyone else's learned (in ``order``)."""
    routes = RouteTable(node, 1)
    own = states.get(node)
    if own is not None:
        routes.advertise({name: cost / 1e6 for name, cost in own.links})
    for name in order if order is not None else sorted(states):
        if name != node:
            assert routes.learn(states[name])
    return routes


def tables(links: Mapping[str, Mapping[str, int]]) -> dict[str, RouteTable]:
    states = link_states(links)
    return {node: table(node, states) for node in states}


# ---------------------------------------------------------------------------- shapes


def test_line() -> None:
    routes = tables(symmetric([("a", "b", 10), ("b", "c", 10), ("c", "d", 10)]))["a"]
    assert routes.path("d") == ("a", "b", "c", "d")
    assert routes.next_hop("d") == "b"
    assert routes.distance("d") == 30
    assert routes.reachable() == {"b", "c", "d"}
    assert tables(symmetric([("a", "b", 10), ("b", "c", 10), ("c", "d", 10)]))["d"].path("a") == (
        "d",
        "c",
        "b",
        "a",
    )


def test_ring_goes_the_short_way_round() -> None:
    ring = [("n0", "n1", 5), ("n1", "n2", 5), ("n2", "n3", 5), ("n3", "n4", 5), ("n4", "n0", 5)]
    t = tables(symmetric(ring))
    assert t["n0"].path("n2") == ("n0", "n1", "n2")
    assert t["n0"].path("n3") == ("n0", "n4", "n3")
    assert t["n0"].distance("n3") == 10


def test_star_goes_through_the_hub() -> None:
    t = tables(symmetric([("hub", leaf, 7) for leaf in ("a", "b", "c", "d")]))
    assert t["a"].path("d") == ("a", "hub", "d")
    assert t["hub"].next_hop("c") == "c"
    assert t["c"].reachable() == {"hub", "a", "b", "d"}


def test_full_mesh_goes_direct() -> None:
    nodes = ["a", "b", "c", "d"]
    t = tables(symmetric([(x, y, 3) for x, y in itertools.combinations(nodes, 2)]))
    for s, d in itertools.permutations(nodes, 2):
        assert t[s].path(d) == (s, d)
        assert t[s].next_hop(d) == d


def test_self() -> None:
    routes = tables(symmetric([("a", "b", 1)]))["a"]
    assert routes.path("a") == ("a",)
    assert routes.next_hop("a") is None
    assert routes.distance("a") == 0
    assert "a" not in routes.reachable()
    assert routes.routes() == {"a": ("a",), "b": ("a", "b")}


def test_fresh_table_reaches_nobody() -> None:
    routes = RouteTable("a", 7)
    assert routes.own == LinkState("a", 7, 1, ())
    assert routes.states() == [routes.own]
    assert routes.reachable() == frozenset()
    assert routes.next_hop("b") is None
    assert routes.path("b") is None
    assert routes.distance("b") is None


# ---------------------------------------------------------------------------- failures


def test_failover_when_one_end_drops_the_link() -> None:
    # a - b - d is cheapest; a - c - d is the alternative.
    links = symmetric([("a", "b", 1), ("b", "d", 1), ("a", "c", 5), ("c", "d", 5)])
    states = link_states(links)
    routes = table("a", states)
    assert routes.path("d") == ("a", "b", "d")
    # b notices the b-d link died and re-advertises without it; d's stale ad still lists b.
    assert routes.learn(LinkState("b", 1, 3, (("a", 1),)))
    assert routes.path("d") == ("a", "c", "d")
    assert routes.next_hop("d") == "c"
    assert routes.distance("d") == 10


def test_failover_when_own_link_drops() -> None:
    links = symmetric([("a", "b", 1), ("b", "d", 1), ("a", "c", 5), ("c", "d", 5)])
    routes = table("a", link_states(links))
    assert routes.next_hop("d") == "b"
    assert routes.advertise({"c": 5e-6}) is not None
    assert routes.path("d") == ("a", "c", "d")
    assert routes.path("b") == ("a", "c", "d", "b")  # b itself is now reached the long way


def test_partition() -> None:
    t = tables(symmetric([("a", "b", 1), ("c", "d", 1)]))
    assert t["a"].path("c") is None
    assert t["a"].next_hop("d") is None
    assert t["a"].distance("d") is None
    assert t["a"].reachable() == {"b"}


def test_one_sided_advertisement_is_ignored() -> None:
    links = {"a": {"b": 1, "c": 1}, "b": {"a": 1}, "c": {}}  # only a claims a-c
    t = tables(links)
    assert t["a"].path("c") is None
    assert t["a"].reachable() == {"b"}
    # c's view: it does not advertise a, so it has no edge either.
    assert t["c"].reachable() == frozenset()


def test_edge_cost_is_the_larger_of_the_two_ends() -> None:
    links = {"a": {"b": 1, "c": 10}, "b": {"a": 30, "c": 1}, "c": {"a": 10, "b": 1}}
    routes = tables(links)["a"]
    assert routes.path("b") == ("a", "c", "b")  # a-b costs max(1, 30) = 30 > 10 + 1
    assert routes.distance("b") == 11


def test_rtt_weights_prefer_a_fast_two_hop_path() -> None:
    routes = RouteTable("a", 1)
    routes.advertise({"slow": 80 * MS, "fast": 5 * MS})
    routes.learn(LinkState("slow", 1, 2, (("a", 80_000), ("fast", 5_000))))
    routes.learn(LinkState("fast", 1, 2, (("a", 5_000), ("slow", 5_000))))
    assert routes.path("slow") == ("a", "fast", "slow")
    assert routes.distance("slow") == 10_000


def test_unmeasured_link_costs_the_default() -> None:
    routes = RouteTable("a", 1)
    state = routes.advertise({"b": None, "c": 3 * MS})
    assert state is not None
    assert state.links == (("b", DEFAULT_COST_US), ("c", 3_000))
    assert cost_us(0.0) == 1
    assert cost_us(1e-9) == 1


def test_self_link_is_not_advertised() -> None:
    routes = RouteTable("a", 1)
    state = routes.advertise({"a": 1 * MS, "b": 1 * MS})
    assert state is not None
    assert state.links == (("b", 1_000),)


# ---------------------------------------------------------------------------- advertise


def test_advertise_hysteresis() -> None:
    routes = RouteTable("a", 4)
    assert routes.advertise({}) is None  # nothing changed from the initial empty state
    first = routes.advertise({"b": 10 * MS})
    assert first == LinkState("a", 4, 2, (("b", 10_000),))
    assert routes.own == first
    # Jitter: +2 ms (>= 2 ms) but only +20 % (below 25 %) -> not material.
    assert routes.advertise({"b": 12 * MS}) is None
    # +3 %, 0.3 ms -> not material either.
    assert routes.advertise({"b": 10.3 * MS}) is None
    assert routes.own == first
    # +30 % and 3 ms -> material.
    second = routes.advertise({"b": 13 * MS})
    assert second == LinkState("a", 4, 3, (("b", 13_000),))
    # Going down by >= 25 % and >= 2 ms is material too.
    third = routes.advertise({"b": 9 * MS})
    assert third is not None and third.seq == 4
    # A new neighbour is always material, however small its cost.
    fourth = routes.advertise({"b": 9 * MS, "c": 1e-6})
    assert fourth is not None and fourth.seq == 5
    # Same neighbours, cost change within noise, but a neighbour lost -> material.
    fifth = routes.advertise({"c": 1e-6})
    assert fifth is not None and fifth.links == (("c", 1),)


def test_small_link_hysteresis_needs_two_ms() -> None:
    routes = RouteTable("a", 1)
    routes.advertise({"b": 1 * MS})
    assert routes.advertise({"b": 2.9 * MS}) is None  # +190 % but only 1.9 ms
    assert routes.advertise({"b": 3 * MS}) is not None


def test_drift_is_measured_against_the_last_advertised_cost() -> None:
    routes = RouteTable("a", 1)
    routes.advertise({"b": 20 * MS})
    for rtt in (22, 23, 24):  # each step small; 24 ms is +20 % of 20
        assert routes.advertise({"b": rtt * MS}) is None
    state = routes.advertise({"b": 25 * MS})  # +25 % of the advertised 20 ms
    assert state is not None and dict(state.links)["b"] == 25_000


def test_advertise_invalidates_routes() -> None:
    routes = RouteTable("a", 1)
    routes.learn(LinkState("b", 1, 2, (("a", 5),)))
    assert routes.next_hop("b") is None
    routes.advertise({"b": 5e-6})
    assert routes.next_hop("b") == "b"


# ---------------------------------------------------------------------------- learn / forget


def test_learn_takes_only_newer() -> None:
    routes = RouteTable("a", 1)
    routes.advertise({"b": 1 * MS})
    ad = LinkState("b", 5, 10, (("a", 1_000),))
    assert routes.learn(ad)
    assert routes.get("b") == ad
    assert not routes.learn(ad)  # same (incarnation, seq)
    assert not routes.learn(LinkState("b", 5, 9, ()))  # older seq
    assert not routes.learn(LinkState("b", 4, 99, ()))  # older incarnation
    assert routes.get("b") == ad
    assert routes.next_hop("b") == "b"
    restarted = LinkState("b", 6, 1, ())  # newer incarnation, lower seq
    assert restarted.newer_than(ad)
    assert not ad.newer_than(restarted)
    assert routes.learn(restarted)
    assert routes.get("b") == restarted
    assert routes.next_hop("b") is None  # the restarted b has no links yet


def test_learn_ignores_own_advertisement() -> None:
    routes = RouteTable("a", 3)
    own = routes.own
    assert not routes.learn(LinkState("a", 99, 99, (("b", 1),)))
    assert routes.own == own


def test_forget() -> None:
    t = tables(symmetric([("a", "b", 1), ("b", "c", 1)]))
    routes = t["a"]
    assert routes.next_hop("c") == "b"
    assert routes.forget("b")
    assert routes.get("b") is None
    assert not routes.forget("b")
    assert not routes.forget("a")  # own advertisement stays
    assert routes.reachable() == frozenset()
    assert [s.node for s in routes.states()] == ["a", "c"]


def test_states_sorted_and_include_own() -> None:
    states = link_states(symmetric([("m", "z", 1), ("m", "b", 1)]))
    routes = table("m", states, order=["z", "b"])
    assert [s.node for s in routes.states()] == ["b", "m", "z"]
    assert routes.get("m") == routes.own


# ---------------------------------------------------------------------------- ties


def test_ties_pick_the_lexicographically_smallest_path() -> None:
    # Diamond a-{b,c}-d, all costs equal: a goes via b, d goes via b too (d, b, a < d, c, a).
    t = tables(symmetric([("a", "c", 1), ("c", "d", 1), ("a", "b", 1), ("b", "d", 1)]))
    assert t["a"].path("d") == ("a", "b", "d")
    assert t["d"].path("a") == ("d", "b", "a")
    # Equal cost, different hop counts: the name sequence decides, not the length.
    t = tables(symmetric([("a", "z", 2), ("a", "b", 1), ("b", "z", 1)]))
    assert t["a"].path("z") == ("a", "b", "z")


def test_ties_do_not_depend_on_learning_order() -> None:
    links = symmetric(
        [(x, y, 1) for x, y in itertools.combinations("abcdef", 2) if (ord(x) + ord(y)) % 3]
    )
    states = link_states(links)
    expected = table("a", states).routes()
    for order in itertools.permutations(sorted(set(states) - {"a"})):
        assert table("a", states, order=order).routes() == expected


# ---------------------------------------------------------------------------- properties

NAMES = ["a", "b", "c", "d", "e", "f", "g", "h", "i"]


@st.composite
def graphs(
    draw: st.DrawFn, max_nodes: int = 9
) -> tuple[dict[str, LinkState], dict[str, list[str]]]:
    """Random advertisements over 1..max_nodes nodes: two-way links (each end with its own
    cost from a tiny range, so ties are common), some one-sided claims, some nodes without
    an advertisement at all; plus a random learning order per node."""
    n = draw(st.integers(1, max_nodes))
    nodes = draw(st.permutations(NAMES))[:n]  # names in random positions in the graph
    links: dict[str, dict[str, int]] = {node: {} for node in nodes}
    cost = st.integers(1, 3)
    for x, y in itertools.combinations(nodes, 2):
        kind = draw(st.sampled_from(["none", "none", "both", "both", "both", "x", "y"]))
        if kind in ("both", "x"):
            links[x][y] = draw(cost)
        if kind in ("both", "y"):
            links[y][x] = draw(cost)
    states = {
        node: LinkState(
            node, draw(st.integers(1, 3)), draw(st.integers(1, 5)), tuple(sorted(ls.items()))
        )
        for node, ls in links.items()
    }
    orders = {node: draw(st.permutations([m for m in nodes if m != node])) for node in nodes}
    return states, orders


def usable_edges(states: Mapping[str, LinkState]) -> dict[tuple[str, str], int]:
    """The two-way graph as the spec defines it, computed independently of RouteTable."""
    edges = {}
    for x, y in itertools.permutations(states, 2):
        cx, cy = dict(states[x].links).get(y), dict(states[y].links).get(x)
        if cx is not None and cy is not None:
            edges[x, y] = max(cx, cy)
    return edges


def floyd_warshall(
    nodes: list[str], edges: Mapping[tuple[str, str], int]
) -> dict[tuple[str, str], float]:
    dist: dict[tuple[str, str], float] = {
        (x, y): 0 if x == y else edges.get((x, y), float("inf")) for x in nodes for y in nodes
    }
    for k in nodes:
        for i in nodes:
            for j in nodes:
                if dist[i, k] + dist[k, j] < dist[i, j]:
                    dist[i, j] = dist[i, k] + dist[k, j]
    return dist


def build(
    states: Mapping[str, LinkState], orders: Mapping[str, list[str]]
) -> dict[str, RouteTable]:
    result = {}
    for node, order in orders.items():
        routes = RouteTable(node, states[node].incarnation)
        routes.advertise({name: cost / 1e6 for name, cost in states[node].links})
        for other in order:
            routes.learn(states[other])
        result[node] = routes
    return result


@settings(max_examples=200, deadline=None)
@given(graphs())
def test_hop_by_hop_forwarding_follows_the_source_path(
    graph: tuple[dict[str, LinkState], dict[str, list[str]]],
) -> None:
    states, orders = graph
    nodes = sorted(states)
    t = build(states, orders)
    edges = usable_edges(states)
    dist = floyd_warshall(nodes, edges)
    for s, d in itertools.product(nodes, nodes):
        path = t[s].path(d)
        if dist[s, d] == float("inf"):
            assert path is None and t[s].next_hop(d) is None and t[s].distance(d) is None
            assert d not in t[s].reachable()
            continue
        assert path is not None and path[0] == s and path[-1] == d
        assert t[s].distance(d) == dist[s, d]
        assert sum(edges[hop] for hop in itertools.pairwise(path)) == dist[s, d]
        if s == d:
            assert path == (s,) and t[s].next_hop(d) is None
            continue
        assert d in t[s].reachable()
        # Forward hop by hop, each node consulting only its own table.
        here, walked = s, [s]
        while here != d:
            hop = t[here].next_hop(d)
            assert hop is not None
            assert hop not in walked, f"loop {walked} -> {hop}"
            assert (here, hop) in edges
            walked.append(hop)
            here = hop
            assert len(walked) - 1 <= len(nodes) - 1
        assert tuple(walked) == path


def smallest_paths(
    source: str, adjacency: Mapping[str, list[str]], edges: Mapping[tuple[str, str], int]
) -> dict[str, tuple[int, tuple[str, ...]]]:
    """dest -> min (cost, path) over every simple path from ``source`` (exhaustive search)."""
    best: dict[str, tuple[int, tuple[str, ...]]] = {}
    stack: list[tuple[tuple[str, ...], int]] = [((source,), 0)]
    while stack:
        path, cost = stack.pop()
        here = path[-1]
        if here not in best or (cost, path) < best[here]:
            best[here] = (cost, path)
        for nxt in adjacency[here]:
            if nxt not in path:
                stack.append(((*path, nxt), cost + edges[here, nxt]))
    return best


@settings(max_examples=200, deadline=None)
@given(graphs(max_nodes=6))
def test_paths_are_the_smallest_by_cost_then_names(
    graph: tuple[dict[str, LinkState], dict[str, list[str]]],
) -> None:
    """Brute force over every simple path: the chosen one minimises (cost, name sequence)."""
    states, orders = graph
    t = build(states, orders)
    edges = usable_edges(states)
    adjacency: dict[str, list[str]] = {node: [] for node in states}
    for x, y in edges:
        adjacency[x].append(y)
    for s in states:
        best = smallest_paths(s, adjacency, edges)
        assert t[s].routes() == {d: path for d, (_, path) in best.items()}
        assert {d: t[s].distance(d) for d in best} == {d: c for d, (c, _) in best.items()}


@settings(max_examples=100, deadline=None)
@given(graphs())
def test_learning_order_and_caching_do_not_matter(
    graph: tuple[dict[str, LinkState], dict[str, list[str]]],
) -> None:
    states, orders = graph
    t = build(states, orders)
    for node, routes in t.items():
        fresh = build(states, {node: sorted(orders[node])})[node]
        assert routes.routes() == fresh.routes()
        # Stale and older copies relayed again change nothing.
        for state in states.values():
            assert not routes.learn(state)
        assert routes.routes() == fresh.routes()


def test_cached_lookups_do_not_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    routes = tables(symmetric([("a", "b", 1), ("b", "c", 1)]))["a"]
    assert routes.next_hop("c") == "b"
    calls = []
    original = RouteTable._dijkstra

    def counting(self: RouteTable) -> tuple[dict[str, tuple[str, ...]], dict[str, int]]:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(RouteTable, "_dijkstra", counting)
    for _ in range(10):
        routes.next_hop("c")
        routes.distance("c")
        routes.reachable()
    assert calls == []
    routes.forget("c")
    assert routes.next_hop("c") is None
    assert calls == [1]
