"""Greylist records and their versioned text form.

DESCRIPTION
    A record is stored as the text "1:FIRST:LAST:COUNT:STATE" where 1 is
    the format version, FIRST and LAST are the integer epoch seconds when
    the triple was first and last seen, COUNT is the number of attempts
    seen, and STATE is "pending" (still greylisted) or "passed". The text
    is never empty, as a Postfix lookup of an empty value is an error.

DIAGNOSTICS
    decode() returns None for a value that does not parse; the caller
    logs it and treats the record as absent.
"""

from dataclasses import dataclass

VERSION = "1"
PENDING = "pending"
PASSED = "passed"


@dataclass(frozen=True, slots=True)
class Record:
    """One triple's greylisting state; times are integer epoch seconds."""

    first_seen: int
    last_seen: int
    count: int
    passed: bool


def encode(record: Record) -> bytes:
    """Return the stored text of a record, without the trailing NUL."""
    return ("%s:%d:%d:%d:%s" % (VERSION, record.first_seen, record.last_seen,
                                record.count, PASSED if record.passed else PENDING)
            ).encode("ascii")


def decode(value: bytes) -> Record | None:
    """Return the record stored as value, or None if it does not parse."""
    parts = value.split(b":")
    if len(parts) != 5 or parts[0] != b"1" or parts[4] not in (b"pending", b"passed"):
        return None
    numbers = parts[1:4]
    # int() would also accept signs, spaces and underscores: insist on digits.
    if not all(n.isdigit() and len(n) <= 19 for n in numbers):
        return None
    first, last, count = map(int, numbers)
    return Record(first, last, count, parts[4] == b"passed")
