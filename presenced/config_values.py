"""The values a configuration is made of, and their checks: addresses, names, peers, secrets,
numbers with their ranges, paths. Each check turns a bad value into a :class:`ConfigError`
whose text is one line naming the option (``what``), so the CLI can print it as it is.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs


class ConfigError(ValueError):
    """A configuration value is wrong; `str(error)` is a one-line reason fit for a user."""


DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7400
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
TICK_MS_RANGE = (2, 1000)
#: RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32

CLIENT_TIMEOUT_RANGE_S = (1.0, 3600.0)
RESUME_GRACE_RANGE_S = (0.0, 3600.0)

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@attrs.frozen
class HostPort:
    """A TCP address to listen on. Port 0 asks the OS for a free port (tests use it)."""

    host: str
    port: int

    def __str__(self) -> str:
        # Bracket IPv6 literals so the text parses back with `parse_host_port`.
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


DEFAULT_LISTEN = HostPort(DEFAULT_HOST, DEFAULT_PORT)


def parse_host_port(text: str, what: str) -> HostPort:
    """Parse `HOST:PORT`, `[IPV6]:PORT` or `:PORT` (host 127.0.0.1); `what` names the option.

    Listening on all interfaces must be asked for explicitly (`0.0.0.0:PORT`), which is why an
    empty host means loopback rather than "everywhere".
    """
    expected = f"{what}: expected HOST:PORT, [IPV6]:PORT or :PORT, got {text!r}"
    if not isinstance(text, str):
        raise ConfigError(expected)
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ConfigError(expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ConfigError(expected)
    elif ":" in host:
        raise ConfigError(f"{what}: put an IPv6 host in brackets, like [::1]:7400, got {text!r}")
    if not host:
        host = DEFAULT_HOST
    if any(c.isspace() or c in "[]/" for c in host):
        raise ConfigError(expected)
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(expected)
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"{what}: port must be 0..65535, got {port}")
    return HostPort(host, port)


def check_name(value: object, what: str) -> str:
    """Region and node names travel in gossip and logs: keep them short and plain."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigError(f"{what}: must be 1..64 characters of A-Z a-z 0-9 _ . -, got {value!r}")
    return value


def check_peer(url: str, what: str) -> str:
    problem = f"{what}: {url!r} is not a wss:// URL with host and port"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(problem) from None
    if parts.scheme == "ws":
        raise ConfigError(f"{what}: {url!r}: peer links are always TLS; use wss://")
    if parts.scheme != "wss" or not parts.hostname or port is None or port == 0:
        raise ConfigError(f"{problem} (like wss://us.example:7443)")
    if parts.username is not None or parts.query or parts.fragment:
        raise ConfigError(f"{problem}: no user, query or fragment allowed")
    return url


def parse_peers(value: str | Sequence[str], what: str = "peers") -> tuple[str, ...]:
    """Peer region URLs from a comma-separated string or a list; empty items are ignored.

    Duplicates are dropped (keeping first-seen order) because dialling one peer twice only
    doubles gossip traffic.
    """
    if isinstance(value, str):
        items: Sequence[object] = value.split(",")
    elif isinstance(value, Sequence):
        items = value
    else:
        raise ConfigError(f"{what}: expected a list or comma-separated string of URLs")
    peers: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{what}: peer URLs must be strings, got {item!r}")
        url = item.strip()
        if url and url not in peers:
            peers.append(check_peer(url, what))
    return tuple(peers)


def read_secret_file(path: str | Path, what: str = "token_secret_file") -> bytes:
    """The token signing secret: the file's bytes with surrounding whitespace stripped.

    The secret lives in a file, never on the command line, so that it does not show up in
    `ps` output or shell history. It must be at least 32 bytes (an HS256 key shorter than the
    hash is weak); `secrets.token_hex(32)` gives 64.
    """
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {str(path)!r}: {e.strerror or e}") from None
    if not secret:
        raise ConfigError(f"{what}: {str(path)!r} is empty")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{what}: the secret in {str(path)!r} is {len(secret)} bytes, need at least"
            f' {MIN_SECRET_BYTES} (make one: python -c "import secrets;'
            f' print(secrets.token_hex(32))" > secret)'
        )
    return secret


def check_log_level(value: object, what: str) -> str:
    """A log level name, any case; returned lower-case."""
    if isinstance(value, str) and value.lower() in LOG_LEVELS:
        return value.lower()
    raise ConfigError(f"{what}: must be one of {', '.join(LOG_LEVELS)}, got {value!r}")


def as_int(value: object, what: str) -> int:
    """An int from a TOML int or a decimal string (bools are not numbers here)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{what}: expected an integer, got {value!r}")


def as_float(value: object, what: str) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ConfigError(f"{what}: expected a number, got {value!r}")


def as_bool(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
    raise ConfigError(f"{what}: expected true or false, got {value!r}")


def check_log_format(value: object, what: str) -> str:
    """A log format name, any case; returned lower-case."""
    if isinstance(value, str) and value.lower() in LOG_FORMATS:
        return value.lower()
    raise ConfigError(f"{what}: must be one of {', '.join(LOG_FORMATS)}, got {value!r}")


def check_tick_ms(value: object, what: str) -> int:
    tick = as_int(value, what)
    lo, hi = TICK_MS_RANGE
    if not lo <= tick <= hi:
        raise ConfigError(f"{what}: must be {lo}..{hi} milliseconds, got {tick}")
    return tick


def validate_field(
    checker: Callable[[Any, str], object],
) -> Callable[[object, attrs.Attribute[Any], object], None]:
    """An attrs validator that runs a `check_*(value, what)` function with the field name."""

    def validate(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        checker(value, attribute.name)

    return validate


def check_peers_tuple(value: object, what: str) -> None:
    # Only the shape: `build_config` checks that user-given peers are ws(s) URLs, while
    # in-process simulations pass their own address schemes with their own transport.
    if (
        not isinstance(value, tuple)
        or not all(isinstance(p, str) and p for p in value)
        or len(set(value)) != len(value)
    ):
        raise ConfigError(f"{what}: expected a tuple of distinct peer addresses")


def check_seconds(value: object, what: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{what}: expected a positive number of seconds, got {value!r}")


def check_range_s(value: object, what: str, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise ConfigError(f"{what}: must be {lo:g}..{hi:g} seconds, got {value!r}")
    return float(value)


def check_client_timeout(value: object, what: str) -> float:
    return check_range_s(value, what, CLIENT_TIMEOUT_RANGE_S)


def read_public_key_file(path: object, what: str) -> bytes:
    """A PEM public key file for client tokens, checked now (RSA, EC, Ed25519, Ed448)."""
    from presenced.token_keys import KeyProblem, load_public_key

    if not isinstance(path, str | Path):
        raise ConfigError(f"{what}: expected a file path")
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {str(path)!r}: {e.strerror}") from None
    try:
        load_public_key(pem)
    except KeyProblem as e:
        raise ConfigError(f"{what}: {str(path)!r}: {e}") from None
    return pem


def check_token_jwks(value: object, what: str) -> str:
    """A JWKS source: an http(s) URL (fetched by the daemon), or a file, read and checked
    now (a JWKS with at least one usable signing key)."""
    from presenced.token_keys import KeyProblem, is_url, load_jwks_file

    if not isinstance(value, str | Path):
        raise ConfigError(f"{what}: expected a URL or a file path")
    source = str(value)
    if is_url(source):
        if not urllib.parse.urlsplit(source).hostname:
            raise ConfigError(f"{what}: {source!r} names no host")
        return source
    if "://" in source:
        raise ConfigError(f"{what}: only http(s) URLs or file paths, got {source!r}")
    try:
        load_jwks_file(source)
    except KeyProblem as e:
        raise ConfigError(f"{what}: {e}") from None
    return source


def check_token_claim(value: object, what: str) -> str:
    """An expected ``iss`` or ``aud``: a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what}: expected a non-empty string")
    return value


def check_resume_grace(value: object, what: str) -> float:
    return check_range_s(value, what, RESUME_GRACE_RANGE_S)


def optional_path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def check_secret(value: object, what: str) -> None:
    if value is not None and (not isinstance(value, bytes) or not value):
        raise ConfigError(f"{what}: must be non-empty bytes or None")


def check_level_exact(value: object, what: str) -> None:
    if value not in LOG_LEVELS:
        raise ConfigError(f"{what}: must be one of {', '.join(LOG_LEVELS)}, got {value!r}")


def check_format_exact(value: object, what: str) -> None:
    if value not in LOG_FORMATS:
        raise ConfigError(f"{what}: must be one of {', '.join(LOG_FORMATS)}, got {value!r}")


def check_tick_exact(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{what}: expected an integer, got {value!r}")
    check_tick_ms(value, what)


def writable_dir(value: object, what: str) -> Path:
    """A directory the daemon can write (created if missing), checked before it starts."""
    if not isinstance(value, str | Path):
        raise ConfigError(f"{what}: expected a directory path, got {value!r}")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}: {str(path)!r} is not a directory")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot create {str(path)!r}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {str(path)!r} is not writable")
    return path


def readable_file(value: object, what: str) -> Path:
    """A path that names a readable file now, so a typo fails at start, not at first use."""
    if not isinstance(value, str | Path):
        raise ConfigError(f"{what}: expected a file path, got {value!r}")
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{what}: {str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what}: {str(path)!r} is not readable")
    return path
