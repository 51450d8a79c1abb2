"""`presenced demo` as a user runs it: a real process, three regions, pages, clients, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from presenced.cli_demo import links_of
from presenced.client import connect

#: The demo runs three real daemon processes.
pytestmark = pytest.mark.slow

URL_LINE = re.compile(r"^\s+(eu|us|ap)\s+(http://\S+/)\s+(ws://\S+/)\s*$")
CERTS_LINE = re.compile(r"demo certificates in (\S+) \(removed on exit\)")


class Output:
    """Collects a process's output lines from a thread, for polling from trio."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    async def wait_for(self, pattern: re.Pattern[str], count: int = 1) -> list[re.Match[str]]:
        with trio.fail_after(20):
            while True:
                found = [m for line in list(self.lines) if (m := pattern.search(line))]
                if len(found) >= count:
                    return found
                await trio.sleep(0.05)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def test_demo_runs_three_linked_regions_and_stops_cleanly_on_ctrl_c() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCED_")}
    args = [sys.executable, "-m", "presenced", "demo", "--port-base", "0", "--wan-delay-ms", "20"]
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    output = Output(process)
    try:
        [certs_match] = await output.wait_for(CERTS_LINE)
        certs = Path(certs_match.group(1))
        pages = {m.group(1): (m.group(2), m.group(3)) for m in await output.wait_for(URL_LINE, 3)}
        assert set(pages) == {"eu", "us", "ap"}
        assert certs.is_dir() and (certs / "ca.pem").is_file()
        html = await trio.to_thread.run_sync(get_text, pages["eu"][0])
        assert html.lstrip().lower().startswith("<!doctype html")  # the page is served
        for page, _ in pages.values():
            assert await trio.to_thread.run_sync(get_text, page + "healthz") == "ok\n"
            client = await trio.to_thread.run_sync(get_json, page + "client.json")
            assert client["websocket"] == pages[client["region"]][1]
        # Within a few seconds every region has both others as peers (with a measured round
        # trip) and replicas, up.
        with trio.fail_after(10):
            while True:
                statuses = [
                    await trio.to_thread.run_sync(get_json, page + "status")
                    for page, _ in pages.values()
                ]
                if all(
                    len([p for p in s["peers"] if p["state"] == "up" and p["rtt_ms"]]) == 2
                    and len([r for r in s["replicas"] if r["status"] == "up"]) == 3
                    for s in statuses
                ):
                    break
                await trio.sleep(0.1)
        # The links go through the 20 ms delay proxies: a round trip takes at least 40 ms.
        assert min(p["rtt_ms"] for s in statuses for p in s["peers"]) >= 40
        async with (
            connect(pages["eu"][1], user="ann") as ann,
            connect(pages["ap"][1], user="bob") as bob,
        ):
            await ann.join("lobby", {"name": "Ann"})
            await bob.join("lobby", {"name": "Bob"})
            with trio.fail_after(5):
                while {*ann.presences("lobby"), *bob.presences("lobby")} != {"ann", "bob"} or (
                    len(ann.presences("lobby")) != 2 or len(bob.presences("lobby")) != 2
                ):
                    await trio.sleep(0.02)
            [bob_entry] = ann.presences("lobby")["bob"].values()
            assert bob_entry["region"] == "ap"
        process.send_signal(signal.SIGINT)
        code = await trio.to_thread.run_sync(lambda: process.wait(15))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    text = output.text()
    assert code == 0, text
    assert not certs.exists(), text
    assert "Traceback" not in text, text
    assert re.search(r"^\S+ eu INFO +peer link up: ", text, re.MULTILINE), text
    assert "demo stopped" in text


def test_a_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "presenced", "demo", "--port-base", str(port - 1)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith(f"Error: cannot start the demo: region eu on 127.0.0.1:{port}, ")
    assert error.endswith(": Address already in use (another --port-base, or 0 for free ports)")
    assert "Traceback" not in result.stderr


def test_a_bad_data_dir_is_a_one_line_error_and_the_certificates_go(tmp_path: Path) -> None:
    (tmp_path / "us").mkdir()
    (tmp_path / "us" / "messages.sqlite3").write_text("not a database")
    result = subprocess.run(
        [sys.executable, "-m", "presenced", "demo", "--port-base", "0", "--data-dir", tmp_path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error == (
        f"Error: cannot start the demo: --data-dir: {tmp_path}/us/messages.sqlite3:"
        " not a presenced message store (not an SQLite database)"
    )
    match = CERTS_LINE.search(result.stderr)
    assert match, result.stderr
    assert not Path(match.group(1)).exists()


def test_links_of_each_topology_dial_only_earlier_regions() -> None:
    assert links_of("triangle") == {"eu": [], "us": ["eu"], "ap": ["eu", "us"]}
    assert links_of("line") == {"eu": [], "us": ["eu"], "ap": ["us"]}
