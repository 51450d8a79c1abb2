"""The daemon: listeners, the ticker, signals and graceful shutdown around one :class:`Node`.

Wiring: the daemon builds the node, the client sessions and paced clients, the messenger
and (with peers) the peer manager; hands the last two to the node in one call
(:meth:`Node.wire`); gives each client connection the sessions and paced clients, and the
peer manager the sessions; and runs the :class:`Ticker` over the node, its peer layer and
its paced clients. No part sets itself on another.

Shutdown order (SIGINT/SIGTERM, or :meth:`Daemon.shutdown`): stop accepting, close every
client with 1001 ("going away") so they reconnect elsewhere, give their tasks a short grace
period to write the close frames, then stop.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time

import trio

from presenced.config import Config
from presenced.core.crdt import ReplicaId
from presenced.core.ws_frames import CloseCode
from presenced.server.clients import ClientConnection, PacedClients, Sessions
from presenced.server.messaging import MessageStore, Messenger
from presenced.server.node import Node
from presenced.server.peers import PeerManager, PeerTransport
from presenced.server.startup import load_tls, node_cert_warning, open_listeners
from presenced.server.ticker import Ticker

log = logging.getLogger(__name__)

#: Seconds clients get to receive their close frames at shutdown.
SHUTDOWN_GRACE_S = 2.0


def new_incarnation() -> int:
    """A fresh incarnation number: later starts get larger numbers (microseconds since 1970)."""
    return time.time_ns() // 1000


class Daemon:
    """One running presenced: its node, its client listener and its lifecycle."""

    def __init__(
        self,
        config: Config,
        *,
        incarnation: int | None = None,
        transport: PeerTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        replica = ReplicaId(config.node, new_incarnation() if incarnation is None else incarnation)
        self.node = Node(config, replica)
        #: Client liveness (pings, dead connections) and sessions waiting to be resumed.
        self.sessions = Sessions(self.node)
        #: Connections whose input the ticker reads at tick boundaries (they stream updates).
        self.paced = PacedClients()
        # The TLS files are checked before anything else is opened: a bad one is a
        # StartupError (one line at the command line), and nothing is left to close.
        if transport is None and (config.peers or config.peer_listen is not None):
            transport = _tls_transport(config)
        self.transport = transport
        self.store = _open_store(config)
        self.messenger = Messenger(self.node, self.store)
        self.client_port: int | None = None
        self.peer_port: int | None = None
        self.http_port: int | None = None
        self.running = False
        self._stopping = trio.Event()
        self.peers: PeerManager | None = None
        if transport is not None:
            self.peers = PeerManager(
                self.node,
                transport,
                config,
                self.sessions,
                accept=config.peer_listen is not None or not config.peers,
                rng=rng,
            )
        self.node.wire(gossip=self.peers, messenger=self.messenger, sessions=self.sessions)
        self.ticker = Ticker(self.node, self.peers, self.paced)

    def _transport_running(self) -> contextlib.AbstractAsyncContextManager[object]:
        """The TLS transport keeps dialled channels' tasks in a nursery of its own."""
        from presenced.server.peers.tls import TlsWebSocketTransport

        if isinstance(self.transport, TlsWebSocketTransport):
            return self.transport.running()
        return contextlib.nullcontext()

    async def serve(
        self,
        *,
        handle_signals: bool = False,
        listen_clients: bool = True,
        task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until shutdown; ``task_status.started`` fires once clients can connect.

        ``listen_clients=False`` runs without a client socket (simulated clusters attach
        clients to the node directly).

        Every listener (clients, peers, HTTP) is bound before anything is started or said
        about serving: an address that cannot be used ends the start with a
        :class:`~presenced.server.startup.ListenError` naming its option, and no half-started
        daemon logs "accepting peers" or "up" first.
        """
        config = self.config
        listeners: list[trio.SocketListener] = []
        http_listeners: list[trio.SocketListener] = []
        bound: list[trio.SocketListener] = []  # all of them, closed at the end whatever happens
        self.running = True
        try:
            if listen_clients:
                listeners = await open_listeners(config.listen.host, config.listen.port, "listen")
                bound += listeners
                self.client_port = listeners[0].socket.getsockname()[1]
            bound += await self._bind_peers()
            if config.http is not None:
                http_listeners = await open_listeners(config.http.host, config.http.port, "http")
                bound += http_listeners
            async with self._transport_running(), trio.open_nursery() as nursery:
                nursery.start_soon(self.ticker.run)
                nursery.start_soon(self.messenger.run)
                nursery.start_soon(self.sessions.run)
                await nursery.start(self.node.tokens.run)  # a JWKS's first load
                if self.peers is not None:
                    self.peer_port = await nursery.start(self.peers.run)
                if config.http is not None:
                    from presenced.server.http_side import serve_http

                    self.http_port = await nursery.start(
                        serve_http, self, config.http, http_listeners
                    )
                async with trio.open_nursery() as connections:
                    accepting = trio.CancelScope()
                    if listeners:
                        nursery.start_soon(self._accept, listeners, connections, accepting)
                    if handle_signals:
                        # Handlers in place before "up" is logged: a SIGTERM right after
                        # it is a graceful shutdown, not the default kill.
                        await nursery.start(self._watch_signals)
                    if config.data_dir is None:
                        log.warning(
                            "no --data-dir: reliable direct messages are kept in memory and"
                            " lost on restart"
                        )
                    log.info(
                        "presenced %s (region %s) up: clients on %s:%s, peers on %s",
                        self.node.replica,
                        config.region,
                        config.listen.host,
                        self.client_port,
                        self.peer_port,
                    )
                    task_status.started(self)
                    await self._stopping.wait()
                    accepting.cancel()
                    self.sessions.shutdown()  # no session waits to be resumed any more
                    self.node.remove_all_local()  # (peers hear it before the links close)
                    if self.peers is not None:
                        await self.peers.say_goodbye()
                    log.info("shutting down: closing %d clients", len(self.node.connections))
                    self.node.close_all(CloseCode.GOING_AWAY, "server shutting down")
                    with trio.move_on_after(SHUTDOWN_GRACE_S):
                        while self.node.connections:
                            await trio.sleep(0.01)
                    connections.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
        finally:
            self.running = False
            for listener in bound:  # their servers close them, unless a later bind failed
                listener.socket.close()
            self.store.close()
        log.info("presenced stopped")

    async def _bind_peers(self) -> list[trio.SocketListener]:
        """Bind the TLS transport's peer listener now (other transports bind in ``serve``)."""
        from presenced.server.peers.tls import TlsWebSocketTransport

        if self.peers is None or not self.peers.accept:
            return []
        if not isinstance(self.transport, TlsWebSocketTransport):
            return []
        return await self.transport.listen()

    async def _accept(
        self,
        listeners: list[trio.SocketListener],
        connections: trio.Nursery,
        scope: trio.CancelScope,
    ) -> None:
        with scope:
            try:
                await trio.serve_listeners(self._handle, listeners, handler_nursery=connections)
            finally:
                for listener in listeners:
                    await listener.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        await ClientConnection(
            self.node, stream, peer, sessions=self.sessions, paced=self.paced
        ).serve()

    @property
    def stopping(self) -> bool:
        """True once a shutdown has begun (the side port's /readyz then says 503)."""
        return self._stopping.is_set()

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._stopping.set()

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                self.shutdown()
                return


def _open_store(config: Config) -> MessageStore:
    """The reliable-message store: durable in --data-dir, else in memory (``serve`` warns)."""
    if config.data_dir is None:
        return MessageStore(
            ":memory:",
            max_pending_per_recipient=config.message_max_pending,
            max_age_s=config.message_max_age_s,
        )
    return MessageStore.in_dir(
        config.data_dir,
        max_pending_per_recipient=config.message_max_pending,
        max_age_s=config.message_max_age_s,
    )


def _tls_transport(config: Config) -> PeerTransport:
    """The production peer transport: WebSocket over mutually authenticated TLS.

    The TLS files are loaded here, at start, so a bad one stops the start (StartupError)
    rather than failing every link later; a certificate that does not name this node is
    only warned about (peers will refuse its links, but the clients' side still works).
    """
    from presenced.server.peers.tls import TlsWebSocketTransport

    if config.tls_cert is None or config.tls_key is None or config.tls_ca is None:
        raise ValueError("peer links need --tls-cert, --tls-key and --tls-ca")
    tls = load_tls(config.tls_cert, config.tls_key, config.tls_ca)
    warning = node_cert_warning(config.node, config.tls_cert, tls.names)
    if warning is not None:
        log.warning("%s", warning)
    listen = config.peer_listen
    return TlsWebSocketTransport(
        listen_host=listen.host if listen else "127.0.0.1",
        listen_port=listen.port if listen else 0,
        server_ctx=tls.server_ctx,
        client_ctx=tls.client_ctx,
    )


async def run_daemon(config: Config) -> None:
    """Entry point of `presenced run`: serve until SIGINT or SIGTERM."""
    await Daemon(config).serve(handle_signals=True)
