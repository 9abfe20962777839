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

**Trust.** Changing the trusted measurement (what KMS key policies pin) is a proposal that two
distinct approvers each confirm by reporting the hash *they* built from the commit. The pure
functions :func:`propose` and :func:`report` hold the rules; :class:`MeasurementLedger` stores
proposals in a JSON file with atomic replace. A report whose hash differs from the first one
marks the proposal DISPUTED: it can never be accepted (someone built something else; look why).
"""
from __future__ import annotations

import dataclasses
import enum
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
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from policy import AlreadyDecided, InvalidRequest, NotEligible, RequestClosed

#: What goes into the broker artifact: the enclave-side code, what it imports, and the dependency pins.
ARTIFACT_PATHS = ("enclave_bridge", "policy", "mpa/__init__.py", "mpa/v1", "pyproject.toml", "requirements.lock")
#: Every entry's mtime: 1980-01-01T00:00:00Z, as wheels and zip-based reproducible builds use.
FIXED_MTIME = 315532800
_SHA384 = re.compile(r"^[0-9a-f]{96}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


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


# --- the two-person rule for the trusted measurement ------------------------------------------

class ProposalState(str, enum.Enum):
    OPEN = "open"
    ACCEPTED = "accepted"
    DISPUTED = "disputed"


@dataclasses.dataclass(frozen=True)
class Report:
    approver: str
    sha384: str
    at: str


@dataclasses.dataclass(frozen=True)
class Proposal:
    id: str
    commit: str
    proposer: str
    created_at: str
    reason: str
    required: int = 2
    reports: tuple[Report, ...] = ()
    state: ProposalState = ProposalState.OPEN

    @property
    def measurement(self) -> str | None:
        """The agreed SHA-384, once accepted."""
        return self.reports[0].sha384 if self.state is ProposalState.ACCEPTED else None


def propose(*, proposal_id: str, commit: str, proposer: str, reason: str, now: datetime,
            required: int = 2) -> Proposal:
    """Open a proposal to trust the build of ``commit``. Nothing is trusted until reports agree."""
    if not _COMMIT.match(commit):
        raise InvalidRequest(f"commit must be a full 40-hex git commit id, got {commit!r}")
    if required < 2:
        raise InvalidRequest("changing the trusted measurement needs at least two approvers")
    if not reason.strip():
        raise InvalidRequest("give a reason for the change")
    return Proposal(proposal_id, commit, proposer, now.isoformat(), reason.strip(), required)


def report(p: Proposal, *, approver: str, sha384_hex: str, approvers: frozenset[str], now: datetime) -> Proposal:
    """Record that ``approver`` built ``p.commit`` and got ``sha384_hex``.

    Refuses non-approvers, a second report by the same person, malformed hashes and closed
    proposals. A hash that differs from an earlier report disputes the proposal for good.
    """
    if p.state is not ProposalState.OPEN:
        raise RequestClosed(f"proposal {p.id} is {p.state.value}")
    if approver not in approvers:
        raise NotEligible(f"{approver} is not a measurement approver")
    if any(r.approver == approver for r in p.reports):
        raise AlreadyDecided(f"{approver} already reported a hash for proposal {p.id}; "
                             "a second approver must build it independently")
    h = sha384_hex.strip().lower()
    if not _SHA384.match(h):
        raise InvalidRequest("the reported hash must be a SHA-384 in hex (96 characters)")
    reports = p.reports + (Report(approver, h, now.isoformat()),)
    if p.reports and h != p.reports[0].sha384:
        return dataclasses.replace(p, reports=reports, state=ProposalState.DISPUTED)
    state = ProposalState.ACCEPTED if len(reports) >= p.required else ProposalState.OPEN
    return dataclasses.replace(p, reports=reports, state=state)


def _to_json(p: Proposal) -> dict:
    d = dataclasses.asdict(p)
    d["state"] = p.state.value
    return d


def _from_json(d: dict) -> Proposal:
    return Proposal(d["id"], d["commit"], d["proposer"], d["created_at"], d["reason"], d["required"],
                    tuple(Report(**r) for r in d["reports"]), ProposalState(d["state"]))


class MeasurementLedger:
    """Proposals and the current trusted measurement in one JSON file (locked, atomically replaced)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict:
        if not self.path.exists():
            return {"trusted": None, "history": [], "proposals": {}}
        try:
            return json.loads(self.path.read_text())
        except ValueError as e:
            raise BuildError(f"measurement ledger {self.path} is not valid JSON: {e}") from None

    def _update(self, change: Callable[[dict], object]) -> object:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            result = change(data)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
            return result

    def trusted(self) -> dict | None:
        """``{"sha384", "commit", "proposal"}`` of the measurement in force, or None."""
        return self._read()["trusted"]

    def get(self, proposal_id: str) -> Proposal:
        d = self._read()["proposals"].get(proposal_id)
        if d is None:
            raise KeyError(f"no measurement proposal {proposal_id!r}")
        return _from_json(d)

    def propose(self, *, commit: str, proposer: str, reason: str, now: datetime) -> Proposal:
        p = propose(proposal_id=f"mp-{secrets.token_hex(4)}", commit=commit, proposer=proposer,
                    reason=reason, now=now)

        def change(data: dict) -> Proposal:
            data["proposals"][p.id] = _to_json(p)
            return p
        return self._update(change)  # type: ignore[return-value]

    def report(self, proposal_id: str, *, approver: str, sha384_hex: str, approvers: frozenset[str],
               now: datetime) -> Proposal:
        def change(data: dict) -> Proposal:
            d = data["proposals"].get(proposal_id)
            if d is None:
                raise KeyError(f"no measurement proposal {proposal_id!r}")
            p = report(_from_json(d), approver=approver, sha384_hex=sha384_hex, approvers=approvers, now=now)
            data["proposals"][proposal_id] = _to_json(p)
            if p.state is ProposalState.ACCEPTED:
                if data["trusted"]:
                    data["history"].append(data["trusted"])
                data["trusted"] = {"sha384": p.measurement, "commit": p.commit, "proposal": p.id,
                                   "approvers": [r.approver for r in p.reports]}
            return p
        return self._update(change)  # type: ignore[return-value]
