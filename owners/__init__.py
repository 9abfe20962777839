"""Service owners' tools: ``mpactl lint`` (every RPC carries a mode), ``mpactl migrate``
(choose modes with usage in front of you), ``mpactl usage``, and the Envoy gateway config
renderer (``mpactl envoy render``) that the demo uses too."""
