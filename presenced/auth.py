"""Client tokens: JWTs that name a user, the rooms (glob patterns) it may join and what it
may do there.

Tokens are minted by whoever holds the signing key: an app backend or `presenced token`
with the shared HS256 secret, or an identity provider signing with RS256, ES256 or EdDSA
(its public key, or its JWKS: :mod:`presenced.token_keys`). Every region checks them with
the same keys, so no region needs to call anything to admit a client. This module reads the
claims (`grant_from_claims`) and maps PyJWT's errors to ours (`decode_claims`); it is, with
:class:`presenced.token_keys.TokenVerifier`, the one place untrusted token text is parsed:
whatever they are given, they return a `Grant` or raise `AuthError`, nothing else, so the
connection code needs exactly one `except`.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import jwt

from presenced.core.protocol import SERVER_USER

__all__ = [
    "ALGORITHM",
    "BROADCAST",
    "MAX_TOKEN_CHARS",
    "PRESENCE",
    "AuthError",
    "Grant",
    "anonymous_grant",
    "check_token_text",
    "decode_claims",
    "grant_from_claims",
    "mint_token",
    "verify_token",
]

#: The shared secret's only algorithm: a fixed list keeps "alg: none" and key-confusion
#: tricks out (public keys have theirs, pinned by key type: presenced.token_keys).
ALGORITHM = "HS256"
#: Longer tokens are refused before parsing, so a client cannot make us decode megabytes.
MAX_TOKEN_CHARS = 4096

#: Longest user id a token may name by default (`Limits.max_user_id`, as for a hello's
#: `user`; a daemon passes its own limit).
MAX_USER_ID = 128

#: Room capabilities a token's `caps` may list (docs/protocol.md, *Tokens*): `presence`
#: (join, update its meta, leave: what `rooms` already allows) and `broadcast`.
PRESENCE = "presence"
BROADCAST = "broadcast"

#: Control characters (and DEL, C1) are refused in a user id, as in a hello's `user`.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class AuthError(Exception):
    """A token was refused. `code` is the protocol error code, `message` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _unauthorized(message: str) -> AuthError:
    return AuthError("unauthorized", message)


@attrs.frozen
class Grant:
    """What a verified token allows: who the client is, which rooms it may join, what it
    may do there, and until when."""

    user: str
    room_patterns: tuple[str, ...]
    #: Unix time the token stops being valid, or None for no expiry.
    expires_at: float | None
    #: The `caps` claim's room capabilities, (pattern, capabilities) in claim order; None
    #: when the token has none: every room it may join allows everything.
    room_caps: tuple[tuple[str, frozenset[str]], ...] | None = None
    #: Whether it may send direct messages (`caps.send`; true when absent).
    may_send: bool = True

    def may_join(self, room: str) -> bool:
        """Whether `room` matches one of the patterns (fnmatch, case-sensitive everywhere)."""
        return any(fnmatch.fnmatchcase(room, pattern) for pattern in self.room_patterns)

    def may_broadcast(self, room: str) -> bool:
        """Whether a member of `room` may broadcast there: always without room capabilities,
        else when a pattern matching `room` lists `broadcast`."""
        if self.room_caps is None:
            return True
        return any(
            BROADCAST in caps and fnmatch.fnmatchcase(room, pattern)
            for pattern, caps in self.room_caps
        )


def anonymous_grant(user: str) -> Grant:
    """The grant of a client in an `--allow-anonymous` daemon: any room, no expiry."""
    return Grant(user=user, room_patterns=("*",), expires_at=None)


def mint_token(
    secret: bytes,
    user: str,
    rooms: Sequence[str],
    ttl_s: float | None,
    now: float,
    *,
    caps: Mapping[str, Any] | None = None,
) -> str:
    """Sign a token for `user` allowed into `rooms` (glob patterns) for `ttl_s` seconds.

    `now` is explicit so that callers and tests control time; `ttl_s=None` mints a token
    without `exp` (valid until the secret changes). `exp` is rounded up to whole seconds, so a
    token is never shorter-lived than asked. `caps` is the `caps` claim, as is (checked when
    the token is verified).
    """
    if not isinstance(user, str) or not user:
        raise ValueError("user must be a non-empty string")
    if isinstance(rooms, str):
        raise ValueError("rooms must be a sequence of patterns, not one string")
    patterns = list(rooms)
    if not all(isinstance(p, str) and p for p in patterns):
        raise ValueError("room patterns must be non-empty strings")
    claims: dict[str, Any] = {"sub": user, "rooms": patterns, "iat": math.floor(now)}
    if caps is not None:
        claims["caps"] = dict(caps)
    if ttl_s is not None:
        if not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"ttl_s must be positive or None, got {ttl_s!r}")
        claims["exp"] = math.ceil(now + ttl_s)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim as a finite float, None if absent (JSON allows NaN/1e999 here)."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _unauthorized(f"invalid '{name}' claim: not a number")
    try:
        number = float(value)
    except OverflowError:
        raise _unauthorized(f"invalid '{name}' claim: out of range") from None
    if not math.isfinite(number):
        raise _unauthorized(f"invalid '{name}' claim: not finite")
    return number


def check_token_text(token: object) -> str:
    """The token's text, refused before any parsing when empty or too long."""
    if not isinstance(token, str) or not token:
        raise _unauthorized("missing token")
    if len(token) > MAX_TOKEN_CHARS:
        raise _unauthorized(f"token too long (over {MAX_TOKEN_CHARS} characters)")
    return token


def decode_claims(
    token: str,
    key: Any,
    algorithms: Sequence[str],
    *,
    issuer: str | None = None,
    audience: str | None = None,
) -> dict[str, Any]:
    """Check the signature with `key` for one of `algorithms` (those of the key's type
    only), and `iss` and `aud` when `issuer` and `audience` are given; the other claims are
    checked by `grant_from_claims`."""
    try:
        # Times are checked by us against the caller's `now` (PyJWT only reads the clock),
        # and `sub` by us too so that its error says what is wrong in our words. Without a
        # configured audience, a token's `aud` is not looked at (IdP tokens carry one).
        claims = jwt.decode(
            token,
            key,
            algorithms=list(algorithms),
            issuer=issuer,
            audience=audience,
            options={
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_sub": False,
                "verify_aud": audience is not None,
                "verify_iss": issuer is not None,
            },
        )
    except jwt.InvalidAlgorithmError:
        raise _unauthorized(
            f"wrong algorithm: only {', '.join(algorithms)} is accepted for this key"
        ) from None
    except jwt.InvalidSignatureError:
        raise _unauthorized("bad signature") from None
    except jwt.MissingRequiredClaimError as e:
        raise _unauthorized(f"missing '{e.claim}' claim") from None
    except jwt.InvalidIssuerError:
        raise _unauthorized("wrong issuer ('iss' claim)") from None
    except jwt.InvalidAudienceError:
        raise _unauthorized("wrong audience ('aud' claim)") from None
    except jwt.PyJWTError as e:
        raise _unauthorized(f"malformed token: {e}") from None
    except Exception:
        # Untrusted input must never turn into anything but AuthError.
        raise _unauthorized("malformed token") from None
    if not isinstance(claims, dict):
        raise _unauthorized("malformed token: claims are not an object")
    return claims


def _caps(claims: dict[str, Any]) -> tuple[tuple[tuple[str, frozenset[str]], ...] | None, bool]:
    """The `caps` claim: `{"rooms": {pattern: [capability, ...]}, "send": bool}`, each
    member optional. Names this daemon does not know grant nothing (a newer issuer's
    capability is refused here, not allowed)."""
    caps = claims.get("caps")
    if caps is None:
        return None, True
    if not isinstance(caps, dict):
        raise _unauthorized("invalid 'caps' claim: need an object")
    send = caps.get("send", True)
    if not isinstance(send, bool):
        raise _unauthorized("invalid 'caps' claim: 'send' must be true or false")
    rooms = caps.get("rooms")
    if rooms is None:
        return None, send
    if not isinstance(rooms, dict) or not all(
        isinstance(pattern, str)
        and pattern
        and isinstance(names, list)
        and all(isinstance(name, str) for name in names)
        for pattern, names in rooms.items()
    ):
        raise _unauthorized(
            "invalid 'caps' claim: 'rooms' must map room patterns to lists of capabilities"
        )
    return tuple((pattern, frozenset(names)) for pattern, names in rooms.items()), send


def grant_from_claims(claims: dict[str, Any], now: float, max_user_id: int = MAX_USER_ID) -> Grant:
    """The grant of verified `claims` at Unix time `now`: refused when expired, not yet
    valid, or with a missing or invalid `sub`, `rooms` or `caps`."""
    exp = _numeric_date(claims, "exp")
    if exp is not None and exp <= now:
        raise _unauthorized("token expired")
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and nbf > now:
        raise _unauthorized("token not yet valid")
    _numeric_date(claims, "iat")

    user = claims.get("sub")
    if not isinstance(user, str) or not 0 < len(user) <= max_user_id:
        # As a hello's `user` (Limits.max_user_id); peers refuse names over 256 characters.
        raise _unauthorized(
            f"missing or invalid 'sub' claim: need a string of 1 to {max_user_id} characters"
        )
    if user == SERVER_USER:  # the server API's sender name; never a user's
        raise _unauthorized("invalid 'sub' claim: that name is reserved")
    if _CONTROL.search(user) is not None:
        raise _unauthorized("invalid 'sub' claim: control characters")
    rooms = claims.get("rooms")
    if not isinstance(rooms, list) or not all(isinstance(p, str) and p for p in rooms):
        raise _unauthorized("missing or invalid 'rooms' claim: need a list of room patterns")
    room_caps, may_send = _caps(claims)
    return Grant(
        user=user,
        room_patterns=tuple(rooms),
        expires_at=exp,
        room_caps=room_caps,
        may_send=may_send,
    )


def verify_token(
    secret: bytes, token: str, now: float | None = None, *, max_user_id: int = MAX_USER_ID
) -> Grant:
    """Check an HS256 `token` against `secret` at time `now` (default: the clock) and return
    its grant (a daemon with public keys too uses :class:`presenced.token_keys.TokenVerifier`).

    Raises `AuthError("unauthorized", reason)` for anything wrong: too long, malformed, wrong
    algorithm (including `none`), bad signature, expired, not yet valid, or a missing or
    invalid `sub` / `rooms` / `caps` claim.
    """
    claims = decode_claims(check_token_text(token), secret, [ALGORITHM])
    return grant_from_claims(claims, time.time() if now is None else now, max_user_id)
