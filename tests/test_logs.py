"""Log output: JSON lines with the documented fields, and region stamps for several daemons."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio

from presenced.logs import REGION, configure_logging


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, with its level and handlers put back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_have_ts_level_logger_msg_and_exception(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = logging.getLogger("presenced.test")
    log.debug("not shown at info")
    log.info("peer link up: %s", "us#1\nwith a newline")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("client %s: unexpected error", "1.2.3.4:5")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"ts", "level", "logger", "msg"}
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert (first["level"], first["logger"]) == ("info", "presenced.test")
    assert first["msg"] == "peer link up: us#1\nwith a newline"
    assert second["level"] == "error"
    assert "Traceback" in second["exc"] and "RuntimeError: boom" in second["exc"]


def test_configuring_again_replaces_the_handler(root_logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "text", stream=first)
    configure_logging("warning", "text", stream=second)
    logging.getLogger("presenced.test").warning("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1
    assert " WARNING presenced.test: once" in second.getvalue()
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")


async def test_each_task_tree_logs_its_own_region(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging(
        "info", "text", text_format="%(region)s %(message)s", regions=True, stream=out
    )
    log = logging.getLogger("presenced.test")

    async def child() -> None:
        log.info("from a child task")

    async def region(name: str) -> None:
        REGION.set(name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)  # started tasks inherit the region

    async with trio.open_nursery() as nursery:
        nursery.start_soon(region, "eu")
        nursery.start_soon(region, "ap")
    log.info("outside")
    assert sorted(out.getvalue().splitlines()) == [
        "- outside",
        "ap from a child task",
        "eu from a child task",
    ]


@pytest.mark.slow
def test_daemon_logs_json_lines_in_a_real_process() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCED_")}
    args = [sys.executable, "-m", "presenced", "run", "--allow-anonymous", "--listen", ":0"]
    args += ["--http", ":0", "--log-format", "json"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:
            lines.append(line)
            if " up: clients on " in line:
                break
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    assert process.returncode == 0
    records = [json.loads(line) for line in [*lines, *rest.splitlines()] if line.strip()]
    messages = [record["msg"] for record in records]
    assert any(m.startswith("http side port on http://127.0.0.1:") for m in messages)
    assert "received SIGTERM" in messages and messages[-1] == "presenced stopped"
    assert all({"ts", "level", "logger", "msg"} <= set(record) for record in records)
