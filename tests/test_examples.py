"""The files under examples/: the configs load, the unit is valid, crowd.py plays a crowd."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from presenced.certs import init_ca, issue_node_cert
from presenced.config import HostPort, build_config, load_toml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
REGIONS = ("eu", "us", "ap")


def test_region_configs_load_and_form_a_full_mesh(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    init_ca(certs)
    secret = tmp_path / "secret"
    secret.write_text("s" * 64)
    for region in REGIONS:
        issue_node_cert(certs, region, hosts=(f"{region}.presence.example.com",))
        options = load_toml(EXAMPLES / f"{region}.toml")
        # The files name the production paths; point them at real files to build a Config.
        for key in ("tls_cert", "tls_key", "tls_ca"):
            assert options[key].startswith("/etc/presenced/tls/"), options[key]
            options[key] = str(certs / Path(options[key]).name)
        assert options["token_secret_file"] == "/etc/presenced/secret"
        options["token_secret_file"] = str(secret)
        assert options["data_dir"] == "/var/lib/presenced"
        options["data_dir"] = str(tmp_path / "data" / region)
        config = build_config(options)
        assert (config.region, config.node) == (region, region)
        assert config.listen == HostPort("0.0.0.0", 7400)
        assert config.http == HostPort("0.0.0.0", 8400)
        assert config.peer_listen == HostPort("0.0.0.0", 7443)
        others = {f"wss://{r}.presence.example.com:7443" for r in REGIONS if r != region}
        assert set(config.peers) == others
        assert not config.allow_anonymous and config.token_secret == b"s" * 64
        assert config.data_dir == tmp_path / "data" / region
        assert (config.message_max_pending, config.message_max_age_s) == (1000, 7 * 86400)
        assert config.log_format == "json"
        assert config.limits.max_connections == 20000


@pytest.mark.slow
def test_systemd_unit(tmp_path: Path) -> None:
    text = (EXAMPLES / "presenced.service").read_text()
    for line in (
        "Type=simple",
        "ExecStart=/usr/local/bin/presenced run --config /etc/presenced/presenced.toml",
        "Restart=on-failure",
        "StateDirectory=presenced",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "LimitNOFILE=65536",
        "KillSignal=SIGTERM",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.MULTILINE), line
    assert re.search(r"^TimeoutStopSec=\d+s?$", text, re.MULTILINE)
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        # verify checks that ExecStart exists: point it at a binary that does.
        unit = tmp_path / "presenced.service"
        unit.write_text(text.replace("/usr/local/bin/presenced", "/bin/true"))
        result = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_virtual_hq_is_the_served_page() -> None:
    link = EXAMPLES / "virtual-hq"
    assert link.is_symlink()
    assert link.resolve() == (ROOT / "presenced" / "web").resolve()
    assert (link / "index.html").is_file() and (link / "presenced.js").is_file()


SUMMARY = re.compile(
    r"^crowd: (\d+) clients, [\d.]+ s: sent (\d+) updates \([\d.]+/s\), observer saw (\d+)"
    r" \([\d.]+/s\), 0 clients failed$",
    re.MULTILINE,
)


@pytest.mark.slow
async def test_crowd_plays_against_a_daemon(start_daemon: Any) -> None:
    running = await start_daemon()
    args = [
        sys.executable, str(EXAMPLES / "crowd.py"), running.url,
        "--clients", "4", "--hz", "20", "--duration", "1.5", "--seed", "1",
    ]  # fmt: skip
    with trio.fail_after(30):
        result = await trio.run_process(
            args, capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT
        )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    match = SUMMARY.search(output)
    assert match, output
    clients, sent, delivered = map(int, match.groups())
    assert clients == 4
    # 4 cursors at 20 Hz for 1.5 s; each update is its own diff entry at a 20 ms tick.
    assert 80 <= sent <= 130, output
    assert delivered >= sent * 0.8, output
    assert re.search(r"delivered +[\d.]+ updates/s +latency p50", output), output


async def test_api_backend_publishes_and_reads_occupancy(start_daemon: Any, tmp_path: Path) -> None:
    from presenced.client import connect

    key = "k" * 40
    (tmp_path / "api.key").write_text(key + "\n")
    running = await start_daemon(http=HostPort("127.0.0.1", 0), api_key=key.encode())
    base = f"http://127.0.0.1:{running.daemon.http_port}"
    async with connect(running.url, user="ann") as ann:
        await ann.join("lobby", {"name": "Ann"})
        args = [
            sys.executable, str(EXAMPLES / "api_backend.py"), base,
            "--key-file", str(tmp_path / "api.key"), "--room", "lobby",
        ]  # fmt: skip
        with trio.fail_after(30):
            result = await trio.run_process(
                args, capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT
            )
        output = result.stdout.decode() + result.stderr.decode()
        assert result.returncode == 0, output
        assert "published to lobby: 1 member(s)" in output, output
        assert "occupancy of lobby: 1 session(s), 1 user(s) (sessions by region: test: 1)" in output
        assert "  ann: 1 session(s) in test" in output
        with trio.fail_after(5):
            frame = await ann.next_message("broadcast")
        assert frame["from"]["server"] is True and frame["event"] == "announcement"
        (tmp_path / "api.key").write_text("w" * 40)
        with trio.fail_after(30):
            result = await trio.run_process(
                args, capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT
            )
        assert result.returncode == 1 and b"401 unauthorized" in result.stderr
