"""The audit of Envoy's fast path (issue 12): allows Envoy decided without a Check.

With ``fast_path.enabled``, Envoy's RBAC filter (shadow mode, metadata namespace
``envoy.filters.http.rbac``) decides plain allows itself and ext_authz never sees them. Envoy
streams each such call to this server over its gRPC access log service (ALS,
``envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs``, an ``http_grpc`` access log
named ``fast_path.log_name`` whose filter passes only entries whose
``rpcauthz_fast_shadow_engine_result`` is ``allowed``). Each entry becomes exactly one
``decision.allow`` audit event (rule ``fast_path.allow``) through the same writer as the
Checks' events: with the spool (the default) it is durable before the next message of the
stream is read. Each message is read in one pass (``EntryReader``): its entries become spool
rows directly, written in one transaction per message: straight into the store while it
answers (``SpooledAuditWriter.write_rows``: its commit is the durability), else into the
spool, shipped later.

The event id is derived from the entry (Envoy's x-request-id, the call's start time, the
Envoy node, the downstream address, the path and Envoy's stream id), so the same entry sent
twice is audited once: the spool and the store both ignore an id they already hold. The x-request-id alone is not
enough: an Envoy that does not regenerate it keeps what the client sent, and a caller could
then reuse one id to hide calls behind the first.

ALS has no acknowledgements: Envoy writes entries to the stream and forgets them. What an
entry can miss (this server down, a broken stream, Envoy killed before it flushed) is
visible by comparing ``rpcauthz_fast_path_entries_total{result="audited"}`` with Envoy's own
count of fast-path allows (docs/extauthz.md, "The fast path's audit"). Each stream's end is
counted (``rpcauthz_fast_path_als_streams_total{end}``: ``closed``, ``cancelled``, ``error``)
and the open ones gauged, so a stream that broke, and may have lost entries, shows by itself.

Only an authenticated Envoy may send entries (the same ``PeerCheck`` as Checks): an entry
is an audit record of an allow, so a forged one would be a forged audit trail.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from policy import Mode, Target
from policy.audit import AuditEvent
from policy.principals import usable_principal
from policy.rules import Rule, message
from policy.stores.sqlite import audit_row as event_columns

from .audit_spool import event_from_json, event_json
from .audit_writer import AuditWriter
from .config import Settings
from .identity import IdentityError, identity_from_metadata
from .listeners import PeerCheck
from .metrics import Metrics
from .spooled_audit import SpooledAuditWriter
from .target import BadPath, parse_path

log = logging.getLogger("extauthz.fast_path")

#: Where Envoy's RBAC filter writes its results (dynamic metadata namespace).
RBAC_NAMESPACE = "envoy.filters.http.rbac"
#: The fast path's shadow result key ("allowed" | "denied") and matched policy key, with the
#: filter's ``shadow_rules_stat_prefix: rpcauthz_fast_`` in front.
RESULT_KEY = "rpcauthz_fast_shadow_engine_result"
POLICY_KEY = "rpcauthz_fast_shadow_effective_policy_id"

#: ``v<version>/<kind>``: the policy names fastpath/compile.py gives the compiled RBAC resource
#: (``<version>`` the xDS version, digits; contributors of every service are one policy).
_POLICY_ID = re.compile(r"v(?P<version>[0-9]{1,20})/(?P<kind>engineers|contributors)")

#: The mode each policy kind stands for: only modes without approval reach the fast path.
POLICY_MODES = {"engineers": Mode.ENGINEERS_WITHOUT_APPROVAL,
                "contributors": Mode.CONTRIBUTORS_WITHOUT_APPROVAL}

#: The decide() rule the same allow has on the Check path, kept in the event's detail.
DECIDED_RULES = {"engineers": Rule.ENGINEERS_WITHOUT_APPROVAL_ENGINEER,
                 "contributors": Rule.CONTRIBUTORS_WITHOUT_APPROVAL_CONTRIBUTOR}


class MalformedEntry(Exception):
    """An access log entry that cannot be audited as a fast-path allow. The message says why."""


class NotFastPath(Exception):
    """An entry for a call Envoy's RBAC did not allow (ext_authz decided it, and audited it)."""


@dataclasses.dataclass(frozen=True, slots=True)
class FastPathAllow:
    """One call Envoy allowed on the fast path, as read from its access log entry."""

    event_id: str
    principal: str
    target: Target
    policy_id: str
    policy_version: str
    kind: str
    envoy_request_id: str
    at: datetime

    def audit_event(self) -> AuditEvent:
        """The ``decision.allow`` event, shaped like a Check's (rule ``fast_path.allow``)."""
        mode = POLICY_MODES[self.kind]
        detail: dict[str, Any] = {
            "decision_id": self.event_id, "rule": Rule.FAST_PATH_ALLOW.value, "mode": mode.name,
            "decided_rule": DECIDED_RULES[self.kind].value, "path": "fast_path",
            "policy_id": self.policy_id, "policy_version": self.policy_version,
            "envoy_request_id": self.envoy_request_id}
        reason = message(Rule.FAST_PATH_ALLOW, {"target": self.target, "policy_id": self.policy_id})
        return AuditEvent(kind="decision.allow", actor=self.principal, at=self.at,
                          service=self.target.service, method=self.target.method, outcome="allow",
                          reason=reason[:500], detail=detail, id=self.event_id)


def _string(metadata: Any, key: str) -> str | None:
    fields = metadata.fields
    if key not in fields:
        return None
    value = fields[key]
    return value.string_value if value.WhichOneof("kind") == "string_value" else None


def entry_event_id(entry: accesslog_pb2.HTTPAccessLogEntry, node: str) -> str:
    """The audit event id of ``entry``: the same for the same entry, 32 hex digits, time-ordered
    like ``pipeline.audit_event_id`` (48 bits of the call's start in milliseconds first)."""
    common = entry.common_properties
    start = common.start_time
    remote = common.downstream_remote_address.socket_address
    return event_id(node, entry.request.request_id, start.seconds, start.nanos, f"{remote.address}:{remote.port_value}",
                    entry.request.path, common.stream_id)


def event_id(node: str, request_id: str, seconds: int, nanos: int, remote: str, path: str, stream_id: str) -> str:
    """``entry_event_id`` of an entry's plain values (``remote`` as ``address:port``)."""
    h = hashlib.sha256("\x00".join((node, request_id, f"{seconds}.{nanos:09d}", remote, path, stream_id)
                                   ).encode()).hexdigest()
    return f"{(seconds * 1000 + nanos // 1_000_000) & 0xFFFFFFFFFFFF:012x}{h[:20]}"


def read_entry(entry: accesslog_pb2.HTTPAccessLogEntry, settings: Settings, node: str) -> FastPathAllow:
    """The fast-path allow ``entry`` records; ``NotFastPath`` or ``MalformedEntry`` (saying why)."""
    filter_metadata = entry.common_properties.metadata.filter_metadata
    rbac = filter_metadata[RBAC_NAMESPACE] if RBAC_NAMESPACE in filter_metadata else None
    result = _string(rbac, RESULT_KEY) if rbac is not None else None
    if result != "allowed":
        raise NotFastPath(f"{RBAC_NAMESPACE} {RESULT_KEY} is {result!r}, not 'allowed'")
    assert rbac is not None
    policy_id = _string(rbac, POLICY_KEY)
    if not policy_id:
        raise MalformedEntry(f"no {RBAC_NAMESPACE} {POLICY_KEY}: which policy allowed the call is unknown")
    parsed = _POLICY_ID.fullmatch(policy_id)
    if parsed is None:
        raise MalformedEntry(f"policy id {policy_id[:80]!r} is not v<version>/engineers or "
                             "v<version>/contributors")
    request_id = entry.request.request_id
    if not request_id:
        raise MalformedEntry("the entry has no x-request-id (request.request_id)")
    if not entry.common_properties.HasField("start_time"):
        raise MalformedEntry("the entry has no start_time")
    try:
        target = parse_path(entry.request.path, settings.max_path_length)
    except BadPath as e:
        raise MalformedEntry(str(e)) from None
    kind = parsed["kind"]
    try:
        identity = identity_from_metadata(filter_metadata, settings.identity)
    except IdentityError as e:
        raise MalformedEntry(str(e)) from None
    at = entry.common_properties.start_time.ToDatetime(tzinfo=UTC)
    return FastPathAllow(entry_event_id(entry, node), identity.principal, target, policy_id,
                         parsed["version"], kind, request_id, at)


#: Entries read between two hand-backs to the event loop (~2-3 ms of a big message).
READ_CHUNK = 256
#: Most (path, policy id) pairs and principals one reader remembers (then it starts afresh).
_CACHE_MAX = 4096


class _Constant:
    """What every entry of one (path, policy id) shares, pre-encoded: the parts of its spool
    row (``audit_spool.event_json``'s canonical form) and of its ``detail`` around the entry's
    time, event id, actor and x-request-id (``EntryReader.rows`` puts them together), and the
    plain values of its store columns."""

    __slots__ = ("detail_head", "method", "mid", "reason", "service", "tail")

    def __init__(self, target: Target, policy_id: str, version: str, kind: str) -> None:
        reason = message(Rule.FAST_PATH_ALLOW, {"target": target, "policy_id": policy_id})[:500]
        self.reason, self.service, self.method = reason, target.service, target.method
        self.mid = (f',"kind":"decision.allow","outcome":"allow","reason":{_json_str(reason)},'
                    f'"request_id":null,"service":{_json_str(target.service)},'
                    f'"method":{_json_str(target.method)},"trace_id":null,"detail":')
        self.detail_head = f'{{"decided_rule":"{DECIDED_RULES[kind].value}","decision_id":"'
        self.tail = (f',"mode":"{POLICY_MODES[kind].name}","path":"fast_path","policy_id":{_json_str(policy_id)},'
                     f'"policy_version":"{version}","rule":"{Rule.FAST_PATH_ALLOW.value}"}}')


class EntryReader:
    """Reads a message's entries straight into spool rows, one pass (``rows``): the same event,
    id and refusals as ``read_entry`` + ``FastPathAllow.audit_event`` + ``event_json``, with what
    entries share (the parsed path, the policy, the reason, the second of the start time, checked
    principals) computed once. Any entry off the common shape is read by ``read_entry`` itself,
    so refusals and their messages are exactly its own."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        ident = settings.identity
        self._ns, self._payload, self._claim = ident.metadata_namespace, ident.payload_key, ident.principal_claim
        self._constants: dict[tuple[str, str], _Constant] = {}
        self._principals: dict[str, str] = {}
        self._seconds: dict[int, str] = {}

    def _constant(self, path: str, policy_id: str) -> _Constant | None:
        parsed = _POLICY_ID.fullmatch(policy_id)
        if parsed is None:
            return None
        try:
            target = parse_path(path, self._settings.max_path_length)
        except BadPath:
            return None
        if len(self._constants) >= _CACHE_MAX:
            self._constants.clear()
        c = self._constants[(path, policy_id)] = _Constant(target, policy_id, parsed["version"], parsed["kind"])
        return c

    def _second(self, seconds: int) -> str:
        if len(self._seconds) >= 64:
            self._seconds.clear()
        text = self._seconds[seconds] = datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None).isoformat()
        return text

    def _actor(self, principal: str) -> str | None:
        """``principal`` JSON-encoded (the row's actor) if it is a usable one, remembered; else None."""
        if not usable_principal(principal):
            return None
        if len(self._principals) >= _CACHE_MAX:
            self._principals.clear()
        actor = self._principals[principal] = _json_str(principal)
        return actor

    def allow_row(self, constant: _Constant, node: str, request_id: str, seconds: int, nanos: int, remote: str,
                  path: str, stream_id: str, principal: str, actor: str, with_columns: bool,
                  ) -> tuple[str, str, tuple[Any, ...]]:
        """(event id, spool row, store columns or ``()``) of one fast-path allow in the common
        shape, from an entry's plain values (``remote`` is ``address:port``; ``actor`` the
        principal JSON-encoded): the one definition of the row both the ALS stream
        (``rows``) and the audit file (``file_audit.LineReader``) write. The id is
        ``event_id``'s."""
        ident = event_id(node, request_id, seconds, nanos, remote, path, stream_id)
        at = f"{self._seconds.get(seconds) or self._second(seconds)}.{nanos // 1000:06d}+00:00"
        detail = f'{constant.detail_head}{ident}","envoy_request_id":{_json_str(request_id)}{constant.tail}'
        row = f'{{"at":"{at}","id":"{ident}","actor":{actor}{constant.mid}{detail}}}'
        if not with_columns:
            return ident, row, ()
        return ident, row, (ident, "decision.allow", principal, at, None, constant.service, constant.method,
                            "allow", constant.reason, detail, None)

    def rows(self, entries: Sequence[accesslog_pb2.HTTPAccessLogEntry], node: str,
             refused: Callable[[accesslog_pb2.HTTPAccessLogEntry, Exception], None],
             columns: list[tuple[Any, ...]] | None = None) -> list[tuple[str, str]]:
        """(event id, spool row) of each entry that is a fast-path allow; ``refused(entry,
        error)`` for each other (``NotFastPath``, ``MalformedEntry``, or a bug reading it).
        With ``columns``, each row's store columns (``event_columns``) are appended to it too,
        in the same order."""
        out: list[tuple[str, str]] = []
        append = out.append
        add_columns = columns.append if columns is not None else None
        constants, principals = self._constants, self._principals
        ns, payload_key, claim_key = self._ns, self._payload, self._claim
        for entry in entries:
            try:
                common = entry.common_properties
                fm = common.metadata.filter_metadata
                request = entry.request
                row: str | None = None
                cols: tuple[Any, ...] = ()
                # Map .get (one lookup each, no entry added); a set string or struct is
                # non-empty, so an empty one (absent, or another kind) leaves the common shape.
                rbac, jwt = fm.get(RBAC_NAMESPACE), fm.get(ns)
                if rbac is not None and jwt is not None and common.HasField("start_time"):
                    rbac_fields = rbac.fields
                    result, policy = rbac_fields.get(RESULT_KEY), rbac_fields.get(POLICY_KEY)
                    payload = jwt.fields.get(payload_key)
                    claim = payload.struct_value.fields.get(claim_key) if payload is not None else None
                    principal = claim.string_value if claim is not None else ""
                    actor = principals.get(principal) or self._actor(principal)
                    policy_id = policy.string_value if policy is not None else ""
                    path, request_id = request.path, request.request_id
                    if result is not None and result.string_value == "allowed" and policy_id \
                            and actor is not None and request_id:
                        constant = constants.get((path, policy_id)) or self._constant(path, policy_id)
                        if constant is not None:
                            start = common.start_time
                            remote = common.downstream_remote_address.socket_address
                            event_id, row, cols = self.allow_row(
                                constant, node, request_id, start.seconds, start.nanos,
                                f"{remote.address}:{remote.port_value}", path, common.stream_id, principal, actor,
                                add_columns is not None)
                if row is None:  # off the common shape: read_entry says what it is
                    event = read_entry(entry, self._settings, node).audit_event()
                    event_id, row = event.id, event_json(event)
                    if add_columns is not None:
                        cols = event_columns(event)
                append((event_id, row))
                if add_columns is not None:
                    add_columns(cols)
            except Exception as e:  # noqa: BLE001 (refused() tells the kinds apart)
                refused(entry, e)
        return out


class EntryCounts:
    """``rpcauthz_fast_path_entries_total`` by result, as each source of fast-path entries
    (the ALS stream, the audit file) counts them."""

    __slots__ = ("audited", "malformed", "not_audited", "not_fast", "received")

    def __init__(self, metrics: Metrics) -> None:
        c = metrics.fast_path_entries
        self.received, self.audited, self.malformed, self.not_fast, self.not_audited = (
            c.labels("received"), c.labels("audited"), c.labels("malformed"), c.labels("not_fast_path"),
            c.labels("not_audited"))

    def refused(self, e: Exception) -> str:
        """Count one entry refused with ``e``; what it was: "not_fast_path" (``NotFastPath``),
        "malformed" (``MalformedEntry``) or "unreadable" (a bug reading it: counted malformed)."""
        if isinstance(e, NotFastPath):
            self.not_fast.inc()
            return "not_fast_path"
        self.malformed.inc()
        return "malformed" if isinstance(e, MalformedEntry) else "unreadable"


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]  # envoy ships no stubs
    """``envoy.service.accesslog.v3.AccessLogService``: fast-path allows into the audit."""

    def __init__(self, settings: Settings, audit: AuditWriter | SpooledAuditWriter, metrics: Metrics,
                 peers: PeerCheck | None = None) -> None:
        self._settings, self._audit, self._metrics, self._peers = settings, audit, metrics, peers
        self._counts = EntryCounts(metrics)
        self._open = metrics.fast_path_als_open
        self._reader = EntryReader(settings)

    async def StreamAccessLogs(  # noqa: N802 (gRPC name)
            self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
            context: grpc.aio.ServicerContext[als_pb2.StreamAccessLogsMessage, als_pb2.StreamAccessLogsResponse],
    ) -> als_pb2.StreamAccessLogsResponse:
        if self._peers is not None:
            why = self._peers.refusal(context)
            if why is not None:
                log.warning("refused an access log stream: %s", why)
                self._metrics.refused_peers.inc()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                     f"ext_authz takes access logs only from an authenticated Envoy: {why}")
        self._open.inc()
        # "closed": the messages ended. A graceful close by Envoy and an Envoy that went away
        # (killed, restarted, the connection broken) end them alike here (measured with Envoy
        # 1.40: SIGTERM and kill -9 both read as the end of the messages).
        end = "error"
        try:
            response = await self._stream(request_iterator)
            end = "closed"
            return response
        except asyncio.CancelledError:
            end = "cancelled"  # the RPC was cancelled: Envoy reset the stream, or this server stops
            raise
        finally:
            self._open.dec()
            self._metrics.fast_path_als_streams.labels(end).inc()
            log.log(logging.INFO if end == "closed" else logging.WARNING,
                    "an access log stream of fast-path allows ended (%s); entries Envoy had not sent, "
                    "or sent after a failure, are not audited: compare Envoy's fast-path allows with "
                    "rpcauthz_fast_path_entries_total", end, exc_info=end == "error")

    async def _stream(self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage]
                      ) -> als_pb2.StreamAccessLogsResponse:
        node, log_name = "", ""
        async for msg in request_iterator:
            if msg.HasField("identifier"):  # the first message of a stream names its Envoy and log
                node, log_name = msg.identifier.node.id, msg.identifier.log_name
            entries = msg.http_logs.log_entry
            if not entries:
                if msg.HasField("tcp_logs") and msg.tcp_logs.log_entry:
                    self._counts.received.inc(len(msg.tcp_logs.log_entry))
                    self._counts.malformed.inc(len(msg.tcp_logs.log_entry))
                    log.error("access log %r from %r sent %d TCP entries: the fast path logs HTTP only",
                              log_name, node, len(msg.tcp_logs.log_entry))
                continue
            self._counts.received.inc(len(entries))
            if log_name != self._settings.fast_path.log_name:
                self._counts.malformed.inc(len(entries))
                log.error("dropped %d access log entries of log %r from %r: only %r carries fast-path "
                          "allows (fast_path.log_name)", len(entries), log_name, node,
                          self._settings.fast_path.log_name)
                continue
            rows: list[tuple[str, str]] = []
            columns: list[tuple[Any, ...]] | None = [] if isinstance(self._audit, SpooledAuditWriter) and self._audit.wants_columns else None
            refused = functools.partial(self._refused, node=node)
            for at in range(0, len(entries), READ_CHUNK):
                if at:
                    await asyncio.sleep(0)  # let Checks run between chunks of a big message
                rows += self._reader.rows(entries[at:at + READ_CHUNK], node, refused, columns)
            if not rows:
                continue
            if not self._settings.audit.allows:
                self._counts.not_audited.inc(len(rows))
                continue
            # This stream reads on only once these events are durable (in the store or the spool).
            await self._take(rows, columns)
            self._counts.audited.inc(len(rows))
        return als_pb2.StreamAccessLogsResponse()

    async def _take(self, rows: list[tuple[str, str]], columns: list[tuple[Any, ...]] | None) -> None:
        """Write a message's events, read into spool ``rows`` (and store ``columns``), as one
        batch (one store or spool transaction) and wait until it is durable."""
        if isinstance(self._audit, SpooledAuditWriter):
            await self._audit.write_rows(rows, columns)
            return
        for _id, row in rows:  # no spool: the writer takes events
            self._audit.submit(lambda row=row: event_from_json(row))  # type: ignore[misc]
        await self._audit.acknowledged()

    def _refused(self, entry: accesslog_pb2.HTTPAccessLogEntry, e: Exception, node: str) -> None:
        kind = self._counts.refused(e)
        if kind == "not_fast_path":
            log.error("access log entry %s from %r is not a fast-path allow (%s): not audited here; "
                      "check the access log filter of %r", entry.request.request_id or "-", node, e,
                      self._settings.fast_path.log_name)
        elif kind == "malformed":
            log.error("malformed fast-path access log entry %s from %r: %s",
                      entry.request.request_id or "-", node, e)
        else:  # a bug on one entry must not end the stream or lose the others
            log.error("could not read fast-path access log entry %s from %r", entry.request.request_id or "-",
                      node, exc_info=e)


__all__ = ["POLICY_KEY", "RBAC_NAMESPACE", "RESULT_KEY", "AccessLogService", "EntryCounts", "EntryReader", "FastPathAllow",
           "MalformedEntry", "NotFastPath", "entry_event_id", "event_columns", "event_id", "read_entry"]
