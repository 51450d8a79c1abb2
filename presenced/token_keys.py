"""The keys client tokens are checked with: the HS256 secret, a public key (RS256, ES256,
EdDSA...) and a JWKS (keys looked up by ``kid``), each accepting only its own algorithms.

Why it looks the way it does:

* **Algorithms are pinned by key**, never read from the token: the secret takes HS256 only,
  an RSA key RS256/384/512 and PS256/384/512, an EC key the ES algorithm of its curve, an
  Ed25519 or Ed448 key EdDSA. The token's header only picks which configured key to try, and
  PyJWT then accepts nothing but that key's algorithms, so ``alg: none`` and the HS/RS
  confusion (a public key used as an HMAC secret) cannot pass. A JWKS key takes the
  algorithm PyJWT derives from it (its ``alg``, else its type and curve); symmetric
  (``oct``) keys and keys not for signatures are left out of the set.
* **A hello never waits for the network.** :meth:`TokenVerifier.verify` is synchronous and
  only reads the cached key set; :meth:`TokenVerifier.run`, a task of the daemon, loads the
  set at start, every ``JWKS_REFRESH_S`` and, at most once per ``JWKS_COOLDOWN_S``, when a
  token names a ``kid`` the set lacks (a rotated key), in a worker thread (PyJWT's
  :class:`jwt.PyJWKClient` over HTTP(S), or the file). A load that fails keeps the keys
  already held: sessions in are unaffected, and new hellos signed with known keys still
  pass; a hello naming an unknown ``kid`` gets ``unauthorized``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import attrs
import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from presenced.auth import (
    ALGORITHM,
    MAX_USER_ID,
    AuthError,
    Grant,
    check_token_text,
    decode_claims,
    grant_from_claims,
)

__all__ = [
    "JWKS_COOLDOWN_S",
    "JWKS_REFRESH_S",
    "KeyProblem",
    "TokenVerifier",
    "algorithms_of",
    "load_jwks_file",
    "load_public_key",
    "parse_jwks",
]

log = logging.getLogger(__name__)

#: Seconds between scheduled loads of the JWKS (identity providers rotate keys in days and
#: publish a new key well before signing with it).
JWKS_REFRESH_S = 300.0
#: Least seconds between loads asked for by unknown ``kid``s: a client sending made-up
#: ``kid``s cannot make the daemon hammer the identity provider.
JWKS_COOLDOWN_S = 30.0
#: Seconds before a failed load is tried again, and an HTTP fetch's timeout.
JWKS_RETRY_S = 10.0
JWKS_TIMEOUT_S = 10.0

_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class KeyProblem(ValueError):
    """A key file or key set that cannot be used (one line: the config's error)."""


def algorithms_of(key: object) -> tuple[str, ...]:
    """The JWT algorithms a public key may verify, from its type (and curve)."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _EC.get(key.curve.name)
        if algorithm is None:
            raise KeyProblem(f"unsupported elliptic curve {key.curve.name}")
        return (algorithm,)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise KeyProblem(f"unsupported public key type {type(key).__name__}")


@attrs.frozen
class PublicKey:
    """A configured public key and the algorithms it verifies."""

    key: Any = attrs.field(repr=False)
    algorithms: tuple[str, ...]


def load_public_key(pem: bytes) -> PublicKey:
    """A PEM public key (``-----BEGIN PUBLIC KEY-----``: RSA, EC P-256/384/521, Ed25519,
    Ed448); :class:`KeyProblem` for anything else (a private key, a certificate, garbage)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise KeyProblem(f"not a PEM public key ({e})") from None
    return PublicKey(key, algorithms_of(key))


def parse_jwks(data: object) -> dict[str, jwt.PyJWK]:
    """A JWKS document's signing keys by ``kid``: asymmetric keys with a ``kid``, for
    signatures (``use`` "sig" or absent), that PyJWT can use; the others are left out.
    :class:`KeyProblem` when the document is not a key set or holds no usable key."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeyProblem('not a JWKS: need an object with a "keys" list')
    keys: dict[str, jwt.PyJWK] = {}
    for item in data["keys"]:
        if not isinstance(item, dict) or item.get("kty") == "oct":
            continue
        kid = item.get("kid")
        if not isinstance(kid, str) or not kid or item.get("use", "sig") != "sig":
            continue
        try:
            keys[kid] = jwt.PyJWK(item)
        except jwt.PyJWTError:
            continue
    if not keys:
        raise KeyProblem("the JWKS holds no usable signing key (asymmetric, with a kid)")
    return keys


def load_jwks_file(path: str | Path) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS file (see :func:`parse_jwks`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyProblem(f"cannot read {str(path)!r}: {e}") from None
    try:
        return parse_jwks(json.loads(text))
    except ValueError as e:
        raise KeyProblem(f"{str(path)!r}: {e}") from None


def is_url(source: str) -> bool:
    """Whether a ``--token-jwks`` value is an HTTP(S) URL (else it is a file path)."""
    return urlparse(source).scheme.lower() in ("http", "https")


def _jwks_loader(source: str) -> Callable[[], dict[str, jwt.PyJWK]]:
    """A blocking function that loads the key set (run in a worker thread)."""
    if not is_url(source):
        return lambda: load_jwks_file(source)
    # PyJWT's client does the HTTP (no redirects, http(s) only, a timeout); the caching
    # and the refresh policy are ours (trio side), so its own cache is off.
    client = jwt.PyJWKClient(source, cache_jwk_set=False, timeout=JWKS_TIMEOUT_S)

    def fetch() -> dict[str, jwt.PyJWK]:
        try:
            return parse_jwks(client.fetch_data())
        except jwt.PyJWTError as e:
            raise KeyProblem(str(e)) from None

    return fetch


class TokenVerifier:
    """The daemon's token keys and claim checks (``--token-secret-file``,
    ``--token-public-key-file``, ``--token-jwks``, ``--token-issuer``,
    ``--token-audience``)."""

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        public_key: PublicKey | None = None,
        jwks: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        max_user_id: int = MAX_USER_ID,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.secret = secret
        self.public_key = public_key
        self.jwks_source = jwks
        self.issuer = issuer
        self.audience = audience
        self.max_user_id = max_user_id
        #: The JWKS's keys by ``kid`` as last loaded (empty until the first load).
        self.jwks: Mapping[str, jwt.PyJWK] = {}
        #: Clock time (trio's) of the last load tried, and whether one is asked for.
        self.loaded_at = -math.inf
        self._clock = clock
        self._wanted = trio.Event()
        self.loads = 0
        self.load_failures = 0

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (else only anonymous hellos can get in)."""
        return self.secret is not None or self.public_key is not None or bool(self.jwks_source)

    # ------------------------------------------------------------------ verifying

    def verify(self, token: str, now: float) -> Grant:
        """The grant of ``token`` at Unix time ``now``; :class:`AuthError` for anything
        wrong. Never blocks: a ``kid`` the cached JWKS lacks asks :meth:`run` for a load."""
        text = check_token_text(token)
        try:
            header = jwt.get_unverified_header(text)
        except jwt.PyJWTError as e:
            raise AuthError("unauthorized", f"malformed token: {e}") from None
        except Exception:
            raise AuthError("unauthorized", "malformed token") from None
        key, algorithms = self._key_for(header)
        claims = decode_claims(text, key, algorithms, issuer=self.issuer, audience=self.audience)
        return grant_from_claims(claims, now, self.max_user_id)

    def _key_for(self, header: dict[str, Any]) -> tuple[Any, tuple[str, ...]]:
        """The configured key a token's header points at, with that key's algorithms. The
        header only chooses; the algorithms are the key's own."""
        alg = header.get("alg")
        kid = header.get("kid")
        if alg == ALGORITHM and self.secret is not None:
            return self.secret, (ALGORITHM,)
        if isinstance(kid, str) and kid in self.jwks:
            jwk = self.jwks[kid]
            return jwk.key, (jwk.algorithm_name,)
        public = self.public_key
        if public is not None and alg in public.algorithms:
            return public.key, public.algorithms
        if self.jwks_source and isinstance(kid, str) and alg != ALGORITHM:
            self.want_load()
            raise AuthError("unauthorized", f"unknown key id {kid[:64]!r}")
        accepted = sorted(
            ({ALGORITHM} if self.secret is not None else set())
            | set(public.algorithms if public is not None else ())
            | {jwk.algorithm_name for jwk in self.jwks.values()}
        )
        raise AuthError(
            "unauthorized",
            f"wrong algorithm: only {', '.join(accepted) or 'none'} is accepted",
        )

    # ------------------------------------------------------------------ the key set

    def want_load(self) -> None:
        """Ask the loader for a JWKS load (it waits out the cooldown first)."""
        self._wanted.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the JWKS at start (``task_status.started`` once the first load ended, well
        or not), then every ``JWKS_REFRESH_S``, after ``JWKS_RETRY_S`` when a load failed,
        and when a token names an unknown ``kid`` (at most once per ``JWKS_COOLDOWN_S``).
        Returns at once without a JWKS."""
        source = self.jwks_source
        if not source:
            task_status.started()
            return
        load = _jwks_loader(source)
        ok = await self.load(load)
        task_status.started()
        while True:
            wait_s = JWKS_REFRESH_S if ok else JWKS_RETRY_S
            with trio.move_on_after(wait_s):
                await self._wanted.wait()
                # Asked for by an unknown kid: not before the cooldown.
                await trio.sleep_until(self.loaded_at + JWKS_COOLDOWN_S)
            ok = await self.load(load)

    async def load(self, load: Callable[[], dict[str, jwt.PyJWK]]) -> bool:
        """Load the key set in a worker thread; on failure keep the keys held."""
        self._wanted = trio.Event()
        self.loaded_at = self._clock()
        self.loads += 1
        try:
            keys = await trio.to_thread.run_sync(load, abandon_on_cancel=True)
        except Exception as e:  # a down endpoint, a bad document: keep what we have
            self.load_failures += 1
            log.warning(
                "token JWKS %s: %s; keeping the %d keys held", self.jwks_source, e, len(self.jwks)
            )
            return False
        if set(keys) != set(self.jwks):
            log.info("token JWKS %s: keys %s", self.jwks_source, ", ".join(sorted(keys)))
        self.jwks = keys
        return True
