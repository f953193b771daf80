"""The postscreen policy callout protocol, as Wietse Venema designed it (2016).

DESCRIPTION
    No Postfix release implements the client side (postfix-interop.md
    section 5); this is the server side exactly to the design:

    request     name=value lines ended by an empty line, with at least
                client_address, server_address (IPv4 or IPv6),
                client_port and server_port (numbers), in any order;
                unknown names are ignored. The framing is the SMTPD
                policy protocol's, so its push decoder (policy.py), with
                its caps, decodes it.
    reply       action=pass|ignore|enforce|drop, then ttl=SECONDS (with
                pass only), then an empty line. As an opt-in extension,
                a pass may also carry smtpd_service_name=NAME (the seed's
                request to choose an smtpd profile; no postscreen can
                honour it today).

    A connection carries any number of requests; the server never closes
    it after a reply.

DIAGNOSTICS
    Decoder raises ProtocolError for a line over the policy protocol's
    line cap, or a request over its request cap (no RequestTooLong: a
    callout request is never discarded and answered). check() raises
    ProtocolError for a request without one of the four
    attributes, with an address that is not an IP address, or a port
    that is not a number from 0 to 65535: the transport logs it and
    closes the connection without a reply.
"""

from greylist.core.triple import UNKNOWN_CLIENT, BadAddress, client_address
from greylist.protocols import policy
from greylist.protocols.policy import ProtocolError

REQUIRED = ("client_address", "server_address", "client_port", "server_port")
ACTIONS = ("pass", "ignore", "enforce", "drop")


class Decoder(policy.Decoder):
    """The SMTPD policy protocol's decoder, except that a line over its
    caps is malformed input, as the design says: postscreen sends four
    short attributes, so the connection is closed at once, without a
    reply, where the policy protocol discards the line and answers."""

    __slots__ = ()

    def _skip(self, size: int) -> None:
        raise ProtocolError("postscreen request with a line over %d bytes (or over %d bytes "
                            "in all)" % (self.max_line, self.max_request))


def check(attrs: dict[str, str]) -> str:
    """Return the canonical client address of a request; raise ProtocolError."""
    for name in REQUIRED:
        if not attrs.get(name):
            raise ProtocolError("postscreen request without %s" % name)
    client = _address(attrs, "client_address")
    _address(attrs, "server_address")
    for name in ("client_port", "server_port"):
        value = attrs[name]
        if not (value.isascii() and value.isdigit() and len(value) <= 5
                and int(value) <= 65535):
            raise ProtocolError("postscreen request: %s is not a port: %s"
                                % (name, repr(value)[:100]))
    return client


def _address(attrs: dict[str, str], name: str) -> str:
    """The canonical form of an address attribute (triple.client_address,
    an IPv4-mapped IPv6 address as IPv4); "unknown" is not one here."""
    try:
        address = client_address(attrs[name])
    except BadAddress:
        address = UNKNOWN_CLIENT
    if address == UNKNOWN_CLIENT:
        raise ProtocolError("postscreen request: %s is not an IP address: %s"
                            % (name, repr(attrs[name])[:100]))
    return address


def format_reply(action: str, ttl: int | None = None, service: str = "") -> bytes:
    """Return a reply: the action, the ttl of a pass, the extension."""
    if action not in ACTIONS:
        raise ValueError("not a postscreen action: %r" % action)
    text = "action=%s\n" % action
    if action == "pass":
        if ttl is not None:
            text += "ttl=%d\n" % max(ttl, 0)
        if service:
            text += "smtpd_service_name=%s\n" % service
    return (text + "\n").encode("ascii")
