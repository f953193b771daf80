"""The correspondent learners: the socketmap lookups of a cleanup service,
and the SMTPD policy requests of the submission smtpd.

DESCRIPTION
    Both turn what a local user sends into plans (core/correspondents.py):
    for each correspondent, its time stamp in the correspondent table and
    its (local sender, correspondent) pair in the database, each written
    only when absent or past half its lifetime. Neither ever touches a
    store or a stream: the transport runs the plans (service.py under
    spawn(8), transports/listener.py in greylistd), and neither can defer
    or reject mail.

    SocketmapHandler answers every well-formed lookup "NOTFOUND ", the
    answer that changes nothing in Postfix. On the connection of one
    cleanup process the sender of a message is looked up first (map
    greylist_socketmap_sender_name), then each envelope recipient (map
    greylist_socketmap_recipient_name), once per message
    (postfix-interop.md 8.1). So the session remembers the last sender,
    and each recipient is learned as a correspondent and paired with it.

    A message with the null sender (a read receipt, an auto-reply) has
    no sender_bcc_maps lookup, so its recipients would be paired with the
    sender of the message before it on that cleanup process. With
    sender_canonical_maps (sender_canonical_classes = envelope_sender)
    pointed at the sender map, cleanup looks up every message's sender,
    the null one too ('""'), which forgets the sender before it: the
    only hook that marks the start of every message, also after one that
    smtpd aborted after RCPT (no header lookups). The end of a
    message's envelope is marked by header_checks lookups (map
    greylist_socketmap_header_name), which cleanup makes for each header
    line after the envelope: the first one forgets the sender. Without
    that hook, a sender is forgotten SENDER_TTL_S after it was looked
    up. A recipient with no sender to pair it with teaches nothing, not
    even the correspondent table: it is the null sender's (an auto-reply
    to a spammer's forged return path would otherwise let that address
    skip greylisting for everyone), or one that cleanup extracted from
    the headers (sendmail -t), which come after the header lookups.
    Other map names get "NOTFOUND " and one warning per name.

    OutboundHandler serves the policy service of the submission smtpd
    (check_policy_service { unix:private/greylist-out,
    default_action=DUNNO }), answering DUNNO to everything. It collects
    the recipients of a message at RCPT and learns them at
    END-OF-MESSAGE, where Postfix sends recipient_count (and an empty
    recipient when a message has several): the collected recipients are
    learned only when their number is recipient_count, so a recipient
    that a later restriction rejected is never learned, and a message
    rejected after RCPT, which never reaches END-OF-MESSAGE, teaches
    nothing. Unless greylist_outbound_require_sasl = no, only mail with
    a sasl_username is learned. The local sender is the envelope sender;
    a message with the null sender teaches nothing.

DIAGNOSTICS
    ProtocolError for a policy request that is not smtpd_access_policy.
    Info lines for what is learned ("learn: correspondent=... new"),
    debug lines (-v) for what is not learned and why.
"""

from typing import Callable, NamedTuple

from greylist.config import Config
from greylist.core import correspondents
from greylist.protocols.policy import ProtocolError

REQUEST = "smtpd_access_policy"
# How long a sender lookup is paired with the recipient lookups after it:
# cleanup looks up a message's recipients as smtpd passes them on, within
# one SMTP session (Postfix's smtpd_timeout is 300 s).
SENDER_TTL_S = 300
# The most recipients of one message kept until END-OF-MESSAGE, and the
# longest kept (RFC 5321's path of 256 octets, and some room): greylistd
# serves every connection in one process, and a recipient may otherwise
# be 64 KB long (the line cap).
MAX_RECIPIENTS = 10000
MAX_RECIPIENT_CHARS = 320
# How a sender lookup names the null sender: sender_canonical_maps sends
# it in external form ('""'), as cleanup quotes an empty local part.
NULL_SENDER_KEYS = frozenset(("", '""', "<>"))
TABLE = "table"
DATABASE = "database"
TABLE_CLIENTS = "clients"


class Plan(NamedTuple):
    """One learned entry to write if needed: which store (TABLE or
    DATABASE), the key, the change (a list of one value in, a list of one
    new value and "new", "refreshed" or None out), and what to log."""

    store: str
    key: bytes
    change: Callable
    what: str


class SocketmapSession:
    """The state of one socketmap connection: the last sender looked up."""

    __slots__ = ("sender", "sender_at")

    def __init__(self) -> None:
        self.sender: str | None = None
        self.sender_at = 0


class OutboundSession:
    """The message in progress on one submission smtpd connection."""

    __slots__ = ("instance", "recipients")

    def __init__(self) -> None:
        self.instance: str | None = None
        self.recipients: list[str] = []


def plans(sender: str, correspondent: str, now: int, cfg: Config) -> list[Plan]:
    """The plans that learn correspondent (already screened) for sender.
    The callers never learn from mail without a sender (auto-replies, read
    receipts, Sieve rejects): software answering whatever came in, spam
    included, not mail a user chose to write."""
    if _domain(sender) == _domain(correspondent):
        # Mail within the sender's own domain says nothing about outside
        # senders, and a pair learned from it would pass a forged local
        # sender: never learned, even when greylist_local_domains is empty.
        return []
    # The local sender may be in a local domain (it usually is), but it
    # must be a plausible address and no automatic sender: a MAILER-DAEMON
    # of another domain than $myorigin is looked up (cleanup_addr.c), and
    # what it sends (bounces, auto-replies) goes to whatever return path
    # came in, which neither the pair nor the table may learn.
    if correspondents.screen(sender, cfg) not in (None, correspondents.LOCAL_DOMAIN):
        return []
    found = []
    if cfg.correspondent_table:
        found.append(Plan(TABLE, correspondents.table_key(correspondent, cfg),
                          correspondents.stamp_change(now, cfg),
                          "correspondent=%s" % correspondent))
    found.append(Plan(DATABASE, correspondents.pair(sender, correspondent, cfg),
                      correspondents.pair_change(now, cfg),
                      "pair sender=%s correspondent=%s" % (sender, correspondent)))
    return found


class SocketmapHandler:
    """Socketmap lookups of a cleanup service, learned (see DESCRIPTION)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.warned: set[str] = set()

    def lookup(self, name: str, key: str, session: SocketmapSession, now: int
               ) -> tuple[list[Plan], str | None]:
        """Return the plans of one lookup and a line to log (debug), or a
        warning as ("warning: ..."). The reply is always NOTFOUND."""
        cfg = self.cfg
        if not name:
            # An oversized request (protocols/socketmap.py OVERSIZED).
            return [], "not learning a request over the size limit"
        if name == cfg.socketmap_sender_name:
            if key in NULL_SENDER_KEYS:
                # sender_canonical_maps looks up the null sender too (in
                # external form, '""'): a message with no sender begins,
                # and the sender of the one before it is forgotten.
                session.sender = None
                return [], "sender <> (the null sender)"
            session.sender, session.sender_at = key, now
            return [], "sender %s" % _shown(key)
        if name == cfg.socketmap_header_name:
            # The envelope has ended: what follows is another message's.
            session.sender = None
            return [], None
        if name == cfg.socketmap_recipient_name:
            reason = correspondents.screen(key, cfg)
            if reason is not None:
                return [], "not learning %s: %s" % (_shown(key), reason)
            sender = session.sender
            if sender is not None and not 0 <= now - session.sender_at <= SENDER_TTL_S:
                sender = session.sender = None
            if sender is None:
                return [], ("not learning %s: no sender lookup for this message (the "
                            "null sender, or a recipient from its headers)" % _shown(key))
            return plans(sender, key, now, cfg), None
        if name in (cfg.socketmap_postscreen_name, cfg.socketmap_clients_name,
                    cfg.socketmap_correspondents_name):
            return [], None  # Answered from the tables (learning.py).
        if name not in self.warned and len(self.warned) < 100:
            self.warned.add(name)
            return [], ("warning: socketmap lookup in unknown map %s (expected %s, %s or "
                        "%s); answering NOTFOUND"
                        % (_shown(name), cfg.socketmap_sender_name,
                           cfg.socketmap_recipient_name, cfg.socketmap_header_name))
        return [], None


def table_lookup(name: str, key: str, cfg: Config
                 ) -> tuple[str, list[bytes], list[int | None]] | None:
    """For a lookup in the clients or correspondents map of the socketmap
    server (how Postfix reads those tables when they live in Redis):
    (TABLE_CLIENTS or TABLE, the table keys to read, the lifetime of each
    key's entries: None where only a manual entry counts), or None for a
    key that the table cannot hold. The first key with a live entry
    answers.

    smtpd sends a socketmap the full client address and name only (no
    partial forms), so the map does what check_client_access does with
    an LMDB table: the address's own entry first (a host entry, or an
    automatic entry in pool and domain modes), then its group's (a
    prefix entry; in pool and domain modes a manual one only: their
    automatic entries are the hosts', core/triple.py auto_table_key)."""
    if name == cfg.socketmap_clients_name:
        from greylist.core.triple import (BadAddress, UNKNOWN_CLIENT, client_address,
                                          client_group, registered_domain, table_key)
        try:
            address = client_address(key)
        except BadAddress:
            # check_client_access also looks up the client's name: domain
            # and pool groups are keyed by their domain.
            group = None
            if cfg.client_match == "domain":
                group = registered_domain(key.casefold().rstrip("."))
            elif cfg.client_match == "pool":
                from greylist.core.pools import POOL_ALIASES, pool_of, pool_set
                group = pool_of(key.casefold(), pool_set(cfg.pool_domains))
                group = POOL_ALIASES.get(group, group)
            if group is None:
                return None
            # Pools stay whole (auto_table_key); a domain group's
            # automatic entries are its hosts'.
            return (TABLE_CLIENTS, [group.encode("ascii")],
                    [None if cfg.client_match == "domain" else cfg.max_age_s])
        if address == UNKNOWN_CLIENT:
            return None
        own = address.encode("ascii")
        group = table_key(address, client_group(address, None, cfg))
        if group == own:
            return TABLE_CLIENTS, [own], [cfg.max_age_s]
        per_host = cfg.client_match in ("pool", "domain")
        return TABLE_CLIENTS, [own, group], [cfg.max_age_s,
                                             None if per_host else cfg.max_age_s]
    if name == cfg.socketmap_correspondents_name:
        if correspondents.screen(key, cfg) in (correspondents.NULL, correspondents.IMPLAUSIBLE):
            return None
        return TABLE, [correspondents.table_key(key, cfg)], [cfg.correspondent_lifetime_s]
    return None


class OutboundHandler:
    """Policy requests of the submission smtpd, learned (see DESCRIPTION)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def request(self, attrs: dict[str, str], session: OutboundSession, now: int
                ) -> tuple[list[Plan], str | None]:
        """Return the plans of one request and a debug line; the action is
        always DUNNO. Raises ProtocolError for a request that is not
        smtpd_access_policy."""
        if attrs.get("request") != REQUEST:
            raise ProtocolError("unknown request type: %s" % repr(attrs.get("request"))[:100])
        state = attrs.get("protocol_state", "").upper()
        instance = attrs.get("instance")
        if instance != session.instance:
            session.instance, session.recipients = instance, []
        if self.cfg.outbound_require_sasl and not attrs.get("sasl_username"):
            return [], None
        if state == "RCPT":
            recipient = attrs.get("recipient")
            if recipient and len(session.recipients) < MAX_RECIPIENTS:
                # Counted (recipient_count), but an over-long one not kept.
                session.recipients.append(
                    recipient if len(recipient) <= MAX_RECIPIENT_CHARS else "")
            return [], None
        if state != "END-OF-MESSAGE":
            return [], None
        recipients, session.recipients = session.recipients, []
        count = attrs.get("recipient_count", "")
        sender = attrs.get("sender") or None
        if not count.isdigit() or int(count) != len(recipients):
            return [], ("not learning message %s: %d recipients seen at RCPT, "
                        "recipient_count=%s" % (_shown(instance or ""), len(recipients),
                                                _shown(count)))
        if sender is None:
            return [], "not learning message %s: the null sender" % _shown(instance or "")
        found: list[Plan] = []
        skipped = []
        for recipient in dict.fromkeys(recipients):
            if not recipient:
                skipped.append("a recipient (longer than %d characters)" % MAX_RECIPIENT_CHARS)
                continue
            reason = correspondents.screen(recipient, self.cfg)
            if reason is None:
                found.extend(plans(sender, recipient, now, self.cfg))
            else:
                skipped.append("%s (%s)" % (_shown(recipient), reason))
        return found, ("not learning %s" % ", ".join(skipped)) if skipped else None


def _domain(address: str) -> str:
    return address.rpartition("@")[2].casefold().rstrip(".")


def _shown(text: str) -> str:
    """text for a log line: at most 100 characters, controls escaped."""
    shown = text if text.isprintable() else repr(text)[1:-1]
    return shown[:100]
