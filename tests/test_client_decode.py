"""Tests for the strict decoding of client frames (`presenced.core.client_decode`).

The decoder is the daemon's first line of defence against untrusted clients, so besides the
unit tests for each message and error, hypothesis checks the one promise the connection loop
relies on: whatever arrives, decoding either yields a valid message or raises `ProtocolError`,
and everything it accepts can be re-encoded for other clients.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from json_strategies import json_values

from presenced.core import client_decode as d
from presenced.core import client_frames as f
from presenced.core import client_wire as w
from presenced.core.client_decode import decode_client_frame
from presenced.core.client_wire import (
    Broadcast,
    ClientMessage,
    Hello,
    Join,
    Leave,
    Ping,
    ProtocolError,
    Update,
)
from presenced.core.limits import Limits

LIMITS = Limits()
ALL_TYPES = ("hello", "join", "update", "leave", "broadcast", "ping")


def dec(frame: Any, limits: Limits = LIMITS) -> ClientMessage:
    """Decode a dict (serialised here) or a raw str/bytes frame."""
    if isinstance(frame, dict):
        frame = json.dumps(frame)
    return decode_client_frame(frame, limits)


def err(frame: Any, limits: Limits = LIMITS) -> ProtocolError:
    """Decode a frame that must be rejected, and return the error."""
    with pytest.raises(ProtocolError) as info:
        dec(frame, limits)
    return info.value


def assert_err(frame: Any, code: str, ref: w.Ref = None, limits: Limits = LIMITS) -> None:
    e = err(frame, limits)
    assert (e.code, e.ref) == (code, ref), e


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


# ------------------------------------------------------------------------------------------
# Hello
# ------------------------------------------------------------------------------------------


def test_hello_token() -> None:
    assert dec({"type": "hello", "token": "a.b.c"}) == Hello(None, "a.b.c", None, None, 1)


def test_hello_anonymous_and_all_fields() -> None:
    frame = {"type": "hello", "ref": "h1", "user": "ann", "client": "vhq/0.1", "v": 1}
    assert dec(frame) == Hello("h1", None, "ann", "vhq/0.1", 1)
    assert dec({"type": "hello"}) == Hello(None)
    # Null is the same as absent for optional fields.
    nulls = {"type": "hello", "token": None, "user": None, "client": None, "v": None}
    assert dec(nulls) == Hello(None)


def test_hello_version() -> None:
    assert_err({"type": "hello", "ref": 1, "v": 2}, w.UNSUPPORTED_VERSION, 1)
    assert_err({"type": "hello", "v": 0}, w.UNSUPPORTED_VERSION)
    for bad in ("1", 1.0, True, [1]):
        assert_err({"type": "hello", "ref": 1, "v": bad}, w.BAD_REQUEST, 1)


@pytest.mark.parametrize("token", [5, ["a"], "tökén", True])
def test_hello_bad_token(token: Any) -> None:
    assert_err({"type": "hello", "ref": "r", "token": token}, w.BAD_REQUEST, "r")


def test_hello_empty_token_is_a_token_the_rules_refuse() -> None:
    # Not a bad request: an empty token is a bad token (unauthorized, close 1008).
    hello = decode_client_frame('{"type": "hello", "ref": "r", "token": ""}', LIMITS)
    assert hello == w.Hello("r", token="")


def test_refresh() -> None:
    frame = '{"type": "refresh", "ref": 4, "token": "a.b.c"}'
    assert decode_client_frame(frame, LIMITS) == w.Refresh(4, "a.b.c")
    assert w.to_wire(w.Refresh(4, "a.b.c")) == {"type": "refresh", "ref": 4, "token": "a.b.c"}
    for bad in (None, 5, "tökén"):
        assert_err({"type": "refresh", "ref": 4, "token": bad}, w.BAD_REQUEST, 4)


@pytest.mark.parametrize("user", ["", "x" * 129, "a\nb", "a\x00", "a\x7f", "a\x85", 3, {}])
def test_hello_bad_user(user: Any) -> None:
    assert_err({"type": "hello", "ref": 2, "user": user}, w.BAD_REQUEST, 2)


def test_hello_user_length_limit() -> None:
    assert dec({"type": "hello", "user": "x" * 128}) == Hello(None, user="x" * 128)
    small = Limits(max_user_id=3)
    assert dec({"type": "hello", "user": "abc"}, small) == Hello(None, user="abc")
    assert_err({"type": "hello", "user": "abcd"}, w.BAD_REQUEST, limits=small)


@pytest.mark.parametrize("client", ["x" * 65, 1, "a\tb"])
def test_hello_bad_client(client: Any) -> None:
    assert_err({"type": "hello", "client": client}, w.BAD_REQUEST)


def test_hello_client_free_text() -> None:
    assert dec({"type": "hello", "client": "x" * 64}).client == "x" * 64  # type: ignore[union-attr]
    assert dec({"type": "hello", "client": ""}) == Hello(None, client="")


def test_hello_resume() -> None:
    frame = {"type": "hello", "user": "ann", "resume": "s1.mac"}
    assert dec(frame) == Hello(None, user="ann", resume="s1.mac")
    assert dec({"type": "hello", "resume": "x" * 128}).resume == "x" * 128  # type: ignore[union-attr]


@pytest.mark.parametrize("resume", ["", "x" * 129, "s1.m\nac", "tök.en", 5, ["a"], True])
def test_hello_bad_resume(resume: Any) -> None:
    assert_err({"type": "hello", "ref": 3, "resume": resume}, w.BAD_REQUEST, 3)


# ------------------------------------------------------------------------------------------
# Join / Update / Leave: rooms and meta
# ------------------------------------------------------------------------------------------


def test_join() -> None:
    assert dec({"type": "join", "room": "doc:1"}) == Join(None, "doc:1", {})
    assert dec({"type": "join", "room": "doc:1", "meta": None}) == Join(None, "doc:1", {})
    frame = {"type": "join", "ref": 3, "room": "d", "meta": {"name": "Ann", "c": [1, 2.5]}}
    assert dec(frame) == Join(3, "d", {"name": "Ann", "c": [1, 2.5]})


@pytest.mark.parametrize(
    "room",
    ["", "r" * 129, "a\x00b", "a\x1f", "\x7f", "a\x9f", "tab\there", 5, None, ["r"], True],
)
@pytest.mark.parametrize("kind", ["join", "update", "leave", "broadcast"])
def test_bad_room(kind: str, room: Any) -> None:
    frame = {"type": kind, "ref": "x", "room": room, "meta": {}, "event": "e"}
    assert_err(frame, w.BAD_REQUEST, "x")


def test_missing_room() -> None:
    e = err({"type": "leave", "ref": 1})
    assert (e.code, e.ref) == (w.BAD_REQUEST, 1)
    assert "'room'" in e.message


@pytest.mark.parametrize("room", ["r" * 128, "a b", "caf\u00e9", "\U0001f600", "a\u00a0b", "é/x"])
def test_good_room(room: str) -> None:
    assert dec({"type": "leave", "room": room}) == Leave(None, room)


def test_room_length_follows_limits() -> None:
    small = Limits(max_room_name=4)
    assert dec({"type": "leave", "room": "abcd"}, small) == Leave(None, "abcd")
    assert_err({"type": "leave", "room": "abcde"}, w.BAD_REQUEST, limits=small)


@pytest.mark.parametrize("meta", [[], "x", 1, True, [{"a": 1}]])
@pytest.mark.parametrize("kind", ["join", "update"])
def test_meta_must_be_object(kind: str, meta: Any) -> None:
    assert_err({"type": kind, "ref": 9, "room": "r", "meta": meta}, w.BAD_REQUEST, 9)


def test_update() -> None:
    frame = {"type": "update", "ref": 4, "room": "r", "meta": {"x": 1, "gone": None}}
    assert dec(frame) == Update(4, "r", {"x": 1, "gone": None})
    assert dec({"type": "update", "room": "r", "meta": {}}) == Update(None, "r", {})
    # The patch is required: an update without meta says nothing.
    assert_err({"type": "update", "ref": 4, "room": "r"}, w.BAD_REQUEST, 4)
    assert_err({"type": "update", "room": "r", "meta": None}, w.BAD_REQUEST)


def _meta_of_size(n: int) -> dict[str, Any]:
    meta = {"k": "x" * (n - len('{"k":""}'))}
    assert w.meta_size(meta) == n
    return meta


@pytest.mark.parametrize("kind", ["join", "update"])
def test_meta_size_limit(kind: str) -> None:
    limit = LIMITS.max_meta_bytes
    ok = {"type": kind, "ref": 1, "room": "r", "meta": _meta_of_size(limit)}
    assert dec(ok).meta == ok["meta"]  # type: ignore[union-attr]
    big = {"type": kind, "ref": 1, "room": "r", "meta": _meta_of_size(limit + 1)}
    e = err(big)
    assert (e.code, e.ref) == (w.TOO_LARGE, 1)
    assert "'meta'" in e.message


def test_meta_size_ignores_the_clients_whitespace_and_escapes() -> None:
    limits = Limits(max_meta_bytes=len('{"n":"ééé"}'.encode()))
    frame = '{"type":"join", "room":"r",  "meta": { "n" : "\\u00e9\\u00e9\\u00e9" } }'
    assert dec(frame, limits) == Join(None, "r", {"n": "ééé"})


def test_meta_float_growth_is_measured() -> None:
    # "1e15" re-encodes as "1000000000000000.0": the limit applies to the re-encoding.
    meta_text = '{"a":1e15}'
    meta = json.loads(meta_text)
    size = w.meta_size(meta)
    assert size > len(meta_text)
    frame = '{"type":"update","room":"r","meta":' + meta_text + "}"
    assert dec(frame, Limits(max_meta_bytes=size)) == Update(None, "r", meta)
    assert_err(frame, w.TOO_LARGE, limits=Limits(max_meta_bytes=size - 1))


def test_leave() -> None:
    assert dec({"type": "leave", "ref": "l", "room": "r"}) == Leave("l", "r")


# ------------------------------------------------------------------------------------------
# Broadcast / Ping
# ------------------------------------------------------------------------------------------


def test_broadcast() -> None:
    assert dec({"type": "broadcast", "room": "r", "event": "e"}) == Broadcast(
        None, "r", "e", None, False
    )
    frame = {"type": "broadcast", "ref": 1, "room": "r", "event": "cursor", "data": [1, {}]}
    assert dec({**frame, "echo": True}) == Broadcast(1, "r", "cursor", [1, {}], True)
    assert dec({**frame, "echo": None}).echo is False  # type: ignore[union-attr]
    for data in (0, "s", 1.5, True, {"a": [None]}):
        assert dec({**frame, "data": data}).data == data  # type: ignore[union-attr]
    assert dec({**frame, "event": "e" * 64}).event == "e" * 64  # type: ignore[union-attr]


@pytest.mark.parametrize("event", [None, "", "e" * 65, 3, "a\nb"])
def test_broadcast_bad_event(event: Any) -> None:
    assert_err({"type": "broadcast", "ref": 5, "room": "r", "event": event}, w.BAD_REQUEST, 5)


@pytest.mark.parametrize("echo", [1, 0, "true", []])
def test_broadcast_bad_echo(echo: Any) -> None:
    frame = {"type": "broadcast", "ref": 5, "room": "r", "event": "e", "echo": echo}
    assert_err(frame, w.BAD_REQUEST, 5)


def test_ping() -> None:
    assert dec({"type": "ping"}) == Ping(None, None)
    assert dec({"type": "ping", "ref": 1, "t": 12}) == Ping(1, 12)
    assert dec({"type": "ping", "t": 1.5e12}) == Ping(None, 1.5e12)
    bad_ts: tuple[Any, ...] = (True, "1", [1], {})
    for bad in bad_ts:
        assert_err({"type": "ping", "ref": 2, "t": bad}, w.BAD_REQUEST, 2)


# ------------------------------------------------------------------------------------------
# Frame level: JSON, type, ref, size, binary
# ------------------------------------------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    frame = {"type": "leave", "room": "r", "future": {"x": [1]}, "also": None}
    assert dec(frame) == Leave(None, "r")


@pytest.mark.parametrize(
    "frame",
    [
        "",
        "{",
        "nope",
        '{"type":"ping"} extra',
        "[]",
        "1",
        '"ping"',
        "null",
        '{"type":"ping","t":NaN}',
        '{"type":"ping","t":Infinity}',
        '{"type":"ping","t":-Infinity}',
        '{"type":"ping","t":1e999}',
        '{"type":"ping","t":-1e400}',
        '{"type":"ping","t":' + "9" * 5000 + "}",
        "[" * 10_000 + "]" * 10_000,
        '{"a":' + "[" * 5000 + "]" * 5000 + "}",
        '\ufeff{"type":"ping"}',
        '{"type":"ping","x":"raw\ncontrol"}',
        "{'type':'ping'}",
    ],
)
def test_bad_json(frame: str) -> None:
    assert_err(frame, w.BAD_REQUEST, limits=Limits(max_frame_bytes=100_000))


@pytest.mark.parametrize("kind", [None, 1, "", "PING", "welcome", ["ping"], {"a": 1}, True])
def test_bad_type_echoes_ref(kind: Any) -> None:
    frame: dict[str, Any] = {"ref": "abc", "room": "r"}
    if kind is not None:
        frame["type"] = kind
    e = err(frame)
    assert (e.code, e.ref) == (w.BAD_REQUEST, "abc")
    assert "'type'" in e.message


@pytest.mark.parametrize("ref", ["", "r" * 64, 0, -1, 2**53 - 1, -(2**53 - 1)])
def test_good_ref(ref: Any) -> None:
    assert dec({"type": "ping", "ref": ref}) == Ping(ref)
    # ...and it is echoed in errors.
    assert_err({"type": "nope", "ref": ref}, w.BAD_REQUEST, ref)


@pytest.mark.parametrize("ref", ["r" * 65, 2**53, -(2**53), 1.0, 1.5, True, False, [], {}])
def test_bad_ref_is_not_echoed(ref: Any) -> None:
    e = err({"type": "ping", "ref": ref})
    assert (e.code, e.ref) == (w.BAD_REQUEST, None)
    assert "'ref'" in e.message


def test_null_ref_is_absent() -> None:
    assert dec({"type": "ping", "ref": None}) == Ping(None)


def test_nesting_limit() -> None:
    def nested(levels: int) -> Any:
        value: Any = 1
        for _ in range(levels):
            value = [value]
        return value

    # The frame object is level 1, so data may hold MAX_JSON_DEPTH - 1 more levels.
    ok = {"type": "broadcast", "ref": 1, "room": "r", "event": "e"}
    assert dec({**ok, "data": nested(w.MAX_JSON_DEPTH - 1)})
    assert_err({**ok, "data": nested(w.MAX_JSON_DEPTH)}, w.BAD_REQUEST, 1)
    # Even ignored fields count: depth is checked for the whole frame.
    assert_err({"type": "ping", "ref": 2, "x": nested(40)}, w.BAD_REQUEST, 2)
    # Many brackets that are not nesting (or are inside strings) are fine.
    assert dec({"type": "ping", "x": [[]] * 100, "s": "[{" * 100})


def test_frame_size_limit_text() -> None:
    limits = Limits(max_frame_bytes=100)
    base = '{"type":"ping","x":""}'
    exact = base[:-2] + "x" * (100 - len(base)) + base[-2:]
    assert len(exact) == 100
    assert dec(exact, limits) == Ping(None)
    assert_err(exact[:-2] + "x" + exact[-2:], w.TOO_LARGE, limits=limits)


def test_frame_size_limit_counts_utf8_bytes() -> None:
    limits = Limits(max_frame_bytes=100)
    base = '{"type":"ping","x":""}'
    # 26 three-byte characters: 48 characters but 100 bytes, then 101 bytes.
    exact = base[:-2] + "€" * 26 + base[-2:]
    assert len(exact.encode()) == 100
    assert dec(exact, limits) == Ping(None)
    over = base[:-2] + "€" * 26 + "x" + base[-2:]
    assert len(over) < 100
    assert_err(over, w.TOO_LARGE, limits=limits)
    assert_err(over.encode(), w.TOO_LARGE, limits=limits)


def test_binary_frames() -> None:
    frame = json.dumps({"type": "join", "ref": 1, "room": "café", "meta": {"n": "é"}})
    assert dec(frame.encode()) == Join(1, "café", {"n": "é"})
    assert dec(bytearray(frame.encode())) == Join(1, "café", {"n": "é"})
    assert_err(b'{"type":"ping","x":"\xff"}', w.BAD_REQUEST)
    assert_err(b'{"type":"ping","x":"\xed\xa0\x80"}', w.BAD_REQUEST)  # encoded surrogate
    # Only UTF-8: json.loads alone would accept UTF-16.
    assert_err('{"type":"ping"}'.encode("utf-16"), w.BAD_REQUEST)
    assert_err(b"", w.BAD_REQUEST)
    assert_err(b"x" * (LIMITS.max_frame_bytes + 1), w.TOO_LARGE)


@pytest.mark.parametrize("frame", [None, 1, 1.5, ["x"], memoryview(b"{}")])
def test_non_frame_input(frame: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(frame, LIMITS)
    assert info.value.code == w.BAD_REQUEST


# ------------------------------------------------------------------------------------------
# Unpaired surrogates: legal in JSON escapes and Python str, not encodable as UTF-8
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"join","ref":1,"room":"\\ud800"}',
        '{"type":"join","ref":1,"room":"r","meta":{"a":"\\udfff"}}',
        '{"type":"join","ref":1,"room":"r","meta":{"\\ud800":1}}',
        '{"type":"update","ref":1,"room":"r","meta":{"a":["\\ud83d"]}}',
        '{"type":"broadcast","ref":1,"room":"r","event":"e","data":"\\ude00"}',
        '{"type":"broadcast","ref":1,"room":"r","event":"e","data":{"\\ud800":1}}',
        '{"type":"broadcast","ref":1,"room":"r","event":"\\ud800"}',
        '{"type":"hello","ref":1,"user":"\\ud800"}',
        '{"type":"hello","ref":1,"client":"\\ud800"}',
        '{"type":"hello","ref":1,"token":"\\ud800"}',
    ],
)
def test_unpaired_surrogates_rejected(frame: str) -> None:
    assert_err(frame, w.BAD_REQUEST, 1)


def test_surrogate_ref_rejected_and_not_echoed() -> None:
    assert_err('{"type":"ping","ref":"\\ud800"}', w.BAD_REQUEST, None)


def test_raw_surrogate_in_text_rejected() -> None:
    assert_err('{"type":"ping","x":"\ud800"}', w.BAD_REQUEST)


def test_escaped_surrogate_pairs_are_fine() -> None:
    frame = '{"type":"join","room":"\\ud83d\\ude00","meta":{"e":"\\ud83d\\ude00"}}'
    assert dec(frame) == Join(None, "\U0001f600", {"e": "\U0001f600"})
    frame = '{"type":"broadcast","room":"r","event":"e","data":["\\ud83d\\ude00"]}'
    assert dec(frame) == Broadcast(None, "r", "e", ["\U0001f600"])


# ------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------

# For fuzzing: also NaN/Infinity (json.dumps writes them) and unpaired surrogates.
any_text = st.text(st.characters(exclude_categories=()))
wild_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
wild_values = st.recursive(
    wild_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ("ref", "token", "user", "client", "v", "room", "meta", "event", "data", "echo", "t")
SMALL_LIMITS = Limits(max_frame_bytes=1024, max_meta_bytes=64, max_room_name=8, max_user_id=8)


def check_decode(frame: str | bytes, limits: Limits = LIMITS) -> None:
    """Decode; only ProtocolError may escape, and whatever comes out must re-encode."""
    try:
        msg = decode_client_frame(frame, limits)
    except ProtocolError as e:
        assert e.code in w.ERROR_CODES
        assert e.code != w.INTERNAL
        assert e.ref is None or isinstance(e.ref, str | int)
        # The error frame answering it can always be sent.
        w.encode(f.error_from(e)).encode("utf-8")
        return
    assert isinstance(msg, Hello | Join | Update | Leave | Broadcast | Ping)
    # Everything accepted can be relayed: encodable as strict UTF-8 JSON, inside the limits.
    w.encode(w.to_wire(msg)).encode("utf-8")
    if isinstance(msg, Join | Update):
        assert w.meta_size(msg.meta) <= limits.max_meta_bytes
    assert json.loads(w.encode(w.to_wire(msg)), parse_constant=pytest.fail) is not None


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_fuzz_bytes(frame: bytes) -> None:
    check_decode(frame, SMALL_LIMITS)
    check_decode(frame)


@given(any_text)
@settings(max_examples=300)
def test_fuzz_text(frame: str) -> None:
    check_decode(frame, SMALL_LIMITS)
    check_decode(frame)


@given(wild_values, st.booleans())
@settings(max_examples=300)
def test_fuzz_json_values(value: Any, ascii_only: bool) -> None:
    frame = json.dumps(value, ensure_ascii=ascii_only)
    check_decode(frame, SMALL_LIMITS)
    check_decode(frame)
    if ascii_only:
        check_decode(frame.encode())


# Per field, values that are often valid (so decoding gets past the earlier checks), and
# anything at all, including unpaired surrogates, NaN and deep nesting.
short_text = st.text(st.characters(exclude_categories=()), max_size=10)
small_values = st.recursive(wild_scalars, lambda c: st.lists(c, max_size=3), max_leaves=4)
plausible: dict[str, st.SearchStrategy[Any]] = {
    "ref": st.integers(-(2**54), 2**54) | st.text(max_size=70),
    "token": short_text,
    "user": short_text,
    "client": short_text,
    "v": st.integers(-1, 3),
    "room": short_text,
    "meta": st.dictionaries(short_text, small_values, max_size=5),
    "event": short_text,
    "data": small_values,
    "echo": st.booleans(),
    "t": st.integers() | st.floats(),
}
typed_fields = st.fixed_dictionaries(
    {name: plausible[name] for name in ("room", "meta", "event")},
    optional={name: plausible[name] for name in FIELDS if name not in ("room", "meta", "event")},
) | st.fixed_dictionaries({}, optional={name: plausible[name] | wild_values for name in FIELDS})


@given(
    st.sampled_from(ALL_TYPES),
    typed_fields,
    st.dictionaries(any_text, wild_values, max_size=3),
    st.booleans(),
)
@settings(max_examples=1000)
def test_fuzz_typed_objects(
    kind: str, fields: dict[str, Any], extra: dict[str, Any], ascii_only: bool
) -> None:
    frame = json.dumps({**extra, **fields, "type": kind}, ensure_ascii=ascii_only)
    check_decode(frame, SMALL_LIMITS)
    check_decode(frame)


# Round trip: valid messages, written by a client-side encoder independent of the module.

ROUNDTRIP_LIMITS = Limits(max_frame_bytes=1 << 20, max_meta_bytes=1 << 18)
names = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=128)
refs = st.none() | st.text(max_size=64) | st.integers(-w.MAX_REF, w.MAX_REF)
metas = st.dictionaries(st.text(), json_values, max_size=6)
messages: st.SearchStrategy[ClientMessage] = st.one_of(
    st.builds(
        Hello,
        refs,
        st.none() | st.text(st.characters(codec="ascii"), min_size=1),
        st.none() | names,
        st.none() | st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=64),
        st.just(1),
    ),
    st.builds(Join, refs, names, metas),
    st.builds(Update, refs, names, metas),
    st.builds(Leave, refs, names),
    st.builds(
        Broadcast, refs, names, names.filter(lambda s: len(s) <= 64), json_values, st.booleans()
    ),
    st.builds(
        Ping, refs, st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    ),
)


def client_encode(msg: ClientMessage) -> dict[str, Any]:
    """What a client library would send: every field spelled out, nothing left to defaults."""
    if isinstance(msg, Hello):
        body: dict[str, Any] = {"token": msg.token, "user": msg.user, "client": msg.client}
        body["v"] = msg.version
        body = {"type": "hello", **body}
    elif isinstance(msg, Join):
        body = {"type": "join", "room": msg.room, "meta": msg.meta}
    elif isinstance(msg, Update):
        body = {"type": "update", "room": msg.room, "meta": msg.meta}
    elif isinstance(msg, Leave):
        body = {"type": "leave", "room": msg.room}
    elif isinstance(msg, Broadcast):
        body = {"type": "broadcast", "room": msg.room, "event": msg.event}
        body.update(data=msg.data, echo=msg.echo)
    else:
        body = {"type": "ping", "t": msg.t}
    if msg.ref is not None:
        body["ref"] = msg.ref
    return body


@given(messages, st.booleans(), st.booleans())
@settings(max_examples=500)
def test_round_trip(msg: ClientMessage, ascii_only: bool, binary: bool) -> None:
    assume(depth(client_encode(msg)) <= w.MAX_JSON_DEPTH)
    text = json.dumps(client_encode(msg), ensure_ascii=ascii_only)
    frame: str | bytes = text.encode() if binary else text
    assert decode_client_frame(frame, ROUNDTRIP_LIMITS) == msg
    # The module's own minimal client encoding decodes to the same message.
    assert decode_client_frame(w.encode(w.to_wire(msg)), ROUNDTRIP_LIMITS) == msg


# The meta size check is skipped for frames too small to hold oversized meta; this checks that
# shortcut against the definition, with numbers written in the forms that grow the most.
number_literals = st.builds(
    lambda sign, mantissa, exp_char, exp_sign, exp: f"{sign}{mantissa}{exp_char}{exp_sign}{exp}",
    st.sampled_from(["", "-"]),
    st.sampled_from(["0", "1", "9", "1.5", "0.1", "12345"]),
    st.sampled_from(["e", "E"]),
    st.sampled_from(["", "+", "-"]),
    st.integers(0, 30),
)
meta_value_texts = (
    number_literals
    | st.sampled_from(['"\\u00e9"', '"\\/"', "true", "[]", "1"])
    # Arrays of floats grow the most: "1e15," -> "1000000000000000.0,".
    | st.lists(number_literals, max_size=150).map(lambda items: "[" + ",".join(items) + "]")
    | st.lists(st.sampled_from(["1e15", "9E15", "-1e15", "1e14"]), min_size=1, max_size=150).map(
        lambda items: "[" + ",".join(items) + "]"
    )
)
meta_texts = st.dictionaries(st.text(max_size=3), meta_value_texts, max_size=8).map(
    lambda d: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in d.items()) + "}"
)


WORST_GROWTH_META = '{"":[' + ",".join(["1e15"] * 100) + "]}"


@given(meta_texts, st.integers(-3, 3), st.sampled_from(["update", "join"]))
@example(WORST_GROWTH_META, -1, "update")
@example(WORST_GROWTH_META, 0, "join")
@settings(max_examples=500)
def test_meta_limit_matches_definition(meta_text: str, slack: int, kind: str) -> None:
    """Right at the limit, the decision is the definition's, whichever path decode takes."""
    meta = json.loads(meta_text)
    frame = f'{{"type":"{kind}","room":"r","meta":{meta_text}}}'
    limit = max(1, w.meta_size(meta) + slack)
    limits = Limits(max_meta_bytes=limit, max_frame_bytes=1 << 20)
    if w.meta_size(meta) > limit:
        assert_err(frame, w.TOO_LARGE, limits=limits)
    else:
        assert dec(frame, limits).meta == meta  # type: ignore[union-attr]


@given(meta_texts)
@example(WORST_GROWTH_META)
def test_reencoding_growth_bound_for_number_literals(meta_text: str) -> None:
    assert w.meta_size(json.loads(meta_text)) <= d._MAX_REENCODE_GROWTH * len(meta_text)


@given(json_values, st.sampled_from([None, 0, 2, "\t"]))
def test_reencoding_never_grows_past_bound(value: Any, indent: Any) -> None:
    """The bound the meta shortcut relies on, for values as other encoders would write them."""
    source = json.dumps(value, indent=indent, ensure_ascii=True)
    assert len(w.encode(value).encode()) <= d._MAX_REENCODE_GROWTH * len(source.encode())


# ------------------------------------------------------------------------------------------
# Direct messages: send, read, fetch (docs/protocol.md, "Direct messages" and "fetch")
# ------------------------------------------------------------------------------------------

NEW_TYPES = ("send", "read", "fetch")


def test_send_documented_examples() -> None:
    single = '{"type": "send", "ref": 7, "to": "bob", "data": {"text": "hi"}, "mode": "fast"}'
    assert dec(single) == w.Send(7, ("bob",), {"text": "hi"}, w.FAST, False)
    group = (
        '{"type": "send", "ref": 8, "to": ["bob", "carol"], "data": {"text": "standup?"},'
        ' "mode": "reliable"}'
    )
    assert dec(group) == w.Send(8, ("bob", "carol"), {"text": "standup?"}, w.RELIABLE, True)


def test_send_defaults_and_group_flag() -> None:
    # No mode (or null) is fast; a list of one is still a group message.
    assert dec({"type": "send", "to": "bob", "data": 1}) == w.Send(None, ("bob",), 1)
    assert dec({"type": "send", "to": "bob", "data": 1, "mode": None}).mode == w.FAST  # type: ignore[union-attr]
    assert dec({"type": "send", "to": ["bob"], "data": 1}) == w.Send(None, ("bob",), 1, group=True)
    # Missing data is null (any JSON value is a valid message body).
    assert dec({"type": "send", "to": "bob"}) == w.Send(None, ("bob",), None)
    bodies: tuple[Any, ...] = (0, "s", 1.5, True, None, [], {}, [1, {"a": [None]}], "é\U0001f600")
    for data in bodies:
        assert dec({"type": "send", "to": "bob", "data": data}).data == data  # type: ignore[union-attr]
    # Recipients keep their order; unknown fields are ignored.
    frame = {"type": "send", "ref": "s", "to": ["c", "a", "b"], "data": 0, "x": [1]}
    assert dec(frame) == w.Send("s", ("c", "a", "b"), 0, w.FAST, True)


def test_send_recipient_limits() -> None:
    many = [f"u{i}" for i in range(w.MAX_RECIPIENTS)]
    assert dec({"type": "send", "to": many, "data": 0}).to == tuple(many)  # type: ignore[union-attr]
    user = "x" * LIMITS.max_user_id
    assert dec({"type": "send", "to": user, "data": 0}).to == (user,)  # type: ignore[union-attr]
    assert dec({"type": "send", "to": [user, "y"], "data": 0}).to == (user, "y")  # type: ignore[union-attr]
    small = Limits(max_user_id=3)
    assert dec({"type": "send", "to": ["abc"], "data": 0}, small).to == ("abc",)  # type: ignore[union-attr]
    assert_err({"type": "send", "ref": 1, "to": ["abcd"], "data": 0}, w.BAD_REQUEST, 1, small)
    assert_err({"type": "send", "ref": 1, "to": "abcd", "data": 0}, w.BAD_REQUEST, 1, small)


@pytest.mark.parametrize(
    "to",
    [
        [],
        [f"u{i}" for i in range(w.MAX_RECIPIENTS + 1)],
        ["bob", "bob"],
        ["bob", "carol", "bob"],
        "",
        "x" * 129,
        "a\nb",
        "a\x00",
        "a\x7f",
        "a\x85",
        "\t",
        5,
        1.5,
        True,
        {"bob": 1},
        {},
        [1],
        ["bob", None],
        ["bob", ""],
        ["bob", "x" * 129],
        ["bob", "a\x1f"],
        [["bob"]],
    ],
)
def test_send_bad_recipients(to: Any) -> None:
    assert_err({"type": "send", "ref": 7, "to": to, "data": 0}, w.BAD_REQUEST, 7)


def test_send_missing_recipient() -> None:
    e = err({"type": "send", "ref": 7, "data": 0})
    assert (e.code, e.ref) == (w.BAD_REQUEST, 7)
    assert "'to'" in e.message
    assert_err({"type": "send", "ref": 7, "to": None, "data": 0}, w.BAD_REQUEST, 7)


def test_send_duplicate_recipient_message() -> None:
    e = err({"type": "send", "ref": 1, "to": ["a", "b", "a"], "data": 0})
    assert (e.code, e.ref) == (w.BAD_REQUEST, 1)
    assert "twice" in e.message


@pytest.mark.parametrize("mode", ["", "FAST", "Reliable", "slow", 1, 0, True, ["fast"], {}])
def test_send_bad_mode(mode: Any) -> None:
    frame = {"type": "send", "ref": "m", "to": "bob", "data": 0, "mode": mode}
    assert_err(frame, w.BAD_REQUEST, "m")


def json_size(value: Any) -> bytes:
    """The compact UTF-8 encoding the data limit is defined on."""
    encoded: bytes = w.encode(value).encode("utf-8")
    return encoded


def _data_of_size(n: int, char: str = "x") -> str:
    """A string whose compact JSON encoding is ``n`` UTF-8 bytes (``char``: 1 or 2 bytes)."""
    width = len(char.encode())
    body = n - 2
    value = char * (body // width) + "x" * (body % width)
    assert len(json_size(value)) == n
    return value


@pytest.mark.parametrize("char", ["x", "é"])
def test_send_data_size_limit(char: str) -> None:
    limit = w.MAX_MESSAGE_BYTES
    # The data limit is not the frame limit: ascii-escaped "é" takes 6 bytes in the frame.
    limits = Limits(max_frame_bytes=1 << 16)
    ok = {"type": "send", "ref": 3, "to": "bob", "data": _data_of_size(limit, char)}
    assert dec(ok, limits).data == ok["data"]  # type: ignore[union-attr]
    big = {"type": "send", "ref": 3, "to": "bob", "data": _data_of_size(limit + 1, char)}
    e = err(big, limits)
    assert (e.code, e.ref) == (w.TOO_LARGE, 3)
    assert "'data'" in e.message
    # The same through a group and a binary frame.
    group = json.dumps({**big, "to": ["a", "b"]}, ensure_ascii=False).encode()
    assert_err(group, w.TOO_LARGE, 3, limits)


def test_send_data_size_is_the_compact_encoding() -> None:
    """Whitespace and escapes in the client's frame do not count; re-encoded floats do."""
    limits = Limits(max_frame_bytes=1 << 16)
    data = [0] * 4094 + [10]  # "[0,0,...,10]": exactly the limit, compact
    assert len(json_size(data)) == w.MAX_MESSAGE_BYTES
    spaced = json.dumps({"type": "send", "to": "bob", "data": data}, indent=4)
    assert len(spaced) > 2 * w.MAX_MESSAGE_BYTES
    assert dec(spaced, limits).data == data  # type: ignore[union-attr]
    # 4095 escaped "é": 24 KB in the frame, 8192 bytes of UTF-8 once re-encoded.
    escaped = '{"type":"send","to":"bob","data":"' + "\\u00e9" * 4095 + '"}'
    assert dec(escaped, limits).data == "é" * 4095  # type: ignore[union-attr]
    assert_err(escaped.replace('"data":"', '"data":"x'), w.TOO_LARGE, limits=limits)
    floats = "[" + ",".join(["1e15"] * 1000) + "]"  # 5 KB here, 19 KB re-encoded
    assert_err('{"type":"send","ref":2,"to":"bob","data":' + floats + "}", w.TOO_LARGE, 2)


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"send","ref":1,"to":"bob","data":"\\ud800"}',
        '{"type":"send","ref":1,"to":"bob","data":["ok","\\udfff"]}',
        '{"type":"send","ref":1,"to":"bob","data":{"\\ud800":1}}',
        '{"type":"send","ref":1,"to":"bob","data":{"a":{"b":"x\\ude00"}}}',
        '{"type":"send","ref":1,"to":"\\ud800","data":0}',
        '{"type":"send","ref":1,"to":["bob","\\ud83d"],"data":0}',
        '{"type":"send","ref":1,"to":"bob","data":0,"mode":"\\ud800"}',
        '{"type":"read","ref":1,"id":"\\ud800"}',
    ],
)
def test_direct_message_unpaired_surrogates_rejected(frame: str) -> None:
    assert_err(frame, w.BAD_REQUEST, 1)


def test_send_escaped_surrogate_pair_is_fine() -> None:
    frame = '{"type":"send","to":"\\ud83d\\ude00","data":["\\ud83d\\ude00"]}'
    assert dec(frame) == w.Send(None, ("\U0001f600",), ["\U0001f600"])


def test_send_not_json_data_rejected() -> None:
    for literal in ("NaN", "Infinity", "1e999"):
        assert_err('{"type":"send","to":"bob","data":' + literal + "}", w.BAD_REQUEST)


def test_read() -> None:
    assert dec({"type": "read", "id": "eu.k3J9.17"}) == w.MarkRead(None, "eu.k3J9.17")
    assert dec({"type": "read", "ref": 4, "id": "x" * w.MAX_MESSAGE_ID}) == w.MarkRead(
        4, "x" * w.MAX_MESSAGE_ID
    )
    e = err({"type": "read", "ref": 4})
    assert (e.code, e.ref) == (w.BAD_REQUEST, 4)
    assert "'id'" in e.message


@pytest.mark.parametrize(
    "message_id", [None, "", "x" * (w.MAX_MESSAGE_ID + 1), 17, 1.5, True, ["a"], {}, "a\nb", "\x00"]
)
def test_read_bad_id(message_id: Any) -> None:
    assert_err({"type": "read", "ref": "r", "id": message_id}, w.BAD_REQUEST, "r")


def test_fetch() -> None:
    assert dec({"type": "fetch", "ref": 3, "limit": 50}) == w.Fetch(3, 50)
    assert dec({"type": "fetch"}) == w.Fetch(None, w.DEFAULT_FETCH)
    assert dec({"type": "fetch", "limit": None}) == w.Fetch(None, 100)
    assert dec({"type": "fetch", "limit": 1}) == w.Fetch(None, 1)
    assert dec({"type": "fetch", "limit": w.MAX_FETCH}) == w.Fetch(None, 500)


@pytest.mark.parametrize(
    "limit", [0, -1, w.MAX_FETCH + 1, 2**70, True, False, 1.0, 50.0, "50", [50], {}]
)
def test_fetch_bad_limit(limit: Any) -> None:
    e = err({"type": "fetch", "ref": 3, "limit": limit})
    assert (e.code, e.ref) == (w.BAD_REQUEST, 3)
    assert "'limit'" in e.message


# Property tests for the new frames.

recipients = st.lists(names, min_size=1, max_size=w.MAX_RECIPIENTS, unique=True)
sends = st.one_of(
    st.builds(
        w.Send, refs, names.map(lambda n: (n,)), json_values, st.sampled_from([w.FAST, w.RELIABLE])
    ),
    st.builds(
        w.Send,
        refs,
        recipients.map(tuple),
        json_values,
        st.sampled_from([w.FAST, w.RELIABLE]),
        st.just(True),
    ),
)
new_messages: st.SearchStrategy[ClientMessage] = st.one_of(
    sends,
    st.builds(w.MarkRead, refs, names),
    st.builds(w.Fetch, refs, st.integers(1, w.MAX_FETCH)),
)


def client_encode_new(msg: ClientMessage) -> dict[str, Any]:
    """What a client library would send: every field spelled out."""
    if isinstance(msg, w.Send):
        to: Any = list(msg.to) if msg.group else msg.to[0]
        body: dict[str, Any] = {"type": "send", "to": to, "data": msg.data, "mode": msg.mode}
    elif isinstance(msg, w.MarkRead):
        body = {"type": "read", "id": msg.id}
    else:
        assert isinstance(msg, w.Fetch)
        body = {"type": "fetch", "limit": msg.limit}
    if msg.ref is not None:
        body["ref"] = msg.ref
    return body


@given(new_messages, st.booleans(), st.booleans())
@settings(max_examples=300)
def test_new_types_round_trip(msg: ClientMessage, ascii_only: bool, binary: bool) -> None:
    body = client_encode_new(msg)
    assume(depth(body) <= w.MAX_JSON_DEPTH)
    if isinstance(msg, w.Send):
        assume(len(json_size(msg.data)) <= w.MAX_MESSAGE_BYTES)
    text = json.dumps(body, ensure_ascii=ascii_only)
    frame: str | bytes = text.encode() if binary else text
    assert decode_client_frame(frame, ROUNDTRIP_LIMITS) == msg
    # The module's minimal encoding (defaults omitted) decodes to the same message.
    assert decode_client_frame(w.encode(w.to_wire(msg)), ROUNDTRIP_LIMITS) == msg


new_plausible: dict[str, st.SearchStrategy[Any]] = {
    "ref": plausible["ref"],
    "to": short_text | st.lists(short_text, max_size=35) | st.lists(st.sampled_from("abc")),
    "data": small_values | wild_values | st.text(st.sampled_from('xé\\"\x00'), max_size=9000),
    "mode": st.sampled_from([w.FAST, w.RELIABLE, None, "x", 1, True]),
    "id": short_text | st.text(min_size=120, max_size=130),
    "limit": st.integers(-2, w.MAX_FETCH + 2) | st.floats() | st.booleans(),
}


def check_new_frame(frame: str, limits: Limits) -> None:
    """Only ProtocolError escapes, and whatever is accepted respects the documented bounds."""
    try:
        msg = decode_client_frame(frame, limits)
    except ProtocolError as e:
        assert e.code in (w.BAD_REQUEST, w.TOO_LARGE)
        w.encode(f.error_from(e)).encode("utf-8")
        return
    if isinstance(msg, w.Send):
        assert 1 <= len(msg.to) <= w.MAX_RECIPIENTS
        assert len(set(msg.to)) == len(msg.to)
        assert msg.group or len(msg.to) == 1
        assert msg.mode in (w.FAST, w.RELIABLE)
        assert all(0 < len(user) <= limits.max_user_id for user in msg.to)
        assert len(json_size(msg.data)) <= w.MAX_MESSAGE_BYTES
        # What the recipient gets can be sent as strict UTF-8 JSON.
        out = f.direct_message("i", "u", "s", "r", msg.to, msg.data, msg.mode, 0)
        w.encode(out).encode("utf-8")
    elif isinstance(msg, w.MarkRead):
        assert 0 < len(msg.id) <= w.MAX_MESSAGE_ID
    elif isinstance(msg, w.Fetch):
        assert type(msg.limit) is int
        assert 1 <= msg.limit <= w.MAX_FETCH
    w.encode(w.to_wire(msg)).encode("utf-8")


@given(
    st.sampled_from(NEW_TYPES),
    st.fixed_dictionaries({}, optional=new_plausible),
    st.booleans(),
)
@settings(max_examples=400)
def test_fuzz_new_types(kind: str, fields: dict[str, Any], ascii_only: bool) -> None:
    frame = json.dumps({**fields, "type": kind}, ensure_ascii=ascii_only)
    check_new_frame(frame, SMALL_LIMITS)
    check_new_frame(frame, Limits(max_frame_bytes=1 << 20))
