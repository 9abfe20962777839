"""Render the gateway's Envoy configuration from a short services catalog.

The catalog (``services.yaml``) says which gRPC services the gateway fronts and where they
live; everything else (the jwt_authn and ext_authz filters, fail-closed settings, clusters,
circuit breakers, the access log) is rendered here so operators tune a dozen keys instead of
four hundred lines of Envoy YAML. Format reference: docs/owners.md ("Services catalog").

``load_catalog`` checks the file and raises ``CatalogError`` naming file and line for any
mistake (unknown key, duplicate service, malformed address ...). ``render`` turns a checked
``Catalog`` into Envoy's bootstrap as a dict; ``render_yaml`` dumps it. Nothing here writes
files: the CLI writes only after both steps succeeded.

Per-route settings reach the ext_authz server as ``context_extensions`` of the CheckRequest
(``service``, and ``dry_run: "true"`` for services in shadow mode), which Envoy takes from
the route, so a caller cannot forge them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from extauthz.config import is_loopback
from extauthz.dev_certs import SERVER_NAME
from fastpath.compile import MAX_SHARDS
from fastpath.compile import RESOURCE_NAME as FAST_PATH_FILTER
from fastpath.envoy_config import AUDIT_BUFFER_BYTES, AUDIT_FLUSH_INTERVAL_S, with_fast_path

#: The dynamic-metadata namespace where jwt_authn leaves the verified payload, and the key.
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD_KEY = "jwt_payload"
EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
#: Route metadata namespace (access log: %METADATA(ROUTE:rpcauthz:dry_run)%).
ROUTE_METADATA = "rpcauthz"
#: context_extensions keys the ext_authz server reads.
CTX_SERVICE, CTX_DRY_RUN = "service", "dry_run"

_SERVICE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_PACKAGE_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.$")
_METHOD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_CLAIM = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")
#: An absolute path without whitespace or control characters (a file Envoy writes).
_ABSOLUTE = re.compile(r"^/[^\s\x00-\x1f]*$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)$")
#: Where ``mpactl dev-certs --out /etc/rpcauthz/tls`` puts the files the TLS defaults name.
DEFAULT_TLS_DIR = "/etc/rpcauthz/tls/"


class CatalogError(ValueError):
    """The catalog is unusable. ``str()`` is ``file:line: what is wrong``."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file, self.line, self.message = file, line, message


# --- the checked catalog ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
            return True
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class UnixSocket:
    """A unix socket path (the ext_authz server's ``listen.unix_socket``, in Envoy's pod)."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


#: Longest unix socket path the kernel takes (``sun_path`` is 108 bytes with its NUL).
_MAX_SOCKET_PATH = 107


@dataclasses.dataclass(frozen=True)
class RouteOverride:
    """Settings for one method of a service (``/pkg.Service/Method`` exactly)."""

    method: str
    line: int
    ext_authz: bool | None = None
    jwt: bool | None = None
    timeout: float | None = None
    buffer_body: int | None = None


@dataclasses.dataclass(frozen=True)
class ServiceEntry:
    """One service (``name``) or every service of a package (``prefix``) and its upstream."""

    match: str          # "pkg.Service" or "pkg." (package prefix, ends with a dot)
    is_prefix: bool
    upstream: Address
    line: int
    timeout: float | None = None
    ext_authz: bool = True
    jwt: bool = True
    dry_run: bool = False
    #: The day dry-run was switched on (``dry_run_since``), so a check can flag the forgotten.
    dry_run_since: datetime.date | None = None
    buffer_body: int | None = None
    routes: tuple[RouteOverride, ...] = ()

    @property
    def path_prefix(self) -> str:
        return f"/{self.match}" if self.is_prefix else f"/{self.match}/"


@dataclasses.dataclass(frozen=True)
class Jwt:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks_file: str | None = None
    jwks_cache: float = 300.0


@dataclasses.dataclass(frozen=True)
class ExtAuthzTls:
    """Envoy's side of the mTLS link to the ext_authz server (files on Envoy's machine)."""

    ca: str = DEFAULT_TLS_DIR + "ca.crt"
    cert: str = DEFAULT_TLS_DIR + "envoy.crt"
    key: str = DEFAULT_TLS_DIR + "envoy.key"
    server_name: str = SERVER_NAME


@dataclasses.dataclass(frozen=True)
class Gateway:
    listen: Address
    #: HOST:PORT, or a unix socket for a sidecar deployment (plaintext: the file mode decides).
    ext_authz: Address | UnixSocket
    jwt: Jwt
    #: ``None``: plaintext, allowed only for a loopback ext_authz address or a unix socket.
    ext_authz_tls: ExtAuthzTls | None = None
    admin: Address = Address("127.0.0.1", 9901)
    ext_authz_timeout: float = 1.0
    ext_authz_max_requests: int = 1024
    ext_authz_health_check: bool = True
    route_timeout: float = 15.0
    connect_timeout: float = 1.0
    max_request_bytes: int = 1 << 20
    upstream_max_requests: int = 1024
    access_log: str = "/dev/stdout"
    #: The Envoy-native fast path: RBAC over xDS from the ext_authz server ahead of ext_authz.
    fast_path: bool = False
    #: The JWT claim that names the caller (the server's identity.principal_claim).
    fast_path_claim: str = "sub"
    #: The access log of fast-path allows (their audit): Envoy flushes it this often or at
    #: this many buffered bytes; what is buffered is lost if Envoy dies.
    fast_path_audit_flush: float = AUDIT_FLUSH_INTERVAL_S
    fast_path_audit_buffer_bytes: int = AUDIT_BUFFER_BYTES
    #: Instead of the gRPC access log: fast-path allows to this file (Envoy's file access
    #: log; the server's ``fast_path.audit_file`` tails it).
    fast_path_audit_file: str | None = None
    #: The policy in this many parts (the server's fast_path.shards, the same number).
    fast_path_shards: int = 1
    #: Envoy asks for the policy over incremental (delta) ADS: body-less TTL refreshes
    #: (false: state of the world, every body again at each refresh).
    fast_path_delta_xds: bool = True


@dataclasses.dataclass(frozen=True)
class Catalog:
    gateway: Gateway
    services: tuple[ServiceEntry, ...]
    source: str = "<catalog>"

    @property
    def dry_run_services(self) -> list[str]:
        """Services (or package prefixes) whose decisions are logged but not enforced."""
        return [s.match for s in self.services if s.dry_run]

    @property
    def unauthorized_routes(self) -> list[str]:
        """Paths that bypass ext_authz: worth a second look in every review."""
        out = [s.path_prefix for s in self.services if not s.ext_authz]
        for s in self.services:
            out += [f"/{s.match}/{r.method}" for r in s.routes
                    if (r.ext_authz if r.ext_authz is not None else s.ext_authz) is False
                    and s.ext_authz]
        return out


# --- reading YAML with line numbers ---------------------------------------------------------

class _Reader:
    """Walks PyYAML's node graph so every value keeps the line it was written on."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, node: yaml.Node | None, message: str) -> CatalogError:
        line = node.start_mark.line + 1 if node is not None else 1
        return CatalogError(self.file, line, message)

    def mapping(self, node: yaml.Node, what: str, known: dict[str, str]) -> dict[str, yaml.Node]:
        """A mapping's {key: value node}; unknown and duplicate keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise self.fail(k, f"{what}: keys must be plain names")
            if k.value in out:
                raise self.fail(k, f"{what}: duplicate key {k.value!r} "
                                   f"(first on line {out[k.value].start_mark.line + 1})")
            if k.value not in known:
                raise self.fail(k, f"{what}: unknown key {k.value!r} (known: {', '.join(known)})")
            out[k.value] = v
        return out

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a single value")
        return yaml.SafeLoader("").construct_object(node, deep=True)

    def string(self, node: yaml.Node, what: str, pattern: re.Pattern | None = None,
               hint: str = "") -> str:
        v = self.scalar(node, what)
        if not isinstance(v, str) or not v.strip():
            raise self.fail(node, f"{what} must be a non-empty string")
        # fullmatch: with match, a pattern's "$" also matches before a trailing newline.
        if pattern is not None and not pattern.fullmatch(v):
            raise self.fail(node, f"{what}: {v!r} is malformed{': ' + hint if hint else ''}")
        return v

    def boolean(self, node: yaml.Node, what: str) -> bool:
        v = self.scalar(node, what)
        if not isinstance(v, bool):
            raise self.fail(node, f"{what} must be true or false, not {v!r}")
        return v

    def date(self, node: yaml.Node, what: str) -> datetime.date:
        v = self.scalar(node, what)
        if isinstance(v, datetime.datetime) or not isinstance(v, datetime.date):
            raise self.fail(node, f"{what} must be a day like 2026-11-20, not {v!r}")
        return v

    def integer(self, node: yaml.Node, what: str, low: int, high: int) -> int:
        v = self.scalar(node, what)
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise self.fail(node, f"{what} must be a whole number from {low} to {high}, not {v!r}")
        return v

    def duration(self, node: yaml.Node, what: str, allow_zero: bool = False) -> float:
        v = self.scalar(node, what)
        seconds: float | None = None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            seconds = float(v)
        elif isinstance(v, str) and (m := _DURATION.match(v.strip())):
            seconds = float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m[2]]
        if seconds is None or seconds < 0 or (seconds == 0 and not allow_zero) or seconds > 86400:
            raise self.fail(node, f"{what} must be a duration like 250ms, 5s or 2m, not {v!r}")
        return seconds

    def address(self, node: yaml.Node, what: str) -> Address:
        v = self.string(node, what)
        host, sep, port = v.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        bad = self.fail(node, f"{what}: {v!r} is not a HOST:PORT address "
                              "(an IP address or DNS name, then a port from 1 to 65535)")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise bad
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOSTNAME.fullmatch(host):
                raise bad from None
        return Address(host, int(port))

    def unix_socket(self, node: yaml.Node, what: str) -> UnixSocket:
        v = self.string(node, what)
        if not v.startswith("/"):
            raise self.fail(node, f"{what}: {v!r} is not an absolute path (e.g. /run/rpcauthz/extauthz.sock)")
        if "\0" in v or len(v.encode()) > _MAX_SOCKET_PATH:
            raise self.fail(node, f"{what}: {v!r} is longer than the {_MAX_SOCKET_PATH} bytes a unix socket "
                                  "path may have (or holds a NUL)")
        return UnixSocket(v)


_GATEWAY_KEYS = {
    "listen": "HOST:PORT the gateway listens on",
    "admin": "HOST:PORT of Envoy's admin interface (keep on 127.0.0.1)",
    "ext_authz": "the ext_authz server: address, timeout, max_requests, health_check",
    "jwt": "issuer, audiences, jwks_uri or jwks_file, jwks_cache",
    "route_timeout": "default upstream timeout per call (0 = none, for long streams)",
    "connect_timeout": "upstream connect timeout",
    "max_request_bytes": "largest request body buffered for payload-scoped approvals",
    "upstream_max_requests": "circuit breaker: concurrent requests per upstream",
    "access_log": "path of the JSON access log (default /dev/stdout)",
    "fast_path": "true, or {principal_claim: CLAIM, audit_flush: DURATION, audit_buffer_bytes: N, "
                 "audit_file: PATH, shards: N, delta_xds: BOOL}: Envoy's "
                 "RBAC filter, fed over xDS by the ext_authz server (fast_path.enabled), allows static calls "
                 "without a Check; each allow is audited through Envoy's access log to that server",
}
_EXT_AUTHZ_KEYS = {"address": "HOST:PORT", "unix_socket": "absolute path of the server's unix socket "
                   "(instead of address: a sidecar in Envoy's pod)", "timeout": "Envoy's deadline for one Check",
                   "max_requests": "circuit breaker", "health_check": "gRPC health checks",
                   "tls": "mTLS to the server: true (default files), a mapping, or false (loopback only)"}
_TLS_KEYS = {"ca": "CA of the server certificate", "cert": "Envoy's client certificate",
             "key": "its private key", "server_name": "DNS name in the server certificate (also SNI)"}
_JWT_KEYS = {"issuer": "iss claim", "audiences": "accepted aud values",
             "jwks_uri": "http(s) URL of the JWKS", "jwks_file": "local JWKS file",
             "jwks_cache": "how long a fetched JWKS is cached"}
_SERVICE_KEYS = {
    "name": "full service name (pkg.Service)", "prefix": "package prefix ending in '.' (pkg.)",
    "upstream": "HOST:PORT", "timeout": "upstream timeout", "ext_authz": "false skips ext_authz",
    "jwt": "false skips JWT verification", "dry_run": "true: decide and log, but allow",
    "dry_run_since": "the day dry_run was switched on (YYYY-MM-DD), for `mpactl envoy dry-run --max-days`",
    "buffer_body": "true or a byte limit: send the request body to ext_authz",
    "routes": "per-method overrides",
}
_ROUTE_KEYS = {"method": "method name", "timeout": "upstream timeout",
               "ext_authz": "false skips ext_authz", "jwt": "false skips JWT verification",
               "buffer_body": "true or a byte limit"}


def load_catalog(path: str | Path) -> Catalog:
    """Read and check a services catalog; raises ``CatalogError`` naming file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise CatalogError(str(p), 0, f"cannot read: {e.strerror}") from None
    return parse_catalog(text, str(p))


def parse_catalog(text: str, file: str = "<catalog>") -> Catalog:
    """Check a catalog given as text (``file`` is used in messages)."""
    r = _Reader(file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise CatalogError(file, line, f"not valid YAML: {getattr(e, 'problem', e)}") from None
    if root is None:
        raise CatalogError(file, 1, "the catalog is empty; it needs `gateway:` and `services:`")
    top = r.mapping(root, "catalog", {"gateway": "gateway-wide settings", "services": "the services"})
    for key in ("gateway", "services"):
        if key not in top:
            raise r.fail(root, f"catalog: missing required key {key!r}")
    gateway = _gateway(r, top["gateway"])
    services = _services(r, top["services"], gateway)
    return Catalog(gateway, tuple(services), file)


def _gateway(r: _Reader, node: yaml.Node) -> Gateway:
    g = r.mapping(node, "gateway", _GATEWAY_KEYS)
    for key in ("listen", "ext_authz", "jwt"):
        if key not in g:
            raise r.fail(node, f"gateway: missing required key {key!r}")
    ea_node = g["ext_authz"]
    ea = r.mapping(ea_node, "gateway.ext_authz", _EXT_AUTHZ_KEYS)
    if ("address" in ea) == ("unix_socket" in ea):
        raise r.fail(ea_node, "gateway.ext_authz: give exactly one of 'address' (HOST:PORT) and "
                              "'unix_socket' (a path), not " + ("both" if "address" in ea else "neither"))
    kw: dict[str, Any] = {
        "listen": r.address(g["listen"], "gateway.listen"),
        "ext_authz": (r.address(ea["address"], "gateway.ext_authz.address") if "address" in ea
                      else r.unix_socket(ea["unix_socket"], "gateway.ext_authz.unix_socket")),
        "jwt": _jwt(r, g["jwt"]),
    }
    if "timeout" in ea:
        kw["ext_authz_timeout"] = r.duration(ea["timeout"], "gateway.ext_authz.timeout")
    if "max_requests" in ea:
        kw["ext_authz_max_requests"] = r.integer(ea["max_requests"], "gateway.ext_authz.max_requests", 1, 1_000_000)
    if "health_check" in ea:
        kw["ext_authz_health_check"] = r.boolean(ea["health_check"], "gateway.ext_authz.health_check")
    kw["ext_authz_tls"] = _ext_authz_tls(r, ea.get("tls"), ea_node, kw["ext_authz"])
    if "admin" in g:
        kw["admin"] = r.address(g["admin"], "gateway.admin")
    if "route_timeout" in g:
        kw["route_timeout"] = r.duration(g["route_timeout"], "gateway.route_timeout", allow_zero=True)
    if "connect_timeout" in g:
        kw["connect_timeout"] = r.duration(g["connect_timeout"], "gateway.connect_timeout")
    if "max_request_bytes" in g:
        kw["max_request_bytes"] = r.integer(g["max_request_bytes"], "gateway.max_request_bytes", 1, 64 << 20)
    if "upstream_max_requests" in g:
        kw["upstream_max_requests"] = r.integer(g["upstream_max_requests"], "gateway.upstream_max_requests", 1, 1_000_000)
    if "access_log" in g:
        kw["access_log"] = r.string(g["access_log"], "gateway.access_log")
    if "fast_path" in g:
        fp = g["fast_path"]
        if isinstance(fp, yaml.MappingNode):
            m = r.mapping(fp, "gateway.fast_path", {
                "principal_claim": "the JWT claim naming the caller (the server's identity.principal_claim; "
                                   "default sub)",
                "audit_flush": "how often Envoy sends its buffered access log of fast-path allows (default 1s)",
                "audit_buffer_bytes": "or when this many bytes are buffered (default 1 MiB)",
                "audit_file": "absolute path: fast-path allows go to this file (Envoy's file access log, "
                              "the server's fast_path.audit_file) instead of the gRPC access log",
                "shards": "the policy in this many parts, by a hash of the caller (the server's "
                          "fast_path.shards, the same number; default 1)",
                "delta_xds": "Envoy asks for the policy over incremental ADS (TTL refreshes without "
                             "the policy's bytes; default true; false: state of the world)"})
            kw["fast_path"] = True
            if "principal_claim" in m:
                kw["fast_path_claim"] = r.string(m["principal_claim"], "gateway.fast_path.principal_claim",
                                                 _CLAIM, "a claim name such as sub or email")
            if "audit_flush" in m:
                kw["fast_path_audit_flush"] = r.duration(m["audit_flush"], "gateway.fast_path.audit_flush")
            if "audit_buffer_bytes" in m:
                kw["fast_path_audit_buffer_bytes"] = r.integer(m["audit_buffer_bytes"],
                                                               "gateway.fast_path.audit_buffer_bytes", 1024, 64 << 20)
            if "audit_file" in m:
                kw["fast_path_audit_file"] = r.string(m["audit_file"], "gateway.fast_path.audit_file",
                                                      _ABSOLUTE, "an absolute path")
            if "shards" in m:
                kw["fast_path_shards"] = r.integer(m["shards"], "gateway.fast_path.shards", 1, MAX_SHARDS)
            if "delta_xds" in m:
                kw["fast_path_delta_xds"] = r.boolean(m["delta_xds"], "gateway.fast_path.delta_xds")
        else:
            kw["fast_path"] = r.boolean(fp, "gateway.fast_path")
    return Gateway(**kw)


def _ext_authz_tls(r: _Reader, node: yaml.Node | None, parent: yaml.Node,
                   addr: Address | UnixSocket) -> ExtAuthzTls | None:
    """``tls`` of gateway.ext_authz: on by default; plaintext only to a loopback address.

    Whoever can send the server a Check can claim any identity, so the link must be
    authenticated (the server requires Envoy's client certificate) unless both ends share
    the machine's loopback interface, or it is a unix socket (never TLS: the server's
    socket is plaintext and its file mode, 0660, decides who may connect).
    """
    if isinstance(addr, UnixSocket):
        if node is not None and not (isinstance(node, yaml.ScalarNode) and r.scalar(node, "tls") is False):
            raise r.fail(node, "gateway.ext_authz.tls: not used with unix_socket: the server's unix socket "
                               "is plaintext, and its file mode (0660, Envoy's group) decides who may connect")
        return None
    if node is None:
        return None if is_loopback(addr.host) else ExtAuthzTls()
    if isinstance(node, yaml.ScalarNode):
        if r.boolean(node, "gateway.ext_authz.tls"):
            return ExtAuthzTls()
        if not is_loopback(addr.host):
            raise r.fail(node, f"gateway.ext_authz.tls: false is allowed only for a loopback address, not {addr}: "
                               "anyone who reaches the server could send Checks with forged identities")
        return None
    t = r.mapping(node, "gateway.ext_authz.tls", _TLS_KEYS)
    return ExtAuthzTls(**{k: r.string(v, f"gateway.ext_authz.tls.{k}") for k, v in t.items()})


def _jwt(r: _Reader, node: yaml.Node) -> Jwt:
    j = r.mapping(node, "gateway.jwt", _JWT_KEYS)
    if "issuer" not in j:
        raise r.fail(node, "gateway.jwt: missing required key 'issuer'")
    if ("jwks_uri" in j) == ("jwks_file" in j):
        raise r.fail(node, "gateway.jwt: give exactly one of jwks_uri or jwks_file")
    aud: tuple[str, ...] = ()
    if "audiences" in j:
        a = j["audiences"]
        if not isinstance(a, yaml.SequenceNode):
            raise r.fail(a, "gateway.jwt.audiences must be a list of strings")
        aud = tuple(r.string(x, "gateway.jwt.audiences item") for x in a.value)
    uri = None
    if "jwks_uri" in j:
        uri = r.string(j["jwks_uri"], "gateway.jwt.jwks_uri")
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise r.fail(j["jwks_uri"], f"gateway.jwt.jwks_uri: {uri!r} is not an http(s) URL")
    return Jwt(issuer=r.string(j["issuer"], "gateway.jwt.issuer"), audiences=aud, jwks_uri=uri,
               jwks_file=r.string(j["jwks_file"], "gateway.jwt.jwks_file") if "jwks_file" in j else None,
               jwks_cache=r.duration(j["jwks_cache"], "gateway.jwt.jwks_cache") if "jwks_cache" in j else 300.0)


def _buffer(r: _Reader, node: yaml.Node, what: str, gateway: Gateway) -> int | None:
    v = r.scalar(node, what)
    if v is True:
        return gateway.max_request_bytes
    if v is False:
        return None
    return r.integer(node, what, 1, gateway.max_request_bytes)


def _services(r: _Reader, node: yaml.Node, gateway: Gateway) -> list[ServiceEntry]:
    if not isinstance(node, yaml.SequenceNode):
        raise r.fail(node, "services must be a list of entries (- name: pkg.Service ...)")
    out: list[ServiceEntry] = []
    seen: dict[str, int] = {}
    for item in node.value:
        where = f"services entry at line {item.start_mark.line + 1}"
        s = r.mapping(item, where, _SERVICE_KEYS)
        if ("name" in s) == ("prefix" in s):
            raise r.fail(item, f"{where}: give exactly one of 'name' (pkg.Service) or 'prefix' (pkg.)")
        if "upstream" not in s:
            raise r.fail(item, f"{where}: missing required key 'upstream' (HOST:PORT)")
        is_prefix = "prefix" in s
        match = (r.string(s["prefix"], "prefix", _PACKAGE_PREFIX, "a package prefix ends with a dot, e.g. acme.billing.")
                 if is_prefix else
                 r.string(s["name"], "name", _SERVICE_NAME, "a full service name, e.g. acme.billing.v1.Invoices"))
        line = item.start_mark.line + 1
        if match in seen:
            raise r.fail(item, f"duplicate service {match!r} (first on line {seen[match]})")
        seen[match] = line
        kw: dict[str, Any] = {"match": match, "is_prefix": is_prefix, "line": line,
                              "upstream": r.address(s["upstream"], f"{match}: upstream")}
        if "timeout" in s:
            kw["timeout"] = r.duration(s["timeout"], f"{match}: timeout", allow_zero=True)
        for flag in ("ext_authz", "jwt", "dry_run"):
            if flag in s:
                kw[flag] = r.boolean(s[flag], f"{match}: {flag}")
        if "dry_run_since" in s:
            if not kw.get("dry_run"):
                raise r.fail(s["dry_run_since"], f"{match}: dry_run_since needs dry_run: true")
            kw["dry_run_since"] = r.date(s["dry_run_since"], f"{match}: dry_run_since")
        if "buffer_body" in s:
            kw["buffer_body"] = _buffer(r, s["buffer_body"], f"{match}: buffer_body", gateway)
        if "routes" in s:
            if is_prefix:
                raise r.fail(s["routes"], f"{match}: per-method routes need a full service 'name', not a prefix")
            kw["routes"] = tuple(_routes(r, s["routes"], match, gateway))
        out.append(ServiceEntry(**kw))
    if not out:
        raise r.fail(node, "services: the list is empty; the gateway would route nothing")
    return out


def _routes(r: _Reader, node: yaml.Node, service: str, gateway: Gateway) -> list[RouteOverride]:
    if not isinstance(node, yaml.SequenceNode):
        raise r.fail(node, f"{service}: routes must be a list of entries (- method: Name ...)")
    out: list[RouteOverride] = []
    seen: dict[str, int] = {}
    for item in node.value:
        m = r.mapping(item, f"{service}: route", _ROUTE_KEYS)
        if "method" not in m:
            raise r.fail(item, f"{service}: route without 'method'")
        method = r.string(m["method"], f"{service}: route method", _METHOD_NAME, "a bare method name like Check")
        if method in seen:
            raise r.fail(item, f"{service}: duplicate route for method {method!r} (first on line {seen[method]})")
        seen[method] = item.start_mark.line + 1
        kw: dict[str, Any] = {"method": method, "line": seen[method]}
        what = f"{service}/{method}"
        if "timeout" in m:
            kw["timeout"] = r.duration(m["timeout"], f"{what}: timeout", allow_zero=True)
        for flag in ("ext_authz", "jwt"):
            if flag in m:
                kw[flag] = r.boolean(m[flag], f"{what}: {flag}")
        if "buffer_body" in m:
            kw["buffer_body"] = _buffer(r, m["buffer_body"], f"{what}: buffer_body", gateway)
        out.append(RouteOverride(**kw))
    return out


# --- rendering ------------------------------------------------------------------------------

def _dur(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _cluster_name(entry: ServiceEntry) -> str:
    return "svc_" + re.sub(r"[^A-Za-z0-9]+", "_", entry.match).strip("_")


def _http2_options() -> dict:
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}


def _cluster(name: str, addr: Address | UnixSocket, connect_timeout: float, max_requests: int,
             http2: bool = True) -> dict:
    endpoint = ({"pipe": {"path": addr.path}} if isinstance(addr, UnixSocket)
                else {"socket_address": {"address": addr.host, "port_value": addr.port}})
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if isinstance(addr, UnixSocket) or addr.is_ip else "STRICT_DNS",
        "connect_timeout": _dur(connect_timeout),
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT", "max_connections": max_requests,
            "max_pending_requests": max_requests, "max_requests": max_requests,
            "max_retries": 3}]},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": endpoint}}]}]},
    }
    if http2:
        c["typed_extension_protocol_options"] = _http2_options()
    return c


def _per_route(entry: ServiceEntry, ext_authz: bool, jwt: bool, buffer_body: int | None) -> dict:
    cfg: dict[str, Any] = {}
    if ext_authz:
        check: dict[str, Any] = {"context_extensions": {CTX_SERVICE: entry.match}}
        if entry.dry_run:
            check["context_extensions"][CTX_DRY_RUN] = "true"
        if buffer_body:
            check["with_request_body"] = {"max_request_bytes": buffer_body,
                                          "allow_partial_message": False, "pack_as_bytes": True}
        cfg[EXT_AUTHZ_NAMESPACE] = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": check}
    else:
        cfg[EXT_AUTHZ_NAMESPACE] = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "disabled": True}
    if entry.dry_run or not ext_authz:
        # The fast path never decides a dry-run service (its refusals are let through and
        # audited as such by ext_authz), nor a route without ext_authz.
        cfg[FAST_PATH_FILTER] = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                                 "disabled": True}
    if not jwt:
        cfg[JWT_NAMESPACE] = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
            "disabled": True}
    return cfg


def _route(match: dict, entry: ServiceEntry, timeout: float | None, ext_authz: bool, jwt: bool,
           buffer_body: int | None, gateway: Gateway) -> dict:
    t = timeout if timeout is not None else (entry.timeout if entry.timeout is not None else gateway.route_timeout)
    return {
        "match": {**match, "grpc": {}},
        "route": {"cluster": _cluster_name(entry), "timeout": _dur(t)},
        # Route metadata shows in the access log and in the admin config_dump (where
        # context_extensions are redacted), so a dry-run route is visible everywhere.
        "metadata": {"filter_metadata": {ROUTE_METADATA: {
            "service": entry.match, "dry_run": entry.dry_run, "ext_authz": ext_authz,
            **({"dry_run_since": entry.dry_run_since.isoformat()} if entry.dry_run_since else {})}}},
        "typed_per_filter_config": _per_route(entry, ext_authz, jwt, buffer_body),
    }


def _routes_for(catalog: Catalog) -> list[dict]:
    """Most specific first: exact methods, then services, then longer package prefixes."""
    g = catalog.gateway
    exact: list[dict[str, Any]] = []
    services: list[tuple[int, dict[str, Any]]] = []
    prefixes: list[tuple[int, dict[str, Any]]] = []
    for s in catalog.services:
        for ro in s.routes:
            exact.append(_route(
                {"path": f"/{s.match}/{ro.method}"}, s, ro.timeout,
                ro.ext_authz if ro.ext_authz is not None else s.ext_authz,
                ro.jwt if ro.jwt is not None else s.jwt,
                ro.buffer_body if ro.buffer_body is not None else s.buffer_body, g))
        r = _route({"prefix": s.path_prefix}, s, None, s.ext_authz, s.jwt, s.buffer_body, g)
        (prefixes if s.is_prefix else services).append((len(s.match), r))
    prefixes.sort(key=lambda x: -x[0])
    return exact + [r for _, r in services] + [r for _, r in prefixes]


def _jwt_filter(jwt: Jwt) -> tuple[dict, list[dict]]:
    provider: dict[str, Any] = {
        "issuer": jwt.issuer,
        "forward": False,
        "payload_in_metadata": JWT_PAYLOAD_KEY,
        "clock_skew_seconds": 30,
    }
    if jwt.audiences:
        provider["audiences"] = list(jwt.audiences)
    clusters = []
    if jwt.jwks_uri:
        u = urlsplit(jwt.jwks_uri)
        tls = u.scheme == "https"
        addr = Address(u.hostname or "", u.port or (443 if tls else 80))
        c = _cluster("jwks", addr, 2.0, 64, http2=False)
        if tls:
            c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": addr.host}}
        clusters.append(c)
        provider["remote_jwks"] = {
            "http_uri": {"uri": jwt.jwks_uri, "cluster": "jwks", "timeout": "2s"},
            "cache_duration": _dur(jwt.jwks_cache),
            "async_fetch": {"fast_listener": False},
            "retry_policy": {"num_retries": 3},
        }
    else:
        provider["local_jwks"] = {"filename": jwt.jwks_file}
    filt = {
        "name": JWT_NAMESPACE,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"engineers": provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "engineers"}}],
        },
    }
    return filt, clusters


def _ext_authz_transport_socket(tls: ExtAuthzTls) -> dict:
    """mTLS to the ext_authz server: Envoy's certificate, the server's checked by name."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": tls.server_name,
        "common_tls_context": {
            # gRPC servers speak HTTP/2 over TLS only when ALPN says so.
            "alpn_protocols": ["h2"],
            "tls_certificates": [{"certificate_chain": {"filename": tls.cert},
                                  "private_key": {"filename": tls.key}}],
            "validation_context": {
                "trusted_ca": {"filename": tls.ca},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": tls.server_name}}],
            },
        },
    }}


#: Failover: a Check that never reached a server (refused connection or stream, a server that
#: stopped taking RPCs) goes to another replica. Not on resets: a Check cut mid-way may have
#: spent an approval use, and a second try would spend another.
EXT_AUTHZ_RETRY_POLICY: dict[str, Any] = {
    "retry_on": "connect-failure,refused-stream,unavailable",
    "num_retries": 2,
    "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.05s"},
    "retry_host_predicate": [{
        "name": "envoy.retry_host_predicates.previous_hosts",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": 3,
}

#: A dead or NOT_SERVING replica leaves rotation after 2 failed checks 1 s apart. The
#: no-traffic interval is pinned: Envoy's default (60 s) kept a dead replica healthy for a minute.
EXT_AUTHZ_HEALTH_CHECK: dict[str, Any] = {
    "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s", "unhealthy_interval": "1s",
    "interval_jitter": "0.1s", "unhealthy_threshold": 2, "healthy_threshold": 1,
    "grpc_health_check": {"service_name": "envoy.service.auth.v3.Authorization"},
}

#: Between health checks, 3 Checks in a row that could not reach a replica eject it for 5 s;
#: never more than half the replicas (README: the panic threshold).
EXT_AUTHZ_OUTLIER_DETECTION: dict[str, Any] = {
    "split_external_local_origin_errors": True, "consecutive_local_origin_failure": 3,
    "enforcing_consecutive_local_origin_failure": 100, "consecutive_5xx": 5, "interval": "1s",
    "base_ejection_time": "5s", "max_ejection_percent": 50,
}


def _ext_authz_filter(g: Gateway) -> dict:
    return {
        "name": EXT_AUTHZ_NAMESPACE,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": "ext_authz", "retry_policy": dict(EXT_AUTHZ_RETRY_POLICY)},
                             "timeout": _dur(g.ext_authz_timeout)},
            # Fail closed: an unreachable or slow ext_authz is an error, never an allow, and
            # the error is 503 (gRPC UNAVAILABLE), not 403, so outages do not look like denials.
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
            "metadata_context_namespaces": [JWT_NAMESPACE],
            "include_peer_certificate": True,
            "clear_route_cache": False,
        },
    }


ACCESS_LOG_FIELDS = {
    "time": "%START_TIME%",
    "path": "%REQ(:PATH)%",
    "http_status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS(NUMBER)%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    # The decision, as the ext_authz server reported it in dynamic metadata.
    "decision_id": f"%DYNAMIC_METADATA({EXT_AUTHZ_NAMESPACE}:decision_id)%",
    "outcome": f"%DYNAMIC_METADATA({EXT_AUTHZ_NAMESPACE}:outcome)%",
    "mode": f"%DYNAMIC_METADATA({EXT_AUTHZ_NAMESPACE}:mode)%",
    "rule": f"%DYNAMIC_METADATA({EXT_AUTHZ_NAMESPACE}:rule)%",
    "principal": f"%DYNAMIC_METADATA({EXT_AUTHZ_NAMESPACE}:principal)%",
    "approval_id": f"%DYNAMIC_METADATA({EXT_AUTHZ_NAMESPACE}:approval_id)%",
    "request_id": f"%DYNAMIC_METADATA({EXT_AUTHZ_NAMESPACE}:request_id)%",
    "shadow": f"%DYNAMIC_METADATA({EXT_AUTHZ_NAMESPACE}:shadow)%",
    # From the route (the catalog), so present even when ext_authz could not answer.
    "route_service": f"%METADATA(ROUTE:{ROUTE_METADATA}:service)%",
    "dry_run": f"%METADATA(ROUTE:{ROUTE_METADATA}:dry_run)%",
    "jwt_sub": f"%DYNAMIC_METADATA({JWT_NAMESPACE}:{JWT_PAYLOAD_KEY}:sub)%",
    "mpa_request_url": "%RESP(X-MPA-REQUEST-URL)%",
    "x_request_id": "%REQ(X-REQUEST-ID)%",
}


def render(catalog: Catalog) -> dict:
    """Envoy's bootstrap for ``catalog`` as a dict (see docs/owners.md for each knob)."""
    g = catalog.gateway
    jwt_filter, jwt_clusters = _jwt_filter(g.jwt)
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "engineers_grpc",
        "codec_type": "AUTO",
        # Keep the path exactly as sent: ext_authz authorizes the literal /pkg.Service/Method,
        # so no rewriting may change what it authorized.
        "normalize_path": False,
        "merge_slashes": False,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "stream_idle_timeout": "300s",
        "request_headers_timeout": "10s",
        "use_remote_address": True,
        "generate_request_id": True,
        "access_log": [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": g.access_log,
                "log_format": {"json_format": dict(ACCESS_LOG_FIELDS)},
            },
        }],
        "route_config": {
            "name": "grpc_services",
            "virtual_hosts": [{"name": "grpc", "domains": ["*"], "routes": [
                *_routes_for(catalog),
                # Last: Envoy skips ext_authz for a request that matches no route, so every
                # other path goes to a cluster without endpoints, after ext_authz checked
                # (and explained) it.
                {"match": {"prefix": "/"}, "route": {"cluster": "unrouted"}},
            ]}],
        },
        "http_filters": [
            jwt_filter,
            _ext_authz_filter(g),
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    ext_cluster = _cluster("ext_authz", g.ext_authz, min(g.connect_timeout, 0.25),
                           g.ext_authz_max_requests)
    # Retries happen only while a replica fails; bound them so they cannot double the load.
    ext_cluster["circuit_breakers"]["thresholds"][0]["max_retries"] = max(3, g.ext_authz_max_requests // 16)
    if g.ext_authz_tls is not None:
        ext_cluster["transport_socket"] = _ext_authz_transport_socket(g.ext_authz_tls)
    if g.ext_authz_health_check:
        # The server reports NOT_SERVING while it drains; Envoy then stops sending it checks.
        ext_cluster["health_checks"] = [dict(EXT_AUTHZ_HEALTH_CHECK)]
        ext_cluster["outlier_detection"] = dict(EXT_AUTHZ_OUTLIER_DETECTION)
    unrouted = {"name": "unrouted", "type": "STATIC", "connect_timeout": "0.250s",
                "load_assignment": {"cluster_name": "unrouted", "endpoints": []}}
    upstreams: dict[str, dict] = {}
    for s in catalog.services:
        upstreams[_cluster_name(s)] = _cluster(_cluster_name(s), s.upstream, g.connect_timeout,
                                               g.upstream_max_requests)
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": g.admin.host, "port_value": g.admin.port}}},
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": {"socket_address": {"address": g.listen.host, "port_value": g.listen.port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": [ext_cluster, unrouted, *jwt_clusters, *upstreams.values()],
        },
    }
    if not g.fast_path:
        return _without_fast_path_route_configs(bootstrap)
    return with_fast_path(bootstrap, xds_cluster="ext_authz", claim=g.fast_path_claim,
                          audit_flush_interval_s=g.fast_path_audit_flush,
                          audit_buffer_bytes=g.fast_path_audit_buffer_bytes, audit_file=g.fast_path_audit_file,
                          shards=g.fast_path_shards, delta_xds=g.fast_path_delta_xds)


def _without_fast_path_route_configs(bootstrap: dict) -> dict:
    """Drop the per-route fast-path settings when there is no fast-path filter to refer to."""
    for listener in bootstrap["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for vh in hcm["route_config"]["virtual_hosts"]:
            for route in vh["routes"]:
                route.get("typed_per_filter_config", {}).pop(FAST_PATH_FILTER, None)
    return bootstrap


def render_yaml(catalog: Catalog) -> str:
    """``render`` as YAML with a header saying where it came from."""
    header = (f"# Rendered by `mpactl envoy render --catalog {catalog.source}`. Do not edit by hand:\n"
              "# change the catalog and render again. Knobs: docs/owners.md.\n")
    if catalog.gateway.fast_path:
        header += ("# FAST PATH: Envoy allows static calls itself (RBAC over xDS); the ext_authz server "
                   "must run with fast_path.enabled: true\n")
        if catalog.gateway.fast_path_audit_file is not None:
            header += (f"# FAST PATH AUDIT to the file {catalog.gateway.fast_path_audit_file}: the server must run with "
                       "fast_path.audit_file set to it, and only Envoy may write it\n")
    if catalog.dry_run_services:
        header += f"# DRY RUN (decisions logged, not enforced): {', '.join(catalog.dry_run_services)}\n"
    return header + yaml.safe_dump(render(catalog), sort_keys=False, default_flow_style=False)


@dataclasses.dataclass(frozen=True)
class DryRunService:
    """A service (or package prefix) in dry-run, and since when if the catalog says."""

    name: str
    since: datetime.date | None = None

    def days(self, today: datetime.date) -> int | None:
        """Whole days in dry-run by ``today`` (None: unknown, no ``dry_run_since``)."""
        return None if self.since is None else (today - self.since).days

    def overdue(self, today: datetime.date, max_days: int) -> bool:
        """In dry-run longer than ``max_days``, or for an unknown time (counted as too long)."""
        days = self.days(today)
        return days is None or days > max_days


def dry_run_in_catalog(catalog: Catalog) -> list[DryRunService]:
    """The catalog's services in dry-run, with their ``dry_run_since``."""
    return [DryRunService(s.match, s.dry_run_since) for s in catalog.services if s.dry_run]


def dry_run_from_config_dump(dump: dict) -> list[DryRunService]:
    """Services a running Envoy treats as dry-run, from its admin ``/config_dump`` JSON (the
    route metadata ``render`` writes; a ``dry_run_since`` that is not a day counts as unknown)."""
    found: dict[str, DryRunService] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            meta = node.get("filter_metadata", {}).get(ROUTE_METADATA) if isinstance(
                node.get("filter_metadata"), dict) else None
            if isinstance(meta, dict) and meta.get("dry_run") is True:
                name = str(meta.get("service", "?"))
                since: datetime.date | None = None
                raw = meta.get("dry_run_since")
                if isinstance(raw, str):
                    with contextlib.suppress(ValueError):
                        since = datetime.date.fromisoformat(raw)
                found.setdefault(name, DryRunService(name, since))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dump)
    return list(found.values())


__all__: list[str] = ["Address", "Catalog", "CatalogError", "DryRunService", "ExtAuthzTls", "Gateway", "Jwt",
                      "RouteOverride", "ServiceEntry", "dry_run_from_config_dump", "dry_run_in_catalog",
                      "load_catalog", "parse_catalog", "render", "render_yaml"]
