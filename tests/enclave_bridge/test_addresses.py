"""Address URLs: what parses, what is refused and why, and real vsock socket construction."""
from __future__ import annotations

import errno
import socket

import pytest

from enclave_bridge.addresses import (
    NITRO_PARENT_CID,
    VMADDR_CID_ANY,
    VMADDR_PORT_ANY,
    AddressError,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
    socket_family,
    vsock_socket,
)


@pytest.mark.parametrize("url, role, expected", [
    ("tcp://127.0.0.1:8443", "connect", TcpAddress("127.0.0.1", 8443)),
    ("tcp://localhost:1", "connect", TcpAddress("localhost", 1)),
    ("tcp://[::1]:65535", "connect", TcpAddress("::1", 65535)),
    ("tcp://127.0.0.1:0", "listen", TcpAddress("127.0.0.1", 0)),
    ("TCP://kms.eu-west-1.amazonaws.com:443", "connect", TcpAddress("kms.eu-west-1.amazonaws.com", 443)),
    ("unix:///run/broker.sock", "listen", UnixAddress("/run/broker.sock")),
    ("vsock://3:5000", "connect", VsockAddress(3, 5000)),
    ("vsock://parent:5000", "connect", VsockAddress(NITRO_PARENT_CID, 5000)),
    ("vsock://16:8443", "connect", VsockAddress(16, 8443)),
    ("vsock://any:8443", "listen", VsockAddress(VMADDR_CID_ANY, 8443)),
    ("vsock://4294967294:4294967294", "connect", VsockAddress(4294967294, 4294967294)),
])
def test_parses_valid_addresses(url, role, expected):
    assert parse_address(url, role) == expected


def test_addresses_print_as_urls():
    assert str(parse_address("vsock://any:8443", "listen")) == "vsock://any:8443"
    assert str(parse_address("tcp://[::1]:80")) == "tcp://[::1]:80"
    assert str(parse_address("unix:///tmp/a.sock")) == "unix:///tmp/a.sock"


@pytest.mark.parametrize("url, role, message", [
    ("127.0.0.1:80", "connect", "expected tcp://HOST:PORT"),
    ("http://127.0.0.1:80", "connect", "unknown scheme 'http'"),
    ("tcp://127.0.0.1", "connect", "missing port"),
    ("tcp://:80", "connect", "missing host"),
    ("tcp://127.0.0.1:0", "connect", "outside 1..65535"),
    ("tcp://127.0.0.1:65536", "connect", "port"),
    ("tcp://127.0.0.1:http", "connect", "port"),
    ("tcp://127.0.0.1:80/path", "connect", "only HOST:PORT"),
    ("tcp://bad host!:80", "connect", "neither an IP address nor a host name"),
    ("unix://relative.sock", "listen", "must be absolute"),
    ("unix:///" + "x" * 200, "listen", "the limit is 107"),
    ("vsock://3", "connect", "expected vsock://CID:PORT"),
    ("vsock://3:5000:1", "connect", "expected vsock://CID:PORT"),
    ("vsock://enclave:5000", "connect", "is not a number, 'parent' or 'any'"),
    ("vsock://-1:5000", "connect", "is not a number"),
    ("vsock://4294967296:5000", "connect", "does not fit in 32 bits"),
    ("vsock://any:5000", "connect", "cannot connect to CID 'any'"),
    ("vsock://0:5000", "connect", "hypervisor"),
    ("vsock://3:0", "connect", "outside 1..4294967294"),
    ("vsock://3:4294967295", "connect", "outside 1..4294967294"),
    ("vsock://3:port", "connect", "is not a number"),
])
def test_refuses_bad_addresses_with_a_clear_reason(url, role, message):
    with pytest.raises(AddressError, match=message.replace("(", r"\(").replace(".", r"\.")) as refusal:
        parse_address(url, role)
    assert repr(url)[:20] in str(refusal.value) or url[:20] in str(refusal.value)


def test_socket_families():
    assert socket_family(TcpAddress("127.0.0.1", 1)) == socket.AF_INET
    assert socket_family(TcpAddress("::1", 1)) == socket.AF_INET6
    assert socket_family(UnixAddress("/x")) == socket.AF_UNIX
    assert socket_family(VsockAddress(3, 1)) == socket.AF_VSOCK


def test_builds_a_real_listening_vsock_socket():
    try:
        sock = vsock_socket(VsockAddress(VMADDR_CID_ANY, VMADDR_PORT_ANY), "listen")  # kernel picks the port
    except OSError as e:
        if e.errno in (errno.EAFNOSUPPORT, errno.ENODEV):
            pytest.skip(f"this kernel has no vsock transport: {e}")
        raise
    with sock:
        assert sock.family == socket.AF_VSOCK and sock.type == socket.SOCK_STREAM
        assert sock.getblocking() is False
        cid, port = sock.getsockname()
        assert cid == VMADDR_CID_ANY and 0 < port < VMADDR_PORT_ANY


def test_builds_an_unconnected_vsock_socket_for_connecting():
    try:
        sock = vsock_socket(VsockAddress(NITRO_PARENT_CID, 5000), "connect")
    except OSError as e:
        if e.errno in (errno.EAFNOSUPPORT, errno.ENODEV):
            pytest.skip(f"this kernel has no vsock transport: {e}")
        raise
    with sock:
        assert sock.family == socket.AF_VSOCK and sock.getblocking() is False
