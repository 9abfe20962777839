"""rpcauthz.server_start: the one way `mpactl` servers load their configuration and start."""
from __future__ import annotations

import pytest

from rpcauthz.server_start import flag_overrides, load_or_exit, start_or_exit
from rpcauthz.settings import ConfigError


def test_only_the_flags_given_become_overrides():
    assert flag_overrides({"listen.port": None, "store_url": "sqlite:///x.db", "identity.dev_mode": False,
                           "workers": 0}) == {"store_url": "sqlite:///x.db", "workers": 0}


def test_a_bad_config_exits_2_naming_the_problem(capsys):
    def load():
        raise ConfigError("listen.prot: unknown key (file x.yaml line 2)")
    with pytest.raises(SystemExit) as exit_:
        load_or_exit(load)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: listen.prot: unknown key (file x.yaml line 2)\n"


def test_other_errors_while_loading_are_not_swallowed():
    def load():
        raise KeyError("bug")
    with pytest.raises(KeyError):
        load_or_exit(load)


def test_a_server_that_cannot_start_exits_1(capsys):
    def start():
        raise OSError("[Errno 98] Address already in use")
    with pytest.raises(SystemExit) as exit_:
        start_or_exit(start)
    assert exit_.value.code == 1 and "Address already in use" in capsys.readouterr().err
    assert start_or_exit(lambda: 7) == 7
