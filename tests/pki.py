"""Test certificates: a CA, a destination's certificate and a source's, made with trustme."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

from devstate.net.tls import TlsConfig


@dataclass(frozen=True)
class Pki:
    """A CA, the destination's certificate and key, and a client certificate."""

    server: TlsConfig  # the destination's: requires a client certificate (mutual TLS)
    client: TlsConfig  # the source's: trusts the CA, presents its own certificate
    untrusting: TlsConfig  # a source that trusts another CA only


def make_pki(directory: Path, *names: str) -> Pki:
    """Certificates for a destination reachable as ``names`` (and localhost/127.0.0.1)."""
    ca, other = trustme.CA(), trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1", *names)
    client_cert = ca.issue_cert("devstate-source")
    paths = {}
    for name, blob in {"ca": ca.cert_pem, "other_ca": other.cert_pem,
                       "server": server_cert.private_key_and_cert_chain_pem,
                       "client": client_cert.private_key_and_cert_chain_pem}.items():
        paths[name] = str(directory / f"{name}.pem")
        blob.write_to_path(paths[name])
    return Pki(server=TlsConfig(ca=paths["ca"], cert=paths["server"], verify_client=True),
               client=TlsConfig(ca=paths["ca"], cert=paths["client"]),
               untrusting=TlsConfig(ca=paths["other_ca"], cert=paths["client"]))
