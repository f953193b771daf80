"""Greylisting policy server for Postfix with Postfix-compatible LMDB state."""

__version__ = "0.5"
