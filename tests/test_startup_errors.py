"""Bad start-up input through the real command line, as an operator meets it.

A garbage or mismatched TLS file, a host that does not resolve and a port another process
holds are option mistakes like any other: `presenced run` says so in one line naming the
option, exits with status 2, and prints no traceback. Two mistakes the daemon can run with
(a node certificate issued for another name, a token secret others can read) are one
warning line each at start, and the daemon goes on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from presenced.certs import init_ca, issue_node_cert

ROOT = Path(__file__).resolve().parents[1]

#: Each test runs the real command in a process of its own.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes and signals"),
]

#: Seconds a start-up may take on a slow, busy machine (it takes well under one).
START_S = 30


def clean_env() -> dict[str, str]:
    """The environment without a developer's own PRESENCED_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PRESENCED_")}


def presenced_run(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m presenced run ARGS` to completion (these runs must fail at start)."""
    return subprocess.run(
        [sys.executable, "-m", "presenced", "run", *args],
        cwd=ROOT,
        env={**clean_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_S,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit status 2 and exactly one stderr line, holding each of ``expected``."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == 2, result.stderr
    line = lines[0]
    assert line.startswith("Error: ")
    for text in expected:
        assert text in line
    return line


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and certificates for nodes a and b, plus a garbage file."""
    folder = tmp_path_factory.mktemp("certs")
    init_ca(folder)
    issue_node_cert(folder, "a")
    issue_node_cert(folder, "b")
    (folder / "garbage.pem").write_text("this is not PEM\n")
    return folder


def tls_args(certs: Path, cert: str = "a.pem", key: str = "a.key", ca: str = "ca.pem") -> list[str]:
    return [
        "--tls-cert",
        str(certs / cert),
        "--tls-key",
        str(certs / key),
        "--tls-ca",
        str(certs / ca),
    ]


PEER_ARGS = ["--allow-anonymous", "--node", "a", "--listen", "127.0.0.1:0"]
PEER_ARGS += ["--peer-listen", "127.0.0.1:0"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cert": "garbage.pem"}, ["--tls-cert:", "garbage.pem", "is not a PEM certificate"]),
        ({"key": "garbage.pem"}, ["--tls-key:", "garbage.pem", "is not a PEM private key"]),
        ({"ca": "garbage.pem"}, ["--tls-ca:", "garbage.pem", "is not a PEM CA certificate"]),
        ({"key": "b.key"}, ["--tls-key:", "b.key", "is not the key of the certificate", "a.pem"]),
        ({"cert": "missing.pem"}, ["--tls-cert:", "missing.pem", "is not a file"]),
    ],
    ids=["garbage-cert", "garbage-key", "garbage-ca", "key-of-another-cert", "missing-file"],
)
def test_bad_tls_file_is_a_one_line_error(
    certs: Path, files: dict[str, str], expected: list[str]
) -> None:
    result = presenced_run(*PEER_ARGS, *tls_args(certs, **files))
    assert_one_line_error(result, *expected)


def test_a_bad_tls_file_from_the_environment_is_named_by_its_variable(certs: Path) -> None:
    args = ["--tls-cert", str(certs / "a.pem"), "--tls-ca", str(certs / "ca.pem")]
    env = {"PRESENCED_TLS_KEY": str(certs / "garbage.pem")}
    result = presenced_run(*PEER_ARGS, *args, env=env)
    assert_one_line_error(result, "PRESENCED_TLS_KEY:", "is not a PEM private key")


def test_unresolvable_listen_host_is_a_one_line_error() -> None:
    result = presenced_run("--allow-anonymous", "--listen", "no-such-host.invalid:7400")
    assert_one_line_error(result, "--listen:", "cannot resolve host 'no-such-host.invalid'")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.mark.parametrize("flag", ["--listen", "--peer-listen", "--http"])
def test_port_in_use_is_a_one_line_error(certs: Path, taken_port: int, flag: str) -> None:
    address = f"127.0.0.1:{taken_port}"
    others = {"--listen": "127.0.0.1:0", "--peer-listen": "127.0.0.1:0", "--http": "127.0.0.1:0"}
    others[flag] = address
    args = ["--allow-anonymous", "--node", "a", *tls_args(certs)]
    for option, value in others.items():
        args += [option, value]
    result = presenced_run(*args)
    assert_one_line_error(result, f"{flag}:", f"cannot listen on {address}", "already in use")


# -- warnings ------------------------------------------------------------------------------------


def warnings_until_up(*args: str) -> tuple[list[str], bool]:
    """Start `presenced run ARGS`, read stderr until its "up" line, then kill it.

    Returns the WARNING lines logged before "up", and whether the daemon was still running
    when "up" was read (the warnings did not stop it).
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "presenced", "run", *args],
        cwd=ROOT,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(START_S, process.kill)  # a daemon that never comes up
    watchdog.start()
    warnings: list[str] = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if " up: clients on " in line:
                return warnings, process.poll() is None
            if " WARNING " in line:
                warnings.append(line.rstrip("\n"))
        pytest.fail(f"presenced exited before it was up; warnings: {warnings}")
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()


def test_warns_when_the_node_certificate_names_another_node(certs: Path, tmp_path: Path) -> None:
    args = ["--allow-anonymous", "--node", "a", "--listen", "127.0.0.1:0"]
    args += ["--peer-listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]
    warnings, running = warnings_until_up(*args, *tls_args(certs, "b.pem", "b.key"))
    assert running
    assert len(warnings) == 1, warnings
    assert str(certs / "b.pem") in warnings[0]
    assert "names b, localhost, not --node a" in warnings[0]


def test_warns_when_the_token_secret_file_is_readable_by_others(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x" * 64 + "\n")
    secret.chmod(0o644)
    args = ["--token-secret-file", str(secret), "--listen", "127.0.0.1:0"]
    warnings, running = warnings_until_up(*args, "--data-dir", str(tmp_path / "data"))
    assert running
    assert len(warnings) == 1, warnings
    assert f"the token secret file {secret} has mode 0644" in warnings[0]
    assert f"chmod 600 {secret}" in warnings[0]


def test_no_warnings_for_a_private_secret_and_a_matching_certificate(
    certs: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x" * 64 + "\n")
    secret.chmod(0o600)
    args = ["--token-secret-file", str(secret), "--node", "a", "--listen", "127.0.0.1:0"]
    args += ["--peer-listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]
    warnings, running = warnings_until_up(*args, *tls_args(certs))
    assert running
    assert warnings == []


# -- `presenced certs` ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("ca.pem", "cannot read the CA certificate {dir}/ca.pem: not a PEM certificate"),
        ("ca.key", "cannot read the CA key {dir}/ca.key: not a PEM private key"),
    ],
)
def test_certs_issue_with_a_garbage_ca_is_one_short_line(
    tmp_path: Path, broken: str, expected: str
) -> None:
    init_ca(tmp_path)
    (tmp_path / broken).write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
    result = subprocess.run(
        [sys.executable, "-m", "presenced", "certs", "issue", "a", "--dir", str(tmp_path)],
        cwd=ROOT,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_S,
        check=False,
    )
    assert result.returncode == 1  # like every `certs` error: a file problem, not a usage one
    assert result.stderr.splitlines() == ["Error: " + expected.format(dir=tmp_path)]
