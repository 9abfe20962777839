"""A local AWS for the demo and tests: moto in server mode, with the STS parts moto leaves out.

moto's server answers STS, IAM, S3 and KMS over real HTTP, so boto3 and the AWS CLI talk to it as
to AWS (``endpoint_url``). Its STS accepts ``SourceIdentity`` and session ``Tags`` on AssumeRole
but ignores them, and it answers any request whatever its credentials. :class:`LocalAws` puts a
small WSGI gate in front of moto's own application that adds what the credential broker's loop
needs to be seen end to end:

* **Credentials are checked.** Every request must name a known access key: an IAM user's key made
  here (the broker's own, from :meth:`LocalAws.create_user`) or a session minted by AssumeRole,
  presented with its session token and before it expires. Anything else gets AWS's own refusal
  (``InvalidClientTokenId``, ``ExpiredToken``, HTTP 403). Signatures are not verified.
* **AssumeRole is the broker's.** Only a user key may call it, only for a role made with
  :meth:`LocalAws.create_role`, and only with a ``SourceIdentity`` (the demo roles' trust policy
  requires ``sts:SetSourceIdentity`` and ``sts:TagSession``); the answer carries
  ``SourceIdentity`` as AWS's does.
* **A trail.** Every AssumeRole (source identity, tags, role) and every call made with a minted
  session (service, action, the session's source identity) is appended to :attr:`LocalAws.trail`
  and, if given, to a JSON-lines file, the way CloudTrail would show an engineer's actions.

DEMO AND TESTS ONLY: nothing here is a security boundary.
"""
from __future__ import annotations

import io
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REGION = "eu-west-2"
ACCOUNT = "123456789012"  # moto's default account
_CREDENTIAL = re.compile(r"Credential=([A-Z0-9]+)/[^/]*/[^/]*/([a-z0-9-]+)/")
_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/mpa-broker"},
                   "Action": ["sts:AssumeRole", "sts:SetSourceIdentity", "sts:TagSession"],
                   "Condition": {"StringLike": {"sts:SourceIdentity": "*"}}}],
}


@dataclass
class _Session:
    role_arn: str
    source_identity: str
    tags: dict[str, str]
    session_token: str
    expiration: datetime


@dataclass
class _Registry:
    users: dict[str, str] = field(default_factory=dict)      # access key id -> user name
    sessions: dict[str, _Session] = field(default_factory=dict)
    roles: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _aws_error(start_response: Callable[..., Any], status: str, code: str, message: str) -> list[bytes]:
    body = (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
            f"<Code>{code}</Code><Message>{message}</Message></Error>"
            "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>").encode()
    start_response(status, [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))])
    return [body]


def _tag(xml: str, name: str) -> str | None:
    m = re.search(rf"<{name}>([^<]*)</{name}>", xml)
    return m.group(1) if m else None


class _Gate:
    """WSGI middleware in front of moto: credentials, AssumeRole rules, SourceIdentity, trail."""

    def __init__(self, app: Callable[..., Iterable[bytes]], registry: _Registry,
                 record: Callable[[dict[str, Any]], None]) -> None:
        self._app, self._reg, self._record = app, registry, record

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        form: dict[str, str] = {}
        if "x-www-form-urlencoded" in environ.get("CONTENT_TYPE", ""):
            form = dict(urllib.parse.parse_qsl(body.decode(errors="replace")))
        form.update(dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""))))
        action = form.get("Action") or f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}"

        m = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
        if not m:
            return _aws_error(start_response, "403 Forbidden", "MissingAuthenticationToken",
                              "Request is missing Authentication Token")
        key_id, service = m.group(1), m.group(2)
        now = datetime.now(UTC)
        with self._reg.lock:
            user = self._reg.users.get(key_id)
            session = self._reg.sessions.get(key_id)
        if user is None and session is None:
            return _aws_error(start_response, "403 Forbidden", "InvalidClientTokenId",
                              "The security token included in the request is invalid.")
        if session is not None:
            if environ.get("HTTP_X_AMZ_SECURITY_TOKEN") != session.session_token:
                return _aws_error(start_response, "403 Forbidden", "InvalidClientTokenId",
                                  "The security token included in the request is invalid.")
            if now >= session.expiration:
                return _aws_error(start_response, "403 Forbidden", "ExpiredToken",
                                  "The security token included in the request is expired")
            self._record({"event": "call", "service": service, "action": action, "access_key_id": key_id,
                          "role_arn": session.role_arn, "source_identity": session.source_identity})
        if action == "AssumeRole":
            return self._assume_role(environ, start_response, form, user)
        return self._app(environ, start_response)

    def _assume_role(self, environ: dict[str, Any], start_response: Callable[..., Any], form: dict[str, str],
                     user: str | None) -> Iterable[bytes]:
        role_arn = form.get("RoleArn", "")
        source_identity = form.get("SourceIdentity", "")
        denied = f"User: arn:aws:iam::{ACCOUNT}:user/{user} is not authorized to perform: sts:AssumeRole on {role_arn}"
        if user is None or role_arn not in self._reg.roles:
            return _aws_error(start_response, "403 Forbidden", "AccessDenied", denied)
        if not source_identity:
            return _aws_error(start_response, "403 Forbidden", "AccessDenied",
                              denied + " (the role's trust policy requires sts:SourceIdentity)")
        tags = {form[k]: form.get(k[:-len("Key")] + "Value", "")
                for k in form if k.startswith("Tags.member.") and k.endswith(".Key")}
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            captured["status"], captured["headers"] = status, headers
            return lambda _data: None

        xml = b"".join(self._app(environ, capture)).decode()
        if captured.get("status", "").startswith("200"):
            xml = xml.replace("<AssumeRoleResult>",
                              f"<AssumeRoleResult><SourceIdentity>{source_identity}</SourceIdentity>", 1)
            key_id, token, expires = (_tag(xml, n) for n in ("AccessKeyId", "SessionToken", "Expiration"))
            if key_id and token and expires:
                expiration = datetime.fromisoformat(expires.replace("Z", "+00:00"))
                if expiration.tzinfo is None:
                    expiration = expiration.replace(tzinfo=UTC)
                with self._reg.lock:
                    self._reg.sessions[key_id] = _Session(role_arn, source_identity, tags, token, expiration)
                self._record({"event": "AssumeRole", "role_arn": role_arn, "source_identity": source_identity,
                              "tags": tags, "session_name": form.get("RoleSessionName"),
                              "duration_seconds": int(form.get("DurationSeconds", "3600")),
                              "access_key_id": key_id, "caller": user})
        data = xml.encode()
        headers = [(k, v) for k, v in captured.get("headers", []) if k.lower() != "content-length"]
        start_response(captured.get("status", "500 Internal Server Error"),
                       [*headers, ("Content-Length", str(len(data)))])
        return [data]


class LocalAws:
    """moto's server on 127.0.0.1 behind the gate above; ``with LocalAws() as aws: aws.url``."""

    def __init__(self, *, trail_file: Path | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.trail: list[dict[str, Any]] = []
        self._trail_file = trail_file
        self._host, self._port = host, port
        self._reg = _Registry()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._trail_lock = threading.Lock()

    def _record(self, event: dict[str, Any]) -> None:
        event = {"at": datetime.now(UTC).isoformat(), **event}
        with self._trail_lock:
            self.trail.append(event)
            if self._trail_file is not None:
                with self._trail_file.open("a") as f:
                    f.write(json.dumps(event, sort_keys=True) + "\n")

    def start(self) -> LocalAws:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class QuietRequests(WSGIRequestHandler):
            """No access line per AWS call on the demo's terminal (errors are still logged)."""

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                pass

        app = _Gate(DomainDispatcherApplication(create_backend_app), self._reg, self._record)
        self._server = make_server(self._host, self._port, app, threaded=True, request_handler=QuietRequests)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="local-aws")
        self._thread.start()
        # The operator's own key, used to set up users and roles (as an admin would in a real account).
        self._reg.users["AKIDLOCALADMIN000000"] = "local-admin"
        return self

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def client(self, service: str, access_key_id: str = "AKIDLOCALADMIN000000",
               secret_access_key: str = "local-admin-secret", session_token: str | None = None) -> Any:
        """A boto3 client for ``service`` against this stand-in (the admin's key by default)."""
        import boto3
        # types-boto3 types only literal service names; boto3 takes any service name.
        return boto3.client(service, region_name=REGION, endpoint_url=self.url,  # type: ignore[call-overload]
                            aws_access_key_id=access_key_id,
                            aws_secret_access_key=secret_access_key, aws_session_token=session_token)

    def create_user(self, name: str) -> dict[str, str]:
        """An IAM user with an access key (the broker's own identity); returns the key."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        with self._reg.lock:
            self._reg.users[key["AccessKeyId"]] = name
        return {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}

    def create_role(self, name: str) -> str:
        """An IAM role the broker may assume (with SourceIdentity and session tags); returns its ARN."""
        arn = self.client("iam").create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(_TRUST_POLICY))[
            "Role"]["Arn"]
        with self._reg.lock:
            self._reg.roles.add(arn)
        return arn

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LocalAws:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
