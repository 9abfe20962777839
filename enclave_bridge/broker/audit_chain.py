"""The broker's audit log on the host: hash-chained, sealed with the broker's key, verifiable outside.

Each JSON line is ``{"seq", "prev", "event", "sig"}``: ``seq`` counts from 1, ``prev`` is the
SHA-256 (hex) of the previous line's bytes (64 zeros for the first), ``event`` the
:class:`policy.audit.AuditEvent` as JSON, and ``sig`` an Ed25519 signature over the canonical
JSON of the other three, by the broker's audit key. That key is derived inside the enclave from
the sealed seeds (:func:`audit_key`), so the host can neither forge nor alter a record; its
public half is written next to the log (``<log>.pub``) for the verifier to pin.

:func:`verify_chain` names what is wrong: a record altered or forged (:class:`AuditTampered`),
records out of order or missing in the middle (:class:`AuditReordered`), the log ending before
a record the verifier already knows of (:class:`AuditTruncated`), or a known record replaced by
another at the same position, i.e. the log was rolled back and rewritten
(:class:`AuditRolledBack`). What the verifier "already knows" is a witness kept outside the
host's reach: the highest record exported to the store's audit (:func:`export_to_store`), or
the head the broker keeps in its sealed state (:meth:`ChainedAuditLog.bind_sealed_head`: a
broker whose log was cut or rolled back behind its sealed head refuses to start). Rolling back
the log *and* the sealed state together is consistent on the host; the store's export catches it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from policy.audit import AuditEvent

GENESIS = "0" * 64
CHAIN_DETAIL = "broker_chain"  # where an exported event keeps its (seq, hash) in the store
SEALED_HEAD_ID = "audit/head"  # the log's head in the broker's sealed state


class AuditChainError(Exception):
    """The broker audit log does not verify; subclasses say how."""


class AuditTampered(AuditChainError):
    """A record is malformed, or its signature is not the broker's (altered or forged)."""


class AuditReordered(AuditChainError):
    """Records are out of order, duplicated or missing in the middle (seq/prev do not chain)."""


class AuditTruncated(AuditChainError):
    """The log ends before a record the witness knows of."""


class AuditRolledBack(AuditChainError):
    """At a position the witness knows, the log holds a different record: rolled back and rewritten."""


def audit_key(state_key: bytes) -> Ed25519PrivateKey:
    """The broker's audit signing key, derived from the sealed seeds' state key (HKDF-SHA256)."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"rpcauthz broker audit v1").derive(state_key)
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the broker audit key must be Ed25519")
    return key


def _signed_part(seq: int, prev: str, event: dict[str, Any]) -> bytes:
    return json.dumps({"seq": seq, "prev": prev, "event": event}, sort_keys=True, separators=(",", ":")).encode()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@dataclasses.dataclass(frozen=True)
class ChainHead:
    """The last record of a chain: its ``seq`` and the SHA-256 of its line."""

    seq: int
    hash: str


class ChainedAuditLog:
    """An audit sink (see :mod:`enclave_bridge.broker.notify`) appending chained, signed records.

    On open it verifies the existing file and continues its chain; a log that does not verify,
    or that ends before ``expected_head`` (the broker's sealed head), refuses to open.
    """

    def __init__(self, path: str | Path, key: Ed25519PrivateKey, *, expected_head: ChainHead | None = None) -> None:
        self._path = Path(path)
        self._key = key
        self._lock = threading.Lock()
        self._sealed: Any = None
        lines = self._path.read_bytes().splitlines() if self._path.exists() else []
        self.head = verify_chain(lines, key.public_key(), witness=expected_head)
        pub = self._path.with_name(self._path.name + ".pub")
        pub.write_bytes(public_pem(key))

    def bind_sealed_head(self, records: Any) -> None:
        """Check the log against the head sealed in the broker's state and keep it there from now on.

        ``records`` is the broker's :class:`enclave_bridge.sealed.SealedRecords`. A log that ends
        before, or differs at, the sealed head was truncated or rolled back on the host: refused.
        """
        with self._lock:
            try:
                sealed = json.loads(records.get(SEALED_HEAD_ID))
                witness: ChainHead | None = ChainHead(int(sealed["seq"]), str(sealed["hash"]))
            except KeyError:
                witness = None  # the first run with a chained log
            lines = self._path.read_bytes().splitlines() if self._path.exists() else []
            verify_chain(lines, self._key.public_key(), witness=witness)
            self._sealed = records

    def __call__(self, event: AuditEvent) -> None:
        with self._lock:
            seq, prev = self.head.seq + 1, self.head.hash
            body = event.to_json()
            record = {"seq": seq, "prev": prev, "event": body,
                      "sig": self._key.sign(_signed_part(seq, prev, body)).hex()}
            line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
            with self._path.open("ab") as f:
                f.write(line + b"\n")
                f.flush()
            self.head = ChainHead(seq, line_hash(line))
            if self._sealed is not None:
                self._sealed.put(SEALED_HEAD_ID, json.dumps(dataclasses.asdict(self.head)).encode())


def verify_chain(lines: Sequence[bytes], public_key: Ed25519PublicKey, *,
                 witness: ChainHead | None = None) -> ChainHead:
    """Verify every line; return the head. ``witness`` is a record known to exist (seq and hash)."""
    head = ChainHead(0, GENESIS)
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            seq, prev, event, sig = record["seq"], record["prev"], record["event"], bytes.fromhex(record["sig"])
            if set(record) != {"seq", "prev", "event", "sig"} or type(seq) is not int:
                raise ValueError("unexpected fields")
        except (ValueError, KeyError, TypeError) as e:
            raise AuditTampered(f"line {number} is not a broker audit record: {e}") from None
        try:
            public_key.verify(sig, _signed_part(seq, prev, event))
        except InvalidSignature:
            raise AuditTampered(f"line {number} (seq {seq}): signature is not the broker's: the record was "
                                "altered or forged") from None
        if seq != head.seq + 1 or prev != head.hash:
            raise AuditReordered(f"line {number} holds seq {seq} after seq {head.seq}"
                                 + ("" if seq == head.seq + 1 else f" (expected {head.seq + 1})")
                                 + ("" if prev == head.hash else ": it does not chain to the record before it")
                                 + ": records were reordered, duplicated or removed")
        head = ChainHead(seq, line_hash(line))
        if witness is not None and seq == witness.seq and head.hash != witness.hash:
            raise AuditRolledBack(f"seq {seq} differs from the record known outside the host: the log was "
                                  "rolled back and rewritten")
    if witness is not None and head.seq < witness.seq:
        raise AuditTruncated(f"the log ends at seq {head.seq} but seq {witness.seq} is known to exist: "
                             "records were cut off the end (or the log was rolled back)")
    return head


def read_records(path: str | Path) -> list[tuple[bytes, dict[str, Any]]]:
    lines = Path(path).read_bytes().splitlines() if Path(path).exists() else []
    return [(line, json.loads(line)) for line in lines]


def _event_from_json(d: dict[str, Any]) -> AuditEvent:
    fields = {f.name for f in dataclasses.fields(AuditEvent)}
    data = {k: v for k, v in d.items() if k in fields}
    data["at"] = datetime.fromisoformat(data["at"])
    return AuditEvent(**data)


def store_witness(store: Any) -> ChainHead | None:
    """The highest broker record already exported to ``store``'s audit, or None."""
    best: ChainHead | None = None
    for e in store.list_audit(limit=1_000_000):
        chain = (e.detail or {}).get(CHAIN_DETAIL)
        if isinstance(chain, dict) and (best is None or int(chain["seq"]) > best.seq):
            best = ChainHead(int(chain["seq"]), str(chain["hash"]))
    return best


def export_to_store(path: str | Path, public_key: Ed25519PublicKey, store: Any) -> tuple[ChainHead, int]:
    """Verify the log against the store's witness, then append the records the store lacks.

    Returns the head and how many records were exported. Each exported event keeps
    ``detail.broker_chain = {seq, hash}``: the witness the next verification checks against.
    """
    records = read_records(path)
    witness = store_witness(store)
    head = verify_chain([line for line, _ in records], public_key, witness=witness)
    start = witness.seq if witness else 0
    new: list[AuditEvent] = []
    for line, record in records[start:]:
        event = _event_from_json(record["event"])
        detail = {**event.detail, CHAIN_DETAIL: {"seq": record["seq"], "hash": line_hash(line)}}
        new.append(dataclasses.replace(event, detail=detail))
    if new:
        store.append_audits(new)
    return head, len(new)


def verify_file(path: str | Path, public_key: Ed25519PublicKey, *, witness: ChainHead | None = None) -> ChainHead:
    lines: Iterable[bytes] = Path(path).read_bytes().splitlines() if Path(path).exists() else []
    return verify_chain(list(lines), public_key, witness=witness)
