"""Client tokens: HS256 JWTs that name a user and the rooms (glob patterns) it may join.

Tokens are minted by whoever holds the shared secret (an app backend, or `presenced token`)
and checked by every region with the same secret, so no region needs to call anything to
admit a client. `verify_token` is the one place untrusted token text is parsed: whatever it
is given, it returns a `Grant` or raises `AuthError`, nothing else, so the connection code
needs exactly one `except`.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Sequence
from typing import Any

import attrs
import jwt

from presenced.core.protocol import SERVER_USER

__all__ = [
    "ALGORITHM",
    "MAX_TOKEN_CHARS",
    "AuthError",
    "Grant",
    "anonymous_grant",
    "mint_token",
    "verify_token",
]

#: The only algorithm accepted: a fixed list keeps "alg: none" and key-confusion tricks out.
ALGORITHM = "HS256"
#: Longer tokens are refused before parsing, so a client cannot make us decode megabytes.
MAX_TOKEN_CHARS = 4096

#: Longest user id a token may name (the peer wire's limit on names).
MAX_USER_ID = 256


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
    """What a verified token allows: who the client is and which rooms it may join."""

    user: str
    room_patterns: tuple[str, ...]
    #: Unix time the token stops being valid, or None for no expiry.
    expires_at: float | None

    def may_join(self, room: str) -> bool:
        """Whether `room` matches one of the patterns (fnmatch, case-sensitive everywhere)."""
        return any(fnmatch.fnmatchcase(room, pattern) for pattern in self.room_patterns)


def anonymous_grant(user: str) -> Grant:
    """The grant of a client in an `--allow-anonymous` daemon: any room, no expiry."""
    return Grant(user=user, room_patterns=("*",), expires_at=None)


def mint_token(
    secret: bytes, user: str, rooms: Sequence[str], ttl_s: float | None, now: float
) -> str:
    """Sign a token for `user` allowed into `rooms` (glob patterns) for `ttl_s` seconds.

    `now` is explicit so that callers and tests control time; `ttl_s=None` mints a token
    without `exp` (valid until the secret changes). `exp` is rounded up to whole seconds, so a
    token is never shorter-lived than asked.
    """
    if not isinstance(user, str) or not user:
        raise ValueError("user must be a non-empty string")
    if isinstance(rooms, str):
        raise ValueError("rooms must be a sequence of patterns, not one string")
    patterns = list(rooms)
    if not all(isinstance(p, str) and p for p in patterns):
        raise ValueError("room patterns must be non-empty strings")
    claims: dict[str, Any] = {"sub": user, "rooms": patterns, "iat": math.floor(now)}
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


def _decode(secret: bytes, token: str) -> dict[str, Any]:
    """Check the signature and algorithm; the claims are checked by the caller."""
    try:
        # Times are checked by us against the caller's `now` (PyJWT only reads the clock),
        # and `sub` by us too so that its error says what is wrong in our words.
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_sub": False,
            },
        )
    except jwt.InvalidAlgorithmError:
        raise _unauthorized(f"wrong algorithm: only {ALGORITHM} is accepted") from None
    except jwt.InvalidSignatureError:
        raise _unauthorized("bad signature") from None
    except jwt.PyJWTError as e:
        raise _unauthorized(f"malformed token: {e}") from None
    except Exception:
        # Untrusted input must never turn into anything but AuthError.
        raise _unauthorized("malformed token") from None
    if not isinstance(claims, dict):
        raise _unauthorized("malformed token: claims are not an object")
    return claims


def verify_token(secret: bytes, token: str, now: float | None = None) -> Grant:
    """Check `token` against `secret` at time `now` (default: the clock) and return its grant.

    Raises `AuthError("unauthorized", reason)` for anything wrong: too long, malformed, wrong
    algorithm (including `none`), bad signature, expired, not yet valid, or a missing or
    invalid `sub` / `rooms` claim.
    """
    if not isinstance(token, str) or not token:
        raise _unauthorized("missing token")
    if len(token) > MAX_TOKEN_CHARS:
        raise _unauthorized(f"token too long (over {MAX_TOKEN_CHARS} characters)")
    claims = _decode(secret, token)
    if now is None:
        now = time.time()

    exp = _numeric_date(claims, "exp")
    if exp is not None and exp <= now:
        raise _unauthorized("token expired")
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and nbf > now:
        raise _unauthorized("token not yet valid")
    _numeric_date(claims, "iat")

    user = claims.get("sub")
    if not isinstance(user, str) or not 0 < len(user) <= MAX_USER_ID:
        # Peers refuse longer names (core/peer_wire.py MAX_NAME): such a user would break
        # every peer link its presence is gossiped over.
        raise _unauthorized(
            f"missing or invalid 'sub' claim: need a string of 1 to {MAX_USER_ID} characters"
        )
    if user == SERVER_USER:  # the server API's sender name; never a user's
        raise _unauthorized("invalid 'sub' claim: that name is reserved")
    rooms = claims.get("rooms")
    if not isinstance(rooms, list) or not all(isinstance(p, str) and p for p in rooms):
        raise _unauthorized("missing or invalid 'rooms' claim: need a list of room patterns")
    return Grant(user=user, room_patterns=tuple(rooms), expires_at=exp)
