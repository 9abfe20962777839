"""Socket addresses as URLs: ``tcp://host:port``, ``unix:///path``, ``vsock://CID:PORT``.

vsock is how a Nitro enclave and its parent instance talk: the parent is CID 3, an enclave gets
CID 4 or above when it starts, and ``any`` (VMADDR_CID_ANY) listens on every CID. Ports are 32-bit.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
NITRO_PARENT_CID = 3
VMADDR_PORT_ANY = 0xFFFFFFFF
UNIX_PATH_MAX = 107  # sizeof(sun_path) - 1 for the terminating NUL on Linux

Role = Literal["listen", "connect"]


class AddressError(ValueError):
    """An address URL that cannot be used, with the reason in the message."""


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix://{self.path}"


@dataclass(frozen=True)
class VsockAddress:
    cid: int
    port: int

    def __str__(self) -> str:
        cid = "any" if self.cid == VMADDR_CID_ANY else str(self.cid)
        return f"vsock://{cid}:{self.port}"


Address = TcpAddress | UnixAddress | VsockAddress

_VSOCK_CID_NAMES = {"any": VMADDR_CID_ANY, "parent": NITRO_PARENT_CID, "host": VMADDR_CID_HOST}


def parse_address(url: str, role: Role = "connect") -> Address:
    """Parse and validate ``url`` for listening on or connecting to; raise :class:`AddressError`."""
    if not isinstance(url, str) or "://" not in url:
        raise AddressError(f"{url!r}: expected tcp://HOST:PORT, unix:///PATH or vsock://CID:PORT")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "tcp":
        return _parse_tcp(url, rest, role)
    if scheme == "unix":
        return _parse_unix(url, rest)
    if scheme == "vsock":
        return _parse_vsock(url, rest, role)
    raise AddressError(f"{url!r}: unknown scheme {scheme!r}; use tcp, unix or vsock")


def _parse_port(url: str, text: str, *, maximum: int, allow_zero: bool) -> int:
    if not text.isdigit():
        raise AddressError(f"{url!r}: port {text!r} is not a number")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= maximum:
        raise AddressError(f"{url!r}: port {port} is outside {low}..{maximum}")
    return port


def _parse_tcp(url: str, rest: str, role: Role) -> TcpAddress:
    parts = urlsplit("//" + rest)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise AddressError(f"{url!r}: a tcp address is only HOST:PORT")
    try:
        raw_port = parts.port  # validates the range 0..65535
    except ValueError as e:
        raise AddressError(f"{url!r}: bad port ({e})") from e
    if raw_port is None or not rest.rstrip("/").rsplit(":", 1)[-1].isdigit():
        raise AddressError(f"{url!r}: missing port (tcp://HOST:PORT)")
    host = parts.hostname
    if not host:
        raise AddressError(f"{url!r}: missing host (tcp://HOST:PORT)")
    port = _parse_port(url, str(raw_port), maximum=65535, allow_zero=(role == "listen"))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(label and len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum()
                   for label in host.split(".")):
            raise AddressError(f"{url!r}: {host!r} is neither an IP address nor a host name") from None
    return TcpAddress(host, port)


def _parse_unix(url: str, rest: str) -> UnixAddress:
    path = rest
    if not path.startswith("/"):
        raise AddressError(f"{url!r}: a unix socket path must be absolute (unix:///run/x.sock)")
    if "\x00" in path:
        raise AddressError(f"{url!r}: NUL in unix socket path")
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise AddressError(f"{url!r}: unix socket path is {len(os.fsencode(path))} bytes; the limit is {UNIX_PATH_MAX}")
    return UnixAddress(path)


def _parse_vsock(url: str, rest: str, role: Role) -> VsockAddress:
    if rest.count(":") != 1:
        raise AddressError(f"{url!r}: expected vsock://CID:PORT (CID a number, 'parent' = 3, or 'any')")
    cid_text, port_text = rest.split(":")
    cid_text = cid_text.lower()
    if cid_text in _VSOCK_CID_NAMES:
        cid = _VSOCK_CID_NAMES[cid_text]
    elif cid_text.isdigit():
        cid = int(cid_text)
    else:
        raise AddressError(f"{url!r}: CID {cid_text!r} is not a number, 'parent' or 'any'")
    if cid > VMADDR_CID_ANY:
        raise AddressError(f"{url!r}: CID {cid} does not fit in 32 bits")
    if role == "connect" and cid == VMADDR_CID_ANY:
        raise AddressError(f"{url!r}: cannot connect to CID 'any'; name the peer (the parent is CID 3)")
    if role == "connect" and cid == VMADDR_CID_HYPERVISOR:
        raise AddressError(f"{url!r}: CID 0 is the hypervisor, not a peer to connect to")
    port = _parse_port(url, port_text, maximum=VMADDR_PORT_ANY - 1, allow_zero=False)
    return VsockAddress(cid, port)


def socket_family(address: Address) -> int:
    if isinstance(address, TcpAddress):
        try:
            return socket.AF_INET6 if ipaddress.ip_address(address.host).version == 6 else socket.AF_INET
        except ValueError:
            return socket.AF_INET
    if isinstance(address, UnixAddress):
        return socket.AF_UNIX
    return socket.AF_VSOCK


def vsock_socket(address: VsockAddress, role: Role) -> socket.socket:
    """A non-blocking AF_VSOCK stream socket, bound and listening when ``role`` is listen."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if role == "listen":
            sock.bind((address.cid, address.port))
            sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock
