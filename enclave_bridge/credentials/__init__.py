"""Short-lived credentials the broker mints: AWS STS sessions and Kubernetes OIDC tokens."""
