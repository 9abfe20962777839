"""The five ``humans_who_can_rpc`` modes and how a method's mode is resolved."""
from __future__ import annotations

import enum


class Mode(enum.IntEnum):
    """Mirrors ``rpcauthz.v1.HumansWhoCanRpc``; numbers are the proto enum's."""

    UNSPECIFIED = 0
    ENGINEERS_WITHOUT_APPROVAL = 1
    ENGINEERS_WITH_APPROVAL = 2
    CONTRIBUTORS_WITHOUT_APPROVAL = 3
    CONTRIBUTORS_WITH_APPROVAL = 4
    BREAK_GLASS_ONLY = 5

    @property
    def needs_approval(self) -> bool:
        """True for the modes where the caller needs another person's approval."""
        from .mode_facts import MODE_FACTS  # the mode table imports this module

        facts = MODE_FACTS.get(self)
        return facts is not None and facts.needs_approval

    @classmethod
    def parse(cls, text: str) -> Mode:
        """Parse a mode name as written in a .proto or a config file.

        Accepts the bare name (``BREAK_GLASS_ONLY``), any case, and the proto's
        ``HUMANS_WHO_CAN_RPC_UNSPECIFIED`` spelling. Raises ``ValueError`` naming the
        accepted values for anything else.
        """
        name = text.strip().upper()
        if name == "HUMANS_WHO_CAN_RPC_UNSPECIFIED":
            return cls.UNSPECIFIED
        try:
            return cls[name]
        except KeyError:
            choices = ", ".join(m.name for m in cls if m is not cls.UNSPECIFIED)
            raise ValueError(f"unknown humans_who_can_rpc mode {text!r}; expected one of {choices}") from None


#: What applies when neither the method nor its service says anything.
DEFAULT_MODE = Mode.BREAK_GLASS_ONLY


def parse_default_mode(value: object) -> object:
    """Check a configured ``default_mode`` before it becomes a :class:`Mode`: a name is parsed
    with :meth:`Mode.parse`, and UNSPECIFIED (by name or number) is refused, because the
    default is what applies when nothing else says anything. Other values pass through for
    the enum's own check. Shared by every configuration that takes a default mode."""
    if isinstance(value, str):
        value = Mode.parse(value)
    if value == Mode.UNSPECIFIED:
        raise ValueError("the default mode cannot be UNSPECIFIED")
    return value


def resolve_mode(method_option: Mode | int | None, service_option: Mode | int | None,
                 default: Mode = DEFAULT_MODE) -> tuple[Mode, str]:
    """Pick the mode that applies to a method, and say where it came from.

    The method's own option wins over the service's default; with neither set
    (absent or UNSPECIFIED) the configured ``default`` applies. An unknown enum
    number (a newer proto than ours) is treated as unset so it cannot widen access.
    Returns ``(mode, source)`` with source one of ``"method"``, ``"service"``, ``"default"``.
    """
    for value, source in ((method_option, "method"), (service_option, "service")):
        if value is None:
            continue
        try:
            mode = Mode(int(value))
        except ValueError:
            continue
        if mode is not Mode.UNSPECIFIED:
            return mode, source
    if default is Mode.UNSPECIFIED:
        raise ValueError("the configured default mode cannot be UNSPECIFIED")
    return default, "default"
