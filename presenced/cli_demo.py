"""`presenced demo`: three regions (eu, us, ap) in one process, linked over mutual TLS.

Everything a real deployment has, on 127.0.0.1: a throwaway CA and node certificates (made
with `presenced.certs` in a temporary directory that is removed on exit), peer links over
mutually authenticated TLS in a triangle or a line, an HTTP side port per region serving the
web page, and optionally a delay on every link (`--wan-delay-ms`) so that cross-region
behaviour is visible on one machine. Anonymous clients are allowed: it is a demo.

Ports, from ``--port-base P`` (default 7400): clients on P+1..P+3, peers on P+101..P+103, HTTP
on P+1001..P+1003 (so the pages are http://127.0.0.1:8401/ to :8403/). ``--port-base 0``
picks free ports (the printed URLs say which).
"""

from __future__ import annotations

import logging
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import click
import trio

from presenced.config import LOG_FORMATS, LOG_LEVELS, Config, HostPort
from presenced.server.messaging import StoreError

if TYPE_CHECKING:
    from presenced.server.daemon import Daemon

__all__ = ["REGIONS", "TOPOLOGIES", "demo", "links_of"]

log = logging.getLogger("presenced.demo")

REGIONS = ("eu", "us", "ap")
TOPOLOGIES = {
    "triangle": (("eu", "us"), ("eu", "ap"), ("us", "ap")),
    "line": (("eu", "us"), ("us", "ap")),
}
HOST = "127.0.0.1"
#: Offsets from --port-base of the first client, peer and HTTP port.
CLIENT_OFFSET, PEER_OFFSET, HTTP_OFFSET = 1, 101, 1001
DEMO_FORMAT = "%(asctime)s.%(msecs)03d %(region)-2s %(levelname)-7s %(message)s"


def links_of(topology: str) -> dict[str, list[str]]:
    """For each region, the regions it dials: only ones started before it (listed earlier),
    so their peer ports are known when it starts."""
    dials: dict[str, list[str]] = {name: [] for name in REGIONS}
    for a, b in TOPOLOGIES[topology]:
        first, second = sorted((a, b), key=REGIONS.index)
        dials[second].append(first)
    return dials


def _port(base: int, offset: int, index: int) -> int:
    return 0 if base == 0 else base + offset + index


async def _serve_region(name: str, config: Config, *, task_status: trio.TaskStatus[Daemon]) -> None:
    """Make and run one daemon, with its log lines stamped with its region."""
    from presenced.logs import REGION
    from presenced.server.daemon import Daemon

    REGION.set(name)
    await Daemon(config).serve(task_status=task_status)


async def _run(
    certs: Path,
    *,
    topology: str,
    delay: float,
    port_base: int,
    data_dir: Path | None,
    log_level: str,
    log_format: str,
) -> None:
    from presenced.wan_delay import serve_delay_proxy

    dials = links_of(topology)
    daemons: dict[str, Daemon] = {}
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as proxies:
            async with trio.open_nursery() as regions:
                for index, name in enumerate(REGIONS):
                    peers = []
                    for other in dials[name]:
                        port = daemons[other].peer_port
                        assert port is not None
                        if delay > 0:
                            port = await proxies.start(serve_delay_proxy, HOST, port, delay)
                        peers.append(f"wss://{HOST}:{port}")
                    config = Config(
                        region=name,
                        node=name,
                        listen=HostPort(HOST, _port(port_base, CLIENT_OFFSET, index)),
                        peer_listen=HostPort(HOST, _port(port_base, PEER_OFFSET, index)),
                        http=HostPort(HOST, _port(port_base, HTTP_OFFSET, index)),
                        peers=tuple(peers),
                        tls_cert=certs / f"{name}.pem",
                        tls_key=certs / f"{name}.key",
                        tls_ca=certs / "ca.pem",
                        allow_anonymous=True,
                        log_level=log_level,
                        log_format=log_format,
                        data_dir=None if data_dir is None else data_dir / name,
                    )
                    try:
                        daemons[name] = await regions.start(_serve_region, name, config)
                    except* OSError as group:
                        ports = [config.listen, config.peer_listen, config.http]
                        reasons = "; ".join(
                            getattr(exc, "strerror", None) or str(exc) for exc in _leaves(group)
                        )
                        raise OSError(
                            f"region {name} on {', '.join(map(str, ports))}: {reasons}"
                        ) from None
                _banner(daemons, topology, delay)
                async for signum in signals:
                    log.info("received %s: stopping all three regions", signal.Signals(signum).name)
                    break
                for daemon in daemons.values():
                    daemon.shutdown()
                # A second Ctrl-C stops at once instead of waiting for the goodbyes.
                regions.start_soon(_second_signal, signals, regions.cancel_scope)
                with trio.move_on_after(10):
                    while any(daemon.running for daemon in daemons.values()):
                        await trio.sleep(0.05)
                regions.cancel_scope.cancel()
            proxies.cancel_scope.cancel()


async def _second_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


def _banner(daemons: dict[str, Daemon], topology: str, delay: float) -> None:
    links = ", ".join(f"{a}-{b}" for a, b in TOPOLOGIES[topology])
    latency = f", {delay * 1000:g} ms each way" if delay else ""
    lines = [
        f"presenced demo: regions {', '.join(REGIONS)} on {HOST}; peer links {links}"
        f" (mutual TLS{latency})",
        "",
    ]
    first_http = None
    for name, daemon in daemons.items():
        page = f"http://{HOST}:{daemon.http_port}/"
        first_http = first_http or page
        lines.append(f"  {name}  {page:<28} ws://{HOST}:{daemon.client_port}/")
    lines += [
        "",
        "Open two of the pages side by side: each is a client of its own region.",
        f"Status of a region: presenced status {first_http}",
        "Stop: Ctrl-C",
    ]
    click.echo("\n".join(lines))


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _make_certs(folder: Path) -> None:
    from presenced.certs import init_ca, issue_node_cert

    init_ca(folder, name="presenced demo CA", days=1)
    for name in REGIONS:
        issue_node_cert(folder, name, hosts=(HOST, "localhost"), days=1)


@click.command(short_help="Run three linked regions (eu, us, ap) in one process, with pages.")
@click.option(
    "--topology",
    type=click.Choice(sorted(TOPOLOGIES)),
    default="triangle",
    show_default=True,
    help="Peer links: triangle (every region linked to both others) or line (eu-us-ap: eu and"
    " ap only reach each other through us).",
)
@click.option(
    "--wan-delay-ms",
    type=click.IntRange(0, 10_000),
    default=0,
    show_default=True,
    help="Delay added to each direction of each peer link, in milliseconds, to make the"
    " regions feel far apart.",
)
@click.option(
    "--port-base",
    type=click.IntRange(0, 65535 - 1003),
    default=7400,
    show_default=True,
    help="Clients on BASE+1..3, peers on BASE+101..103, pages on BASE+1001..1003. 0 picks"
    " free ports.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep each region's reliable messages in DIR/REGION. Default: in memory.",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="Least severe log messages to print.",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    default="text",
    show_default=True,
    help="Text lines prefixed with the region, or JSON lines with a region field.",
)
def demo(
    topology: str,
    wan_delay_ms: int,
    port_base: int,
    data_dir: Path | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run three regions, eu, us and ap, in one process on 127.0.0.1, linked over mutual TLS
    with a throwaway CA, each with a web page to open in the browser.

    Anonymous clients are allowed, so this is for trying presenced out, not for production.
    Ctrl-C stops all three and removes the temporary certificates.
    """
    from presenced.logs import configure_logging

    log_level, log_format = log_level.lower(), log_format.lower()
    configure_logging(
        log_level, log_format, text_format=DEMO_FORMAT, datefmt="%H:%M:%S", regions=True
    )
    if data_dir is not None:
        try:
            for name in REGIONS:
                (data_dir / name).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise click.ClickException(f"--data-dir: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="presenced-demo-") as folder:
        certs = Path(folder)
        log.info("demo certificates in %s (removed on exit)", certs)
        try:
            _make_certs(certs)
            trio.run(
                lambda: _run(
                    certs,
                    topology=topology,
                    delay=wan_delay_ms / 1000,
                    port_base=port_base,
                    data_dir=data_dir,
                    log_level=log_level,
                    log_format=log_format,
                )
            )
        except* KeyboardInterrupt:
            pass  # Ctrl-C before the signal handlers were in place
        except* OSError as group:
            reason = "; ".join(str(exc) for exc in _leaves(group))
            raise click.ClickException(
                f"cannot start the demo: {reason} (another --port-base, or 0 for free ports)"
            ) from None
        except* StoreError as group:
            reason = "; ".join(str(exc) for exc in _leaves(group))
            raise click.ClickException(f"cannot start the demo: --data-dir: {reason}") from None
    log.info("demo stopped; removed %s", certs)
