"""Transports: how requests reach a handler (spawn(8) stdin/stdout)."""
