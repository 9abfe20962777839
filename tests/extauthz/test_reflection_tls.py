"""The ext_authz server dials reflection endpoints with the TLS its configuration gives."""
from __future__ import annotations

import pytest

from extauthz.config import load_settings
from extauthz.server import open_components
from reflection_cache import ReflectionUnavailable
from tests.support.reflection_tls import ORDERS


@pytest.mark.parametrize("with_tls", [True, False], ids=["mutual-tls", "plaintext"])
async def test_server_reads_modes_over_configured_mutual_tls(tmp_path, reflection_pki, mtls_reflection_server, with_tls):
    config = tmp_path / "extauthz.yaml"
    tls = (f"  tls: {{ca_file: {reflection_pki.ca}, cert_file: {reflection_pki.client_cert}, key_file: {reflection_pki.client_key}}}\n"
           if with_tls else "")
    config.write_text(f"store_url: sqlite:///{tmp_path / 's.db'}\n"
                      f"reflection:\n  endpoints: {{default: '{mtls_reflection_server.address}'}}\n{tls}")
    components = await open_components(load_settings(config, env={}))
    try:
        if with_tls:
            assert (await components.modes.get(ORDERS)).service == ORDERS
        else:
            with pytest.raises(ReflectionUnavailable):
                await components.modes.get(ORDERS)
    finally:
        await components.close()
