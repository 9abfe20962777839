"""Starting a server from ``mpactl``, the same way for every server.

``mpactl serve``, ``mpactl approvals serve`` and ``mpactl broker serve`` each load their
configuration or exit 2 naming what is wrong (a bad config is a usage error) and set up
logging; the first two also turn the flags given into configuration overrides and exit 1
when the server cannot start.

This module belongs to the ``rpcauthz`` plumbing: it imports no other package of ours.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .console import ExitCode, fail
from .settings import ConfigError

T = TypeVar("T")

#: One log line format for every server started from the command line.
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def flag_overrides(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The flags that were given, as dotted-key overrides for :func:`rpcauthz.settings.load`:
    ``{"listen.port": None, "store_url": "sqlite:///x.db"}`` -> ``{"store_url": ...}``.
    A flag that was not given is ``None`` (or ``False`` for an on/off flag) and is dropped."""
    return {key: value for key, value in flags.items() if value is not None and value is not False}


def load_or_exit(load: Callable[[], T],
                 errors: tuple[type[Exception], ...] = (ConfigError,)) -> T:
    """Call ``load`` (which reads a server's configuration); on one of ``errors`` print
    ``error: MESSAGE`` on stderr and exit 2 (``ExitCode.USAGE``). Then set up logging for the server."""
    try:
        settings = load()
    except errors as e:
        fail(str(e), ExitCode.USAGE)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return settings


def start_or_exit(start: Callable[[], T],
                  errors: tuple[type[Exception], ...] = (OSError,)) -> T:
    """Call ``start`` (which starts or runs a server) and return what it returns; on one of
    ``errors`` (the port is taken, the store is unreachable...) print ``error: MESSAGE`` on
    stderr and exit 1 (``ExitCode.FAILURE``)."""
    try:
        return start()
    except errors as e:
        fail(str(e), ExitCode.FAILURE)
