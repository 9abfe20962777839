"""Real concurrency: several connections (threads, and processes) racing on one request.

Each transition sleeps briefly while it holds the request, so without row locking the
racers would all read the same state and the last writer would win; these tests then fail.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
import time
from datetime import timedelta

import pytest

from policy import ApprovalRequest, Grant, PolicyError, RequestClosed, RequestState, Role, approve, use
from tests.support.store_data import GRANTS, NOW, new_request

RACERS = 6


def race(backend, n: int, work):
    """Run ``work(store, i)`` in ``n`` threads, each with its own store (connection), at once."""
    stores = [backend.open(pool_size=2) if backend.name == "postgresql" else backend.open()
              for _ in range(n)]
    barrier = threading.Barrier(n)

    def run(i: int):
        barrier.wait()
        try:
            return work(stores[i], i)
        except PolicyError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def slow(transition):
    def apply(r: ApprovalRequest) -> ApprovalRequest:
        time.sleep(0.05)
        return transition(r)
    return apply


def test_two_reviewers_one_approval_needed(backend):
    store = backend.open()
    r = store.create_request(new_request(required_approvals=1), actor="alice")
    results = race(backend, 2, lambda s, i: s.update_request(
        r.id, slow(lambda x: approve(x, ("bob", "carol")[i], GRANTS, NOW)),
        actor=("bob", "carol")[i], kind="request.approved"))
    won = [x for x in results if isinstance(x, ApprovalRequest)]
    lost = [x for x in results if isinstance(x, PolicyError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert won[0].state is RequestState.APPROVED
    assert isinstance(lost[0], RequestClosed)
    final = store.get_request(r.id)
    assert final == won[0] and len(final.approvals) == 1
    assert [e.kind for e in store.list_audit(request_id=r.id)] == ["request.created",
                                                                    "request.approved"]


def test_two_reviewers_two_approvals_needed(backend):
    store = backend.open()
    r = store.create_request(new_request(required_approvals=2), actor="alice")
    results = race(backend, 2, lambda s, i: s.update_request(
        r.id, slow(lambda x: approve(x, ("bob", "carol")[i], GRANTS, NOW)),
        actor=("bob", "carol")[i], kind="request.approval_recorded"))
    assert all(isinstance(x, ApprovalRequest) for x in results), results
    assert sorted(x.state.value for x in results) == ["approved", "pending"]
    final = store.get_request(r.id)
    assert final.state is RequestState.APPROVED
    assert sorted(final.approvers) == ["bob", "carol"]
    assert len(store.list_audit(request_id=r.id, kinds=["request.approval_recorded"])) == 2


def test_many_callers_spend_the_last_use(backend):
    store = backend.open()
    r = store.create_request(new_request(max_uses=1), actor="alice")
    store.update_request(r.id, lambda x: approve(x, "bob", GRANTS, NOW), actor="bob",
                         kind="request.approved")
    results = race(backend, RACERS, lambda s, i: s.update_request(
        r.id, slow(lambda x: use(x, NOW)), actor="alice", kind="request.used"))
    ok = [x for x in results if isinstance(x, ApprovalRequest)]
    assert len(ok) == 1, results
    assert all(isinstance(x, RequestClosed) for x in results if x not in ok)
    assert store.get_request(r.id).uses == 1
    assert len(store.list_audit(request_id=r.id, kinds=["request.used"])) == 1


def test_concurrent_get_or_create_pending_makes_one_request(backend):
    store = backend.open()
    results = race(backend, RACERS, lambda s, i: s.get_or_create_pending(
        new_request(now=NOW + timedelta(milliseconds=i)), actor="gateway"))
    ids = {req.id for req, _ in results}
    assert len(ids) == 1, results
    assert sum(created for _, created in results) == 1
    assert len(store.find_requests(requester="alice")) == 1
    assert len(store.list_audit(kinds=["request.created"])) == 1


@pytest.mark.slow
def test_processes_spend_the_last_use(backend):
    """Separate processes (as with `mpactl serve --workers N`) on one store."""
    store = backend.open()
    r = store.create_request(new_request(max_uses=2), actor="alice")
    store.update_request(r.id, lambda x: approve(x, "bob", GRANTS, NOW), actor="bob",
                         kind="request.approved")
    ctx = multiprocessing.get_context("spawn")
    n = 4
    start_at = time.time() + 3  # after every child has imported and opened the store
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx) as pool:
        from tests.support.store_workers import spend_one_use
        futures = [pool.submit(spend_one_use, backend.url, r.id, NOW.isoformat(), start_at)
                   for _ in range(n)]
        results = sorted(f.result(timeout=60) for f in futures)
    assert results == ["RequestClosed", "RequestClosed", "ok", "ok"]
    assert store.get_request(r.id).uses == 2


def test_one_store_shared_by_many_threads(backend):
    """A single store object is safe to share: the ext_authz server calls it from a thread pool."""
    store = backend.open()
    r = store.create_request(new_request(max_uses=1000), actor="alice")
    store.update_request(r.id, lambda x: approve(x, "bob", GRANTS, NOW), actor="bob",
                         kind="request.approved")
    per_thread = 15

    def work(i: int) -> int:
        for _ in range(per_thread):
            store.update_request(r.id, lambda x: use(x, NOW), actor="alice", kind="request.used")
            assert store.get_request(r.id).state is RequestState.APPROVED
            store.find_requests(requester="alice")
            store.put_grant(Grant(f"user{i}", Role.ENGINEER))
        return i

    with concurrent.futures.ThreadPoolExecutor(RACERS) as pool:
        assert sorted(pool.map(work, range(RACERS))) == list(range(RACERS))
    assert store.get_request(r.id).uses == RACERS * per_thread
    assert len(store.list_audit(request_id=r.id, kinds=["request.used"], limit=10_000)) == RACERS * per_thread
    assert len(store.list_grants()) == RACERS
