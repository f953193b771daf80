"""The pure core: records, triples and keys, decisions, the order of checks; no I/O."""
