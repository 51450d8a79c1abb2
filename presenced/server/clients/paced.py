"""The client connections the node's ticker reads at tick boundaries (paced clients).

A client that streams updates has its reader task park while the ticker reads its socket once
per tick boundary (see :mod:`presenced.server.clients.connection`): the daemon wakes once per
tick for all its busy clients instead of once per message.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Iterator
from typing import Protocol


class PacedReader(Protocol):
    """A connection as the ticker reads it (:class:`~presenced.server.clients.ClientConnection`)."""

    def poll_input(self) -> None:
        """Read and handle what the socket holds (it has input)."""
        ...

    def quiet_tick(self) -> None:
        """A boundary found nothing from it."""
        ...


class PacedClients:
    """The connections the ticker reads at tick boundaries (see the module docstring).

    One ``epoll_wait`` with no timeout tells which of them sent something: quiet ones cost
    no failed read. (A client streaming cursor moves at 20 Hz has nothing for a third of the
    33 Hz ticks.) A connection leaves before its socket is closed, so a descriptor number the
    kernel reuses never reaches the wrong connection. The epoll descriptor exists only while
    some connection is paced.
    """

    def __init__(self) -> None:
        self._fds: dict[PacedReader, int] = {}
        self._epoll: select.epoll | None = None

    def __bool__(self) -> bool:
        return bool(self._fds)

    def __iter__(self) -> Iterator[PacedReader]:
        return iter(list(self._fds))

    def add(self, conn: PacedReader, fd: int) -> None:
        if conn not in self._fds:
            if self._epoll is None:
                self._epoll = select.epoll()
            try:
                self._epoll.register(fd, select.EPOLLIN)
            except FileExistsError:  # (cannot happen while connections leave before closing)
                self._epoll.modify(fd, select.EPOLLIN)
            self._fds[conn] = fd

    def discard(self, conn: PacedReader) -> None:
        fd = self._fds.pop(conn, None)
        if fd is not None and self._epoll is not None:
            if not self._fds:
                self._epoll.close()
                self._epoll = None
            else:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)

    def read(self) -> None:
        """Read every paced connection that has input; count a quiet tick for the others."""
        if self._epoll is None:
            return
        ready = {fd for fd, _ in self._epoll.poll(0)}
        for conn, fd in list(self._fds.items()):
            if fd in ready:
                conn.poll_input()
            else:
                conn.quiet_tick()
