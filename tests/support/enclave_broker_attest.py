"""Attestation for the broker's tests.

PROVISIONAL until enclave-net's simulator and verifier land on main: a tiny signed document
that carries PCRs and the enclave public key, which is all KMS needs from a document.
"""
from __future__ import annotations

import hashlib

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enclave_bridge.kms import AttestedDocument

GOOD_PCRS = {0: hashlib.sha384(b"broker image").digest(), 1: hashlib.sha384(b"kernel").digest(),
             2: hashlib.sha384(b"application").digest()}


class FakeNsm:
    """Issues documents signed by its own key; ``pcrs`` are what this 'enclave' measures."""

    def __init__(self, pcrs=None, signer: Ed25519PrivateKey | None = None) -> None:
        self.pcrs = dict(GOOD_PCRS if pcrs is None else pcrs)
        self.signer = signer or Ed25519PrivateKey.generate()

    def attest(self, user_data, nonce, public_key) -> bytes:
        payload = cbor2.dumps({"pcrs": self.pcrs, "public_key": public_key, "nonce": nonce,
                               "user_data": user_data})
        return cbor2.dumps([payload, self.signer.sign(payload)])


def verifier_for(nsm: FakeNsm):
    public = nsm.signer.public_key()

    def verify(document: bytes, pcrs) -> AttestedDocument:
        payload, signature = cbor2.loads(document)
        try:
            public.verify(signature, payload)
        except InvalidSignature:
            raise ValueError("attestation signature does not verify") from None
        body = cbor2.loads(payload)
        return AttestedDocument(pcrs=body["pcrs"], public_key=body["public_key"])

    return verify
