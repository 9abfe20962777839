"""State the enclave keeps on an untrusted host, sealed with a key only the enclave holds.

An enclave has no disk. The broker's requests and approvals are written to the parent
instance (a SQLite file there) as sealed records, so a restart loses nothing; the host can
read sizes and ids but cannot read, change, swap, replay or drop a record without the enclave
noticing.

How:

* Each record is ``header || nonce || AES-256-GCM(plaintext)``. The header names the record id
  and version; they are also the GCM associated data, so a blob is only valid under that id at
  that version.
* A sealed **head** record holds a monotonic counter, the hash of the previous head (a hash
  chain), and a manifest ``{id: (version, sha256(blob))}``. Every write updates the record and
  the head in one SQLite transaction. On open, every record must match the manifest exactly.
* While running the enclave holds the manifest in memory and checks each read against it.

Refusals, each its own error: :class:`TamperedRecord` (bytes changed), :class:`SwappedRecord`
(a blob sealed for another id), :class:`ReplayedRecord` (an older version of the same id),
:class:`MissingRecord` / :class:`UnexpectedRecord` (dropped or injected rows).

Known limit: without a trusted monotonic counter outside the host, rolling back the *whole*
store (head and records together) to an earlier consistent snapshot across a restart cannot be
detected from the store alone. The head counter and hash are therefore exposed
(:attr:`SealedRecords.head`) so the broker can announce them in its audit stream, where a
rollback shows up as a counter going backwards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HEAD_ID = "\x00head"
_MAGIC = b"SEAL1"


class SealedStateError(Exception):
    """The sealed state on the host is not what the enclave wrote. Never ignored."""


class TamperedRecord(SealedStateError):
    """A record's bytes were changed after sealing."""


class SwappedRecord(SealedStateError):
    """A record holds a blob that was sealed for a different id."""


class ReplayedRecord(SealedStateError):
    """A record holds an older (or newer) version than the manifest says."""


class MissingRecord(SealedStateError):
    """A record the manifest lists is gone."""


class UnexpectedRecord(SealedStateError):
    """The host holds a record the manifest does not list."""


class HostStorage(Protocol):
    """Dumb, untrusted persistence on the parent instance."""

    def load(self) -> dict[str, bytes]:
        """Every stored blob by id (the head under :data:`HEAD_ID`)."""

    def write(self, items: dict[str, bytes]) -> None:
        """Write all ``items`` atomically (all or none)."""


class SqliteHostStorage:
    """:class:`HostStorage` in one SQLite file; each write is one transaction."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS sealed (id TEXT PRIMARY KEY, blob BLOB NOT NULL)")
        self._lock = threading.Lock()

    def load(self) -> dict[str, bytes]:
        with self._lock:
            return {row[0]: bytes(row[1]) for row in self._db.execute("SELECT id, blob FROM sealed")}

    def write(self, items: dict[str, bytes]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO sealed (id, blob) VALUES (?, ?) "
                                     "ON CONFLICT(id) DO UPDATE SET blob = excluded.blob", items.items())
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._db.close()


@dataclasses.dataclass(frozen=True)
class Head:
    """The sealed head: counter, previous head hash, and the manifest of record versions."""

    counter: int
    previous: str
    manifest: dict[str, tuple[int, str]]

    @property
    def digest(self) -> str:
        body = json.dumps([self.counter, self.previous, sorted(self.manifest.items())])
        return hashlib.sha256(body.encode()).hexdigest()


def _aad(record_id: str, version: int) -> bytes:
    return _MAGIC + json.dumps([record_id, version]).encode()


class SealedRecords:
    """A key-value map of sealed records on untrusted host storage.

    ``key`` is the 256-bit state key (from the KMS-released seed bundle). Opening verifies the
    whole store; reads and writes are checked against the in-memory manifest. Thread-safe.
    """

    def __init__(self, storage: HostStorage, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the sealing key must be 32 bytes (AES-256)")
        self._storage = storage
        self._aead = AESGCM(key)
        self._lock = threading.RLock()
        self._cache: dict[str, bytes] = {}
        blobs = storage.load()
        head_blob = blobs.pop(HEAD_ID, None)
        if head_blob is None:
            if blobs:
                raise MissingRecord(f"the host holds {len(blobs)} record(s) but no sealed head")
            self._head = Head(0, "", {})
            return
        self._head = self._open_head(head_blob)
        for record_id in self._head.manifest:
            if record_id not in blobs:
                raise MissingRecord(f"record {record_id!r} (version {self._head.manifest[record_id][0]}) "
                                    "is missing from host storage")
        for record_id, blob in blobs.items():
            if record_id not in self._head.manifest:
                raise UnexpectedRecord(f"host storage holds record {record_id!r} that the enclave never wrote")
            self._cache[record_id] = self._unseal(record_id, blob)

    # --- sealing -----------------------------------------------------------------------
    def _seal(self, record_id: str, version: int, plaintext: bytes) -> bytes:
        header = json.dumps([record_id, version]).encode()
        nonce = os.urandom(12)
        return (_MAGIC + struct.pack(">I", len(header)) + header + nonce
                + self._aead.encrypt(nonce, plaintext, _aad(record_id, version)))

    @staticmethod
    def _parse(blob: bytes) -> tuple[str, int, bytes, bytes]:
        try:
            if not blob.startswith(_MAGIC):
                raise ValueError("bad magic")
            (n,) = struct.unpack(">I", blob[5:9])
            sealed_id, version = json.loads(blob[9:9 + n])
            if not isinstance(sealed_id, str) or not isinstance(version, int):
                raise ValueError("bad header")
            return sealed_id, version, blob[9 + n:21 + n], blob[21 + n:]
        except (ValueError, struct.error, TypeError) as e:
            raise TamperedRecord(f"sealed record is not in the sealed format: {e}") from None

    def _open_blob(self, blob: bytes, record_id: str, version: int) -> bytes:
        sealed_id, sealed_version, nonce, ciphertext = self._parse(blob)
        if sealed_id != record_id:
            raise SwappedRecord(f"record {record_id!r} holds a blob sealed for {sealed_id!r}")
        if sealed_version != version:
            raise ReplayedRecord(f"record {record_id!r} is at version {sealed_version}, "
                                 f"the enclave last wrote version {version}")
        try:
            return self._aead.decrypt(nonce, ciphertext, _aad(record_id, version))
        except (InvalidTag, ValueError):
            raise TamperedRecord(f"record {record_id!r} does not authenticate: its bytes were changed") from None

    def _open_head(self, blob: bytes) -> Head:
        sealed_id, counter, _, _ = self._parse(blob)
        if sealed_id != HEAD_ID:
            raise SwappedRecord("the head slot holds a blob sealed for a record")
        body = json.loads(self._open_blob(blob, HEAD_ID, counter))
        return Head(counter=body["counter"], previous=body["previous"],
                    manifest={k: (v[0], v[1]) for k, v in body["manifest"].items()})

    def _unseal(self, record_id: str, blob: bytes) -> bytes:
        version, digest = self._head.manifest[record_id]
        plaintext = self._open_blob(blob, record_id, version)
        if hashlib.sha256(blob).hexdigest() != digest:
            # Same id and version, authentic, but not the blob we last wrote: only possible if a
            # write was re-sealed; treat as replay of a superseded write.
            raise ReplayedRecord(f"record {record_id!r} is not the blob the enclave last wrote")
        return plaintext

    # --- public surface ----------------------------------------------------------------
    @property
    def head(self) -> Head:
        """The current head (its counter only ever increases)."""
        return self._head

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._cache)

    def __contains__(self, record_id: str) -> bool:
        with self._lock:
            return record_id in self._cache

    def get(self, record_id: str) -> bytes:
        """The record's plaintext; raises ``KeyError`` if the enclave never wrote it."""
        with self._lock:
            return self._cache[record_id]

    def verify_on_host(self, record_id: str) -> bytes:
        """Re-read one record from host storage and check it against the manifest."""
        with self._lock:
            blob = self._storage.load().get(record_id)
            if blob is None:
                raise MissingRecord(f"record {record_id!r} is missing from host storage")
            return self._unseal(record_id, blob)

    def items(self) -> Iterator[tuple[str, bytes]]:
        with self._lock:
            return iter(sorted(self._cache.items()))

    def put(self, record_id: str, plaintext: bytes) -> int:
        """Seal and store a new version of ``record_id``; returns the version written."""
        if record_id == HEAD_ID or not record_id:
            raise ValueError(f"invalid record id {record_id!r}")
        with self._lock:
            version = self._head.manifest.get(record_id, (0, ""))[0] + 1
            blob = self._seal(record_id, version, plaintext)
            manifest = dict(self._head.manifest)
            manifest[record_id] = (version, hashlib.sha256(blob).hexdigest())
            head = Head(self._head.counter + 1, self._head.digest, manifest)
            head_body = json.dumps({"counter": head.counter, "previous": head.previous,
                                    "manifest": head.manifest}).encode()
            self._storage.write({record_id: blob, HEAD_ID: self._seal(HEAD_ID, head.counter, head_body)})
            self._head = head
            self._cache[record_id] = plaintext
            return version
