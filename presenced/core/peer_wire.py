"""The peer wire protocol: CBOR messages between daemons, and their strict validation.

Every peer message is one binary WebSocket frame holding a CBOR map with a ``t`` (type)
field. Peers are authenticated (mutual TLS), but a bug or a version skew in a peer must not
be able to crash a daemon or poison what its clients see, so everything is checked here:
types, sizes, and that metas are JSON-compatible (they are relayed to browsers as JSON).

Shapes (arrays rather than maps inside, to keep deltas compact):

* ``hello``  ``{t, v, node, region, inc}``
* ``gossip`` ``{t, hb?, deltas?, digest?, links?}`` where ``hb`` rows are
  ``[node, inc, heartbeat, age_ms]``, ``deltas`` rows are
  ``[node, inc, region, since, clock, full, records]`` with records
  ``[room, user, session, counter, meta|null]``, and ``digest`` rows ``[node, inc, clock]``
* ``bcast``  ``{t, id, room, event, data, user, session, region}`` (room broadcast, flooded)
* ``ping`` / ``pong`` ``{t, id}`` (link RTT), ``bye`` ``{t, node, inc}`` (graceful leave)

This module only converts between bytes and typed values; it never touches the network.
"""

from __future__ import annotations

import math
from typing import Any, Final

import attrs
import cbor2

from presenced.core.crdt import Delta, Record, ReplicaId
from presenced.core.liveness import Beat

PEER_PROTOCOL_VERSION: Final = 1
#: Longest name (node, region, room, user, session, event) accepted from a peer.
MAX_NAME: Final = 256
#: Deepest nesting accepted inside a meta or a broadcast payload.
MAX_DEPTH: Final = 32


class PeerProtocolError(ValueError):
    """A peer sent something no correct peer sends; the link is closed and it is logged."""


@attrs.frozen
class Hello:
    node: str
    region: str
    incarnation: int
    version: int = PEER_PROTOCOL_VERSION

    @property
    def replica(self) -> ReplicaId:
        return ReplicaId(self.node, self.incarnation)


@attrs.frozen
class Gossip:
    beats: tuple[Beat, ...] = ()
    deltas: tuple[Delta, ...] = ()
    digest: dict[ReplicaId, int] | None = None
    #: Nodes the sender has a live direct link to (sent with heartbeats): a relay does not
    #: forward a replica's deltas to a peer that hears them from their origin directly.
    links: tuple[str, ...] | None = None


@attrs.frozen
class RoomBroadcast:
    id: str
    room: str
    event: str
    data: Any
    user: str
    session: str
    region: str


@attrs.frozen
class PeerPing:
    id: int


@attrs.frozen
class PeerPong:
    id: int


@attrs.frozen
class Bye:
    replica: ReplicaId


PeerMessage = Hello | Gossip | RoomBroadcast | PeerPing | PeerPong | Bye


# ---------------------------------------------------------------------------- encoding


def encode(message: PeerMessage) -> bytes:
    """One peer message as CBOR bytes."""
    return cbor2.dumps(_to_wire(message))


def _to_wire(message: PeerMessage) -> dict[str, Any]:
    if isinstance(message, Gossip):
        wire: dict[str, Any] = {"t": "gossip"}
        if message.beats:
            wire["hb"] = [
                [b.replica.node, b.replica.incarnation, b.heartbeat, round(b.age * 1000)]
                for b in message.beats
            ]
        if message.deltas:
            wire["deltas"] = [_delta_to_wire(d) for d in message.deltas]
        if message.digest is not None:
            wire["digest"] = [[r.node, r.incarnation, c] for r, c in message.digest.items()]
        if message.links is not None:
            wire["links"] = list(message.links)
        return wire
    if isinstance(message, Hello):
        return {
            "t": "hello",
            "v": message.version,
            "node": message.node,
            "region": message.region,
            "inc": message.incarnation,
        }
    if isinstance(message, RoomBroadcast):
        return {"t": "bcast", **attrs.asdict(message, recurse=False)}
    if isinstance(message, PeerPing):
        return {"t": "ping", "id": message.id}
    if isinstance(message, PeerPong):
        return {"t": "pong", "id": message.id}
    return {"t": "bye", "node": message.replica.node, "inc": message.replica.incarnation}


def _delta_to_wire(delta: Delta) -> list[Any]:
    return [
        delta.replica.node,
        delta.replica.incarnation,
        delta.region,
        delta.since,
        delta.clock,
        delta.full,
        [
            [room, user, session, counter, meta]
            for (room, user, session), counter, meta in delta.records
        ],
    ]


# ---------------------------------------------------------------------------- decoding


def decode(data: bytes) -> PeerMessage:
    """Parse and validate one peer message; raises PeerProtocolError and nothing else."""
    try:
        wire = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise PeerProtocolError(f"not valid CBOR: {exc}") from None
    if not isinstance(wire, dict):
        raise PeerProtocolError("a peer message must be a map")
    kind = wire.get("t")
    try:
        if kind == "gossip":
            return _gossip(wire)
        if kind == "hello":
            return Hello(
                _name(wire.get("node"), "node"),
                _name(wire.get("region"), "region"),
                _count(wire.get("inc"), "inc"),
                _count(wire.get("v"), "v"),
            )
        if kind == "bcast":
            _json_value(wire.get("data"), MAX_DEPTH)
            names = {f: _name(wire.get(f), f) for f in _BROADCAST_NAMES}
            return RoomBroadcast(data=wire.get("data"), **names)
        if kind == "ping":
            return PeerPing(_count(wire.get("id"), "id"))
        if kind == "pong":
            return PeerPong(_count(wire.get("id"), "id"))
        if kind == "bye":
            return Bye(_replica(wire.get("node"), wire.get("inc")))
    except (TypeError, ValueError, IndexError, RecursionError) as exc:
        if isinstance(exc, PeerProtocolError):
            raise
        raise PeerProtocolError(f"malformed {kind} message: {exc}") from None
    raise PeerProtocolError(f"unknown peer message type {kind!r}")


_BROADCAST_NAMES = ("id", "room", "event", "user", "session", "region")


def _gossip(wire: dict[str, Any]) -> Gossip:
    beats = tuple(
        Beat(_replica(row[0], row[1]), _count(row[2], "heartbeat"), _count(row[3], "age") / 1000)
        for row in _rows(wire.get("hb", []), 4, "hb")
    )
    deltas = tuple(_delta(row) for row in _rows(wire.get("deltas", []), 7, "deltas"))
    digest = None
    if "digest" in wire:
        digest = {
            _replica(row[0], row[1]): _count(row[2], "clock")
            for row in _rows(wire["digest"], 3, "digest")
        }
    links = None
    if "links" in wire:
        raw = wire["links"]
        if type(raw) is not list or len(raw) > 10_000:
            raise PeerProtocolError("'links' must be a list of node names")
        links = tuple(_name(name, "links") for name in raw)
    return Gossip(beats, deltas, digest, links)


def _delta(row: list[Any]) -> Delta:
    node, inc, region, since, clock, full, records = row
    if type(full) is not bool:
        raise PeerProtocolError("delta 'full' must be a boolean")
    parsed: list[Record] = []
    for record in _rows(records, 5, "records"):
        room, user, session, counter, meta = record
        if meta is not None:
            if type(meta) is not dict:
                raise PeerProtocolError("a meta must be a map")
            _json_value(meta, MAX_DEPTH)
        parsed.append(
            (
                (_name(room, "room"), _name(user, "user"), _name(session, "session")),
                _count(counter, "counter"),
                meta,
            )
        )
    return Delta(
        _replica(node, inc),
        _name(region, "region"),
        _count(since, "since"),
        _count(clock, "clock"),
        tuple(parsed),
        full,
    )


def _rows(value: Any, width: int, what: str) -> list[list[Any]]:
    if type(value) is not list or any(type(r) is not list or len(r) != width for r in value):
        raise PeerProtocolError(f"'{what}' must be a list of {width}-element lists")
    return value


def _name(value: Any, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_NAME:
        raise PeerProtocolError(f"'{what}' must be a string of 1..{MAX_NAME} characters")
    return value


def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < 2**63:
        raise PeerProtocolError(f"'{what}' must be a non-negative 64-bit integer")
    return value


def _replica(node: Any, incarnation: Any) -> ReplicaId:
    return ReplicaId(_name(node, "node"), _count(incarnation, "incarnation"))


def _json_value(value: Any, depth: int) -> None:
    """Reject what JSON cannot carry (bytes, tags, NaN, non-string keys) or nests too deep."""
    if depth <= 0:
        raise PeerProtocolError("value nested too deeply")
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return
    if kind is int:
        if not -(2**63) <= value < 2**64:
            raise PeerProtocolError("integer out of range")
        return
    if kind is float:
        if not math.isfinite(value):
            raise PeerProtocolError("NaN and infinities are not JSON")
        return
    if kind is list:
        for item in value:
            _json_value(item, depth - 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise PeerProtocolError("map keys must be strings")
            _json_value(item, depth - 1)
        return
    raise PeerProtocolError(f"{kind.__name__} values cannot be relayed to clients")
