"""The (client, sender, recipient) triple and its database key.

DESCRIPTION
    triple_from_request() takes the attributes of an RCPT request and
    returns the triple in canonical form:

    client      client_address as ipaddress prints it, with IPv4-mapped
                IPv6 addresses (::ffff:192.0.2.1) shown as IPv4. Postfix
                sends "unknown" when the address is unavailable (for
                example through XCLIENT); that value is kept as "unknown",
                so all such clients share one client part and greylisting
                degrades to (sender, recipient) pairs instead of failing.
    sender      the envelope sender; the null sender is "<>", the form
                Postfix uses for it in access(5) lookups.
    recipient   the envelope recipient.

    key() case-folds the triple the way Postfix folds lookup keys with
    smtputf8_enable=yes (str.casefold, lmdb_table(5), dict_utf8.c), and
    joins the parts with "/". In the sender and recipient, "%", "/",
    white space, control characters and bytes that are not UTF-8 are
    written as %XX, so the key is unambiguous, valid UTF-8 and has no
    white space (postmap -s prints "key<TAB>value").

DIAGNOSTICS
    ProtocolError when client_address is neither an IP address nor
    "unknown".
"""

import ipaddress
import re
from dataclasses import dataclass

from greylist.policy import ProtocolError

NULL_SENDER = "<>"
UNKNOWN_CLIENT = "unknown"

# Characters escaped in key fields: the escape itself, the separator,
# controls and space, DEL, and surrogates that stand for non-UTF-8 bytes.
_ESCAPE = re.compile("[%/\x00-\x20\x7f\udc80-\udcff]")


@dataclass(frozen=True, slots=True)
class Triple:
    """A canonical (client, sender, recipient) triple."""

    client: str
    sender: str
    recipient: str


def canonical_client(value: str | None) -> str:
    """Return the canonical form of a client_address value.

    Raises ProtocolError if it is neither an IP address nor "unknown".
    """
    if not value or value == UNKNOWN_CLIENT:
        return UNKNOWN_CLIENT
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ProtocolError("client_address is not an IP address: %s"
                            % repr(value)[:100]) from None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def triple_from_request(attrs: dict[str, str]) -> Triple:
    """Return the triple of an RCPT request (the recipient must be set)."""
    return Triple(canonical_client(attrs.get("client_address")),
                  attrs.get("sender") or NULL_SENDER,
                  attrs["recipient"])


def key(triple: Triple) -> bytes:
    """Return the database key of a triple, without the trailing NUL."""
    return "/".join((triple.client, _escape(triple.sender.casefold()),
                     _escape(triple.recipient.casefold()))).encode("utf-8")


def _escape(field: str) -> str:
    if _ESCAPE.search(field) is None:
        return field
    return _ESCAPE.sub(_percent, field)


def _percent(match: re.Match) -> str:
    code = ord(match.group())
    # A surrogate U+DC80..U+DCFF stands for the undecodable byte code-0xDC00.
    return "%%%02x" % (code - 0xDC00 if code >= 0xDC80 else code)
