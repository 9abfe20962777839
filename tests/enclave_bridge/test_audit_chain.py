"""The broker's audit log: chained, signed with the broker's key, exported to a real store, and a
verifier (library and `mpactl broker audit`) that tells tampering, reordering, truncation and
rollback apart."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from enclave_bridge.broker.audit_chain import (
    AuditReordered,
    AuditRolledBack,
    AuditTampered,
    AuditTruncated,
    ChainedAuditLog,
    audit_key,
    export_to_store,
    load_public_key,
    store_witness,
    verify_file,
)
from policy.audit import AuditEvent
from policy.stores import open_store

ROOT = Path(__file__).resolve().parents[2]
STATE_KEY = b"k" * 32
T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def event(n: int, who: str = "alice@example.com") -> AuditEvent:
    return AuditEvent(kind="credential.requested", actor=who, at=T0 + timedelta(seconds=n), request_id=f"cr-{n}",
                      service="credentials.aws", method="AssumeRole", outcome="pending", reason=f"reason {n}",
                      detail={"target": "AWS role platform-admin"})


def write(path: Path, n: int, start: int = 1) -> ChainedAuditLog:
    log = ChainedAuditLog(path, audit_key(STATE_KEY))
    for i in range(start, start + n):
        log(event(i))
    return log


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "audit.jsonl"
    write(path, 4)
    return path


def pub(path: Path):
    return load_public_key(path.with_name(path.name + ".pub").read_bytes())


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def put(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(x + b"\n" for x in new))


def test_records_chain_and_verify_and_the_log_continues_after_a_restart(log):
    assert verify_file(log, pub(log)).seq == 4
    first = json.loads(lines(log)[0])
    assert first["seq"] == 1 and first["prev"] == "0" * 64 and first["event"]["request_id"] == "cr-1"
    reopened = ChainedAuditLog(log, audit_key(STATE_KEY))
    assert reopened.head.seq == 4
    reopened(event(5))
    assert verify_file(log, pub(log)).seq == 5


def test_an_altered_or_forged_record_is_tampering(log):
    good = lines(log)
    changed = good[1].replace(b"alice@example.com", b"mallory@example.com")
    put(log, [good[0], changed, *good[2:]])
    with pytest.raises(AuditTampered, match="seq 2.*altered or forged"):
        verify_file(log, pub(log))
    with pytest.raises(AuditTampered):  # the broker itself refuses to continue such a log
        ChainedAuditLog(log, audit_key(STATE_KEY))
    other = ChainedAuditLog(log.with_name("other.jsonl"), audit_key(b"x" * 32))  # another key's records
    other(event(1))
    with pytest.raises(AuditTampered, match="signature is not the broker's"):
        verify_file(log.with_name("other.jsonl"), pub(log))


def test_swapped_or_removed_records_are_reordering(log):
    good = lines(log)
    put(log, [good[0], good[2], good[1], good[3]])
    with pytest.raises(AuditReordered, match="seq 3 after seq 1"):
        verify_file(log, pub(log))
    put(log, [good[0], good[1], good[3]])
    with pytest.raises(AuditReordered, match="removed"):
        verify_file(log, pub(log))
    put(log, [good[0], good[1], good[1]])
    with pytest.raises(AuditReordered):
        verify_file(log, pub(log))


def test_truncation_and_rollback_are_caught_against_the_stores_export(log, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'rpcauthz.db'}")
    try:
        assert export_to_store(log, pub(log), store)[1] == 4
        assert export_to_store(log, pub(log), store)[1] == 0  # idempotent: only what the store lacks
        witness = store_witness(store)
        assert witness is not None and witness.seq == 4
        exported = [e for e in store.list_audit() if e.detail.get("broker_chain")]
        assert [e.request_id for e in exported] == ["cr-1", "cr-2", "cr-3", "cr-4"]

        good = lines(log)
        put(log, good[:3])  # the last record cut off: the chain alone still verifies
        assert verify_file(log, pub(log)).seq == 3
        with pytest.raises(AuditTruncated, match="ends at seq 3 but seq 4"):
            verify_file(log, pub(log), witness=witness)

        # Rollback: an old copy (2 records) restored, and the broker carries on from it.
        put(log, good[:2])
        write(log, 2, start=10)
        assert verify_file(log, pub(log)).seq == 4  # consistent on its own
        with pytest.raises(AuditRolledBack, match="seq 4 differs"):
            verify_file(log, pub(log), witness=witness)
        with pytest.raises(AuditRolledBack):
            export_to_store(log, pub(log), store)
    finally:
        store.close()


def mpactl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpactl.app", "broker", "audit", *args], cwd=ROOT,
                          env={**os.environ}, capture_output=True, text=True, timeout=60)


def test_the_verifier_command(log, tmp_path):
    store = f"sqlite:///{tmp_path / 'rpcauthz.db'}"
    r = mpactl("export", "--audit-log", str(log), "--store", store)
    assert r.returncode == 0 and "exported 4 records" in r.stdout, r.stderr
    r = mpactl("verify", "--audit-log", str(log), "--store", store)
    assert r.returncode == 0 and "ok: 4 records" in r.stdout and "witness seq 4 matches" in r.stdout
    pinned = tmp_path / "pinned.pub"
    shutil.copy(log.with_name(log.name + ".pub"), pinned)
    put(log, lines(log)[:3])
    r = mpactl("verify", "--audit-log", str(log), "--public-key", str(pinned), "--store", store)
    assert r.returncode == 6 and "AuditTruncated" in r.stderr
    put(log, [lines(log)[1], lines(log)[0]])
    r = mpactl("verify", "--audit-log", str(log), "--public-key", str(pinned))
    assert r.returncode == 6 and "AuditReordered" in r.stderr


def test_the_broker_keeps_the_head_sealed_and_refuses_a_log_cut_behind_it(tmp_path):
    from enclave_bridge.sealed import SealedRecords, SqliteHostStorage
    path = tmp_path / "audit.jsonl"
    records = SealedRecords(SqliteHostStorage(tmp_path / "state.db"), STATE_KEY)
    log = ChainedAuditLog(path, audit_key(STATE_KEY))
    log.bind_sealed_head(records)
    for i in range(1, 4):
        log(event(i))
    assert json.loads(records.get("audit/head"))["seq"] == 3
    put(path, lines(path)[:2])  # the host cuts the last record
    reopened = ChainedAuditLog(path, audit_key(STATE_KEY))  # consistent on its own...
    with pytest.raises(AuditTruncated, match="ends at seq 2 but seq 3"):
        reopened.bind_sealed_head(records)  # ...but not with the sealed head
