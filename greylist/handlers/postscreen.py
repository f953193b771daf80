"""The postscreen policy callout handler: what greylisting knows about a client.

DESCRIPTION
    PostscreenHandler answers a callout request (protocols/postscreen.py)
    conservatively, because "pass" lets a client skip postscreen's other
    tests for the ttl:

    drop, enforce   for clients in greylist_postscreen_drop_networks or
                    greylist_postscreen_enforce_networks (reasons
                    drop-network, enforce-network); no database needed.
    pass            for clients that greylisting has proven: those in
                    greylist_trusted_networks (trusted) or listed by
                    address or network in greylist_whitelist_clients
                    (whitelist-client), with ttl greylist_postscreen_ttl;
                    and client groups with a manual entry (manual-client,
                    the same ttl) or past greylist_client_awl_passes
                    (awl-client, ttl no longer than the entry's remaining
                    lifetime).
    ignore          everything else (unproven), and whenever the database
                    cannot answer within the budget (database-failure):
                    postscreen's own tests decide.

    The client group is the one greylist_client_match gives the address
    without a client name: postscreen knows none, so with
    greylist_client_match = domain only the prefix fallback groups are
    found; the client's own address is read too (one read, two keys),
    where pool mode keeps the record of a client with an access-label
    name. prepare() answers at once where it can, or returns a Lookup
    whose pure change() reads the group's client record and writes
    nothing; decide() turns that record into the verdict.

    With greylist_client_match = pool, an IPv4 prefix's automatic entry
    (also the prefix of the IPv4 address that a NAT64 address carries)
    is not proof for every address of the prefix: pool mode keys an
    access-network host (dsl-1-2-3-4.example.net) by its address, apart
    from the mail servers of its /24, and postscreen cannot tell which
    one asks. So such an entry passes a client (awl-client) only when
    the postscreen table (greylist_postscreen_table, written by the
    policy service, which knows the client's name) lists the address
    itself: the change then returns a second Lookup, of that table
    (table=True), and the ttl is no longer than that entry lives either.
    A client whose prefix is proven but that the table does not list,
    or that there is no table to list (privacy mode), is "ignore"
    (unproven-host). IPv6 prefixes (pool mode groups no IPv6 host apart)
    and manual group entries (greylistctl whitelist add, the
    administrator's choice) pass the whole prefix as before. With
    greylist_client_match = domain, where the records cannot find a
    domain group from an address, a client that they do not pass is
    passed when the postscreen table lists it.

    This module never touches a store or a stream.

DIAGNOSTICS
    The transport logs each verdict as "action=A ttl=T reason=R
    client=IP".
"""

from typing import Callable, NamedTuple

from greylist.config import Config
from greylist.core.decide import expired, whitelisted_client
from greylist.core.lists import Exemptions
from greylist.core.record import CLIENT, MANUAL, decode
from greylist.core.tables import in_networks
from greylist.core.triple import client_group, client_key

DROP_NETWORK = "drop-network"
ENFORCE_NETWORK = "enforce-network"
MANUAL_CLIENT = "manual-client"
AWL_CLIENT = "awl-client"
UNPROVEN = "unproven"
UNPROVEN_HOST = "unproven-host"
DATABASE_FAILURE = "database-failure"


class Verdict(NamedTuple):
    """A callout answer: action, ttl (pass only), reason, client address."""

    action: str
    ttl: int | None
    reason: str
    address: str

    def line(self) -> str:
        """The log line."""
        return "action=%s%s reason=%s client=%s" % (
            self.action, "" if self.ttl is None else " ttl=%d" % self.ttl,
            self.reason, self.address)


class Lookup(NamedTuple):
    """A verdict that needs a record: keys to read, and the pure change
    (values -> ([None...], Verdict or the next Lookup)), which never
    writes; table: the keys are the postscreen table's, not the
    database's."""

    address: str
    keys: list[bytes]
    change: Callable
    table: bool = False


class PostscreenHandler:
    """Callout verdicts with the settings of one program."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # Pool mode: an IPv4 prefix's automatic entry passes only the
        # addresses that the postscreen table lists; domain mode: the table
        # passes the hosts of domain groups, which the records cannot find
        # from an address (see DESCRIPTION).
        self.per_host_ipv4 = cfg.client_match == "pool"
        self.domain_hosts = cfg.client_match == "domain" and bool(cfg.postscreen_table)

    def prepare(self, address: str, now: int, exemptions: Exemptions) -> "Verdict | Lookup":
        """The verdict for a canonical client address, or the Lookup it needs."""
        if in_networks(address, self.cfg.postscreen_drop_networks):
            return Verdict("drop", None, DROP_NETWORK, address)
        if in_networks(address, self.cfg.postscreen_enforce_networks):
            return Verdict("enforce", None, ENFORCE_NETWORK, address)
        reason = exemptions.client_reason(address)
        if reason is not None:
            return Verdict("pass", self.cfg.postscreen_ttl_s, reason, address)
        group = client_group(address, None, self.cfg)
        keys = [client_key(group)]
        if group != address:
            # A client grouped by its own address (an access-network label,
            # greylist_client_match = pool) has its record there.
            keys.append(client_key(address))

        def change(values: list[bytes | None]) -> tuple[list[bytes | None], "Verdict | Lookup"]:
            verdict = self.decide(address, values[0], now)
            if len(values) > 1:
                own = self.decide(address, values[1], now)
                if own.action == "pass":
                    verdict = own
                elif verdict.reason == AWL_CLIENT and self.per_host_ipv4 and ":" not in group:
                    # An IPv4 prefix, also the one a NAT64 address carries
                    # (core/triple.py): its access hosts are keyed apart.
                    verdict = self.host_lookup(verdict, now)
                elif verdict.action != "pass" and self.domain_hosts:
                    verdict = self.host_lookup(verdict, now)
            return [None] * len(values), verdict
        return Lookup(address, keys, change)

    def host_lookup(self, group: Verdict, now: int) -> "Verdict | Lookup":
        """Pool and domain modes, past the records: the Lookup of the
        address in the postscreen table, which lists the hosts that the
        policy service saw proven. Its change passes a listed host, with a
        ttl no longer than the table entry lives nor (when the prefix's
        automatic entry passes too) than that entry lives. group: the
        verdict of the prefix's record."""
        cfg, address = self.cfg, group.address
        unproven = Verdict("ignore", None, UNPROVEN_HOST if group.action == "pass"
                           else UNPROVEN, address)
        if not cfg.postscreen_table:
            return unproven
        from greylist.core.tables import MANUAL_PERMIT, permit_stamp

        def change(values: list[bytes | None]) -> tuple[list[bytes | None], Verdict]:
            value = values[0]
            if value == MANUAL_PERMIT:
                return [None], Verdict("pass", cfg.postscreen_ttl_s, MANUAL_CLIENT, address)
            stamp = permit_stamp(value)
            age = None if stamp is None else max(now - stamp, 0)
            if age is None or age >= cfg.max_age_s:
                return [None], unproven
            ttl = min(cfg.postscreen_ttl_s, cfg.max_age_s - age,
                      group.ttl if group.action == "pass" else cfg.max_age_s)
            return [None], Verdict("pass", ttl, AWL_CLIENT, address)
        return Lookup(address, [address.encode("ascii")], change, table=True)

    def decide(self, address: str, value: bytes | None, now: int) -> Verdict:
        """The verdict for a client whose group's record is value."""
        cfg = self.cfg
        record = None if value is None else decode(value)
        if (record is None or record.state not in (CLIENT, MANUAL)
                or expired(record, now, cfg) or not whitelisted_client(record, cfg)):
            return Verdict("ignore", None, UNPROVEN, address)
        if record.state == MANUAL:
            return Verdict("pass", cfg.postscreen_ttl_s, MANUAL_CLIENT, address)
        left = cfg.max_age_s - max(now - record.last_seen, 0)
        return Verdict("pass", min(cfg.postscreen_ttl_s, left), AWL_CLIENT, address)

    def failed(self, address: str) -> Verdict:
        """The verdict when the database cannot answer in time."""
        return Verdict("ignore", None, DATABASE_FAILURE, address)


def socketmap_address(key: str) -> str | None:
    """The canonical client address of a postscreen map lookup key (the
    client IP, as postscreen_access_list sends it), or None."""
    from greylist.core.triple import UNKNOWN_CLIENT, BadAddress, client_address
    try:
        address = client_address(key)
    except BadAddress:
        return None
    return None if address == UNKNOWN_CLIENT else address
