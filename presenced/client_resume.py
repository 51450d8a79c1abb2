"""What the trio client (presenced/client.py) keeps to reconnect and resume its session.

Plain bookkeeping, no I/O: the client's connection loop asks it what to send after each
``welcome`` and after each resumed room's fresh ``state``. Kept apart so client.py stays a
readable size and this logic can be tested frame by frame.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

#: Close codes after which reconnecting cannot help (policy: unauthorized, flooding).
FATAL_CLOSE_CODES = frozenset({1008})
#: Longest resume token a daemon sends (and accepts back in ``hello``).
MAX_RESUME_TOKEN = 128

Frame = dict[str, Any]


def backoff_s(
    attempt: int,
    *,
    base_s: float = 0.25,
    max_s: float = 10.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """The delay before reconnect attempt ``attempt`` (0-based): exponential from ``base_s``
    up to ``max_s``, with "equal jitter" (between half and all of it) so that many clients
    dropped at once do not come back in lockstep. The same curve as presenced.js."""
    ceiling = min(max_s, base_s * 2 ** min(attempt, 30))
    return ceiling / 2 + rand() * ceiling / 2


def meta_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> Frame:
    """The patch that turns meta ``before`` into ``after`` under the daemon's merge (keys set,
    a None value deletes): used after a resume to bring the daemon's copy of this session's
    meta up to date with what changed while disconnected (or was lost in the drop)."""
    patch = {k: v for k, v in after.items() if k not in before or not _same(before[k], v)}
    patch.update({k: None for k in before if k not in after})
    return patch


def _same(a: Any, b: Any) -> bool:
    # As JSON: True is not 1, 1.0 is 1 (the daemon sees the encoded values).
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class ResumeBook:
    """The resume token, and what happened to the rooms while the connection was down."""

    def __init__(self) -> None:
        #: The ``resume`` token of the last ``welcome``, offered in the next ``hello``.
        self.token: str | None = None
        #: room -> meta patch made while disconnected (sent after a resume)
        self.patches: dict[str, Frame] = {}
        #: Rooms left while disconnected, which a resumed session is still in.
        self.left_offline: set[str] = set()
        #: Resumed rooms whose fresh ``state`` has not come yet.
        self.resuming: set[str] = set()
        #: ref -> (kind, room) of the joins and leaves the client sends by itself
        self.background: dict[int, tuple[str, str]] = {}

    def hello(self, base: Frame) -> Frame:
        """The ``hello`` to send: ``base`` with the resume token, if there is one."""
        return {**base, "resume": self.token} if self.token is not None else dict(base)

    def welcomed(self, hello: Frame, welcome: Frame, previous_session: str) -> bool:
        """Take a ``welcome`` (keeping its token for next time); whether it resumed."""
        token = welcome.get("resume")
        valid = isinstance(token, str) and 0 < len(token) <= MAX_RESUME_TOKEN
        self.token = token if valid else None
        # Trust `resumed` only for the session asked for (a daemon keeps the id anyway).
        return bool(
            welcome.get("resumed") is True
            and "resume" in hello
            and previous_session
            and welcome.get("session") == previous_session
        )

    def restore(
        self,
        resumed: bool,
        joined: Iterable[str],
        metas: Mapping[str, Frame],
        refs: Iterator[int],
    ) -> list[Frame]:
        """The frames that put the daemon's session where the application wants it, right
        after ``welcome``: ``joined`` are the rooms the daemon had confirmed, ``metas`` the
        rooms the application is in (or joining) with its meta there.

        Resumed: leave the rooms left offline; the confirmed rooms wait for their fresh
        state (see :meth:`after_resume`); joins cut by the drop are redone by ``join``
        itself. Not resumed: join every confirmed room again with its latest meta.
        """
        frames: list[Frame] = []
        if resumed:
            for room in sorted(self.left_offline - metas.keys()):
                ref = next(refs)
                self.background[ref] = ("leave", room)
                frames.append({"type": "leave", "room": room, "ref": ref})
            self.resuming = set(joined) & metas.keys()
        else:
            self.patches.clear()  # the joins carry the whole meta
            frames.extend(self.rejoin(room, metas, refs) for room in sorted(joined))
        self.left_offline.clear()
        return frames

    def rejoin(self, room: str, metas: Mapping[str, Frame], refs: Iterator[int]) -> Frame:
        """A join the client sends by itself (its answer goes to the application's inbox)."""
        ref = next(refs)
        self.background[ref] = ("join", room)
        self.patches.pop(room, None)  # the join carries the whole meta
        return {"type": "join", "room": room, "meta": metas.get(room, {}), "ref": ref}

    def after_resume(self, room: str, mine: Frame | None, meta: Frame) -> list[Frame]:
        """A resumed room's fresh state came, with ``mine`` (this session's meta in it, if it
        is there): the update that brings the daemon's copy up to date with ``meta``."""
        self.resuming.discard(room)
        offline = self.patches.pop(room, None)
        patch = meta_patch(mine, meta) if mine is not None else offline or {}
        return [{"type": "update", "room": room, "meta": patch}] if patch else []

    def lost(self) -> None:
        """The connection dropped: what was waiting on it is moot."""
        self.resuming.clear()
        self.background.clear()
