"""Daemon configuration: one validated, immutable `Config`, built from flags, env and a file.

Everything is checked here, before the daemon starts, so that a typo in a flag or a config
file ends the process at once with a one-line reason instead of surfacing later as a
half-working daemon. The command line (`presenced.cli`) decides which source wins for each
option (flag > `PRESENCED_*` environment variable > config file > default) and hands the
merged values to `build_config`, which is a pure function and so easy to test.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from presenced.config_values import (
    DEFAULT_LISTEN,
    LOG_FORMATS,
    LOG_LEVELS,
    MIN_SECRET_BYTES,
    ConfigError,
    HostPort,
    as_bool,
    as_float,
    as_int,
    check_client_timeout,
    check_format_exact,
    check_level_exact,
    check_log_format,
    check_log_level,
    check_name,
    check_peers_tuple,
    check_resume_grace,
    check_seconds,
    check_secret,
    check_tick_exact,
    check_tick_ms,
    check_token_claim,
    check_token_jwks,
    optional_path,
    parse_host_port,
    parse_peers,
    read_public_key_file,
    read_secret_file,
    readable_file,
    validate_field,
    writable_dir,
)
from presenced.core.limits import Limits

__all__ = [
    "FILE_KEYS",
    "LIMIT_FLAGS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MIN_SECRET_BYTES",
    "Config",
    "ConfigError",
    "HostPort",
    "build_config",
    "load_toml",
    "parse_host_port",
    "parse_peers",
    "read_secret_file",
]


#: Option keys a config file may use at its top level (CLI option names with underscores).
FILE_KEYS = frozenset(
    {
        "region",
        "node",
        "listen",
        "peers",
        "peer_listen",
        "token_secret_file",
        "token_public_key_file",
        "token_jwks",
        "token_issuer",
        "token_audience",
        "api_key_file",
        "allow_anonymous",
        "log_level",
        "log_format",
        "http",
        "tick_ms",
        "tls_cert",
        "tls_key",
        "tls_ca",
        "down_after",
        "purge_after",
        "limits",
        "data_dir",
        "message_max_pending",
        "message_max_age",
        "client_timeout",
        "resume_grace",
    }
)
#: File keys holding paths, resolved against the config file's directory when relative.
PATH_KEYS = (
    "token_secret_file",
    "token_public_key_file",
    "api_key_file",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "data_dir",
)
TLS_KEYS = ("tls_cert", "tls_key", "tls_ca")
#: Milliseconds between ticks (see docs/operations.md: latency against CPU).
DEFAULT_TICK_MS = 30
DEFAULT_DOWN_AFTER_S = 3.0
DEFAULT_PURGE_AFTER_S = 30.0
#: Seconds between heartbeats on peer links, and how many of them ``down_after_s`` spans at
#: least: liveness is checked every heartbeat interval, so a shorter ``down_after_s`` marks a
#: peer down between two of its heartbeats on any link with a delay.
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
MIN_HEARTBEATS_DOWN = 2
#: Seconds without any sign of life (a frame, a pong) after which a client connection is
#: dead, and seconds its session then waits for the client to resume it. With the sweep's
#: second of slack, a vanished client leaves every room within ~27 s (docs/operations.md).
DEFAULT_CLIENT_TIMEOUT_S = 15.0
DEFAULT_RESUME_GRACE_S = 10.0
#: How long an undelivered reliable message is kept: a week.
DEFAULT_MESSAGE_MAX_AGE_S = 7 * 86400.0
#: Seconds a session may run past its token's ``exp`` before it is closed (4003): room for
#: a ``refresh`` sent just before expiry to arrive, and for clock skew with the issuer.
DEFAULT_TOKEN_EXPIRY_GRACE_S = 30.0

#: Limit flags of `presenced run` (option key -> `Limits` field). They are flags only; a file
#: sets limits in its `[limits]` table (`LIMIT_KEYS`).
LIMIT_FLAGS: Mapping[str, str] = {
    "max_connections": "max_connections",
    "max_frame_bytes": "max_frame_bytes",
    "max_meta_bytes": "max_meta_bytes",
    "max_rooms_per_connection": "max_rooms_per_connection",
    "max_msg_rate": "max_messages_per_second",
    "msg_burst": "message_burst",
}
#: Keys of a config file's `[limits]` table -> `Limits` field: the field name, without the
#: `_s` of a duration (the file says `hello_timeout = 5.0`, in seconds).
LIMIT_KEYS: Mapping[str, str] = {
    field.name.removesuffix("_s"): field.name for field in attrs.fields(Limits)
}


@attrs.frozen
class Config:
    """Everything the daemon needs to start; immutable and valid once constructed.

    Constructing it directly checks each value too, so a test or another module cannot make
    a nonsense config. Only what depends on the outside world is left to `build_config`
    (how the CLI makes one): files existing, peers being ws(s) URLs, peer links having TLS.
    That lets in-process simulations use their own peer addresses and transport.
    """

    region: str = attrs.field(default="local", validator=validate_field(check_name))
    node: str = attrs.field(
        default=attrs.Factory(lambda self: self.region, takes_self=True),
        validator=validate_field(check_name),
    )
    listen: HostPort = attrs.field(
        default=DEFAULT_LISTEN, validator=attrs.validators.instance_of(HostPort)
    )
    peers: tuple[str, ...] = attrs.field(default=(), validator=validate_field(check_peers_tuple))
    peer_listen: HostPort | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(HostPort))
    )
    #: HS256 key for client tokens; kept out of repr so it never lands in a log line.
    token_secret: bytes | None = attrs.field(
        default=None, repr=False, validator=validate_field(check_secret)
    )
    #: A PEM public key for client tokens (RS256, ES256, EdDSA... by its type), and a JWKS
    #: (an http(s) URL or a file) whose keys are looked up by ``kid``; see token_keys.py.
    token_public_key: bytes | None = attrs.field(
        default=None, validator=validate_field(check_secret)
    )
    token_jwks: str | None = attrs.field(default=None)
    #: When set, a token's ``iss`` and ``aud`` must be these.
    token_issuer: str | None = attrs.field(default=None)
    token_audience: str | None = attrs.field(default=None)
    #: Seconds a session runs past its token's expiry before it is closed (4003).
    token_expiry_grace_s: float = attrs.field(
        default=DEFAULT_TOKEN_EXPIRY_GRACE_S, validator=attrs.validators.ge(0)
    )
    allow_anonymous: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    #: The server API's key (``--api-key-file``; the API is off without one); kept out of repr.
    api_key: bytes | None = attrs.field(
        default=None, repr=False, validator=validate_field(check_secret)
    )
    log_level: str = attrs.field(default="info", validator=validate_field(check_level_exact))
    #: "text" (one readable line per record) or "json" (one JSON object per line).
    log_format: str = attrs.field(default="text", validator=validate_field(check_format_exact))
    #: The HTTP side port (health, readiness, metrics, status, the web page); None: no port.
    http: HostPort | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(HostPort))
    )
    tick_ms: int = attrs.field(default=DEFAULT_TICK_MS, validator=validate_field(check_tick_exact))
    limits: Limits = attrs.field(factory=Limits, validator=attrs.validators.instance_of(Limits))
    #: Peer links are mutually authenticated TLS: this node's PEM certificate and key, and
    #: the CA certificate that signed every region's certificate (`presenced certs`).
    tls_cert: Path | None = attrs.field(default=None, converter=optional_path)
    tls_key: Path | None = attrs.field(default=None, converter=optional_path)
    tls_ca: Path | None = attrs.field(default=None, converter=optional_path)
    #: Seconds without a heartbeat before a peer replica is down (its users kept, marked
    #: away) and then purged (its users dropped).
    down_after_s: float = attrs.field(
        default=DEFAULT_DOWN_AFTER_S, validator=validate_field(check_seconds)
    )
    purge_after_s: float = attrs.field(
        default=DEFAULT_PURGE_AFTER_S, validator=validate_field(check_seconds)
    )
    #: Where the durable message store lives; None keeps reliable messages in memory only.
    data_dir: Path | None = attrs.field(default=None, converter=optional_path)
    #: Pending reliable messages kept per recipient, and for how long (seconds).
    message_max_pending: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    message_max_age_s: float = attrs.field(
        default=DEFAULT_MESSAGE_MAX_AGE_S, validator=attrs.validators.gt(0)
    )
    #: Seconds a client connection may show no sign of life before it is closed as dead
    #: (it is pinged after two thirds of that), and seconds a session whose connection
    #: dropped without a clean close waits to be resumed before it leaves (0: no resume).
    client_timeout_s: float = attrs.field(
        default=DEFAULT_CLIENT_TIMEOUT_S, validator=validate_field(check_client_timeout)
    )
    resume_grace_s: float = attrs.field(
        default=DEFAULT_RESUME_GRACE_S, validator=validate_field(check_resume_grace)
    )
    #: The peer layer's timings (seconds): heartbeats ride on gossip every
    #: ``heartbeat_interval_s``, digests (repair) every ``digest_interval_s``, RTT pings every
    #: ``ping_interval_s`` (each ping and pong wakes the other daemon: not every heartbeat); a
    #: link silent for ``link_timeout_s`` is closed and redialled; a link's handshake gets
    #: ``handshake_timeout_s``; redials back off from ``redial_initial_s`` to ``redial_max_s``
    #: (a restarted listener is redialled within a second; one connect a second is no storm).
    heartbeat_interval_s: float = attrs.field(
        default=DEFAULT_HEARTBEAT_INTERVAL_S, validator=validate_field(check_seconds)
    )
    digest_interval_s: float = attrs.field(default=2.0, validator=validate_field(check_seconds))
    ping_interval_s: float = attrs.field(default=2.0, validator=validate_field(check_seconds))
    link_timeout_s: float = attrs.field(default=2.5, validator=validate_field(check_seconds))
    handshake_timeout_s: float = attrs.field(default=5.0, validator=validate_field(check_seconds))
    redial_initial_s: float = attrs.field(default=0.2, validator=validate_field(check_seconds))
    redial_max_s: float = attrs.field(default=1.0, validator=validate_field(check_seconds))
    #: Routed messages queued on one peer link before more are dropped (retransmission repairs).
    max_queued_routed: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))

    @property
    def token_keyed(self) -> bool:
        """Whether clients may bring tokens (any token key is configured)."""
        return (
            self.token_secret is not None
            or self.token_public_key is not None
            or self.token_jwks is not None
        )

    def __attrs_post_init__(self) -> None:
        if self.api_key is not None and self.http is None:
            raise ConfigError("the server API (--api-key-file) is served on --http: give --http")
        keyed = self.token_keyed
        if not keyed and not self.allow_anonymous:
            raise ConfigError(
                "no way for clients to authenticate: give --token-secret-file,"
                " --token-public-key-file, --token-jwks or --allow-anonymous"
            )
        if not keyed and (self.token_issuer is not None or self.token_audience is not None):
            raise ConfigError(
                "--token-issuer and --token-audience check tokens: give a token key"
                " (--token-secret-file, --token-public-key-file or --token-jwks)"
            )
        if not self.down_after_s < self.purge_after_s:
            raise ConfigError(
                f"down_after_s ({self.down_after_s}) must be less than purge_after_s"
                f" ({self.purge_after_s})"
            )
        _check_heartbeats(self.down_after_s, self.heartbeat_interval_s, "down_after_s")
        if not self.link_timeout_s > self.heartbeat_interval_s:
            raise ConfigError(
                f"link_timeout_s ({self.link_timeout_s:g}s) must be more than heartbeat_interval_s"
                f" ({self.heartbeat_interval_s:g}s)"
            )
        if self.redial_max_s < self.redial_initial_s:
            raise ConfigError(
                f"redial_max_s ({self.redial_max_s:g}s) is below redial_initial_s"
                f" ({self.redial_initial_s:g}s)"
            )


def _check_heartbeats(down_after_s: float, heartbeat_s: float, what: str) -> None:
    """``down_after_s`` spans at least ``MIN_HEARTBEATS_DOWN`` heartbeat intervals."""
    least = MIN_HEARTBEATS_DOWN * heartbeat_s
    if down_after_s < least:
        raise ConfigError(
            f"{what} ({down_after_s:g}s) must be at least {MIN_HEARTBEATS_DOWN} peer heartbeat"
            f" intervals ({least:g}s): shorter marks live peers down between two heartbeats"
        )


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file and check its keys, so a misspelt key is an error, not ignored.

    Relative file paths (`token_secret_file`, `tls_*`) are resolved against the config
    file's directory, so a config and its secrets can sit side by side whatever the working
    directory is.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r}: invalid TOML: {e}") from None
    for key in data:
        if key not in FILE_KEYS:
            hint = ""
            if key in LIMIT_KEYS or key in LIMIT_FLAGS:
                hint = " (limits go in a [limits] table)"
            raise ConfigError(f"config file {str(path)!r}: unknown key {key!r}{hint}")
    limits = data.get("limits", {})
    if not isinstance(limits, dict):
        raise ConfigError(f"config file {str(path)!r}: 'limits' must be a table")
    for key in limits:
        if key not in LIMIT_KEYS:
            known = ", ".join(sorted(LIMIT_KEYS))
            raise ConfigError(
                f"config file {str(path)!r}: unknown key 'limits.{key}' (known: {known})"
            )
    for key in PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value:
            data[key] = str(path.parent / Path(value).expanduser())
    jwks = data.get("token_jwks")
    if isinstance(jwks, str) and jwks and "://" not in jwks:  # a file, not a URL
        data["token_jwks"] = str(path.parent / Path(jwks).expanduser())
    return data


def _build_limits(options: Mapping[str, Any], where: Mapping[str, str]) -> Limits:
    """Limits from the `limits` table overridden by the limit flags.

    The burst follows the rate (2x) unless a burst was set, so raising only the rate does
    not leave a burst smaller than one second of traffic.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in dict(options.get("limits") or {}).items():
        where_given = where.get(f"limits.{key}", f"limits.{key}")
        if key not in LIMIT_KEYS:
            raise ConfigError(f"{where_given}: unknown limit")
        values[LIMIT_KEYS[key]] = value
        origin[LIMIT_KEYS[key]] = where_given
    for key, field_name in LIMIT_FLAGS.items():
        if options.get(key) is not None:
            values[field_name] = options[key]
            origin[field_name] = where.get(key, key)
    converted: dict[str, Any] = {}
    defaults = Limits()
    for field_name, value in values.items():
        what = origin[field_name]
        if not hasattr(defaults, field_name):
            raise ConfigError(f"{what}: unknown limit")
        if isinstance(getattr(defaults, field_name), float):
            number: float = as_float(value, what)
        else:
            number = as_int(value, what)
        if not number > 0:
            raise ConfigError(f"{what}: must be positive, got {value!r}")
        converted[field_name] = number
    if "max_messages_per_second" in converted and "message_burst" not in converted:
        converted["message_burst"] = max(1, math.ceil(2 * converted["max_messages_per_second"]))
    try:
        return Limits(**converted)
    except ValueError as e:  # pragma: no cover - every field was checked above
        raise ConfigError(str(e)) from None


def build_config(options: Mapping[str, Any], where: Mapping[str, str] | None = None) -> Config:
    """Build a `Config` from merged option values, raising `ConfigError` on any bad value.

    `options` uses the file/CLI keys (`region`, `listen`, `peers`, `token_secret_file`, ...,
    `limits` as a table of `Limits` fields, plus the limit flag keys of `LIMIT_FLAGS`, which
    win over the table). Missing or None values take their defaults. Values may be strings
    (flags, environment) or TOML types. `where` maps a key to how the user gave it (like
    `--listen` or `PRESENCED_LISTEN`) so that an error names the thing to fix.
    """
    where = where or {}
    known = FILE_KEYS | set(LIMIT_FLAGS)
    for key in options:
        if key not in known:
            raise ConfigError(f"{where.get(key, key)}: unknown option")

    def given(key: str) -> bool:
        return options.get(key) is not None

    def what(key: str) -> str:
        return where.get(key, key)

    kwargs: dict[str, Any] = {}
    if given("region"):
        kwargs["region"] = check_name(options["region"], what("region"))
    if given("node") and options["node"] != "":
        kwargs["node"] = check_name(options["node"], what("node"))
    if given("listen"):
        kwargs["listen"] = parse_host_port(options["listen"], what("listen"))
    if given("peers"):
        kwargs["peers"] = parse_peers(options["peers"], what("peers"))
    if given("peer_listen") and options["peer_listen"] != "":
        kwargs["peer_listen"] = parse_host_port(options["peer_listen"], what("peer_listen"))
    if given("token_secret_file") and options["token_secret_file"] != "":
        secret_file = options["token_secret_file"]
        if not isinstance(secret_file, str | Path):
            raise ConfigError(f"{what('token_secret_file')}: expected a file path")
        kwargs["token_secret"] = read_secret_file(secret_file, what("token_secret_file"))
    if given("token_public_key_file") and options["token_public_key_file"] != "":
        kwargs["token_public_key"] = read_public_key_file(
            options["token_public_key_file"], what("token_public_key_file")
        )
    if given("token_jwks") and options["token_jwks"] != "":
        kwargs["token_jwks"] = check_token_jwks(options["token_jwks"], what("token_jwks"))
    for key in ("token_issuer", "token_audience"):
        if given(key) and options[key] != "":
            kwargs[key] = check_token_claim(options[key], what(key))
    if given("api_key_file") and options["api_key_file"] != "":
        key_file = options["api_key_file"]
        if not isinstance(key_file, str | Path):
            raise ConfigError(f"{what('api_key_file')}: expected a file path")
        kwargs["api_key"] = read_secret_file(key_file, what("api_key_file"))
    if kwargs.get("api_key") is not None and not (given("http") and options["http"] != ""):
        raise ConfigError(
            f"{what('api_key_file')}: the server API is served on the HTTP side port: give --http"
        )
    if given("allow_anonymous"):
        kwargs["allow_anonymous"] = as_bool(options["allow_anonymous"], what("allow_anonymous"))
    if given("log_level"):
        kwargs["log_level"] = check_log_level(options["log_level"], what("log_level"))
    if given("log_format"):
        kwargs["log_format"] = check_log_format(options["log_format"], what("log_format"))
    if given("http") and options["http"] != "":
        kwargs["http"] = parse_host_port(options["http"], what("http"))
    if given("tick_ms"):
        kwargs["tick_ms"] = check_tick_ms(options["tick_ms"], what("tick_ms"))
    if given("limits") and not isinstance(options["limits"], Mapping):
        raise ConfigError(f"{what('limits')}: must be a table")
    kwargs["limits"] = _build_limits(options, where)
    for key in TLS_KEYS:
        if given(key) and options[key] != "":
            kwargs[key] = readable_file(options[key], what(key))
    tls_given = [key for key in TLS_KEYS if key in kwargs]
    if tls_given and len(tls_given) < len(TLS_KEYS):
        missing = [what(key) for key in TLS_KEYS if key not in kwargs]
        raise ConfigError(f"{what(tls_given[0])} also needs {' and '.join(missing)}")
    if (kwargs.get("peers") or kwargs.get("peer_listen")) and not tls_given:
        raise ConfigError(
            "peer links (peers, peer_listen) are mutual TLS: give --tls-cert, --tls-key and"
            " --tls-ca (make them with `presenced certs`)"
        )
    for key in ("down_after", "purge_after"):
        if given(key):
            seconds = as_float(options[key], what(key))
            if seconds <= 0:
                raise ConfigError(f"{what(key)}: must be positive, got {options[key]!r}")
            kwargs[f"{key}_s"] = seconds
    if given("data_dir") and options["data_dir"] != "":
        kwargs["data_dir"] = writable_dir(options["data_dir"], what("data_dir"))
    if given("message_max_pending"):
        count = as_int(options["message_max_pending"], what("message_max_pending"))
        if count < 1:
            raise ConfigError(f"{what('message_max_pending')}: must be at least 1, got {count}")
        kwargs["message_max_pending"] = count
    if given("message_max_age"):
        age = as_float(options["message_max_age"], what("message_max_age"))
        if not 0 < age < math.inf:
            raise ConfigError(f"{what('message_max_age')}: must be a positive number of seconds")
        kwargs["message_max_age_s"] = age
    if given("client_timeout"):
        kwargs["client_timeout_s"] = check_client_timeout(
            as_float(options["client_timeout"], what("client_timeout")), what("client_timeout")
        )
    if given("resume_grace"):
        kwargs["resume_grace_s"] = check_resume_grace(
            as_float(options["resume_grace"], what("resume_grace")), what("resume_grace")
        )
    _check_ports_distinct(kwargs, what)
    down = kwargs.get("down_after_s", DEFAULT_DOWN_AFTER_S)
    purge = kwargs.get("purge_after_s", DEFAULT_PURGE_AFTER_S)
    if not down < purge:
        raise ConfigError(
            f"{what('down_after')} ({down:g}s) must be less than {what('purge_after')} ({purge:g}s)"
        )
    _check_heartbeats(down, DEFAULT_HEARTBEAT_INTERVAL_S, what("down_after"))
    return Config(**kwargs)


def _check_ports_distinct(kwargs: Mapping[str, Any], what: Callable[[str], str]) -> None:
    """The client, peer and HTTP addresses must not collide (the second bind would fail)."""
    addresses = [
        (key, kwargs.get(key, DEFAULT_LISTEN if key == "listen" else None))
        for key in ("listen", "peer_listen", "http")
    ]
    bound = [(key, addr) for key, addr in addresses if addr is not None and addr.port != 0]
    wildcard = ("0.0.0.0", "::", "")
    for i, (key, addr) in enumerate(bound):
        for other_key, other in bound[i + 1 :]:
            same_host = addr.host == other.host or addr.host in wildcard or other.host in wildcard
            if addr.port == other.port and same_host:
                raise ConfigError(
                    f"{what(other_key)} ({other}) and {what(key)} ({addr}) use the same port"
                )
