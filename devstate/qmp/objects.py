"""QOM objects a controller creates with ``object-add``: devstate has one kind,
``tls-creds-x509``, the credentials a migration's ``tls-creds`` parameter names.

Runs in: the ``devstate vm --qmp`` process. QEMU reads a directory of PEM files with fixed
names (crypto/tlscredsx509.h); so does devstate, into a :class:`TlsConfig`:

==================  =================================================================
endpoint            files in ``dir``
==================  =================================================================
server (incoming)   ca-cert.pem, server-cert.pem, server-key.pem; ``verify-peer``
                    (default true) requires the source's certificate, signed by the CA
client (outgoing)   ca-cert.pem; client-cert.pem and client-key.pem if present (mutual TLS)
==================  =================================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from devstate.net.tls import TlsConfig
from devstate.qmp.commands import QmpError

TLS_CREDS_X509 = "tls-creds-x509"


@dataclass(frozen=True, slots=True)
class TlsCreds:
    """A ``tls-creds-x509`` object: where its PEM files are and which end it is."""

    dir: str
    endpoint: str  # "client" or "server"
    verify_peer: bool = True

    def config(self, hostname: str) -> TlsConfig:
        """The TlsConfig of this end; ``hostname`` ('' for the URI's host) is the name a
        client checks in the server's certificate."""
        def pem(name: str) -> str:
            return os.path.join(self.dir, f"{name}.pem")

        if self.endpoint == "server":
            return TlsConfig(ca=pem("ca-cert"), cert=pem("server-cert"),
                             key=pem("server-key"), verify_client=self.verify_peer)
        mutual = os.path.exists(pem("client-cert"))
        return TlsConfig(ca=pem("ca-cert"), cert=pem("client-cert") if mutual else None,
                         key=pem("client-key") if mutual else None,
                         hostname=hostname or None)


def tls_creds(props: dict[str, Any]) -> TlsCreds:
    """A ``tls-creds-x509`` object from ``object-add``'s properties (QEMU's names)."""
    unknown = sorted(set(props) - {"dir", "endpoint", "verify-peer"})
    if unknown:
        raise QmpError("GenericError", f"Property '{TLS_CREDS_X509}.{unknown[0]}' not found")
    directory, endpoint = props.get("dir"), props.get("endpoint", "client")
    verify = props.get("verify-peer", True)
    if not isinstance(directory, str) or not directory:
        raise QmpError("GenericError", f"{TLS_CREDS_X509}: 'dir' must name the directory "
                                       "of its PEM files")
    if endpoint not in ("client", "server"):
        raise QmpError("GenericError", "Parameter 'endpoint' does not accept value "
                                       f"'{endpoint}'")
    if not isinstance(verify, bool):
        raise QmpError("GenericError", "Invalid parameter type for 'verify-peer', "
                                       "expected: boolean")
    if endpoint == "client" and not verify:
        raise QmpError("GenericError", f"{TLS_CREDS_X509}: devstate always verifies the "
                                       "destination's certificate (verify-peer must be true "
                                       "for a client)")
    return TlsCreds(directory, endpoint, verify)
