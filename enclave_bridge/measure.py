"""Reproducible broker builds and the two-person rule for changing the trusted measurement.

**Build.** The broker artifact is an uncompressed ustar archive of the files the broker runs
(:data:`ARTIFACT_PATHS` at a git commit), with every source of nondeterminism pinned: entries
sorted by path, mtime fixed to :data:`FIXED_MTIME` (so a docs-only commit keeps the hash), owner 0/0 with empty names, mode 0644
(0755 for files git records as executable), no directories, no PAX headers. Its SHA-384 is the
*measurement*. :func:`measure` builds it twice from the same commit by independent routes (from
git objects, and from a fresh clone checked out under another umask with scrambled mtimes) and
refuses unless both hashes agree.

In production the enclave image file (EIF) that ``nitro-cli build-enclave`` makes from a pinned
base image plus this artifact gives PCR0; this module covers the part this repository controls.

**Trust.** Changing the trusted measurement (what KMS key policies pin) is a two-person MPA
request in the approvals service (see :mod:`enclave_bridge.trust`); :class:`TrustLedger` keeps
the accepted change with the approvals service's signed receipt, which the broker re-verifies.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import os
import random
import re
import secrets
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

#: What goes into the broker artifact: the enclave-side code, what it imports, and the dependency pins.
ARTIFACT_PATHS = ("enclave_bridge", "policy", "mpa/__init__.py", "mpa/v1", "pyproject.toml", "requirements.lock")
#: Every entry's mtime: 1980-01-01T00:00:00Z, as wheels and zip-based reproducible builds use.
FIXED_MTIME = 315532800
#: A measurement (the image's sha384) and a git commit as a trust change names them,
#: lowercase hex, checked with ``fullmatch`` (here and in ``enclave_bridge.trust``).
SHA384_HEX = re.compile(r"[0-9a-f]{96}")
COMMIT_HEX = re.compile(r"[0-9a-f]{40}")


class BuildError(Exception):
    """The artifact could not be built, or two builds disagreed."""


def _git(repo: Path, *args: str, input: bytes | None = None) -> bytes:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                              input=input).stdout
    except subprocess.CalledProcessError as e:
        raise BuildError(f"git {' '.join(args)} failed: {e.stderr.decode(errors='replace').strip()}") from None


def resolve_commit(repo: Path, rev: str) -> str:
    """The full commit id for ``rev`` (a branch, tag or hash)."""
    return _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()


def _included(path: str) -> bool:
    if "__pycache__" in path.split("/") or path.endswith((".pyc", ".pyo")):
        return False
    return any(path == p or path.startswith(p + "/") for p in ARTIFACT_PATHS)


def _tar(entries: Iterable[tuple[str, bytes, bool]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, data, executable in sorted(entries, key=lambda e: e[0].encode()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = FIXED_MTIME
            info.mode = 0o755 if executable else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_from_git(repo: Path, commit: str) -> bytes:
    """The artifact built straight from git objects at ``commit``."""
    listing = _git(repo, "ls-tree", "-r", "-z", "--full-tree", commit).split(b"\0")
    entries = []
    for line in filter(None, listing):
        meta, path = line.split(b"\t", 1)
        mode, kind, obj = meta.split()
        name = path.decode()
        if kind != b"blob" or not _included(name):
            continue
        if mode == b"120000":
            raise BuildError(f"{name} is a symlink; the artifact holds regular files only")
        entries.append((name, _git(repo, "cat-file", "blob", obj.decode()), mode == b"100755"))
    if not entries:
        raise BuildError(f"commit {commit} has none of {', '.join(ARTIFACT_PATHS)}")
    return _tar(entries)


def build_from_checkout(checkout: Path) -> bytes:
    """The artifact built from a checked-out tree (only files git tracks, so stray files don't count)."""
    tracked = _git(checkout, "ls-files", "-z").split(b"\0")
    entries = []
    for raw in filter(None, tracked):
        name = raw.decode()
        if not _included(name):
            continue
        p = checkout / name
        if p.is_symlink():
            raise BuildError(f"{name} is a symlink; the artifact holds regular files only")
        entries.append((name, p.read_bytes(), bool(p.stat().st_mode & 0o100)))
    return _tar(entries)


def sha384(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Measurement:
    commit: str
    sha384: str
    size: int


def measure(repo: Path, rev: str = "HEAD", *, out: Path | None = None) -> Measurement:
    """Build the artifact twice from ``rev`` by independent routes and return its SHA-384.

    Raises :class:`BuildError` if the two builds differ (the build is not reproducible).
    """
    repo = Path(repo)
    commit = resolve_commit(repo, rev)
    first = build_from_git(repo, commit)
    with tempfile.TemporaryDirectory(prefix="mpa-measure-") as tmp:
        checkout = Path(tmp) / "src"
        old_umask = os.umask(0o027)  # a different umask than the usual 022
        try:
            _git(repo, "clone", "--quiet", "--no-checkout", "--shared", str(repo.resolve()), str(checkout))
            _git(checkout, "checkout", "--quiet", commit)
        finally:
            os.umask(old_umask)
        rng = random.Random(secrets.randbits(64))
        for p in checkout.rglob("*"):
            if p.is_file() and ".git" not in p.parts:
                t = rng.randint(0, 2**31 - 1)
                os.utime(p, (t, t))
        second = build_from_checkout(checkout)
    h1, h2 = sha384(first), sha384(second)
    if h1 != h2:
        raise BuildError(f"builds of {commit} differ: {h1} vs {h2}; the build is not reproducible")
    if out is not None:
        Path(out).write_bytes(first)
    return Measurement(commit, h1, len(first))


# --- the trusted measurement in force ---------------------------------------------------------

class TrustLedger:
    """The trusted measurement and its history, in a JSON file replaced atomically.

    Entries are written only by ``mpactl broker trust accept`` after
    :func:`enclave_bridge.trust.verify_trust_receipt` accepted the approvals service's receipt;
    each keeps that receipt, so the broker re-verifies the change it runs under itself and a
    hand-edited ledger gains nothing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"trusted": None, "history": []}
        except (OSError, ValueError) as e:
            raise BuildError(f"the trust ledger {self.path} is unreadable: {e}") from None
        if not isinstance(data, dict) or "history" not in data:
            raise BuildError(f"the trust ledger {self.path} is not a ledger (no history)")
        return data

    def trusted(self) -> dict | None:
        """The entry in force: commit, sha384, request_id, receipt, requester, approvers, accepted_at."""
        return self._read().get("trusted")

    def history(self) -> list[dict]:
        return list(self._read()["history"])

    def accept(self, entry: dict) -> None:
        """Make ``entry`` the trusted measurement (the caller verified its receipt)."""
        missing = [k for k in ("commit", "sha384", "request_id", "receipt") if not entry.get(k)]
        if missing:
            raise ValueError(f"a trust ledger entry needs {', '.join(missing)}")
        if not SHA384_HEX.fullmatch(entry["sha384"]) or not COMMIT_HEX.fullmatch(entry["commit"]):
            raise ValueError("a trust ledger entry needs a 40-hex commit and a 96-hex sha384")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            data["trusted"] = dict(entry)
            data["history"].append(dict(entry))
            tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
