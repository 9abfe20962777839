"""AWS credentials: STS AssumeRole with the engineer as SourceIdentity.

SourceIdentity is set by the broker and sticks to the session (and to any role chained from
it), so CloudTrail shows which engineer acted, not just which role. Session tags name the
requester, the approvers and the request id. The session lasts the shortest time that fits
the engineer's ask and the approval's remaining validity, within STS's bounds (900..3600 s).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

MIN_DURATION = 900    # STS refuses shorter sessions
MAX_DURATION = 3600   # role chaining caps sessions at one hour; we never ask for more
#: STS SourceIdentity: 2-64 of these, ASCII only (``re.ASCII``: ``\w`` alone takes any letter).
_IAM_CHARS = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)
_TAG_VALUE_BAD = re.compile(r"[^\w\s.:/=+\-@]")


class StsError(Exception):
    """STS refused or could not be reached; no credentials were minted."""


@dataclasses.dataclass(frozen=True)
class AwsSession:
    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime
    role_arn: str


def session_duration(requested: int | None, approval_remaining: float, role_max: int = MAX_DURATION) -> int:
    """The shortest session that fits: the ask, the approval's remaining time and the role's cap,
    bounded to STS's 900..3600 seconds.

    Below 900 s STS has no shorter session, so the floor wins (the gap is at most 15 minutes and
    is why approvals default to an hour).
    """
    cap = min(max(role_max, MIN_DURATION), MAX_DURATION)
    want = cap if not requested else min(int(requested), cap)
    want = min(want, int(approval_remaining))
    return max(MIN_DURATION, min(want, cap))


def _tag_value(text: str) -> str:
    return _TAG_VALUE_BAD.sub("_", text)[:256]


def assume_role_params(*, role_arn: str, engineer: str, approvers: Sequence[str], request_id: str,
                       duration_seconds: int) -> dict[str, Any]:
    """The exact AssumeRole request the broker sends; refuses an engineer id STS cannot carry."""
    if not _IAM_CHARS.fullmatch(engineer):
        raise StsError(f"engineer id {engineer!r} cannot be an STS SourceIdentity "
                       "(2-64 characters of letters, digits and +=,.@-)")
    if not MIN_DURATION <= duration_seconds <= MAX_DURATION:
        raise StsError(f"duration {duration_seconds}s is outside {MIN_DURATION}..{MAX_DURATION}")
    session_name = re.sub(r"[^\w+=,.@-]", "-", f"mpa-{request_id}-{engineer}", flags=re.ASCII)[:64]
    return {
        "RoleArn": role_arn,
        "RoleSessionName": session_name,
        "DurationSeconds": duration_seconds,
        "SourceIdentity": engineer,
        "Tags": [
            {"Key": "mpa:requester", "Value": _tag_value(engineer)},
            {"Key": "mpa:approver", "Value": _tag_value(" ".join(approvers))},
            {"Key": "mpa:request-id", "Value": _tag_value(request_id)},
        ],
    }


class StsMinter:
    """Calls STS through a boto3 ``sts`` client (configured by the caller: region, egress endpoint,
    the broker's own credentials from its seed bundle)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def mint(self, *, role_arn: str, engineer: str, approvers: Sequence[str], request_id: str,
             duration_seconds: int) -> AwsSession:
        params = assume_role_params(role_arn=role_arn, engineer=engineer, approvers=approvers,
                                    request_id=request_id, duration_seconds=duration_seconds)
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            response = self._client.assume_role(**params)
        except ClientError as e:
            err = e.response.get("Error", {})
            raise StsError(f"STS AssumeRole {role_arn} failed ({err.get('Code')}): {err.get('Message')}") from None
        except BotoCoreError as e:
            raise StsError(f"STS could not be called: {e}") from None
        try:
            c = response["Credentials"]
            return AwsSession(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], c["Expiration"], role_arn)
        except KeyError as e:
            raise StsError(f"STS response lacks {e}") from None
