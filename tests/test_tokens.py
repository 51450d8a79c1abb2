"""Token keys (presenced/token_keys.py): public keys of each type, JWKS from a file and over
HTTP, issuer and audience, capabilities, algorithm confusion, and the session rules of
refresh and expiry."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from presenced.auth import AuthError, Grant, mint_token, verify_token
from presenced.config import Config, ConfigError, build_config
from presenced.core import client_wire as w
from presenced.core.limits import Limits
from presenced.core.session import SessionRules
from presenced.core.ws_frames import CloseCode
from presenced.token_keys import (
    KeyProblem,
    TokenVerifier,
    load_jwks_file,
    load_public_key,
    parse_jwks,
)

NOW = 1_700_000_000.0
SECRET = b"s" * 64
CLAIMS: dict[str, Any] = {"sub": "ann", "rooms": ["doc-*"], "exp": NOW + 60}


def _pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _jwk(private: Any, kid: str, **extra: Any) -> dict[str, Any]:
    algorithm = {
        rsa.RSAPrivateKey: "RS256",
        ec.EllipticCurvePrivateKey: "ES256",
        ed25519.Ed25519PrivateKey: "EdDSA",
    }
    alg = next(name for kind, name in algorithm.items() if isinstance(private, kind))
    data = json.loads(jwt.get_algorithm_by_name(alg).to_jwk(private.public_key()))
    return {**data, "kid": kid, **extra}


RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()
KEYS = {"RS256": RSA, "ES256": EC, "EdDSA": ED}


def _refused(verifier: TokenVerifier, token: str, now: float = NOW) -> str:
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now)
    assert info.value.code == "unauthorized"
    return info.value.message


# ------------------------------------------------------------------------------ public keys


@pytest.mark.parametrize("alg", KEYS)
def test_a_public_key_verifies_tokens_of_its_own_algorithm(alg: str) -> None:
    private = KEYS[alg]
    verifier = TokenVerifier(public_key=load_public_key(_pem(private)))
    grant = verifier.verify(jwt.encode(CLAIMS, private, algorithm=alg), NOW)
    assert grant == Grant("ann", ("doc-*",), NOW + 60)
    other = {k: v for k, v in KEYS.items() if k != alg}
    for other_alg, other_key in other.items():
        # Another key type's token (even one of the right user) is refused.
        message = _refused(verifier, jwt.encode(CLAIMS, other_key, algorithm=other_alg))
        assert "wrong algorithm" in message
    forged = jwt.encode(CLAIMS, _another(private), algorithm=alg)
    assert _refused(verifier, forged) == "bad signature"


def _another(private: Any) -> Any:
    if isinstance(private, rsa.RSAPrivateKey):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def test_no_algorithm_confusion_between_the_secret_and_a_public_key() -> None:
    pem = _pem(RSA)
    both = TokenVerifier(secret=SECRET, public_key=load_public_key(pem))
    # The classic attack: HS256 keyed with the public key's text. Only the secret keys HS256.
    assert both.verify(jwt.encode(CLAIMS, SECRET, algorithm="HS256"), NOW).user == "ann"
    assert both.verify(jwt.encode(CLAIMS, RSA, algorithm="RS256"), NOW).user == "ann"
    forged = _hmac_token(CLAIMS, pem)
    assert _refused(both, forged) == "bad signature"
    public_only = TokenVerifier(public_key=load_public_key(pem))
    assert "wrong algorithm" in _refused(public_only, forged)
    assert "wrong algorithm" in _refused(public_only, mint_token(SECRET, "ann", ["*"], 60, NOW))
    # An RS256 token where only the secret is configured.
    secret_only = TokenVerifier(secret=SECRET)
    assert "wrong algorithm" in _refused(secret_only, jwt.encode(CLAIMS, RSA, algorithm="RS256"))
    # alg none, whatever the keys.
    unsigned = jwt.encode(CLAIMS, None, algorithm="none")
    for verifier in (both, public_only, secret_only):
        assert "wrong algorithm" in _refused(verifier, unsigned)


def _hmac_token(claims: dict[str, Any], key: bytes) -> str:
    """HS256 keyed with arbitrary bytes (PyJWT refuses a PEM as an HMAC key: do it by hand)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def test_bad_public_key_files_are_refused(tmp_path: Path) -> None:
    private_pem = RSA.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for data in (b"", b"garbage", private_pem):
        with pytest.raises(KeyProblem):
            load_public_key(data)
    path = tmp_path / "key.pem"
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"--token-public-key-file: .*not a PEM public key"):
        build_config(
            {"token_public_key_file": str(path)},
            {"token_public_key_file": "--token-public-key-file"},
        )
    path.write_bytes(_pem(EC))
    config = build_config({"token_public_key_file": str(path)})
    assert config.token_public_key == _pem(EC) and config.token_keyed


# ------------------------------------------------------------------------------ JWKS


def _jwks(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def test_jwks_file_keys_are_looked_up_by_kid(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    document = _jwks(
        _jwk(RSA, "r1"),
        _jwk(EC, "e1"),
        _jwk(ED, "d1"),
        {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},  # a secret in a public key set: left out
        _jwk(_another(RSA), "enc", use="enc"),  # not for signatures: left out
    )
    path.write_text(json.dumps(document))
    keys = load_jwks_file(path)
    assert sorted(keys) == ["d1", "e1", "r1"]
    verifier = TokenVerifier(jwks=str(path))
    verifier.jwks = keys
    for kid, (alg, private) in zip(("r1", "e1", "d1"), KEYS.items(), strict=True):
        token = jwt.encode(CLAIMS, private, algorithm=alg, headers={"kid": kid})
        assert verifier.verify(token, NOW).user == "ann"
    # A key's kid with another key's signature or algorithm.
    assert "bad signature" in _refused(
        verifier, jwt.encode(CLAIMS, _another(RSA), algorithm="RS256", headers={"kid": "r1"})
    )
    assert "wrong algorithm" in _refused(
        verifier, jwt.encode(CLAIMS, EC, algorithm="ES256", headers={"kid": "r1"})
    )
    # HS256 with the "oct" key's secret is no way in.
    assert "wrong algorithm" in _refused(
        verifier, jwt.encode(CLAIMS, b"secret" * 6, algorithm="HS256", headers={"kid": "sym"})
    )
    # An unknown kid is refused at once and asks the loader for a load.
    assert not verifier._wanted.is_set()
    unknown = jwt.encode(CLAIMS, RSA, algorithm="RS256", headers={"kid": "r2"})
    assert _refused(verifier, unknown) == "unknown key id 'r2'"
    assert verifier._wanted.is_set()


@pytest.mark.parametrize(
    "document",
    [[], {"keys": "x"}, {"keys": []}, {"keys": [{"kty": "oct", "k": "eA", "kid": "a"}]}],
)
def test_unusable_jwks_are_refused(document: Any, tmp_path: Path) -> None:
    with pytest.raises(KeyProblem):
        parse_jwks(document)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="--token-jwks: "):
        build_config({"token_jwks": str(path)}, {"token_jwks": "--token-jwks"})


def test_jwks_config_values(tmp_path: Path) -> None:
    assert build_config({"token_jwks": "https://idp.example/.well-known/jwks.json"}).token_keyed
    for bad in ("ftp://idp.example/jwks", "file:///etc/jwks", "http://"):
        with pytest.raises(ConfigError, match="--token-jwks"):
            build_config({"token_jwks": bad}, {"token_jwks": "--token-jwks"})
    with pytest.raises(ConfigError, match="--token-jwks: cannot read"):
        build_config({"token_jwks": str(tmp_path / "none.json")}, {"token_jwks": "--token-jwks"})
    with pytest.raises(ConfigError, match="give a token key"):
        Config(allow_anonymous=True, token_issuer="https://idp.example/")


class _JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose document (or failure) the test sets."""

    def __init__(self) -> None:
        self.document: dict[str, Any] | None = None
        self.hits = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                if owner.document is None:
                    self.send_error(503)
                    return
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


@pytest.fixture
def jwks_server() -> Iterator[_JwksServer]:
    server = _JwksServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


async def test_jwks_over_http_loads_refreshes_on_unknown_kid_and_survives_an_outage(
    jwks_server: _JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import presenced.token_keys as token_keys

    monkeypatch.setattr(token_keys, "JWKS_COOLDOWN_S", 0.2)
    jwks_server.document = _jwks(_jwk(RSA, "k1"))
    verifier = TokenVerifier(jwks=jwks_server.url, issuer="https://idp", audience="presenced")
    claims = {**CLAIMS, "iss": "https://idp", "aud": ["presenced", "other"]}
    async with trio.open_nursery() as nursery:
        await nursery.start(verifier.run)
        assert list(verifier.jwks) == ["k1"] and jwks_server.hits == 1
        old = jwt.encode(claims, RSA, algorithm="RS256", headers={"kid": "k1"})
        assert verifier.verify(old, NOW).user == "ann"

        # The provider rotates to a new key: the first token with it is refused (a hello
        # never waits), and it makes the loader fetch the set again after the cooldown.
        jwks_server.document = _jwks(_jwk(RSA, "k1"), _jwk(EC, "k2"))
        new = jwt.encode(claims, EC, algorithm="ES256", headers={"kid": "k2"})
        assert _refused(verifier, new) == "unknown key id 'k2'"
        with trio.fail_after(5):
            while "k2" not in verifier.jwks:
                await trio.sleep(0.02)
        assert verifier.verify(new, NOW).user == "ann"
        # Many unknown kids within the cooldown cost one fetch.
        hits = jwks_server.hits
        for n in range(20):
            forged = jwt.encode(claims, EC, algorithm="ES256", headers={"kid": f"x{n}"})
            _refused(verifier, forged)
        await trio.sleep(0.5)
        assert jwks_server.hits == hits + 1

        # The endpoint goes down: the keys held stay, and so does every key's token.
        jwks_server.document = None
        _refused(verifier, jwt.encode(claims, ED, algorithm="EdDSA", headers={"kid": "k3"}))
        with trio.fail_after(5):
            while verifier.load_failures == 0:
                await trio.sleep(0.02)
        assert sorted(verifier.jwks) == ["k1", "k2"]
        assert verifier.verify(old, NOW).user == "ann"
        nursery.cancel_scope.cancel()


async def test_a_jwks_endpoint_down_at_start_does_not_stop_the_start(
    jwks_server: _JwksServer,
) -> None:
    verifier = TokenVerifier(jwks=jwks_server.url)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(verifier.run)
        assert verifier.jwks == {} and verifier.load_failures == 1
        token = jwt.encode(CLAIMS, RSA, algorithm="RS256", headers={"kid": "k1"})
        assert _refused(verifier, token) == "unknown key id 'k1'"
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ claims


def test_issuer_and_audience_are_checked_when_given() -> None:
    verifier = TokenVerifier(secret=SECRET, issuer="https://idp", audience="presenced")
    ok = {**CLAIMS, "iss": "https://idp", "aud": "presenced"}
    assert verifier.verify(jwt.encode(ok, SECRET, algorithm="HS256"), NOW).user == "ann"
    cases = {
        "wrong issuer": {**ok, "iss": "https://evil"},
        "missing 'iss'": {k: v for k, v in ok.items() if k != "iss"},
        "wrong audience": {**ok, "aud": ["other"]},
        "missing 'aud'": {k: v for k, v in ok.items() if k != "aud"},
    }
    for reason, claims in cases.items():
        assert reason in _refused(verifier, jwt.encode(claims, SECRET, algorithm="HS256"))
    # Not configured: not checked (identity providers' tokens carry an aud).
    loose = TokenVerifier(secret=SECRET)
    assert loose.verify(jwt.encode(cases["wrong audience"], SECRET, algorithm="HS256"), NOW)


def test_user_ids_over_the_limit_are_refused() -> None:
    # docs/protocol.md: user ids are 1-128 characters (Limits.max_user_id), tokens included.
    ok = mint_token(SECRET, "u" * 128, ["*"], None, NOW)
    long = mint_token(SECRET, "u" * 129, ["*"], None, NOW)
    assert verify_token(SECRET, ok, NOW).user == "u" * 128
    with pytest.raises(AuthError, match="1 to 128 characters"):
        verify_token(SECRET, long, NOW)
    verifier = TokenVerifier(secret=SECRET, max_user_id=Limits().max_user_id)
    assert "'sub'" in _refused(verifier, long)
    assert "control" in _refused(verifier, mint_token(SECRET, "a\nb", ["*"], None, NOW))


def test_capabilities() -> None:
    caps = {"rooms": {"doc-*": ["presence"], "chat-*": ["presence", "broadcast"]}, "send": False}
    token = mint_token(SECRET, "ann", ["doc-*", "chat-*"], 60, NOW, caps=caps)
    grant = verify_token(SECRET, token, NOW)
    assert grant.may_join("doc-1") and grant.may_join("chat-1")
    assert not grant.may_broadcast("doc-1")
    assert grant.may_broadcast("chat-1")
    assert not grant.may_send
    # Absent: today's behaviour, everything allowed.
    plain = verify_token(SECRET, mint_token(SECRET, "ann", ["*"], 60, NOW), NOW)
    assert plain.may_broadcast("anything") and plain.may_send
    only_send = verify_token(SECRET, mint_token(SECRET, "a", ["*"], 60, NOW, caps={}), NOW)
    assert only_send.may_broadcast("x") and only_send.may_send
    # An unknown capability grants nothing (newer issuers cannot widen an older daemon).
    odd = {"rooms": {"*": ["shout"]}}
    assert not verify_token(
        SECRET, mint_token(SECRET, "a", ["*"], 60, NOW, caps=odd), NOW
    ).may_broadcast("x")
    for bad in (
        [],
        {"send": "yes"},
        {"rooms": ["*"]},
        {"rooms": {"*": "broadcast"}},
        {"rooms": {"": []}},
    ):
        with pytest.raises(AuthError, match="'caps'"):
            verify_token(SECRET, jwt.encode({**CLAIMS, "caps": bad}, SECRET), NOW)


# ------------------------------------------------------------------------------ the rules


def _rules(grant: Grant, *, by_token: bool = True) -> SessionRules:
    rules = SessionRules(Limits(), 0.0)
    rules.greeted(grant, by_token=by_token)
    return rules


def test_rules_enforce_capabilities() -> None:
    caps = (("doc-*", frozenset({"presence"})), ("chat-*", frozenset({"broadcast"})))
    rules = _rules(Grant("ann", ("*",), None, room_caps=caps, may_send=False))
    for room in ("doc-1", "chat-1"):
        rules.join(w.Join(1, room))
    with pytest.raises(w.ProtocolError) as refused:
        rules.broadcast(w.Broadcast(2, "doc-1", "chat"))
    assert refused.value.code == w.FORBIDDEN and refused.value.ref == 2
    rules.broadcast(w.Broadcast(3, "chat-1", "chat"))
    with pytest.raises(w.ProtocolError) as refused:
        rules.direct(w.Send(4, ("bob",), {}), True)
    assert refused.value.code == w.FORBIDDEN
    assert rules.direct(w.Fetch(5), True) is None  # receiving is always allowed


def test_rules_refresh_and_expiry() -> None:
    rules = _rules(Grant("ann", ("doc-*", "chat-*"), NOW + 10))
    rules.join(w.Join(1, "doc-1"))
    rules.join(w.Join(1, "chat-1"))
    assert rules.expires_in_ms(NOW) == 10_000
    assert rules.expired(NOW + 10 + 29.9, 30) is None
    late = rules.expired(NOW + 40, 30)
    assert late is not None and late.close == CloseCode.TOKEN_EXPIRED == 4003
    assert late.code == w.TOKEN_EXPIRED

    message = w.Refresh(7, "t")
    frame, dropped = rules.refreshed(Grant("ann", ("doc-*",), NOW + 100), message, NOW + 5)
    assert frame == {"type": "refreshed", "ref": 7, "expires_in_ms": 95_000}
    assert dropped == ["chat-1"] and list(rules.rooms) == ["doc-1"]
    assert rules.expired(NOW + 60, 30) is None

    with pytest.raises(w.ProtocolError) as other:
        rules.refreshed(Grant("bob", ("*",), NOW + 200), message, NOW + 6)
    assert other.value.code == w.UNAUTHORIZED and rules.user == "ann"
    # A refused refresh: the session stays while its token is valid, else it is closed.
    assert rules.refresh_refused(message, "bad", NOW + 99).close is None
    assert rules.refresh_refused(message, "bad", NOW + 100).close == CloseCode.TOKEN_EXPIRED

    anonymous = _rules(Grant("guest", ("*",), None), by_token=False)
    with pytest.raises(w.ProtocolError) as refused:
        anonymous.check_refresh(message)
    assert refused.value.code == w.BAD_REQUEST
    assert anonymous.expired(NOW + 10**9, 30) is None
