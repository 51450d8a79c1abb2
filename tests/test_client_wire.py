"""Tests for the client protocol's vocabulary (`presenced.core.client_wire`): the stable
error codes, `ProtocolError`, the JSON encoding the size limits are defined against, meta
patches, and `to_wire`."""

from __future__ import annotations

import json
import pickle
from typing import Any

from hypothesis import given
from json_strategies import json_values

from presenced.core import client_wire as w
from presenced.core.client_wire import (
    ProtocolError,
)
from presenced.core.limits import Limits

LIMITS = Limits()


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_error_codes_are_stable() -> None:
    expected = {
        "bad_request",
        "unsupported_version",
        "hello_required",
        "unauthorized",
        "forbidden",
        "too_large",
        "rate_limited",
        "not_joined",
        "too_many_rooms",
        "server_busy",
        "internal",
        "not_online",
        "unreachable",
        "hop_limit",
        "store_full",
        "expired",
        "timeout",
        "unavailable",
        "disconnected",
        "refused",
        "token_expired",
    }
    assert expected == w.ERROR_CODES
    assert w.BAD_REQUEST == "bad_request"
    assert w.TOO_LARGE == "too_large"
    assert w.UNSUPPORTED_VERSION == "unsupported_version"


def test_protocol_error_attributes_str_and_pickle() -> None:
    e = ProtocolError(w.NOT_JOINED, "not in room 'a'", ref=7)
    assert (e.code, e.message, e.ref) == ("not_joined", "not in room 'a'", 7)
    assert str(e) == "not_joined: not in room 'a'"
    back = pickle.loads(pickle.dumps(e))
    assert (back.code, back.message, back.ref) == (e.code, e.message, e.ref)
    assert ProtocolError(w.INTERNAL, "x").ref is None


def test_meta_size_counts_utf8_bytes_of_compact_encoding() -> None:
    assert w.meta_size({}) == 2
    assert w.meta_size({"a": 1}) == len('{"a":1}')
    assert w.meta_size({"a": "é"}) == len('{"a":"é"}'.encode())
    assert w.meta_size({"a": "\U0001f600"}) == 4 + len('{"a":""}')


def test_apply_meta_patch() -> None:
    meta = {"a": 1, "b": {"x": 1}, "c": 3}
    out = w.apply_meta_patch(meta, {"a": 2, "b": {"y": 2}, "c": None, "d": None, "e": [1]})
    assert out == {"a": 2, "b": {"y": 2}, "e": [1]}  # shallow: "b" replaced, not merged
    assert meta == {"a": 1, "b": {"x": 1}, "c": 3}  # the original is untouched
    assert w.apply_meta_patch(meta, {}) == meta
    assert w.apply_meta_patch(meta, {}) is not meta


# ------------------------------------------------------------------------------------------
# The JSON encoding
# ------------------------------------------------------------------------------------------


def test_encode_is_compact_utf8_json() -> None:
    assert w.encode({"a": [1, "é"], "b": None}) == '{"a":[1,"é"],"b":null}'


# ------------------------------------------------------------------------------------------
# Direct messages
# ------------------------------------------------------------------------------------------


def test_direct_message_constants() -> None:
    assert (w.MAX_RECIPIENTS, w.MAX_MESSAGE_BYTES, w.MAX_MESSAGE_ID) == (32, 8192, 128)
    assert (w.MAX_FETCH, w.DEFAULT_FETCH) == (500, 100)
    assert (w.FAST, w.RELIABLE) == ("fast", "reliable")
    codes = (w.NOT_ONLINE, w.UNREACHABLE, w.HOP_LIMIT, w.STORE_FULL, w.EXPIRED)
    assert codes == ("not_online", "unreachable", "hop_limit", "store_full", "expired")
    assert set(codes) <= w.ERROR_CODES
    assert (w.Send.TYPE, w.MarkRead.TYPE, w.Fetch.TYPE) == ("send", "read", "fetch")


def test_new_types_to_wire_shapes() -> None:
    assert w.to_wire(w.Send(7, ("bob",), {"text": "hi"})) == {
        "type": "send",
        "ref": 7,
        "to": "bob",
        "data": {"text": "hi"},
    }
    assert w.to_wire(w.Send(None, ("bob",), None, w.RELIABLE, True)) == {
        "type": "send",
        "to": ["bob"],
        "data": None,
        "mode": "reliable",
    }
    assert w.to_wire(w.MarkRead("r", "eu.1")) == {"type": "read", "ref": "r", "id": "eu.1"}
    assert w.to_wire(w.Fetch(None)) == {"type": "fetch"}
    assert w.to_wire(w.Fetch(3, 50)) == {"type": "fetch", "ref": 3, "limit": 50}


@given(json_values)
def test_frames_on_the_wire_are_the_same_json(value: Any) -> None:
    """encode_frame (orjson, with the standard encoder for what it refuses: integers over 64
    bits) writes the JSON encode writes, up to number formatting: same value back, UTF-8,
    non-ASCII as is."""
    message = {"type": "state", "room": "r", "data": value}
    frame = w.encode_frame(message)
    assert json.loads(frame.decode("utf-8")) == json.loads(w.encode(message))


def test_frames_keep_non_ascii_and_integers_of_any_size() -> None:
    assert w.encode_frame({"name": "Zoë 🦊"}) == '{"name":"Zoë 🦊"}'.encode()
    huge = {"n": 2**70, "m": -(2**64)}  # (orjson refuses these: the standard encoder takes them)
    assert w.encode_frame(huge) == w.encode(huge).encode()
