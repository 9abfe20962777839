"""Attestation for the broker's tests: enclave-net's simulated NSM (documents of the real format
from its own CA chain) and the real verifier pinned to that simulator's root."""
from __future__ import annotations

from enclave_bridge.kms import DocumentVerifier, attestation_verifier
from enclave_bridge.nsm import SimulatedNsm, default_simulated_pcrs

#: The image PCRs of the simulated "good" broker.
GOOD_PCRS = {i: v for i, v in default_simulated_pcrs().items() if i in (0, 1, 2)}


def make_nsm(pcrs=None, *, like: SimulatedNsm | None = None) -> SimulatedNsm:
    """An NSM measuring ``pcrs``; ``like`` shares another NSM's CA (a genuine device, other image)."""
    return SimulatedNsm(pcrs=dict(GOOD_PCRS if pcrs is None else pcrs), ca=like.ca if like else None)


def verifier_for(nsm: SimulatedNsm) -> DocumentVerifier:
    """The production verifier, pinned to this simulator's root instead of the AWS Nitro root."""
    return attestation_verifier(nsm.root_certificate)
