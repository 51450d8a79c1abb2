"""The HTTP side port (`--http`): health, readiness, Prometheus metrics, status, the web page.

An HTTP/1.1 server on trio and h11 (h11 parses; nothing here does). It is for operators,
load balancers, Prometheus and the browser page, never for the hot path, so it is plain:
one request per connection (``Connection: close``), GET and HEAD only (and POST under
``/api/``), small bounded requests, and a deadline on every connection, so a client that
stalls or sends junk costs one task for a few seconds and nobody else notices.

=================  ====================================================================
``/healthz``       200 ``ok``: the process and its event loop are alive
``/readyz``        200 ``ready`` while serving clients; 503 ``not ready: REASON`` while
                   starting or shutting down (take it out of the load balancer)
``/metrics``       Prometheus text format (:mod:`presenced.server.exporter`)
``/status``        JSON: node, links, replicas, counts (`presenced status URL` prints it)
``/client.json``   where the page's WebSocket should connect: region, node, ``ws://`` URL
``/``, ``/FILE``   the files of ``presenced/web/`` (the browser page)
``/api/v1/...``    the server API (:mod:`presenced.server.api`; 404 unless
                   ``--api-key-file`` is given): POST, JSON bodies up to 64 KiB
=================  ====================================================================
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import urllib.parse
from collections.abc import Mapping
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import h11
import trio
from prometheus_client.exposition import generate_latest

from presenced import __version__
from presenced.core import api_wire
from presenced.server.api import Api
from presenced.server.exporter import DaemonView, make_registry, readiness, status_document
from presenced.server.startup import open_listeners

if TYPE_CHECKING:
    from presenced.config import HostPort

__all__ = ["WEB_ROOT", "HttpSide", "Response", "serve_http"]

log = logging.getLogger(__name__)

#: The browser page and its assets (package data).
WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
#: Largest request line plus headers; larger gets 431 (h11 enforces it).
MAX_REQUEST_HEAD = 8192
#: Largest request body read (and thrown away) before answering; larger gets 413.
MAX_REQUEST_BODY = 8192
#: Seconds a client has to send its whole request, and to take the whole response.
REQUEST_TIMEOUT = 5.0
CONNECTION_TIMEOUT = 15.0
#: Connections served at once; more are closed at once (the side port is not for crowds).
MAX_CONNECTIONS = 128
#: Largest static file served.
MAX_FILE_BYTES = 16 * 1024 * 1024
RECEIVE_BYTES = 16_384

#: The text exposition format (0.0.4: every Prometheus version reads it).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_WILDCARDS = ("0.0.0.0", "::", "")


@attrs.frozen
class Response:
    """An answer to one request: status, body, content type and extra headers."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str, *headers: tuple[str, str]) -> Response:
        return cls(status, text.encode() + b"\n", headers=headers)

    @classmethod
    def json(cls, document: Any, status: int = 200) -> Response:
        body = json.dumps(document, indent=2, sort_keys=False).encode() + b"\n"
        return cls(status, body, "application/json")


def content_type(path: Path) -> str:
    suffix = path.suffix.lower()
    return (
        CONTENT_TYPES.get(suffix)
        or mimetypes.guess_type(path.name)[0]
        or ("application/octet-stream")
    )


def websocket_host(host_header: str | None, fallback: str) -> str:
    """The host part of a request's Host header (no port), or ``fallback`` if unusable.

    The page is served from the side port and connects its WebSocket to the client port on
    the same host name the browser used, so it works behind any name or address.
    """
    host = (host_header or "").strip()
    if host.startswith("["):
        name = host[: host.find("]") + 1]
    else:
        name = host.partition(":")[0] if host.count(":") <= 1 else ""
    if _HOST_NAME.fullmatch(name):
        return name
    if fallback in _WILDCARDS:
        return "127.0.0.1"
    return f"[{fallback}]" if ":" in fallback else fallback


class HttpSide:
    """The side port of one daemon. :meth:`respond` maps a request to a :class:`Response`;
    :meth:`serve` runs the HTTP server."""

    def __init__(
        self,
        daemon: DaemonView,
        *,
        web_root: Path = WEB_ROOT,
        request_timeout: float = REQUEST_TIMEOUT,
        connection_timeout: float = CONNECTION_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.daemon = daemon
        self.web_root = web_root
        self.request_timeout = request_timeout
        self.connection_timeout = connection_timeout
        self.max_connections = max_connections
        self.registry = make_registry(daemon)
        self.active = 0
        self.api = Api(daemon, daemon.config.api_key)

    # ------------------------------------------------------------------ routes

    async def respond(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes = b""
    ) -> Response:
        """The response to a request (before HEAD drops its body)."""
        if target.startswith("/api/"):
            path = urllib.parse.urlsplit(target).path
            status, document, extra = await self.api.answer(method, path, headers, body)
            return Response(status, _compact(document), "application/json", extra)
        if method not in ("GET", "HEAD"):
            return Response.text(405, "method not allowed", ("Allow", "GET, HEAD"))
        try:
            path = urllib.parse.unquote(urllib.parse.urlsplit(target).path, errors="strict")
        except (ValueError, UnicodeDecodeError):
            return Response.text(400, "bad request target")
        daemon = self.daemon
        if path == "/healthz":
            return Response.text(200, "ok")
        if path == "/readyz":
            reason = readiness(daemon)
            if reason is not None:
                return Response.text(503, f"not ready: {reason}")
            return Response.text(200, "ready")
        if path == "/metrics":
            return Response(200, generate_latest(self.registry), METRICS_CONTENT_TYPE)
        if path == "/status":
            return Response.json(status_document(daemon))
        if path == "/client.json":
            host = websocket_host(headers.get("host"), daemon.config.listen.host)
            return Response.json(
                {
                    "region": daemon.node.region,
                    "node": daemon.node.replica.node,
                    "websocket": f"ws://{host}:{daemon.client_port}/",
                }
            )
        return await self._static(path)

    async def _static(self, path: str) -> Response:
        file = self.static_file(path)
        if file is None:
            return Response.text(404, "not found")
        try:
            data = await trio.to_thread.run_sync(_read_small, file)
        except OSError:
            return Response.text(404, "not found")
        return Response(200, data, content_type(file))

    def static_file(self, path: str) -> Path | None:
        """The file under the web root that ``path`` (decoded) names, or None.

        Dot segments, hidden files, backslashes and NULs are refused outright, and the
        resolved file must still lie under the root (no escape through a symlink).
        """
        relative = "index.html" if path == "/" else path.removeprefix("/")
        parts = relative.split("/")
        if not path.startswith("/") or any(
            not part or part.startswith(".") or "\\" in part or "\0" in part for part in parts
        ):
            return None
        try:
            root = self.web_root.resolve(strict=True)
            file = root.joinpath(*parts).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not file.is_relative_to(root) or not file.is_file():
            return None
        return file

    # ------------------------------------------------------------------ HTTP/1.1

    async def serve(
        self,
        address: HostPort,
        listeners: list[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``address`` (or accept on ``listeners``, already bound to it) until
        cancelled; ``task_status.started`` gets the port."""
        if listeners is None:
            listeners = await open_listeners(address.host, address.port, "http")
        port = int(listeners[0].socket.getsockname()[1])
        host = f"[{address.host}]" if ":" in address.host else address.host
        log.info("http side port on http://%s:%d/", host, port)
        task_status.started(port)
        try:
            await trio.serve_listeners(self._connection, listeners)
        finally:
            for listener in listeners:
                await listener.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self.active >= self.max_connections:
            await stream.aclose()
            return
        self.active += 1
        try:
            with trio.move_on_after(self.connection_timeout):
                await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            log.exception("http side port: unexpected error; closing this connection")
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        """Read one request, send one response, close."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        request: h11.Request | None = None
        response: Response | None = None
        body = bytearray()
        limit = MAX_REQUEST_BODY
        with trio.move_on_after(self.request_timeout) as reading:
            while response is None:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    response = Response.text(exc.error_status_hint, "bad request")
                    break
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(RECEIVE_BYTES)
                    conn.receive_data(data)  # b"" tells h11 the client closed
                elif isinstance(event, h11.Request):
                    request = event
                    if event.target.startswith(b"/api/"):
                        limit = api_wire.MAX_BODY_BYTES  # the server API reads JSON bodies
                        if _content_length(event) > limit:
                            response = _api_too_large()
                    elif event.method not in (b"GET", b"HEAD"):
                        break  # answered at once: no need to read a body we refuse
                elif isinstance(event, h11.Data):
                    if len(body) + len(event.data) > limit:
                        too_large = limit == api_wire.MAX_BODY_BYTES
                        response = (
                            _api_too_large()
                            if too_large
                            else Response.text(413, "request body too large")
                        )
                    elif limit == api_wire.MAX_BODY_BYTES:
                        body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed, or PAUSED after a complete request
                    return
        if reading.cancelled_caught:
            if request is None:
                return  # nothing worth answering
            response = Response.text(408, "request timeout")
        if response is None:
            assert request is not None
            headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in request.headers
            }
            try:
                response = await self.respond(
                    request.method.decode("ascii", "replace"),
                    request.target.decode("ascii", "replace"),
                    headers,
                    bytes(body),
                )
            except Exception:
                log.exception("http side port: error answering %r", request.target)
                response = Response.text(500, "internal error")
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        # h11 knows a HEAD response has no body; it still gets the GET's headers.
        head = request is not None and request.method == b"HEAD"
        await self._send(stream, conn, response, head=head)

    async def _send(
        self, stream: trio.SocketStream, conn: h11.Connection, response: Response, *, head: bool
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Connection", "close"),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            ("Server", f"presenced/{__version__}"),
            *response.headers,
        ]
        reason = HTTPStatus(response.status).phrase.encode()
        event = h11.Response(status_code=response.status, headers=headers, reason=reason)
        data = conn.send(event) or b""
        if not head and response.body:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        # Half-close, then let the client read everything before the socket goes.
        await stream.send_eof()
        with trio.move_on_after(1):
            while await stream.receive_some(RECEIVE_BYTES):
                pass


def _compact(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


def _content_length(request: h11.Request) -> int:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # (h11 has checked it is a number)
    return 0


def _api_too_large() -> Response:
    message = f"the body is over {api_wire.MAX_BODY_BYTES} bytes"
    document = api_wire.error_document(api_wire.TOO_LARGE, message)
    return Response(413, _compact(document), "application/json")


def _read_small(path: Path) -> bytes:
    with path.open("rb") as file:
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(f"{path} is too large to serve")
    return data


async def serve_http(
    daemon: DaemonView,
    address: HostPort,
    listeners: list[trio.SocketListener] | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the side port of ``daemon`` on ``address`` until cancelled (``Daemon.serve`` does),
    on ``listeners`` if the daemon has bound them already."""
    await HttpSide(daemon).serve(address, listeners, task_status=task_status)
