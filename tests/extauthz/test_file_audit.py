"""The fast path's audit through Envoy's file access log (``fast_path.audit_file``,
extauthz/file_audit.py), without Envoy: a line reads as the ALS entry it stands for (same
event, id and refusals), and the tailer audits every complete line once across partial lines,
malformed lines, restarts, rotation (also while the server is down) and truncation."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import datetime

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from extauthz.access_log import EntryReader, MalformedEntry, NotFastPath, read_entry
from extauthz.audit_spool import AuditSpool
from extauthz.config import Settings
from extauthz.file_audit import LINE_KEYS, FileAuditTailer, LineReader, line_entry
from extauthz.metrics import Metrics
from extauthz.spooled_audit import SpooledAuditWriter
from fastpath.envoy_config import audit_file_fields
from policy.stores import open_store
from tests.support.gateway_harness import ACCOUNTS

LIST = f"/{ACCOUNTS}/ListAccounts"


def _line(i: int = 0, **over) -> bytes:
    d = {"start_time": f"2026-12-03T09:00:{i % 60:02d}.{i:06d}Z", "principal": "alice", "path": LIST,
         "fast_path": "allowed", "policy_id": "v7/engineers", "request_id": f"rid-{i}", "stream_id": f"{i}",
         "downstream_remote_address": "127.0.0.1:40000", "node": "gw-1"}
    d.update(over)
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode() + b"\n"


SETTINGS = Settings(store_url="sqlite:///unused.db")


def test_a_line_has_every_key_the_gateway_writes():
    assert set(LINE_KEYS) == set(audit_file_fields("gw-1"))
    assert set(json.loads(_line())) == set(LINE_KEYS)
    # The line the reader takes without json: these keys, sorted (as Envoy 1.40 writes them).
    import re

    from extauthz.file_audit import _ENVOY_LINE
    assert re.findall(r'"(\w+)":', _ENVOY_LINE.pattern) == sorted(audit_file_fields("gw-1"))


def test_a_line_reads_as_the_allow_envoy_made():
    entry, node = line_entry(_line(3).rstrip(), SETTINGS)
    assert node == "gw-1"
    ev = read_entry(entry, SETTINGS, node).audit_event()
    assert (ev.kind, ev.actor, ev.service, ev.method) == ("decision.allow", "alice", ACCOUNTS, "ListAccounts")
    assert (ev.detail["policy_id"], ev.detail["policy_version"], ev.detail["envoy_request_id"]) == \
        ("v7/engineers", "7", "rid-3")
    assert ev.at.isoformat() == "2026-12-03T09:00:03.000003+00:00"
    # The same line gives the same id; another stream, address or node another one.
    again, _ = line_entry(_line(3), SETTINGS)
    assert read_entry(again, SETTINGS, "gw-1").event_id == ev.id
    for other in (_line(3, stream_id="99"), _line(3, downstream_remote_address="[::1]:40000"),
                  _line(3, node="gw-2")):
        e, n = line_entry(other, SETTINGS)
        assert read_entry(e, SETTINGS, n).event_id != ev.id
    # The batched reader gives the same row.
    rows = EntryReader(SETTINGS).rows([entry], node, lambda e, x: pytest.fail(str(x)))
    assert rows[0][0] == ev.id


@pytest.mark.parametrize(("line", "error", "says"), [
    (b"{not json", MalformedEntry, "not a JSON line"),
    (b"[1]", MalformedEntry, "not a JSON object"),
    (_line(node=...), MalformedEntry, "no node"),
    (_line(start_time="yesterday"), MalformedEntry, "'yesterday' is not a time"),
    (_line(start_time=None), MalformedEntry, "no start_time"),
    (_line(principal=None), MalformedEntry, "no verified identity"),
    (_line(principal="a b"), MalformedEntry, "whitespace"),
    (_line(principal=7), MalformedEntry, "no string 'sub' claim"),
    (_line(path="/nope"), MalformedEntry, "path"),
    (_line(policy_id="v7/everyone"), MalformedEntry, "is not v<version>/engineers"),
    (_line(policy_id=None), MalformedEntry, "which policy allowed the call is unknown"),
    (_line(request_id=None), MalformedEntry, "x-request-id"),
    (_line(fast_path="denied"), NotFastPath, "'denied'"),
])
def test_lines_that_cannot_be_audited_say_why(line, error, says):
    with pytest.raises(error, match=None) as e:
        entry, node = line_entry(line, SETTINGS)
        read_entry(entry, SETTINGS, node)
    assert says in str(e.value), str(e.value)


# --- the tailer ----------------------------------------------------------------------------------

class _Env:
    """A store, a spooled writer and tailers on one audit file (``tailer()``: a new one, as
    after a restart, on the same spool database)."""

    def __init__(self, tmp_path) -> None:
        self.log = tmp_path / "fast-path-audit.log"
        self.spool_path = str(tmp_path / "spool.db")
        self.settings = Settings(store_url="sqlite:///unused.db", fast_path={"audit_file": str(self.log)})
        self.store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        self.metrics = Metrics()
        self.spool = AuditSpool(self.spool_path, 100_000)
        self.writer = SpooledAuditWriter(self.store, self.metrics, self.spool, 100_000, direct_timeout=5.0)

    def use_spool(self, spool: AuditSpool, queue_size: int = 100_000, **writer_kw) -> None:
        """Audit through ``spool`` (a test double of the spool) instead, never straight to the store."""
        self.spool.close()
        self.spool = spool
        self.writer = SpooledAuditWriter(self.store, self.metrics, spool, queue_size, direct_timeout=0, **writer_kw)

    def tailer(self) -> FileAuditTailer:
        return FileAuditTailer(self.settings, self.writer, self.metrics, self.spool_path)

    def events(self) -> list:
        return [e for e in self.store.list_audit(limit=100_000) if e.detail.get("rule") == "fast_path.allow"]

    def count(self, result: str) -> float:
        return self.metrics.fast_path_entries.labels(result)._value.get()

    def append(self, *lines: bytes, to=None) -> None:
        with open(to or self.log, "ab") as f:
            f.write(b"".join(lines))


async def _drain(t: FileAuditTailer) -> None:
    for _ in range(100):
        if not await t.poll_once():
            return
    raise AssertionError("the tailer never caught up")


def _run(tmp_path, body) -> _Env:
    env = _Env(tmp_path)

    async def main() -> None:
        env.writer.start()
        try:
            await body(env)
        finally:
            await env.writer.close()
            env.spool.close()
    asyncio.run(main())
    return env


def test_lines_are_audited_once_a_partial_line_waits_a_malformed_one_is_refused(tmp_path, caplog):
    async def body(env: _Env) -> None:
        t = env.tailer()
        await _drain(t)  # no file yet: nothing, no error
        env.append(_line(0), _line(1, node="gw-2"), b"{broken\n", _line(2, principal=None), _line(3))
        half = _line(4)
        env.append(half[:20])
        await _drain(t)
        assert sorted(e.detail["envoy_request_id"] for e in env.events()) == ["rid-0", "rid-1", "rid-3"]
        env.append(half[20:])
        await _drain(t)
        events = env.events()
        assert sorted(e.detail["envoy_request_id"] for e in events) == ["rid-0", "rid-1", "rid-3", "rid-4"]
        assert {(e.actor, e.method, e.detail["policy_id"]) for e in events} == {("alice", "ListAccounts", "v7/engineers")}
        assert (env.count("received"), env.count("audited"), env.count("malformed")) == (6, 4, 2)
        # Read in batches a node at a time: each event's id is its own line's, with its node.
        want = set()
        for ln in (_line(0), _line(1, node="gw-2"), _line(3), half):
            entry, node = line_entry(ln, SETTINGS)
            want.add(read_entry(entry, SETTINGS, node).event_id)
        assert {e.id for e in events} == want
        assert t.offset == os.path.getsize(env.log)
        t.close()
    _run(tmp_path, body)
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("not a JSON line" in s and "offset" in s for s in said), said
    assert any("no verified identity" in s and "rid-2" in s for s in said), said


def test_a_restart_resumes_where_it_was_and_a_reread_is_audited_once(tmp_path):
    async def body(env: _Env) -> None:
        t = env.tailer()
        env.append(*(_line(i) for i in range(5)))
        await _drain(t)
        t.close()
        env.append(*(_line(i) for i in range(5, 8)))
        t = env.tailer()  # the restart
        await _drain(t)
        assert len(env.events()) == 8
        assert env.count("audited") == 8  # nothing read twice
        t.close()
        # A crash after the write and before the position: the lines are read again, not audited again.
        import sqlite3
        with sqlite3.connect(env.spool_path) as db:
            db.execute("UPDATE fast_path_audit_file SET offset = 0")
        t = env.tailer()
        await _drain(t)
        assert env.count("audited") == 16
        assert len(env.events()) == 8
        t.close()
    _run(tmp_path, body)


def test_rotation_finishes_the_old_file_then_follows_the_new(tmp_path):
    async def body(env: _Env) -> None:
        t = env.tailer()
        env.append(_line(0), _line(1))
        await _drain(t)
        rotated = env.log.with_name(env.log.name + ".1")
        os.rename(env.log, rotated)
        env.append(_line(2), to=rotated)  # Envoy writes on to the old file until it reopens
        await _drain(t)
        env.log.touch()  # reopened, nothing written yet: the old file may still grow
        env.append(_line(3), _line(4)[:10], to=rotated)
        await _drain(t)
        env.append(_line(5))
        await _drain(t)
        assert sorted(e.detail["envoy_request_id"] for e in env.events()) == [f"rid-{i}" for i in (0, 1, 2, 3, 5)]
        assert env.count("malformed") == 1  # the old file's unfinished line
        # Rotated again while the server is down: the old file is found by its identity.
        env.append(_line(6))
        t.close()
        os.rename(env.log, rotated)
        env.append(_line(7), to=rotated)
        env.append(_line(8))
        t = env.tailer()
        await _drain(t)
        assert sorted(e.detail["envoy_request_id"] for e in env.events()) == \
            [f"rid-{i}" for i in (0, 1, 2, 3, 5, 6, 7, 8)]
        t.close()
    _run(tmp_path, body)


def test_a_rotated_file_removed_while_down_is_reported_and_the_new_one_read_from_its_start(tmp_path, caplog):
    """Rotated and the old file deleted while the server was down: what was left unread in it
    cannot be audited, and the server says so (an error naming the offset); the new file is
    read from its start, each of its lines audited once."""
    async def body(env: _Env) -> None:
        t = env.tailer()
        env.append(_line(0), _line(1))
        await _drain(t)
        t.close()
        rotated = env.log.with_name(env.log.name + ".1")
        os.rename(env.log, rotated)
        env.append(_line(2), to=rotated)  # written before Envoy reopened: never read
        env.append(_line(3), _line(4))
        os.remove(rotated)
        read_up_to = len(_line(0)) + len(_line(1))
        with caplog.at_level(logging.ERROR, logger="extauthz"):
            t = env.tailer()
            await _drain(t)
        assert any(r.levelno == logging.ERROR and f"read up to offset {read_up_to} is gone" in r.getMessage()
                   for r in caplog.records), caplog.text
        assert sorted(e.detail["envoy_request_id"] for e in env.events()) == ["rid-0", "rid-1", "rid-3", "rid-4"]
        assert t.offset == os.path.getsize(env.log)
        t.close()
    _run(tmp_path, body)


def test_truncation_starts_over(tmp_path):
    async def body(env: _Env) -> None:
        t = env.tailer()
        env.append(*(_line(i) for i in range(4)))
        await _drain(t)
        os.truncate(env.log, 0)
        env.append(_line(10))
        await _drain(t)
        assert sorted(e.detail["envoy_request_id"] for e in env.events()) == \
            ["rid-0", "rid-1", "rid-10", "rid-2", "rid-3"]
        t.close()
    _run(tmp_path, body)


def test_the_audit_file_needs_the_spool():
    with pytest.raises(ValueError, match="needs audit.spool_path"):
        Settings(store_url="sqlite:///x.db", fast_path={"audit_file": "/x.log"}, audit={"spool_path": None})
    with pytest.raises(ValueError, match="null for ALS"):
        Settings(store_url="sqlite:///x.db", fast_path={"audit_file": " "})
    assert Settings(store_url="sqlite:///x.db").fast_path.audit_file is None


# --- through Envoy ---------------------------------------------------------------------------------

@pytest.mark.envoy
@pytest.mark.postgres
@pytest.mark.slow
def test_envoy_file_audit_is_one_event_per_call_across_restarts_malformed_lines_and_rotation(tmp_path, pg_dsn):
    """Real Envoy rendered with ``audit_file``, the real server tailing it (PostgreSQL): N
    fast-path calls give N events with their principal, path and policy; calls made while the
    server is stopped (gracefully, then kill -9) are audited once it is back, none twice; a
    malformed line is refused and counted, the lines after it audited; a rotated file (Envoy
    reopens its logs on SIGUSR1) is finished and the new one followed."""
    import collections
    import re
    import signal
    import time

    import grpc

    from tests.extauthz import test_fast_path_audit as als

    READ, STAT, _fast_audit, _metrics, _wait = als.READ, als.STAT, als._fast_audit, als._metrics, als._wait

    audit_file = tmp_path / "fast-path-audit.log"
    calls: list[str] = []

    def fast_calls(n: int) -> None:
        for _ in range(n):
            who = "alice" if len(calls) % 2 else "bob"
            r = gw.call(LIST, as_=who)
            assert r.code is grpc.StatusCode.OK, r.render()
            calls.append(who)

    def relearn() -> None:
        """A new server process learns the modes afresh (one refused Check) and pushes them."""
        assert gw.call(READ, as_="alice").code is grpc.StatusCode.PERMISSION_DENIED
        als._until_envoy_knows(gw, 1)

    def all_audited() -> list:
        events = _wait(f"{len(calls)} fast-path events", lambda: (lambda e: e if len(e) >= len(calls) else None)(
            _fast_audit(pg_dsn)), timeout=20)
        assert len({e.id for e in events}) == len(events)
        return events

    with als._stack(tmp_path, pg_dsn, **{"fast_path.audit_file": str(audit_file),
                                     "fast_path.audit_file_poll_s": 0.05}) as gw:
        relearn()
        fast_calls(8)
        events = all_audited()
        assert collections.Counter(e.actor for e in events) == collections.Counter(calls)
        for e in events:
            assert (e.kind, e.method, e.detail["rule"]) == ("decision.allow", "ListAccounts", "fast_path.allow")
            assert re.fullmatch(r"v\d+/engineers", e.detail["policy_id"])
        assert int(gw.envoy.stats(STAT)[STAT]) == len(calls)  # no call went over ALS or a Check
        # Envoy writes each line exactly as the reader takes it without json (keys sorted, compact).
        from extauthz.file_audit import _ENVOY_LINE
        written = audit_file.read_bytes().decode().splitlines()
        assert len(written) == len(calls) and all(_ENVOY_LINE.fullmatch(w) for w in written), written[:2]
        assert _wait("the audited count", lambda: _metrics(gw.metrics_url).get("audited") == len(calls))

        assert gw.extauthz is not None
        assert gw.extauthz.stop() == 0  # graceful
        fast_calls(3)  # Envoy keeps the policy: these pass and go to the file
        gw.start_extauthz()
        all_audited()
        relearn()
        gw.extauthz.signal(signal.SIGKILL)
        gw.extauthz.proc.wait(10)
        fast_calls(3)
        gw.start_extauthz()
        time.sleep(1.5)  # Envoy flushes its file log about once a second
        events = all_audited()
        relearn()
        assert len(events) == len(calls)
        assert collections.Counter(e.actor for e in events) == collections.Counter(calls)

        with open(audit_file, "ab") as f:  # what only Envoy should write: refused, never stops the tailer
            f.write(b'{"node": "forged", "fast_path": "allowed", "path": 7\n')
        fast_calls(2)
        assert len(all_audited()) == len(calls)
        m = _wait("the malformed line counted", lambda: (lambda m: m if m.get("malformed") == 1 else None)(
            _metrics(gw.metrics_url)))
        assert m.get("not_fast_path", 0) == 0

        audit_file.rename(audit_file.with_name(audit_file.name + ".1"))
        fast_calls(2)  # still into the old file: Envoy has not reopened it
        gw.envoy.signal(signal.SIGUSR1)  # reopen the access logs (what logrotate's postrotate does)
        _wait("the new file", lambda: audit_file.exists())
        fast_calls(3)
        _wait("lines in the new file", lambda: audit_file.exists() and audit_file.stat().st_size > 0)
        events = all_audited()
        time.sleep(0.5)
        assert len(_fast_audit(pg_dsn)) == len(calls) == int(gw.envoy.stats(STAT)[STAT])


def test_a_failed_spool_write_is_retried_not_dropped(tmp_path):
    """Through the spool (the store not written directly): a spool write that fails leaves
    the position where it was; the tailer offers the same lines again and they are audited."""
    class FlakySpool(AuditSpool):
        fail = 1

        def put(self, *a, **kw):
            if self.fail:
                self.fail -= 1
                raise OSError("disk full (test)")
            return super().put(*a, **kw)

    env = _Env(tmp_path)
    env.use_spool(FlakySpool(env.spool_path, 100_000))

    async def main() -> None:
        env.writer.start()
        try:
            t = env.tailer()
            env.append(*(_line(i) for i in range(3)), b"{broken\n")
            with pytest.raises(OSError, match="could not write 3"):
                await t.poll_once()
            assert t.offset == 0
            assert (env.count("received"), env.count("malformed")) == (0, 0)  # nothing counted twice
            # offered again, so not counted as dropped
            assert env.metrics.registry.get_sample_value("rpcauthz_audit_dropped_total", {"why": "spool_failed"}) is None
            await _drain(t)
            assert t.offset == os.path.getsize(env.log)
            assert (env.count("received"), env.count("audited"), env.count("malformed")) == (4, 3, 1)
            t.close()
            await env.writer.close()
            assert sorted(e.detail["envoy_request_id"] for e in env.events()) == ["rid-0", "rid-1", "rid-2"]
        finally:
            env.spool.close()
    asyncio.run(main())


class _AwayStoreSpool(AuditSpool):
    """A spool whose store is away (every ship fails) until ``away`` is set False."""

    away = True

    def ship(self, *a, **kw):
        if self.away:
            raise OSError("store away (test)")
        return super().ship(*a, **kw)


def test_a_full_spool_keeps_the_lines_in_the_file_not_dropped(tmp_path):
    """The store away and the spool at its bound (``spool_max_events``): the lines that do not
    all fit wait in the file (the position stays; nothing dropped or counted twice), and are
    audited once the store drains the spool."""
    env = _Env(tmp_path)
    env.use_spool(_AwayStoreSpool(env.spool_path, 4), replay_interval=0.05)

    def dropped() -> float | None:
        return env.metrics.registry.get_sample_value("rpcauthz_audit_dropped_total", {"why": "spool_full"})

    async def main() -> None:
        env.writer.start()
        try:
            t = env.tailer()
            env.append(*(_line(i) for i in range(3)))
            await _drain(t)
            taken = t.offset
            assert taken == os.path.getsize(env.log) and env.spool.stats()["depth"] == 3
            env.append(*(_line(i) for i in range(3, 6)))
            for _ in range(3):  # one place left: the three new lines wait, however often polled
                with pytest.raises(OSError, match="could not write 3"):
                    await t.poll_once()
                assert t.offset == taken
            assert dropped() is None
            assert env.count("received") == 3  # the waiting lines are not counted yet
            env.spool.away = False  # the store is back: the spool drains, the lines fit
            for _ in range(100):
                if env.spool.stats()["depth"] == 0:
                    break
                await asyncio.sleep(0.05)
            await _drain(t)
            assert t.offset == os.path.getsize(env.log)
            t.close()
            await env.writer.close()
            assert sorted(e.detail["envoy_request_id"] for e in env.events()) == [f"rid-{i}" for i in range(6)]
            assert (env.count("received"), env.count("audited"), dropped()) == (6, 6, None)
        finally:
            env.spool.close()
    asyncio.run(main())


@pytest.mark.parametrize(("spool_max", "queue_size", "why"), [(2, 100_000, "spool_full"), (100_000, 2, "queue_full")])
def test_a_batch_larger_than_the_whole_bound_is_not_retried_for_ever(tmp_path, spool_max, queue_size, why):
    """Lines that could never fit (more than ``spool_max_events``, or ``audit.queue_size``, in
    one read) are taken as far as the bound allows and the rest dropped and counted, as
    Checks' events are: the tailer moves on rather than offering them again for ever."""
    env = _Env(tmp_path)
    env.use_spool(_AwayStoreSpool(env.spool_path, spool_max), queue_size=queue_size)

    async def main() -> None:
        env.writer.start()
        try:
            t = env.tailer()
            env.append(*(_line(i) for i in range(3)))
            await _drain(t)
            assert t.offset == os.path.getsize(env.log)
            assert env.spool.stats()["depth"] == 2
            assert env.metrics.registry.get_sample_value("rpcauthz_audit_dropped_total", {"why": why}) == 1
            t.close()
        finally:
            await env.writer.close(timeout=0.5)
            env.spool.close()
    asyncio.run(main())


def test_one_process_tails_at_a_time(tmp_path):
    """Workers share the spool: only the holder of its audit-file lock tails; the next takes
    over once it stops (and resumes at its position)."""
    async def body(env: _Env) -> None:
        a, b = env.tailer(), env.tailer()
        assert a.take_turn() and a.take_turn()
        assert not b.take_turn()
        env.append(_line(0), _line(1))
        runner = asyncio.create_task(b.run())
        await _drain(a)
        await asyncio.sleep(0.5)
        assert len(env.events()) == 2 and env.count("audited") == 2  # b waited
        a.close()
        env.append(_line(2))
        for _ in range(100):
            if env.count("audited") == 3:
                break
            await asyncio.sleep(0.05)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        b.close()
        assert env.count("audited") == 3 and len(env.events()) == 3  # b began at a's position
    _run(tmp_path, body)


# --- the line reader: the ALS rows, without an entry per line ------------------------------------

def _als_entry(call: dict) -> accesslog_pb2.HTTPAccessLogEntry:
    """The ALS entry Envoy sends for ``call`` (built as Envoy fills it, not through ``line_entry``)."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.path, e.request.request_id = call["path"], call["request_id"]
    e.common_properties.stream_id = call["stream_id"]
    e.common_properties.start_time.FromDatetime(datetime.fromisoformat(call["start_time"]))
    sa = e.common_properties.downstream_remote_address.socket_address
    sa.address, sa.port_value = call["address"], call["port"]
    md = e.common_properties.metadata.filter_metadata
    md["envoy.filters.http.jwt_authn"].fields["jwt_payload"].struct_value.update({"sub": call["principal"], "iss": "x"})
    md["envoy.filters.http.rbac"].update({"rpcauthz_fast_shadow_engine_result": "allowed",
                                          "rpcauthz_fast_shadow_effective_policy_id": call["policy_id"]})
    return e


def _envoy_line(call: dict) -> bytes:
    """The line Envoy's file log writes for ``call`` (keys sorted, compact, UTF-8 as is: Envoy 1.40)."""
    host = f"[{call['address']}]" if ":" in call["address"] else call["address"]
    d = {k: call[k] for k in ("start_time", "principal", "path", "policy_id", "request_id", "stream_id", "node")}
    d.update(fast_path="allowed", downstream_remote_address=f"{host}:{call['port']}")
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


_CALLS = [dict(start_time=f"2026-12-03T09:00:{i % 3:02d}.{(i * 7919) % 1_000_000:06d}Z", principal=p, path=path,
               policy_id=policy, request_id=rid, stream_id=f"{1234567890123 + i}", address=addr, port=40000 + i,
               node=node)
          for i, (p, path, policy, rid, addr, node) in enumerate([
              ("alice", LIST, "v7/engineers", "rid-0", "127.0.0.1", "gw-1"),
              ("alice", LIST, "v7/engineers", "rid-1", "127.0.0.1", "gw-1"),
              ('b"o\\b\u00e9\u2028', LIST, "v7/engineers", 'q"1\\', "::1", "gw-1"),
              ("carol", "/bank.ledger.v1.Ledger/PostEntry", "v12/contributors", "rid-3", "10.0.0.7", "gw-2"),
              ("x" * 256, LIST, "v7/engineers", "r\u00e9-4", "127.0.0.1", "gw-\u00e9"),
              ("alice", LIST, "v8/engineers", "rid-5", "127.0.0.1", "gw-1"),
          ])]
_CALLS.append(dict(_CALLS[0], start_time="2026-12-03T09:00:05.000000Z", request_id="whole-second"))
_CALLS.append(dict(_CALLS[0], start_time="1970-01-01T00:00:01.000001Z", request_id="1970"))


def test_a_file_line_gives_the_row_the_als_entry_of_the_same_call_gives(monkeypatch):
    """The same calls as Envoy's ALS entries (``EntryReader.rows``) and as its file lines
    (``LineReader.lines``, the tailer's reader) give the same event ids, spool rows and store
    columns, byte for byte, also from the caches (every call twice); lines as Envoy writes
    them are read without an entry each (``line_entry``, the old and slower way, is not used)."""
    from extauthz import file_audit
    from extauthz.access_log import entry_event_id

    def no_entry(line, settings):
        raise AssertionError(f"read through an HTTPAccessLogEntry: {line!r}")
    monkeypatch.setattr(file_audit, "line_entry", no_entry)

    calls = _CALLS + _CALLS
    als_rows: list = []
    als_columns: list = []
    reader = EntryReader(SETTINGS)
    for call in calls:  # one message per call: each entry with its own node
        als_rows += reader.rows([_als_entry(call)], call["node"], lambda e, x: pytest.fail(str(x)), als_columns)
    file_rows: list = []
    file_columns: list = []
    received = LineReader(SETTINGS).lines([_envoy_line(c) for c in calls], 0, file_rows,
                                          lambda *r: pytest.fail(str(r)), file_columns)
    assert received == len(calls) == len(file_rows)
    assert file_rows == als_rows
    assert file_columns == als_columns
    assert [r[0] for r in file_rows] == [entry_event_id(_als_entry(c), c["node"]) for c in calls]
    assert len({r[0] for r in file_rows}) == len(_CALLS)  # the same call twice: the same id (deduped)
    # Without columns (the spool; a store that takes rows): the same rows.
    rows: list = []
    LineReader(SETTINGS).lines([_envoy_line(c) for c in calls], 0, rows, lambda *r: pytest.fail(str(r)))
    assert rows == als_rows


def _as_envoy_writes(line: bytes) -> bytes | None:
    """``line``, if a JSON object, written as Envoy writes its lines: keys sorted, compact, UTF-8."""
    try:
        d = json.loads(line)
    except ValueError:
        return None
    if not isinstance(d, dict):
        return None
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate: as an escape
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _old_lines(lines: list[bytes], first: int) -> tuple[list, list, list, int]:
    """What the tailer read before ``LineReader``: each line to an entry (``line_entry``), read
    by ``EntryReader.rows``; (rows, columns, refusals as (offset, request id, type, message), received)."""
    reader = EntryReader(SETTINGS)
    rows: list = []
    columns: list = []
    refused: list = []
    received, at = 0, first
    for line in lines:
        where, at = at, at + len(line) + 1
        if not line.strip():
            continue
        received += 1
        try:
            entry, node = line_entry(line, SETTINGS)
        except Exception as e:  # noqa: BLE001 (before: only MalformedEntry was caught; the rest stopped the tailer)
            refused.append((where, "-", type(e), str(e)))
            continue
        rows += reader.rows([entry], node, lambda entry, e, where=where: refused.append(
            (where, entry.request.request_id or "-", type(e), str(e))), columns)
    return rows, columns, refused, received


def test_the_line_reader_refuses_and_reads_what_line_entry_did():
    """Every line off Envoy's usual shape (refused or not) is read exactly as before
    (``line_entry`` + ``EntryReader.rows``): the same rows, columns, refusals with their
    offsets, request ids and messages, and the same count of lines received."""
    good = [_line(i) .rstrip(b"\n") for i in range(3)]
    odd = [  # audited, off the usual shape
        _line(3, downstream_remote_address="unix:/run/envoy.sock"), _line(4, downstream_remote_address="[::1]:0080"),
        _line(5, start_time="2026-12-03T09:00:05+00:00"), _line(6, start_time="2026-12-03T10:00:05.000006+01:00"),
        _line(7, start_time="2026-12-03 09:00:07.000007Z"), _line(8, stream_id=...), _line(9, stream_id=9),
        b'  ' + _line(10), _line(11, extra={"a": [1]}), json.dumps({**json.loads(_line(12)), "fast_path": "allowed"},
                                                                   indent=None, separators=(", ", ": ")).encode(),
        _line(13, start_time="2026-12-03T09:00:13.000013"),  # no zone: UTC, as FromDatetime takes it
    ]
    bad = [
        b"{not json", b"[1]", b"7", b"null", _line(node=...), _line(node=""), _line(node=7),
        _line(start_time="yesterday"), _line(start_time=None), _line(start_time="2026-12-03T09:00:99.000000Z"),
        _line(start_time="2026-12-03T09:00:00.\u0661\u0662\u0663\u0664\u0665\u0666Z"),
        _line(principal=None), _line(principal="a b"), _line(principal=7), _line(principal=""),
        _line(principal="x" * 257), _line(path="/nope"), _line(path=7), _line(policy_id="v7/everyone"),
        _line(policy_id=None), _line(policy_id=""), _line(request_id=None), _line(request_id=""),
        _line(fast_path="denied"), _line(fast_path=None), _line(fast_path=...),
        _line(principal="\ud800"), _line(path="\ud800"), _line(node="\ud800"),  # not text protobuf takes
        _line(downstream_remote_address="1.2.3.4:\u00b2"),  # a digit int() does not take
        b'{"node": "gw-1", "path": "\xff"}',  # not UTF-8
    ]
    lines = [*good, *odd, b"", b"   ", *bad, *good]
    lines = [line.rstrip(b"\n") for line in lines]
    lines += [envoy for line in lines if (envoy := _as_envoy_writes(line))]  # and each as Envoy writes it
    want_rows, want_columns, want_refused, want_received = _old_lines(lines, 100)
    rows: list = []
    columns: list = []
    refused: list = []
    received = LineReader(SETTINGS).lines(lines, 100, rows, lambda where, rid, e: refused.append(
        (where, rid, type(e), str(e))), columns)
    assert (rows, columns) == (want_rows, want_columns)
    assert refused == want_refused
    assert received == want_received == len(lines) - 2
    assert len(rows) == 2 * (2 * len(good) + len(odd))
    assert len(refused) == 2 * len(bad) - 5  # once each; twice those that are JSON objects
    # ... and without the one line that is not UTF-8 (the lines decoded together).
    lines.remove(bad[-1])
    assert LineReader(SETTINGS).lines(lines, 100, [], lambda *r: None) == len(lines) - 2


def test_a_line_protobuf_cannot_take_is_refused_and_the_tailer_goes_on(tmp_path, caplog):
    """A JSON line with text no entry can hold (a lone surrogate) or a port ``int`` does not
    read used to stop the tailer at that line (every poll failed on it); it is refused and
    counted like any malformed line, and the lines after it are audited."""
    async def body(env: _Env) -> None:
        t = env.tailer()
        env.append(_line(0), _line(1, principal="\ud800"), _line(2, downstream_remote_address="1.2.3.4:\u00b2"),
                   _line(3, request_id="\ud800"), _line(4))
        await _drain(t)
        assert sorted(e.detail["envoy_request_id"] for e in env.events()) == ["rid-0", "rid-4"]
        assert (env.count("received"), env.count("audited"), env.count("malformed")) == (5, 2, 3)
        assert t.offset == os.path.getsize(env.log)
        t.close()
    _run(tmp_path, body)
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert sum("could not read the line at offset" in s for s in said) == 3, said


def test_the_tail_bench_prints_cpu_per_line_old_and_new(capsys):
    """bench/file_tail_bench.py still runs (a few lines: the table's shape, not its numbers),
    and the old and the new reading gave the same rows."""
    import re
    import sys

    from devstack.processes import REPO_ROOT
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import file_tail_bench
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    assert file_tail_bench.main(["--lines", "300", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "rows of the old and the new reading: equal" in out
    for stage in ("read", "store write", "tailer"):
        assert re.search(rf"^\| {stage} \| \d+\.\d \[[\d.]+-[\d.]+\] \| \d+\.\d \[[\d.]+-[\d.]+\] \| \d+\.\d\d \|$",
                         out, re.M), out


def test_an_audit_file_or_directory_every_user_may_write_is_reported_and_still_read(tmp_path, caplog):
    """Anyone who may write the audit file (or create it in its directory) could forge audit
    records: the tailer says so at each open, by name and mode, and still audits the lines
    (Envoy's real allows must not go unaudited because of it)."""
    folder = tmp_path / "logs"
    folder.mkdir(mode=0o755)

    async def body(env: _Env) -> None:
        env.log = folder / "fast-path.log"
        env.settings = env.settings.model_copy(
            update={"fast_path": env.settings.fast_path.model_copy(update={"audit_file": str(env.log)})})
        env.append(_line(0))
        env.log.chmod(0o644)
        t = env.tailer()
        await _drain(t)
        assert not [r for r in caplog.records if "writable by every user" in r.getMessage()]
        t.close()
        env.log.chmod(0o666)
        folder.chmod(0o777)
        env.append(_line(1))
        t = env.tailer()
        await _drain(t)
        said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any(f"audit file {env.log} is writable by every user (mode 666)" in s for s in said), said
        assert any(f"audit directory {folder} is writable by every user (mode 777)" in s for s in said), said
        assert sorted(e.detail["envoy_request_id"] for e in env.events()) == ["rid-0", "rid-1"]
        t.close()
    try:
        _run(tmp_path, body)
    finally:
        folder.chmod(0o755)
