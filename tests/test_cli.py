"""The `presenced` command line as a user sees it: output, exit status, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from presenced import __version__
from presenced import cli as cli_module
from presenced.auth import verify_token
from presenced.config import Config, HostPort

SECRET = b"f" * 64


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's own PRESENCED_* settings out of the tests."""
    for name in list(os.environ):
        if name.startswith("PRESENCED_"):
            monkeypatch.delenv(name)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    configs: list[Config] = []
    monkeypatch.setattr(cli_module, "_start_daemon", configs.append)
    monkeypatch.setattr(cli_module, "_configure_logging", lambda *args: None)
    return configs


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    return path


def test_version() -> None:
    result = CliRunner().invoke(cli_module.main, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"presenced, version {__version__}\n"


def test_group_help_lists_commands() -> None:
    result = CliRunner().invoke(cli_module.main, ["--help"])
    assert result.exit_code == 0
    assert "presence daemon" in result.output
    assert "run" in result.output and "token" in result.output


def test_run_help_lists_every_option_with_help() -> None:
    result = CliRunner().invoke(cli_module.main, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    run_command = cli_module.main.commands["run"]
    for param in run_command.params:
        assert isinstance(param, click.Option)
        assert param.help, f"{param.name} has no help"
        for opt in param.opts:
            assert opt in result.output
    for option in [
        "--config", "--region", "--node", "--listen", "--peers", "--peer-listen",
        "--token-secret-file", "--allow-anonymous", "--log-level", "--tick-ms",
        "--max-connections", "--max-frame-bytes", "--max-meta-bytes",
        "--max-rooms-per-connection", "--max-msg-rate", "--msg-burst", "--tls-cert",
        "--tls-key", "--tls-ca", "--down-after", "--purge-after", "--http",
        "--log-format", "--data-dir", "--message-max-pending", "--message-max-age",
    ]:  # fmt: skip
        assert option in result.output
    assert "PRESENCED_REGION" in result.output
    assert "127.0.0.1:7400" in result.output


def test_run_starts_daemon_with_config(started: list[Config], secret_file: Path) -> None:
    args = ["run", "--listen", ":0", "--region", "eu", "--token-secret-file", str(secret_file)]
    result = CliRunner().invoke(cli_module.main, args)
    assert result.exit_code == 0, result.output
    [config] = started
    assert config.listen.port == 0
    assert config.region == config.node == "eu"
    assert config.token_secret == SECRET


def test_run_operations_options_from_flags_and_env(
    started: list[Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["run", "--allow-anonymous", "--http", ":8400", "--log-format", "json"]
    args += ["--data-dir", str(tmp_path / "data"), "--message-max-pending", "5"]
    args += ["--client-timeout", "20", "--resume-grace", "0"]
    result = CliRunner().invoke(cli_module.main, args)
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("PRESENCED_HTTP", "127.0.0.1:9400")
    monkeypatch.setenv("PRESENCED_LOG_FORMAT", "text")
    monkeypatch.setenv("PRESENCED_MESSAGE_MAX_AGE", "60")
    result = CliRunner().invoke(cli_module.main, ["run", "--allow-anonymous"])
    assert result.exit_code == 0, result.output
    flags, env = started
    assert (flags.http, flags.log_format) == (HostPort("127.0.0.1", 8400), "json")
    assert (flags.data_dir, flags.message_max_pending) == (tmp_path / "data", 5)
    assert (flags.client_timeout_s, flags.resume_grace_s) == (20.0, 0.0)
    assert (env.client_timeout_s, env.resume_grace_s) == (15.0, 10.0)
    assert (env.http, env.log_format) == (HostPort("127.0.0.1", 9400), "text")
    assert env.message_max_age_s == 60.0 and env.data_dir is None


def test_keyboard_interrupt_exits_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(config: Config) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_start_daemon", interrupted)
    monkeypatch.setattr(cli_module, "_configure_logging", lambda *args: None)
    result = CliRunner().invoke(cli_module.main, ["run", "--allow-anonymous"])
    assert result.exit_code == 0
    assert result.output == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "nowhere"], "Error: --listen: expected HOST:PORT"),
        (["--listen", "host:70000"], "Error: --listen: port must be 0..65535, got 70000"),
        (["--region", "no spaces"], "Error: --region: must be 1..64 characters"),
        (["--peers", "wss://x"], "Error: --peers: 'wss://x' is not a wss:// URL"),
        (["--peers", "wss://x:1"], "Error: peer links (peers, peer_listen) are mutual TLS"),
        (["--tls-key", "/nonexistent"], "Error: --tls-key: '/nonexistent' is not a file"),
        (["--tls-cert", __file__], "Error: --tls-cert also needs --tls-key and --tls-ca"),
        (["--tick-ms", "1"], "Error: --tick-ms: must be 2..1000 milliseconds, got 1"),
        (["--max-connections", "0"], "Error: --max-connections: must be positive, got 0"),
        (["--http", "x"], "Error: --http: expected HOST:PORT"),
        (["--http", ":7400"], "Error: --http (127.0.0.1:7400) and --listen (127.0.0.1:7400)"),
        (["--message-max-pending", "0"], "Error: --message-max-pending: must be at least 1"),
        (["--message-max-age", "0"], "Error: --message-max-age: must be a positive number"),
        (["--client-timeout", "0.5"], "Error: --client-timeout: must be 1..3600 seconds"),
        (["--resume-grace", "-1"], "Error: --resume-grace: must be 0..3600 seconds"),
        (["--down-after", "0.8"], "Error: --down-after (0.8s) must be at least 2 peer heartbeat"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    started: list[Config], args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli_module.main, ["run", "--allow-anonymous", *args])
    assert result.exit_code == 2
    assert not started
    assert result.output.startswith(message)
    assert result.output.count("\n") == 1
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_bad_listen_in_real_process_has_no_traceback() -> None:
    """The installed entry point, not just CliRunner: one line on stderr, status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "presenced", "run", "--allow-anonymous", "--listen", "bad"],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("PRESENCED_")},
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == ("Error: --listen: expected HOST:PORT, [IPV6]:PORT or :PORT, got 'bad'\n")


def test_token_mints_verifiable_token(secret_file: Path) -> None:
    before = time.time()
    args = ["token", "--user", "alice", "--room", "doc-*", "--room", "lobby"]
    result = CliRunner().invoke(cli_module.main, [*args, "--token-secret-file", str(secret_file)])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert result.output == token + "\n"
    grant = verify_token(SECRET, token)
    assert grant.user == "alice"
    assert grant.room_patterns == ("doc-*", "lobby")
    assert grant.expires_at is not None
    assert before + 3600 <= grant.expires_at <= time.time() + 3601


def test_token_ttl_zero_never_expires_and_secret_from_env(secret_file: Path) -> None:
    result = CliRunner().invoke(
        cli_module.main,
        ["token", "--user", "bob", "--room", "*", "--ttl", "0"],
        env={"PRESENCED_TOKEN_SECRET_FILE": str(secret_file)},
    )
    assert result.exit_code == 0, result.output
    grant = verify_token(SECRET, result.output.strip(), now=time.time() + 10**8)
    assert grant.expires_at is None


def test_token_errors(tmp_path: Path, secret_file: Path) -> None:
    missing = tmp_path / "missing"
    result = CliRunner().invoke(
        cli_module.main,
        ["token", "--user", "a", "--room", "r", "--token-secret-file", str(missing)],
    )
    assert result.exit_code == 2
    assert result.output.startswith("Error: --token-secret-file: cannot read")
    result = CliRunner().invoke(
        cli_module.main,
        ["token", "--user", "", "--room", "r", "--token-secret-file", str(secret_file)],
    )
    assert result.exit_code == 2
    assert result.output == "Error: user must be a non-empty string\n"
    result = CliRunner().invoke(cli_module.main, ["token", "--user", "a"])
    assert result.exit_code == 2
    assert "Missing option" in result.output


def test_token_help_says_how_to_make_a_secret() -> None:
    result = CliRunner().invoke(cli_module.main, ["token", "--help"])
    assert 'python -c "import secrets;print(secrets.token_hex(32))" > secret' in result.output


def test_lazy_commands_are_loaded_on_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli_module.LAZY_COMMANDS, "hello", f"{__name__}:_hello")
    result = CliRunner().invoke(cli_module.main, ["hello"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello\n"
    assert "hello" in CliRunner().invoke(cli_module.main, ["--help"]).output


@click.command()
def _hello() -> None:
    """Say hello (used by the lazy command test)."""
    click.echo("hello")
