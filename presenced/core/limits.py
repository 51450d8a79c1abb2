"""Bounds on everything a client can make the daemon hold or do.

Every size and rate a client controls has a limit here, with a default that is generous for
real cursor/presence traffic and small enough that one abusive connection cannot hurt the
others. The values travel to the client in `welcome`, so a well-behaved client can respect
them instead of discovering them by error.
"""

from __future__ import annotations

import attrs

#: Longest room or user name any daemon may allow (the peer wire's limit on names).
MAX_NAME_LIMIT = 256


@attrs.frozen
class Limits:
    """Per-daemon and per-connection limits (all positive)."""

    #: Largest accepted client message (all its frames), in bytes (UTF-8 for text frames).
    max_frame_bytes: int = 16_384
    #: Largest presence meta, in bytes of its compact JSON encoding.
    max_meta_bytes: int = 2_048
    #: Longest room name, in characters.
    max_room_name: int = 128
    #: Longest user id, in characters.
    max_user_id: int = 128
    #: Rooms one connection may be in at the same time.
    max_rooms_per_connection: int = 32
    #: Sustained client messages per second per connection, WebSocket pings and pongs
    #: included (token bucket rate; see `presenced.core.ratelimit.FloodLimit`).
    max_messages_per_second: float = 200.0
    #: Token bucket size: how many messages may arrive in a burst. Twice as many drops
    #: (refilled at the same rate) are allowed before a flood is closed with 1008.
    message_burst: int = 400
    #: Concurrent client connections per daemon.
    max_connections: int = 20_000
    #: Seconds a new connection has to send `hello`.
    hello_timeout_s: float = 5.0
    #: Bytes queued for one client before its queued room diffs are replaced by a resync.
    outbox_max_bytes: int = 1_048_576
    #: Seconds a client may stay unable to take its queue before it is closed with 1013.
    slow_client_timeout_s: float = 10.0

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if not value > 0:
                raise ValueError(f"limit {field.name} must be positive, got {value!r}")
        for name in ("max_room_name", "max_user_id"):
            if getattr(self, name) > MAX_NAME_LIMIT:
                # Peers refuse longer names: one would break every link it is gossiped over.
                raise ValueError(f"limit {name} must be at most {MAX_NAME_LIMIT}")

    def public(self) -> dict[str, float | int]:
        """The limits a client should know about (sent in `welcome`)."""
        return {
            "max_frame_bytes": self.max_frame_bytes,
            "max_meta_bytes": self.max_meta_bytes,
            "max_room_name": self.max_room_name,
            "max_rooms_per_connection": self.max_rooms_per_connection,
            "max_messages_per_second": self.max_messages_per_second,
            "message_burst": self.message_burst,
        }
