"""Config parsing and validation, and the flag > env > file > default precedence."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from presenced import cli as cli_module
from presenced.config import (
    Config,
    ConfigError,
    HostPort,
    build_config,
    load_toml,
    parse_host_port,
    parse_peers,
    read_secret_file,
)
from presenced.core.limits import Limits

SECRET = b"0123456789abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(b"  " + SECRET + b"\n")
    return path


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, str]:
    """Peer TLS options naming files that exist (their content is checked by the daemon)."""
    options = {}
    for key in ("tls_cert", "tls_key", "tls_ca"):
        path = tmp_path / f"{key}.pem"
        path.write_text("PEM\n")
        options[key] = str(path)
    return options


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7400", HostPort("127.0.0.1", 7400)),
        ("0.0.0.0:80", HostPort("0.0.0.0", 80)),
        ("example.com:65535", HostPort("example.com", 65535)),
        (":9000", HostPort("127.0.0.1", 9000)),
        ("[::1]:7400", HostPort("::1", 7400)),
        ("[::]:0", HostPort("::", 0)),
        ("localhost:0", HostPort("localhost", 0)),
    ],
)
def test_parse_host_port_accepts(text: str, expected: HostPort) -> None:
    assert parse_host_port(text, "--listen") == expected


@pytest.mark.parametrize(
    "text",
    ["", "7400", "host", "host:", "host:port", "host:65536", "host:-1", "::1:80", "[]:80",
     "a b:80", "host:+80", "host:٣"],
)  # fmt: skip
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--listen: "):
        parse_host_port(text, "--listen")


def test_host_port_str_round_trips() -> None:
    for text in ("127.0.0.1:7400", "[::1]:80"):
        assert str(parse_host_port(text, "x")) == text


def test_defaults() -> None:
    config = build_config({"allow_anonymous": True})
    assert config == Config(allow_anonymous=True)
    assert config.region == config.node == "local"
    assert config.listen == HostPort("127.0.0.1", 7400)
    assert config.peers == ()
    assert config.peer_listen is None
    assert config.token_secret is None
    assert config.log_level == "info"
    assert config.tick_ms == 30
    assert config.limits == Limits()


def test_node_defaults_to_region_but_can_differ() -> None:
    assert build_config({"region": "eu", "allow_anonymous": True}).node == "eu"
    assert build_config({"region": "eu", "node": "eu-2", "allow_anonymous": True}).node == "eu-2"


@pytest.mark.parametrize("name", ["", "a" * 65, "eu west", "eu/west", "é", "a:b"])
def test_bad_region_and_node_names(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^--region: must be 1\.\.64 characters"):
        build_config({"region": name, "allow_anonymous": True}, {"region": "--region"})
    if name:  # an empty node means "same as region"
        with pytest.raises(ConfigError, match=r"^node: "):
            build_config({"node": name, "allow_anonymous": True})


def test_good_names() -> None:
    config = build_config({"region": "us-east_1.a", "node": "N" * 64, "allow_anonymous": True})
    assert (config.region, config.node) == ("us-east_1.a", "N" * 64)


def test_no_secret_and_not_anonymous_is_an_error() -> None:
    with pytest.raises(ConfigError, match="--token-jwks or --allow-anonymous"):
        build_config({})
    with pytest.raises(ConfigError, match="--token-jwks or --allow-anonymous"):
        Config()


def test_secret_is_read_and_stripped(secret_file: Path) -> None:
    config = build_config({"token_secret_file": str(secret_file)})
    assert config.token_secret == SECRET
    assert config.allow_anonymous is False
    assert SECRET.decode() not in repr(config)


def test_secret_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret_file(tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret_file(tmp_path)  # a directory
    empty = tmp_path / "empty"
    empty.write_text(" \n\t\n")
    with pytest.raises(ConfigError, match="is empty"):
        build_config({"token_secret_file": str(empty)})
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    with pytest.raises(ConfigError, match="need at least 32"):
        read_secret_file(short)


def test_peers_validation(tls: dict[str, str]) -> None:
    assert parse_peers("wss://us.example:7443, wss://10.0.0.2:7500/gossip,,") == (
        "wss://us.example:7443",
        "wss://10.0.0.2:7500/gossip",
    )
    assert parse_peers(["wss://[::1]:7401", "wss://[::1]:7401"]) == ("wss://[::1]:7401",)
    assert parse_peers("") == ()
    for bad in [
        "http://us.example:7443",
        "wss://us.example",
        "wss://:7443",
        "us.example:7443",
        "wss://us.example:99999",
        "wss://us.example:port",
        "wss://user@us.example:7443",
        "wss://us.example:7443/?x=1",
    ]:
        with pytest.raises(ConfigError, match=r"^--peers: "):
            parse_peers(bad, "--peers")
    with pytest.raises(ConfigError, match="must be strings"):
        parse_peers(["wss://a:1", 5])  # type: ignore[list-item]
    config = build_config({"peers": ["wss://eu.example:7443"], "allow_anonymous": True, **tls})
    assert config.peers == ("wss://eu.example:7443",)
    assert config.tls_cert == Path(tls["tls_cert"])
    with pytest.raises(ConfigError, match=r"^--peers: "):
        build_config({"peers": "wss://ok:1,ftp://no:2", **tls}, {"peers": "--peers"})


def test_value_checks(tls: dict[str, str]) -> None:
    base: dict[str, Any] = {"allow_anonymous": True, **tls}
    assert build_config({**base, "tick_ms": "2"}).tick_ms == 2
    assert build_config({**base, "tick_ms": 1000}).tick_ms == 1000
    for tick in (1, 1001, "x", True, 2.5):
        with pytest.raises(ConfigError, match="tick_ms"):
            build_config({**base, "tick_ms": tick})
    assert build_config({**base, "log_level": "DEBUG"}).log_level == "debug"
    with pytest.raises(ConfigError, match="log_level: must be one of debug, info"):
        build_config({**base, "log_level": "verbose"})
    with pytest.raises(ConfigError, match="allow_anonymous: expected true or false"):
        build_config({"allow_anonymous": "maybe"})
    assert build_config({**base, "peer_listen": ":7401"}).peer_listen == HostPort("127.0.0.1", 7401)
    with pytest.raises(ConfigError, match="unknown option"):
        build_config({**base, "colour": "blue"})


def test_limits_from_table_and_flags() -> None:
    config = build_config(
        {
            "allow_anonymous": True,
            "limits": {"max_connections": 10, "hello_timeout": 2, "max_meta_bytes": 100},
            "max_connections": "20",  # a flag beats the table
            "max_frame_bytes": 1000,
        }
    )
    assert config.limits == Limits(
        max_connections=20, hello_timeout_s=2.0, max_meta_bytes=100, max_frame_bytes=1000
    )
    assert isinstance(config.limits.hello_timeout_s, float)


def test_burst_follows_rate_unless_given() -> None:
    limits = build_config({"allow_anonymous": True, "max_msg_rate": 50}).limits
    assert (limits.max_messages_per_second, limits.message_burst) == (50.0, 100)
    limits = build_config({"allow_anonymous": True, "max_msg_rate": 50, "msg_burst": 7}).limits
    assert (limits.max_messages_per_second, limits.message_burst) == (50.0, 7)
    limits = build_config({"allow_anonymous": True, "max_msg_rate": 0.2}).limits
    assert limits.message_burst == 1


@pytest.mark.parametrize("value", [0, -5, "x", True, 1.5])
def test_bad_limit_values(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^--max-connections: "):
        build_config(
            {"allow_anonymous": True, "max_connections": value},
            {"max_connections": "--max-connections"},
        )


def test_load_toml(tmp_path: Path, secret_file: Path, tls: dict[str, str]) -> None:
    path = tmp_path / "presenced.toml"
    path.write_text(
        'region = "eu"\nlisten = ":7500"\npeers = ["wss://us.example:7443"]\n'
        f'token_secret_file = "{secret_file.name}"\ntick_ms = 50\n'
        'tls_cert = "tls_cert.pem"\ntls_key = "tls_key.pem"\ntls_ca = "tls_ca.pem"\n'
        "[limits]\nmax_connections = 5\nhello_timeout = 2.5\nslow_client_timeout = 4\n"
    )
    data = load_toml(path)
    # Relative paths are relative to the config file, not the working directory.
    assert data["token_secret_file"] == str(secret_file)
    assert {key: data[key] for key in tls} == tls
    config = build_config(data)
    assert config.region == "eu"
    assert config.listen == HostPort("127.0.0.1", 7500)
    assert config.peers == ("wss://us.example:7443",)
    assert config.token_secret == SECRET
    assert config.tick_ms == 50
    assert config.limits.max_connections == 5
    # A duration's file key is its field name without the unit (the field is in seconds).
    assert (config.limits.hello_timeout_s, config.limits.slow_client_timeout_s) == (2.5, 4.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('regoin = "eu"\n', "unknown key 'regoin'"),
        ("max_connections = 5\n", "unknown key 'max_connections' (limits go in a [limits]"),
        ("[limits]\nmax_conections = 5\n", "unknown key 'limits.max_conections'"),
        ('limits = "big"\n', "'limits' must be a table"),
        ("region = \n", "invalid TOML"),
    ],
)
def test_load_toml_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.toml") as info:
        load_toml(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_toml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_toml(tmp_path / "nope.toml")


def _run_cli(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str] | None = None
) -> tuple[Any, list[Config]]:
    """Invoke the CLI with only `env` as PRESENCED_* variables, capturing started Configs."""
    for name in list(os.environ):
        if name.startswith("PRESENCED_"):
            monkeypatch.delenv(name)
    started: list[Config] = []
    monkeypatch.setattr(cli_module, "_start_daemon", started.append)
    monkeypatch.setattr(cli_module, "_configure_logging", lambda *args: None)
    result = CliRunner().invoke(cli_module.main, args, env=env or {})
    return result, started


def test_precedence_flag_over_env_over_file_over_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secret_file: Path
) -> None:
    path = tmp_path / "presenced.toml"
    path.write_text(
        'region = "file-region"\nnode = "file-node"\nlisten = ":1111"\n'
        f'token_secret_file = "{secret_file}"\nallow_anonymous = true\n'
        "[limits]\nmax_connections = 11\nmax_meta_bytes = 111\n"
    )
    env = {
        "PRESENCED_CONFIG": str(path),
        "PRESENCED_REGION": "env-region",
        "PRESENCED_LISTEN": ":2222",
        "PRESENCED_MAX_CONNECTIONS": "22",
        "PRESENCED_ALLOW_ANONYMOUS": "false",
    }
    args = ["run", "--region", "flag-region", "--max-connections", "33"]
    result, started = _run_cli(monkeypatch, args, env)
    assert result.exit_code == 0, result.output
    [config] = started
    assert config.region == "flag-region"  # flag beats env and file
    assert config.listen == HostPort("127.0.0.1", 2222)  # env beats file
    assert config.node == "file-node"  # file beats default
    assert config.tick_ms == 30  # default
    assert config.allow_anonymous is False  # env "false" beats file true
    assert config.token_secret == SECRET
    assert config.limits.max_connections == 33
    assert config.limits.max_meta_bytes == 111


def test_cli_bad_file_value_names_its_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "p.toml"
    path.write_text('listen = "nope"\nallow_anonymous = true\n')
    result, started = _run_cli(monkeypatch, ["run", "--config", str(path)])
    assert result.exit_code == 2
    assert not started
    expected = f"listen in {path}: expected HOST:PORT, [IPV6]:PORT or :PORT, got 'nope'"
    assert result.output == f"Error: {expected}\n"


def test_cli_env_value_error_names_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    result, started = _run_cli(
        monkeypatch, ["run"], {"PRESENCED_PEERS": "http://x:1", "PRESENCED_ALLOW_ANONYMOUS": "1"}
    )
    assert result.exit_code == 2
    assert not started
    assert result.output.startswith("Error: PRESENCED_PEERS: 'http://x:1' is not a wss://")


def test_cli_missing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    result, started = _run_cli(monkeypatch, ["run"])
    assert result.exit_code == 2
    assert not started
    assert "--token-jwks or --allow-anonymous" in result.output


def test_peer_links_need_all_of_tls(tls: dict[str, str]) -> None:
    where = {"tls_cert": "--tls-cert", "tls_key": "--tls-key", "tls_ca": "--tls-ca"}
    with pytest.raises(ConfigError, match="give --tls-cert, --tls-key and --tls-ca"):
        build_config({"peers": "wss://us.example:7443", "allow_anonymous": True})
    with pytest.raises(ConfigError, match="give --tls-cert, --tls-key and --tls-ca"):
        build_config({"peer_listen": ":7401", "allow_anonymous": True})
    partial = {"allow_anonymous": True, "tls_cert": tls["tls_cert"]}
    with pytest.raises(ConfigError, match=r"^--tls-cert also needs --tls-key and --tls-ca$"):
        build_config(partial, where)
    config = build_config({"peer_listen": ":7401", "allow_anonymous": True, **tls})
    assert (config.tls_cert, config.tls_key, config.tls_ca) == tuple(
        Path(tls[key]) for key in ("tls_cert", "tls_key", "tls_ca")
    )
    # No peers: TLS is optional, and an empty peer list does not ask for it.
    assert build_config({"peers": "", "allow_anonymous": True}).tls_cert is None


def test_tls_files_must_exist(tmp_path: Path, tls: dict[str, str]) -> None:
    options = {**tls, "tls_ca": str(tmp_path / "nope.pem"), "allow_anonymous": True}
    with pytest.raises(ConfigError, match=r"^--tls-ca: '.*nope\.pem' is not a file$"):
        build_config(options, {"tls_ca": "--tls-ca"})


def test_down_and_purge_after() -> None:
    config = build_config({"allow_anonymous": True})
    assert (config.down_after_s, config.purge_after_s) == (3.0, 30.0)
    config = build_config({"allow_anonymous": True, "down_after": "1.5", "purge_after": 10})
    assert (config.down_after_s, config.purge_after_s) == (1.5, 10.0)
    with pytest.raises(ConfigError, match=r"down_after \(40s\) must be less than purge_after"):
        build_config({"allow_anonymous": True, "down_after": 40})
    with pytest.raises(ConfigError, match="down_after: must be positive"):
        build_config({"allow_anonymous": True, "down_after": 0})
    with pytest.raises(ConfigError, match="must be less than purge_after"):
        Config(allow_anonymous=True, down_after_s=5, purge_after_s=5)


def test_down_after_spans_at_least_two_heartbeats() -> None:
    """Liveness is checked every peer heartbeat interval (0.5 s): a shorter --down-after
    would mark live peers down between two heartbeats. One line, naming the option."""
    assert build_config({"allow_anonymous": True, "down_after": 1}).down_after_s == 1.0
    with pytest.raises(
        ConfigError, match=r"^--down-after \(0\.9s\) must be at least 2 peer heartbeat intervals"
    ):
        build_config({"allow_anonymous": True, "down_after": 0.9}, {"down_after": "--down-after"})
    with pytest.raises(ConfigError, match=r"^down_after_s \(1s\) must be at least 2 peer"):
        Config(allow_anonymous=True, down_after_s=1.0, heartbeat_interval_s=0.75)
    config = Config(allow_anonymous=True, down_after_s=0.5, heartbeat_interval_s=0.1)
    assert config.down_after_s == 0.5


def test_gossip_timings_are_validated_config() -> None:
    config = Config(allow_anonymous=True)
    timings = (
        config.heartbeat_interval_s,
        config.digest_interval_s,
        config.ping_interval_s,
        config.link_timeout_s,
        config.handshake_timeout_s,
        config.redial_initial_s,
        config.redial_max_s,
    )
    assert timings == (0.5, 2.0, 2.0, 2.5, 5.0, 0.2, 1.0)
    with pytest.raises(ConfigError, match="heartbeat_interval_s: expected a positive number"):
        Config(allow_anonymous=True, heartbeat_interval_s=0)
    with pytest.raises(ConfigError, match=r"link_timeout_s \(0\.5s\) must be more than"):
        Config(allow_anonymous=True, link_timeout_s=0.5)
    with pytest.raises(ConfigError, match=r"redial_max_s \(0\.1s\) is below redial_initial_s"):
        Config(allow_anonymous=True, redial_max_s=0.1)


def test_config_accepts_simulation_peer_addresses() -> None:
    """In-process clusters pass their own transport and address scheme straight to Config."""
    config = Config(allow_anonymous=True, peers=("sim://a", "sim://b"))
    assert config.peers == ("sim://a", "sim://b")
    with pytest.raises(ConfigError, match="distinct"):
        Config(allow_anonymous=True, peers=("sim://a", "sim://a"))


def test_message_store_options(tmp_path: Path) -> None:
    config = build_config(
        {
            "allow_anonymous": True,
            "data_dir": str(tmp_path / "new" / "dir"),
            "message_max_pending": "50",
            "message_max_age": "3600",
        }
    )
    assert config.data_dir == tmp_path / "new" / "dir"
    assert config.data_dir.is_dir()  # created, so a bad path fails at start
    assert (config.message_max_pending, config.message_max_age_s) == (50, 3600.0)
    defaults = build_config({"allow_anonymous": True})
    assert defaults.data_dir is None
    assert (defaults.message_max_pending, defaults.message_max_age_s) == (1000, 604800.0)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("message_max_pending", "0", "at least 1"),
        ("message_max_pending", "many", "--message-max-pending"),
        ("message_max_age", "-5", "positive"),
        ("message_max_age", "inf", "expected a number"),
    ],
)
def test_message_store_options_rejected(key: str, value: str, message: str) -> None:
    where = {key: "--" + key.replace("_", "-")}
    with pytest.raises(ConfigError, match=message):
        build_config({"allow_anonymous": True, key: value}, where)


def test_liveness_options() -> None:
    config = build_config({"allow_anonymous": True})
    assert (config.client_timeout_s, config.resume_grace_s) == (15.0, 10.0)
    config = build_config({"allow_anonymous": True, "client_timeout": "4", "resume_grace": 0})
    assert (config.client_timeout_s, config.resume_grace_s) == (4.0, 0.0)
    for key, value, message in [
        ("client_timeout", "0", "must be 1..3600 seconds"),
        ("client_timeout", "nan", "expected a number"),
        ("resume_grace", "7200", "must be 0..3600 seconds"),
        ("resume_grace", "soon", "expected a number"),
    ]:
        with pytest.raises(ConfigError, match=f"--{key.replace('_', '-')}: {message}"):
            build_config({"allow_anonymous": True, key: value}, {key: "--" + key.replace("_", "-")})
    with pytest.raises(ConfigError, match=r"client_timeout_s: must be 1\.\.3600"):
        Config(allow_anonymous=True, client_timeout_s=0.1)


def test_data_dir_must_be_a_directory(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        build_config({"allow_anonymous": True, "data_dir": str(a_file)})


def test_http_and_log_format(tmp_path: Path) -> None:
    config = build_config({"allow_anonymous": True, "http": ":8400", "log_format": "JSON"})
    assert config.http == HostPort("127.0.0.1", 8400)
    assert config.log_format == "json"
    defaults = build_config({"allow_anonymous": True, "http": ""})
    assert defaults.http is None and defaults.log_format == "text"
    path = tmp_path / "presenced.toml"
    path.write_text('allow_anonymous = true\nhttp = "0.0.0.0:9000"\nlog_format = "json"\n')
    from_file = build_config(load_toml(path))
    assert (from_file.http, from_file.log_format) == (HostPort("0.0.0.0", 9000), "json")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"http": "nowhere"}, r"^--http: expected HOST:PORT"),
        ({"log_format": "xml"}, r"^--log-format: must be one of text, json, got 'xml'"),
        ({"http": ":7400"}, r"^--http \(127\.0\.0\.1:7400\) and --listen .* use the same port"),
        (
            {"listen": "0.0.0.0:7400", "http": "127.0.0.1:7400"},
            r"^--http .* and --listen .* use the same port",
        ),
    ],
)
def test_http_and_log_format_rejected(options: dict[str, str], message: str) -> None:
    where = {key: "--" + key.replace("_", "-") for key in [*options, "listen"]}
    with pytest.raises(ConfigError, match=message):
        build_config({"allow_anonymous": True, **options}, where)


def test_ports_may_repeat_on_other_hosts_or_as_zero() -> None:
    config = build_config({"allow_anonymous": True, "listen": "127.0.0.1:0", "http": "127.0.0.1:0"})
    assert config.http == HostPort("127.0.0.1", 0)
    other = build_config({"allow_anonymous": True, "http": "127.0.0.2:7400"})
    assert other.http == HostPort("127.0.0.2", 7400)


def test_config_checks_new_fields_when_built_directly() -> None:
    with pytest.raises(ConfigError, match="log_format"):
        Config(allow_anonymous=True, log_format="yaml")
    with pytest.raises(TypeError):
        Config(allow_anonymous=True, http="127.0.0.1:80")  # type: ignore[arg-type]
