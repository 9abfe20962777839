"""Errors raised by the policy core and the stores. Each names what was wrong."""
from __future__ import annotations


class PolicyError(Exception):
    """A request or approval was refused by the rules. ``code`` is stable for APIs."""

    code = "policy_error"


class NotEligible(PolicyError):
    """The person may not do this under the method's mode (the DESIGN mode table)."""

    code = "not_eligible"


class SelfApproval(PolicyError):
    """Nobody approves their own request."""

    code = "self_approval"


class AlreadyDecided(PolicyError):
    """The reviewer already approved this request, or it is no longer pending."""

    code = "already_decided"


class RequestExpired(PolicyError):
    """The request or its approval has passed its expiry."""

    code = "expired"


class RequestClosed(PolicyError):
    """The request was rejected, cancelled, expired or used up."""

    code = "closed"


class InvalidRequest(PolicyError):
    """The request itself is malformed: missing incident, bad scope, bad numbers."""

    code = "invalid_request"


class StoreError(Exception):
    """The store could not be reached or did not answer. Never an allow."""

    code = "store_unavailable"


class SpendVoided(Exception):
    """A spend reached the store for a decision whose use was already voided (its check was
    answered with something other than allow): nothing is spent. Not a ``PolicyError``:
    the decision is over, so the gateway must not look for another approval to spend."""

    code = "spend_voided"


class UnknownRequest(LookupError):
    """No approval request has this id."""

    code = "unknown_request"
