"""What a usable principal is, for every part that reads or compiles one (the ext_authz
server's identity, the fast path's compiler and its access-log reader): one rule, so a
principal the server would refuse is never compiled into Envoy or audited as allowed."""
from __future__ import annotations

import re

#: The longest principal accepted.
MAX_PRINCIPAL_LENGTH = 256
#: No whitespace, no control characters (fullmatch: ``$`` would let a trailing newline in).
_PRINCIPAL = re.compile(r"[^\x00-\x20\x7f]+")


def usable_principal(value: str) -> bool:
    """Is ``value`` a principal: non-empty, at most MAX_PRINCIPAL_LENGTH characters, with no
    whitespace or control character anywhere?"""
    return 0 < len(value) <= MAX_PRINCIPAL_LENGTH and _PRINCIPAL.fullmatch(value) is not None


__all__ = ["MAX_PRINCIPAL_LENGTH", "usable_principal"]
