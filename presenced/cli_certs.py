"""`presenced certs`: make a private CA and the node certificates regions authenticate with.

Registered on the main command group by `presenced.cli`; the work is done by
`presenced.certs`, whose `CertError`s become one-line errors with exit status 1.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from presenced.certs import CA_CERT_FILE, CA_KEY_FILE, CertError, init_ca, issue_node_cert

__all__ = ["certs"]

DEFAULT_DIR = "certs"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def _q(path: Path) -> str:
    return shlex.quote(str(path))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def certs() -> None:
    """Make the private CA and node certificates that regions use to authenticate each other.

    Daemons in different regions connect to each other over TLS, and both ends must present
    a certificate signed by the same CA. Make the CA once with `certs init`, then one
    certificate per node with `certs issue NODE`, and start each daemon with its own
    certificate and key plus the CA certificate.
    """


@certs.command("init", short_help="Create the CA (ca.pem, ca.key).")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    help="Directory to write ca.pem and ca.key to (created if missing).",
)
@click.option("--name", default="presenced dev CA", show_default=True, help="The CA's name (CN).")
@click.option(
    "--days",
    type=click.IntRange(1, 36500),
    default=3650,
    show_default=True,
    help="How long the CA is valid, in days.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing CA. Every certificate it issued stops being trusted.",
)
def init_command(directory: Path, name: str, days: int, force: bool) -> None:
    """Create a new certificate authority: ca.pem (share it with every node) and ca.key
    (keep it private; it is only needed to issue node certificates)."""
    try:
        cert_path, key_path = init_ca(directory, name=name, days=days, force=force)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Wrote CA certificate {cert_path}")
    click.echo(f"Wrote CA key         {key_path} (mode 0600; keep it private)")
    click.echo("Next, issue a certificate for each node, with the names peers dial it at:")
    click.echo(f"  presenced certs issue NODE --dir {_q(directory)} --host NODE.example.com")


@certs.command("issue", short_help="Issue a certificate for a node, signed by the CA.")
@click.argument("node")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    help="Directory holding the CA, and where NODE.pem and NODE.key are written.",
)
@click.option(
    "--ca-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory holding ca.pem and ca.key, if not the --dir one.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="HOST",
    help="Host name or IP address peers dial this node at; repeat for several. The node name"
    " itself is always included. Default: localhost and 127.0.0.1.",
)
@click.option(
    "--days",
    type=click.IntRange(1, 36500),
    default=825,
    show_default=True,
    help="How long the certificate is valid, in days (never past the CA's own expiry).",
)
@click.option("--force", is_flag=True, help="Replace an existing certificate for NODE.")
def issue_command(
    node: str,
    directory: Path,
    ca_dir: Path | None,
    hosts: tuple[str, ...],
    days: int,
    force: bool,
) -> None:
    """Issue a certificate for the node NODE (its --node name), signed by the CA.

    The certificate names NODE and every --host, and serves both to accept connections from
    other regions and to dial them; peers check that it names the node they expect.
    """
    ca_folder = directory if ca_dir is None else ca_dir
    try:
        cert_path, key_path = issue_node_cert(
            directory,
            node,
            hosts=hosts or DEFAULT_HOSTS,
            days=days,
            ca_dir=ca_folder,
            force=force,
        )
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
    names = ", ".join(dict.fromkeys((node, *(hosts or DEFAULT_HOSTS))))
    ca_cert = ca_folder / CA_CERT_FILE
    click.echo(f"Wrote certificate {cert_path}")
    click.echo(f"Wrote key         {key_path} (mode 0600)")
    click.echo(f"Names: {names}")
    click.echo(f"Copy {cert_path.name}, {key_path.name} and {CA_CERT_FILE} (never {CA_KEY_FILE})")
    click.echo("to that node and start it with:")
    click.echo(
        f"  presenced run --node {shlex.quote(node)} --tls-cert {_q(cert_path)}"
        f" --tls-key {_q(key_path)} --tls-ca {_q(ca_cert)}"
    )
