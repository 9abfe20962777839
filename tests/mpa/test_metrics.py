"""`/metrics` on the approvals server (issue 10, finding 6): Prometheus text with HTTP counts by
route template (never a request id), pending requests by mode, and shipped audit events."""
from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.approvals_env import LEDGER, approvals_env

A, B = "alice@example.com", "bob@example.com"


def samples(url: str) -> dict[tuple[str, tuple], float]:
    resp = httpx.get(f"{url}/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(resp.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_pending_and_audit_events(tmp_path):
    with approvals_env(tmp_path, audit_interval=0.2) as env:
        made = [env.call("POST", "/api/v1/requests", A, json={
            "service": LEDGER, "method": m, "reason": "refund for ticket 4411"}).json()
            for m in ("Adjust", "Close")]
        env.call("GET", f"/api/v1/requests/{made[0]['id']}", B)
        env.call("GET", "/api/v1/requests/nope", B)
        env.call("POST", f"/api/v1/requests/{made[0]['id']}/approve", B)
        deadline = time.monotonic() + 10
        while True:
            s = samples(env.url)
            if s.get(("mpa_audit_events_total", (("kind", "request.approved"),))) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.2)
        route = "/api/v1/requests/{request_id}"
        assert s[("mpa_http_requests_total", (("method", "GET"), ("route", route), ("status", "200")))] == 1
        assert s[("mpa_http_requests_total", (("method", "GET"), ("route", route), ("status", "404")))] == 1
        assert s[("mpa_http_requests_total", (("method", "POST"), ("route", "/api/v1/requests"),
                                              ("status", "201")))] == 2
        assert not any(made[0]["id"] in str(k) for k in s)
        assert s[("mpa_pending_requests", (("mode", "all"),))] == 1
        assert s[("mpa_pending_requests", (("mode", "CONTRIBUTORS_WITH_APPROVAL"),))] == 1
        assert s[("mpa_audit_events_total", (("kind", "request.created"),))] == 2
        assert s[("mpa_audit_events_total", (("kind", "request.approved"),))] == 1
