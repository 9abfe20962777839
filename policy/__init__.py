"""The decision core: modes, grants, MPA requests, and ``decide()`` as a pure function.

Nothing in this package's core does I/O; stores live in ``policy.stores``.
"""
from .decide import (
                     approve,
                     approvers_for,
                     cancel,
                     complete,
                     decide,
                     eligible_approvers,
                     expire,
                     give_back,
                     may_approve,
                     may_request,
                     narrow,
                     narrowest_uses,
                     open_request,
                     reject,
                     usable_approval,
                     use,
)
from .errors import (
                     AlreadyDecided,
                     InvalidRequest,
                     NotEligible,
                     PolicyError,
                     RequestClosed,
                     RequestExpired,
                     SelfApproval,
                     SpendVoided,
                     StoreError,
                     UnknownRequest,
)
from .grants import GrantSet
from .model import Approval, ApprovalRequest, Decision, Grant, Outcome, RequestState, Role, Target
from .modes import DEFAULT_MODE, Mode, resolve_mode

__all__ = [
    "Approval", "ApprovalRequest", "AlreadyDecided", "DEFAULT_MODE", "Decision", "Grant",
    "GrantSet", "InvalidRequest", "Mode", "NotEligible", "Outcome", "PolicyError",
    "RequestClosed", "RequestExpired", "RequestState", "Role", "SelfApproval", "SpendVoided", "StoreError",
    "Target", "UnknownRequest", "approve", "approvers_for", "cancel", "complete", "decide", "eligible_approvers", "expire", "give_back",
    "may_approve", "may_request", "narrow", "narrowest_uses", "open_request", "reject", "resolve_mode", "usable_approval",
    "use",
]
