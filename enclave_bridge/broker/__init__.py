"""The credential broker: MPA-gated AWS and Kubernetes credentials, served over TLS from the enclave.

* :mod:`.config`  - what the broker offers (roles, clusters), who may use it, how callers authenticate
* :mod:`.records` - a credential request (the policy request plus what it is for) and its sealed form
* :mod:`.service` - the rules and state transitions, no network
* :mod:`.server`  - the gRPC API with a TLS key made at start, and process wiring
* :mod:`.notify`  - audit sinks and Slack notifications
"""
