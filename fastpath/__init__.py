"""The Envoy-native fast path: static allows decided by Envoy's RBAC filter over xDS.

``compile`` turns the modes the reflection cache knows and the grants into an RBAC config
(pure); ``xds`` serves it to every Envoy over ADS (ECDS), withdrawing it on a NACK or when
the control plane goes away (resource TTL); ``publisher`` recompiles on grant and mode
changes and pushes. See docs/extauthz.md ("The fast path").
"""
