"""Three real daemon processes with dev certificates, linked eu — us — ap over mutual TLS.

Everything runs on 127.0.0.1 through the CLI, as an operator would run it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from presenced.certs import init_ca, issue_node_cert
from presenced.client import PresenceClient, connect

#: Real daemon processes linked over TLS.
pytestmark = pytest.mark.slow

DOWN_AFTER = 1.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Region:
    def __init__(self, name: str, certs: Path, logs: Path) -> None:
        self.name = name
        self.certs = certs
        self.log = logs / f"{name}.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"wss://127.0.0.1:{self.peer_port}"

    def start(
        self,
        peers: list[Region],
        *,
        cert: str | None = None,
        ca: Path | None = None,
        data_dir: Path | None = None,
    ) -> None:
        cert = cert or self.name
        args = [
            sys.executable, "-m", "presenced", "run",
            "--region", self.name,
            "--listen", f"127.0.0.1:{self.client_port}",
            "--peer-listen", f"127.0.0.1:{self.peer_port}",
            "--tls-cert", str(self.certs / f"{cert}.pem"),
            "--tls-key", str(self.certs / f"{cert}.key"),
            "--tls-ca", str(ca or self.certs / "ca.pem"),
            "--allow-anonymous",
            "--tick-ms", "20",
            "--down-after", str(DOWN_AFTER),
            "--purge-after", "20",
        ]  # fmt: skip
        if peers:
            args += ["--peers", ",".join(p.peer_url for p in peers)]
        if data_dir is not None:
            args += ["--data-dir", str(data_dir)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(5)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def regions(tmp_path: Path) -> Iterator[dict[str, Region]]:
    certs = tmp_path / "certs"
    init_ca(certs)
    for name in ("eu", "us", "ap"):
        issue_node_cert(certs, name, hosts=("127.0.0.1",))
    made = {name: Region(name, certs, tmp_path) for name in ("eu", "us", "ap")}
    try:
        yield made
    finally:
        for region in made.values():
            region.stop()


async def wait_listening(port: int) -> None:
    with trio.fail_after(15):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
            else:
                await stream.aclose()
                return


async def wait_for(client: PresenceClient, room: str, users: set[str], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while set(client.presences(room)) != users:
            await trio.sleep(0.02)


@asynccontextmanager
async def client(url: str, user: str, room: str) -> AsyncIterator[PresenceClient]:
    async with connect(url, user=user) as c:
        await c.join(room, {"name": user})
        yield c


@contextmanager
def no_tracebacks(*regions: Region) -> Iterator[None]:
    yield
    for region in regions:
        assert "Traceback" not in region.logs(), region.logs()


async def test_line_of_three_regions_survives_the_middle_being_killed(
    regions: dict[str, Region],
) -> None:
    eu, us, ap = regions["eu"], regions["us"], regions["ap"]
    us.start([])
    eu.start([us])
    ap.start([us])
    for region in (eu, us, ap):
        await wait_listening(region.client_port)
    async with client(eu.url, "ann", "hq") as ann, client(ap.url, "bob", "hq") as bob:
        await wait_for(ann, "hq", {"ann", "bob"})
        await wait_for(bob, "hq", {"ann", "bob"})
        assert next(iter(bob.presences("hq")["ann"].values()))["region"] == "eu"
        await ann.update("hq", {"x": 42})
        with trio.fail_after(5):
            while next(iter(bob.presences("hq")["ann"].values()))["meta"].get("x") != 42:
                await trio.sleep(0.02)

        async with client(us.url, "cat", "hq") as cat:
            await wait_for(ann, "hq", {"ann", "bob", "cat"})
            await wait_for(cat, "hq", {"ann", "bob", "cat"})
            us.kill()
            # cat's daemon is gone and eu, ap lost their only link: within the down period
            # each side shows only its own users.
            await wait_for(ann, "hq", {"ann"}, timeout=DOWN_AFTER + 3)
            await wait_for(bob, "hq", {"bob"}, timeout=DOWN_AFTER + 3)

        us.start([])
        await wait_listening(us.client_port)
        # eu and ap redial us and see each other again (cat's old session is gone for good).
        await wait_for(ann, "hq", {"ann", "bob"}, timeout=20)
        await wait_for(bob, "hq", {"ann", "bob"}, timeout=20)
    for region in (eu, ap):
        assert region.stop() == 0
    assert "refused peer" not in eu.logs()


async def test_two_regions_streaming_cursors_see_every_last_move(
    regions: dict[str, Region],
) -> None:
    """Both sides stream a move every tick for a second: the peer links get paced, so each
    daemon waits for the other's batch on the socket itself (``wait_for_batches``), and
    every move is seen on the far side in order, the last one included."""
    eu, us = regions["eu"], regions["us"]
    us.start([])
    eu.start([us])
    for region in (eu, us):
        await wait_listening(region.client_port)
    async with client(eu.url, "ann", "hq") as ann, client(us.url, "bob", "hq") as bob:
        await wait_for(ann, "hq", {"ann", "bob"})
        await wait_for(bob, "hq", {"ann", "bob"})
        seen: dict[str, list[int]] = {"ann": [], "bob": []}

        def far_x(watcher: PresenceClient, user: str) -> int:
            return int(next(iter(watcher.presences("hq")[user].values()))["meta"].get("x", -1))

        async def stream(mover: PresenceClient, watcher: PresenceClient, user: str) -> None:
            for x in range(60):
                await mover.update("hq", {"x": x})
                seen[user].append(far_x(watcher, user))
                await trio.sleep(0.02)
            with trio.fail_after(5):
                while far_x(watcher, user) != 59:
                    await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream, ann, bob, "ann")
            nursery.start_soon(stream, bob, ann, "bob")
        for observed in seen.values():
            assert observed == sorted(observed)  # never backwards
            assert observed[-1] > 40  # and kept up while streaming
    for region in (eu, us):
        assert region.stop() == 0
        assert "Traceback" not in region.logs()


async def test_a_peer_with_a_certificate_from_another_ca_is_refused(
    regions: dict[str, Region], tmp_path: Path
) -> None:
    eu, us = regions["eu"], regions["us"]
    rogue = tmp_path / "rogue"
    init_ca(rogue)
    issue_node_cert(rogue, "eu", hosts=("127.0.0.1",))
    us.start([])
    await wait_listening(us.client_port)
    eu.certs = rogue  # same node name, certificate from the wrong CA
    eu.start([us], ca=regions["us"].certs / "ca.pem")
    await wait_listening(eu.client_port)
    async with client(eu.url, "ann", "hq") as ann, client(us.url, "cat", "hq") as cat:
        await trio.sleep(2 * DOWN_AFTER)
        assert set(ann.presences("hq")) == {"ann"}
        assert set(cat.presences("hq")) == {"cat"}
    with trio.fail_after(5):
        while "refused peer" not in us.logs():
            await trio.sleep(0.05)
    assert us.stop() == 0


async def test_direct_messages_cross_a_line_and_survive_a_kill_9(
    regions: dict[str, Region], tmp_path: Path
) -> None:
    eu, us, ap = regions["eu"], regions["us"], regions["ap"]
    us.start([])
    eu.start([us], data_dir=tmp_path / "eu-data")
    ap.start([us])
    for region in (eu, us, ap):
        await wait_listening(region.client_port)
    async with client(eu.url, "ann", "hq") as ann:
        async with client(ap.url, "bob", "hq") as bob:
            await wait_for(ann, "hq", {"ann", "bob"})
            sent = await ann.send_direct("bob", {"text": "across two hops"})
            message = await bob.next_message("message")
            assert message["data"] == {"text": "across two hops"} and message["region"] == "eu"
            with trio.fail_after(5):
                await sent.wait(lambda s: "bob" in s.delivered)
            assert sent.delivered == {"bob": {"ap"}}
            await bob.mark_read(message["id"])
            with trio.fail_after(5):
                await sent.wait(lambda s: "bob" in s.read_by)
        # bob is offline now: reliable messages wait in eu's store, which survives kill -9.
        await wait_for(ann, "hq", {"ann"})
        for i in range(3):
            stored = await ann.send_direct("bob", {"n": i}, mode="reliable")
            assert stored.id is not None
    eu.kill()
    eu.start([us], data_dir=tmp_path / "eu-data")
    await wait_listening(eu.client_port)
    async with client(ap.url, "bob", "hq") as bob:
        got = []
        with trio.fail_after(15):
            while len(got) < 3:
                got.append((await bob.next_message("message"))["data"]["n"])
        assert got == [0, 1, 2]
        await trio.sleep(1)
        assert bob.duplicates == 0  # the daemons did not send anything twice
    with no_tracebacks(eu, us, ap):
        pass


def test_peers_need_tls_files(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "presenced", "run", "--peers", "wss://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PRESENCED_ALLOW_ANONYMOUS": "1"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "tls" in result.stderr.lower()
