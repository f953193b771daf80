"""Greylist records and their versioned text form.

DESCRIPTION
    A record is stored as the text "1:FIRST:LAST:COUNT:STATE": 1 is the
    format version, FIRST and LAST are integer epoch seconds, COUNT a
    number, and STATE says what the record is:

    pending     a triple still greylisted; COUNT attempts, first and
                last seen (a negative entry in verify(8)'s terms)
    passed      a triple that passed greylisting (a positive entry)
    sender      a (client group, sender) auto-whitelist entry, made when
                a triple of that sender passed
    client      a client-group entry; COUNT is the number of passes of
                distinct triples counted so far (at most one an hour),
                and the client is whitelisted once COUNT reaches
                greylist_client_awl_passes
    manual      a client-group or (client group, sender) entry made with
                greylistctl whitelist add; it never expires
    trying      in a sender entry's place, until the sender passes: a
                (client group, sender) that has a triple pending; FIRST
                is when its first pending triple was first seen, so that
                a new recipient of a retried message passes once the
                client has tried for greylist_delay (no split message);
                it expires greylist_retry_window after FIRST
    correspondent
                a (local address, correspondent) pair learned from mail
                a local user sent (greylist-socketmap(8), greylist
                --outbound); COUNT is the number of times it was learned
                or refreshed

    The state makes every record's lifetime readable from its value
    alone, also when privacy mode hides the keys. The text is never
    empty, as a Postfix lookup of an empty value is an error.

DIAGNOSTICS
    decode() returns None for a value that does not parse; the caller
    logs it and treats the record as absent.
"""

from typing import NamedTuple

# Named tuples on the hot path are built with tuple.__new__(Class, fields):
# half the cost of the generated __new__ (bench/hotpath.py).
new = tuple.__new__

VERSION = "1"
PENDING = "pending"
PASSED = "passed"
SENDER = "sender"
CLIENT = "client"
MANUAL = "manual"
CORRESPONDENT = "correspondent"
TRYING = "trying"
STATES = (PENDING, PASSED, SENDER, CLIENT, MANUAL, CORRESPONDENT, TRYING)
_STATES = {state.encode("ascii"): state for state in STATES}


class Record(NamedTuple):
    """One record; times are integer epoch seconds, state one of STATES."""

    first_seen: int
    last_seen: int
    count: int
    state: str


def encode(record: Record) -> bytes:
    """Return the stored text of a record, without the trailing NUL."""
    return ("%s:%d:%d:%d:%s" % (VERSION, record.first_seen, record.last_seen,
                                record.count, record.state)).encode("ascii")


def decode(value: bytes) -> Record | None:
    """Return the record stored as value, or None if it does not parse."""
    try:
        version, first, last, count, state = value.split(b":")
    except ValueError:
        return None
    state = _STATES.get(state)
    # int() would also accept signs, spaces and underscores: insist on
    # ASCII digits (bytes.isdigit), at most 19 of them.
    if (version != b"1" or state is None
            or not (first.isdigit() and last.isdigit() and count.isdigit())
            or len(first) > 19 or len(last) > 19 or len(count) > 19):
        return None
    return new(Record, (int(first), int(last), int(count), state))
