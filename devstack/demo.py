"""``mpactl demo``: the whole gateway on this machine, with people and commands to try.

Starts, all on 127.0.0.1: the dev JWT issuer's JWKS, the two demo services (Accounts,
Ledger) with reflection, the ext_authz server on SQLite in a temporary directory, and real
Envoy with envoy/gateway.yaml. Seeds grants for a few people, writes ``demo.json`` (where
the gateway is, where the issuer key is) so ``mpactl demo call`` can mint tokens, prints
commands that show allow, deny and approval required, and runs until Ctrl-C.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any

from policy import Grant, Role

from .processes import EnvoyProcess, ExtAuthzProcess, free_port, render_gateway

ACCOUNTS = "rpcauthz.demo.v1.Accounts"
LEDGER = "rpcauthz.demo.v1.Ledger"
STATE_FILE = "demo.json"

#: Who is who in the demo.
PEOPLE = {
    "alice": "engineer, contributor of Accounts",
    "bob": "engineer, contributor of Accounts",
    "erin": "engineer (no team)",
    "lena": "engineer, contributor of Ledger",
    "lars": "engineer, contributor of Ledger",
    "sam": "engineer, security on-call",
    "sol": "engineer, security on-call",
    "victor": "not an engineer (a visitor)",
}


def demo_grants() -> list[Grant]:
    src = "demo"
    g = [Grant(p, Role.ENGINEER, source=src)
         for p in ("alice", "bob", "erin", "lena", "lars", "sam", "sol")]
    g += [Grant(p, Role.CONTRIBUTOR, ACCOUNTS, source=src) for p in ("alice", "bob")]
    g += [Grant(p, Role.CONTRIBUTOR, LEDGER, source=src) for p in ("lena", "lars")]
    g += [Grant(p, Role.SECURITY_ONCALL, source=src) for p in ("sam", "sol")]
    return g


def examples(cmd: str, dir_opt: str = "") -> list[tuple[str, str, str]]:
    """(kind, what it shows, command) for the printed walk-through; ``cmd`` is e.g. ``mpactl``."""
    return [
        ("allow", "any engineer may list accounts",
         f"{cmd} demo call{dir_opt} --as erin /{ACCOUNTS}/ListAccounts"),
        ("allow", "a contributor of Accounts may update limits",
         f"{cmd} demo call{dir_opt} --as alice /{ACCOUNTS}/UpdateLimits --data '{{\"accountId\": \"A-1\"}}'"),
        ("deny", "an engineer from another team may not",
         f"{cmd} demo call{dir_opt} --as lena /{ACCOUNTS}/UpdateLimits"),
        ("deny", "a non-engineer may call nothing by hand",
         f"{cmd} demo call{dir_opt} --as victor /{ACCOUNTS}/ListAccounts"),
        ("approval", "reading an account needs another engineer's approval",
         f"{cmd} demo call{dir_opt} --as erin /{ACCOUNTS}/ReadAccount"),
        ("approve", "another engineer approves (use the request id printed above)",
         f"{cmd} demo approve{dir_opt} --as alice REQUEST_ID"),
        ("allow", "...after which erin's same call passes",
         f"{cmd} demo call{dir_opt} --as erin /{ACCOUNTS}/ReadAccount"),
        ("approval", "streaming the ledger needs a Ledger contributor plus another's approval",
         f"{cmd} demo call{dir_opt} --as lena /{LEDGER}/WatchEntries"),
        ("approve", "another Ledger contributor approves (the request id printed above)",
         f"{cmd} demo approve{dir_opt} --as lars --reason 'reconcile the ledger for ticket 4411' "
         "REQUEST_ID"),
        ("allow", "...after which lena's stream passes",
         f"{cmd} demo call{dir_opt} --as lena /{LEDGER}/WatchEntries"),
    ]


class Demo:
    """Everything ``mpactl demo`` runs; ``start()``, then ``stop()`` (always)."""

    def __init__(self, workdir: pathlib.Path | None = None, gateway_port: int | None = None,
                 cmd: str = "mpactl") -> None:
        self._own_dir = workdir is None
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="rpcauthz-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.gateway_port = gateway_port or free_port()
        self.cmd = cmd
        self.dir_opt = "" if self._own_dir else f" --dir {self.workdir}"
        self.store_url = f"sqlite:///{self.workdir / 'rpcauthz.db'}"
        self.key_path = self.workdir / "dev-issuer-key.pem"
        self._things: list[Any] = []
        self.envoy: EnvoyProcess | None = None
        self.extauthz: ExtAuthzProcess | None = None
        self.approvals_port = free_port()
        self.approvals_url = f"http://127.0.0.1:{self.approvals_port}"
        self.jwks_url = ""  # the dev token issuer's, once started
        self.broker: Any = None

    def start(self) -> None:
        from devstack.demo_services import start_demo_server
        from devstack.devissuer import DevIssuer
        from extauthz.dev_certs import make_dev_certs
        from policy.stores import open_store

        issuer = DevIssuer(self.key_path)
        jwks = issuer.serve()
        self._things.append(jwks)
        self.jwks_url = jwks.url
        accounts = start_demo_server(services=("accounts",))
        self._things.append(accounts)
        ledger = start_demo_server(services=("ledger",))
        self._things.append(ledger)
        store = open_store(self.store_url)
        try:
            for g in demo_grants():
                store.put_grant(g)
        finally:
            store.close()
        extauthz_port = free_port()
        # Envoy and the server talk mTLS, as envoy/gateway.yaml ships, with fresh dev certificates.
        tls = make_dev_certs(self.workdir / "tls")
        self.extauthz = ExtAuthzProcess({
            "store_url": self.store_url,
            "listen": {"host": "127.0.0.1", "port": extauthz_port, "tls": tls.server_settings()},
            "metrics": {"host": "127.0.0.1", "port": free_port()},
            "drain_grace_s": 2,
            "drain_notice_s": 0,  # a lone server: nobody to move Checks to
            # Decision events the store cannot take wait here and are replayed, not dropped.
            "audit": {"spool_path": str(self.workdir / "audit-spool.db")},
            "approvals": {"base_url": self.approvals_url},
            "reflection": {"endpoints": {"static": {ACCOUNTS: accounts.address,
                                                    LEDGER: ledger.address}}},
            # The Envoy-native fast path: Envoy allows static calls itself (RBAC over xDS).
            "fast_path": {"enabled": True},
        }, self.workdir, client_tls=tls)
        self._things.append(self.extauthz)
        self.extauthz.wait_ready()
        from devstack import demo_broker
        if demo_broker.available():  # the credential broker on a local AWS (the aws-demo extra)
            engineers = [g.principal for g in demo_grants() if g.role is Role.ENGINEER]
            oncall = [g.principal for g in demo_grants() if g.role is Role.SECURITY_ONCALL]
            self.broker = demo_broker.DemoBroker(self.workdir, issuer, engineers, oncall)
            self._things.append(self.broker)
        # With the broker, the web inbox lists its credential requests and links to their pages.
        from devstack.demo_approvals import start_demo_approvals
        self._things.append(start_demo_approvals(
            self.store_url, issuer, jwks.url, port=self.approvals_port,
            reflection={ACCOUNTS: accounts.address, LEDGER: ledger.address},
            broker=self.broker.link() if self.broker else None))
        cfg = render_gateway(listen_port=self.gateway_port, admin_port=free_port(),
                             extauthz_port=extauthz_port, jwks_port=jwks.port,
                             upstreams={"demo_accounts": accounts.port, "demo_ledger": ledger.port},
                             access_log=self.workdir / "access.log", tls_dir=tls.directory,
                             fast_path=True)
        self.envoy = EnvoyProcess(cfg, self.workdir)
        self._things.append(self.envoy)
        self.envoy.wait_ready()
        (self.workdir / STATE_FILE).write_text(json.dumps({
            "gateway": f"127.0.0.1:{self.gateway_port}",
            "issuer_key": str(self.key_path),
            "store_url": self.store_url,
            "approvals": self.approvals_url,
        }, indent=2))
        _remember(self.workdir)

    def banner(self) -> str:
        if self.envoy is None or self.extauthz is None:
            raise RuntimeError("the demo is not started")
        lines = [
            "rpcauthz demo is running.",
            f"  gateway (Envoy):   127.0.0.1:{self.gateway_port}   (admin 127.0.0.1:{self.envoy.admin_port})",
            f"  ext_authz server:  127.0.0.1:{self.extauthz.port}   store {self.store_url}",
            f"  approvals (page, API for `mpa`): {self.approvals_url}",
            f"  dev token issuer:  JWKS at {self.jwks_url}   (issuer key {self.key_path})",
            f"  access log:        {self.workdir / 'access.log'}   (fast_path: allowed = Envoy decided alone)",
            f"  working directory: {self.workdir}",
            "",
            "People:",
            *(f"  {name:7} {what}" for name, what in PEOPLE.items()),
            "",
            "Try, in another terminal:",
        ]
        for kind, what, command in examples(self.cmd, self.dir_opt):
            lines.append(f"  # [{kind}] {what}")
            lines.append(f"  {command}")
        lines += ["", "The approval loop as engineers live it: the link opens the approval page, where",
                  "the requester says why and another engineer signs in (dev sign-in) and approves;",
                  "or, with the `mpa` CLI only (each person keeps a session in MPA_CONFIG_DIR):"]
        from devstack.demo_approvals import demo_steps

        rpc = f"/{ACCOUNTS}/ReadAccount"
        call = f"{self.cmd} demo call{self.dir_opt} --as bob {rpc}"
        for what, command in demo_steps(self.approvals_url, requester="bob", approver="alice",
                                        rpc=rpc, call_cmd=call):
            lines.append(f"  # [loop] {what}")
            lines.append(f"  {command}")
        if self.broker is not None:
            lines += ["", f"Credential broker (AWS STS on a local AWS stand-in, {self.broker.aws.url}):",
                      f"  broker {self.broker.broker_address}, certificate {self.broker.cert}"]
            for what, command in self.broker.steps(requester="bob", approver="alice",
                                                   inbox_url=f"{self.approvals_url}/"):
                lines.append(f"  # [aws] {what}")
                lines.append(f"  {command}")
        else:
            lines += ["", "Credential broker with a local AWS: pip install '.[aws-demo]' and restart the demo."]
        lines += ["",
                  "Press Ctrl-C to stop everything started here"
                  + (" and remove its files." if self._own_dir else "."),
                  "ready"]
        return "\n".join(lines)

    def stop(self) -> None:
        for thing in reversed(self._things):
            try:
                if hasattr(thing, "address"):  # a demo gRPC server
                    thing.stop(grace=0)
                elif hasattr(thing, "stop"):
                    thing.stop()
                else:
                    thing.close()
            except Exception as e:  # keep stopping the rest
                print(f"while stopping {thing!r}: {e}", file=sys.stderr)
        self._things.clear()
        _forget(self.workdir)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def run(workdir: pathlib.Path | None, port: int | None, cmd: str = "mpactl") -> int:
    """Start the demo, print the walk-through, wait for Ctrl-C or SIGTERM, clean up."""
    demo = Demo(workdir, port, cmd)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        demo.start()
        print(demo.banner(), flush=True)
        while not done.wait(0.5):
            for proc in (demo.envoy, demo.extauthz):
                if proc is not None and not proc.alive():
                    print(f"{proc.name} exited unexpectedly:\n{proc.output()[-2000:]}", file=sys.stderr)
                    return 1
        print("stopping...", flush=True)
        return 0
    finally:
        demo.stop()


# --- where `mpactl demo call` finds the running demo ---------------------------------------------

def _pointer() -> pathlib.Path:
    return pathlib.Path(tempfile.gettempdir()) / "rpcauthz-demo-current"


def _remember(workdir: pathlib.Path) -> None:
    _pointer().write_text(str(workdir))


def _forget(workdir: pathlib.Path) -> None:
    p = _pointer()
    try:
        if p.read_text().strip() == str(workdir):
            p.unlink()
    except OSError:
        pass


def load_state(workdir: pathlib.Path | None) -> dict[str, Any]:
    """The running demo's ``demo.json`` (from ``workdir`` or the last demo started)."""
    if workdir is None:
        try:
            workdir = pathlib.Path(_pointer().read_text().strip())
        except OSError:
            raise FileNotFoundError("no demo is running: start one with `mpactl demo`") from None
    try:
        return json.loads((workdir / STATE_FILE).read_text())
    except OSError:
        raise FileNotFoundError(f"no running demo in {workdir}: start one with `mpactl demo`") from None
