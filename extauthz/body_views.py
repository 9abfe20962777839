"""The call shown to approvers for requests the gateway opens bound to a body.

When a check needs an approval and the request it opened (or reused) is bound to the call's
body digest, the gateway holds that body (Envoy's ``with_request_body``). :class:`BodyViews`
decodes it with the method's input type, read from the service's reflection, and keeps the
approver's view (``policy.body_view``: JSON, ``[debug_redact = true]`` fields masked,
size-capped) through ``Store.put_body_view``, the same view ``mpa request rpc --body`` keeps.

It runs in the background, after the verdict: the hot allow path never reaches it, the
approval-required answer does not wait for it, and nothing it does changes a decision. Any
failure (no reflection, a body that does not decode, the store) leaves no view and is logged.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor

from policy.body_view import body_view
from policy.store import Store

log = logging.getLogger("extauthz.body_views")

#: Looks up the input message type of ``service``/``method`` (``ReflectionCache.method_input_type``).
InputTypes = Callable[[str, str], Awaitable[Descriptor]]


class BodyViews:
    """Keeps approvers' views of bound calls, at most ``max_pending`` being built at once
    (more are skipped, logged) and each request's view at most once per process."""

    def __init__(self, store: Store, input_types: InputTypes, *, executor: Executor | None = None,
                 max_pending: int = 16, remember: int = 4096) -> None:
        self.store = store
        self.input_types = input_types
        self.executor = executor
        self.max_pending = max_pending
        self._remember = remember
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: dict[str, None] = {}  # insertion-ordered, bounded: request ids with a view

    @classmethod
    def for_modes(cls, store: Store, modes: Any, *, executor: Executor | None = None) -> BodyViews | None:
        """Views over ``modes`` if it can look up input types (the reflection cache), else None."""
        lookup = getattr(modes, "method_input_type", None)
        return cls(store, lookup, executor=executor) if callable(lookup) else None

    def keep(self, request_id: str, service: str, method: str, message: bytes) -> None:
        """Start keeping the view of ``message`` (one serialized input message) for the request;
        returns at once."""
        if request_id in self._done:
            return
        if len(self._tasks) >= self.max_pending:
            log.warning("no body view for request %s: %d views already being built",
                        request_id, len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(self._keep(request_id, service, method, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep(self, request_id: str, service: str, method: str, message: bytes) -> None:
        try:
            input_type = await self.input_types(service, method)
            msg = message_factory.GetMessageClass(input_type)()
            msg.ParseFromString(message)
            view = body_view(msg)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.executor, self.store.put_body_view, request_id, view)
        except Exception as e:  # never a decision: only no view
            log.warning("no body view for request %s (/%s/%s): %s", request_id, service, method, e)
            return
        self._done[request_id] = None
        while len(self._done) > self._remember:
            self._done.pop(next(iter(self._done)))

    async def drain(self) -> None:
        """Wait for the views being built (for shutdown and tests)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
