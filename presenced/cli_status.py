"""`presenced status URL`: ask a daemon's HTTP side port for /status and print it readably.

Registered on the main command group by `presenced.cli`. Uses only the standard library's
urllib, so it works anywhere the package is installed, against any daemon started with
``--http``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import click

__all__ = ["fetch_status", "render", "status", "status_url"]


def status_url(url: str) -> str:
    """The /status URL for a base URL (``http://host:8400``, ``host:8400``) or a full one."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.ClickException(f"not an http:// URL: {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/status"):
        path += "/status"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def fetch_status(url: str, timeout: float) -> dict[str, Any]:
    """GET the status document; any failure is a one-line `click.ClickException`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read(16 * 1024 * 1024)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"{url} answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise click.ClickException(f"cannot reach {url}: {_reason(exc.reason)}") from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot reach {url}: {_reason(exc)}") from None
    try:
        document = json.loads(body)
    except ValueError:
        raise click.ClickException(f"{url} did not answer with JSON") from None
    if not isinstance(document, dict) or "node" not in document:
        raise click.ClickException(f"{url} did not answer with a presenced status document")
    return document


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    if isinstance(reason, TimeoutError):
        return "timed out"
    return " ".join(str(reason).split()) or type(reason).__name__


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{seconds:.1f}s"


def _bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _link_kind(dialed: bool | None) -> str:
    """Who opened a direct link; "-" for a peer known without one (relayed or down)."""
    if dialed is None:
        return "-"
    return "dialed" if dialed else "accepted"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def render(doc: dict[str, Any]) -> str:
    """The status document as a few readable lines and tables."""
    lines = []
    ready = "ready" if doc.get("ready") else f"NOT READY ({doc.get('not_ready_reason')})"
    lines.append(
        f"{doc.get('replica', doc['node'])}  region {doc.get('region')}  "
        f"version {doc.get('version')}  up {_duration(doc.get('uptime_s'))}  {ready}"
    )
    listen = doc.get("listen") or {}
    lines.append(
        "listening: "
        + "  ".join(f"{name} {listen.get(name) or '-'}" for name in ("client", "peer", "http"))
    )
    lines.append(
        f"connections {doc.get('connections', 0)}  rooms {doc.get('rooms', 0)}"
        f"  presences {doc.get('presences', 0)}"
    )
    messages = doc.get("messages") or {}
    errors = messages.get("errors") or {}
    error_text = ", ".join(f"{code} {count}" for code, count in errors.items()) or "none"
    lines.append(
        "direct messages: "
        + "  ".join(f"{name} {messages.get(name, 0)}" for name in ("sent", "routed", "stored"))
        + f"  delivered {messages.get('delivered', 0)}  errors {error_text}"
    )

    peers = doc.get("peers") or []
    lines.append("")
    if peers:
        rows = [
            [
                peer["node"],
                peer.get("region", ""),
                peer.get("state", ""),
                "-" if peer.get("rtt_ms") is None else f"{peer['rtt_ms']:.1f} ms",
                _link_kind(peer.get("dialed")),
                _bytes(peer.get("bytes_in")),
                _bytes(peer.get("bytes_out")),
            ]
            for peer in peers
        ]
        lines += _table(["PEER", "REGION", "STATE", "RTT", "LINK", "IN", "OUT"], rows)
    configured = doc.get("configured_peers") or []
    if not any(peer.get("state") == "up" for peer in peers):
        text = "no peer links up" if peers or configured else "no peers"
        if configured:
            text += f" (configured: {', '.join(configured)})"
        lines += ["", text] if peers else [text]

    replicas = doc.get("replicas") or []
    if replicas:
        lines.append("")
        rows = [
            [
                replica["replica"] + (" (this daemon)" if replica.get("local") else ""),
                replica.get("region", ""),
                replica.get("status", ""),
                "-" if replica.get("local") else _duration(replica.get("seconds_since_heard")),
                str(replica.get("entries", 0)),
            ]
            for replica in replicas
        ]
        lines += _table(["REPLICA", "REGION", "STATUS", "HEARD", "PRESENCES"], rows)

    routes = doc.get("routes")
    if routes:
        lines.append("")
        lines.append("ROUTES")
        for dest, path in sorted(routes.items()):
            lines.append(f"  {dest}: {' -> '.join(path)}")
    return "\n".join(lines)


@click.command(short_help="Show a running daemon's status (from its --http side port).")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status document.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the answer.",
)
def status(url: str, as_json: bool, timeout: float) -> None:
    """Show who a daemon is, its peer links, the replicas it knows and its counts.

    URL is the daemon's HTTP side port (its --http address), like http://127.0.0.1:8400 or
    127.0.0.1:8400; /status is added unless the URL already ends with it. Exit status 1 if
    the daemon cannot be reached.
    """
    target = status_url(url)
    document = fetch_status(target, timeout)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(render(document))
