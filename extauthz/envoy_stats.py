"""Envoy's own count of fast-path allows, read from its admin interface for /metrics.

Envoy's RBAC filter counts every call its fast-path (shadow) policy allowed as
``http.<stat_prefix>.rbac.rpcauthz_fast_.shadow_allowed``; this server counts the access log
entries it audited (``rpcauthz_fast_path_entries_total{result="audited"}``). Over all Envoys
and all replicas the two agree; a gap is fast-path allows that never reached the audit.
With ``fast_path.envoy_admin_urls`` set, every scrape of /metrics also reads Envoy's counter
(``rpcauthz_fast_path_envoy_allowed{envoy=URL}``), so one dashboard shows both.
"""
from __future__ import annotations

import json
import logging
import re
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("extauthz.fast_path")


def read_counter(admin_url: str, stat: str, timeout: float = 1.0) -> float | None:
    """The value of counter ``stat`` at Envoy's admin ``admin_url``; ``None`` when it cannot be
    read (Envoy away, no such stat yet)."""
    query = urllib.parse.urlencode({"filter": f"^{re.escape(stat)}$", "format": "json"})
    try:
        with urllib.request.urlopen(f"{admin_url}/stats?{query}", timeout=timeout) as r:
            data = json.load(r)
    except (OSError, ValueError) as e:
        log.warning("cannot read %s from Envoy admin %s: %s", stat, admin_url, e)
        return None
    for s in data.get("stats", []):
        if s.get("name") == stat and isinstance(s.get("value"), (int, float)):
            return float(s["value"])
    return None


class EnvoyAllowedCollector:
    """``rpcauthz_fast_path_envoy_allowed{envoy}``, read from each Envoy at collect time."""

    def __init__(self, admin_urls: Sequence[str], stat: str) -> None:
        self._urls, self._stat = list(admin_urls), stat

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily("rpcauthz_fast_path_envoy_allowed",
                                f"Envoy's own count of fast-path allows ({self._stat}), read from its admin "
                                "interface at each scrape; compare with rpcauthz_fast_path_entries_total"
                                "{result=\"audited\"}.", labels=["envoy"])
        for url in self._urls:
            value = read_counter(url, self._stat)
            if value is not None:
                fam.add_metric([url], value)
        yield fam


__all__ = ["EnvoyAllowedCollector", "read_counter"]
