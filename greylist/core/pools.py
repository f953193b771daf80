"""Sending pools: the domains whose hosts greylist treats as one client.

DESCRIPTION
    Big senders retry each attempt from another host of their pool, often
    in another /24 or /16, so that /24 grouping delays them for hours
    (bench/RESULTS.md, run L). With greylist_client_match = pool (the
    default), a client whose verified client_name lies under one of these
    domains belongs to the client group of that domain; every other
    client is grouped by its address prefix. The hosts of a pool still
    have to retry once: this list is used for grouping, never as a free
    pass.

    The list holds outbound mail domains only: the names under them are
    mail servers of the provider (from each provider's own documentation
    of its sending hosts, or their reverse names as those hosts announce
    them), never access networks whose customers' machines (bots) have
    verified names too. greylist_pool_domains adds more. Domains of one
    provider are one pool (POOL_ALIASES: Mailchimp's rsgsv.net and
    mcdlv.net hosts are in the pool mcsv.net).

    pool_network() places an IPv4 address in the networks a provider
    publishes for its outbound mail (its SPF record), for the hosts whose
    names are not under the provider's domain: SendGrid's and Mailchimp's
    dedicated addresses carry their customers' white-label names
    (o1.em.CUSTOMER), and each customer's addresses lie in different
    /24s. Only networks that hold the provider's mail servers alone are
    listed, never a cloud's or an access ISP's.

    access_label() tells whether a verified name has a label of an access
    network (dyn, dsl, dhcp, pool, cable, ppp and the like): with
    greylist_client_match = pool such an IPv4 client is grouped by its
    whole address (one machine: a rotating bot's next host in the same
    /24 is another client). The address's digits alone do not count
    there: mail farms name their hosts so too (out203-205-221-239.mail
    .qq.com, static.88-198-12-34.clients.your-server.de), and their
    retries come from neighbouring addresses. looks_dynamic() adds the
    address's own digits in the name; with domain, such a name is
    grouped by prefix rather than by its domain, so that bots behind one
    ISP never become one client.

    This module is part of the pure core: no I/O, no clock, no logging.
"""

import functools


# Registered domains of outbound mail pools. Sources: the providers'
# documentation of their outbound hosts and reverse names.
POOL_DOMAINS = (
    "google.com",             # Gmail, Google Workspace: mail-*.google.com
    "outlook.com",            # Microsoft 365 (*.outbound.protection.outlook.com),
                              # Outlook.com (*.*.outlook.com)
    "amazonses.com",          # Amazon SES: *.smtp-out.amazonses.com
    "mcsv.net",               # Mailchimp: mail*.*.mcsv.net
    "rsgsv.net",              # Mailchimp: mail*.*.rsgsv.net
    "mcdlv.net",              # Mailchimp
    "mandrillapp.com",        # Mailchimp Transactional (Mandrill)
    "sendgrid.net",           # Twilio SendGrid: *.sendgrid.net
    "mimecast.com",           # Mimecast: *-smtp-outbound-*.mimecast.com
    "mimecast.co.za",         # Mimecast (South Africa)
    "messagelabs.com",        # Broadcom Email Security.cloud
    "pphosted.com",           # Proofpoint hosted
    "ppe-hosted.com",         # Proofpoint Essentials
    "yahoodns.net",           # Yahoo Mail outbound (*.mail.*.yahoodns.net)
    "icloud.com",             # Apple iCloud Mail (*.mail.icloud.com)
    "zoho.com",               # Zoho Mail (*.zoho.com)
    "mailgun.net",            # Mailgun (*.mailgun.net)
    "sparkpostmail.com",      # SparkPost (mta*.*.sparkpostmail.com)
    "mtasv.net",              # Postmark (*.mtasv.net)
    "exacttarget.com",        # Salesforce Marketing Cloud (*.exacttarget.com)
    "facebookmail.com",       # Facebook / Meta notifications
)

# Other domains of the same provider's pool: one client group.
POOL_ALIASES = {
    "rsgsv.net": "mcsv.net",
    "mcdlv.net": "mcsv.net",
}

# Networks of outbound mail pools, from the providers' SPF records:
# sendgrid.net (v=spf1 ip4:167.89.0.0/17 ip4:208.117.48.0/20
# ip4:50.31.32.0/19 ip4:198.37.144.0/20 ip4:198.21.0.0/21
# ip4:192.254.112.0/20 ip4:168.245.0.0/17 ip4:149.72.0.0/16
# ip4:159.183.0.0/16 include:ab.sendgrid.net ~all) and servers.mcsv.net
# (ip4:205.201.128.0/20 ip4:198.2.128.0/18 ip4:148.105.8.0/21; postgrey's
# whitelist_clients lists the first two, 2018-09-23).
POOL_NETWORKS = (
    ("sendgrid.net", ("167.89.0.0/17", "208.117.48.0/20", "50.31.32.0/19",
                      "198.37.144.0/20", "198.21.0.0/21", "192.254.112.0/20",
                      "168.245.0.0/17", "149.72.0.0/16", "159.183.0.0/16")),
    ("mcsv.net", ("205.201.128.0/20", "198.2.128.0/18", "148.105.8.0/21")),
)

_DYNAMIC_LABELS = frozenset((
    "dyn", "dynamic", "dsl", "adsl", "vdsl", "xdsl", "dhcp", "pool", "cable", "ppp",
    "pppoe", "dial", "dialup", "dialin", "cust", "customer", "client", "broadband", "bb",
    "res", "resident", "residential", "home", "user", "users", "mobile", "wireless",
    "wifi", "ftth", "fttx", "fiber", "fibre", "cpe", "nat", "unassigned", "ip"))


# For looks_dynamic(): digits stay, separators become "-", the rest " ".
_NUMBERS = {c: (chr(c) if chr(c).isdigit() else "-" if chr(c) in "-._" else " ")
            for c in range(128)}

_SETS: dict[tuple[str, ...], frozenset[str]] = {}


def pool_set(extra: tuple[str, ...]) -> frozenset[str]:
    """The pool domains, the built-in ones and extra, and for pool_of()
    "*SUFFIX" for the last two labels of each three-label domain. (A plain
    dict, not lru_cache: this runs up to three times per request.)"""
    found = _SETS.get(extra)
    if found is None:
        domains = frozenset(POOL_DOMAINS) | frozenset(d.casefold().strip(".") for d in extra)
        found = _SETS[extra] = domains | frozenset(
            "*" + d.split(".", 1)[1] for d in domains if d.count(".") == 2)
    return found


def pool_of(client_name: str, pools: frozenset[str]) -> str | None:
    """The pool domain that a verified, case-folded client name lies under,
    or None: its last two labels, or its last three where the last two are
    a public suffix of a listed three-label domain (mimecast.co.za)."""
    # rfind and one slice: this runs for every request with a name.
    end = len(client_name) - (client_name[-1:] == ".")
    dot = client_name.rfind(".", 0, end)
    if dot <= 0:
        return None
    start = client_name.rfind(".", 0, dot) + 1
    candidate = client_name[start:end]
    if candidate in pools:
        return candidate
    if start > 1 and "*" + candidate in pools:
        candidate = client_name[client_name.rfind(".", 0, start - 1) + 1:end]
        if candidate in pools:
            return candidate
    return None


@functools.cache
def _network_table() -> dict[str, tuple[tuple[int, int, str], ...]]:
    """POOL_NETWORKS by their first two octets ("167.89"): (first, last
    third octet, pool). Every listed network is a /16 or longer."""
    table: dict[str, list[tuple[int, int, str]]] = {}
    for pool, networks in POOL_NETWORKS:
        for network in networks:
            base, _, bits = network.partition("/")
            a, b, c, _ = base.split(".")
            if not 16 <= int(bits) <= 24:
                raise ValueError("POOL_NETWORKS: %s is not a /16 to /24" % network)
            span = 1 << (24 - int(bits))
            table.setdefault(a + "." + b, []).append((int(c), int(c) + span - 1, pool))
    return {key: tuple(sorted(ranges)) for key, ranges in table.items()}


def pool_network(address: str) -> str | None:
    """The pool whose published networks hold a canonical IPv4 address,
    or None (also for IPv6 and "unknown")."""
    # A slice and one dict lookup: this runs for most requests.
    first = address.find(".")
    second = address.find(".", first + 1)
    if first < 0 or second < 0 or ":" in address:
        return None
    ranges = _network_table().get(address[:second])
    if ranges is None:
        return None
    third = address[second + 1:address.find(".", second + 1)]
    if not (third.isascii() and third.isdigit()):
        return None
    third = int(third)
    for low, high, pool in ranges:
        if low <= third <= high:
            return pool
    return None


def access_label(client_name: str) -> bool:
    """Whether a name has a label of _DYNAMIC_LABELS, with digits after it
    or not, between dots and dashes (dyn, dsl12, ppp-7): the mark of an
    access network. No regular expression: it would be compiled in every
    process under spawn(8)."""
    for token in client_name.casefold().replace("-", ".").split("."):
        if token.rstrip("0123456789") in _DYNAMIC_LABELS:
            return True
    return False


@functools.lru_cache(maxsize=4096)
def looks_dynamic(client_name: str, address: str) -> bool:
    """Whether a verified name looks like an access host's (see DESCRIPTION).

    Cached: in pool mode this runs for every request from a named client
    outside the pools, and a client's requests come in runs.
    """
    name = client_name.casefold()
    if access_label(name):
        return True
    if not name.isascii():
        # Only ASCII digits and separators count (the old [0-9] classes).
        name = "".join(c if c.isascii() else " " for c in name)
    if ":" in address:
        return False
    octets = address.split(".")
    if "".join("%02x" % int(o) for o in octets) in name:
        return True                       # the address in hex
    # The name's numbers: separators become "-", anything else but a
    # digit a space; "1-2" in a chunk is two numbers one separator apart.
    chunks = name.translate(_NUMBERS).split()
    if not chunks:
        return False
    # Two neighbouring octets of the address, in either order, as whole
    # numbers of the name joined by nothing or one separator (100-65-220-
    # 132, 220.65, 65220), or zero-padded anywhere (065220).
    pairs = set()
    padded = []
    for first, second in zip(octets, octets[1:]):
        for a, b in ((first, second), (second, first)):
            pairs.update((a + b, a + "-" + b))
            padded.append(a.zfill(3) + b.zfill(3))
    for chunk in chunks:
        numbers = chunk.split("-")
        for number, after in zip(numbers, numbers[1:] + [""]):
            if number and (number in pairs or any(p in number for p in padded)
                           or (after and number + "-" + after in pairs)):
                return True
    return False
