"""The peer wire protocol: CBOR messages between daemons, and their strict validation.

Every peer message is one binary WebSocket frame holding a CBOR map with a ``t`` (type)
field. Peers are authenticated (mutual TLS), but a bug or a version skew in a peer must not
be able to crash a daemon or poison what its clients see, so everything is checked here:
types, sizes, and that metas are JSON-compatible (they are relayed to browsers as JSON).

Shapes (arrays rather than maps inside, to keep deltas compact):

* ``hello``  ``{t, v, node, region, inc}``
* ``gossip`` ``{t, hb?, hbc?, deltas?, digest?, links?}`` where ``hb`` rows are
  ``[node, inc, heartbeat, age_ms]`` and ``hbc`` lists, row for row, each replica's CRDT clock
  when it issued that heartbeat (0: not known; a separate list, not a fifth column, so that
  peers which do not know it ignore it), ``deltas`` rows are
  ``[node, inc, region, since, clock, full, records]`` with records
  ``[room, user, session, counter, meta|null]``, and ``digest`` rows ``[node, inc, clock]``
* ``bcast``  ``{t, id, room, event, data, user, session, region}`` (room broadcast, flooded)
* ``ping`` / ``pong`` ``{t, id}`` (link RTT), ``bye`` ``{t, node, inc}`` (graceful leave)
* ``kick``   ``{t, id, user, session, reason, refuse_ms}`` (disconnect by the server API,
  flooded like ``bcast``: :mod:`presenced.core.kicks`)
* ``gossip`` may also carry ``ls``: link-state advertisements for routing, rows
  ``[node, inc, seq, [[neighbour, cost_us], ...]]``
* routed messages, forwarded hop by hop towards ``dst`` with ``hops`` left:
  ``dm`` (a direct message), ``rcpt`` (its delivered/read/error receipt, routed back to the
  message's origin), ``pull`` and ``pulled`` (a fetch asking every daemon for a user's
  pending reliable messages, and each daemon's answer)

This module only converts between bytes and typed values; it never touches the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs
import cbor2

from presenced.core.crdt import Delta, Record, ReplicaId
from presenced.core.kicks import Kick, kick_from_wire, kick_to_wire
from presenced.core.liveness import Beat
from presenced.core.routing import LinkState

PEER_PROTOCOL_VERSION: Final = 1
#: Longest name (node, region, room, user, session, event) accepted from a peer.
MAX_NAME: Final = 256
#: Deepest nesting accepted inside a meta or a broadcast payload.
MAX_DEPTH: Final = 32
#: Largest integer magnitude accepted in data and metas (4300 decimal digits, Python's JSON limit).
MAX_INT_BITS: Final = 14_000
#: Most recipients named in a group message.
MAX_GROUP: Final = 32
#: Longest message or request id.
MAX_ID: Final = 128


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
    #: Link-state advertisements (routing), only those the peer may not have yet.
    link_states: tuple[LinkState, ...] = ()
    #: True on the sender's batch of its tick (the message its tick boundary sends, ``tk`` on
    #: the wire): the receiver waits for near peers' batches to flush them together
    #: (repairs, relays and news go out whenever they come).
    batch: bool = False


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


# Routed messages: every one names its destination node (``dest``), the node that made it
# (``origin``) and how many more hops it may take (``hops``).

DELIVERED: Final = "delivered"
READ: Final = "read"
ERROR: Final = "error"
#: The recipient daemon did not show the message (it is out of order, or over a fetch's
#: limit): still pending, the origin sends it again later.
DEFERRED: Final = "deferred"
RECEIPT_KINDS: Final = frozenset({DELIVERED, READ, ERROR, DEFERRED})


@attrs.frozen
class Direct:
    """One copy of a direct message, for recipient ``to`` on node ``dest``."""

    id: str
    origin: str
    dest: str
    hops: int
    sender: str
    session: str
    region: str
    to: str
    group: tuple[str, ...]
    data: Any
    reliable: bool
    #: Reliable only: the origin store's sequence number, and that of the previous message of
    #: the same sender and recipient still pending there (0: none), which orders delivery.
    seq: int = 0
    prev: int = 0
    sent_at: int = 0
    #: Retransmission count: a retransmission is not a duplicate to the hops it crosses.
    attempt: int = 0
    #: The fetch request this copy answers ("" when pushed).
    pull: str = ""


@attrs.frozen
class Receipt:
    """What became of a direct message at ``origin`` (a recipient daemon), for ``dest``."""

    id: str
    origin: str
    dest: str
    hops: int
    kind: str
    to: str
    region: str
    code: str = ""
    #: The sending user (so a receipt finds the sender's sessions even after a restart).
    sender: str = ""
    attempt: int = 0


@attrs.frozen
class Pull:
    """A fetch: ``origin`` asks ``dest`` for up to ``limit`` pending messages for ``user``."""

    id: str
    origin: str
    dest: str
    hops: int
    user: str
    limit: int


@attrs.frozen
class Pulled:
    """The answer to a pull, sent after the messages: how many were sent and how many are left."""

    id: str
    origin: str
    dest: str
    hops: int
    sent: int
    remaining: int


Routed = Direct | Receipt | Pull | Pulled

PeerMessage = Hello | Gossip | RoomBroadcast | PeerPing | PeerPong | Bye | Kick | Routed


# ---------------------------------------------------------------------------- encoding


def encode(message: PeerMessage) -> bytes:
    """One peer message as CBOR bytes."""
    return cbor2.dumps(_to_wire(message))


def _to_wire(message: PeerMessage) -> dict[str, Any]:
    if isinstance(message, Gossip):
        wire: dict[str, Any] = {"t": "gossip"}
        if message.beats:
            wire["hb"] = [
                [b.replica.node, b.replica.incarnation, b.heartbeat, round(b.age_s * 1000)]
                for b in message.beats
            ]
            if any(b.clock for b in message.beats):
                wire["hbc"] = [b.clock for b in message.beats]
        if message.deltas:
            wire["deltas"] = [_delta_to_wire(d) for d in message.deltas]
        if message.digest is not None:
            wire["digest"] = [[r.node, r.incarnation, c] for r, c in message.digest.items()]
        if message.links is not None:
            wire["links"] = list(message.links)
        if message.link_states:
            wire["ls"] = [
                [ls.node, ls.incarnation, ls.seq, [list(link) for link in ls.links]]
                for ls in message.link_states
            ]
        if message.batch:
            wire["tk"] = True
        return wire
    if isinstance(message, Direct):
        return {
            "t": "dm",
            "id": message.id,
            "o": message.origin,
            "d": message.dest,
            "h": message.hops,
            "from": message.sender,
            "ses": message.session,
            "reg": message.region,
            "to": message.to,
            "grp": list(message.group),
            "data": message.data,
            "rel": message.reliable,
            "seq": message.seq,
            "prev": message.prev,
            "at": message.sent_at,
            "try": message.attempt,
            "pull": message.pull,
        }
    if isinstance(message, Receipt):
        return {
            "t": "rcpt",
            "id": message.id,
            "o": message.origin,
            "d": message.dest,
            "h": message.hops,
            "kind": message.kind,
            "to": message.to,
            "reg": message.region,
            "code": message.code,
            "from": message.sender,
            "try": message.attempt,
        }
    if isinstance(message, Pull):
        return {
            "t": "pull",
            "id": message.id,
            "o": message.origin,
            "d": message.dest,
            "h": message.hops,
            "user": message.user,
            "limit": message.limit,
        }
    if isinstance(message, Pulled):
        return {
            "t": "pulled",
            "id": message.id,
            "o": message.origin,
            "d": message.dest,
            "h": message.hops,
            "sent": message.sent,
            "left": message.remaining,
        }
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
    if isinstance(message, Kick):
        return kick_to_wire(message)
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
        if kind in _ROUTED:
            return _ROUTED[kind](wire)
        if kind == "ping":
            return PeerPing(_count(wire.get("id"), "id"))
        if kind == "pong":
            return PeerPong(_count(wire.get("id"), "id"))
        if kind == "bye":
            return Bye(_replica(wire.get("node"), wire.get("inc")))
        if kind == "kick":
            return kick_from_wire(wire)
    except (TypeError, ValueError, IndexError, RecursionError) as exc:
        if isinstance(exc, PeerProtocolError):
            raise
        raise PeerProtocolError(f"malformed {kind} message: {exc}") from None
    raise PeerProtocolError(f"unknown peer message type {kind!r}")


_BROADCAST_NAMES = ("id", "room", "event", "user", "session", "region")


def _gossip(wire: dict[str, Any]) -> Gossip:
    rows = _rows(wire.get("hb", []), 4, "hb")
    clocks = wire.get("hbc", [0] * len(rows))
    if type(clocks) is not list or len(clocks) != len(rows):
        raise PeerProtocolError("'hbc' must be a list of clocks, one per 'hb' row")
    beats = tuple(
        Beat(
            _replica(row[0], row[1]),
            _count(row[2], "heartbeat"),
            _count(row[3], "age") / 1000,
            _count(clock, "hbc"),
        )
        for row, clock in zip(rows, clocks, strict=True)
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
    link_states = tuple(_link_state(row) for row in _rows(wire.get("ls", []), 4, "ls"))
    batch = wire.get("tk", False)
    if type(batch) is not bool:
        raise PeerProtocolError("'tk' must be a boolean")
    return Gossip(beats, deltas, digest, links, link_states, batch)


def _routing(wire: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _name(wire.get("id"), "id", MAX_ID),
        "origin": _name(wire.get("o"), "o"),
        "dest": _name(wire.get("d"), "d"),
        "hops": _count(wire.get("h"), "h"),
    }


def _direct(wire: dict[str, Any]) -> Direct:
    group = wire.get("grp")
    if type(group) is not list or len(group) > MAX_GROUP:
        raise PeerProtocolError(f"'grp' must be a list of at most {MAX_GROUP} users")
    reliable = wire.get("rel")
    if type(reliable) is not bool:
        raise PeerProtocolError("'rel' must be a boolean")
    _json_value(wire.get("data"), MAX_DEPTH)
    pull = wire.get("pull")
    return Direct(
        **_routing(wire),
        sender=_name(wire.get("from"), "from"),
        session=_name(wire.get("ses"), "ses"),
        region=_name(wire.get("reg"), "reg"),
        to=_name(wire.get("to"), "to"),
        group=tuple(_name(user, "grp") for user in group),
        data=wire.get("data"),
        reliable=reliable,
        seq=_count(wire.get("seq"), "seq"),
        prev=_count(wire.get("prev"), "prev"),
        sent_at=_count(wire.get("at"), "at"),
        attempt=_count(wire.get("try"), "try"),
        pull="" if pull == "" else _name(pull, "pull", MAX_ID),
    )


def _receipt(wire: dict[str, Any]) -> Receipt:
    kind = wire.get("kind")
    if kind not in RECEIPT_KINDS:
        raise PeerProtocolError(f"unknown receipt kind {kind!r}")
    code = wire.get("code")
    return Receipt(
        **_routing(wire),
        kind=kind,
        to=_name(wire.get("to"), "to"),
        region=_name(wire.get("reg"), "reg"),
        code="" if code == "" else _name(code, "code", 64),
        sender=_name(wire.get("from"), "from"),
        attempt=_count(wire.get("try"), "try"),
    )


def _pull(wire: dict[str, Any]) -> Pull:
    return Pull(
        **_routing(wire),
        user=_name(wire.get("user"), "user"),
        limit=_count(wire.get("limit"), "limit"),
    )


def _pulled(wire: dict[str, Any]) -> Pulled:
    return Pulled(
        **_routing(wire),
        sent=_count(wire.get("sent"), "sent"),
        remaining=_count(wire.get("left"), "left"),
    )


_ROUTED: Final[dict[str, Callable[[dict[str, Any]], PeerMessage]]] = {
    "dm": _direct,
    "rcpt": _receipt,
    "pull": _pull,
    "pulled": _pulled,
}


def _link_state(row: list[Any]) -> LinkState:
    node, inc, seq, links = row
    pairs = _rows(links, 2, "ls links")
    if len(pairs) > 10_000:
        raise PeerProtocolError("too many links in a link-state advertisement")
    return LinkState(
        _name(node, "node"),
        _count(inc, "inc"),
        _count(seq, "seq"),
        tuple(sorted((_name(n, "neighbour"), max(1, _count(c, "cost"))) for n, c in pairs)),
    )


def _delta(row: list[Any]) -> Delta:
    node, inc, region, since, clock, full, records = row
    if type(full) is not bool:
        raise PeerProtocolError("delta 'full' must be a boolean")
    parsed: list[Record] = []
    for record in _rows(records, 5, "records"):
        room, user, session, counter, meta = record
        # (one test for the common case; the helpers name what is wrong otherwise)
        if not (
            type(room) is str
            and type(user) is str
            and type(session) is str
            and 0 < len(room) <= MAX_NAME
            and 0 < len(user) <= MAX_NAME
            and 0 < len(session) <= MAX_NAME
        ):
            _name(room, "room"), _name(user, "user"), _name(session, "session")
        if type(counter) is not int or not 0 <= counter < 2**63:
            _count(counter, "counter")
        if meta is not None:
            if type(meta) is not dict:
                raise PeerProtocolError("a meta must be a map")
            _json_value(meta, MAX_DEPTH)
        parsed.append(((room, user, session), counter, meta))
    return Delta(
        _replica(node, inc),
        _name(region, "region"),
        _count(since, "since"),
        _count(clock, "clock"),
        tuple(parsed),
        full,
    )


def _rows(value: Any, width: int, what: str) -> list[list[Any]]:
    if type(value) is not list:
        raise PeerProtocolError(f"'{what}' must be a list of {width}-element lists")
    for row in value:
        if type(row) is not list or len(row) != width:
            raise PeerProtocolError(f"'{what}' must be a list of {width}-element lists")
    return value


def _name(value: Any, what: str, limit: int = MAX_NAME) -> str:
    if type(value) is not str or not 0 < len(value) <= limit:
        raise PeerProtocolError(f"'{what}' must be a string of 1..{limit} characters")
    return value


def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < 2**63:
        raise PeerProtocolError(f"'{what}' must be a non-negative 64-bit integer")
    return value


def _replica(node: Any, incarnation: Any) -> ReplicaId:
    return ReplicaId(_name(node, "node"), _count(incarnation, "incarnation"))


def _json_value(value: Any, depth: int, seen: set[int] | None = None) -> None:
    """Reject what JSON cannot carry (bytes, tags, NaN, non-string keys) or nests too deep.

    Integers of any size pass: clients may send them, and CBOR carries them as bignums. A
    container met twice is a CBOR shared reference (tags 28/29, resolved by cbor2 before we
    see the data): refused, since a few hundred bytes of them expand to billions of values.
    A value counts one level of ``depth``, its container one more. (Plain leaves are passed in
    the container's loop: this runs for every meta a peer sends, and a call per leaf was most
    of its cost.)
    """
    if depth <= 0:
        raise PeerProtocolError("value nested too deeply")
    kind = type(value)
    if kind is not dict and kind is not list:
        _json_leaf(value, kind)
        return
    if seen is None:
        seen = set()
    if id(value) in seen:
        raise PeerProtocolError("shared references are not JSON")
    seen.add(id(value))
    if depth == 1 and value:
        raise PeerProtocolError("value nested too deeply")
    items: Iterable[Any] = value
    if kind is dict:
        for key in value:
            if type(key) is not str:
                raise PeerProtocolError("map keys must be strings")
        items = value.values()
    for item in items:
        child = type(item)
        if child is str or child is bool or item is None:
            continue
        if child is float:
            if math.isfinite(item):
                continue
        elif child is int and item.bit_length() <= MAX_INT_BITS:
            continue
        _json_value(item, depth - 1, seen)


def _json_leaf(value: Any, kind: type) -> None:
    if kind is str or kind is bool or value is None:
        return
    if kind is int:
        # Python's JSON refuses ints over 4300 digits both ways; so no client can send one.
        if value.bit_length() > MAX_INT_BITS:
            raise PeerProtocolError("integer too large for JSON")
        return
    if kind is float:
        if not math.isfinite(value):
            raise PeerProtocolError("NaN and infinities are not JSON")
        return
    raise PeerProtocolError(f"{kind.__name__} values cannot be relayed to clients")
