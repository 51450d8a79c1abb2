"""The real `presenced` process: start it, use it, stop it with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from presenced.client import PresenceClient, connect

ROOT = Path(__file__).resolve().parents[1]

#: Real daemon processes.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]


def clean_env() -> dict[str, str]:
    """The environment without a developer's own PRESENCED_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PRESENCED_")}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def daemon_process(tmp_path: Path, *args: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """`python -m presenced run ... --listen 127.0.0.1:PORT`, once it accepts connections."""
    port = free_port()
    log_path = tmp_path / "presenced.log"
    command = [sys.executable, "-m", "presenced", "run", "--listen", f"127.0.0.1:{port}", *args]
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            command, cwd=ROOT, env=clean_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:
        with trio.fail_after(15):  # interpreter start-up and imports, on a slow machine
            while True:
                if process.returncode is not None or process.poll() is not None:
                    pytest.fail(f"presenced exited early:\n{log_path.read_text()}")
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await probe.aclose()
                break
        yield process, port
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()


async def close_code(client: PresenceClient) -> int:
    try:
        while True:
            await client.next_message()
    except ConnectionClosed:
        pass
    assert client.closed is not None
    return client.closed.reason.code


async def test_daemon_serves_clients_and_stops_on_sigterm(tmp_path: Path) -> None:
    async with daemon_process(tmp_path, "--allow-anonymous", "--tick-ms", "20") as (proc, port):
        url = f"ws://127.0.0.1:{port}"
        async with connect(url, user="ann") as ann, connect(url, user="bob") as bob:
            with trio.fail_after(5):
                await ann.join("room", {"x": 0})
                await bob.join("room")
                while "bob" not in ann.presences("room"):
                    await ann.next_message()
                await ann.update("room", {"x": 42})
                while bob.presences("room").get("ann", {}).get(ann.session, {}).get("meta") != {
                    "x": 42
                }:
                    await bob.next_message()

            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(3):
                assert await close_code(ann) == 1001
                assert await close_code(bob) == 1001
                await proc.wait()
        assert proc.returncode == 0, (tmp_path / "presenced.log").read_text()
    log = (tmp_path / "presenced.log").read_text()
    assert "Traceback" not in log


async def test_bad_listen_address_is_a_one_line_error() -> None:
    with trio.fail_after(15):
        result = await trio.run_process(
            [sys.executable, "-m", "presenced", "run", "--allow-anonymous", "--listen", "nonsense"],
            cwd=ROOT,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "--listen" in lines[0] and "nonsense" in lines[0]


def test_a_bad_message_store_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "messages.sqlite3").write_text("not a database")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "presenced",
            "run",
            "--allow-anonymous",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        cwd=ROOT,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error == (
        f"Error: cannot open the message store: --data-dir: {tmp_path}/messages.sqlite3:"
        " not a presenced message store (not an SQLite database)"
    )
