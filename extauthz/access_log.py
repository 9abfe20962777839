"""The audit of Envoy's fast path (issue 12): allows Envoy decided without a Check.

With ``fast_path.enabled``, Envoy's RBAC filter (shadow mode, metadata namespace
``envoy.filters.http.rbac``) decides plain allows itself and ext_authz never sees them. Envoy
streams each such call to this server over its gRPC access log service (ALS,
``envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs``, an ``http_grpc`` access log
named ``fast_path.log_name`` whose filter passes only entries whose
``rpcauthz_fast_shadow_engine_result`` is ``allowed``). Each entry becomes exactly one
``decision.allow`` audit event (rule ``fast_path.allow``) through the same writer as the
Checks' events: with the spool (the default) it is fsync'd before the next message of the
stream is read.

The event id is derived from the entry (Envoy's x-request-id, the call's start time, the
Envoy node and the downstream address), so the same entry sent twice is audited once: the
spool and the store both ignore an id they already hold. The x-request-id alone is not
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
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from policy import Mode, Target
from policy.audit import AuditEvent
from policy.rules import Rule, message

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
    h = hashlib.sha256("\x00".join((
        node, entry.request.request_id, f"{start.seconds}.{start.nanos:09d}",
        f"{remote.address}:{remote.port_value}", entry.request.path, common.stream_id,
    )).encode()).hexdigest()
    ms = start.seconds * 1000 + start.nanos // 1_000_000
    return f"{ms & 0xFFFFFFFFFFFF:012x}{h[:20]}"


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


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]  # envoy ships no stubs
    """``envoy.service.accesslog.v3.AccessLogService``: fast-path allows into the audit."""

    def __init__(self, settings: Settings, audit: AuditWriter | SpooledAuditWriter, metrics: Metrics,
                 peers: PeerCheck | None = None) -> None:
        self._settings, self._audit, self._metrics, self._peers = settings, audit, metrics, peers
        c = metrics.fast_path_entries
        self._received, self._audited, self._malformed, self._not_fast, self._not_audited = (
            c.labels("received"), c.labels("audited"), c.labels("malformed"), c.labels("not_fast_path"),
            c.labels("not_audited"))
        self._open = metrics.fast_path_als_open

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
                    self._received.inc(len(msg.tcp_logs.log_entry))
                    self._malformed.inc(len(msg.tcp_logs.log_entry))
                    log.error("access log %r from %r sent %d TCP entries: the fast path logs HTTP only",
                              log_name, node, len(msg.tcp_logs.log_entry))
                continue
            self._received.inc(len(entries))
            if log_name != self._settings.fast_path.log_name:
                self._malformed.inc(len(entries))
                log.error("dropped %d access log entries of log %r from %r: only %r carries fast-path "
                          "allows (fast_path.log_name)", len(entries), log_name, node,
                          self._settings.fast_path.log_name)
                continue
            submitted = 0
            for entry in entries:
                submitted += self._take(entry, node)
            if submitted:
                # Spool first: this stream reads on only once these events are on disk.
                await self._audit.acknowledged()
                self._audited.inc(submitted)
        return als_pb2.StreamAccessLogsResponse()

    def _take(self, entry: accesslog_pb2.HTTPAccessLogEntry, node: str) -> int:
        """Submit ``entry``'s audit event; 1 if it was, 0 if it is not audited (counted, logged)."""
        try:
            allow = read_entry(entry, self._settings, node)
        except NotFastPath as e:
            self._not_fast.inc()
            log.error("access log entry %s from %r is not a fast-path allow (%s): not audited here; "
                      "check the access log filter of %r", entry.request.request_id or "-", node, e,
                      self._settings.fast_path.log_name)
            return 0
        except MalformedEntry as e:
            self._malformed.inc()
            log.error("malformed fast-path access log entry %s from %r: %s",
                      entry.request.request_id or "-", node, e)
            return 0
        except Exception:  # a bug on one entry must not end the stream or lose the others
            self._malformed.inc()
            log.exception("could not read fast-path access log entry %s from %r",
                          entry.request.request_id or "-", node)
            return 0
        if not self._settings.audit.allows:
            self._not_audited.inc()
            return 0
        self._audit.submit(allow.audit_event)
        return 1


__all__ = ["POLICY_KEY", "RBAC_NAMESPACE", "RESULT_KEY", "AccessLogService", "FastPathAllow",
           "MalformedEntry", "NotFastPath", "entry_event_id", "read_entry"]
