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
    verified names too. greylist_pool_domains adds more.

    looks_dynamic() tells, for greylist_client_match = domain, whether a
    verified name looks like an access host (the address's own digits in
    the name, dyn/dsl/dhcp/pool/cable/ppp-style labels): such names are
    grouped by prefix, so that bots behind one ISP never become one
    client.

    This module is part of the pure core: no I/O, no clock, no logging.
"""

import functools
import re


@functools.cache
def _regex(pattern: str) -> re.Pattern:
    """Compiled on first use (start-up time under spawn(8))."""
    return re.compile(pattern)

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

_DYNAMIC_LABEL = (
    r"(?:^|[.-])(?:dyn|dynamic|dsl|adsl|vdsl|xdsl|dhcp|pool|cable|ppp|pppoe|dial|"
    r"dialup|dialin|cust|customer|client|broadband|bb|res|resident|residential|home|"
    r"user|users|mobile|wireless|wifi|ftth|fttx|fiber|fibre|cpe|nat|unassigned|ip)"
    r"[0-9]*(?:[.-]|$)")


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


def looks_dynamic(client_name: str, address: str) -> bool:
    """Whether a verified name looks like an access host's (see DESCRIPTION)."""
    name = client_name.casefold()
    if _regex(_DYNAMIC_LABEL).search(name):
        return True
    if ":" in address:
        return False
    octets = address.split(".")
    # Two neighbouring octets of the address, in either order, joined by
    # nothing or a separator, or zero-padded: 100-65-220-132, 220.65,
    # 065220, or the address in hex.
    joins = ("-", ".", "_", "")
    for first, second in zip(octets, octets[1:]):
        for a, b in ((first, second), (second, first)):
            for join in joins:
                if re.search(r"(?<![0-9])%s%s%s(?![0-9])" % (a, re.escape(join), b), name):
                    return True
            if "%03d%03d" % (int(a), int(b)) in name:
                return True
    return "".join("%02x" % int(o) for o in octets) in name
