"""Sealed state on the host: a restart loses nothing; tampering, swapping, replay and drops are refused."""
from __future__ import annotations

import os
import sqlite3

import pytest

from enclave_bridge.sealed import (
    HEAD_ID,
    MissingRecord,
    ReplayedRecord,
    SealedRecords,
    SqliteHostStorage,
    SwappedRecord,
    TamperedRecord,
    UnexpectedRecord,
)

KEY = os.urandom(32)


def host_rows(path) -> dict[str, bytes]:
    with sqlite3.connect(path) as db:
        return {r[0]: bytes(r[1]) for r in db.execute("SELECT id, blob FROM sealed")}


def host_set(path, record_id: str, blob: bytes) -> None:
    with sqlite3.connect(path) as db:
        db.execute("INSERT OR REPLACE INTO sealed (id, blob) VALUES (?, ?)", (record_id, blob))


def host_delete(path, record_id: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM sealed WHERE id = ?", (record_id,))


def reopen(path, key=KEY) -> SealedRecords:
    return SealedRecords(SqliteHostStorage(path), key)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "state.db"
    s = SealedRecords(SqliteHostStorage(path), KEY)
    s.put("req-a", b'{"state": "pending"}')
    s.put("req-b", b'{"state": "pending", "who": "bob"}')
    s.put("req-a", b'{"state": "approved"}')
    return path, s


def test_restart_loses_nothing_and_host_sees_no_plaintext(store):
    path, s = store
    again = reopen(path)
    assert again.get("req-a") == b'{"state": "approved"}'
    assert again.get("req-b") == b'{"state": "pending", "who": "bob"}'
    assert again.head.counter == 3 == s.head.counter
    assert again.head.manifest["req-a"][0] == 2
    for blob in host_rows(path).values():
        assert b"approved" not in blob and b"bob" not in blob


def test_head_is_a_hash_chain(store):
    _, s = store
    before = s.head
    s.put("req-c", b"x")
    assert s.head.counter == before.counter + 1 and s.head.previous == before.digest


def test_refuses_a_tampered_record(store):
    path, _ = store
    blob = bytearray(host_rows(path)["req-b"])
    blob[-5] ^= 0x01
    host_set(path, "req-b", bytes(blob))
    with pytest.raises(TamperedRecord, match="req-b"):
        reopen(path)


def test_refuses_a_tampered_head(store):
    path, _ = store
    blob = bytearray(host_rows(path)[HEAD_ID])
    blob[-1] ^= 0x80
    host_set(path, HEAD_ID, bytes(blob))
    with pytest.raises(TamperedRecord):
        reopen(path)


def test_refuses_records_swapped_between_ids(store):
    path, _ = store
    rows = host_rows(path)
    host_set(path, "req-a", rows["req-b"])
    with pytest.raises(SwappedRecord, match="sealed for 'req-b'"):
        reopen(path)


def test_refuses_a_replayed_old_version(store, tmp_path):
    path, s = store
    old = host_rows(path)["req-b"]
    s.put("req-b", b'{"state": "rejected"}')
    host_set(path, "req-b", old)  # the host puts back the pending version
    with pytest.raises(ReplayedRecord, match="version 1"):
        reopen(path)
    with pytest.raises(ReplayedRecord):
        s.verify_on_host("req-b")  # and the running enclave notices too


def test_refuses_an_old_head_with_newer_records(store):
    path, s = store
    old_head = host_rows(path)[HEAD_ID]
    s.put("req-c", b"new")
    host_set(path, HEAD_ID, old_head)
    with pytest.raises(UnexpectedRecord, match="req-c"):
        reopen(path)


def test_refuses_a_dropped_record(store):
    path, _ = store
    host_delete(path, "req-a")
    with pytest.raises(MissingRecord, match="req-a"):
        reopen(path)


def test_refuses_a_dropped_head(store):
    path, _ = store
    host_delete(path, HEAD_ID)
    with pytest.raises(MissingRecord, match="no sealed head"):
        reopen(path)


def test_refuses_an_injected_record(store):
    path, _ = store
    host_set(path, "req-z", host_rows(path)["req-a"])
    with pytest.raises(UnexpectedRecord, match="req-z"):
        reopen(path)


def test_another_key_cannot_open_the_state(store):
    path, _ = store
    with pytest.raises(TamperedRecord):
        reopen(path, key=os.urandom(32))


def test_refuses_garbage(store):
    path, _ = store
    host_set(path, "req-a", b"garbage")
    with pytest.raises(TamperedRecord, match="not in the sealed format"):
        reopen(path)
