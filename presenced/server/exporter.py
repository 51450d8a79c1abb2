"""What the HTTP side port reports: Prometheus metrics and the `/status` document.

Both are read from the daemon's live objects when asked (a scrape, a status request), never
pushed: the hot path only bumps plain integers in :class:`~presenced.server.metrics.Metrics`
and the peer links, and this module turns them into metric families at scrape time. It runs
on the event loop thread between two events, so it sees a consistent picture without locks.

Every metric is prefixed ``presenced_``. Labels are node and region names and error or close
codes, never replica incarnations or user data, so the number of series stays bounded across
restarts. Each daemon gets its own registry (:func:`make_registry`): several daemons may share
one process (tests, `presenced demo`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from presenced import __version__
from presenced.core.crdt import ReplicaId
from presenced.core.liveness import DOWN, PURGED, RETIRED, UP
from presenced.server.metrics import FLUSH_BUCKETS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from presenced.config import Config
    from presenced.server.clients import Sessions
    from presenced.server.messaging import Messenger
    from presenced.server.node import Node
    from presenced.server.peers import PeerManager

__all__ = [
    "LINK_DOWN",
    "LINK_UP",
    "RELAYED",
    "DaemonCollector",
    "DaemonView",
    "make_registry",
    "readiness",
    "status_document",
]


class DaemonView(Protocol):
    """What the side port reads of a running daemon (:class:`~presenced.server.daemon.Daemon`
    is one): read at request time, never pushed."""

    @property
    def config(self) -> Config: ...
    @property
    def node(self) -> Node: ...
    @property
    def peers(self) -> PeerManager | None: ...
    @property
    def sessions(self) -> Sessions: ...
    @property
    def messenger(self) -> Messenger: ...
    @property
    def client_port(self) -> int | None: ...
    @property
    def peer_port(self) -> int | None: ...
    @property
    def http_port(self) -> int | None: ...
    @property
    def running(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...


#: Liveness statuses, each reported (as 0 when none) so alerts can rely on the series.
STATUSES = (UP, DOWN, PURGED, RETIRED)


def readiness(daemon: DaemonView) -> str | None:
    """None when the daemon serves clients and is not shutting down, else the reason."""
    if daemon.stopping:
        return "shutting down"
    if not daemon.running:
        return "starting"
    return None


def uptime(daemon: DaemonView) -> float:
    """Seconds since the daemon started (its incarnation is its start time in µs)."""
    return max(0.0, time.time() - daemon.node.replica.incarnation / 1e6)


def _newest_per_node(replicas: Iterator[ReplicaId]) -> dict[str, ReplicaId]:
    newest: dict[str, ReplicaId] = {}
    for replica in replicas:
        if replica.node not in newest or newest[replica.node].incarnation < replica.incarnation:
            newest[replica.node] = replica
    return newest


def _region_of(daemon: DaemonView, replica: ReplicaId) -> str:
    partition = daemon.node.state.partitions.get(replica)
    if partition is not None:
        return partition.region
    link = daemon.peers.links.get(replica.node) if daemon.peers is not None else None
    return link.region if link is not None else ""


#: Peer states in `/status` and `presenced_peer_link_up`: a direct link is up; no direct
#: link, but the node's heartbeats arrive through another region; no heartbeat for
#: ``down_after_s`` (its users have left every room).
LINK_UP, RELAYED, LINK_DOWN = "up", "relayed", "down"


def _unlinked_nodes(daemon: DaemonView) -> dict[str, tuple[ReplicaId, str]]:
    """Other nodes this daemon knows of (newest incarnation) without a direct link, with
    their peer state: ``relayed`` (heard through another region) or ``down``."""
    node = daemon.node
    links = daemon.peers.links if daemon.peers is not None else {}
    table = node.liveness.table
    out: dict[str, tuple[ReplicaId, str]] = {}
    for name, newest in sorted(_newest_per_node(iter(table)).items()):
        if name == node.replica.node or name in links:
            continue
        out[name] = (newest, RELAYED if table[newest].status == UP else LINK_DOWN)
    return out


class DaemonCollector(Collector):
    """A Prometheus collector reading one daemon at scrape time."""

    def __init__(self, daemon: DaemonView) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        node = daemon.node
        metrics = node.metrics
        replica = node.replica

        info = GaugeMetricFamily(
            "presenced_info",
            "This daemon: its node, region and version (always 1).",
            labels=["node", "region", "version"],
        )
        info.add_metric([replica.node, node.region, __version__], 1)
        yield info
        yield GaugeMetricFamily(
            "presenced_start_time_seconds",
            "When this daemon incarnation started, in seconds since 1970.",
            value=replica.incarnation / 1e6,
        )
        yield GaugeMetricFamily(
            "presenced_ready",
            "1 when the daemon serves clients and is not shutting down (see /readyz).",
            value=0 if readiness(daemon) else 1,
        )

        # -- clients
        yield GaugeMetricFamily(
            "presenced_connections", "Open client connections.", value=len(node.connections)
        )
        for name, doc, value in (
            ("connections_opened", "Client connections accepted.", metrics.connections_opened),
            (
                "connections_refused",
                "Client connections refused (bad handshake, connection limit).",
                metrics.connections_refused,
            ),
            (
                "client_frames_in",
                "WebSocket data frames read from clients.",
                metrics.frames_in,
            ),
            ("client_bytes_in", "Bytes read from client sockets.", metrics.bytes_in),
            (
                "client_messages_in",
                "Complete client messages (requests) received.",
                metrics.messages_in,
            ),
            ("updates_in", "Presence updates (cursor moves, meta changes).", metrics.updates_in),
            ("client_frames_out", "Frames queued to clients.", metrics.frames_out),
            ("client_bytes_out", "Bytes of frames queued to clients.", metrics.bytes_out),
            (
                "diffs_flushed",
                "Room diffs flushed (one frame per room per flush).",
                metrics.diffs_flushed,
            ),
            (
                "resyncs",
                "Full room states sent to slow clients instead of a backlog.",
                metrics.resyncs,
            ),
            ("client_pings", "WebSocket pings sent to quiet clients.", metrics.pings_sent),
            (
                "clients_timed_out",
                "Client connections closed after no sign of life for --client-timeout.",
                metrics.clients_timed_out,
            ),
            (
                "sessions_detached",
                "Sessions whose connection dropped without a clean close (kept for the grace).",
                metrics.sessions_detached,
            ),
            ("sessions_resumed", "Sessions resumed by a new connection.", metrics.sessions_resumed),
            (
                "sessions_resumed_elsewhere",
                "Sessions resumed here that another daemon held.",
                metrics.sessions_resumed_elsewhere,
            ),
            (
                "sessions_expired",
                "Detached sessions that left when their resume grace ran out.",
                metrics.sessions_expired,
            ),
            ("api_publishes", "Server API publishes to a room.", metrics.api_publishes),
            ("api_sends", "Server API direct messages.", metrics.api_sends),
            ("api_disconnects", "Server API disconnects.", metrics.api_disconnects),
        ):
            yield CounterMetricFamily(f"presenced_{name}", doc, value=value)
        cumulative, buckets = 0, []
        for bound, count in zip((*FLUSH_BUCKETS, float("inf")), metrics.flush_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "presenced_flush_duration_seconds",
            "Time of each ticker wake-up: reading paced clients, waking peer links, flushing"
            " rooms.",
            buckets=buckets,
            sum_value=metrics.flush_seconds,
        )
        errors = CounterMetricFamily(
            "presenced_client_errors", "Error frames sent to clients, by code.", labels=["code"]
        )
        for code, count in sorted(metrics.errors.items()):
            errors.add_metric([code], count)
        yield errors
        closes = CounterMetricFamily(
            "presenced_client_closes",
            "Client connections closed by the daemon, by WebSocket close code.",
            labels=["code"],
        )
        for close_code, count in sorted(metrics.closes.items()):
            closes.add_metric([str(close_code)], count)
        yield closes

        yield GaugeMetricFamily(
            "presenced_detached_sessions",
            "Sessions waiting to be resumed (their connection dropped).",
            value=len(daemon.sessions.detached),
        )

        # -- presence
        yield GaugeMetricFamily(
            "presenced_rooms", "Rooms with members on this daemon.", value=len(node.members)
        )
        partitions = node.state.partitions
        yield GaugeMetricFamily(
            "presenced_presences",
            "Visible presences (entries of replicas that are up), in every region.",
            value=sum(p.live_count() for p in partitions.values() if p.up),
        )
        by_node = GaugeMetricFamily(
            "presenced_node_presences",
            "Stored presences per node (its newest incarnation), visible or not.",
            labels=["node", "region"],
        )
        for name, newest in sorted(_newest_per_node(iter(partitions)).items()):
            part = partitions[newest]
            by_node.add_metric([name, part.region], part.live_count())
        yield by_node

        # -- peers
        links = daemon.peers.links if daemon.peers is not None else {}
        yield GaugeMetricFamily("presenced_peer_links", "Peer links that are up.", value=len(links))
        up = GaugeMetricFamily(
            "presenced_peer_link_up",
            "1 for each peer node with a direct link up (dialed: this daemon dialed it); 0 for"
            " each other node known without one (reached through another region, or down).",
            labels=["peer", "region", "dialed"],
        )
        rtt = GaugeMetricFamily(
            "presenced_peer_rtt_seconds", "Last measured round trip to each peer.", labels=["peer"]
        )
        peer_in = CounterMetricFamily(
            "presenced_peer_bytes_in", "Bytes received on the current link.", labels=["peer"]
        )
        peer_out = CounterMetricFamily(
            "presenced_peer_bytes_out", "Bytes sent on the current link.", labels=["peer"]
        )
        messages_in = CounterMetricFamily(
            "presenced_peer_messages_in", "Messages received on the current link.", labels=["peer"]
        )
        messages_out = CounterMetricFamily(
            "presenced_peer_messages_out", "Messages sent on the current link.", labels=["peer"]
        )
        for name, link in sorted(links.items()):
            up.add_metric([name, link.region, "true" if link.dialed else "false"], 1)
            if link.rtt is not None:
                rtt.add_metric([name], link.rtt)
            peer_in.add_metric([name], link.bytes_in)
            peer_out.add_metric([name], link.bytes_out)
            messages_in.add_metric([name], link.messages_in)
            messages_out.add_metric([name], link.messages_out)
        for name, (other, _state) in _unlinked_nodes(daemon).items():
            up.add_metric([name, _region_of(daemon, other), "false"], 0)
        yield from (up, rtt, peer_in, peer_out, messages_in, messages_out)

        # -- liveness
        liveness = node.liveness
        counts = dict.fromkeys(STATUSES, 0)
        for health in liveness.table.values():
            counts[health.status] += 1
        for heartbeat in liveness.gone.values():
            counts[RETIRED if heartbeat == float("inf") else PURGED] += 1
        replicas = GaugeMetricFamily(
            "presenced_replicas",
            "Other daemon incarnations this one knows of, by liveness status.",
            labels=["status"],
        )
        for status in STATUSES:
            replicas.add_metric([status], counts[status])
        yield replicas
        lag = GaugeMetricFamily(
            "presenced_gossip_lag_seconds",
            "Seconds since each other node's heartbeat last advanced, as heard here.",
            labels=["node", "region"],
        )
        now = node.clock()
        for name, newest in sorted(_newest_per_node(iter(liveness.table)).items()):
            seen = liveness.table[newest].seen_at
            lag.add_metric([name, _region_of(daemon, newest)], max(0.0, now - seen))
        yield lag

        # -- direct messages
        for name, doc, value in (
            (
                "messages_sent",
                "Direct messages accepted from local clients.",
                metrics.messages_sent,
            ),
            (
                "messages_routed",
                "Direct message copies forwarded to a peer.",
                metrics.messages_routed,
            ),
            ("messages_stored", "Reliable messages written to the store.", metrics.messages_stored),
            (
                "messages_delivered",
                "Direct message copies written to local recipients.",
                metrics.messages_delivered,
            ),
        ):
            yield CounterMetricFamily(f"presenced_{name}", doc, value=value)
        message_errors = CounterMetricFamily(
            "presenced_message_errors", "Direct message failures, by error code.", labels=["code"]
        )
        for code, count in sorted(metrics.message_errors.items()):
            message_errors.add_metric([code], count)
        yield message_errors


def make_registry(daemon: DaemonView) -> CollectorRegistry:
    """A registry of its own for one daemon (not the process-wide default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return registry


def _address(host: str, port: int | None) -> str | None:
    if port is None:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def status_document(daemon: DaemonView) -> dict[str, Any]:
    """The `/status` JSON: who this daemon is, its links, the replicas it knows, its counts."""
    node = daemon.node
    config = daemon.config
    metrics = node.metrics
    replica = node.replica
    liveness = node.liveness
    now = node.clock()
    links = daemon.peers.links if daemon.peers is not None else {}
    peer_listen = config.peer_listen
    http = config.http
    partitions = node.state.partitions
    reason = readiness(daemon)

    peers: list[dict[str, Any]] = [
        {
            "node": name,
            "region": link.region,
            "replica": str(link.remote),
            "state": LINK_UP,
            "rtt_ms": None if link.rtt is None else round(link.rtt * 1000, 3),
            "dialed": link.dialed,
            "bytes_in": link.bytes_in,
            "bytes_out": link.bytes_out,
        }
        for name, link in sorted(links.items())
    ]
    # Nodes known without a direct link: reached through another region, or down.
    for name, (other, state) in _unlinked_nodes(daemon).items():
        peers.append(
            {
                "node": name,
                "region": _region_of(daemon, other),
                "replica": str(other),
                "state": state,
                "rtt_ms": None,
                "dialed": None,
                "bytes_in": None,
                "bytes_out": None,
            }
        )
    peers.sort(key=lambda peer: str(peer["node"]))
    replicas: list[dict[str, Any]] = [
        {
            "replica": str(replica),
            "node": replica.node,
            "region": node.region,
            "status": UP,
            "local": True,
            "seconds_since_heard": 0.0,
            "entries": partitions[replica].live_count(),
        }
    ]
    for other, health in sorted(liveness.table.items()):
        part = partitions.get(other)
        replicas.append(
            {
                "replica": str(other),
                "node": other.node,
                "region": _region_of(daemon, other),
                "status": health.status,
                "local": False,
                "seconds_since_heard": round(max(0.0, now - health.seen_at), 3),
                "entries": part.live_count() if part is not None else 0,
            }
        )
    document: dict[str, Any] = {
        "node": replica.node,
        "region": node.region,
        "replica": str(replica),
        "incarnation": replica.incarnation,
        "version": __version__,
        "uptime_s": round(uptime(daemon), 3),
        "ready": reason is None,
        "not_ready_reason": reason,
        "listen": {
            "client": _address(config.listen.host, daemon.client_port),
            "peer": _address(peer_listen.host, daemon.peer_port) if peer_listen else None,
            "http": _address(http.host, daemon.http_port) if http else None,
        },
        "configured_peers": list(config.peers),
        "connections": len(node.connections),
        "rooms": len(node.members),
        "presences": sum(p.live_count() for p in partitions.values() if p.up),
        "peers": peers,
        "replicas": replicas,
        "messages": {
            "sent": metrics.messages_sent,
            "routed": metrics.messages_routed,
            "stored": metrics.messages_stored,
            "delivered": metrics.messages_delivered,
            "errors": dict(sorted(metrics.message_errors.items())),
        },
    }
    router = getattr(node, "router", None)
    if router is None and daemon.peers is not None:
        router = getattr(daemon.peers, "routes", None)
    if router is not None:
        document["routes"] = {dest: list(path) for dest, path in router.routes().items()}
    return document
