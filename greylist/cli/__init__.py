"""Command lines: one composition root per program."""
