"""Enclave side of the system: forwarders, Nitro attestation, KMS for a recipient, the credential broker."""
