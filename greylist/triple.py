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
    joins the parts with "/". In the sender and recipient, "%", "/", "#",
    white space, control characters and bytes that are not UTF-8 are
    written as %xx (per UTF-8 byte), so the key is unambiguous, valid
    UTF-8 and has no white space (postmap -s prints "key<TAB>value"). LMDB keys hold at
    most 511 bytes, the trailing NUL included: a longer key keeps its
    first characters and ends in "#" and the SHA-256 of the whole key.

DIAGNOSTICS
    ProtocolError when client_address is neither an IP address nor
    "unknown".
"""

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from greylist.policy import ProtocolError

# LMDB's compile-time maximum key size (mdb_env_get_maxkeysize) less the NUL.
MAX_KEY_BYTES = 510
_KEPT_BYTES = MAX_KEY_BYTES - 1 - 64

NULL_SENDER = "<>"
UNKNOWN_CLIENT = "unknown"

# Characters escaped in key fields: the escape itself, the separator, the
# mark of a shortened key, white space and controls (Unicode's too), and
# surrogates that stand for bytes that are not UTF-8.
_ESCAPE = re.compile("[%/#\\s\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")


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
    # ipaddress accepts an IPv6 zone ("%eth0"); Postfix strips it, so a
    # zone is malformed input (and would carry any bytes into the key).
    if "%" in value:
        raise ProtocolError("client_address is not an IP address: %s" % repr(value)[:100])
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
    encoded = "/".join((triple.client, _escape(triple.sender.casefold()),
                        _escape(triple.recipient.casefold()))).encode("utf-8")
    if len(encoded) <= MAX_KEY_BYTES:
        return encoded
    # Cut on a character boundary so that the key stays valid UTF-8.
    kept = encoded[:_KEPT_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return kept + b"#" + hashlib.sha256(encoded).hexdigest().encode("ascii")


def _escape(field: str) -> str:
    if _ESCAPE.search(field) is None:
        return field
    return _ESCAPE.sub(_percent, field)


def _percent(match: re.Match) -> str:
    char = match.group()
    # A surrogate U+DC80..U+DCFF stands for the undecodable byte code-0xDC00.
    if "\udc80" <= char <= "\udcff":
        return "%%%02x" % (ord(char) - 0xDC00)
    return "".join("%%%02x" % byte for byte in char.encode("utf-8"))
