"""Correspondents: which addresses to learn, their keys, when to refresh.

DESCRIPTION
    A correspondent is an address that a local user sent mail to. Two
    things are learned for each one (greylist-socketmap(8), greylist
    --outbound):

    the address     in the correspondent table, a Postfix lmdb table:
                    the address (case-folded, the extension after
                    greylist_sender_delimiter removed, as Postfix's
                    check_sender_access strips it) -> a time stamp, which
                    Postfix reads as OK (an all-numerical value).
    the pair        (local sender, correspondent) in the greylist
                    database, as a "correspondent" record (record.py)
                    under pair_key() (triple.py): the local sender
                    case-folded without its extension, the correspondent
                    normalised as greylist normalises senders; so a reply
                    from bob@ to alice@ finds the pair learned when
                    alice+x@ wrote to bob+tag@. The inbound policy passes a message whose
                    (recipient, sender) pair is learned (decide.py,
                    reason "correspondent").

    screen() refuses what must never be learned: the null sender,
    addresses that are not plausible (no local part or domain, white
    space or controls, over 254 bytes, an address literal),
    MAILER-DAEMON-style local parts, and addresses in
    greylist_local_domains or their subdomains (mail between local users
    is no evidence about outside senders).

    Both are refreshed only once past half their lifetime
    (greylist_correspondent_lifetime), so a lookup of an address that is
    known and fresh writes nothing.

    This module is part of the pure core: no I/O, no clock, no logging.
"""

import re

from greylist.config import Config
from greylist.core.record import CORRESPONDENT, Record, decode, encode
from greylist.core.triple import normalise_sender, pair_key, strip_extension

# RFC 5321 4.5.3.1.3: a path holds at most 256 octets, brackets included.
MAX_ADDRESS_BYTES = 254
# Local parts of automatic senders, never correspondents (MAILER-DAEMON is
# Postfix's bounce sender, double-bounce its own postmaster notices).
AUTOMATIC = frozenset(("mailer-daemon", "double-bounce"))

# Reasons for not learning, as logged.
NULL = "null address"
IMPLAUSIBLE = "not a plausible address"
AUTOMATIC_SENDER = "MAILER-DAEMON-style address"
LOCAL_DOMAIN = "local domain"

_DOMAIN = re.compile(r"[^\s@\[\]<>()\\,;:\"]+\.[^\s@\[\]<>()\\,;:\".]+")


def screen(address: str, cfg: Config) -> str | None:
    """Return why address must not be learned, or None if it may be."""
    if not address or address == "<>":
        return NULL
    if len(address.encode("utf-8", "surrogateescape")) > MAX_ADDRESS_BYTES \
            or not address.isprintable() or " " in address:
        return IMPLAUSIBLE
    local, at, domain = address.casefold().rpartition("@")
    if not at or not local or not _DOMAIN.fullmatch(domain.rstrip(".")):
        return IMPLAUSIBLE
    if local in AUTOMATIC:
        return AUTOMATIC_SENDER
    domain = domain.rstrip(".")
    for local_domain in cfg.local_domains:
        if domain == local_domain or domain.endswith("." + local_domain):
            return LOCAL_DOMAIN
    return None


def table_key(address: str, cfg: Config) -> bytes:
    """The correspondent table key of an address screen() accepts: as
    check_sender_access finds it (case-folded, extension removed)."""
    local, _, domain = address.casefold().rpartition("@")
    if cfg.sender_delimiter:
        local = strip_extension(local, cfg.sender_delimiter)
    return (local + "@" + domain.rstrip(".")).encode("utf-8", "surrogateescape")


def pair(local_sender: str, correspondent: str, cfg: Config) -> bytes:
    """The database key of a (local sender, correspondent) pair."""
    return pair_key(local_sender.casefold(), normalise_sender(correspondent, cfg),
                    cfg.sender_delimiter)


def stamp_change(now: int, cfg: Config):
    """The change of a table entry: a time stamp, written when absent, not
    a time stamp, or past half its lifetime; its result says which
    ("new", "refreshed" or None)."""
    half = cfg.correspondent_lifetime_s // 2

    def change(values: list[bytes | None]) -> tuple[list[bytes | None], str | None]:
        old = values[0]
        if old is not None and old.isdigit() and len(old) <= 19 and now - int(old) <= half:
            return [None], None
        return [b"%d" % now], "new" if old is None else "refreshed"
    return change


def pair_change(now: int, cfg: Config):
    """The change of a pair record, with the same rule as stamp_change()."""
    half = cfg.correspondent_lifetime_s // 2

    def change(values: list[bytes | None]) -> tuple[list[bytes | None], str | None]:
        old = None if values[0] is None else decode(values[0])
        if old is not None and old.state == CORRESPONDENT \
                and 0 <= now - old.last_seen <= half:
            return [None], None
        if old is None or old.state != CORRESPONDENT \
                or now - old.last_seen > cfg.correspondent_lifetime_s:
            return [encode(Record(now, now, 1, CORRESPONDENT))], "new"
        return [encode(Record(old.first_seen, now, old.count + 1, CORRESPONDENT))], "refreshed"
    return change
