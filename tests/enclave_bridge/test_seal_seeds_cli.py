"""`mpactl broker seal-seeds` against a KMS endpoint over HTTP (moto's server standing in for AWS)."""
from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_bridge import seeds

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def kms_endpoint():
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_seal_seeds_writes_a_private_bundle_only_the_kms_key_opens(kms_endpoint, tmp_path):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIDOPERATOR", "AWS_SECRET_ACCESS_KEY": "operator-secret",
           "MPA_BROKER_SLACK_WEBHOOK": "https://hooks.slack.com/services/T/B/x"}
    client = boto3.client("kms", region_name="eu-west-2", endpoint_url=kms_endpoint,
                          aws_access_key_id="AKIDOPERATOR", aws_secret_access_key="operator-secret")
    key_id = client.create_key(Description="broker seeds")["KeyMetadata"]["KeyId"]
    out = tmp_path / "seeds.json"
    cmd = [sys.executable, "-m", "mpactl.app", "broker", "seal-seeds", "--kms-key-id", key_id, "--out", str(out),
           "--kms-endpoint", kms_endpoint, "--with-aws-keys"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed["kubernetes_jwks"]["keys"][0]["kty"] == "RSA" and "d" not in printed["kubernetes_jwks"]["keys"][0]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    sealed = json.loads(out.read_bytes())
    assert sealed["format"] == seeds.FORMAT and b"PRIVATE" not in out.read_bytes()

    # What the enclave does after KMS releases the data key (here: a plain Decrypt on the stand-in).
    data_key = client.decrypt(CiphertextBlob=base64.b64decode(sealed["encrypted_data_key"]),
                              EncryptionContext=seeds.CONTEXT)["Plaintext"]
    bundle = seeds.SeedBundle.from_json(AESGCM(data_key).decrypt(
        base64.b64decode(sealed["nonce"]), base64.b64decode(sealed["ciphertext"]), seeds._aad(key_id)))
    assert bundle.aws == {"access_key_id": "AKIDOPERATOR", "secret_access_key": "operator-secret"}
    assert bundle.slack_webhook_url.startswith("https://hooks.slack.com/")
    assert bundle.signing_key().key_size == 2048

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
