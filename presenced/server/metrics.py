"""Counters the daemon keeps about itself (exported by the HTTP side port and by benchmarks).

Plain integer attributes, bumped inline on the hot path: a counter increment must cost
nanoseconds, not a registry lookup.
"""

from __future__ import annotations

import bisect

import attrs

#: Upper bounds (seconds) of the flush-duration histogram buckets; one more bucket is +Inf.
FLUSH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


@attrs.define
class Metrics:
    connections_opened: int = 0
    connections_refused: int = 0
    #: Client WebSocket data frames and bytes read (a frame split across reads counts once
    #: per piece; bytes include framing).
    frames_in: int = 0
    bytes_in: int = 0
    messages_in: int = 0
    updates_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    diffs_flushed: int = 0
    flush_seconds: float = 0.0
    #: How many ticker wake-ups took at most FLUSH_BUCKETS[i] (not cumulative; last: more).
    flush_counts: list[int] = attrs.field(factory=lambda: [0] * (len(FLUSH_BUCKETS) + 1))
    resyncs: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)
    closes: dict[int, int] = attrs.field(factory=dict)
    #: Direct messages: client sends accepted, copies forwarded to a peer, rows stored,
    #: copies written to local recipients, and failures by error code.
    messages_sent: int = 0
    messages_routed: int = 0
    messages_stored: int = 0
    messages_delivered: int = 0
    message_errors: dict[str, int] = attrs.field(factory=dict)
    #: Client liveness and resume: pings to quiet connections, connections closed as dead,
    #: sessions detached by a drop, resumed, and ended by their grace running out.
    pings_sent: int = 0
    clients_timed_out: int = 0
    sessions_detached: int = 0
    sessions_resumed: int = 0
    #: Of those, sessions another daemon held (resumed here from its presence entries).
    sessions_resumed_elsewhere: int = 0
    sessions_expired: int = 0
    #: Server API calls that publish, send and disconnect (its reads are not counted).
    api_publishes: int = 0
    api_sends: int = 0
    api_disconnects: int = 0

    def count_frames(self, count: int, size: int) -> None:
        self.frames_out += count
        self.bytes_out += count * size

    def observe_flush(self, seconds: float) -> None:
        """One ticker wake-up (client polls, gossip wake-ups, room flushes) took ``seconds``."""
        self.flush_seconds += seconds
        self.flush_counts[bisect.bisect_left(FLUSH_BUCKETS, seconds)] += 1

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def count_message_error(self, code: str) -> None:
        self.message_errors[code] = self.message_errors.get(code, 0) + 1

    def count_close(self, code: int) -> None:
        self.closes[code] = self.closes.get(code, 0) + 1
