"""The local dev stack: ``mpactl demo`` (real Envoy, ext_authz, approvals service, demo
services, a dev token issuer), process management for tests and benchmarks, and the one-shot
helpers behind ``mpactl demo call`` / ``demo approve``. Never part of a production deployment."""
