"""The fast path's audit (issue 12): Envoy's access log of fast-path allows becomes exactly one
decision audit event per call, through the same spool as Checks.

Through real Envoy with the fast-path gateway as shipped (``render_gateway(fast_path=True)``:
RBAC over ADS from the server's publisher, ``with_fast_path``'s access log), real mTLS, the real
server on PostgreSQL: once Envoy holds a policy compiled with both demo services' modes (the M
refused calls teach the server the modes; the test waits for the ACK of such a policy, not for
a time), N calls the policy allows give N ``fast_path.allow`` events and no Check; the M calls
it does not allow go to ext_authz and are audited by their Check as before; Envoy's count of
fast-path allows equals ours; a redelivered entry is audited once; kill -9 after the entries
were taken loses none; what Envoy does while the server is away is measured.
"""
from __future__ import annotations

import collections
import json
import re
import signal
import time

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from google.protobuf import struct_pb2

from extauthz.access_log import AccessLogService, MalformedEntry, NotFastPath, entry_event_id, read_entry
from extauthz.audit_spool import AuditSpool
from extauthz.config import Settings
from extauthz.envoy_stats import EnvoyAllowedCollector
from extauthz.metrics import Metrics
from extauthz.spooled_audit import SpooledAuditWriter
from fastpath.compile import RESOURCE_NAME
from fastpath.envoy_config import LOG_NAME
from fastpath.xds import ECDS_TYPE
from policy import Grant, Role, StoreError
from policy.stores import open_store
from tests.support.gateway_harness import ACCOUNTS, LEDGER, GatewayStack, metrics_sample, metrics_text

LIST = f"/{ACCOUNTS}/ListAccounts"              # ENGINEERS_WITHOUT_APPROVAL
READ = f"/{ACCOUNTS}/ReadAccount"               # ENGINEERS_WITH_APPROVAL: never on the fast path
BALANCE = f"/{LEDGER}/GetBalance"               # ENGINEERS_WITHOUT_APPROVAL
#: Envoy 1.40 puts a dot after shadow_rules_stat_prefix in stat names (not in metadata keys).
STAT = "http.engineers_grpc.rbac.rpcauthz_fast_.shadow_allowed"


# --- one entry, read ---------------------------------------------------------------------------

def _entry(*, path: str = LIST, sub: str | None = "alice", result: str | None = "allowed",
           policy: str | None = "v7/engineers", request_id: str = "rid-1", start: float = 1_700_000_000.25,
           port: int = 40000) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.path, e.request.request_id = path, request_id
    e.common_properties.start_time.FromNanoseconds(int(start * 1e9))
    e.common_properties.downstream_remote_address.socket_address.address = "127.0.0.1"
    e.common_properties.downstream_remote_address.socket_address.port_value = port
    md = e.common_properties.metadata.filter_metadata
    if sub is not None:
        payload = struct_pb2.Struct()
        payload.update({"sub": sub, "iss": "x"})
        md["envoy.filters.http.jwt_authn"].fields["jwt_payload"].struct_value.CopyFrom(payload)
    rbac = {}
    if result is not None:
        rbac["rpcauthz_fast_shadow_engine_result"] = result
    if policy is not None:
        rbac["rpcauthz_fast_shadow_effective_policy_id"] = policy
    if rbac:
        md["envoy.filters.http.rbac"].update(rbac)
    return e


def _message(*entries, log_name: str | None = LOG_NAME, node: str = "envoy-1") -> als_pb2.StreamAccessLogsMessage:
    m = als_pb2.StreamAccessLogsMessage(
        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=list(entries)))
    if log_name is not None:
        m.identifier.log_name, m.identifier.node.id = log_name, node
    return m


SETTINGS = Settings(store_url="sqlite:///unused.db")


def test_an_entry_reads_as_the_allow_envoy_made():
    allow = read_entry(_entry(), SETTINGS, "envoy-1")
    ev = allow.audit_event()
    assert (ev.kind, ev.actor, ev.service, ev.method, ev.outcome) == \
        ("decision.allow", "alice", ACCOUNTS, "ListAccounts", "allow")
    assert ev.detail["rule"] == "fast_path.allow"
    assert ev.detail["decided_rule"] == "engineers_without_approval.engineer"
    assert ev.detail["mode"] == "ENGINEERS_WITHOUT_APPROVAL"
    assert (ev.detail["policy_id"], ev.detail["policy_version"]) == ("v7/engineers", "7")
    assert ev.detail["envoy_request_id"] == "rid-1"
    assert ev.at.timestamp() == pytest.approx(1_700_000_000.25)
    assert "fast path" in ev.reason and "v7/engineers" in ev.reason
    # fastpath/compile.py's contributors policy covers every service: no service in its id.
    c = read_entry(_entry(path=f"/{LEDGER}/PostEntry", policy="v12/contributors"), SETTINGS, "")
    assert (c.kind, c.policy_version, c.audit_event().detail["mode"]) == \
        ("contributors", "12", "CONTRIBUTORS_WITHOUT_APPROVAL")


def test_the_server_takes_the_log_the_gateway_is_rendered_with():
    assert Settings(store_url="sqlite:///x.db").fast_path.log_name == LOG_NAME


def test_the_event_id_is_the_entrys_own():
    a = entry_event_id(_entry(), "envoy-1")
    assert re.fullmatch(r"[0-9a-f]{32}", a)
    assert a == entry_event_id(_entry(), "envoy-1")  # the same entry again: the same id
    # A client that reuses an x-request-id does not hide its second call behind the first.
    assert a != entry_event_id(_entry(start=1_700_000_000.26), "envoy-1")
    assert a != entry_event_id(_entry(port=40001), "envoy-1")
    assert a != entry_event_id(_entry(), "envoy-2")
    assert a[:12] < entry_event_id(_entry(start=1_700_000_001), "envoy-1")[:12]  # time-ordered


@pytest.mark.parametrize(("entry", "error", "says"), [
    (_entry(result="denied"), NotFastPath, "'denied'"),
    (_entry(result=None, policy=None), NotFastPath, "None"),
    (_entry(sub=None), MalformedEntry, "no verified identity"),
    (_entry(sub=""), MalformedEntry, "empty"),
    (_entry(policy=None), MalformedEntry, "which policy allowed the call is unknown"),
    (_entry(policy="engineers"), MalformedEntry, "is not v<version>/engineers"),
    (_entry(policy=f"v1/contributors/{LEDGER}"), MalformedEntry, "is not v<version>/engineers"),
    (_entry(policy="v1.empty.2/engineers"), MalformedEntry, "is not v<version>/engineers"),
    (_entry(path="/not a/path"), MalformedEntry, "names no valid service"),
    (_entry(request_id=""), MalformedEntry, "no x-request-id"),
])
def test_entries_that_cannot_be_audited_say_why(entry, error, says):
    with pytest.raises(error, match=re.escape(says)):
        read_entry(entry, SETTINGS, "")


def test_the_batched_reader_gives_exactly_read_entrys_events_and_refusals():
    """``EntryReader.rows`` (the service's one pass per message, with its caches) gives, entry by
    entry, the event ``read_entry`` + ``audit_event`` gives, encoded as ``event_json`` would, and
    refuses what it refuses with the same exception and message; a bug on one entry is refused
    alone."""
    from extauthz.access_log import EntryReader, event_columns
    from extauthz.audit_spool import event_from_json, event_json, is_canonical

    good = [_entry(request_id=f"r{i}", port=40000 + i, sub=sub) for i, sub in
            enumerate(["alice", 'b"o\\b\u00e9\u2028', "alice", "x" * 256])]
    good += [_entry(path=f"/{LEDGER}/PostEntry", policy="v12/contributors", request_id='q"1'),
             _entry(start=1_700_000_000.0, request_id="whole-second"), _entry(start=1.000001, request_id="1970"),
             _entry(sub="alice\n", request_id="newline")]  # whatever identity says of it, the same here
    bad = [_entry(result="denied"), _entry(result=None, policy=None), _entry(sub=None), _entry(sub=""),
           _entry(sub="x" * 257), _entry(sub="a b"), _entry(policy=None), _entry(policy="engineers"),
           _entry(policy="v1.empty.2/engineers"), _entry(path="/not a/path"), _entry(request_id=""),
           _entry(result="allowed", policy="v1/engineers", sub=None)]
    no_start = _entry(request_id="no-start")
    no_start.common_properties.ClearField("start_time")
    bad.append(no_start)
    not_struct = _entry(request_id="not-struct")
    not_struct.common_properties.metadata.filter_metadata["envoy.filters.http.jwt_authn"].fields[
        "jwt_payload"].string_value = "alice"
    bad.append(not_struct)
    entries = good + bad + good  # twice: the second time from the caches

    def expected(entry):
        try:
            allow = read_entry(entry, SETTINGS, "envoy-1")
        except Exception as e:  # noqa: BLE001
            return ("refused", type(e), str(e))
        return ("row", allow.event_id, allow.audit_event())

    refused: list = []
    columns: list = []
    read = EntryReader(SETTINGS).rows(entries, "envoy-1", lambda entry, e: refused.append((type(e), str(e))),
                                      columns)
    assert len(columns) == len(read)
    rows, cols = iter(read), iter(columns)
    refusals = iter(refused)
    for entry in entries:
        want = expected(entry)
        if want[0] == "refused":
            assert next(refusals) == want[1:]
            continue
        event_id, row = next(rows)
        assert event_id == want[1] == entry_event_id(entry, "envoy-1")
        assert is_canonical(row)
        assert json.loads(row) == json.loads(event_json(want[2]))
        assert next(cols) == event_columns(want[2])  # what the store gets instead, where it takes columns
        assert event_from_json(row) == want[2]
    assert next(rows, None) is None and next(refusals, None) is None
    assert len(refused) >= len(bad)  # each bad entry was refused (and "alice\n" as identity decides)

    class Broken:  # a bug reading one entry: refused alone, the others still read
        @property
        def common_properties(self):
            raise RuntimeError("boom")
        request = accesslog_pb2.HTTPAccessLogEntry().request
    refused.clear()
    assert len(EntryReader(SETTINGS).rows([good[0], Broken(), good[1]], "e", lambda entry, e: refused.append(e))) == 2
    assert [type(e) for e in refused] == [RuntimeError]


class _Store:
    """The real store, counting the audit transactions it takes; ``down`` fails them like an
    unreachable database, ``slow`` holds each one that long (then it commits)."""

    def __init__(self, store) -> None:
        self._store, self.down, self.slow, self.writes, self.columns = store, False, 0.0, [], False

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _write(self, how, events):
        if self.down:
            raise StoreError("connection refused (store away)")
        time.sleep(self.slow)
        self.writes.append(len(events))
        return how(events)

    def append_audit_json(self, events):  # the ship, and the direct write to a store without the next
        return self._write(self._store.append_audit_json, events)

    def append_audit_rows(self, rows):  # SQLite: the direct write, as columns
        self.columns = True
        return self._write(self._store.append_audit_rows, rows)


class _CountingSpool(AuditSpool):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.puts: list[int] = []

    def put(self, events, *args, rows=(), **kwargs):
        if events or rows:
            self.puts.append(len(events) + len(rows))  # the access log's events come encoded (rows)
        return super().put(events, *args, rows=rows, **kwargs)


def _messages(sizes: list[int], tag: str = "m") -> list[als_pb2.StreamAccessLogsMessage]:
    return [_message(*[_entry(request_id=f"{tag}{m}-{i}", port=40000 + i) for i in range(n)],
                     log_name=LOG_NAME if m == 0 else None)  # only a stream's first names its log
            for m, n in enumerate(sizes)]


async def _stream(service, msgs, after_each=None) -> None:
    async def it():
        for i, m in enumerate(msgs):
            yield m
            if after_each is not None:
                after_each(i)
    await service.StreamAccessLogs(it(), None)


def test_one_store_write_per_access_log_message(tmp_path):
    """Envoy sends a worker's buffered entries as one StreamAccessLogsMessage; while the store
    answers, the server writes each message straight to it in ONE transaction (its commit is
    the durability), whatever its size, before reading the next: no spool write, nothing to
    ship. With the spool forced (``direct_timeout=0``) it is one fsync'd spool write each."""
    import asyncio

    sizes = [50, 1, 600]  # 600: read in chunks (READ_CHUNK), still one write

    async def main(direct_timeout: float) -> tuple[list[int], list[int], int]:
        spool = _CountingSpool(str(tmp_path / f"spool-{direct_timeout}.db"), 10_000)
        store = _Store(open_store(f"sqlite:///{tmp_path / f'store-{direct_timeout}.db'}"))
        metrics = Metrics()
        writer = SpooledAuditWriter(store, metrics, spool, 10_000, direct_timeout=direct_timeout)
        writer.start()
        service = AccessLogService(SETTINGS, writer, metrics)
        written: list[int] = []
        try:
            # Each message is durable before the next is read.
            await _stream(service, _messages(sizes), lambda i: written.append(len(store.list_audit(limit=10_000))))
            direct_writes = list(store.writes)
            assert store.columns == bool(direct_timeout)
            await writer.close()
            return direct_writes if direct_timeout else spool.puts, written, len(store.list_audit(limit=10_000))
        finally:
            spool.close()
            store.close()

    assert asyncio.run(main(5.0)) == (sizes, [50, 51, 651], 651)  # SQLite: as columns (below)
    puts, _, total = asyncio.run(main(0.0))
    assert (puts, total) == (sizes, 651)


def _receiver(tmp_path):
    """The access log receiver on a started spooled writer (ships every 0.05 s, direct
    writes time out at 0.2 s) over a counting store and spool in ``tmp_path``:
    (spool, store, metrics, writer, service). Call inside the test's event loop."""
    spool = _CountingSpool(str(tmp_path / "spool.db"), 10_000)
    store = _Store(open_store(f"sqlite:///{tmp_path / 'store.db'}"))
    metrics = Metrics()
    writer = SpooledAuditWriter(store, metrics, spool, 10_000, replay_interval=0.05, direct_timeout=0.2)
    writer.start()
    return spool, store, metrics, writer, AccessLogService(SETTINGS, writer, metrics)


def test_a_store_down_or_slow_mid_stream_sends_the_fast_path_audit_through_the_spool(tmp_path):
    """The store fails mid-stream: that message and the next ones are fsync'd in the spool
    before the stream reads on, nothing is lost; once the store answers, the shipper ships them,
    the following messages go straight to the store again, and every event is there once. A
    store slower than ``direct_timeout`` is left for the spool too; its late commit duplicates
    nothing."""
    import asyncio

    async def main() -> None:
        spool, store, metrics, writer, service = _receiver(tmp_path)
        msgs = _messages([10, 20, 30, 40, 50])

        def after(i: int) -> None:
            if i == 0:
                assert (store.writes, spool.puts) == ([10], [])
                store.down = True
            if i == 2:  # messages 1 and 2 went to the spool, durable before message 3 was read
                assert spool.puts == [20, 30]
        try:
            await _stream(service, msgs[:3], after)
            assert metrics.registry.get_sample_value("rpcauthz_fast_path_entries_total",
                                                     {"result": "audited"}) == 60
            assert spool.stats()["depth"] == 50 and len(store.list_audit(limit=10_000)) == 10
            store.down = False
            for _ in range(200):  # the shipper's next round (every 0.05 s) empties the spool
                if spool.stats()["depth"] == 0 and writer._direct:
                    break
                await asyncio.sleep(0.05)
            assert spool.stats()["depth"] == 0
            store.writes.clear()
            await _stream(service, [_message(*msgs[3].http_logs.log_entry, log_name=LOG_NAME)])
            assert store.writes == [40] and spool.puts == [20, 30]  # straight to the store again
            # Slow: the write that times out is spooled too, and commits later: once in the store.
            store.slow = 0.5
            await _stream(service, [_message(*msgs[4].http_logs.log_entry, log_name=LOG_NAME)])
            assert spool.puts == [20, 30, 50]
            store.slow = 0.0
            for _ in range(200):
                if spool.stats()["depth"] == 0 and len(store.writes) >= 3:  # the late commit, the ship
                    break
                await asyncio.sleep(0.05)
            await writer.close()
            ids = [e.id for e in store.list_audit(limit=10_000)]
            assert len(ids) == len(set(ids)) == 150
            assert metrics.registry.get_sample_value("rpcauthz_audit_dropped_total", {"why": "spool_failed"}) is None
        finally:
            spool.close()
            store.close()

    asyncio.run(main())


def test_a_store_that_answers_slowly_keeps_the_spool_until_it_is_quick_again(tmp_path):
    """After a direct write timed out, a ship that succeeds but takes longer than
    ``direct_timeout`` per transaction does not turn the direct write back on (each batch
    would wait the whole timeout, then fall back); a quick ship does. Each event is counted
    by the path it took (``rpcauthz_fast_path_audit_writes_total``)."""
    import asyncio

    async def main() -> None:
        spool, store, metrics, writer, service = _receiver(tmp_path)
        msgs = _messages([10, 20, 30, 40, 50])

        def written(path: str) -> float:
            return metrics.registry.get_sample_value("rpcauthz_fast_path_audit_writes_total", {"path": path}) or 0

        async def shipped() -> None:
            for _ in range(200):
                if spool.stats()["depth"] == 0:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the spool was never shipped")
        try:
            await _stream(service, msgs[:1])
            assert (written("direct"), written("spool"), spool.puts) == (10, 0, [])
            store.slow = 0.5  # answers, but slower than direct_timeout
            await _stream(service, [_message(*msgs[1].http_logs.log_entry, log_name=LOG_NAME)])
            assert spool.puts == [20] and written("spool") == 20
            await shipped()  # a slow ship: it worked, but proves the store is not quick
            await asyncio.sleep(0.3)
            assert not writer._direct
            store.writes.clear()
            await _stream(service, [_message(*msgs[2].http_logs.log_entry, log_name=LOG_NAME)])
            assert spool.puts == [20, 30] and written("direct") == 10  # no direct attempt first
            await shipped()
            # Quick again: the next spooled events ship quickly, and that gives it back (an
            # empty spool's ship proves nothing, so it takes events to see it).
            store.slow = 0.0
            await _stream(service, [_message(*msgs[3].http_logs.log_entry, log_name=LOG_NAME)])
            assert spool.puts == [20, 30, 40]
            await shipped()
            for _ in range(200):
                if writer._direct:
                    break
                await asyncio.sleep(0.05)
            assert writer._direct, "a quick ship gives the direct write back"
            await _stream(service, [_message(*msgs[4].http_logs.log_entry, log_name=LOG_NAME)])
            assert (written("direct"), written("spool"), spool.puts) == (60, 90, [20, 30, 40])
            await writer.close()
            ids = [e.id for e in store.list_audit(limit=10_000)]
            assert len(ids) == len(set(ids)) == 150
        finally:
            spool.close()
            store.close()

    asyncio.run(main())


def test_how_each_access_log_stream_ended_is_counted(tmp_path):
    """How each stream ended is counted: its messages ended (``closed``: Envoy closed it or went
    away), the RPC was cancelled (a reset, this server stopping), or this server failed it
    (``error``, here: the audit cannot be written), so a stream that may have lost entries shows
    without a counter comparison; the open streams are gauged."""
    import asyncio

    from extauthz.access_log import AccessLogService
    from extauthz.metrics import Metrics

    class Writer:
        def __init__(self, fail: bool) -> None:
            self.fail, self.events = fail, 0

        def submit(self, build) -> None:
            self.events += 1

        async def acknowledged(self) -> None:
            if self.fail:
                raise OSError("spool: disk full")

    def ends(m: Metrics) -> dict[str, float]:
        return {end: m.registry.get_sample_value("rpcauthz_fast_path_als_streams_total", {"end": end}) or 0
                for end in ("closed", "cancelled", "error")}

    async def main() -> None:
        metrics = Metrics()
        released = asyncio.Event()

        async def messages(n: int, then_wait: bool = False):
            for i in range(n):
                yield _message(_entry(request_id=f"r{i}", port=40000 + i), log_name=LOG_NAME if i == 0 else None)
            if then_wait:
                await released.wait()

        ok = AccessLogService(SETTINGS, Writer(False), metrics)  # type: ignore[arg-type]
        await ok.StreamAccessLogs(messages(3), None)
        assert ends(metrics) == {"closed": 1, "cancelled": 0, "error": 0}
        # A stream left open, then broken: open while it lasts, then cancelled.
        task = asyncio.get_running_loop().create_task(ok.StreamAccessLogs(messages(1, then_wait=True), None))
        await asyncio.sleep(0.05)
        assert metrics.registry.get_sample_value("rpcauthz_fast_path_als_streams_open") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ends(metrics) == {"closed": 1, "cancelled": 1, "error": 0}
        failing = AccessLogService(SETTINGS, Writer(True), metrics)  # type: ignore[arg-type]
        with pytest.raises(OSError, match="disk full"):
            await failing.StreamAccessLogs(messages(2), None)
        assert ends(metrics) == {"closed": 1, "cancelled": 1, "error": 1}
        assert metrics.registry.get_sample_value("rpcauthz_fast_path_als_streams_open") == 0

    asyncio.run(main())


# --- the server, through Envoy -------------------------------------------------------------------

def _fast_audit(store_url: str) -> list:
    store = open_store(store_url)
    try:
        return [e for e in store.list_audit(limit=10_000) if e.detail.get("rule") == "fast_path.allow"]
    finally:
        store.close()


def _check_audit(store_url: str) -> list:
    store = open_store(store_url)
    try:
        return [e for e in store.list_audit(limit=10_000)
                if e.kind.startswith("decision.") and e.detail.get("rule") != "fast_path.allow"]
    finally:
        store.close()


def _metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text(url).splitlines():
        m = re.match(r'rpcauthz_(fast_path_entries_total\{result="(\w+)"\}|fast_path_envoy_allowed\{[^}]*\}'
                     r'|decisions_total\{[^}]*\}) ([0-9.e+]+)', line)
        if m:
            key = m.group(2) or ("envoy_allowed" if "envoy_allowed" in m.group(1) else "checks")
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def _wait(what, cond, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(0.1)


def _stack(tmp_path, pg_dsn, **extauthz) -> GatewayStack:
    """The gateway as shipped with the fast path on (the ADS policy's TTL long enough for the
    server-away part: Envoy keeps the policy while the server is dead)."""
    return GatewayStack(
        tmp_path, store_url=pg_dsn,
        grants=[Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER)],
        fast_path=True, extauthz={"fast_path.ttl_s": 60, "fast_path.modes_check_s": 0.1,
                                  "fast_path.debounce_s": 0.02, **extauthz})


def _until_envoy_knows(gw: GatewayStack, services: int) -> None:
    """Until Envoy ACKed a fast-path policy compiled with ``services`` services' modes."""
    deadline = time.monotonic() + 15
    while (gw.server_stat("fast_path", "acked_services") or 0) < services:
        assert time.monotonic() < deadline, "Envoy never got a policy with the services' modes"
        time.sleep(0.02)


def _envoy_admin(gw: GatewayStack) -> str:
    assert gw.envoy is not None
    return f"http://127.0.0.1:{gw.envoy.admin_port}"


N, M = 12, 4


@pytest.mark.envoy
@pytest.mark.postgres
@pytest.mark.slow
def test_fast_path_allows_are_audited_once_each_and_checks_as_before(tmp_path, pg_dsn):
    with _stack(tmp_path, pg_dsn) as gw:
        # M calls the fast path does not allow: ext_authz decides them, and audits them itself;
        # they also teach the server both services' modes (one of each service).
        refused = [gw.call(READ, as_="alice"), gw.call(LIST, as_="mallory"),
                   gw.call(f"/{ACCOUNTS}/UpdateLimits", as_="bob"), gw.call(f"/{LEDGER}/PostEntry", as_="bob")]
        assert [r.code for r in refused] == [grpc.StatusCode.PERMISSION_DENIED] * M, [r.render() for r in refused]
        _until_envoy_knows(gw, 2)
        for i in range(N):
            r = gw.call(LIST if i % 2 else BALANCE, as_="alice" if i % 3 else "bob")
            assert r.code is grpc.StatusCode.OK, r.render()
        # The same client x-request-id twice: still two calls, two events.
        for _ in range(2):
            r = gw.call(LIST, as_="alice", metadata=[("x-request-id", "chosen-by-the-client")])
            assert r.code is grpc.StatusCode.OK, r.render()
        n = N + 2
        events = _wait("the fast-path audit events", lambda: (lambda e: e if len(e) >= n else None)(
            _fast_audit(pg_dsn)))
        time.sleep(0.5)  # nothing more may come
        events = _fast_audit(pg_dsn)
        assert len(events) == n, [e.to_json() for e in events]
        assert len({e.id for e in events}) == n
        assert collections.Counter((e.actor, e.method) for e in events) == collections.Counter(
            [("alice" if i % 3 else "bob", "ListAccounts" if i % 2 else "GetBalance") for i in range(N)]
            + [("alice", "ListAccounts")] * 2)
        assert gw.extauthz is not None
        compiled: set[str] = set()  # the labels of the parts the server published, from its log
        for labels in re.findall(r"new labels ([0-9,]+)\)", gw.extauthz.output()):
            compiled.update(labels.split(","))
        for e in events:
            m = re.fullmatch(r"v(\d+)/engineers", e.detail["policy_id"])
            assert m and (e.kind, e.outcome, e.detail["policy_version"]) == ("decision.allow", "allow", m[1])
            assert m[1] in compiled, (m[1], compiled)  # a part the server compiled
        envoy_ids = [e.detail["envoy_request_id"] for e in events]
        # What Envoy does with a client's x-request-id (documented in docs/extauthz.md).
        kept_client_id = envoy_ids.count("chosen-by-the-client")
        print(f"client x-request-id kept by Envoy on {kept_client_id} of 2 calls")
        checks = _check_audit(pg_dsn)
        assert len(checks) == M  # one Check each for the M, none for the fast path
        assert {e.actor for e in checks} == {"alice", "mallory", "bob"}
        # Envoy's own count of fast-path allows and ours agree.
        stats = gw.envoy.stats(STAT)
        assert int(stats[STAT]) == n
        # ...and the gauge /metrics shows with fast_path.envoy_admin_urls reads the same number.
        admin = _envoy_admin(gw)
        fam = next(EnvoyAllowedCollector([admin, "http://127.0.0.1:9"], STAT).collect())
        assert [(s.labels, s.value) for s in fam.samples] == [({"envoy": admin}, n)]  # an Envoy away: no sample
        m = _wait("the audited counter", lambda: (lambda v: v if v.get("audited") == n else None)(
            _metrics(gw.metrics_url)))
        assert m["received"] == n and m.get("malformed", 0) == 0 and m["checks"] == M
        # Envoy's access log stream is open while Envoy runs; Envoy is killed: the stream's end
        # is counted, none stays open (a graceful stop reads the same: "closed").
        assert metrics_sample(gw.metrics_url, "rpcauthz_fast_path_als_streams_open") >= 1
        gw.envoy.signal(signal.SIGKILL)
        gw.envoy.proc.wait(10)
        _wait("the stream's end", lambda: metrics_sample(gw.metrics_url, "rpcauthz_fast_path_als_streams_open") == 0)
        ends = {end: metrics_sample(gw.metrics_url, f'rpcauthz_fast_path_als_streams_total{{end="{end}"}}')
                for end in ("closed", "cancelled", "error")}
        assert ends == {"closed": 1, "cancelled": 0, "error": 0}, ends


@pytest.mark.envoy
@pytest.mark.postgres
@pytest.mark.slow
def test_redelivery_kill_9_and_a_server_away(tmp_path, pg_dsn):
    """Through the spool (``direct_write_ms: 0``, as when the store does not answer): entries
    taken are on disk before the stream reads on, so kill -9 loses none (their store write
    waits in a 2 s batch window); a resent entry is audited once; and what Envoy does with
    fast-path allows while no server takes its access log."""
    with _stack(tmp_path, pg_dsn, **{"audit.batch_window_ms": 2000, "audit.direct_write_ms": 0}) as gw:
        assert gw.call(READ, as_="alice").code is grpc.StatusCode.PERMISSION_DENIED  # learns the mode
        _until_envoy_knows(gw, 1)
        for _ in range(N):
            assert gw.call(LIST, as_="alice").code is grpc.StatusCode.OK
        _wait("entries taken", lambda: _metrics(gw.metrics_url).get("audited") == N)
        assert gw.extauthz is not None
        gw.extauthz.signal(signal.SIGKILL)  # inside the batch window: nothing is in the store yet
        gw.extauthz.proc.wait(10)
        assert len(_fast_audit(pg_dsn)) < N, "the window was already written: the test proves nothing"

        # The server is away: fast-path calls still pass (they need no ext_authz, and Envoy keeps
        # the policy for the ADS resource's TTL)...
        away = 5
        for _ in range(away):
            assert gw.call(LIST, as_="alice").code is grpc.StatusCode.OK
        assert gw.call(READ, as_="alice").code is grpc.StatusCode.UNAVAILABLE  # ...Checks fail closed
        time.sleep(0.5)
        als = gw.envoy.stats("access_logs.grpc_access_log.")
        print("Envoy ALS stats while the server is away:", json.dumps(als, sort_keys=True))

        gw.start_extauthz()  # the same spool: the events taken before the kill are shipped now
        _wait("every event taken before kill -9", lambda: len(_fast_audit(pg_dsn)) >= N, timeout=20)
        # A new server process learns the modes afresh; Envoy reconnects its ADS stream and its
        # access log stream (on the next flush); whatever Envoy still holds arrives.
        assert gw.call(READ, as_="alice").code is grpc.StatusCode.PERMISSION_DENIED
        _until_envoy_knows(gw, 1)
        allowed_before = int(gw.envoy.stats(STAT)[STAT])
        assert gw.call(LIST, as_="alice").code is grpc.StatusCode.OK
        assert int(gw.envoy.stats(STAT)[STAT]) == allowed_before + 1, "not a fast-path allow"
        _wait("the call after the restart", lambda: _metrics(gw.metrics_url).get("audited", 0) >= 1)
        _wait("its event in the store", lambda: len(_fast_audit(pg_dsn)) >= N + 1, timeout=10)
        # Entries Envoy held while the server was away may still be on their way (Envoy's next
        # flush, then this test's 2 s batch window): count once Envoy has sent or given up on
        # every entry and the store holds the N shipped from the spool plus each one taken since.
        def settled() -> int | None:
            als = gw.envoy.stats("access_logs.grpc_access_log.")
            sent = sum(int(als.get(f"access_logs.grpc_access_log.{k}", 0))
                       for k in ("grpc_entries_flushed", "grpc_entries_flush_failed", "logs_dropped"))
            stored = len(_fast_audit(pg_dsn))
            taken = _metrics(gw.metrics_url).get("audited", 0)
            written = int(als.get("access_logs.grpc_access_log.logs_written", 0))
            return stored if sent >= written and stored == N + taken else None
        arrived_after = _wait("Envoy's held entries sent and stored", settled, timeout=15) - N - 1
        als = gw.envoy.stats("access_logs.grpc_access_log.")
        print(f"of {away} fast-path allows made while the server was away, {arrived_after} reached the audit; "
              f"Envoy ALS stats: {json.dumps(als, sort_keys=True)}")
        assert 0 <= arrived_after <= away
        # Envoy's counter vs ours: the gap is exactly what did not arrive.
        assert int(gw.envoy.stats(STAT)[STAT]) == N + away + 1

        # The same entry resent (as a replayed stream would): audited once.
        first = _fast_audit(pg_dsn)
        before = len(first)
        entry = _entry(request_id="resent", start=time.time())
        msgs = [_message(entry, entry, node="replayer"),
                _message(entry, _entry(result="denied"), _entry(sub=None), log_name=None)]
        with gw.extauthz.channel() as ch:
            als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs(iter(msgs), timeout=10)
        _wait("the resent entry", lambda: len(_fast_audit(pg_dsn)) > before, timeout=10)
        time.sleep(2.5)  # one batch window more: nothing else may arrive
        after = _fast_audit(pg_dsn)
        assert len(after) == before + 1
        m = _metrics(gw.metrics_url)
        assert m["malformed"] == 1 and m["not_fast_path"] == 1


def _ads_request():
    from envoy.service.discovery.v3 import discovery_pb2
    r = discovery_pb2.DiscoveryRequest(type_url=ECDS_TYPE, resource_names=[RESOURCE_NAME])
    r.node.id = "someone"
    return r


def _metrics_text(proc) -> str:
    import yaml
    port = yaml.safe_load(proc.config_path.read_text())["metrics"]["port"]
    return metrics_text(f"http://127.0.0.1:{port}/metrics")


@pytest.mark.postgres
def test_the_access_log_and_the_policy_are_served_only_with_the_fast_path_on_and_only_to_envoy(tmp_path, pg_dsn):
    from devstack.processes import ExtAuthzProcess, free_port
    from extauthz.dev_certs import issue_client, make_dev_certs
    from tests.support.gateway_harness import extauthz_config

    certs = make_dev_certs(tmp_path / "tls")
    issue_client(certs.directory, "intruder.rpcauthz.internal", "intruder")
    msg = _message(_entry())
    for enabled in (False, True):
        cfg = extauthz_config(port=free_port(), store_url=pg_dsn, reflection_static={},
                              extra={"fast_path.enabled": enabled})
        cfg["listen"]["tls"] = certs.server_settings()
        proc = ExtAuthzProcess(cfg, tmp_path, name=f"extauthz-{enabled}", client_tls=certs).wait_ready()
        try:
            with proc.channel() as ch:
                call = als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs
                if not enabled:
                    with pytest.raises(grpc.RpcError) as e:
                        call(iter([msg]), timeout=5)
                    assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
                    continue
                call(iter([msg]), timeout=5)
            # The right CA, another name than Envoy's: no audit records from it.
            d = certs.directory
            creds = grpc.ssl_channel_credentials(certs.ca.read_bytes(), (d / "intruder.key").read_bytes(),
                                                 (d / "intruder.crt").read_bytes())
            with grpc.secure_channel(f"127.0.0.1:{proc.port}", creds) as ch:
                with pytest.raises(grpc.RpcError) as e:
                    als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs(
                        iter([_message(_entry(request_id="forged"))]), timeout=5)
                assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert "client_names" in e.value.details()
                # Nor the fast-path policy (it lists principals and what they may call).
                with pytest.raises(grpc.RpcError) as e:
                    next(iter(ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(
                        iter([_ads_request()]), timeout=5)))
                assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert "client_names" in e.value.details() and "intruder" in e.value.details()
            # Envoy's certificate gets the policy.
            with proc.channel() as ch:
                first = next(iter(ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(
                    iter([_ads_request()]), timeout=5)))
                assert first.type_url == ECDS_TYPE and len(first.resources) == 1
            _wait("the event", lambda: len(_fast_audit(pg_dsn)) == 1)
            assert _metrics_text(proc).count("rpcauthz_refused_peers_total 2.0") == 1
        finally:
            proc.stop()
