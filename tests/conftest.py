"""Shared fixtures: an in-process daemon on 127.0.0.1 with an OS-chosen port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio

from presenced.config import Config, HostPort
from presenced.core.limits import Limits
from presenced.server.daemon import Daemon


@attrs.frozen
class Running:
    """A daemon serving clients in the test's nursery, and the URL to reach it."""

    daemon: Daemon
    url: str


StartDaemon = Callable[..., Awaitable[Running]]


def _config(**overrides: Any) -> Config:
    limits = overrides.pop("limits", None)
    if isinstance(limits, dict):
        limits = Limits(**limits)
    options: dict[str, Any] = {
        "region": "test",
        "listen": HostPort("127.0.0.1", 0),
        "allow_anonymous": True,
        "tick_ms": 20,
        "limits": limits or Limits(),
    }
    options.update(overrides)
    return Config(**options)


@pytest.fixture
def make_config() -> Callable[..., Config]:
    """``make_config(**overrides)``: a test daemon's `Config` (see `start_daemon`).

    For tests that run their daemon in a nursery of their own, like Hypothesis tests (each
    example is a separate trio run, so it cannot use the `nursery` fixture).
    """
    return _config


@pytest.fixture
def start_daemon(nursery: trio.Nursery) -> StartDaemon:
    """Factory: ``await start_daemon(**config_overrides)`` starts one more daemon.

    Defaults: region "test", anonymous clients allowed, a 20 ms tick, port 0 on 127.0.0.1.
    ``limits`` may be a `Limits` or a dict of `Limits` fields. Every daemon stops when the
    test ends (its nursery is cancelled).
    """

    async def start(**overrides: Any) -> Running:
        daemon = Daemon(_config(**overrides))
        await nursery.start(daemon.serve)
        return Running(daemon, f"ws://127.0.0.1:{daemon.client_port}")

    return start


@pytest.fixture
async def server(start_daemon: StartDaemon) -> Running:
    """A daemon with the default configuration of `start_daemon`."""
    return await start_daemon()


@pytest.fixture
def url(server: Running) -> str:
    """The ``ws://`` URL of the `server` fixture."""
    return server.url
