"""Step 2a, the target: which RPC is being called, read strictly from ``:path``.

Only ``/pkg.Service/Method`` is accepted: identifier characters, dots between package
parts, exactly two segments, no query, no fragment, no percent-encoding, bounded length.
Anything else is refused with a message that says what was wrong, because a path that
Envoy and the upstream might read differently must never be authorised as something else.
"""
from __future__ import annotations

import functools

from policy import Target
from policy.model import METHOD_NAME, SERVICE_NAME


class BadPath(Exception):
    """``:path`` is not a gRPC method path. The message names what was wrong."""


@functools.lru_cache(maxsize=8192)  # the same few paths repeat; failures are not cached
def parse_path(path: str, max_length: int = 512) -> Target:
    """``Target`` for a path like ``/rpcauthz.demo.v1.Accounts/ReadAccount``, else ``BadPath``."""
    if not path:
        raise BadPath("the :path is empty; expected /package.Service/Method")
    shown = _show(path)
    if len(path) > max_length:
        raise BadPath(f"the :path is {len(path)} characters long, over the limit of {max_length}")
    if "?" in path:
        raise BadPath(f"the :path {shown} has a query string; gRPC paths have none")
    if "#" in path:
        raise BadPath(f"the :path {shown} has a fragment; gRPC paths have none")
    if "%" in path:
        raise BadPath(f"the :path {shown} is percent-encoded; send the method name literally")
    if not path.startswith("/"):
        raise BadPath(f"the :path {shown} does not start with '/'")
    parts = path[1:].split("/")
    if len(parts) != 2:
        raise BadPath(f"the :path {shown} has {len(parts)} segments; expected exactly "
                      "/package.Service/Method")
    service, method = parts
    if not SERVICE_NAME.fullmatch(service):
        raise BadPath(f"the :path {shown} names no valid service: {_show(service)} is not a "
                      "dotted identifier like package.Service")
    if not METHOD_NAME.fullmatch(method):
        raise BadPath(f"the :path {shown} names no valid method: {_show(method)} is not an identifier")
    return Target(service, method)


def _show(text: str, limit: int = 80) -> str:
    """A safe, bounded rendering of untrusted text for messages."""
    r = repr(text[:limit])
    return r + ("..." if len(text) > limit else "")
