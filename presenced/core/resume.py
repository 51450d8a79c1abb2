"""Client liveness and session resume: the pure decisions (tokens, timings, verdicts).

A client connection shows it is alive by sending anything (a request, a WebSocket pong). The
daemon's sweeper looks at each connection's last input once a second: a connection quiet
for ``ping_after_s`` gets one WebSocket ping, and one silent for ``client_timeout_s`` is
dead. A session whose connection ended without a clean close waits ``resume_grace_s`` for
its client to come back with its resume token before it leaves its rooms.

The resume token is ``<session>.<mac>``: the session id it names, and an HMAC of the user
and the session under the daemon's key. It needs no storage, and when that key is the
cluster's token secret every daemon of the cluster can check it.

Pure: the caller passes times and keys; nothing here reads a clock or draws randomness.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Final, Literal

import attrs

from presenced.core.ws_frames import CloseCode

#: Close codes a client sends when it means to go (a closed tab, a logout): its session
#: leaves at once. Any other code (a client that is about to reconnect, say 4000) and a
#: connection that just drops keep the session for the grace. 1005: a close frame without a
#: code.
CLEAN_CLOSE_CODES: Final = frozenset({CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.NO_STATUS})

#: What the sweeper does with a connection.
Verdict = Literal["ok", "ping", "dead"]

_MAC_BYTES: Final = 16


@attrs.frozen
class Timing:
    """The liveness timings of one daemon, derived from its two settings.

    * ``ping_after_s``: two thirds of the timeout, so a live client has a third of it (5 s
      by default) to answer the ping over a bad mobile link;
    * ``sweep_s``: how often the sweeper looks (1 s, or a sixth of a short timeout), which
      is also how late a dead connection or an expired session may be noticed.
    """

    client_timeout_s: float
    resume_grace_s: float

    @property
    def ping_after_s(self) -> float:
        return self.client_timeout_s * 2 / 3

    @property
    def sweep_s(self) -> float:
        return min(1.0, self.client_timeout_s / 6)

    def worst_leave_s(self) -> float:
        """The longest time from a client's last sign of life until its session leaves (on
        this daemon: add the gossip delay for other regions)."""
        return self.client_timeout_s + self.resume_grace_s + 2 * self.sweep_s


def verdict(last_input: float, pinged_at: float, now: float, timing: Timing) -> Verdict:
    """Whether a connection is fine, wants a ping (quiet, and not pinged since its last
    input), or is dead (silent for the whole timeout)."""
    quiet = now - last_input
    if quiet < timing.ping_after_s:
        return "ok"
    if quiet >= timing.client_timeout_s:
        return "dead"
    return "ping" if pinged_at < last_input else "ok"


def resume_token(key: bytes, user: str, session: str) -> str:
    """The token that lets ``user`` get ``session`` back."""
    return f"{session}.{_mac(key, user, session)}"


def token_session(token: str) -> str | None:
    """The session id a token names (None: not a token's shape)."""
    session, dot, mac = token.partition(".")
    if not dot or not session or not mac:
        return None
    return session


def token_valid(key: bytes, user: str, token: str) -> bool:
    """Whether ``token`` was made under ``key`` for ``user`` (constant-time comparison)."""
    session = token_session(token)
    if session is None:
        return False
    return hmac.compare_digest(token, resume_token(key, user, session))


def _mac(key: bytes, user: str, session: str) -> str:
    digest = hmac.new(key, f"resume\0{user}\0{session}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:_MAC_BYTES]).rstrip(b"=").decode()
