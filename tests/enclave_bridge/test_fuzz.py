"""Property tests: malformed input to the CMS parser and the sealed store ends in their own errors."""
from __future__ import annotations

import os
import sqlite3

from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_bridge.cms import CmsError, decrypt_enveloped, encrypt_for_recipient
from enclave_bridge.sealed import SealedRecords, SealedStateError, SqliteHostStorage

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
VALID = encrypt_for_recipient(b"seed secret material " * 3, KEY.public_key())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_mutated_cms_is_refused_or_decrypts_never_crashes(flips):
    data = bytearray(VALID)
    for pos, xor in flips:
        data[pos] ^= xor
    try:
        out = decrypt_enveloped(bytes(data), KEY)
    except CmsError:
        return
    assert isinstance(out, bytes)  # CBC has no integrity: a flip in the content can decrypt to other bytes


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_malformed_cms(data):
    try:
        decrypt_enveloped(data, KEY)
    except CmsError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["a", "b", "\x00head"]), pos=st.integers(0, 10_000), xor=st.integers(1, 255))
def test_any_flipped_byte_in_sealed_state_is_refused(tmp_path_factory, which, pos, xor):
    path = tmp_path_factory.mktemp("fuzz") / "s.db"
    key = os.urandom(32)
    s = SealedRecords(SqliteHostStorage(path), key)
    s.put("a", b"alpha")
    s.put("b", b"bravo")
    with sqlite3.connect(path) as db:
        (blob,) = db.execute("SELECT blob FROM sealed WHERE id = ?", (which,)).fetchone()
        blob = bytearray(blob)
        blob[pos % len(blob)] ^= xor
        db.execute("UPDATE sealed SET blob = ? WHERE id = ?", (bytes(blob), which))
    try:
        SealedRecords(SqliteHostStorage(path), key)
    except SealedStateError:
        return
    raise AssertionError(f"a flipped byte in {which!r} at {pos % len(blob)} was accepted")
