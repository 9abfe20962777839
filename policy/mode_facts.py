"""One table of what each ``humans_who_can_rpc`` mode means (README's mode table, as data).

``decide()`` reads who may call and who may approve from it, the gateway's messages and
the approvals service read its words from it. ``tests/policy/test_mode_facts.py`` checks it
against README.md's table, so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from .model import Role
from .modes import Mode
from .rules import Rule


@dataclasses.dataclass(frozen=True, slots=True)
class ModeFacts:
    """The facts of one mode: roles (what ``decide()`` checks), rule ids and words.

    Every caller must first be an engineer; the roles below come on top of that.
    """

    mode: Mode
    #: The role that may call outright (None: nobody calls outright).
    callers: Role | None
    #: The role that may call once another holder of the same role approves (None: no approvals).
    requesters: Role | None
    #: A request needs an incident reference.
    incident_required: bool
    #: Rule of an outright allow, and of a caller who lacks the role this mode needs.
    allow_rule: Rule | None
    not_eligible_rule: Rule | None
    #: Rules of an allow through an approval, and of "approval required".
    approved_rule: Rule | None
    approval_required_rule: Rule | None
    #: README's three columns, word for word.
    outright: str
    with_approval: str
    approver: str
    #: Words for messages: who may call ("only {role_words} may call it"), what it needs,
    #: whom to ask ("ask {approver_advice} to approve"; may name {service}), who may
    #: approve ("the approver must be {approver_rule}"; may name {service}), and the
    #: sentence the approval page, CLI and Slack show.
    role_words: str = ""
    needs: str = ""
    approver_advice: str = ""
    approver_rule: str = ""
    explanation: str = ""

    @property
    def needs_approval(self) -> bool:
        return self.requesters is not None


MODE_FACTS: Mapping[Mode, ModeFacts] = MappingProxyType({
    Mode.ENGINEERS_WITHOUT_APPROVAL: ModeFacts(
        Mode.ENGINEERS_WITHOUT_APPROVAL, callers=Role.ENGINEER, requesters=None,
        incident_required=False, allow_rule=Rule.ENGINEERS_WITHOUT_APPROVAL_ENGINEER,
        not_eligible_rule=None, approved_rule=None, approval_required_rule=None,
        outright="any engineer", with_approval="-", approver="-"),
    Mode.ENGINEERS_WITH_APPROVAL: ModeFacts(
        Mode.ENGINEERS_WITH_APPROVAL, callers=None, requesters=Role.ENGINEER,
        incident_required=False, allow_rule=None, not_eligible_rule=None,
        approved_rule=Rule.ENGINEERS_WITH_APPROVAL_APPROVED,
        approval_required_rule=Rule.ENGINEERS_WITH_APPROVAL_APPROVAL_REQUIRED,
        outright="nobody", with_approval="any engineer", approver="any *other* engineer",
        role_words="an engineer", needs="another engineer's approval",
        approver_advice="another engineer", approver_rule="an engineer other than the requester",
        explanation="ENGINEERS_WITH_APPROVAL: any engineer may call it once another engineer "
                    "approves."),
    Mode.CONTRIBUTORS_WITHOUT_APPROVAL: ModeFacts(
        Mode.CONTRIBUTORS_WITHOUT_APPROVAL, callers=Role.CONTRIBUTOR, requesters=None,
        incident_required=False, allow_rule=Rule.CONTRIBUTORS_WITHOUT_APPROVAL_CONTRIBUTOR,
        not_eligible_rule=Rule.CONTRIBUTORS_WITHOUT_APPROVAL_NOT_CONTRIBUTOR,
        approved_rule=None, approval_required_rule=None,
        outright="contributors of the service", with_approval="-", approver="-"),
    Mode.CONTRIBUTORS_WITH_APPROVAL: ModeFacts(
        Mode.CONTRIBUTORS_WITH_APPROVAL, callers=None, requesters=Role.CONTRIBUTOR,
        incident_required=False, allow_rule=None,
        not_eligible_rule=Rule.CONTRIBUTORS_WITH_APPROVAL_NOT_CONTRIBUTOR,
        approved_rule=Rule.CONTRIBUTORS_WITH_APPROVAL_APPROVED,
        approval_required_rule=Rule.CONTRIBUTORS_WITH_APPROVAL_APPROVAL_REQUIRED,
        outright="nobody", with_approval="contributors of the service",
        approver="another contributor of the service",
        role_words="a contributor of the service", needs="another contributor's approval",
        approver_advice="another contributor of {service}",
        approver_rule="a contributor of {service} other than the requester",
        explanation="CONTRIBUTORS_WITH_APPROVAL: contributors of the service may call it once "
                    "another contributor of the service approves."),
    Mode.BREAK_GLASS_ONLY: ModeFacts(
        Mode.BREAK_GLASS_ONLY, callers=None, requesters=Role.SECURITY_ONCALL,
        incident_required=True, allow_rule=None,
        not_eligible_rule=Rule.BREAK_GLASS_ONLY_NOT_SECURITY_ONCALL,
        approved_rule=Rule.BREAK_GLASS_ONLY_APPROVED,
        approval_required_rule=Rule.BREAK_GLASS_ONLY_APPROVAL_REQUIRED,
        outright="nobody", with_approval="security on-call, with an incident reference",
        approver="another security on-call engineer",
        role_words="security on-call",
        needs="an incident reference and another security on-call's approval",
        approver_advice="another security on-call engineer",
        approver_rule="a security on-call engineer other than the requester",
        explanation="BREAK_GLASS_ONLY: only security on-call may call it, with an incident "
                    "reference, once another security on-call engineer approves."),
})


def facts_of(mode: Mode) -> ModeFacts:
    """The facts of ``mode``; ``KeyError`` for UNSPECIFIED (it is no mode a method can have)."""
    return MODE_FACTS[mode]
