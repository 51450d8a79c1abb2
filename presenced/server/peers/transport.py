"""The peer transport seam: how daemons reach each other, injected so clusters can be simulated.

The gossip layer only needs ordered, message-oriented channels between daemons and a way to
dial and accept them. In production that is WebSocket over mutually authenticated TLS
(:mod:`presenced.server.peers.tls`); in tests it is an in-memory network with latency, loss
and partitions (:mod:`presenced.testing.simnet`) running under trio's MockClock. The daemon
code above this seam is the same in both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class ChannelClosed(Exception):
    """The channel is gone (closed by either side, or the network broke)."""


class PeerChannel(Protocol):
    """One link to one peer: ordered, binary messages, until it breaks."""

    #: Names the transport has *proven* for the remote end (the CN and DNS names of its
    #: verified certificate); None when the transport authenticates nothing (simulation).
    remote_names: frozenset[str] | None
    #: Where the channel goes or comes from, for logs.
    remote_label: str

    async def send(self, data: bytes) -> None:
        """Send one message; raises ChannelClosed once the channel is gone."""
        ...

    async def receive(self) -> bytes:
        """The next message; raises ChannelClosed once the channel is gone."""
        ...

    def send_nowait(self, data: bytes) -> bool:
        """Queue one message and write what the transport takes now, never waiting: True if
        it all went, else the rest goes with the next ``send`` or ``flush``. (The ticker
        sends the tick's gossip with it, without a task switch per link.)"""
        ...

    async def flush(self) -> None:
        """Wait until every queued message is written; raises ChannelClosed once gone."""
        ...

    def receive_nowait(self) -> bytes | None:
        """The next message if it has already arrived, else None; never waits. Raises
        ChannelClosed once the channel is gone. (The gossip layer reads near peers with it
        once per tick instead of waking for each of their messages.)"""
        ...

    def input_fd(self) -> int | None:
        """The OS descriptor that turns readable when a message may have arrived, or None
        where there is none (the simulation). The ticker blocks on it for the millisecond or
        two it waits for a near peer's batch, instead of a trip through trio's scheduler."""
        ...

    async def aclose(self) -> None:
        """Close the channel (idempotent)."""
        ...


ChannelHandler = Callable[[PeerChannel], Awaitable[None]]


class PeerTransport(Protocol):
    """Dials and accepts peer channels."""

    async def dial(self, url: str) -> PeerChannel:
        """Open a channel to the peer at ``url``; raises OSError or ChannelClosed on failure."""
        ...

    async def serve(self, handler: ChannelHandler, *, task_status: Any = ...) -> None:
        """Accept channels forever, running ``handler`` for each in its own task.

        Calls ``task_status.started(port)`` (the bound port, or None) once accepting.
        """
        ...
