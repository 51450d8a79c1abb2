"""Tests for the peer wire codec (`presenced.core.peer_wire`).

Peers are authenticated, but a bug or a version skew in one must not crash a daemon or poison
what its clients see. So besides round trips for every message type, these tests check the
promise the peer link loop relies on: whatever bytes arrive, `decode` either returns a valid
message or raises `PeerProtocolError`, and nothing else.

Malformed inputs are built from ``_to_wire`` of a valid message, mutated, then CBOR-encoded
with ``cbor2.dumps``, so each case differs from a valid frame in exactly one place.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import attrs
import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presenced.core import peer_wire as w
from presenced.core import protocol
from presenced.core.crdt import Delta, ReplicaId
from presenced.core.limits import Limits
from presenced.core.liveness import Beat
from presenced.core.peer_wire import (
    MAX_DEPTH,
    MAX_GROUP,
    MAX_ID,
    MAX_NAME,
    RECEIPT_KINDS,
    Bye,
    Direct,
    Gossip,
    Hello,
    PeerMessage,
    PeerPing,
    PeerPong,
    PeerProtocolError,
    Pull,
    Pulled,
    Receipt,
    RoomBroadcast,
    decode,
    encode,
)
from presenced.core.routing import LinkState

MAX_COUNT = 2**63 - 1
EU = ReplicaId("eu", 1795425640982113)
US = ReplicaId("us", 1795425630000000)

# ---------------------------------------------------------------------------- samples
# The examples of docs/protocol.md, as typed values.

HELLO = Hello("eu", "eu", EU.incarnation)
GOSSIP = Gossip(
    beats=(Beat(EU, 42, 0.0, 19), Beat(US, 40, 0.13, 7)),
    deltas=(
        Delta(
            EU,
            "eu",
            17,
            19,
            (
                (("lobby", "ann", "hHZKDMArXPmH"), 18, {"x": 310, "y": 92}),
                (("lobby", "bob", "ldm70Fy6ttyJ"), 19, None),
            ),
            False,
        ),
    ),
    digest={EU: 19, US: 7},
    links=("us", "ap"),
    link_states=(LinkState("us", US.incarnation, 7, (("ap", 41250), ("eu", 40310))),),
    batch=True,
)
BCAST = RoomBroadcast("9f1c", "lobby", "chat", {"text": "hi"}, "ann", "hHZKDMArXPmH", "eu")
PING = PeerPing(7)
PONG = PeerPong(7)
BYE = Bye(EU)
DIRECT = Direct(
    "eu.sk3f1m.17",
    "eu",
    "ap",
    16,
    "ann",
    "hHZKDMArXPmH",
    "eu",
    "bob",
    (),
    {"text": "hi"},
    True,
    412,
    409,
    1795425640982,
    0,
    "",
)
RECEIPT = Receipt("eu.sk3f1m.17", "ap", "eu", 16, "delivered", "bob", "ap", "", "ann", 0)
PULL = Pull("ap.sk3f2a.f9", "ap", "eu", 16, "bob", 50)
PULLED = Pulled("ap.sk3f2a.f9", "eu", "ap", 16, 3, 0)

SAMPLES: dict[str, PeerMessage] = {
    "hello": HELLO,
    "gossip": GOSSIP,
    "bcast": BCAST,
    "ping": PING,
    "pong": PONG,
    "bye": BYE,
    "dm": DIRECT,
    "rcpt": RECEIPT,
    "pull": PULL,
    "pulled": PULLED,
}


def wire_of(message: PeerMessage) -> dict[str, Any]:
    """A private, mutable copy of the wire map of ``message``."""
    return copy.deepcopy(w._to_wire(message))


def nested(levels: int, inner: Any = 1) -> Any:
    """``inner`` inside ``levels`` lists."""
    value = inner
    for _ in range(levels):
        value = [value]
    return value


def rejected(wire: Any) -> PeerProtocolError:
    with pytest.raises(PeerProtocolError) as info:
        decode(cbor2.dumps(wire))
    return info.value


# ---------------------------------------------------------------------------- shapes


def test_wire_shapes_match_the_documentation() -> None:
    """The examples of docs/protocol.md, field for field."""
    assert w._to_wire(HELLO) == {
        "t": "hello",
        "v": 1,
        "node": "eu",
        "region": "eu",
        "inc": 1795425640982113,
    }
    assert w._to_wire(GOSSIP) == {
        "t": "gossip",
        "hb": [["eu", 1795425640982113, 42, 0], ["us", 1795425630000000, 40, 130]],
        "hbc": [19, 7],
        "deltas": [
            [
                "eu",
                1795425640982113,
                "eu",
                17,
                19,
                False,
                [
                    ["lobby", "ann", "hHZKDMArXPmH", 18, {"x": 310, "y": 92}],
                    ["lobby", "bob", "ldm70Fy6ttyJ", 19, None],
                ],
            ]
        ],
        "digest": [["eu", 1795425640982113, 19], ["us", 1795425630000000, 7]],
        "links": ["us", "ap"],
        "ls": [["us", 1795425630000000, 7, [["ap", 41250], ["eu", 40310]]]],
        "tk": True,
    }
    assert w._to_wire(BCAST) == {
        "t": "bcast",
        "id": "9f1c",
        "room": "lobby",
        "event": "chat",
        "data": {"text": "hi"},
        "user": "ann",
        "session": "hHZKDMArXPmH",
        "region": "eu",
    }
    assert w._to_wire(PING) == {"t": "ping", "id": 7}
    assert w._to_wire(PONG) == {"t": "pong", "id": 7}
    assert w._to_wire(BYE) == {"t": "bye", "node": "eu", "inc": 1795425640982113}
    assert w._to_wire(DIRECT) == {
        "t": "dm",
        "id": "eu.sk3f1m.17",
        "o": "eu",
        "d": "ap",
        "h": 16,
        "from": "ann",
        "ses": "hHZKDMArXPmH",
        "reg": "eu",
        "to": "bob",
        "grp": [],
        "data": {"text": "hi"},
        "rel": True,
        "seq": 412,
        "prev": 409,
        "at": 1795425640982,
        "try": 0,
        "pull": "",
    }
    assert w._to_wire(RECEIPT) == {
        "t": "rcpt",
        "id": "eu.sk3f1m.17",
        "o": "ap",
        "d": "eu",
        "h": 16,
        "kind": "delivered",
        "to": "bob",
        "reg": "ap",
        "code": "",
        "from": "ann",
        "try": 0,
    }
    assert w._to_wire(PULL) == {
        "t": "pull",
        "id": "ap.sk3f2a.f9",
        "o": "ap",
        "d": "eu",
        "h": 16,
        "user": "bob",
        "limit": 50,
    }
    assert w._to_wire(PULLED) == {
        "t": "pulled",
        "id": "ap.sk3f2a.f9",
        "o": "eu",
        "d": "ap",
        "h": 16,
        "sent": 3,
        "left": 0,
    }


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_samples_round_trip(kind: str) -> None:
    message = SAMPLES[kind]
    data = encode(message)
    assert isinstance(data, bytes)
    assert cbor2.loads(data)["t"] == kind
    assert decode(data) == message


def test_gossip_parts_are_optional() -> None:
    assert w._to_wire(Gossip()) == {"t": "gossip"}
    assert decode(cbor2.dumps({"t": "gossip"})) == Gossip()
    # An empty digest or link list is not the same as none.
    empty = Gossip(digest={}, links=())
    assert w._to_wire(empty) == {"t": "gossip", "digest": [], "links": []}
    assert decode(encode(empty)) == empty
    assert decode(encode(Gossip(beats=GOSSIP.beats))) == Gossip(beats=GOSSIP.beats)


def test_unknown_fields_are_ignored() -> None:
    for message in SAMPLES.values():
        wire = wire_of(message)
        wire["future"] = {"x": [1, b"bytes are fine where nobody looks"]}
        assert decode(cbor2.dumps(wire)) == message


def test_beat_age_is_whole_milliseconds() -> None:
    beat = Beat(EU, 1, 0.0126)
    assert w._to_wire(Gossip(beats=(beat,)))["hb"] == [[EU.node, EU.incarnation, 1, 13]]
    (back,) = decode(encode(Gossip(beats=(beat,)))).beats  # type: ignore[union-attr]
    assert back == Beat(EU, 1, 0.013)


def test_heartbeat_clocks_are_optional() -> None:
    """Clocks travel in their own list, so a peer that does not know them ignores them, and
    rows without one (from such a peer, or all zero) decode with clock 0: not known."""
    wire = wire_of(GOSSIP)
    del wire["hbc"]
    assert decode(cbor2.dumps(wire)).beats == (Beat(EU, 42, 0.0), Beat(US, 40, 0.13))  # type: ignore[union-attr]
    unknown = Gossip(beats=(Beat(EU, 42, 0.0), Beat(US, 40, 0.13)))
    assert "hbc" not in w._to_wire(unknown)
    mixed = Gossip(beats=(Beat(EU, 42, 0.0, 0), Beat(US, 40, 0.13, 7)))
    assert w._to_wire(mixed)["hbc"] == [0, 7]
    assert decode(encode(mixed)) == mixed


def test_limits_are_inclusive() -> None:
    """Everything exactly at a limit is accepted."""
    name = "n" * MAX_NAME
    ident = "i" * MAX_ID
    messages: list[PeerMessage] = [
        Hello(name, name, MAX_COUNT, MAX_COUNT),
        PeerPing(MAX_COUNT),
        PeerPong(0),
        Bye(ReplicaId(name, MAX_COUNT)),
        RoomBroadcast(name, name, name, nested(MAX_DEPTH - 1), name, name, name),
        attrs.evolve(
            DIRECT,
            id=ident,
            origin=name,
            hops=MAX_COUNT,
            group=tuple(f"u{i}" for i in range(MAX_GROUP)),
            data={"a": nested(MAX_DEPTH - 2), "big": 2**64 - 1, "small": -(2**63)},
            seq=MAX_COUNT,
            prev=MAX_COUNT,
            sent_at=MAX_COUNT,
            attempt=MAX_COUNT,
            pull=ident,
        ),
        attrs.evolve(RECEIPT, id=ident, kind=w.ERROR, code="c" * 64, sender=name),
        attrs.evolve(PULL, user=name, limit=MAX_COUNT),
        attrs.evolve(PULLED, sent=MAX_COUNT, remaining=MAX_COUNT),
        Gossip(
            deltas=(
                Delta(
                    ReplicaId(name, MAX_COUNT),
                    name,
                    MAX_COUNT,
                    MAX_COUNT,
                    (((name, name, name), MAX_COUNT, {"a": nested(MAX_DEPTH - 2)}),),
                    True,
                ),
            ),
            links=tuple(f"n{i}" for i in range(10_000)),
            link_states=(LinkState(name, MAX_COUNT, MAX_COUNT, ((name, MAX_COUNT),)),),
        ),
    ]
    for message in messages:
        assert decode(encode(message)) == message


@pytest.mark.parametrize("kind", sorted(RECEIPT_KINDS))
def test_receipt_kinds(kind: str) -> None:
    code = "not_online" if kind == w.ERROR else ""
    receipt = attrs.evolve(RECEIPT, kind=kind, code=code)
    assert decode(encode(receipt)) == receipt


def test_link_states_are_normalised() -> None:
    """Links come out sorted by neighbour, and a cost of 0 counts as 1 (costs are > 0)."""
    wire = {"t": "gossip", "ls": [["a", 1, 2, [["c", 5], ["b", 0]]]]}
    (state,) = decode(cbor2.dumps(wire)).link_states  # type: ignore[union-attr]
    assert state == LinkState("a", 1, 2, (("b", 1), ("c", 5)))
    assert state.links == (("b", 1), ("c", 5))


def test_floats_of_any_cbor_width_are_accepted() -> None:
    """Floats of any CBOR width come out as Python floats; -0.0 and huge finite floats pass."""
    for data, expected in [
        (bytes.fromhex("f93c00"), 1.0),  # half precision
        (bytes.fromhex("fa3fc00000"), 1.5),  # single precision
        (bytes.fromhex("fb7fefffffffffffff"), 1.7976931348623157e308),
        (bytes.fromhex("fb8000000000000000"), -0.0),
    ]:
        wire = cbor2.dumps({k: v for k, v in w._to_wire(BCAST).items() if k != "data"})
        # Append the "data" entry by hand, with the float encoded as given.
        frame = bytes([wire[0] + 1]) + wire[1:] + cbor2.dumps("data") + data
        message = decode(frame)
        assert isinstance(message, RoomBroadcast)
        assert message.data == expected
        assert type(message.data) is float


# ---------------------------------------------------------------------------- rejections

Mutation = Callable[[dict[str, Any]], object]


def put(path: tuple[Any, ...], value: Any) -> Mutation:
    """Set the element at ``path`` (map keys and list indexes) to ``value``."""

    def mutate(wire: dict[str, Any]) -> None:
        target: Any = wire
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return mutate


def drop(path: tuple[Any, ...]) -> Mutation:
    """Remove the element at ``path``."""

    def mutate(wire: dict[str, Any]) -> None:
        target: Any = wire
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return mutate


def append(path: tuple[Any, ...], value: Any) -> Mutation:
    def mutate(wire: dict[str, Any]) -> None:
        target: Any = wire
        for step in path:
            target = target[step]
        target.append(value)

    return mutate


# Values that must never reach a client as JSON: each is rejected wherever data or meta is.
NOT_JSON: dict[str, Any] = {
    "bytes": b"x",
    "bytes nested": [1, {"a": b""}],
    "tag": cbor2.CBORTag(99, 1),
    "tag nested": {"a": [cbor2.CBORTag(4000, "x")]},
    "datetime tag": cbor2.CBORTag(1, 0),
    "set": {"a": frozenset({1})},
    "undefined": cbor2.undefined,
    "simple value": cbor2.CBORSimpleValue(16),
    "nan": math.nan,
    "inf": math.inf,
    "-inf nested": [[-math.inf]],
    "int key": {1: 2},
    "bool key nested": [{True: 1}],
    "null key": {None: 1},
    "tuple key": {(1, 2): 3},
    "int over JSON's 4300 digits": 2**14_001,
    "negative int over JSON's digits": -(2**14_001),
    "too deep": nested(MAX_DEPTH),
    "much too deep": nested(300),
    "too deep in a map": {"a": {"b": nested(MAX_DEPTH - 2)}},
}

BAD_NAMES: dict[str, Any] = {
    "empty": "",
    "too long": "n" * (MAX_NAME + 1),
    "int": 5,
    "bytes": b"eu",
    "null": None,
    "list": ["eu"],
    "bool": True,
}

BAD_COUNTS: dict[str, Any] = {
    "negative": -1,
    "true": True,
    "false": False,
    "float": 1.0,
    "string": "1",
    "2**63": 2**63,
    "null": None,
    "bignum": 2**100,
    "list": [1],
}

BAD_IDS: dict[str, Any] = {
    "empty": "",
    "too long": "i" * (MAX_ID + 1),
    "int": 5,
    "null": None,
    "bytes": b"id",
}


def cases() -> list[Any]:
    out: list[Any] = []

    def add(kind: str, label: str, mutation: Mutation) -> None:
        out.append(pytest.param(kind, mutation, id=f"{kind}-{label}"))

    # Names, counts and ids, wherever they are.
    names: dict[str, list[tuple[Any, ...]]] = {
        "hello": [("node",), ("region",)],
        "bcast": [("id",), ("room",), ("event",), ("user",), ("session",), ("region",)],
        "bye": [("node",)],
        "dm": [("o",), ("d",), ("from",), ("ses",), ("reg",), ("to",), ("grp",)],
        "rcpt": [("o",), ("d",), ("to",), ("reg",), ("from",)],
        "pull": [("o",), ("d",), ("user",)],
        "pulled": [("o",), ("d",)],
        "gossip": [
            ("hb", 0, 0),
            ("deltas", 0, 0),
            ("deltas", 0, 2),
            ("deltas", 0, 6, 0, 0),
            ("deltas", 0, 6, 0, 1),
            ("deltas", 0, 6, 0, 2),
            ("digest", 0, 0),
            ("links", 0),
            ("ls", 0, 0),
            ("ls", 0, 3, 0, 0),
        ],
    }
    counts: dict[str, list[tuple[Any, ...]]] = {
        "hello": [("inc",), ("v",)],
        "ping": [("id",)],
        "pong": [("id",)],
        "bye": [("inc",)],
        "dm": [("h",), ("seq",), ("prev",), ("at",), ("try",)],
        "rcpt": [("h",), ("try",)],
        "pull": [("h",), ("limit",)],
        "pulled": [("h",), ("sent",), ("left",)],
        "gossip": [
            ("hb", 0, 1),
            ("hb", 0, 2),
            ("hb", 0, 3),
            ("hbc", 0),
            ("hbc", 1),
            ("deltas", 0, 1),
            ("deltas", 0, 3),
            ("deltas", 0, 4),
            ("deltas", 0, 6, 0, 3),
            ("digest", 0, 1),
            ("digest", 0, 2),
            ("ls", 0, 1),
            ("ls", 0, 2),
            ("ls", 0, 3, 0, 1),
        ],
    }
    for kind, paths in names.items():
        for path in paths:
            for label, value in BAD_NAMES.items():
                where = ".".join(map(str, path))
                if path == ("grp",):  # the sample's group is empty: make one
                    add(kind, f"grp.1={label}", put(path, ["carol", value]))
                else:
                    add(kind, f"{where}={label}", put(path, value))
            if len(path) == 1 and path != ("grp",):
                add(kind, f"{path[0]}-missing", drop(path))
    for kind, paths in counts.items():
        for path in paths:
            for label, value in BAD_COUNTS.items():
                add(kind, f"{'.'.join(map(str, path))}={label}", put(path, value))
            if len(path) == 1:
                add(kind, f"{path[0]}-missing", drop(path))
    for kind in ("dm", "rcpt", "pull", "pulled"):
        for label, value in BAD_IDS.items():
            add(kind, f"id={label}", put(("id",), value))
        add(kind, "id-missing", drop(("id",)))
    for label, value in BAD_IDS.items():
        if label != "empty":  # "" means "pushed, not pulled"
            add("dm", f"pull={label}", put(("pull",), value))
    add("dm", "pull-missing", drop(("pull",)))

    # Data and metas: JSON only, not too deep.
    for label, value in NOT_JSON.items():
        add("bcast", f"data={label}", put(("data",), value))
        add("dm", f"data={label}", put(("data",), value))
        add("gossip", f"meta={label}", put(("deltas", 0, 6, 0, 4), {"m": value}))
        add("gossip", f"meta-key={label}", put(("deltas", 0, 6, 0, 4, "x"), value))
    for label, meta in {"list": [1], "string": "m", "int": 1, "true": True}.items():
        add("gossip", f"meta-not-a-map={label}", put(("deltas", 0, 6, 0, 4), meta))
    add("gossip", "meta-too-deep", put(("deltas", 0, 6, 0, 4), {"a": nested(MAX_DEPTH - 1)}))

    # Direct messages: group, reliability, destination.
    add("dm", "grp-too-many", put(("grp",), [f"u{i}" for i in range(MAX_GROUP + 1)]))
    for label, value in {"string": "bob", "null": None, "map": {"bob": 1}, "int": 3}.items():
        add("dm", f"grp-not-a-list={label}", put(("grp",), value))
    add("dm", "grp-missing", drop(("grp",)))
    for label, value in {"int": 1, "zero": 0, "string": "true", "null": None}.items():
        add("dm", f"rel={label}", put(("rel",), value))
    add("dm", "rel-missing", drop(("rel",)))

    # Receipts: kind and code.
    for label, value in {
        "unknown": "seen",
        "upper": "DELIVERED",
        "int": 1,
        "null": None,
        "list": ["delivered"],  # unhashable: must not leak a TypeError
        "map": {"delivered": 1},
    }.items():
        add("rcpt", f"kind={label}", put(("kind",), value))
    add("rcpt", "kind-missing", drop(("kind",)))
    for label, value in {"too long": "c" * 65, "int": 1, "null": None, "bytes": b""}.items():
        add("rcpt", f"code={label}", put(("code",), value))
    add("rcpt", "code-missing", drop(("code",)))

    # Gossip rows: shapes.
    for part, width in (("hb", 4), ("deltas", 7), ("digest", 3), ("ls", 4)):
        for label, value in {"map": {"a": 1}, "string": "x", "null": None, "int": 1}.items():
            add("gossip", f"{part}-not-a-list={label}", put((part,), value))
        add("gossip", f"{part}-row-not-a-list", put((part, 0), "row"))
        add("gossip", f"{part}-row-tuple-like-map", put((part, 0), {i: 0 for i in range(width)}))
        add("gossip", f"{part}-row-too-short", drop((part, 0, width - 1)))
        add("gossip", f"{part}-row-too-long", append((part, 0), 0))
    # Heartbeat clocks: a list, one per heartbeat row.
    for label, value in {"map": {"a": 1}, "string": "x", "null": None, "int": 1}.items():
        add("gossip", f"hbc-not-a-list={label}", put(("hbc",), value))
    add("gossip", "hbc-too-short", drop(("hbc", 1)))
    add("gossip", "hbc-too-long", append(("hbc",), 0))
    add("gossip", "hbc-without-hb", drop(("hb",)))
    add("gossip", "delta-full-int", put(("deltas", 0, 5), 0))
    add("gossip", "tick-not-a-boolean", put(("tk",), 1))
    add("gossip", "delta-full-null", put(("deltas", 0, 5), None))
    add("gossip", "delta-records-not-a-list", put(("deltas", 0, 6), {"a": 1}))
    add("gossip", "record-not-a-list", put(("deltas", 0, 6, 0), "r"))
    add("gossip", "record-too-short", drop(("deltas", 0, 6, 0, 4)))
    add("gossip", "record-too-long", append(("deltas", 0, 6, 0), None))
    for label, value in {"string": "us", "map": {"us": 1}, "null": None}.items():
        add("gossip", f"links-not-a-list={label}", put(("links",), value))
    add("gossip", "links-too-many", put(("links",), [f"n{i}" for i in range(10_001)]))
    for label, value in {"map": {"ap": 1}, "string": "ap", "null": None}.items():
        add("gossip", f"ls-links-not-a-list={label}", put(("ls", 0, 3), value))
    add("gossip", "ls-link-not-a-pair", put(("ls", 0, 3, 0), "ap"))
    add("gossip", "ls-link-too-short", drop(("ls", 0, 3, 0, 1)))
    add("gossip", "ls-link-too-long", append(("ls", 0, 3, 0), 1))
    add("gossip", "ls-too-many-links", put(("ls", 0, 3), [[f"n{i}", 1] for i in range(10_001)]))
    return out


@pytest.mark.parametrize(("kind", "mutation"), cases())
def test_malformed_field_is_rejected(kind: str, mutation: Mutation) -> None:
    wire = wire_of(SAMPLES[kind])
    assert decode(cbor2.dumps(wire)) == SAMPLES[kind]  # valid before the mutation
    mutation(wire)
    error = rejected(wire)
    assert type(error) is PeerProtocolError
    assert str(error)


@pytest.mark.parametrize(
    "kind", [None, "", "nope", "HELLO", "welcome", 1, True, b"dm", ["dm"], {"t": "dm"}]
)
def test_unknown_type_is_rejected(kind: Any) -> None:
    wire = wire_of(DIRECT)
    if kind is None:
        del wire["t"]
    else:
        wire["t"] = kind
    error = rejected(wire)
    if type(kind) is not list and type(kind) is not dict:
        assert "unknown peer message type" in str(error)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"\xa1",  # a map with its only entry missing
        b"\x9f\x01",  # an unterminated indefinite list
        b"\x7f\x61a",  # an unterminated indefinite string
        b"\x62\xff\xfe",  # a text string that is not UTF-8
        b"\x62\xed\xa0",  # an encoded surrogate
        b"\x9b" + b"\x7f" * 8,  # claims 2**63 elements
        b"\xc1\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # an infinite epoch datetime
        b"\xd8\x1d\x00",  # a reference to a shared value that was never marked
        b"\x81" * 100_000 + b"\x00",  # very deep nesting
        b"\xa1" + b"\x81" * 100_000,
    ],
)
def test_invalid_cbor_is_rejected(data: bytes) -> None:
    with pytest.raises(PeerProtocolError):
        decode(data)


@pytest.mark.parametrize(
    "value", [[], [{"t": "ping", "id": 1}], 1, "gossip", None, b"\xa0", cbor2.CBORTag(6, {})]
)
def test_a_message_must_be_a_map(value: Any) -> None:
    assert "must be a map" in str(rejected(value))


def test_shared_references_are_rejected() -> None:
    """The documentation says tags are rejected; tags 28/29 (value sharing) slip through.

    ``[[x, x], [x, x]]`` with each level shared: 3 levels here, but 30 levels is ~250 bytes
    that make `_json_value` visit 2**30 leaves, and every JSON or CBOR re-encoding of it
    (for clients, or relaying to peers) expands it in full.
    """
    levels = 3
    # Shareable values are numbered in the order they start: the outermost is 0, the
    # innermost (the integer 0) is ``levels``. Each level is shareable([inner, ref(inner)]).
    level = b"\xd8\x1c" + cbor2.dumps(0)
    for inner in range(levels, 0, -1):
        level = b"\xd8\x1c\x82" + level + b"\xd8\x1d" + cbor2.dumps(inner)
    assert cbor2.loads(level) == [[[0, 0], [0, 0]], [[0, 0], [0, 0]]]
    prefix = cbor2.dumps({k: v for k, v in w._to_wire(BCAST).items() if k != "data"})
    frame = bytes([prefix[0] + 1]) + prefix[1:] + cbor2.dumps("data") + level
    with pytest.raises(PeerProtocolError):
        decode(frame)


# ---------------------------------------------------------------------------- properties

names = st.text(min_size=1, max_size=MAX_NAME)
short_names = st.text(min_size=1, max_size=12)
ids = st.text(min_size=1, max_size=MAX_ID)
counts = st.integers(0, MAX_COUNT)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
metas = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
replicas = st.builds(ReplicaId, short_names | names, counts)
# Ages travel in whole milliseconds: generate them that way so equality is exact.
beats = st.builds(Beat, replicas, counts, st.integers(0, 10**12).map(lambda ms: ms / 1000), counts)
records = st.tuples(st.tuples(short_names, short_names, short_names), counts, st.none() | metas)
deltas = st.builds(
    Delta,
    replicas,
    short_names,
    counts,
    counts,
    st.lists(records, max_size=3).map(tuple),
    st.booleans(),
)
link_states = st.builds(
    LinkState,
    short_names | names,
    counts,
    counts,
    st.dictionaries(short_names, st.integers(1, MAX_COUNT), max_size=4).map(
        lambda links: tuple(sorted(links.items()))
    ),
)
gossips = st.builds(
    Gossip,
    st.lists(beats, max_size=3).map(tuple),
    st.lists(deltas, max_size=2).map(tuple),
    st.none() | st.dictionaries(replicas, counts, max_size=3),
    st.none() | st.lists(short_names, max_size=4).map(tuple),
    st.lists(link_states, max_size=2).map(tuple),
    st.booleans(),
)
directs = st.builds(
    Direct,
    ids,
    names,
    names,
    counts,
    names,
    names,
    names,
    names,
    st.lists(short_names | names, max_size=MAX_GROUP).map(tuple),
    json_values,
    st.booleans(),
    counts,
    counts,
    counts,
    counts,
    st.just("") | ids,
)
receipts = st.builds(
    Receipt,
    ids,
    names,
    names,
    counts,
    st.sampled_from(sorted(RECEIPT_KINDS)),
    names,
    names,
    st.just("") | st.text(min_size=1, max_size=64),
    names,
    counts,
)
messages: st.SearchStrategy[PeerMessage] = st.one_of(
    st.builds(Hello, names, names, counts, counts),
    gossips,
    st.builds(RoomBroadcast, names, names, names, json_values, names, names, names),
    st.builds(PeerPing, counts),
    st.builds(PeerPong, counts),
    st.builds(Bye, replicas),
    directs,
    receipts,
    st.builds(Pull, ids, names, names, counts, names, counts),
    st.builds(Pulled, ids, names, names, counts, counts, counts),
)


@given(messages)
@settings(max_examples=200, deadline=None)
def test_round_trip(message: PeerMessage) -> None:
    assert decode(encode(message)) == message


PEER_TYPES = (Hello, Gossip, RoomBroadcast, PeerPing, PeerPong, Bye, Direct, Receipt, Pull, Pulled)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_raise_only_peer_protocol_error(data: bytes) -> None:
    try:
        message = decode(data)
    except PeerProtocolError:
        return
    assert type(message) in PEER_TYPES  # e.g. b"\xa1at" + ... happens to be valid


# Any CBOR value at all, including what JSON cannot carry.
hashable_cbor = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=4)
)
wild_scalars = (
    hashable_cbor
    | st.sampled_from(
        [
            0,
            -1,
            MAX_COUNT,
            2**63,
            2**64,
            "",
            "n" * (MAX_NAME + 1),
            cbor2.undefined,
            cbor2.CBORSimpleValue(16),
        ]
    )
    | st.builds(cbor2.CBORTag, st.integers(4000, 2**32), st.integers() | st.text(max_size=3))
)
wild_values = st.recursive(
    wild_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(hashable_cbor, children, max_size=3)
    ),
    max_leaves=8,
)


def locations(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every map entry and list element inside ``value``, except the message type."""
    out: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if path or key != "t":
                out.append((*path, key))
                out.extend(locations(item, (*path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.append((*path, index))
            out.extend(locations(item, (*path, index)))
    return out


@given(messages, st.data())
@settings(max_examples=200, deadline=None)
def test_mutated_field_decodes_to_same_type_or_is_rejected(
    message: PeerMessage, data: st.DataObject
) -> None:
    wire: dict[Any, Any] = wire_of(message)
    where = locations(wire)
    action = data.draw(st.sampled_from(["replace", "drop", "add"] if where else ["add"]))
    if action == "add":
        wire[data.draw(hashable_cbor.filter(lambda key: key != "t"))] = data.draw(wild_values)
    elif action == "drop":
        drop(data.draw(st.sampled_from(where)))(wire)
    else:
        put(data.draw(st.sampled_from(where)), data.draw(wild_values))(wire)
    try:
        result = decode(cbor2.dumps(wire))
    except PeerProtocolError:
        return
    assert type(result) is type(message)
    # Whatever was accepted can be encoded and relayed again. (Beat ages are rounded to whole
    # milliseconds on the way back, so compare the rest.)
    if isinstance(result, Gossip):
        result = attrs.evolve(result, beats=())
    assert decode(encode(result)) == result


# ---------------------------------------------------------------------------- client -> peer
# What a client frame may carry (meta, broadcast data, direct message data) is relayed to peers
# as it is: the peer codec must accept everything the client codec accepts, or one client frame
# closes peer links (a presence meta is resent with every full delta, so they stay broken).


def relayed(frame: dict[str, Any]) -> list[PeerMessage]:
    """The peer messages that carry what ``frame`` (accepted by the client codec) holds."""
    message = protocol.decode_client_frame(protocol.encode(frame), Limits())
    if isinstance(message, protocol.Broadcast):
        return [RoomBroadcast("b1", message.room, message.event, message.data, "ann", "s", "eu")]
    if isinstance(message, protocol.Send):
        return [attrs.evolve(DIRECT, to=to, data=message.data) for to in message.to]
    assert isinstance(message, protocol.Join | protocol.Update)
    record = ((message.room, "ann", "s"), 1, message.meta)
    return [Gossip(deltas=(Delta(EU, "eu", 0, 1, (record,), True),))]


def nested_maps(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value


CLIENT_DEPTH = protocol.MAX_JSON_DEPTH - 1  # the frame object itself is the first level


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "broadcast", "room": "r", "event": "e", "data": nested(CLIENT_DEPTH)},
        {"type": "broadcast", "room": "r", "event": "e", "data": {"f": [0.1, -0.0, 1e308]}},
        {"type": "send", "to": ["bob", "carol"], "data": nested(CLIENT_DEPTH)},
        {"type": "send", "to": "bob", "data": nested_maps(CLIENT_DEPTH)},
        {"type": "join", "room": "r", "meta": nested_maps(CLIENT_DEPTH)},
        {"type": "update", "room": "r", "meta": {"a": nested(CLIENT_DEPTH - 1, None)}},
        {"type": "join", "room": "r", "meta": {"max": 2**64 - 1, "min": -(2**63)}},
    ],
)
def test_what_clients_may_send_survives_the_peer_wire(frame: dict[str, Any]) -> None:
    for message in relayed(frame):
        assert decode(encode(message)) == message


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "broadcast", "room": "r", "event": "e", "data": 2**64},
        {"type": "send", "to": "bob", "data": {"n": -(2**63) - 1}},
        {"type": "join", "room": "r", "meta": {"n": 10**30}},
    ],
)
def test_client_integers_of_any_size_survive_the_peer_wire(frame: dict[str, Any]) -> None:
    for message in relayed(frame):
        assert decode(encode(message)) == message


client_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=8,
)
deep_client_values = st.builds(
    lambda value, lists, maps: nested(lists, nested_maps(maps) if maps else value),
    client_values,
    st.integers(0, protocol.MAX_JSON_DEPTH + 1),
    st.integers(0, 3),
)


@given(
    st.sampled_from(["broadcast", "send", "join", "update"]),
    deep_client_values,
    st.lists(st.text("abcé", min_size=1, max_size=3), min_size=1, max_size=3, unique=True),
)
@settings(max_examples=100, deadline=None)
def test_client_accepted_values_survive_the_peer_wire(
    kind: str, value: Any, recipients: list[str]
) -> None:
    meta = value if type(value) is dict else {"v": value}
    frame = {"type": kind, "room": "r", "event": "e", "to": recipients, "data": value, "meta": meta}
    try:
        messages = relayed(frame)
    except protocol.ProtocolError:
        return  # too deep or too large for a client: never relayed
    for message in messages:
        assert decode(encode(message)) == message
