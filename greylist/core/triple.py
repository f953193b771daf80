"""The (client, sender, recipient) triple, its normalisation and its keys.

DESCRIPTION
    triple_from_request() turns the attributes of an RCPT request into a
    Triple of three normalised parts.

    client      The client group, per greylist_client_match:
                pool    (the default) the pool domain (core/pools.py) of a
                        verified client_name under one, or, in a request,
                        of an IPv4 address in a pool's published
                        networks, so that a provider's retries from other
                        hosts match; an IPv4 client whose verified name
                        has an access-network label (pools.access_label:
                        dyn, dsl, dhcp, cable, ppp...; one machine) by
                        its whole address, so that a bot's "retry" from
                        another host of its ISP's /24 does not match; any
                        other client as prefix. Without a client name
                        (None: greylistctl by address, the postscreen
                        callout) always as prefix.
                prefix  the IPv4 address cut to greylist_ipv4_prefix bits
                        and the IPv6 address to greylist_ipv6_prefix bits,
                        written as access(5) writes partial addresses:
                        "192.0.2" for a /24, "2001:db8:1:2" for a /64;
                        the whole address at /32 or /128.
                exact   the client address.
                domain  the registered domain (public suffix list) of a
                        verified client_name that does not look dynamic
                        (pools.looks_dynamic), so that retries from other
                        hosts of the same provider pool match; "unknown",
                        dynamic-looking or unlisted names fall back to
                        prefix.
                IPv4-mapped IPv6 addresses count as IPv4. Postfix sends
                "unknown" when the address is unavailable (XCLIENT); such
                clients share the client part "unknown".
    sender      Case-folded, the null sender as "<>". SRS0/SRS1 addresses
                become the original sender, BATV tags (prvs=, msprvs1=)
                are removed, so is an address extension after the first
                greylist_sender_delimiter character, and local-part
                tokens of digits only (VERP counters) become "#". From a
                sending pool, a sender under a pool domain also loses
                its host part and hex IDs (pool_sender()).
    recipient   Case-folded.

    key() joins the parts with "/". In sender and recipient, "%", "/",
    "#", white space, control characters and bytes that are not UTF-8
    are written as %xx (per UTF-8 byte), so the key is unambiguous,
    valid UTF-8 and has no white space (postmap -s prints
    "key<TAB>value"). keys() adds the keys of the auto-whitelist
    records: "client/sender" and the client alone.
    LMDB keys hold at most 511 bytes, the trailing NUL included: a longer
    key keeps its first characters and ends in "#" and the SHA-256 of
    the whole key. With privacy, keys are an HMAC instead (privacy.py).

    This module is part of the pure core: no I/O, no clock, no logging.
    The one exception is the public suffix list, loaded from its package
    on first use when greylist_client_match = domain.

DIAGNOSTICS
    BadAddress (a ValueError) when client_address is neither an IP
    address nor "unknown"; the protocol handler turns it into a protocol
    error.
"""

import functools
import re
from typing import NamedTuple

from greylist.config import Config
from greylist.core.pools import (POOL_ALIASES, access_label, looks_dynamic, pool_network,
                                 pool_of, pool_set)
from greylist.core.record import new

# LMDB's compile-time maximum key size (mdb_env_get_maxkeysize) less the NUL.
MAX_KEY_BYTES = 510
_KEPT_BYTES = MAX_KEY_BYTES - 1 - 64

NULL_SENDER = "<>"
UNKNOWN_CLIENT = "unknown"

# Characters escaped in key fields: the escape itself, the separator, the
# mark of a shortened key, white space and controls (Unicode's too), and
# surrogates that stand for bytes that are not UTF-8.
# Compiled on first use (_regex): most fields need no escape, which
# _plain() tells without a regular expression.
_ESCAPE = "[%/#\\s\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]"
# SRS (libsrs2 and postsrsd): SRS0=HASH=TT=domain=local@forwarder and
# SRS1=HASH=forwarder==HASH=TT=domain=local@..., by position: the
# original local part may have "=" of its own (BATV, VERP), so it is
# everything after the domain, not the last field.
_SRS = (r"(?:srs0[=+-][^=@]*|srs1[=+-][^=@]*=[^=@]*=[=+-][^=@]*)"
        r"=[^=@]*=([^=@]*)=([^@]*)@[^@]+")
# BATV (draft-levine-smtp-batv): prvs=TAG=local, and Microsoft's msprvs1=;
# some signers write prvs=local=TAG, told apart by the draft's tag form
# (a key digit, three day digits, six hexadecimal digits of hash).
_BATV = r"(?:prvs|msprvs1)=([^=]+)=(.+)"
_BATV_TAG = r"[0-9]{4}[0-9a-f]{6}"
# A dotted quad as inet_ntop(3) prints it: decimal octets without
# leading zeros.
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(_OCTET + "(?:[.]" + _OCTET + "){3}")
_DIGITS = re.compile(r"(?<![^.+=_-])[0-9]+(?![^.+=_-])")


@functools.cache
def _regex(pattern: str, flags: int = 0) -> re.Pattern:
    """The compiled pattern, compiled on first use: compiling all of them
    at import costs start-up time under spawn(8)."""
    return re.compile(pattern, flags)


class BadAddress(ValueError):
    """A client_address that is neither an IP address nor "unknown"."""


class Triple(NamedTuple):
    """A normalised (client group, sender, recipient) triple."""

    client: str
    sender: str
    recipient: str


def client_address(value: str | None) -> str:
    """Return the canonical form of a client_address value.

    Raises BadAddress if it is neither an IP address nor "unknown".
    """
    if not value or value == UNKNOWN_CLIENT:
        return UNKNOWN_CLIENT
    # Fast path: a canonical dotted quad (four decimal octets without
    # leading zeros) is returned as it is; anything else takes the full
    # parse below.
    if _CANONICAL_IPV4.fullmatch(value) is not None:
        return value
    # ipaddress accepts an IPv6 zone ("%eth0"); Postfix strips it, so a
    # zone is malformed input (and would carry any bytes into the key).
    if "%" in value:
        raise BadAddress("client_address is not an IP address: %s" % repr(value)[:100])
    # Imported here: most clients take the IPv4 fast path above, and the
    # module costs start-up time under spawn(8).
    import ipaddress
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise BadAddress("client_address is not an IP address: %s"
                         % repr(value)[:100]) from None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def client_group(address: str, client_name: str | None, cfg: Config) -> str:
    """Return the client group of a canonical address (see DESCRIPTION)."""
    match = cfg.client_match
    if address == UNKNOWN_CLIENT or match == "exact":
        return address
    if match == "pool":
        return _pool_group(address, client_name, cfg.pool_domains, cfg.ipv4_prefix,
                           cfg.ipv6_prefix)
    if match == "domain" and client_name and client_name != UNKNOWN_CLIENT:
        name = client_name.casefold().rstrip(".")
        # Pool hosts' names carry their addresses by design (Microsoft's
        # mail-oln040092066048..., SES's a10-219...): not dynamic.
        dynamic = (pool_of(name, pool_set(cfg.pool_domains)) is None
                   and looks_dynamic(name, address))
        domain = None if dynamic else registered_domain(name)
        if domain is not None:
            return domain
    return _prefix(address, cfg.ipv4_prefix, cfg.ipv6_prefix)


@functools.lru_cache(maxsize=4096)
def _pool_group(address: str, client_name: str | None, pool_domains: tuple[str, ...],
                ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The group of greylist_client_match = pool. Cached: a client's
    requests come in runs, and this is on every request's path."""
    if client_name is None:
        # No request (greylistctl by address, the postscreen callout): the
        # prefix, never a whole pool for one of its addresses.
        return _prefix(address, ipv4_prefix, ipv6_prefix)
    if client_name != UNKNOWN_CLIENT:
        pool = pool_of(client_name.casefold(), pool_set(pool_domains))
        if pool is not None:
            return POOL_ALIASES.get(pool, pool)
    pool = pool_network(address)
    if pool is not None:
        return pool
    if (client_name != UNKNOWN_CLIENT and access_label(client_name)
            and (":" not in address or _nat64_embedded(address) is not None)):
        return address
    return _prefix(address, ipv4_prefix, ipv6_prefix)


def _prefix(address: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The address cut to its prefix, as access(5) writes partial addresses.

    An address of the NAT64 well-known prefix 64:ff9b::/96 (RFC 6052) is
    an IPv4 host seen through a translator: it is cut as the IPv4 address
    it carries, not as a /64 that would hold every IPv4 host at once."""
    address = _nat64_embedded(address) or address
    if ":" in address:
        if ipv6_prefix == 128:
            return address
        import ipaddress
        words = ipaddress.IPv6Address(address).exploded.split(":")[:ipv6_prefix // 16]
        return ":".join(word.lstrip("0") or "0" for word in words)
    if ipv4_prefix == 32:
        return address
    return ".".join(address.split(".")[:ipv4_prefix // 8])


# Every canonical address of 64:ff9b::/96 begins so (words 2 to 5 are 0).
_NAT64_START = "64:ff9b::"


def _nat64_embedded(address: str) -> str | None:
    """The IPv4 address that a canonical address of 64:ff9b::/96 carries
    in its last 32 bits; None for any other address."""
    if not address.startswith(_NAT64_START):
        return None
    import ipaddress
    value = int(ipaddress.IPv6Address(address))
    if value >> 32 != 0x64FF9B << 64:
        return None
    return str(ipaddress.IPv4Address(value & 0xFFFFFFFF))


@functools.cache
def _suffix_list():
    # Imported on first use: only greylist_client_match = domain needs it.
    from publicsuffixlist import PublicSuffixList
    return PublicSuffixList()


def registered_domain(hostname: str) -> str | None:
    """Return the registered domain of a host name, or None if it has none.

    A result without a letter (a numeric name) is refused: groups written
    with digits only are IPv4 prefixes.
    """
    if not hostname or len(hostname) > 253 or not re.fullmatch(r"[a-z0-9._-]+", hostname):
        return None
    domain = _suffix_list().privatesuffix(hostname)
    if domain is None or not re.search("[a-z]", domain):
        return None
    return domain


def normalise_sender(sender: str | None, cfg: Config) -> str:
    """Return the sender as it is keyed (see DESCRIPTION); idempotent."""
    if not sender:
        return NULL_SENDER
    address = sender.casefold()
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    local, domain = _unwrapped(local, domain)
    if cfg.sender_delimiter:
        local = strip_extension(local, cfg.sender_delimiter)
    local = _DIGITS.sub("#", local)
    return local + "@" + domain


def original_sender(sender: str) -> str:
    """The sender without SRS and BATV wrapping, case-folded (for the
    sender whitelist: no extension or digit rule)."""
    address = sender.casefold()
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    local, domain = _unwrapped(local, domain)
    return local + "@" + domain


def _unwrapped(local: str, domain: str) -> tuple[str, str]:
    """(local, domain) of a case-folded address with SRS and BATV undone."""
    # SRS and BATV forms both have "=" in the local part.
    # Compiled on first use: most processes under spawn(8) never see
    # such a sender.
    if "=" in local:
        match = _regex(_SRS, re.IGNORECASE).fullmatch(local + "@" + domain)
        if match is not None:
            domain, local = match.group(1), match.group(2)
        match = _regex(_BATV, re.IGNORECASE).fullmatch(local)
        if match is not None:
            tag = _regex(_BATV_TAG, re.IGNORECASE)
            reversed_ = tag.fullmatch(match.group(2)) and not tag.fullmatch(match.group(1))
            local = match.group(1) if reversed_ else match.group(2)
    return local, domain


def strip_extension(local: str, delimiters: str) -> str:
    """Return local cut at the first delimiter character that is not its
    first character (Postfix's recipient_delimiter rule)."""
    if len(delimiters) == 1:
        # The common case (recipient_delimiter = +), without the loop.
        at = local.find(delimiters)
        return local[:at] if at > 0 else local
    cut = len(local)
    for delimiter in delimiters:
        at = local.find(delimiter)
        if 0 < at < cut:
            cut = at
    return local[:cut]


def triple_from_request(attrs: dict[str, str], cfg: Config,
                        address: str | None = None) -> Triple:
    """Return the normalised triple of an RCPT request (recipient required).

    address is the canonical client_address, if the caller has it already.
    """
    if address is None:
        address = client_address(attrs.get("client_address"))
    group = client_group(address, attrs.get("client_name"), cfg)
    sender = normalise_sender(attrs.get("sender"), cfg)
    if cfg.client_match == "pool" and group in pool_set(cfg.pool_domains):
        sender = pool_sender(sender, cfg)
    return new(Triple, (group, sender, attrs["recipient"].casefold()))


# A token of hex digits with a digit, ten or more long: a message or
# recipient ID in a bounce address.
_HEX_ID = r"(?<![^.+=_-])(?=[0-9a-f]*[0-9])[0-9a-f]{10,}(?![^.+=_-])"


def pool_sender(sender: str, cfg: Config) -> str:
    """The sender of mail from a sending pool, as keyed: in a bounce
    address under a pool domain (Mailchimp's bounce-mc.us5_...@mail12.atl91
    .mcsv.net, one per message) the host part is the pool domain and hex
    IDs become "#", so that the messages of one sender share a key as
    they share a client group; other senders are left alone. Idempotent."""
    local, at, domain = sender.rpartition("@")
    if not at:
        return sender
    pool = pool_of(domain, pool_set(cfg.pool_domains))
    if pool is None:
        return sender
    return _regex(_HEX_ID).sub("#", local) + "@" + POOL_ALIASES.get(pool, pool)


class Keys(NamedTuple):
    """The plaintext keys of a triple's records; client is None for
    clients without an address, which never get a client entry; pair is
    the (recipient, sender) correspondent key, or None when it is not
    looked up."""

    triple: bytes
    sender: bytes
    client: bytes | None
    pair: bytes | None = None


def key(triple: Triple) -> bytes:
    """Return the database key of a triple, without the trailing NUL."""
    return keys(triple).triple


def keys(triple: Triple, pair_delimiters: str | None = None) -> Keys:
    """Return the keys of the triple, of its (client group, sender)
    auto-whitelist record and of its client-group record; unless
    pair_delimiters is None, also of its (recipient, sender) correspondent
    pair, as pair_key(recipient, sender, pair_delimiters) returns it (the
    null sender has none)."""
    sender = _escape(triple.sender.casefold())
    recipient = triple.recipient.casefold()
    escaped = _escape(recipient)
    client_sender = triple.client + "/" + sender
    pair = None
    if pair_delimiters is not None and triple.sender != NULL_SENDER:
        # pair_key(), inline: the escaped fields are at hand, and most
        # recipients have no extension to remove.
        if pair_delimiters and (pair_delimiters in recipient if len(pair_delimiters) == 1
                                else any(d in recipient for d in pair_delimiters)):
            user, at, domain = recipient.rpartition("@")
            escaped_local = _escape(strip_extension(user, pair_delimiters) + "@" + domain
                                    if at else recipient)
        else:
            escaped_local = escaped
        pair = _bounded(PAIR_MARK + escaped_local + "/" + sender)
    return new(Keys, (_bounded(client_sender + "/" + escaped), _bounded(client_sender),
                      None if triple.client == UNKNOWN_CLIENT else _bounded(triple.client),
                      pair))


# Correspondent keys start with a character that no client group has
# (groups are addresses, prefixes, registered domains or "unknown").
PAIR_MARK = "@"


def pair_key(local: str, correspondent: str, delimiters: str) -> bytes:
    """Return the key of a (local address, correspondent) pair: local
    case-folded (its extension is removed here), correspondent as
    normalise_sender() returns it."""
    if delimiters:
        user, at, domain = local.rpartition("@")
        if at:
            local = strip_extension(user, delimiters) + "@" + domain
    return _bounded(PAIR_MARK + _escape(local) + "/" + _escape(correspondent))


def sender_key(client: str, sender: str) -> bytes:
    """Return the key of a (client group, sender) entry."""
    return _bounded(client + "/" + _escape(sender.casefold()))


def client_key(client: str) -> bytes:
    """Return the key of a client-group entry."""
    return _bounded(client)


def table_key(address: str, group: str) -> bytes:
    """Return the client table key of a client (canonical address, group).

    IPv4 groups and domains are written as access(5) keys that
    check_client_access matches for the whole group; IPv6 clients by
    their address, as Postfix's partial IPv6 forms cannot express a /64
    (it cuts the compressed address at colons).
    """
    return (address if ":" in address else group).encode("utf-8")


def auto_table_key(address: str, group: str, client_match: str) -> bytes:
    """Return the client table key of an automatic entry (a client that the
    policy service saw earn the auto-whitelist).

    As table_key(), except with greylist_client_match = pool or domain:
    those modes keep an access-network host (dsl-1-2-3-4.example.net)
    apart from the mail servers of its /24 or domain, and a key for the
    whole prefix or domain would let check_client_access match it too. So
    the entry is the host's own address there; only a pool's group (a
    domain name in pool mode) stays whole, as only hosts whose verified
    names lie in the pool match it.
    """
    if client_match == "pool" and ":" not in address and any(c.isalpha() for c in group):
        return group.encode("utf-8")
    if client_match in ("pool", "domain"):
        return address.encode("utf-8")
    return table_key(address, group)


def stale_group_key(key: bytes, client_match: str) -> bool:
    """Whether a client table key of an automatic entry is one that
    auto_table_key() no longer writes: a partial IPv4 address (a prefix)
    in pool and domain modes, a domain in domain mode. Versions before 0.5
    wrote them; check_client_access would match them for every host of
    the prefix or domain. Manual entries ("OK manual") are not asked."""
    if client_match not in ("pool", "domain"):
        return False
    # An automatic value that a manual entry displaced (greylistctl keeps
    # it under KEY/#auto) is judged by its own key.
    key = key.removesuffix(b"/#auto")
    if b":" in key:
        return False
    parts = key.split(b".")
    if len(parts) <= 3 and all(part.isdigit() for part in parts):
        return True
    # A domain: a key with a letter (bytes.lower() changes ASCII letters).
    return client_match == "domain" and key.lower() != key.upper()


def _bounded(text: str) -> bytes:
    encoded = text.encode("utf-8")
    if len(encoded) <= MAX_KEY_BYTES:
        return encoded
    # Cut on a character boundary so that the key stays valid UTF-8.
    kept = encoded[:_KEPT_BYTES].decode("utf-8", "ignore").encode("utf-8")
    import hashlib
    return kept + b"#" + hashlib.sha256(encoded).hexdigest().encode("ascii")


def escape(field: str) -> str:
    """Return field with the characters that keys escape written as %xx."""
    return _escape(field)


def _escape(field: str) -> str:
    # _plain(), inline: this runs twice per request.
    if (field.isprintable() and " " not in field and "%" not in field
            and "/" not in field and "#" not in field):
        return field
    return _regex(_ESCAPE).sub(_percent, field)


def _plain(field: str) -> bool:
    """Whether field has none of the characters _ESCAPE names (_escape()
    has the same test inline).

    A printable string (str.isprintable) has no control, surrogate or
    separator character but the ASCII space, and every white space
    character but the space is a control or a separator.
    """
    return (field.isprintable() and " " not in field and "%" not in field
            and "/" not in field and "#" not in field)


def _percent(match: re.Match) -> str:
    char = match.group()
    # A surrogate U+DC80..U+DCFF stands for the undecodable byte code-0xDC00.
    if "\udc80" <= char <= "\udcff":
        return "%%%02x" % (ord(char) - 0xDC00)
    return "".join("%%%02x" % byte for byte in char.encode("utf-8"))
