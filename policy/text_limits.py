"""The words people attach to requests: how long they may be, and the shortest reason.

One set of limits for every entry point (the approvals API, its page, the ``mpa`` CLI and the
enclave broker), so a reason accepted in one place is not refused, or stored unbounded, in
another.
"""
from __future__ import annotations

from .errors import InvalidRequest

#: The longest comment (approve, reject, cancel) and reason, and incident reference.
MAX_COMMENT = 2000
MAX_REASON = 2000
MAX_INCIDENT = 200
#: The shortest reason a requester may give (configurable per server, at least 1).
DEFAULT_MIN_REASON_LENGTH = 10


def check_length(what: str, text: str | None, limit: int) -> None:
    """``InvalidRequest`` naming ``what`` when ``text`` is longer than ``limit`` characters."""
    if text is not None and len(text) > limit:
        raise InvalidRequest(f"the {what} is {len(text)} characters long; the limit is {limit}")


def check_reason(reason: str | None, min_length: int, needed_for: str) -> None:
    """``InvalidRequest`` unless ``reason`` says something (at least ``min_length`` characters
    besides surrounding blanks) and fits ``MAX_REASON``; ``needed_for`` ends the message
    ("this call", "these credentials")."""
    check_length("reason", reason, MAX_REASON)
    if len((reason or "").strip()) < min_length:
        raise InvalidRequest(f"a reason of at least {min_length} characters is required: say why you "
                             f"need {needed_for}")
