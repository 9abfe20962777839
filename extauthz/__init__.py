"""Envoy external-authorization server: CheckRequest in, allow / deny / approval required out."""
