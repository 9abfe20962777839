"""Getting attestation documents: from the Nitro Security Module device, or from a local simulator.

Both classes offer ``attest(user_data, nonce, public_key) -> bytes`` returning a COSE_Sign1
attestation document, so code written against :class:`NsmDevice` runs unchanged on a laptop with
:class:`SimulatedNsm`.

The device protocol (as the ``nsm`` Linux driver implements it): open ``/dev/nsm`` and issue
``ioctl(fd, NSM_IOCTL_RAW = _IOWR(0x0A, 0, 32), struct nsm_raw)`` where ``nsm_raw`` is two
``{__u64 addr; __u64 len}`` iovecs ``{request, response}``. The request is a CBOR map such as
``{"Attestation": {"user_data": b|null, "nonce": b|null, "public_key": b|null}}``; the driver writes
the CBOR response into the response buffer and rewrites the response iovec's length to what it wrote.
The response is ``{"Attestation": {"document": b}}`` or ``{"Error": "<ErrorCode>"}``.
"""
from __future__ import annotations

import ctypes
import datetime as dt
import fcntl
import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from typing import Protocol

import cbor2

from . import cose
from .simulated_ca import Issued, SimulatedCA

# ioctl number encoding from <asm-generic/ioctl.h>: dir(2 bits) | size(14) | type(8) | nr(8).
_IOC_WRITE, _IOC_READ = 1, 2


def _iowr(ioc_type: int, nr: int, size: int) -> int:
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (ioc_type << 8) | nr


# <linux/nsm.h>: struct nsm_raw { struct nsm_iovec request, response; }, nsm_iovec = { __u64 addr; __u64 len; }
# (the earlier out-of-tree driver used struct iovec, the same layout on 64-bit).
NSM_MESSAGE_FORMAT = "=QQQQ"
NSM_MESSAGE_SIZE = struct.calcsize(NSM_MESSAGE_FORMAT)
NSM_IOCTL_MAGIC = 0x0A
NSM_IOCTL_REQUEST = _iowr(NSM_IOCTL_MAGIC, 0, NSM_MESSAGE_SIZE)
NSM_REQUEST_MAX_SIZE = 0x1000
NSM_RESPONSE_MAX_SIZE = 0x3000
MAX_FIELD_BYTES = 1024  # user_data, nonce and public_key are each capped by the NSM
PCR_COUNT = 16
PCR_BYTES = 48  # SHA-384


REMOVE = object()  #: marker for SimulatedNsm.attest_with: leave this payload field out


class NsmError(RuntimeError):
    """The NSM could not produce a document (device missing, driver error, or an NSM error code)."""


class Attester(Protocol):
    """Anything that can produce an attestation document."""

    def attest(self, user_data: bytes | None = None, nonce: bytes | None = None,
               public_key: bytes | None = None) -> bytes: ...


def _check_field(name: str, value: bytes | None) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{name} must be bytes or None, not {type(value).__name__}")
    if len(value) > MAX_FIELD_BYTES:
        raise NsmError(f"InputTooLarge: {name} is {len(value)} bytes; the NSM accepts at most {MAX_FIELD_BYTES}")
    return bytes(value)


def encode_attestation_request(user_data: bytes | None = None, nonce: bytes | None = None,
                               public_key: bytes | None = None) -> bytes:
    """The CBOR request the NSM expects for an attestation document (absent fields are null)."""
    request = cbor2.dumps({"Attestation": {
        "user_data": _check_field("user_data", user_data),
        "nonce": _check_field("nonce", nonce),
        "public_key": _check_field("public_key", public_key),
    }})
    if len(request) > NSM_REQUEST_MAX_SIZE:
        raise NsmError(f"request is {len(request)} bytes; the NSM accepts at most {NSM_REQUEST_MAX_SIZE}")
    return request


def decode_attestation_response(response: bytes) -> bytes:
    """The document out of an NSM response; an ``Error`` response becomes :class:`NsmError`."""
    try:
        message = cose.loads_strict(response)
    except cose.CoseFormatError as e:
        raise NsmError(f"NSM response is not CBOR: {e}") from e
    if isinstance(message, Mapping) and "Error" in message:
        raise NsmError(f"NSM refused the attestation request: {message['Error']}")
    body = message.get("Attestation") if isinstance(message, Mapping) else None
    document = body.get("document") if isinstance(body, Mapping) else None
    if isinstance(document, (list, tuple)):  # a byte vector serialised as an array of small ints
        try:
            document = bytes(document)
        except (TypeError, ValueError) as e:
            raise NsmError("NSM response document is not a byte array") from e
    if not isinstance(document, bytes) or not document:
        raise NsmError(f"unexpected NSM response shape: {message!r:.200}")
    return document


def pack_nsm_message(request_addr: int, request_len: int, response_addr: int, response_len: int) -> bytearray:
    """``struct nsm_raw`` as the ioctl expects it: four native-endian 64-bit words, 32 bytes."""
    return bytearray(struct.pack(NSM_MESSAGE_FORMAT, request_addr, request_len, response_addr, response_len))


def unpack_nsm_message(message: bytes | bytearray) -> tuple[int, int, int, int]:
    return struct.unpack(NSM_MESSAGE_FORMAT, bytes(message))


IoctlFn = Callable[[int, int, bytearray, bool], int]


class NsmDevice:
    """Client for the Nitro Security Module at ``path`` (inside a Nitro enclave: ``/dev/nsm``).

    ``ioctl`` is :func:`fcntl.ioctl`; it is a parameter only so the exact message layout can be
    exercised without the device.
    """

    def __init__(self, path: str = "/dev/nsm", *, ioctl: IoctlFn = fcntl.ioctl) -> None:
        self.path = path
        self._ioctl = ioctl

    def attest(self, user_data: bytes | None = None, nonce: bytes | None = None,
               public_key: bytes | None = None) -> bytes:
        """Ask the NSM for an attestation document binding these values (each at most 1024 bytes)."""
        return decode_attestation_response(self.call(encode_attestation_request(user_data, nonce, public_key)))

    def call(self, request: bytes) -> bytes:
        """Send one raw CBOR request and return the raw CBOR response."""
        request_buf = ctypes.create_string_buffer(request, len(request))
        response_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
        message = pack_nsm_message(ctypes.addressof(request_buf), len(request),
                                   ctypes.addressof(response_buf), NSM_RESPONSE_MAX_SIZE)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise NsmError(f"cannot open the Nitro Security Module at {self.path}: {e.strerror} "
                           "(run inside a Nitro enclave, or use SimulatedNsm for local runs)") from e
        try:
            self._ioctl(fd, NSM_IOCTL_REQUEST, message, True)
        except OSError as e:
            raise NsmError(f"NSM ioctl on {self.path} failed: {e.strerror or e}") from e
        finally:
            os.close(fd)
        response_len = unpack_nsm_message(message)[3]
        if response_len > NSM_RESPONSE_MAX_SIZE:
            raise NsmError(f"NSM driver reported {response_len} response bytes, more than the "
                           f"{NSM_RESPONSE_MAX_SIZE}-byte buffer")
        return response_buf.raw[:response_len]


def default_simulated_pcrs(image: bytes = b"rpcauthz simulated enclave image") -> dict[int, bytes]:
    """PCRs of a production (non-debug) enclave: 0-2 measure the image, the rest are zero."""
    pcrs = {i: bytes(PCR_BYTES) for i in range(PCR_COUNT)}
    for i in (0, 1, 2):
        pcrs[i] = hashlib.sha384(b"PCR%d:" % i + image).digest()
    return pcrs


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class SimulatedNsm:
    """Issues attestation documents of the real format, signed by its own CA chain.

    For local runs and tests only: its root is *not* the AWS Nitro root, so a verifier configured
    for production refuses its documents.

    ``pcrs`` maps index -> 48-byte value (indices not given are zero, as on a real enclave);
    ``clock`` stamps documents (and dates the signing certificate); ``leaf_lifetime`` is how long the
    signing certificate is valid (the real NSM's is a few hours); ``tagged`` wraps documents in
    CBOR tag 18 (the real NSM sends them untagged; verifiers must accept both).
    """

    def __init__(self, *, module_id: str = "i-0123456789abcdef0-enc0123456789abcdef",
                 pcrs: Mapping[int, bytes] | None = None, ca: SimulatedCA | None = None,
                 clock: Callable[[], dt.datetime] = _utcnow,
                 leaf_lifetime: dt.timedelta = dt.timedelta(hours=3), tagged: bool = False) -> None:
        self.module_id = module_id
        self.pcrs = default_simulated_pcrs() if pcrs is None else self._full_pcrs(pcrs)
        self.clock = clock
        self.ca = ca or SimulatedCA(now=clock())
        self.leaf_lifetime = leaf_lifetime
        self.tagged = tagged
        self._leaf: Issued | None = None

    @staticmethod
    def _full_pcrs(pcrs: Mapping[int, bytes]) -> dict[int, bytes]:
        full = {i: bytes(PCR_BYTES) for i in range(PCR_COUNT)}
        for index, value in pcrs.items():
            if not 0 <= index < 32 or len(value) != PCR_BYTES:
                raise ValueError(f"PCR {index}: index must be 0..31 and the value {PCR_BYTES} bytes")
            full[index] = bytes(value)
        return full

    @property
    def root_certificate(self):
        """The simulator's root (a ``cryptography`` Certificate) for the verifier to pin in tests."""
        return self.ca.root.certificate

    @property
    def signing_certificate(self):
        return self._current_leaf(self.clock()).certificate

    def _current_leaf(self, now: dt.datetime) -> Issued:
        leaf = self._leaf
        if leaf is None or not (leaf.certificate.not_valid_before_utc <= now < leaf.certificate.not_valid_after_utc):
            leaf = self.ca.issue_leaf(f"{self.module_id}.simulated.aws", not_before=now - dt.timedelta(minutes=1),
                                      lifetime=self.leaf_lifetime)
            self._leaf = leaf
        return leaf

    def attest(self, user_data: bytes | None = None, nonce: bytes | None = None,
               public_key: bytes | None = None) -> bytes:
        """A COSE_Sign1 attestation document over the current PCRs and these optional fields."""
        encode_attestation_request(user_data, nonce, public_key)  # same input limits as the device
        return self.attest_with(public_key=public_key, user_data=user_data, nonce=nonce)

    def attest_with(self, *, signing_key=None, tagged: bool | None = None, **fields) -> bytes:
        """A document whose payload fields are overridden by ``fields`` (``REMOVE`` deletes one).

        For testing verifiers with documents the real NSM would never produce; values are used as
        given, without the input checks of :meth:`attest`. ``signing_key`` signs instead of the
        certificate's own key (a forgery).
        """
        now = self.clock()
        leaf = self._current_leaf(now)
        payload = {
            "module_id": self.module_id,
            "digest": "SHA384",
            "timestamp": int(now.timestamp() * 1000),
            "pcrs": dict(self.pcrs),
            "certificate": leaf.der,
            "cabundle": self.ca.cabundle,
            "public_key": None,
            "user_data": None,
            "nonce": None,
        }
        for name, value in fields.items():
            if value is REMOVE:
                payload.pop(name, None)
            else:
                payload[name] = bytes(value) if isinstance(value, bytearray) else value
        return cose.sign_es384(cbor2.dumps(payload), signing_key or leaf.key,
                               tagged=self.tagged if tagged is None else tagged)
