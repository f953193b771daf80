"""Stores behind one interface (base.py): the Postfix-compatible LMDB tables."""
