"""Configuration of the approvals server: issuer, request policy, links, Slack.

Everything has a safe default except what must come from the operator (the store URL and,
outside the demo, the issuer). ``ApprovalsConfig.from_env()`` reads ``MPA_*`` variables;
docs/approvals.md lists them.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from datetime import timedelta

from policy import Mode

#: Environment variable holding the Slack incoming-webhook URL (a secret: never logged).
SLACK_WEBHOOK_ENV = "MPA_SLACK_WEBHOOK_URL"


@dataclasses.dataclass(frozen=True)
class RequestPolicy:
    """The rules every approval request follows, beyond the mode table.

    ``required_approvals_by_service`` wins over ``required_approvals_by_mode``; with neither,
    one approval is enough. ``max_approval_ttl`` caps what a requester may ask for.
    """

    min_reason_length: int = 10
    pending_ttl: timedelta = timedelta(hours=1)
    default_approval_ttl: timedelta = timedelta(hours=1)
    max_approval_ttl: timedelta = timedelta(hours=8)
    required_approvals_by_mode: Mapping[Mode, int] = dataclasses.field(default_factory=dict)
    required_approvals_by_service: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.min_reason_length < 1:
            raise ValueError("min_reason_length must be at least 1: a reason is required")
        for name in ("pending_ttl", "default_approval_ttl", "max_approval_ttl"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")
        if self.default_approval_ttl > self.max_approval_ttl:
            raise ValueError("default_approval_ttl cannot exceed max_approval_ttl")
        for key, n in {**{m.name: n for m, n in self.required_approvals_by_mode.items()},
                       **self.required_approvals_by_service}.items():
            if n < 1:
                raise ValueError(f"required approvals for {key} must be at least 1, not {n}")

    def required_approvals(self, service: str, mode: Mode) -> int:
        """How many distinct approvers a request for ``service`` in ``mode`` needs."""
        if service in self.required_approvals_by_service:
            return self.required_approvals_by_service[service]
        return self.required_approvals_by_mode.get(mode, 1)


@dataclasses.dataclass(frozen=True)
class ApprovalsConfig:
    """Everything the approvals server needs.

    ``jwks_url`` is where signing keys come from; ``issuer`` and ``audiences`` are checked on
    every token. ``public_url`` is the externally visible base URL used in request links.
    ``dev_login`` enables the dev-only browser login form (needs ``dev_issuer_key``).
    """

    store_url: str
    issuer: str
    jwks_url: str
    audiences: tuple[str, ...] = ("rpcauthz",)
    public_url: str = "http://127.0.0.1:8081"
    policy: RequestPolicy = dataclasses.field(default_factory=RequestPolicy)
    dev_login: bool = False
    csrf_secret: bytes | None = dataclasses.field(default=None, repr=False)
    secure_cookies: bool = False
    slack_webhook_url: str | None = dataclasses.field(default=None, repr=False)
    slack_spool_path: str | None = None
    slack_user_ids: Mapping[str, str] = dataclasses.field(default_factory=dict)
    audit_jsonl_path: str | None = None
    expiry_sweep_seconds: float = 30.0
    receipt_key_path: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ApprovalsConfig:
        """Read ``MPA_*`` variables (see docs/approvals.md); ``overrides`` win."""
        env = os.environ if env is None else env

        def hours(name: str, default: timedelta) -> timedelta:
            v = env.get(name)
            return default if v is None else timedelta(seconds=_number(name, v))

        by_mode: dict[Mode, int] = {}
        by_service: dict[str, int] = {}
        for item in _split(env.get("MPA_REQUIRED_APPROVALS", "")):
            key, _, n = item.partition("=")
            if not n:
                raise ValueError(f"MPA_REQUIRED_APPROVALS entry {item!r} is not KEY=N")
            count = int(_number("MPA_REQUIRED_APPROVALS", n))
            try:
                by_mode[Mode.parse(key)] = count
            except ValueError:
                by_service[key.strip()] = count
        policy = RequestPolicy(
            min_reason_length=int(_number("MPA_MIN_REASON_LENGTH", env.get("MPA_MIN_REASON_LENGTH", "10"))),
            pending_ttl=hours("MPA_PENDING_TTL_SECONDS", timedelta(hours=1)),
            default_approval_ttl=hours("MPA_APPROVAL_TTL_SECONDS", timedelta(hours=1)),
            max_approval_ttl=hours("MPA_MAX_APPROVAL_TTL_SECONDS", timedelta(hours=8)),
            required_approvals_by_mode=by_mode, required_approvals_by_service=by_service)
        values: dict[str, object] = {
            "store_url": env.get("MPA_STORE_URL", "sqlite:///rpcauthz.db"),
            "issuer": env.get("MPA_ISSUER", ""),
            "jwks_url": env.get("MPA_JWKS_URL", ""),
            "audiences": tuple(_split(env.get("MPA_AUDIENCES", "rpcauthz"))),
            "public_url": env.get("MPA_PUBLIC_URL", "http://127.0.0.1:8081"),
            "policy": policy,
            "dev_login": env.get("MPA_DEV_LOGIN", "") in ("1", "true", "yes"),
            "csrf_secret": env["MPA_CSRF_SECRET"].encode() if env.get("MPA_CSRF_SECRET") else None,
            "secure_cookies": env.get("MPA_SECURE_COOKIES", "") in ("1", "true", "yes"),
            "slack_webhook_url": env.get(SLACK_WEBHOOK_ENV) or None,
            "slack_spool_path": env.get("MPA_SLACK_SPOOL") or None,
            "slack_user_ids": dict(_pair(item, "MPA_SLACK_USER_IDS")
                                   for item in _split(env.get("MPA_SLACK_USER_IDS", ""))),
            "audit_jsonl_path": env.get("MPA_AUDIT_JSONL") or None,
            "receipt_key_path": env.get("MPA_RECEIPT_KEY_FILE") or None,
        }
        values.update(overrides)
        cfg = cls(**values)  # type: ignore[arg-type]
        if not cfg.issuer or not cfg.jwks_url:
            raise ValueError("MPA_ISSUER and MPA_JWKS_URL must be set: tokens cannot be checked without them")
        return cfg


def _pair(item: str, name: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    if not key.strip() or not value.strip():
        raise ValueError(f"{name} entry {item!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {text!r}") from None
    if value < 0:
        raise ValueError(f"{name} cannot be negative")
    return value
