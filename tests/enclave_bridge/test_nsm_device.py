"""The /dev/nsm client's exact wire shape, exercised without the device.

The ioctl is replaced by a stand-in that behaves like the nsm driver: it reads the request through
the request iovec, writes a CBOR response into the response iovec's buffer and rewrites that iovec's
length. Everything else (buffers, struct packing, CBOR, error mapping) is the real client code.
"""
from __future__ import annotations

import ctypes
import errno
import struct

import cbor2
import pytest

from enclave_bridge import nsm as nsm_mod
from enclave_bridge.attestation import Expectations, verify
from enclave_bridge.nsm import NsmDevice, NsmError, SimulatedNsm


def test_ioctl_number_and_message_layout_match_the_driver():
    # NSM_IOCTL_RAW = _IOWR(0x0A, 0, sizeof(struct nsm_raw)): two {__u64 addr; __u64 len} iovecs
    assert nsm_mod.NSM_MESSAGE_SIZE == 32
    assert nsm_mod.NSM_IOCTL_REQUEST == 0xC0200A00
    packed = nsm_mod.pack_nsm_message(0x1111, 22, 0x2222, 0x3000)
    assert len(packed) == 32
    assert struct.unpack("<QQQQ", packed) == (0x1111, 22, 0x2222, 0x3000)


def test_attestation_request_is_the_nsm_cbor_shape():
    request = cbor2.loads(nsm_mod.encode_attestation_request(nonce=b"\x01" * 32))
    assert request == {"Attestation": {"user_data": None, "nonce": b"\x01" * 32, "public_key": None}}
    full = cbor2.loads(nsm_mod.encode_attestation_request(b"u", b"n", b"k"))
    assert full == {"Attestation": {"user_data": b"u", "nonce": b"n", "public_key": b"k"}}


def test_attestation_request_refuses_oversized_and_non_bytes_fields():
    with pytest.raises(NsmError, match="user_data is 1025 bytes"):
        nsm_mod.encode_attestation_request(user_data=b"x" * 1025)
    with pytest.raises(TypeError, match="public_key must be bytes"):
        nsm_mod.encode_attestation_request(public_key="pem text")


class FakeDriver:
    """Plays the nsm driver's part of the ioctl, recording what it was given."""

    def __init__(self, respond):
        self.respond = respond
        self.calls = []

    def __call__(self, fd, request, arg, mutate):
        assert isinstance(arg, bytearray) and mutate is True
        req_addr, req_len, resp_addr, resp_len = struct.unpack("=QQQQ", arg)
        raw_request = ctypes.string_at(req_addr, req_len)
        self.calls.append({"ioctl": request, "request": cbor2.loads(raw_request), "request_len": req_len,
                           "response_capacity": resp_len})
        response = self.respond(cbor2.loads(raw_request))
        assert len(response) <= resp_len
        ctypes.memmove(resp_addr, response, len(response))
        arg[:] = struct.pack("=QQQQ", req_addr, req_len, resp_addr, len(response))
        return 0


@pytest.fixture
def device_path(tmp_path):
    path = tmp_path / "nsm"
    path.write_bytes(b"")
    return str(path)


def test_device_client_round_trip_through_the_driver_interface(device_path):
    simulator = SimulatedNsm()

    def respond(request):
        fields = request["Attestation"]
        document = simulator.attest(fields["user_data"], fields["nonce"], fields["public_key"])
        return cbor2.dumps({"Attestation": {"document": document}})

    driver = FakeDriver(respond)
    document = NsmDevice(device_path, ioctl=driver).attest(nonce=b"N" * 32, public_key=b"K" * 64)

    call, = driver.calls
    assert call["ioctl"] == 0xC0200A00
    assert call["request"] == {"Attestation": {"user_data": None, "nonce": b"N" * 32, "public_key": b"K" * 64}}
    assert call["response_capacity"] == nsm_mod.NSM_RESPONSE_MAX_SIZE
    result = verify(document, Expectations(root=simulator.root_certificate, pcrs={i: simulator.pcrs[i] for i in (0, 1, 2)},
                                           nonce=b"N" * 32))
    assert result.public_key == b"K" * 64


def test_device_client_accepts_a_document_sent_as_an_integer_array(device_path):
    driver = FakeDriver(lambda req: cbor2.dumps({"Attestation": {"document": list(b"\xd2\x84doc")}}))
    assert NsmDevice(device_path, ioctl=driver).attest() == b"\xd2\x84doc"


def test_nsm_error_response_becomes_nsm_error(device_path):
    driver = FakeDriver(lambda req: cbor2.dumps({"Error": "InvalidArgument"}))
    with pytest.raises(NsmError, match="InvalidArgument"):
        NsmDevice(device_path, ioctl=driver).attest()


def test_unexpected_response_shape_is_refused(device_path):
    driver = FakeDriver(lambda req: cbor2.dumps({"DescribePCR": {"lock": False}}))
    with pytest.raises(NsmError, match="unexpected NSM response"):
        NsmDevice(device_path, ioctl=driver).attest()


def test_driver_reporting_more_than_the_buffer_is_refused(device_path):
    def lying_driver(fd, request, arg, mutate):
        a, n, b, _ = struct.unpack("=QQQQ", arg)
        arg[:] = struct.pack("=QQQQ", a, n, b, nsm_mod.NSM_RESPONSE_MAX_SIZE + 1)

    with pytest.raises(NsmError, match="more than"):
        NsmDevice(device_path, ioctl=lying_driver).attest()


def test_missing_device_says_where_it_looked(tmp_path):
    with pytest.raises(NsmError, match=r"cannot open the Nitro Security Module at .*/absent.*SimulatedNsm"):
        NsmDevice(str(tmp_path / "absent")).attest()


def test_real_ioctl_on_something_that_is_not_the_nsm_fails_closed(device_path):
    with pytest.raises(NsmError, match="ioctl") as refusal:
        NsmDevice(device_path).attest(nonce=b"x")  # the real fcntl.ioctl on a regular file
    assert refusal.value.__cause__.errno in (errno.ENOTTY, errno.EINVAL)
