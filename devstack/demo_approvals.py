"""The approvals service as ``mpactl demo`` runs it, and the approval loop it prints."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mpa.config import ApprovalsConfig, DevLogin
from mpa.server import ApprovalsServer, start_approvals_server
from mpa.service import ModeLookup


def start_demo_approvals(store_url: str, issuer: Any, jwks_url: str, *, port: int = 0,
                         host: str = "127.0.0.1", mode_lookup: ModeLookup | None = None,
                         reflection: Mapping[str, str] | None = None,
                         **kw: Any) -> ApprovalsServer:
    """The approvals server as ``mpactl demo`` runs it: the dev issuer, dev sign-in on.

    ``issuer`` is the demo's ``devstack.devissuer.DevIssuer`` (the same one whose tokens Envoy
    accepts), ``jwks_url`` where its JWKS is served. Request links are
    ``http://{host}:{port}/requests/{id}``: give the same base URL to the ext_authz server
    (``approvals.base_url``), so pick ``port`` first (e.g. with a free-port helper).
    ``reflection`` (``{"pkg.Service": "host:port"}``, the gateway's static endpoints) lets
    engineers ask before calling: methods' modes (default ``BREAK_GLASS_ONLY``) and input types
    come from the services' reflection, as the gateway reads them.
    """
    if reflection is not None:
        from mpa.body_types import reflected_bodies
        from mpa.service import lazy_modes
        from policy import Mode
        from reflection_cache.cache import ReflectionCache
        from reflection_cache.endpoints import EndpointResolver

        static = dict(reflection)

        def cache() -> ReflectionCache:
            return ReflectionCache(EndpointResolver(static=static))
        mode_lookup = mode_lookup or lazy_modes(cache, Mode.BREAK_GLASS_ONLY)
        kw.setdefault("body_encoder", reflected_bodies(cache))
    if port == 0:
        import socket
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    config = ApprovalsConfig(store_url=store_url, issuer=issuer.issuer, jwks_url=jwks_url,
                             audiences=(issuer.audience,), public_url=f"http://{host}:{port}",
                             dev_login=DevLogin(), **kw.pop("config", {}))
    return start_approvals_server(config, host=host, port=port, mode_lookup=mode_lookup,
                                  dev_issuer=issuer, **kw)


def demo_steps(approvals_url: str, *, requester: str, approver: str, rpc: str,
               call_cmd: str, config_root: str = "/tmp/mpa-demo") -> list[tuple[str, str]]:
    """(what it shows, command) lines for the approval loop, for ``mpactl demo`` to print.

    ``call_cmd`` calls ``rpc`` through the gateway as the requester (e.g.
    ``mpactl demo call --as erin /rpcauthz.demo.v1.Accounts/ReadAccount``). Each person gets
    their own ``MPA_CONFIG_DIR`` so two engineers can share one shell.
    """
    who_r = f"MPA_CONFIG_DIR={config_root}/{requester}"
    who_a = f"MPA_CONFIG_DIR={config_root}/{approver}"
    return [
        (f"{requester}'s call needs approval: refused with a link", call_cmd),
        (f"{requester} signs in to the approvals server (dev issuer)",
         f"{who_r} mpa login --server {approvals_url} --as {requester}"),
        (f"{requester} says why (this completes the request the gateway opened)",
         f"{who_r} mpa request rpc {rpc} --reason 'customer ticket 4411: check the balance'"),
        (f"{approver} signs in, or opens the link in a browser and signs in there",
         f"{who_a} mpa login --server {approvals_url} --as {approver}"),
        (f"{approver} reviews what waits for them (a to approve)", f"{who_a} mpa review"),
        (f"{requester} sees who approved it and until when it holds", f"{who_r} mpa list --state approved"),
        (f"{requester}'s same call now passes", call_cmd),
    ]
