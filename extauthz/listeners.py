"""The server's listeners and who may send it Checks (the Envoy-to-ext_authz trust boundary).

A Check carries the caller's identity as metadata that Envoy's jwt_authn filter filled in, so
whoever can send a Check can claim to be anyone. The server therefore answers Checks only
from a peer it can authenticate:

- over TCP with ``listen.tls``: the TLS handshake requires a client certificate from
  ``listen.tls.client_ca`` and ``PeerCheck`` then requires one of ``listen.tls.client_names``
  in it;
- over ``listen.unix_socket``: the socket file is mode 0660, so the filesystem decides;
- over plain TCP: only on a loopback address (any local process is trusted; logged at start),
  or on any address with the explicit ``listen.allow_plaintext`` opt-out (logged loudly).
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import grpc

from .config import Listen, ListenTls, is_loopback

log = logging.getLogger("extauthz")

#: Mode of the unix socket file: owner and group (Envoy's) only.
UNIX_SOCKET_MODE = 0o660


def _read(path: str, what: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"cannot read listen.tls.{what} {path}: {e.strerror}") from None


def server_credentials(tls: ListenTls) -> grpc.ServerCredentials:
    """mTLS credentials: our certificate, and a client certificate from ``client_ca`` required."""
    cert, key, ca = _read(tls.cert, "cert"), _read(tls.key, "key"), _read(tls.client_ca, "client_ca")
    for data, what in ((cert, "cert"), (ca, "client_ca")):
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise ValueError(f"listen.tls.{what} {getattr(tls, what)} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise ValueError(f"listen.tls.key {tls.key} holds no PEM private key")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def add_listeners(server: grpc.aio.Server, listen: Listen) -> list[str]:
    """Bind ``listen``'s TCP port and/or unix socket on ``server``; returns what is served.

    Raises ``OSError`` (address taken, unreadable certificate) or ``ValueError`` (not PEM).
    """
    served: list[str] = []
    if listen.port is not None:
        where = f"{listen.host}:{listen.port}"
        try:
            if listen.tls is not None:
                port = server.add_secure_port(where, server_credentials(listen.tls))
            else:
                port = server.add_insecure_port(where)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {where}: {e}") from None
        served.append(f"{listen.host}:{port}")
        if listen.tls is not None:
            log.info("ext_authz TCP listener %s: mTLS, Checks only from client certificates named %s",
                     served[-1], ", ".join(listen.tls.client_names))
        elif is_loopback(listen.host):
            log.warning("ext_authz TCP listener %s is plaintext on loopback: every process on this "
                        "machine can send Checks with any identity. Use listen.tls or "
                        "listen.unix_socket where other workloads share the machine.", served[-1])
        else:
            log.critical("INSECURE: ext_authz listens in plaintext on %s (listen.allow_plaintext). "
                         "Anyone who reaches this port can send Checks with forged identities, "
                         "spend other people's approvals and open requests in their name. "
                         "Never run this in production.", served[-1])
    if listen.unix_socket is not None:
        path = pathlib.Path(listen.unix_socket)
        if path.exists() and path.is_socket():
            path.unlink()  # a stale socket of a previous run; binding would fail on it
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as e:
            raise OSError(f"cannot listen on unix socket {path}: {e}") from None
        os.chmod(path, UNIX_SOCKET_MODE)
        served.append(f"unix:{path}")
        log.info("ext_authz unix socket %s (mode %o): Checks from whoever may open it",
                 path, UNIX_SOCKET_MODE)
    return served


class PeerCheck:
    """Decides whether the peer of one call may send Checks (see the module docstring)."""

    def __init__(self, listen: Listen) -> None:
        self._names = frozenset(listen.tls.client_names) if listen.tls is not None else None

    def refusal(self, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        """``None`` when the peer is trusted, else why not (for the caller and the log)."""
        peer = context.peer() or ""
        if peer.startswith("unix:"):
            return None
        if self._names is None:
            return None  # plaintext TCP, accepted by configuration (loopback or explicit opt-out)
        auth = context.auth_context() or {}
        if auth.get("transport_security_type") != [b"ssl"]:
            return f"peer {peer} did not connect over TLS"
        presented = [v.decode(errors="replace") for key in ("x509_subject_alternative_name", "x509_common_name")
                     for v in auth.get(key, [])]
        if not presented:
            return f"peer {peer} presented no client certificate"
        if self._names.isdisjoint(presented):
            return (f"peer {peer}'s client certificate ({', '.join(sorted(set(presented)))}) is not one "
                    "of listen.tls.client_names")
        return None


__all__ = ["UNIX_SOCKET_MODE", "PeerCheck", "add_listeners", "server_credentials"]
