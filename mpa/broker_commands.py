"""The engineer's broker commands for ``mpa``: request, review, list and fetch credentials.

``register(app, request_app)`` adds them to the ``mpa`` CLI:

* ``mpa request aws ROLE --reason ...`` / ``mpa request k8s CLUSTER --group G --reason ...``
* ``mpa broker review ID --approve|--reject``, ``mpa broker list``, ``mpa broker show ID``
* ``mpa review`` (in ``mpa.cli``) also walks the broker requests you can review, through
  :func:`pending_reviews`, whenever a broker is configured (``MPA_BROKER``)
* ``mpa fetch [ID | --aws ROLE | --k8s CLUSTER] --format json|env|credential-process|exec-credential``

``--json`` on ``request aws``/``request k8s``, ``broker list``, ``broker show`` and ``broker review``
prints the requests as :func:`request_json` describes them.

``mpa fetch --format credential-process`` prints the AWS CLI's ``credential_process`` JSON
(Version 1); ``--format exec-credential`` prints a ``client.authentication.k8s.io/v1``
ExecCredential for kubectl. Both exit non-zero with the reason on stderr when there is nothing
to fetch, which is how the AWS CLI and kubectl expect a plugin to fail.

Connection (flags or environment): ``--broker``/``MPA_BROKER`` (host:port of the gateway's broker
listener), ``--broker-cert``/``MPA_BROKER_CERT`` (the broker's certificate, pinned),
``--broker-name``/``MPA_BROKER_NAME`` (its TLS name), and the engineer's token from
``MPA_TOKEN``, the file ``--token-file``/``MPA_TOKEN_FILE``, or the session ``mpa login`` saved
(``$MPA_CONFIG_DIR/session.json``, default ``~/.config/mpa``).

Exit codes follow ``mpa``'s (README.md, "Exit codes"): 0 done; 1 refused; 2 bad usage; 3 not
signed in or token refused; 4 broker unreachable or unavailable.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
import typer
from google.protobuf.message import DecodeError

from mpa.v1 import broker_pb2
from rpcauthz.console import ExitCode, JsonOption, fail, print_json

STATE_NAMES = {v: k.removeprefix("REQUEST_STATE_").lower() for k, v in broker_pb2.RequestState.items()}


def _session_file() -> Path:
    return Path(os.environ.get("MPA_CONFIG_DIR") or Path.home() / ".config" / "mpa") / "session.json"


class _Conn:
    def __init__(self, broker: str | None, cert: Path | None, name: str | None,
                 token_file: Path | None) -> None:
        self.broker = broker or os.environ.get("MPA_BROKER")
        cert = cert or (Path(os.environ["MPA_BROKER_CERT"]) if os.environ.get("MPA_BROKER_CERT") else None)
        self.cert = cert
        self.name = name or os.environ.get("MPA_BROKER_NAME") or "broker.mpa.internal"
        self.token_file = token_file or (Path(os.environ["MPA_TOKEN_FILE"]) if os.environ.get("MPA_TOKEN_FILE")
                                         else None)

    def token(self) -> str:
        """The engineer's token: MPA_TOKEN, --token-file, or the session `mpa login` saved."""
        token = os.environ.get("MPA_TOKEN", "").strip()
        if not token and self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as e:
                fail(f"cannot read the token file {self.token_file}: {e}", ExitCode.NOT_SIGNED_IN)
        if not token:
            try:
                token = str(json.loads(_session_file().read_text()).get("token") or "").strip()
            except (OSError, ValueError):
                token = ""
        if not token:
            fail("not signed in: run `mpa login`, or set MPA_TOKEN / --token-file", ExitCode.NOT_SIGNED_IN)
        return token

    def client(self):
        from enclave_bridge.broker.client import BrokerClient
        if not self.broker:
            fail("no broker address: pass --broker HOST:PORT or set MPA_BROKER", ExitCode.USAGE)
        if not self.cert:
            fail("no broker certificate to pin: pass --broker-cert FILE or set MPA_BROKER_CERT", ExitCode.USAGE)
        try:
            cert_pem = self.cert.read_bytes()
        except OSError as e:
            fail(f"cannot read the broker certificate {self.cert}: {e}", ExitCode.USAGE)
        token = self.token()
        try:
            return BrokerClient(self.broker, cert_pem, token, server_name=self.name)
        except ValueError as e:
            fail(str(e), ExitCode.USAGE)


def _conn_options():
    return dict(
        broker=typer.Option(None, "--broker", help="host:port of the broker (env MPA_BROKER)"),
        cert=typer.Option(None, "--broker-cert", help="the broker's certificate PEM, pinned (env MPA_BROKER_CERT)"),
        name=typer.Option(None, "--broker-name", help="the broker's TLS server name (env MPA_BROKER_NAME)"),
        token_file=typer.Option(None, "--token-file", help="file holding your token (env MPA_TOKEN_FILE)"),
    )


_EXIT_FOR = {grpc.StatusCode.UNAUTHENTICATED: ExitCode.NOT_SIGNED_IN, grpc.StatusCode.UNAVAILABLE: ExitCode.UNREACHABLE,
             grpc.StatusCode.DEADLINE_EXCEEDED: ExitCode.UNREACHABLE, grpc.StatusCode.INVALID_ARGUMENT: ExitCode.USAGE}


def _rpc(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as e:
        code = e.code() or grpc.StatusCode.UNKNOWN
        fail(f"{code.name.lower().replace('_', ' ')}: {e.details()}", _EXIT_FOR.get(code, ExitCode.FAILURE))


def _target(r) -> str:
    if r.WhichOneof("target") == "aws":
        return f"aws role {r.aws.role}"
    return f"k8s {r.kubernetes.cluster} as {','.join(r.kubernetes.groups)}"


def _show(r) -> str:
    lines = [f"{r.id}  {STATE_NAMES.get(r.state, '?')}  {_target(r)}",
             f"  requested by {r.requester} at {r.created_at.ToDatetime(UTC).isoformat()}",
             f"  reason: {r.reason}"]
    if r.incident:
        lines.append(f"  incident: {r.incident}")
    view = _view(r)
    lines.append(f"  mode: {r.mode or '?'}")
    lines.append(f"  who may approve: {view.approver_rule}")
    if view.state == "pending" and view.eligible is not None:
        lines.append(f"  can approve now: {', '.join(view.eligible) or 'nobody'}")
    if view.routing_note:
        lines.append(f"  WARNING: {view.routing_note}")
    lines.append("  credential lifetime: " + (f"{r.duration_seconds} s" if r.duration_seconds
                                               else "the broker's default for this target"))
    if r.state == broker_pb2.REQUEST_STATE_PENDING and r.HasField("expires_at"):
        lines.append(f"  expires unless approved: {r.expires_at.ToDatetime(UTC).isoformat()}")
    for a in r.approvals:
        lines.append(f"  approved by {a.approver}" + (f": {a.comment}" if a.comment else ""))
    if r.HasField("valid_until"):
        lines.append(f"  fetchable until {r.valid_until.ToDatetime(UTC).isoformat()}")
    if r.close_reason or r.closed_by:
        lines.append(f"  closed by {r.closed_by or 'broker'}: {r.close_reason}")
    return "\n".join(lines)


def _view(r):
    """The request as the approvals server's pages read it (who may approve, routing)."""
    from .broker_link import CredentialView
    return CredentialView.from_proto(r)


def _time(ts) -> str | None:
    return ts.ToDatetime(UTC).isoformat() if ts.seconds or ts.nanos else None


def request_json(r) -> dict[str, Any]:
    """One credential request as ``--json`` prints it.

    Fields: ``id``, ``state`` (pending, approved, rejected, ...), ``requester``, ``target``
    (``{"kind": "aws", "role"}`` or ``{"kind": "kubernetes", "cluster", "groups"}``), ``reason``,
    ``incident``, ``mode``, ``approvals`` (``[{approver, at, comment}]``), ``created_at``,
    ``expires_at``, ``valid_until`` (ISO 8601 or null), ``duration_seconds``, ``closed_by``,
    ``close_reason``, ``fetches``, ``eligible_approvers`` (who may approve it now under the
    broker's grants; null when the broker does not say) and ``routing_note`` (non-empty when
    too few people can approve it).
    """
    if r.WhichOneof("target") == "aws":
        target: dict[str, Any] = {"kind": "aws", "role": r.aws.role}
    else:
        target = {"kind": "kubernetes", "cluster": r.kubernetes.cluster, "groups": list(r.kubernetes.groups)}
    view = _view(r)
    return {"id": r.id, "state": STATE_NAMES.get(r.state, "?"), "requester": r.requester, "target": target,
            "reason": r.reason, "incident": r.incident, "mode": r.mode,
            "approvals": [{"approver": a.approver, "at": _time(a.at), "comment": a.comment} for a in r.approvals],
            "created_at": _time(r.created_at), "expires_at": _time(r.expires_at),
            "valid_until": _time(r.valid_until), "duration_seconds": r.duration_seconds,
            "closed_by": r.closed_by, "close_reason": r.close_reason, "fetches": r.fetches,
            "eligible_approvers": None if view.eligible is None else list(view.eligible),
            "routing_note": view.routing_note}


class BrokerReview:
    """One broker credential request waiting for the caller's review (used by ``mpa review``)."""

    def __init__(self, client, request) -> None:
        self._client = client
        self.request = request
        self.id: str = request.id

    def describe(self) -> str:
        """The request as ``mpa broker show`` prints it."""
        return "credential request (enclave broker)\n" + _show(self.request)

    def approve(self, comment: str) -> str:
        r = _rpc(self._client.review, self.id, approve=True, comment=comment)
        return f"approved: {r.id} is now {STATE_NAMES.get(r.state, '?')}"

    def reject(self, comment: str) -> str:
        r = _rpc(self._client.review, self.id, approve=False, comment=comment)
        return f"rejected: {r.id} is now {STATE_NAMES.get(r.state, '?')}"


def broker_configured() -> bool:
    """True when a broker address is known (``MPA_BROKER``), so ``mpa review`` should ask it."""
    return bool(os.environ.get("MPA_BROKER", "").strip())


def pending_reviews() -> list[BrokerReview]:
    """Pending broker requests the caller may approve, oldest first.

    Connects as the broker commands do (``MPA_BROKER``, ``MPA_BROKER_CERT``, ``MPA_BROKER_NAME``,
    and the token from ``MPA_TOKEN`` / ``MPA_TOKEN_FILE`` / the ``mpa login`` session); exits with
    the broker commands' codes when the broker cannot be reached or refuses the token.
    """
    c = _Conn(None, None, None, None).client()
    pending = _rpc(c.list, reviewable=True)
    return [BrokerReview(c, r) for r in reversed(list(pending))]


def show_credential(request_id: str, as_json: bool) -> None:
    """Print one credential request (``mpa show cr-...``), connecting as :func:`pending_reviews`."""
    if not broker_configured():
        fail(f"{request_id} is a credential request held by the broker: set MPA_BROKER and "
             "MPA_BROKER_CERT (or use mpa broker show --broker HOST:PORT --broker-cert FILE)", ExitCode.USAGE)
    r = _rpc(_Conn(None, None, None, None).client().get, request_id)
    if as_json:
        print_json(request_json(r))
    else:
        typer.echo(_show(r))


def register(app: typer.Typer, request_app: typer.Typer) -> None:
    """Add the broker commands to ``mpa`` (``request_app`` is its ``request`` group)."""
    o = _conn_options()

    @request_app.command("aws")
    def request_aws(role: str = typer.Argument(..., help="AWS role name as the broker offers it"),
                    reason: str = typer.Option(..., "--reason", "-r", help="why you need it (shown to reviewers)"),
                    incident: str = typer.Option("", "--incident", help="incident reference (break-glass roles)"),
                    duration: int = typer.Option(0, "--duration", help="session seconds (900..3600; default: role max)"),
                    broker: str | None = o["broker"], cert: Path | None = o["cert"],
                    name: str | None = o["name"], token_file: Path | None = o["token_file"],
                    as_json: bool = JsonOption()) -> None:
        """Ask for temporary AWS credentials for ROLE; another engineer must approve."""
        c = _Conn(broker, cert, name, token_file).client()
        r = _rpc(c.request_aws, role, reason=reason, incident=incident, duration_seconds=duration)
        if as_json:
            print_json(request_json(r))
            return
        typer.echo(_show(r))
        typer.echo(f"\nAsk another engineer to run: mpa review (or mpa broker review {r.id} --approve)\n"
                   f"Then: mpa fetch {r.id}")

    @request_app.command("k8s")
    def request_k8s(cluster: str = typer.Argument(..., help="Kubernetes cluster name as the broker offers it"),
                    group: list[str] = typer.Option(..., "--group", "-g", help="group to act as (repeatable)"),
                    reason: str = typer.Option(..., "--reason", "-r", help="why you need it (shown to reviewers)"),
                    incident: str = typer.Option("", "--incident", help="incident reference (break-glass clusters)"),
                    duration: int = typer.Option(0, "--duration", help="token seconds (default: cluster max)"),
                    broker: str | None = o["broker"], cert: Path | None = o["cert"],
                    name: str | None = o["name"], token_file: Path | None = o["token_file"],
                    as_json: bool = JsonOption()) -> None:
        """Ask for a temporary Kubernetes token for CLUSTER; another engineer must approve."""
        c = _Conn(broker, cert, name, token_file).client()
        r = _rpc(c.request_kubernetes, cluster, list(group), reason=reason, incident=incident,
                 duration_seconds=duration)
        if as_json:
            print_json(request_json(r))
            return
        typer.echo(_show(r))
        typer.echo(f"\nAsk another engineer to run: mpa review (or mpa broker review {r.id} --approve)\n"
                   f"Then: mpa fetch {r.id} --format exec-credential")

    broker_app = typer.Typer(help="Review and list credential requests held by the enclave broker.",
                             no_args_is_help=True)
    app.add_typer(broker_app, name="broker")

    @broker_app.command("review")
    def review(request_id: str = typer.Argument(..., help="the request id (cr-...)"),
               approve: bool = typer.Option(False, "--approve", help="approve the request"),
               reject: bool = typer.Option(False, "--reject", help="reject the request"),
               comment: str = typer.Option("", "--comment", "-m", help="note for the requester and the audit log"),
               broker: str | None = o["broker"], cert: Path | None = o["cert"],
               name: str | None = o["name"], token_file: Path | None = o["token_file"],
               as_json: bool = JsonOption()) -> None:
        """Approve or reject someone else's credential request (show it first without a flag)."""
        c = _Conn(broker, cert, name, token_file).client()
        if approve == reject:
            shown = _rpc(c.get, request_id)
            if as_json and not approve:
                print_json(request_json(shown))
                return
            typer.echo(_show(shown))
            if approve and reject:
                fail("choose one of --approve or --reject", ExitCode.USAGE)
            typer.echo("\nRe-run with --approve or --reject.")
            return
        done = _rpc(c.review, request_id, approve=approve, comment=comment)
        if as_json:
            print_json(request_json(done))
        else:
            typer.echo(_show(done))

    @broker_app.command("list")
    def list_(mine: bool = typer.Option(False, "--mine", help="only your requests"),
              reviewable: bool = typer.Option(False, "--reviewable", help="only requests you can review now"),
              broker: str | None = o["broker"], cert: Path | None = o["cert"],
              name: str | None = o["name"], token_file: Path | None = o["token_file"],
              as_json: bool = JsonOption()) -> None:
        """List credential requests."""
        c = _Conn(broker, cert, name, token_file).client()
        found = list(_rpc(c.list, mine=mine, reviewable=reviewable))
        if as_json:
            print_json([request_json(r) for r in found])
            return
        for r in found:
            typer.echo(f"{r.id}  {STATE_NAMES.get(r.state, '?'):9}  {r.requester:30}  {_target(r)}  {r.reason}")

    @broker_app.command("show")
    def show(request_id: str = typer.Argument(..., help="the request id (cr-...)"),
             broker: str | None = o["broker"], cert: Path | None = o["cert"],
             name: str | None = o["name"], token_file: Path | None = o["token_file"],
             as_json: bool = JsonOption()) -> None:
        """Show one credential request."""
        r = _rpc(_Conn(broker, cert, name, token_file).client().get, request_id)
        if as_json:
            print_json(request_json(r))
        else:
            typer.echo(_show(r))

    @app.command("fetch")
    def fetch(request_id: str | None = typer.Argument(None, help="the approved request (cr-...)"),
              aws: str | None = typer.Option(None, "--aws", help="your newest approved request for this AWS role"),
              k8s: str | None = typer.Option(None, "--k8s", help="your newest approved request for this cluster"),
              fmt: str = typer.Option("json", "--format", "-f",
                                      help="json | env | credential-process (AWS CLI) | exec-credential (kubectl)"),
              cache: bool = typer.Option(True, "--cache/--no-cache",
                                         help="for credential-process/exec-credential: reuse unexpired "
                                              "credentials from $MPA_CONFIG_DIR/cache (0600) instead of "
                                              "minting new ones on every aws/kubectl call"),
              broker: str | None = o["broker"], cert: Path | None = o["cert"],
              name: str | None = o["name"], token_file: Path | None = o["token_file"]) -> None:
        """Fetch credentials for your approved request.

        As an AWS CLI credential_process: mpa fetch --aws ROLE --format credential-process

        As a kubectl exec credential plugin: mpa fetch --k8s CLUSTER --format exec-credential
        """
        if fmt not in ("json", "env", "credential-process", "exec-credential"):
            fail(f"unknown --format {fmt!r}; use json, env, credential-process or exec-credential", ExitCode.USAGE)
        if sum(x is not None for x in (request_id, aws, k8s)) != 1:
            fail("name exactly one of: a request id, --aws ROLE, --k8s CLUSTER", ExitCode.USAGE)
        conn = _Conn(broker, cert, name, token_file)
        use_cache = cache and fmt in ("credential-process", "exec-credential")
        cache_key = f"{conn.broker}|{_who(conn.token()) if use_cache else ''}|{request_id or ''}|{aws or ''}|{k8s or ''}"
        got = _cache_get(cache_key) if use_cache else None
        if got is not None:
            _print_credentials(got, request_id or "(cached)", fmt)
            return
        c = conn.client()
        if request_id is None:
            approved = _rpc(c.list, mine=True, states=[broker_pb2.REQUEST_STATE_APPROVED])
            match = [r for r in approved
                     if (aws and r.WhichOneof("target") == "aws" and r.aws.role == aws)
                     or (k8s and r.WhichOneof("target") == "kubernetes" and r.kubernetes.cluster == k8s)]
            if not match:
                fail(f"you have no approved request for {'aws role ' + aws if aws else 'cluster ' + str(k8s)}; "
                      "run `mpa request` and ask a colleague to approve it")
            request_id = match[0].id
        got = _rpc(c.fetch, request_id)
        if use_cache:
            _cache_put(cache_key, got)
        _print_credentials(got, request_id, fmt)


def _who(token: str) -> str:
    """Whose credentials a cache entry holds: the token's subject (read unverified; only a cache key)."""
    try:
        payload = token.split(".")[1]
        return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"])
    except (IndexError, ValueError, KeyError, TypeError):
        return hashlib.sha256(token.encode()).hexdigest()


def _expiry(got: broker_pb2.FetchResponse) -> float:
    kind = got.WhichOneof("credentials")
    return getattr(got, kind).expiration.ToDatetime(UTC).timestamp() if kind else 0.0


def _cache_file(key: str) -> Path:
    return _session_file().parent / "cache" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _cache_get(key: str) -> broker_pb2.FetchResponse | None:
    """Cached credentials with more than a minute left, else None (a bad cache file is ignored)."""
    try:
        entry = json.loads(_cache_file(key).read_text())
        got = broker_pb2.FetchResponse.FromString(base64.b64decode(entry["response"]))
    except (OSError, ValueError, KeyError, DecodeError):
        return None
    return got if _expiry(got) - time.time() > 60 else None


def _cache_put(key: str, got: broker_pb2.FetchResponse) -> None:
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"response": base64.b64encode(got.SerializeToString()).decode()}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache we cannot write only costs a fresh fetch next time


def _print_credentials(got: broker_pb2.FetchResponse, request_id: str, fmt: str) -> None:
    """Write credentials in the requested format (exits non-zero if the kind does not fit)."""
    kind = got.WhichOneof("credentials")
    if kind == "aws":
        a = got.aws
        expiration = a.expiration.ToDatetime(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if fmt == "exec-credential":
            fail(f"{request_id} holds AWS credentials; exec-credential is for Kubernetes", ExitCode.USAGE)
        if fmt == "env":
            typer.echo(f"export AWS_ACCESS_KEY_ID={a.access_key_id}\nexport AWS_SECRET_ACCESS_KEY={a.secret_access_key}\n"
                       f"export AWS_SESSION_TOKEN={a.session_token}\nexport AWS_REGION={a.region}")
        else:
            out = {"Version": 1, "AccessKeyId": a.access_key_id, "SecretAccessKey": a.secret_access_key,
                   "SessionToken": a.session_token, "Expiration": expiration}
            if fmt == "json":
                out = {**out, "RoleArn": a.role_arn, "Region": a.region, "RequestId": request_id}
            sys.stdout.write(json.dumps(out) + "\n")
    elif kind == "kubernetes":
        k = got.kubernetes
        expiration = k.expiration.ToDatetime(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if fmt == "credential-process":
            fail(f"{request_id} holds a Kubernetes token; credential-process is for AWS", ExitCode.USAGE)
        if fmt == "exec-credential":
            api_version = "client.authentication.k8s.io/v1"
            info = os.environ.get("KUBERNETES_EXEC_INFO")
            if info:
                try:
                    api_version = json.loads(info).get("apiVersion") or api_version
                except ValueError:
                    pass
            out = {"apiVersion": api_version, "kind": "ExecCredential",
                   "status": {"token": k.token, "expirationTimestamp": expiration}}
        elif fmt == "env":
            typer.echo(f"export KUBE_TOKEN={k.token}")
            return
        else:
            out = {"token": k.token, "expiration": expiration, "cluster": k.cluster, "server": k.server,
                   "request_id": request_id}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        fail("the broker returned no credentials")


def main() -> None:
    """Run these commands on their own (``python -m mpa.broker_commands``)."""
    app = typer.Typer(name="mpa", help="Engineer commands for the enclave credential broker.",
                      no_args_is_help=True, add_completion=False)
    request_app = typer.Typer(help="Ask for access.", no_args_is_help=True)
    app.add_typer(request_app, name="request")
    register(app, request_app)
    app()


if __name__ == "__main__":
    main()
