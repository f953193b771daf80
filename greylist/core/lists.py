"""Static whitelists in postgrey's file syntax: parsing and matching.

DESCRIPTION
    A whitelist file has one entry per line; "#" starts a comment, and
    empty lines are ignored. The syntax is that of postgrey's
    whitelist_clients and whitelist_recipients files (Debian ships them
    in /etc/postgrey), which are read unchanged.

    Client entries match the client:
        /regex/         a regular expression searched in client_name
        192.0.2.10      an IPv4 or IPv6 address
        192.0.2.0/24    an IPv4 or IPv6 network
        192.0.2         the first one to three octets of an IPv4 address:
                        a /8, /16 or /24 (postgrey 1.37 reads "a.b" as a
                        /24; here it is the /16 it looks like)
        example.com     a client_name equal to it or ending in ".example.com"

    Recipient and sender entries match the address (extension removed):
        /regex/         a regular expression searched in the address
        user@           this local part at any domain
        user@domain     this address
        domain          this domain and its subdomains

    Exemptions bundles the exemptions that need no database: SASL
    authentication, greylist_trusted_networks, and the client, recipient
    (with greylist_exempt_recipients) and sender lists, in that order.
    locate() finds the lines of a text whose entries match, for
    greylistctl show; matching requests never use it.
    Reading and reloading the files is whitelist.py's job; this module is
    part of the pure core (no I/O, no clock, no logging: parse() reports
    bad lines through the warn function it is given).

DIAGNOSTICS
    A warning for each line that does not parse (an invalid regular
    expression, for example); such lines are skipped and the rest of the
    file is used.
"""

import re
from typing import Callable

from greylist.core.triple import UNKNOWN_CLIENT, original_sender, strip_extension

Warn = Callable[[str], None]

# Reasons of the exemptions, as logged.
SASL = "sasl"
TRUSTED = "trusted"
WHITELIST_CLIENT = "whitelist-client"
WHITELIST_RECIPIENT = "whitelist-recipient"
WHITELIST_SENDER = "whitelist-sender"


class Entries:
    """Parsed entries of one kind of list."""

    def __init__(self) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.regexes: list[re.Pattern] = []
        self.names: set[str] = set()      # hostnames or domains (suffix match)
        self.locals: set[str] = set()     # "user@"
        self.addresses: set[str] = set()  # "user@domain"


def parse(text: str, kind: str, origin: str, warn: Warn, note: Warn | None = None) -> Entries:
    """Parse whitelist text of kind "client" or "address". warn(line)
    for a line that is skipped, note(line) (default: warn) for one that is
    kept but may not mean what it says."""
    entries = Entries()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            kept_note = _add(entries, entry, kind)
        except ValueError as exc:
            warn("%s, line %d: ignoring %r: %s" % (origin, number, entry[:100], exc))
        else:
            if kept_note:
                (note or warn)("%s, line %d: %r: %s" % (origin, number, entry[:100], kept_note))
    return entries


def locate(text: str, kind: str, matches: Callable[[Entries], bool]
           ) -> list[tuple[int, str]]:
    """The (line number, entry) of each line of text, parsed as parse()
    does, whose entry alone matches (matches(its Entries) holds). Lines
    that do not parse are skipped silently: parse() warned of them.

    For greylistctl show, which names the line that exempted a request:
    the per-request matching keeps no line numbers.
    """
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        entries = Entries()
        try:
            _add(entries, entry, kind)
        except ValueError:
            continue
        if matches(entries):
            found.append((number, entry[:100]))
    return found


# A repeated group that itself repeats, "(x+)+", "([a-z]+[.-]?)*",
# "(\w*){2,}": Python's re backtracks through it in exponential time on
# a near miss, and the sender and client name are the client's to choose
# (a 30-character local part outlasts smtpd's 100 s policy timeout).
_NESTED_REPEAT = re.compile(r"\((?:[^()\\]|\\.)*(?:[+*]|\{\d*,\d*\})(?:[^()\\]|\\.)*\)"
                            r"(?:[+*]|\{\d*,\d*\})")


def _add(entries: Entries, entry: str, kind: str) -> str | None:
    """Add one entry; raise ValueError for one that is skipped; return a
    note for one that is kept but may not mean what it says."""
    if len(entry) > 2 and entry.startswith("/") and entry.endswith("/"):
        if _NESTED_REPEAT.search(entry[1:-1]):
            raise ValueError("a repeated group that repeats inside can take exponential "
                             "time to fail on a crafted address; write it without the "
                             "nesting")
        try:
            entries.regexes.append(re.compile(entry[1:-1], re.IGNORECASE))
        except re.error as exc:
            raise ValueError("invalid regular expression: %s" % exc) from None
        return
    entry = entry.casefold()
    if kind == "client":
        network = _network(entry)
        if network is not None:
            entries.networks.append(network)
            if "/" in entry and _host_bits(entry):
                # Kept as postgrey keeps it, widened; Postfix's cidr
                # tables skip such a pattern.
                return "host address bits set: it matches all of %s" % network
        elif re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?", entry):
            entries.names.add(entry.rstrip("."))
        else:
            raise ValueError("neither an address, a network nor a host name")
    elif any(c.isspace() for c in entry):
        # postgrey warns too ("doesn't look like an address"): an
        # access(5) action after the address would make it match nothing.
        raise ValueError("an address or domain has no white space (no action after it)")
    elif entry.startswith("@"):
        # access(5)'s "@example.com" form: here it would match nothing.
        raise ValueError("a domain is written without the \"@\" (example.com matches "
                         "its subdomains too)")
    elif entry.endswith("@"):
        entries.locals.add(entry[:-1])
    elif "@" in entry:
        local, _, domain = entry.rpartition("@")
        entries.addresses.add(local + "@" + domain.rstrip("."))
    elif entry.startswith("."):
        # access(5)'s ".example.com" form: here it would match nothing.
        raise ValueError("a domain is written without the leading dot (example.com "
                         "matches its subdomains too)")
    else:
        entries.names.add(entry.rstrip("."))


def _host_bits(entry: str) -> bool:
    """Whether a network entry has bits set past its prefix length."""
    import ipaddress
    try:
        ipaddress.ip_network(entry)
    except ValueError:
        return True
    return False


def _network(entry: str):
    import ipaddress
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        pass
    octets = entry.split(".")
    if 1 <= len(octets) <= 3 and all(o.isdigit() and int(o) < 256 for o in octets):
        padded = ".".join(octets + ["0"] * (4 - len(octets)))
        return ipaddress.ip_network("%s/%d" % (padded, 8 * len(octets)))
    return None


def _suffix_match(name: str, names: set[str]) -> bool:
    """Whether name or one of its parent domains is in names."""
    while True:
        if name in names:
            return True
        dot = name.find(".")
        if dot < 0:
            return False
        name = name[dot + 1:]


def match_client(entries: Entries, address: str, client_name: str | None) -> bool:
    """Whether a client (canonical address, client_name) is listed."""
    if entries.networks and address != UNKNOWN_CLIENT:
        import ipaddress
        ip = ipaddress.ip_address(address)
        if any(ip in network for network in entries.networks):
            return True
    if client_name and client_name != UNKNOWN_CLIENT:
        name = client_name.casefold().rstrip(".")
        if _suffix_match(name, entries.names):
            return True
        return any(regex.search(name) for regex in entries.regexes)
    return False


def match_address(entries: Entries, address: str, delimiter: str) -> bool:
    """Whether an address (the extension after a delimiter removed) is listed."""
    address = address.casefold()
    local, at, domain = address.rpartition("@")
    if at and (delimiter or domain.endswith(".")):
        # An absolute domain (bob@example.com.) is the domain itself.
        domain = domain.rstrip(".")
        if delimiter:
            local = strip_extension(local, delimiter)
        address = local + "@" + domain
    if address in entries.addresses or (at and local in entries.locals):
        return True
    if entries.names and _suffix_match(domain if at else address, entries.names):
        return True
    return bool(entries.regexes) and any(regex.search(address) for regex in entries.regexes)


def merge(parts: list[Entries]) -> Entries:
    """Return the entries of several parsed texts together."""
    entries = Entries()
    for part in parts:
        entries.networks += part.networks
        entries.regexes += part.regexes
        entries.names |= part.names
        entries.locals |= part.locals
        entries.addresses |= part.addresses
    return entries


def empty(entries: Entries) -> bool:
    """Whether no entry was parsed."""
    return not (entries.networks or entries.regexes or entries.names
                or entries.locals or entries.addresses)


class Exemptions:
    """The static exemptions in force; None where a list is empty.

    A class with slots, not a named tuple: reason() reads five of its
    attributes per request, and slots are read faster.
    """

    __slots__ = ("trusted", "clients", "recipients", "senders", "delimiter")

    def __init__(self, trusted: tuple = (), clients: Entries | None = None,
                 recipients: Entries | None = None, senders: Entries | None = None,
                 delimiter: str = "+") -> None:
        self.trusted = trusted
        self.clients = clients
        self.recipients = recipients
        self.senders = senders
        self.delimiter = delimiter

    def client_reason(self, address: str) -> str | None:
        """Why a client is exempt by its canonical address alone (trusted
        networks, address and network entries of the client lists), or
        None: for callers that know no client name (postscreen)."""
        if address == UNKNOWN_CLIENT:
            return None
        if self.trusted:
            import ipaddress
            ip = ipaddress.ip_address(address)
            if any(ip in network for network in self.trusted):
                return TRUSTED
        if self.clients is not None and match_client(self.clients, address, None):
            return WHITELIST_CLIENT
        return None

    def reason(self, attrs: dict[str, str], address: str) -> str | None:
        """Return why a request (canonical client address) is exempt, or None."""
        if attrs.get("sasl_username"):
            return SASL
        if self.trusted and address != UNKNOWN_CLIENT:
            import ipaddress
            ip = ipaddress.ip_address(address)
            if any(ip in network for network in self.trusted):
                return TRUSTED
        if self.clients is not None and match_client(self.clients, address,
                                                     attrs.get("client_name")):
            return WHITELIST_CLIENT
        if self.recipients is not None and match_address(
                self.recipients, attrs["recipient"], self.delimiter):
            return WHITELIST_RECIPIENT
        sender = attrs.get("sender")
        if sender and self.senders is not None and (
                match_address(self.senders, sender, self.delimiter)
                or "=" in sender and match_address(self.senders, original_sender(sender),
                                                   self.delimiter)):
            # A BATV-signed or SRS-forwarded sender is its original too.
            return WHITELIST_SENDER
        return None
