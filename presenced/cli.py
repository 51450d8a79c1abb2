"""The `presenced` command line: `run` the daemon, mint a `token`, and room for more commands.

Option values come from, in order of precedence: the command line, a `PRESENCED_*`
environment variable, the `--config` TOML file, then the built-in default. The merging is
done here (click reports where each value came from); checking is `presenced.config`'s job,
so a bad value from any source ends with the same kind of one-line error.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from typing import Any

import attrs
import click
from click.core import ParameterSource

from presenced import __version__
from presenced.auth import mint_token
from presenced.config import (
    DEFAULT_MESSAGE_MAX_AGE_S,
    LOG_FORMATS,
    LOG_LEVELS,
    Config,
    ConfigError,
    build_config,
    load_toml,
    read_secret_file,
)
from presenced.core.limits import Limits

__all__ = ["LAZY_COMMANDS", "cli", "main"]

#: Subcommands living in other modules, as `name -> "module:attribute"`. They are imported
#: only when used (or listed by --help), so `presenced run` does not pay for them and a
#: command module can import this one without a cycle.
LAZY_COMMANDS: dict[str, str] = {
    "certs": "presenced.cli_certs:certs",
    "demo": "presenced.cli_demo:demo",
    "status": "presenced.cli_status:status",
}


class BadConfig(click.ClickException):
    """A bad option value: one line on stderr and exit status 2, as for click's usage errors."""

    exit_code = 2


class LazyGroup(click.Group):
    """A click group that also offers the commands named in `LAZY_COMMANDS`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in LAZY_COMMANDS:
            module_name, _, attribute = LAZY_COMMANDS[cmd_name].partition(":")
            command = getattr(importlib.import_module(module_name), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{LAZY_COMMANDS[cmd_name]} is not a click command")
        return command


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "-V", "--version", prog_name="presenced")
def cli() -> None:
    """presenced is a presence daemon: clients connect over WebSocket to join rooms, share
    who is online with live cursors and metadata, and broadcast events to a room. Several
    regions gossip their presence to each other as a CRDT so every region sees everyone.
    """


#: Entry point named in pyproject (`presenced = "presenced.cli:main"`).
main = cli


def _default(owner: type, field: str) -> str:
    """``field``'s default in the configuration class ``owner``, as ``--help`` shows it:
    defaults live in one place, so the help cannot drift from them."""
    value = getattr(attrs.fields(owner), field).default
    return f"{value:g}" if isinstance(value, float) else str(value)


def _env(name: str) -> str:
    return f"PRESENCED_{name.upper()}"


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    envvar=_env("config"),
    show_envvar=True,
    help="TOML file of option values; keys are the option names with underscores, limits go"
    " in a [limits] table. Flags and environment variables override it. Default: none.",
)
@click.option(
    "--region",
    envvar=_env("region"),
    show_envvar=True,
    help="Name of this region (1-64 of A-Z a-z 0-9 _ . -). Default: local.",
)
@click.option(
    "--node",
    envvar=_env("node"),
    show_envvar=True,
    help="Name of this daemon within its region, unique across regions. Default: the region.",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    envvar=_env("listen"),
    show_envvar=True,
    help="Address for client WebSocket connections; ':PORT' means 127.0.0.1, '[::1]:PORT'"
    f" for IPv6, port 0 picks a free one. Default: {_default(Config, 'listen')}.",
)
@click.option(
    "--peers",
    metavar="URL,...",
    envvar=_env("peers"),
    show_envvar=True,
    help="Comma-separated wss:// URLs (with port) of other regions to gossip with,"
    " like wss://us.example:7443. Default: none.",
)
@click.option(
    "--peer-listen",
    metavar="HOST:PORT",
    envvar=_env("peer_listen"),
    show_envvar=True,
    help="Address on which to accept gossip from other regions. Default: none (do not"
    " accept peer connections).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    envvar=_env("tls_cert"),
    show_envvar=True,
    help="PEM certificate this node shows to peer regions (from `presenced certs issue`)."
    " Required with --peers or --peer-listen. Default: none.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False),
    envvar=_env("tls_key"),
    show_envvar=True,
    help="PEM private key of --tls-cert. Default: none.",
)
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False),
    envvar=_env("tls_ca"),
    show_envvar=True,
    help="PEM certificate of the CA that signs every region's certificate; peers without one"
    " are refused. Default: none.",
)
@click.option(
    "--down-after",
    type=float,
    metavar="SECONDS",
    envvar=_env("down_after"),
    show_envvar=True,
    help="Seconds without a heartbeat before a peer region's node is marked down: its users"
    " leave every room everywhere (they return if it comes back in time)."
    f" Default: {_default(Config, 'down_after_s')}.",
)
@click.option(
    "--purge-after",
    type=float,
    metavar="SECONDS",
    envvar=_env("purge_after"),
    show_envvar=True,
    help="Seconds without a heartbeat before a down node's users are dropped; more than"
    f" --down-after. Default: {_default(Config, 'purge_after_s')}.",
)
@click.option(
    "--token-secret-file",
    type=click.Path(dir_okay=False),
    envvar=_env("token_secret_file"),
    show_envvar=True,
    help="File holding the HS256 secret (at least 32 bytes) that client tokens are signed"
    " with. Default: none; then a public key, a JWKS or --allow-anonymous is required.",
)
@click.option(
    "--token-public-key-file",
    type=click.Path(dir_okay=False),
    envvar=_env("token_public_key_file"),
    show_envvar=True,
    help="PEM public key client tokens are signed for: RSA (RS256), EC P-256 (ES256) or"
    " Ed25519 (EdDSA); each key accepts only its own algorithms. Default: none.",
)
@click.option(
    "--token-jwks",
    metavar="URL-OR-FILE",
    envvar=_env("token_jwks"),
    show_envvar=True,
    help="An identity provider's JWKS (an http(s) URL or a file): tokens name their key"
    " by 'kid'. Loaded at start, every 5 minutes and on an unknown kid (at most every"
    " 30 s); a failed load keeps the keys held. Default: none.",
)
@click.option(
    "--token-issuer",
    metavar="ISS",
    envvar=_env("token_issuer"),
    show_envvar=True,
    help="Tokens must carry this 'iss' claim. Default: not checked.",
)
@click.option(
    "--token-audience",
    metavar="AUD",
    envvar=_env("token_audience"),
    show_envvar=True,
    help="Tokens must carry this audience in their 'aud' claim. Default: not checked.",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False),
    envvar=_env("api_key_file"),
    show_envvar=True,
    help="File holding the server API's key (at least 32 bytes): turns on the API for"
    " backends (publish, send, presence, disconnect) on the --http port, each request"
    " carrying the key as a bearer token. Needs --http. Default: none (API off).",
)
@click.option(
    "--allow-anonymous/--no-allow-anonymous",
    default=None,
    envvar=_env("allow_anonymous"),
    show_envvar=True,
    help="Let clients without a token in, under the user id they claim, into any room."
    " For development only. Default: off.",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    envvar=_env("log_level"),
    show_envvar=True,
    help=f"Least severe log messages to print. Default: {_default(Config, 'log_level')}.",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    envvar=_env("log_format"),
    show_envvar=True,
    help="Log lines as readable text, or as one JSON object per line (ts, level, logger,"
    f" msg, exc) for log shippers. Default: {_default(Config, 'log_format')}.",
)
@click.option(
    "--http",
    metavar="HOST:PORT",
    envvar=_env("http"),
    show_envvar=True,
    help="Address of the HTTP side port: /healthz, /readyz, /metrics (Prometheus), /status,"
    " and the web page. ':PORT' means 127.0.0.1. Default: none (no HTTP port).",
)
@click.option(
    "--tick-ms",
    type=int,
    envvar=_env("tick_ms"),
    show_envvar=True,
    help="Milliseconds between batched room updates sent to clients (2-1000); lower is"
    f" snappier and costs more. Default: {_default(Config, 'tick_ms')}.",
)
@click.option(
    "--max-connections",
    type=int,
    envvar=_env("max_connections"),
    show_envvar=True,
    help=f"Most concurrent client connections. Default: {_default(Limits, 'max_connections')}.",
)
@click.option(
    "--max-frame-bytes",
    type=int,
    envvar=_env("max_frame_bytes"),
    show_envvar=True,
    help="Largest client WebSocket message, in bytes."
    f" Default: {_default(Limits, 'max_frame_bytes')}.",
)
@click.option(
    "--max-meta-bytes",
    type=int,
    envvar=_env("max_meta_bytes"),
    show_envvar=True,
    help="Largest presence metadata of one member, in bytes of compact JSON."
    f" Default: {_default(Limits, 'max_meta_bytes')}.",
)
@click.option(
    "--max-rooms-per-connection",
    type=int,
    envvar=_env("max_rooms_per_connection"),
    show_envvar=True,
    help="Most rooms one connection may be in at once."
    f" Default: {_default(Limits, 'max_rooms_per_connection')}.",
)
@click.option(
    "--max-msg-rate",
    type=float,
    envvar=_env("max_msg_rate"),
    show_envvar=True,
    help="Sustained messages per second allowed per connection (WebSocket pings count too)."
    f" Default: {_default(Limits, 'max_messages_per_second')}.",
)
@click.option(
    "--msg-burst",
    type=int,
    envvar=_env("msg_burst"),
    show_envvar=True,
    help="Messages one connection may send in a burst above the rate. Default: twice the"
    f" --max-msg-rate ({_default(Limits, 'message_burst')}).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    envvar=_env("data_dir"),
    show_envvar=True,
    help="Directory for the durable store of reliable direct messages (SQLite, WAL);"
    " created if missing. Default: none, and reliable messages live in memory only.",
)
@click.option(
    "--message-max-pending",
    type=int,
    envvar=_env("message_max_pending"),
    show_envvar=True,
    help="Undelivered reliable messages kept per recipient; more are refused with"
    f" store_full. Default: {_default(Config, 'message_max_pending')}.",
)
@click.option(
    "--message-max-age",
    type=float,
    metavar="SECONDS",
    envvar=_env("message_max_age"),
    show_envvar=True,
    help="Seconds an undelivered reliable message is kept before it expires (its sender"
    f" is told). Default: {_default(Config, 'message_max_age_s')}"
    f" ({DEFAULT_MESSAGE_MAX_AGE_S / 86400:g} days).",
)
@click.option(
    "--client-timeout",
    type=float,
    metavar="SECONDS",
    envvar=_env("client_timeout"),
    show_envvar=True,
    help="Seconds a client connection may show no sign of life (any frame, a pong) before it"
    " is closed as dead; quiet ones are pinged after two thirds of it (1-3600)."
    f" Default: {_default(Config, 'client_timeout_s')}.",
)
@click.option(
    "--resume-grace",
    type=float,
    metavar="SECONDS",
    envvar=_env("resume_grace"),
    show_envvar=True,
    help="Seconds a session whose connection dropped without a clean close stays in its"
    " rooms for its client to resume it; 0 turns resume off (0-3600)."
    f" Default: {_default(Config, 'resume_grace_s')}.",
)
def run(config_file: str | None, **params: Any) -> None:
    """Run the presence daemon until interrupted (Ctrl-C or SIGTERM)."""
    ctx = click.get_current_context()
    try:
        options: dict[str, Any] = load_toml(config_file) if config_file else {}
        # How each value was given, for error messages; options not given go by their flag.
        flags = {name: _flag(ctx, name) for name in params}
        where = dict(flags)
        where.update({key: f"{key} in {config_file}" for key in options})
        for key in options.get("limits", {}):
            where[f"limits.{key}"] = f"limits.{key} in {config_file}"
        for name, value in params.items():
            source = ctx.get_parameter_source(name)
            if source is ParameterSource.COMMANDLINE:
                options[name], where[name] = value, flags[name]
            elif source is ParameterSource.ENVIRONMENT:
                options[name], where[name] = value, _env(name)
        config = build_config(options, where)
    except ConfigError as e:
        raise BadConfig(str(e)) from None
    _configure_logging(config.log_level, config.log_format)
    _warn_at_start(options.get("token_secret_file"), options.get("api_key_file"))
    # Ctrl-C is how a foreground daemon is meant to stop: no traceback, exit status 0.
    with contextlib.suppress(KeyboardInterrupt):
        try:
            _start_daemon(config)
        except Exception as e:  # a TLS file or an address only the outside world refutes
            from presenced.server.startup import find_startup_error

            problem = find_startup_error(e)
            if problem is None:
                raise
            raise BadConfig(problem.describe(where)) from None


def _flag(ctx: click.Context, name: str) -> str:
    """The long flag of parameter `name` (like `--listen`)."""
    for param in ctx.command.params:
        if param.name == name and isinstance(param, click.Option):
            return param.opts[0]
    return name


def _configure_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr: text lines with time, level and logger name, or JSON lines."""
    from presenced.logs import configure_logging

    configure_logging(level, fmt)


def _warn_at_start(secret_file: object, api_key_file: object = None) -> None:
    """Log what the daemon can run with but the operator should fix (one line each)."""
    import logging

    from presenced.server.startup import secret_file_warning

    for path, what in ((secret_file, "token secret"), (api_key_file, "API key")):
        if isinstance(path, str) and path:
            warning = secret_file_warning(path, what)
            if warning is not None:
                logging.getLogger("presenced.startup").warning("%s", warning)


def _start_daemon(config: Config) -> None:
    """Run the daemon to completion; tests replace this to capture the `Config`.

    Imports are deferred so the CLI works (and `presenced token` starts fast) without
    loading the server.
    """
    import trio

    from presenced.server.daemon import run_daemon
    from presenced.server.messaging import StoreError

    try:
        trio.run(run_daemon, config)
    except StoreError as e:  # e.g. --data-dir holds another program's file, or is read-only
        raise click.ClickException(f"cannot open the message store: --data-dir: {e}") from None


@cli.command()
@click.option("--user", required=True, help="User id the token is for (its 'sub').")
@click.option(
    "--room",
    "rooms",
    multiple=True,
    required=True,
    metavar="PATTERN",
    help="Room the user may join; a glob pattern like 'doc-*' or '*'. Repeat for more.",
)
@click.option(
    "--ttl",
    type=click.FloatRange(min=0),
    default=3600,
    show_default=True,
    help="Seconds until the token expires; 0 means it never expires.",
)
@click.option(
    "--token-secret-file",
    type=click.Path(dir_okay=False),
    required=True,
    envvar=_env("token_secret_file"),
    show_envvar=True,
    help="File holding the secret the daemon verifies tokens with (its --token-secret-file).",
)
def token(user: str, rooms: tuple[str, ...], ttl: float, token_secret_file: str) -> None:
    """Print a client token (a JWT) for --user, allowed into the --room patterns.

    The secret file is shared with the daemon; make one with:

    \b
        python -c "import secrets;print(secrets.token_hex(32))" > secret
        chmod 600 secret
    """
    try:
        secret = read_secret_file(token_secret_file, "--token-secret-file")
        text = mint_token(secret, user, rooms, ttl_s=ttl or None, now=time.time())
    except (ConfigError, ValueError) as e:
        raise BadConfig(str(e)) from None
    click.echo(text)
