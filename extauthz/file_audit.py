"""The fast path's audit through Envoy's file access log (``fast_path.audit_file``; issue 12).

The gateway rendered with ``audit_file`` (``fastpath.envoy_config.audit_file_log``) has Envoy
append one JSON line per fast-path allow (the same filter as the ALS log) to that file,
about a fifth of ALS's cost in Envoy (bench/fast_path_attribution.py). ``FileAuditTailer``
follows the file:

- each complete line is read straight into its audit row (``LineReader``: one regex, or
  ``json``, then ``EntryReader.allow_row``, the ALS rows' own definition, with EntryReader's
  caches and the seconds and addresses remembered; no protobuf per line): the same
  ``decision.allow`` event, event id and columns as the ALS entry of the same call. A line
  off Envoy's shape is read as the ``HTTPAccessLogEntry`` it stands for (``line_entry``) by
  ``EntryReader.rows``, so its refusals (principal, path, policy id and version) are the ALS
  path's. A line that is not an allow (not JSON, a field missing or wrong, text no entry can
  hold) is counted and logged with what was wrong, and the tailer goes on; a partial last
  line waits for the rest.
- the events are written with ``SpooledAuditWriter.write_rows`` (durable in the store or the
  spool) and only then the read position (file identity + offset) advances, kept in the
  audit spool's SQLite database (table ``fast_path_audit_file``, fsync'd). A restart resumes
  there; a crash between the two re-reads a few lines, audited once because event ids are
  derived from the entry and the spool and the store ignore ids they hold.
- rotation (the path now names another file, and Envoy has written to it: it reopened its
  log): the old file is read to its end, then the new one from its start. The old file is
  found again by its identity in the same directory after a restart. Truncation (the file is
  shorter than the position): read again from the start; what was appended and truncated
  between two polls is lost (as with ``copytruncate`` rotation anywhere; rename instead).

Counted in the same metric as ALS: ``rpcauthz_fast_path_entries_total{result}``. One process
tails a file at a time (``take_turn``: the workers of ``workers > 1`` share the spool), so each
line is counted once; another takes over, at the saved position, when it stops.

Only Envoy may write the file: a writer could forge audit records of allows, never an allow.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import operator
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from .access_log import POLICY_KEY, RBAC_NAMESPACE, RESULT_KEY, EntryCounts, EntryReader, MalformedEntry
from .config import Settings
from .metrics import Metrics
from .spooled_audit import SpooledAuditWriter

log = logging.getLogger("extauthz.fast_path")


def _warn_if_others_may_write(name: str, st: os.stat_result) -> None:
    """Log an error if any user may write the audit file ``name`` (``st``) or create files in
    its directory: such a user could forge audit records of allows (never an allow). It is
    still read: Envoy's real allows must be audited either way."""
    with contextlib.suppress(OSError):
        folder = os.path.dirname(os.path.abspath(name))
        for what, path, mode in (("file", name, st.st_mode), ("directory", folder, os.stat(folder).st_mode)):
            if mode & stat.S_IWOTH:
                log.error("fast-path audit %s %s is writable by every user (mode %o): anyone on this host "
                          "can forge audit records of allows; only Envoy's user (and this server's) may "
                          "write it", what, path, stat.S_IMODE(mode))

#: The keys of a line (``fastpath.envoy_config.audit_file_fields``).
LINE_KEYS = ("start_time", "principal", "path", "fast_path", "policy_id", "request_id", "stream_id",
             "downstream_remote_address", "node")
#: Most bytes read (and written as one batch) at a time; also the longest line taken.
READ_BYTES = 1 << 20
#: A line's values, in the order ``_ENVOY_LINE`` gives them (``start_time`` last but one).
_FIELDS = operator.itemgetter("downstream_remote_address", "node", "path", "policy_id", "principal", "request_id",
                              "start_time", "stream_id", "fast_path")
#: A character of a JSON string that is itself (not a quote, backslash or control character).
_PLAIN_CHAR = r'[^"\\\x00-\x1f]'
_PLAIN = f"({_PLAIN_CHAR}*)"
#: A line exactly as Envoy 1.40 writes a fast-path allow (``audit_file_fields``: keys sorted,
#: compact; ``start_time`` ``%Y-%m-%dT%H:%M:%S.%6fZ``), every value a plain string: its groups
#: are the values ``json`` would read (``_FIELDS`` order, the start time as its second and its
#: six digits), at about half the CPU. Other lines are read with ``json`` (``_json_values``).
_ENVOY_LINE = re.compile(
    rf'\{{"downstream_remote_address":"{_PLAIN}","fast_path":"allowed","node":"{_PLAIN}","path":"{_PLAIN}",'
    rf'"policy_id":"{_PLAIN}","principal":"{_PLAIN}","request_id":"{_PLAIN}",'
    rf'"start_time":"({_PLAIN_CHAR}{{19}})\.([0-9]{{6}})Z","stream_id":"{_PLAIN}"\}}')
#: Lines turned into rows between two hand-backs to the event loop.
LINE_CHUNK = 256
_decode = json.JSONDecoder().decode
#: One JSON value at an index of a string, and where it ends (``decode`` without its checks).
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set in __init__, not in typeshed


def line_entry(line: bytes, settings: Settings) -> tuple[accesslog_pb2.HTTPAccessLogEntry, str]:
    """The access log entry one line records, and the Envoy node that wrote it;
    ``MalformedEntry`` (saying why) for a line that is not one. Fields are only carried
    over: ``access_log.read_entry`` checks them as it checks an ALS entry's."""
    try:
        d = _decode(line.decode())
    except ValueError as e:  # UnicodeDecodeError is one
        raise MalformedEntry(f"not a JSON line: {e}") from None
    if not isinstance(d, dict):
        raise MalformedEntry(f"not a JSON object but {type(d).__name__}")
    node = d.get("node")
    if not isinstance(node, str) or not node:
        raise MalformedEntry("no node: the line does not say which Envoy wrote it")
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    start = d.get("start_time")
    if start is not None:
        try:
            if not isinstance(start, str):
                raise ValueError(start)
            common.start_time.FromDatetime(datetime.fromisoformat(start))
        except (ValueError, OverflowError):
            raise MalformedEntry(f"start_time {str(start)[:40]!r} is not a time") from None
    fm = common.metadata.filter_metadata
    for key, field in ((RESULT_KEY, "fast_path"), (POLICY_KEY, "policy_id")):
        value = d.get(field)
        if isinstance(value, str):  # the usual case, set directly (Struct.update is slower)
            fm[RBAC_NAMESPACE].fields[key].string_value = value
        elif value is not None:
            fm[RBAC_NAMESPACE].update({key: value})
    principal = d.get("principal")
    if principal is not None:
        ident = settings.identity
        payload = fm[ident.metadata_namespace].fields[ident.payload_key].struct_value
        if isinstance(principal, str):
            payload.fields[ident.principal_claim].string_value = principal
        else:
            payload.update({ident.principal_claim: principal})
    for key, set_to in (("path", "path"), ("request_id", "request_id")):
        value = d.get(key)
        if isinstance(value, str):
            setattr(entry.request, set_to, value)
    stream_id = d.get("stream_id")
    if isinstance(stream_id, str):
        common.stream_id = stream_id
    remote = d.get("downstream_remote_address")
    if isinstance(remote, str):
        host, sep, port = remote.rpartition(":")
        sa = common.downstream_remote_address.socket_address
        if sep and port.isdigit() and int(port) < 65536:
            sa.address, sa.port_value = host.strip("[]"), int(port)
        else:
            sa.address = remote
    return entry, node


def _text(line: bytes) -> str | None:
    try:
        return line.decode()
    except UnicodeDecodeError:
        return None


def _json_values(text: str) -> tuple[str, ...] | None:
    """A line's values as ``_ENVOY_LINE`` gives them, for a line in Envoy's shape written
    otherwise (keys in another order, escapes); None if it is not in that shape. Raises for
    some lines that are not (not JSON, a key missing, a value not a string)."""
    d, end = _scan(text, 0)  # decode without its whitespace and end checks:
    if end != len(text):  # ... more after the JSON: read the old way
        return None
    values = _FIELDS(d)  # KeyError: a key missing
    "".join(values)  # TypeError: a value that is not a string
    remote, node, path, policy_id, principal, request_id, start, stream_id, result = values
    frac = start[20:26]
    if result != "allowed" or len(start) != 27 or start[19] != "." or start[26] != "Z" or not (
            frac.isascii() and frac.isdigit()):
        return None
    return remote, node, path, policy_id, principal, request_id, start[:19], frac, stream_id


#: Most start-time seconds and downstream addresses one ``LineReader`` remembers (then it starts afresh).
_LINE_CACHE_MAX = 4096


class LineReader(EntryReader):
    """Reads the audit file's lines straight into rows (``lines``), without an
    ``HTTPAccessLogEntry`` per line: a line in Envoy's shape (``audit_file_fields``: every
    key a string, ``start_time`` as ``%Y-%m-%dT%H:%M:%S.%6fZ``, ``fast_path`` allowed) is read
    with one regex when it is exactly as Envoy writes it (``_ENVOY_LINE``), else with ``json``,
    and goes to ``EntryReader.allow_row`` (the ALS rows' one definition, with its caches of
    paths, policies and principals), its second and address remembered. Any other line (not
    JSON or not UTF-8, a key missing or of another type, a refused value, an address that is
    not ``ip:port``) is read as before: ``line_entry`` + ``EntryReader.rows``, so its row or
    its refusal and message are exactly the ALS path's."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        #: ``start_time[:19]`` (to the second) -> the Timestamp's seconds.
        self._times: dict[str, int] = {}
        #: ``downstream_remote_address`` -> ``address:port`` as ``entry_event_id`` hashes it.
        self._remotes: dict[str, str] = {}

    def _actor(self, principal: str) -> str | None:
        """As ``EntryReader._actor``, for text ``line_entry`` could set: not a principal with
        a lone surrogate (JSON's ``\\ud800``), which protobuf refuses (read below, and refused)."""
        principal.encode()  # raises UnicodeEncodeError: not this way
        return super()._actor(principal)

    def _time(self, second: str, frac: str) -> int | None:
        """The seconds of the start time ``<second>.<frac>Z`` (``frac`` six ASCII digits) as
        ``line_entry`` sets them (``FromDatetime(fromisoformat(...))``), remembered by
        ``second`` (the fraction is under a second); None if it is no time."""
        try:
            ts = Timestamp()
            ts.FromDatetime(datetime.fromisoformat(f"{second}.{frac}Z"))
        except (ValueError, OverflowError):
            return None
        if ts.nanos != int(frac) * 1000:  # not read as its microseconds: read below as before
            return None
        if len(self._times) >= _LINE_CACHE_MAX:
            self._times.clear()
        self._times[second] = ts.seconds
        return ts.seconds

    def _remote(self, remote: str) -> str | None:
        """``address:port`` of ``remote`` as ``line_entry`` sets it and ``entry_event_id``
        hashes it, for an ``ip:port`` (``[ip6]:port``); None for anything else."""
        host, sep, port = remote.rpartition(":")
        if not (sep and port.isascii() and port.isdigit() and int(port) < 65536):
            return None
        if len(self._remotes) >= _LINE_CACHE_MAX:
            self._remotes.clear()
        text = self._remotes[remote] = f"{host.strip('[]')}:{int(port)}"
        return text

    def lines(self, lines: Sequence[bytes], first: int, rows: list[tuple[str, str]],
              refused: Callable[[int, str, Exception], None], columns: list[tuple[Any, ...]] | None = None) -> int:
        """Append to ``rows`` (event id, spool row) of each complete line of ``lines`` (without
        their newlines; the first at file offset ``first``) that is a fast-path allow, and to
        ``columns``, if given, their store columns; ``refused(offset, request id or "-", error)``
        for each other. Blank lines are skipped. Returns the lines received (not blank)."""
        try:  # one decode for the lines together (a newline is never inside a UTF-8 character)
            texts: Sequence[str | None] = b"\n".join(lines).decode().split("\n")
        except UnicodeDecodeError:
            texts = [_text(line) for line in lines]  # the one that is not UTF-8 is read below, and refused
        match, allow_row, with_columns = _ENVOY_LINE.fullmatch, self.allow_row, columns is not None
        constants, principals, times, remotes = self._constants, self._principals, self._times, self._remotes
        received, at = 0, first
        for line, text in zip(lines, texts, strict=True):
            where = at
            at += len(line) + 1
            got: tuple[str, str, tuple[Any, ...]] | None = None
            if text is not None:
                try:  # Envoy's shape; anything off it (an exception included) is read below
                    m = match(text)
                    values = m.groups() if m is not None else _json_values(text)
                    if values is not None:
                        remote, node, path, policy_id, principal, request_id, second, frac, stream_id = values
                        sec = times.get(second)
                        if sec is None:
                            sec = self._time(second, frac)
                        actor = principals.get(principal) or self._actor(principal)
                        constant = (constants.get((path, policy_id)) or self._constant(path, policy_id)) if policy_id else None
                        address = remotes.get(remote) or self._remote(remote)
                        if node and request_id and sec is not None and actor is not None and constant is not None \
                                and address is not None:
                            got = allow_row(constant, node, request_id, sec, int(frac) * 1000, address, path, stream_id,
                                            principal, actor, with_columns)
                except Exception:  # noqa: BLE001 (read below, which says what is wrong)
                    got = None
            if got is None:
                if not line.strip():
                    continue
                got = self._line(line, where, refused, with_columns)
            received += 1
            if got is not None:
                rows.append(got[:2])
                if columns is not None:
                    columns.append(got[2])
        return received

    def _line(self, line: bytes, where: int, refused: Callable[[int, str, Exception], None],
              with_columns: bool) -> tuple[str, str, tuple[Any, ...]] | None:
        """One line off Envoy's shape, read as an ALS entry: its row, or None (refused)."""
        try:
            entry, node = line_entry(line, self._settings)
        except Exception as e:  # noqa: BLE001 (MalformedEntry; or a value protobuf refuses: refused alone)
            refused(where, "-", e)
            return None
        columns: list[tuple[Any, ...]] | None = [] if with_columns else None
        rows = self.rows([entry], node, lambda entry, e: refused(where, entry.request.request_id or "-", e), columns)
        if not rows:
            return None
        return rows[0][0], rows[0][1], columns[0] if columns else ()


class _Position:
    """The read position (file identity + offset) per audit file, in the spool's database."""

    def __init__(self, db_path: str) -> None:
        self._lock = threading.Lock()  # close() may come while a save still runs in its thread
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS fast_path_audit_file (path TEXT PRIMARY KEY, "
                         "dev INTEGER NOT NULL, ino INTEGER NOT NULL, offset INTEGER NOT NULL, "
                         "updated_at REAL NOT NULL)")

    def load(self, path: str) -> tuple[int, int, int] | None:
        with self._lock:
            row = self._db.execute("SELECT dev, ino, offset FROM fast_path_audit_file WHERE path = ?",
                                   (path,)).fetchone()
        return (int(row[0]), int(row[1]), int(row[2])) if row else None

    def save(self, path: str, dev: int, ino: int, offset: int) -> None:
        with self._lock:
            self._db.execute("INSERT INTO fast_path_audit_file (path, dev, ino, offset, updated_at) "
                             "VALUES (?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET dev = excluded.dev, "
                             "ino = excluded.ino, offset = excluded.offset, updated_at = excluded.updated_at",
                             (path, dev, ino, offset, time.time()))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class FileAuditTailer:
    """Follows ``fast_path.audit_file`` into the audit (module docstring)."""

    def __init__(self, settings: Settings, audit: SpooledAuditWriter, metrics: Metrics, db_path: str) -> None:
        assert settings.fast_path.audit_file is not None
        self._settings, self._audit = settings, audit
        self.path = os.path.abspath(os.path.expanduser(settings.fast_path.audit_file))
        self._positions = _Position(db_path)
        self._lock_path = f"{db_path}.audit-file.lock"
        self._lock_fd: int | None = None
        self._counts = EntryCounts(metrics)
        self._reader = LineReader(settings)
        self._file: Any = None  # the open file being read (binary)
        self._ident: tuple[int, int] = (0, 0)
        self.offset = 0
        #: Skipping the rest of a line longer than ``READ_BYTES`` (already counted malformed).
        self._skipping = False
        self._restored = False

    # --- position ------------------------------------------------------------------------------

    def _open(self, name: str, offset: int) -> bool:
        try:
            f = open(name, "rb")  # noqa: SIM115 (held across polls)
        except FileNotFoundError:
            return False
        st = os.fstat(f.fileno())
        if self._file is not None:
            self._file.close()
        self._file, self._ident, self.offset, self._skipping = f, (st.st_dev, st.st_ino), offset, False
        _warn_if_others_may_write(name, st)
        return True

    def _find(self, dev: int, ino: int) -> str | None:
        """The file with identity (dev, ino) in the audit file's directory (a rotated copy)."""
        with contextlib.suppress(OSError), os.scandir(os.path.dirname(self.path)) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    st = e.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == (dev, ino):
                        return e.path
        return None

    def restore(self) -> None:
        """Open the file where the last run left it (blocking)."""
        saved = self._positions.load(self.path)
        if saved is None:
            if self._open(self.path, 0):
                log.info("fast-path audit file %s: read from its start (no position saved)", self.path)
            return
        dev, ino, offset = saved
        name = self._find(dev, ino)
        if name is None:
            log.error("fast-path audit file %s: the file read up to offset %d is gone (rotated away and "
                      "removed while this server was down?); entries it got after that are NOT audited",
                      self.path, offset)
            self._open(self.path, 0)
            return
        if self._open(name, offset):
            size = os.fstat(self._file.fileno()).st_size
            if size < offset:
                log.warning("fast-path audit file %s was truncated (%d bytes, read up to %d): read from its start",
                            name, size, offset)
                self.offset = 0
            log.info("fast-path audit file %s: resumed at offset %d", name, self.offset)

    # --- reading -------------------------------------------------------------------------------

    def _read(self) -> bytes:
        self._file.seek(self.offset)
        data: bytes = self._file.read(READ_BYTES)
        return data

    def _switch_if_moved(self) -> bool:
        """At the end of the open file: follow a rotation or a truncation (blocking)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # rotated, not yet reopened by Envoy: it may still write to the old one
        if (st.st_dev, st.st_ino) != self._ident:
            if st.st_size == 0:
                return False  # Envoy may not have reopened yet: the old file may still grow
            if b"\n" in self._read():  # Envoy wrote this before it reopened: read it first
                return True
            self._partial_left("rotated")
            old = self._ident
            self._open(self.path, 0)
            self._positions.save(self.path, *self._ident, 0)
            log.info("fast-path audit file %s rotated: the old file (inode %d) is read to its end, "
                     "following the new one", self.path, old[1])
            return True
        if st.st_size < self.offset:
            log.warning("fast-path audit file %s was truncated (%d bytes, read up to %d): read from its start; "
                        "lines appended and truncated since the last read are not audited",
                        self.path, st.st_size, self.offset)
            self._partial_left("truncated")
            self.offset, self._skipping = 0, False
            self._positions.save(self.path, *self._ident, 0)
            return True
        return False

    def _partial_left(self, why: str) -> None:
        """A file is left with a line that never ended (counted, logged)."""
        rest = self._read()
        if rest and not self._skipping:
            self._counts.received.inc()
            self._counts.malformed.inc()
            log.error("fast-path audit file %s %s with an unfinished last line at offset %d (%d bytes): not "
                      "audited", self.path, why, self.offset, len(rest))

    async def poll_once(self) -> bool:
        """Audit what was appended since the last poll, up to ``READ_BYTES``; whether it
        moved on (more may be waiting)."""
        if self._file is None:
            if self._restored:
                await asyncio.to_thread(self._open, self.path, 0)
            else:
                await asyncio.to_thread(self.restore)
                self._restored = True
            if self._file is None:
                return False
        data = await asyncio.to_thread(self._read)
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) < READ_BYTES:  # at the end, or a partial last line (it waits for the rest)
                return await asyncio.to_thread(self._switch_if_moved)
            if not self._skipping:  # a line longer than READ_BYTES: refused, skipped to its end
                self._counts.received.inc()
                self._counts.malformed.inc()
                log.error("fast-path audit file %s: a line at offset %d is longer than %d bytes: not audited",
                          self.path, self.offset, READ_BYTES)
            self._skipping = True
            await self._advance(len(data))
            return True
        lines = data[:end].split(b"\n")
        first = self.offset
        if self._skipping:
            first += len(lines[0]) + 1
            lines, self._skipping = lines[1:], False
        await self._audit_lines(lines, first)
        await self._advance(end + 1)
        return True

    async def _audit_lines(self, lines: list[bytes], first: int) -> None:
        rows: list[tuple[str, str]] = []
        columns: list[tuple[Any, ...]] | None = [] if self._audit.wants_columns else None
        #: Counted and logged once the batch is written (a batch whose write failed is read again).
        refusals: list[tuple[int, str, Exception]] = []
        received, at = 0, first
        for n in range(0, len(lines), LINE_CHUNK):
            if n:
                await asyncio.sleep(0)  # let Checks run between chunks
            chunk = lines[n:n + LINE_CHUNK]
            received += self._reader.lines(chunk, at, rows, lambda *refusal: refusals.append(refusal), columns)
            at += sum(map(len, chunk)) + len(chunk)
        if rows and self._settings.audit.allows:
            # Durable before the position moves past them; raises rather than drops (retried).
            await self._audit.write_rows(rows, columns, retryable=True)
            self._counts.audited.inc(len(rows))
        elif rows:
            self._counts.not_audited.inc(len(rows))
        self._counts.received.inc(received)
        for where, rid, why in refusals:
            self._refused(where, rid, why)

    async def _advance(self, by: int) -> None:
        self.offset += by
        dev, ino = self._ident
        await asyncio.to_thread(self._positions.save, self.path, dev, ino, self.offset)

    def _refused(self, offset: int, rid: str, e: Exception) -> None:
        kind = self._counts.refused(e)
        if kind == "not_fast_path":
            log.error("fast-path audit file %s, line at offset %d (request %s) is not a fast-path allow (%s): "
                      "not audited; check the gateway's file access log filter", self.path, offset, rid, e)
        elif kind == "malformed":
            log.error("malformed line in the fast-path audit file %s at offset %d (request %s): %s",
                      self.path, offset, rid, e)
        else:  # a bug on one line must not stop the tailer or lose the others
            log.error("could not read the line at offset %d of the fast-path audit file %s", offset, self.path,
                      exc_info=e)

    def take_turn(self) -> bool:
        """Whether this process now holds the audit file: one process tails it at a time (the
        workers of ``workers > 1`` share the spool and its position), the others wait their
        turn (``flock`` on ``<spool>.audit-file.lock``; a dead holder's lock is released)."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def run(self) -> None:
        """Follow the file until cancelled (once this process holds it, ``take_turn``); an
        error is logged and retried (the position only moves past lines whose events are
        durable)."""
        poll = self._settings.fast_path.audit_file_poll_s
        waiting = False
        while not self.take_turn():
            if not waiting:
                log.info("fast-path audit file %s: another process tails it; this one takes over if it stops",
                         self.path)
                waiting = True
            await asyncio.sleep(poll)
        log.info("fast path on: fast-path allows are audited from Envoy's file access log %s", self.path)
        said, said_at = "", 0.0  # the same failure is logged once a minute, not at every poll
        while True:
            try:
                moved = await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if str(e) != said or time.monotonic() - said_at >= 60:
                    log.exception("fast-path audit file %s: could not audit the lines at offset %d; retrying",
                                  self.path, self.offset)
                    said, said_at = str(e), time.monotonic()
                moved = False
            if not moved:
                await asyncio.sleep(poll)

    def close(self) -> None:
        """Close the file and the position database (after ``run`` is cancelled)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._positions.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock: another process's turn
            self._lock_fd = None


__all__ = ["LINE_KEYS", "READ_BYTES", "FileAuditTailer", "LineReader", "line_entry"]
