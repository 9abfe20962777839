"""``mpa``: the engineers' command line for approval requests.

    mpa login --server http://approvals:8081 --as alice@example.com   # dev issuer
    mpa login --server ... --issuer https://sso.example.com --client-id mpa   # OIDC device flow
    mpa request rpc /pkg.v1.Ledger/AdjustBalance --reason "refund for ticket 4411"
    mpa list --scope reviewable
    mpa review                      # walk pending requests you can review
    mpa show ID | approve ID | reject ID | cancel ID

Exit codes (README.md, "Exit codes"): 0 done; 1 refused (the message says why; nothing
changed); 2 bad usage; 3 not signed in or token refused; 4 server unreachable or unavailable.
The token is kept 0600 in ``$MPA_CONFIG_DIR`` (default ``~/.config/mpa``).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from typing import Any

import httpx
import typer
from rich.table import Table

from policy import RequestState
from rpcauthz.console import ExitCode, JsonOption, emit, fail, stderr_console, stdout_console, version_option

app = typer.Typer(name="mpa", no_args_is_help=True, add_completion=True,
                  help="Ask for, review and approve multi-party approvals for RPCs that need "
                       "another engineer's approval. Start with: mpa login",
                  epilog="Typical use: [bold]mpa login --server URL --issuer SSO_URL[/], then "
                         "[bold]mpa request rpc /pkg.Svc/Method -r 'why'[/] (or open the link the "
                         "gateway printed); a reviewer runs [bold]mpa review[/]. Commands that list or show "
                         "something take --json. Exit codes: 0 done, 1 refused, 2 bad usage, 3 not signed in, "
                         "4 server unavailable (README.md, \"Exit codes\"). Shell completion: mpa --install-completion.",
                  rich_markup_mode="rich")
request_app = typer.Typer(no_args_is_help=True,
                          help="Ask for approval: to call an RPC (rpc), or for credentials from the broker (aws, k8s).")
app.add_typer(request_app, name="request")

out = stdout_console()
err = stderr_console()


@app.callback()
def _root(version: bool = version_option("mpa")) -> None:
    """The mpa command group (``--version`` is its only option)."""


# --- local state --------------------------------------------------------------------------
def config_dir() -> pathlib.Path:
    """Where the token lives: ``$MPA_CONFIG_DIR`` or ``~/.config/mpa``."""
    return pathlib.Path(os.environ.get("MPA_CONFIG_DIR") or pathlib.Path.home() / ".config" / "mpa")


def _session_path() -> pathlib.Path:
    return config_dir() / "session.json"


def save_session(data: dict[str, Any]) -> pathlib.Path:
    """Write the session (server URL and token) readable by the owner only."""
    path = _session_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def load_session() -> dict[str, Any]:
    path = _session_path()
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}; run: mpa login", ExitCode.NOT_SIGNED_IN)


# --- talking to the server ----------------------------------------------------------------
class Client:
    def __init__(self, server: str | None = None) -> None:
        session = load_session()
        self.server = (server or os.environ.get("MPA_SERVER") or session.get("server") or "").rstrip("/")
        if not self.server:
            fail("no approvals server known: run mpa login --server URL (or set MPA_SERVER)", ExitCode.USAGE)
        self.token = os.environ.get("MPA_TOKEN") or session.get("token")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> tuple[int, Any]:
        if not self.token:
            fail("not signed in: run mpa login", ExitCode.NOT_SIGNED_IN)
        try:
            resp = httpx.request(method, self.server + path, json=body, params=params, timeout=15,
                                 headers={"Authorization": f"Bearer {self.token}"})
        except httpx.HTTPError as e:
            fail(f"cannot reach the approvals server at {self.server}: {e}", ExitCode.UNREACHABLE)
        try:
            data = resp.json()
        except ValueError:
            data = {"error": {"code": "bad_response", "message": resp.text[:200]}}
        if resp.status_code >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            message = error.get("message") or f"HTTP {resp.status_code}"
            code = (ExitCode.NOT_SIGNED_IN if resp.status_code == 401 else
                    ExitCode.UNREACHABLE if resp.status_code >= 500 else ExitCode.FAILURE)
            fail(f"{message} [{error.get('code', resp.status_code)}]", code)
        return resp.status_code, data


def _request_id(ref: str) -> str:
    """Accept an id or the request's link."""
    m = re.search(r"/requests/([A-Za-z0-9_-]+)/?$", ref.strip())
    rid = m.group(1) if m else ref.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", rid):
        fail(f"{ref!r} is not a request id or link", ExitCode.USAGE)
    return rid


# --- printing -----------------------------------------------------------------------------
def _short(ts: str | None) -> str:
    return "" if not ts else ts.replace("T", " ")[:19] + " UTC"


def _approvals_words(r: dict[str, Any]) -> str:
    if not r["approvals"]:
        return f"none yet (0 of {r['required_approvals']})"
    got = ", ".join(f"{a['approver']} at {_short(a['at'])}" for a in r["approvals"])
    return f"{got} ({len(r['approvals'])} of {r['required_approvals']})"


def print_request(r: dict[str, Any]) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [("id", r["id"]), ("link", r["url"]), ("state", r["state"] + (
                " (waiting for the requester's reason)" if r["awaiting_reason"] else "")),
            ("requester", r["requester"]), ("rpc", r["path"]), ("mode", r["mode"]),
            ("why approval", r["why_approval"]), ("who may approve", r["approver_rule"]),
            *([("can approve now", ", ".join(r.get("eligible_approvers") or []) or "nobody")]
              if r["state"] == "pending" else []),
            ("reason", r["reason"] or "(not given yet)")]
    if r.get("incident"):
        rows.append(("incident", r["incident"]))
    rows.append(("scope", f"exact body sha256 {r['body_sha256']}" if r["body_sha256"] else "any call to this method"))
    if r.get("body_view"):
        rows.append(("the call", r["body_view"]))
    rows.append(("limits", limits_words(r)))
    rows.append(("created", _short(r["created_at"])))
    if r["state"] == "pending":
        rows.append(("expires", _short(r["expires_at"])))
    if r["valid_until"]:
        rows.append(("valid until", _short(r["valid_until"])))
    rows.append(("approved by", _approvals_words(r)))
    if r["closed_by"] or r["close_reason"]:
        rows.append(("closed", f"{r['closed_by'] or ''} {_short(r['closed_at'])} {r['close_reason']}".strip()))
    if r["you"]["why_not"]:
        rows.append(("you", r["you"]["why_not"]))
    if r.get("routing_note"):
        rows.append(("WARNING", r["routing_note"]))
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t, highlight=False, markup=False)


def duration_words(seconds: int) -> str:
    """3600 -> '1h', 90 -> '1m30s'."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def limits_words(r: dict[str, Any]) -> str:
    """How long the approval lasts and how many calls it allows, as the approver agrees to it."""
    words = f"approval lasts {duration_words(r['approval_ttl_seconds'])}"
    if r["max_uses"]:
        words += f"; at most {r['max_uses']} call{'s' if r['max_uses'] != 1 else ''} ({r['uses']} used)"
    else:
        words += "; any number of calls"
    return words


def print_list(reqs: list[dict[str, Any]]) -> None:
    if not reqs:
        out.print("no requests")
        return
    t = Table()
    for col in ("id", "state", "requester", "rpc", "reason", "approved by", "expires"):
        t.add_column(col, overflow="fold")
    for r in reqs:
        t.add_row(r["id"], r["state"], r["requester"], r["path"], r["reason"] or "(awaiting reason)",
                  ", ".join(a["approver"] for a in r["approvals"]) or "-",
                  _short(r["expires_at"]) if r["state"] == "pending" else _short(r["valid_until"]))
    out.print(t, highlight=False, markup=False)


JsonOpt = JsonOption("print JSON for scripts")
ServerOpt = typer.Option(None, "--server", help="approvals server URL (default: from mpa login)")


# --- commands -----------------------------------------------------------------------------
@app.command()
def login(server: str = typer.Option(None, "--server", help="approvals server URL, e.g. http://127.0.0.1:8081"),
          as_user: str | None = typer.Option(None, "--as", help="DEV ISSUER ONLY: sign in as this engineer"),
          issuer: str | None = typer.Option(None, "--issuer", help="OIDC issuer URL: sign in with the device flow"),
          client_id: str = typer.Option("mpa", "--client-id", help="OIDC client id for the device flow"),
          scope: str = typer.Option("openid email profile", "--scope", help="OIDC scopes")) -> None:
    """Sign in and remember the token (0600, in $MPA_CONFIG_DIR or ~/.config/mpa)."""
    server = (server or os.environ.get("MPA_SERVER") or load_session().get("server") or "").rstrip("/")
    if not server:
        fail("say which approvals server: mpa login --server URL", ExitCode.USAGE)
    if issuer:
        from .oidc import DeviceFlowError, device_flow_login
        try:
            token = device_flow_login(issuer, client_id, scope,
                                      show=lambda m: err.print(m, highlight=False, soft_wrap=True))
        except DeviceFlowError as e:
            fail(str(e), ExitCode.NOT_SIGNED_IN)
    elif as_user:
        try:
            resp = httpx.post(f"{server}/api/dev/token", json={"subject": as_user}, timeout=15)
        except httpx.HTTPError as e:
            fail(f"cannot reach the approvals server at {server}: {e}", ExitCode.UNREACHABLE)
        if resp.status_code == 404:
            fail(f"{server} does not offer dev sign-in (it trusts a real issuer): "
                 "use mpa login --issuer URL", ExitCode.NOT_SIGNED_IN)
        if resp.status_code != 200:
            try:
                why = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                why = f"HTTP {resp.status_code}"
            fail(f"dev sign-in refused by {server}: {why}", ExitCode.NOT_SIGNED_IN)
        token = resp.json()["token"]
    else:
        fail("say how to sign in: --as USER (dev issuer) or --issuer URL (OIDC device flow)", ExitCode.USAGE)
    save_session({"server": server, "token": token})
    client = Client(server)
    client.token = token
    _, me = client.call("GET", "/api/v1/me")
    out.print(f"signed in to {server} as {me['principal']} (roles: {', '.join(me['roles']) or 'none'})",
              highlight=False)


@app.command()
def whoami(server: str | None = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Show who the stored token says you are, and your roles."""
    _, me = Client(server).call("GET", "/api/v1/me")
    emit(me, as_json, lambda m: out.print(f"{m['principal']} (roles: {', '.join(m['roles']) or 'none'})",
                                          highlight=False))


_DURATION = re.compile(r"^(\d+)([smhd]?)$")


def _seconds(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        fail(f"--duration {text!r}: use a positive number with s, m, h or d (e.g. 30m)", ExitCode.USAGE)
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@request_app.command("rpc")
def request_rpc(rpc: str = typer.Argument(..., help="/pkg.Service/Method"),
                reason: str = typer.Option(..., "--reason", "-r", help="why you need this call"),
                incident: str | None = typer.Option(None, "--incident", help="incident reference (break-glass)"),
                body_file: pathlib.Path | None = typer.Option(None, "--body-file",
                    help="bind the approval to this exact serialized request body"),
                body_sha256: str | None = typer.Option(None, "--body-sha256", help="...or to this body digest"),
                body_json: str | None = typer.Option(None, "--body",
                    help="...or to this request message, as JSON (the server encodes it with the method's input type)"),
                duration: str | None = typer.Option(None, "--duration", help="how long the approval lasts, e.g. 30m"),
                max_uses: int | None = typer.Option(None, "--max-uses", min=1, help="how many calls it allows"),
                server: str | None = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Ask for approval to call one RPC (or give the reason for the request the gateway opened)."""
    m = re.fullmatch(r"/?([A-Za-z_][\w.]*)/(\w+)", rpc.strip())
    if not m:
        fail(f"{rpc!r} is not /pkg.Service/Method", ExitCode.USAGE)
    if sum(x is not None for x in (body_file, body_sha256, body_json)) > 1:
        fail("give one of --body, --body-file or --body-sha256", ExitCode.USAGE)
    parsed_body: Any = None
    if body_json is not None:
        try:
            parsed_body = json.loads(body_json)
        except ValueError as e:
            fail(f"--body is not JSON: {e}", ExitCode.USAGE)
        if not isinstance(parsed_body, dict):
            fail("--body must be a JSON object (the request message's fields)", ExitCode.USAGE)
    if body_file:
        body_sha256 = hashlib.sha256(body_file.read_bytes()).hexdigest()
    body: dict[str, Any] = {"service": m.group(1), "method": m.group(2), "reason": reason}
    if incident:
        body["incident"] = incident
    if body_sha256:
        body["body_sha256"] = body_sha256
    if parsed_body is not None:
        body["body_json"] = parsed_body
    if duration:
        body["duration_seconds"] = _seconds(duration)
    if max_uses:
        body["max_uses"] = max_uses
    status, r = Client(server).call("POST", "/api/v1/requests", body)

    def show(r: dict[str, Any]) -> None:
        verb = "created" if status == 201 else "updated"
        out.print(f"request {verb}: {r['url']}", highlight=False)
        kept = []
        if duration and r["approval_ttl_seconds"] < body["duration_seconds"]:
            kept.append(f"approval lasts {duration_words(r['approval_ttl_seconds'])}")
        if max_uses and r["max_uses"] and r["max_uses"] < max_uses:
            kept.append(f"at most {r['max_uses']} calls")
        if kept:
            out.print(f"note: the open request's tighter limits stay ({', '.join(kept)}); "
                      "limits only ever narrow", highlight=False)
        print_request(r)
    emit(r, as_json, show)


#: The states ``--state`` takes (``policy.RequestState``'s values).
_STATES = tuple(s.value for s in RequestState)


@app.command("list")
def list_requests(scope: str = typer.Option("mine", "--scope", help="mine, reviewable or all"),
                  state: str | None = typer.Option(None, "--state", help=", ".join(_STATES)),
                  server: str | None = ServerOpt, as_json: bool = JsonOpt) -> None:
    """List your requests (or --scope reviewable: those waiting for you)."""
    if scope not in ("mine", "reviewable", "all"):
        fail(f"--scope {scope!r}: use mine, reviewable or all", ExitCode.USAGE)
    if state is not None and state not in _STATES:
        fail(f"--state {state!r}: use {', '.join(_STATES)}", ExitCode.USAGE)
    params = {"scope": scope, **({"state": state} if state else {})}
    _, data = Client(server).call("GET", "/api/v1/requests", params=params)
    emit(data["requests"], as_json, print_list)


@app.command()
def show(request: str = typer.Argument(..., help="request id or link"),
         server: str | None = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Show one request: who asks, what, why, and who approved it when.

    A credential request (``cr-...`` or its ``/credentials/`` link) is read from the broker
    (MPA_BROKER), as ``mpa broker show`` does.
    """
    cred = re.search(r"(?:^|/credentials/)(cr-[A-Za-z0-9_-]{1,61})/?$", request.strip())
    if cred:
        broker_commands.show_credential(cred.group(1), as_json)
        return
    _, r = Client(server).call("GET", f"/api/v1/requests/{_request_id(request)}")
    emit(r, as_json, print_request)


def _act(action: str, request: str, comment: str, server: str | None, as_json: bool) -> None:
    _, r = Client(server).call("POST", f"/api/v1/requests/{_request_id(request)}/{action}",
                               {"comment": comment})

    def printer(r: dict[str, Any]) -> None:
        out.print(f"{action}: request {r['id']} is now {r['state']}", highlight=False)
        print_request(r)
    emit(r, as_json, printer)


@app.command()
def approve(request: str = typer.Argument(..., help="request id or link"),
            comment: str = typer.Option("", "--comment", "-m", help="optional words for the record"),
            server: str | None = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Approve another engineer's request."""
    _act("approve", request, comment, server, as_json)


@app.command()
def reject(request: str = typer.Argument(..., help="request id or link"),
           reason: str = typer.Option("", "--reason", "-m", help="why not"),
           server: str | None = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Reject another engineer's request."""
    _act("reject", request, reason, server, as_json)


@app.command()
def cancel(request: str = typer.Argument(..., help="request id or link"),
           reason: str = typer.Option("", "--reason", "-m", help="why"),
           server: str | None = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Withdraw your request, or revoke an approval you gave."""
    _act("cancel", request, reason, server, as_json)


class _RpcReview:
    """One approval request of the approvals service, as ``mpa review`` walks it."""

    def __init__(self, client: Client, r: dict[str, Any]) -> None:
        self.client, self.r, self.id = client, r, r["id"]

    def show(self) -> None:
        print_request(self.r)

    def approve(self, comment: str) -> str:
        _, done = self.client.call("POST", f"/api/v1/requests/{self.id}/approve", {"comment": comment})
        return f"approved: {done['id']} is now {done['state']}"

    def reject(self, comment: str) -> str:
        _, done = self.client.call("POST", f"/api/v1/requests/{self.id}/reject", {"comment": comment})
        return f"rejected: {done['id']}"


def _server_known(server: str | None) -> bool:
    return bool(server or os.environ.get("MPA_SERVER") or load_session().get("server"))


def _broker_reviews(required: bool) -> list[Any] | None:
    """Pending broker credential requests (None when no credential broker is configured)."""
    if broker_commands.broker_configured():
        return broker_commands.pending_reviews()
    if required:
        fail("--broker-only: no credential broker configured (set MPA_BROKER and MPA_BROKER_CERT)", ExitCode.USAGE)
    return None


@app.command()
def review(server: str | None = ServerOpt,
           broker_only: bool = typer.Option(False, "--broker-only",
                                            help="only credential requests held by the enclave broker"),
           rpc_only: bool = typer.Option(False, "--rpc-only", help="only RPC approval requests")) -> None:
    """Walk the pending requests you can review, one at a time: approve, reject or skip.

    Walks RPC approval requests and, when a credential broker is configured (MPA_BROKER), the
    broker's credential requests (aws/k8s) too.
    """
    if broker_only and rpc_only:
        fail("choose at most one of --broker-only and --rpc-only", ExitCode.USAGE)
    items: list[Any] = []
    broker_items = None if rpc_only else _broker_reviews(required=broker_only)
    # Without a broker the approvals server is required (as before); with one it is optional.
    if not broker_only and (broker_items is None or _server_known(server)):
        client = Client(server)
        _, data = client.call("GET", "/api/v1/requests", params={"scope": "reviewable"})
        items += [_RpcReview(client, r) for r in data["requests"]]
    items += broker_items or []
    if not items:
        out.print("nothing waits for your review")
        return
    for i, item in enumerate(items, 1):
        if out.is_terminal:
            out.rule(f"{i} of {len(items)}")
        else:  # no terminal width to fill: a short rule
            out.print(f"--- {i} of {len(items)} ---", highlight=False, markup=False)
        if isinstance(item, _RpcReview):
            item.show()
        else:
            out.print(item.describe(), highlight=False, markup=False)
        where = f"{i} of {len(items)}"
        choice = _answer("[a]pprove, [r]eject, [s]kip, [q]uit", "s", where).strip().lower()
        if choice.startswith("q"):
            break
        if choice.startswith("a"):
            comment = _answer("comment (optional)", "", where)
            out.print(item.approve(comment), highlight=False, markup=False)
        elif choice.startswith("r"):
            why = _answer("why not", "", where)
            out.print(item.reject(why), highlight=False, markup=False)
        else:
            out.print("skipped")


def _answer(question: str, default: str, where: str) -> str:
    """The reviewer's answer to ``question`` on standard input; when it ends first (a script
    that gave fewer answers than there are requests) or Ctrl-C, stop with what happened."""
    try:
        return str(typer.prompt(question, default=default, show_default=bool(default)))
    except typer.Abort:
        fail(f"no answer at request {where} (standard input ended or was interrupted): it and the "
             "ones after it were left as they are; answer them with mpa review in a terminal, or "
             "mpa approve / mpa reject ID")


# The credential broker's engineer commands: ``request aws``/``request k8s``, ``broker``, ``fetch``.
from . import broker_commands  # noqa: E402  (registers onto the apps defined above)

broker_commands.register(app, request_app)


def main() -> None:
    """Entry point of the ``mpa`` console script."""
    app(prog_name="mpa")


if __name__ == "__main__":
    main()
