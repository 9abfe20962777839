"""End to end: a catalog rendered by ``mpactl envoy render``, run in the real Envoy with the real
ext_authz server, demo services with reflection and the dev JWT issuer. The gateway routes and
authorizes exactly as the catalog says, including per-route exemptions and a dry-run service.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from devstack import democlient
from devstack.devissuer import DevIssuer
from devstack.processes import EnvoyProcess, ExtAuthzProcess, free_port
from extauthz.dev_certs import make_dev_certs
from policy import Grant, Role
from tests.support.gateway_harness import ACCOUNTS, LEDGER, extauthz_config, seed_grants
from tests.support.owners_support import run_mpactl

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


@pytest.fixture
def stack(tmp_path: Path):
    from devstack.demo_services import start_demo_server

    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    seed_grants(store_url, [Grant("alice", Role.ENGINEER), Grant("bob", Role.ENGINEER),
                            Grant("alice", Role.CONTRIBUTOR, ACCOUNTS),
                            Grant("alice", Role.CONTRIBUTOR, LEDGER)])
    issuer = DevIssuer()
    started = []
    jwks = issuer.serve()
    try:
        accounts = start_demo_server(services=("accounts",))
        started.append(accounts)
        ledger = start_demo_server(services=("ledger",))
        started.append(ledger)
        ext_port, metrics_port = free_port(), free_port()
        cfg = extauthz_config(port=ext_port, store_url=store_url,
                              reflection_static={ACCOUNTS: accounts.address, LEDGER: ledger.address},
                              extra={"metrics.port": metrics_port})
        # The rendered gateway talks mTLS to the server (the catalog's tls section).
        certs = make_dev_certs(tmp_path / "tls")
        cfg["listen"]["tls"] = certs.server_settings()
        ext = ExtAuthzProcess(cfg, tmp_path, client_tls=certs)
        started.append(ext)  # stopped in finally even if it never becomes ready
        ext.wait_ready()
        listen, admin = free_port(), free_port()
        catalog = tmp_path / "services.yaml"
        catalog.write_text(f"""\
gateway:
  listen: 127.0.0.1:{listen}
  admin: 127.0.0.1:{admin}
  ext_authz:
    address: 127.0.0.1:{ext_port}
    timeout: 1s
    tls: {{ca: {certs.ca}, cert: {certs.client_cert}, key: {certs.client_key}}}
  jwt:
    issuer: {issuer.issuer}
    audiences: [{issuer.audience}]
    jwks_uri: {jwks.url}
  access_log: {tmp_path / 'access.log'}
services:
  - name: {ACCOUNTS}
    upstream: {accounts.address}
    routes:
      - method: Ping          # no mode at all (the default would refuse): exempted here
        ext_authz: false
        jwt: false
  - name: {LEDGER}
    upstream: {ledger.address}
    dry_run: true
""")
        out = tmp_path / "gateway.yaml"
        res = run_mpactl("envoy", "render", "--catalog", str(catalog), "-o", str(out), "--validate")
        assert res.returncode == 0, res.stderr
        envoy = EnvoyProcess(yaml.safe_load(out.read_text()), tmp_path)
        started.append(envoy)
        envoy.wait_ready()
        deadline = time.monotonic() + 20
        while not envoy.cluster_healthy("ext_authz"):
            assert time.monotonic() < deadline, "envoy never saw ext_authz healthy"
            time.sleep(0.1)
        yield {"store_url": store_url, "gateway": f"127.0.0.1:{listen}", "issuer": issuer, "envoy": envoy, "ext": ext,
               "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "tmp": tmp_path,
               "admin": f"http://127.0.0.1:{admin}"}
    finally:
        for proc in reversed(started):
            if isinstance(proc, (EnvoyProcess, ExtAuthzProcess)):
                proc.stop()
            else:
                proc.stop(grace=0)  # a demo gRPC server
        jwks.close()


def call(st, path, who=None, token=None):
    if who is not None:
        token = st["issuer"].mint(who)
    data = {"account_id": "a1"} if ACCOUNTS in path else {"ledger_id": "l1"}
    return democlient.call(st["gateway"], path, token=token, data=data)


def test_routes_and_authorizes_as_the_catalog_says(stack):
    st = stack
    # Modes from the service's own proto, through reflection, decided by the policy.
    assert call(st, f"/{ACCOUNTS}/ListAccounts", "bob").code is grpc.StatusCode.OK
    r = call(st, f"/{ACCOUNTS}/UpdateLimits", "bob")            # CONTRIBUTORS_WITHOUT_APPROVAL
    assert r.code is grpc.StatusCode.PERMISSION_DENIED and "contributor" in r.message
    assert call(st, f"/{ACCOUNTS}/UpdateLimits", "alice").code is grpc.StatusCode.OK
    r = call(st, f"/{ACCOUNTS}/ReadAccount", "bob")             # ENGINEERS_WITH_APPROVAL
    assert r.code is grpc.StatusCode.PERMISSION_DENIED and r.request_url
    # Ping: no option, so the default (BREAK_GLASS_ONLY) would refuse; the catalog exempts it.
    assert call(st, f"/{ACCOUNTS}/Ping").code is grpc.StatusCode.OK
    # Everything else still needs a token.
    assert call(st, f"/{ACCOUNTS}/ListAccounts").code is grpc.StatusCode.UNAUTHENTICATED

    # Ledger is in dry-run: a refusal is computed and labelled, but the call goes through.
    # PostEntry inherits CONTRIBUTORS_WITH_APPROVAL; bob is no contributor of Ledger: would deny.
    r = call(st, f"/{LEDGER}/PostEntry", "bob")
    assert r.code is grpc.StatusCode.OK, r.render()
    assert call(st, f"/{LEDGER}/GetBalance", "bob").code is grpc.StatusCode.OK
    # alice contributes to Ledger: she would need another contributor's approval.
    assert call(st, f"/{LEDGER}/PostEntry", "alice").code is grpc.StatusCode.OK

    with urllib.request.urlopen(st["metrics"], timeout=10) as resp:
        metrics = resp.read().decode()
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(metrics) for s in fam.samples}
    assert samples[("rpcauthz_dry_run_decisions_total",
                    (("mode", "CONTRIBUTORS_WITH_APPROVAL"), ("shadow", "would_deny")))] == 1
    assert samples[("rpcauthz_dry_run_decisions_total",
                    (("mode", "CONTRIBUTORS_WITH_APPROVAL"), ("shadow", "would_need_approval")))] == 1
    assert samples[("rpcauthz_decisions_total", (("mode", "CONTRIBUTORS_WITH_APPROVAL"), ("outcome", "allow"),
                                                 ("rule", "dry_run.would_deny")))] == 1
    assert "dry-run: would_deny bob" in st["ext"].output()

    stats = st["envoy"].stats("http.engineers_grpc.ext_authz.")
    assert int(stats["http.engineers_grpc.ext_authz.denied"]) >= 2
    assert int(stats["http.engineers_grpc.ext_authz.ok"]) >= 4
    assert int(stats.get("http.engineers_grpc.ext_authz.failure_mode_allowed", 0)) == 0
    st["envoy"].stop()  # flush the access log
    lines = [json.loads(x) for x in (st["tmp"] / "access.log").read_text().splitlines()]
    post = [x for x in lines if x["path"] == f"/{LEDGER}/PostEntry"]
    assert len(post) == 2
    assert post[0]["dry_run"] is True and post[0]["shadow"] == "would_deny"
    assert post[0]["outcome"] == "allow" and post[0]["rule"] == "dry_run.would_deny"
    assert post[0]["grpc_status"] == 0 and post[0]["principal"] == "bob"
    upd = [x for x in lines if x["path"] == f"/{ACCOUNTS}/UpdateLimits" and x["principal"] == "bob"]
    assert upd[0]["outcome"] == "deny" and upd[0]["dry_run"] is False and upd[0]["shadow"] is None


def test_dry_run_visible_from_the_running_gateway_and_in_audit(stack):
    from policy.stores import open_store

    st = stack
    assert call(st, f"/{LEDGER}/PostEntry", "bob").code is grpc.StatusCode.OK
    res = run_mpactl("envoy", "dry-run", "--admin", st["admin"])
    assert res.returncode == 5 and LEDGER in res.stdout and ACCOUNTS not in res.stdout
    # The audit trail keeps what the policy decided, marked dry-run; usage reports it.
    deadline = time.monotonic() + 15
    while True:
        store = open_store(st["store_url"])
        try:
            events = store.list_audit(kinds=["decision.deny"], service=LEDGER)
        finally:
            store.close()
        if events or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(e.actor, e.method, e.detail.get("dry_run")) for e in events] == [("bob", "PostEntry", True)]
    res = run_mpactl("usage", LEDGER, "--store", st["store_url"])
    assert "  PostEntry: 1 call by 1 engineer" in res.stdout and "decided: deny 1" in res.stdout
