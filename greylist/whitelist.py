"""Static whitelists in postgrey's file syntax, reloaded when they change.

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

    A List notes the files' modification times and sizes and reads them
    again when one changed; Whitelists has its lists look at most once
    per CHECK_INTERVAL_S, so that long-lived spawn(8) processes see
    edits without a restart.

    Whitelists bundles the exemptions that need no database: SASL
    authentication, greylist_trusted_networks, and the client, recipient
    (with greylist_exempt_recipients) and sender lists.

DIAGNOSTICS
    Warnings for unreadable files and for lines that do not parse (an
    invalid regular expression, for example); such lines are skipped and
    the rest of the file is used.
"""

import ipaddress
import os
import re
from typing import Callable

from greylist.triple import strip_extension

CHECK_INTERVAL_S = 10.0

Warn = Callable[[str], None]


class Entries:
    """Parsed entries of one kind of list."""

    def __init__(self) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.regexes: list[re.Pattern] = []
        self.names: set[str] = set()      # hostnames or domains (suffix match)
        self.locals: set[str] = set()     # "user@"
        self.addresses: set[str] = set()  # "user@domain"


def parse(text: str, kind: str, origin: str, warn: Warn) -> Entries:
    """Parse whitelist text of kind "client" or "address"."""
    entries = Entries()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            _add(entries, entry, kind)
        except ValueError as exc:
            warn("%s, line %d: ignoring %r: %s" % (origin, number, entry[:100], exc))
    return entries


def _add(entries: Entries, entry: str, kind: str) -> None:
    if len(entry) > 2 and entry.startswith("/") and entry.endswith("/"):
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
        elif re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?", entry):
            entries.names.add(entry.rstrip("."))
        else:
            raise ValueError("neither an address, a network nor a host name")
    elif entry.endswith("@"):
        entries.locals.add(entry[:-1])
    elif "@" in entry:
        entries.addresses.add(entry)
    else:
        entries.names.add(entry.rstrip("."))


def _network(entry: str):
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
    if entries.networks and address != "unknown":
        ip = ipaddress.ip_address(address)
        if any(ip in network for network in entries.networks):
            return True
    if client_name and client_name != "unknown":
        name = client_name.casefold().rstrip(".")
        if _suffix_match(name, entries.names):
            return True
        return any(regex.search(name) for regex in entries.regexes)
    return False


def match_address(entries: Entries, address: str, delimiter: str) -> bool:
    """Whether an address (the extension after a delimiter removed) is listed."""
    address = address.casefold()
    local, at, domain = address.rpartition("@")
    if at and delimiter:
        local = strip_extension(local, delimiter)
        address = local + "@" + domain
    if address in entries.addresses or (at and local in entries.locals):
        return True
    if entries.names and _suffix_match(domain if at else address, entries.names):
        return True
    return bool(entries.regexes) and any(regex.search(address) for regex in entries.regexes)


class List:
    """The entries of some files, reloaded when a file changes."""

    def __init__(self, files: tuple[str, ...], kind: str, warn: Warn,
                 inline: tuple[str, ...] = ()) -> None:
        self.files = files
        self.kind = kind
        self.inline = inline
        self._warn = warn
        self._stamps: list[tuple[int, int] | None] | None = None
        self.entries = Entries()
        self.empty = not files and not inline
        self.refresh()

    def refresh(self) -> None:
        """Reload the files if one changed since the last look."""
        if self.empty:
            return
        stamps = [_stamp(path) for path in self.files]
        if stamps == self._stamps:
            return
        self._stamps = stamps
        entries = parse("\n".join(self.inline), self.kind, "settings", self._warn)
        for path in self.files:
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    text = handle.read()
            except OSError as exc:
                self._warn("whitelist %s: %s" % (path, exc.strerror))
                continue
            part = parse(text, self.kind, path, self._warn)
            entries.networks += part.networks
            entries.regexes += part.regexes
            entries.names |= part.names
            entries.locals |= part.locals
            entries.addresses |= part.addresses
        self.entries = entries


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Whitelists:
    """All static exemptions of the settings."""

    def __init__(self, cfg, warn: Warn) -> None:
        self.delimiter = cfg.sender_delimiter
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in cfg.trusted_networks]
        self.clients = List(cfg.whitelist_clients, "client", warn)
        self.recipients = List(cfg.whitelist_recipients, "address", warn,
                               inline=cfg.exempt_recipients)
        self.senders = List(cfg.whitelist_senders, "address", warn)
        self._refreshed_at = 0.0  # The lists loaded just now, at time 0.

    def screen(self, attrs: dict[str, str], address: str, now: float) -> str | None:
        """Return why a request is exempt from greylisting, or None."""
        if attrs.get("sasl_username"):
            return "sasl"
        if self.trusted and address != "unknown":
            ip = ipaddress.ip_address(address)
            if any(ip in network for network in self.trusted):
                return "trusted"
        if not 0 <= now - self._refreshed_at < CHECK_INTERVAL_S:
            self._refreshed_at = now
            for lists in (self.clients, self.recipients, self.senders):
                lists.refresh()
        if not self.clients.empty and match_client(self.clients.entries, address,
                                                   attrs.get("client_name")):
            return "whitelist-client"
        if not self.recipients.empty and match_address(
                self.recipients.entries, attrs["recipient"], self.delimiter):
            return "whitelist-recipient"
        sender = attrs.get("sender")
        if sender and not self.senders.empty and match_address(
                self.senders.entries, sender, self.delimiter):
            return "whitelist-sender"
        return None
