"""The policy request loop, independent of its transport.

DESCRIPTION
    serve() reads SMTPD access policy requests from a binary stream,
    answers each on another, flushed, and returns at end of input. It
    serves any number of requests. Policy.answer() decides one request:

    1. screen(): only RCPT requests with a recipient are greylisted.
    2. Static exemptions (whitelist.py): SASL, trusted networks and the
       whitelist files, logged with their reason.
    3. The triple's three records (triple, sender entry, client entry)
       are read in one transaction under a shared lock, and decided on
       (decide.py). Only when the decision changes a record are they
       read again and decided again inside one write transaction under
       the exclusive lock, so concurrent processes never both "see" a
       new triple, while the common path never blocks readers. Changed
       records are committed durably before the reply is sent.

    Requests of one message share Postfix's "instance" attribute. Once a
    recipient of a message is accepted because the client proved itself
    (a known triple, an auto-whitelist entry, or a pass after the delay),
    later new recipients of the same message are accepted too, so that
    a message is never split between accepted and deferred recipients
    (postgrey #93). With greylist_header, the first recipient of a
    message that passed after its delay gets PREPEND X-Greylist instead
    of DUNNO.

    A client that earns, or refreshes, its client auto-whitelisting is
    also written to the client table, a Postfix lmdb table with numeric
    time stamps as values, for check_client_access before
    check_policy_service. After each reply, the process takes a cleanup
    step (cleanup.py).

    A store failure is answered with greylist_failure_action (DUNNO by
    default: fail open), so a broken database never turns into a wall of
    4xx replies; the store is retried every few seconds.

DIAGNOSTICS
    One info line per RCPT decision: action, reason, age, client, sender,
    rcpt. A warning for a record that does not parse (treated as absent)
    and for store failures (at most one per STORE_WARNING_INTERVAL_S). A
    protocol violation is logged as a warning; serve() then returns 1
    without a reply, and the caller exits (SMTPD_POLICY_README).
"""

import email.utils
import socket
import time
from typing import BinaryIO, Callable

from greylist import __version__
from greylist import record as records
from greylist.cleanup import Cleaner
from greylist.config import Config, client_table_name
from greylist.decide import (DUNNO, NO_RECORDS, Decision, Records, decide, defer_text,
                             screen, whitelisted_client)
from greylist.log import Log
from greylist.policy import ProtocolError, Reader, format_reply
from greylist.privacy import SecretError, hashed, load_secret, secret_path
from greylist.store import Store, StoreError
from greylist.triple import UNKNOWN_CLIENT, Triple, client_address, keys, triple_from_request
from greylist.whitelist import Whitelists

STORE_WARNING_INTERVAL_S = 60.0
# Reasons that show the client retries like a real MTA: they let the rest
# of the same message through.
PROVEN = frozenset(("awl-client", "awl-sender", "known", "delay-passed", "message"))


class Policy:
    """Answers policy requests for one process: settings, store, log, clock."""

    def __init__(self, store: Store, cfg: Config, log: Log,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.cfg = cfg
        self.log = log
        self.clock = clock
        self.whitelists = Whitelists(cfg, log.warning)
        # The client table names clients in plaintext: not in privacy mode.
        table = None if cfg.privacy else client_table_name(cfg)
        self.table = None if table is None else Store(table, warn=log.warning)
        self.cleaner = Cleaner(store, self.table, cfg, log, clock)
        self._warned_at: float | None = None
        self._secret: bytes | None = None
        self._instance: str | None = None
        self._accepted = False
        self._header_sent = False
        self._host = socket.gethostname()

    def open_store(self) -> None:
        """Open the store now, so that a broken database is reported at start."""
        try:
            self.store.open()
        except StoreError as exc:
            self._store_failed(exc)

    def answer(self, attrs: dict[str, str]) -> str:
        """Return the action for one request; raise ProtocolError if malformed."""
        request = attrs.get("request")
        if request != "smtpd_access_policy":
            raise ProtocolError("unknown request type: %s" % repr(request)[:100])
        decision = screen(attrs, self.cfg)
        if decision is not None:
            self.log.debug(1, "action=%s reason=%s" % (decision.action, decision.reason))
            return decision.action
        address = client_address(attrs.get("client_address"))
        now = int(self.clock())
        instance = attrs.get("instance")
        if instance != self._instance:
            self._instance, self._accepted, self._header_sent = instance, False, False
        exempt = self.whitelists.screen(attrs, address, now)
        if exempt is not None:
            decision = Decision(DUNNO, exempt)
            action = DUNNO
        else:
            triple = triple_from_request(attrs, self.cfg, address)
            decision = self._decide(triple, now, instance is not None and self._accepted)
            self._update_table(triple, address, decision, now)
            action = self._action(decision, attrs, address)
        self.log.info("action=%s reason=%s age=%d client=%s sender=%s rcpt=%s"
                      % (action.split(None, 1)[0], decision.reason, decision.age, address,
                         attrs.get("sender") or "<>", attrs["recipient"]))
        return action

    def _action(self, decision: Decision, attrs: dict[str, str], address: str) -> str:
        """The reply for a greylisting decision, with message-level effects."""
        if decision.reason in PROVEN:
            self._accepted = True
        if decision.action != DUNNO:
            domain = attrs["recipient"].rpartition("@")[2]
            return defer_text(decision, domain, address)
        if self.cfg.header and decision.reason == "delay-passed" and not self._header_sent:
            self._header_sent = True
            return ("PREPEND X-Greylist: delayed %d seconds by greylist-%s at %s; %s"
                    % (decision.age, __version__, self._host,
                       email.utils.formatdate(self.clock(), localtime=True)))
        return decision.action

    def after_reply(self) -> None:
        """Work that waits until a reply is sent: a cleanup step."""
        self.cleaner.step()

    def close(self) -> None:
        """Release files at the end of the connection."""
        self.cleaner.close()

    def _update_table(self, triple: Triple, address: str, decision: Decision,
                      now: int) -> None:
        """Write a client that earned (or refreshed) its whitelisting to the table.

        IPv4 groups and domains are written as access(5) keys that
        check_client_access matches for the whole group; IPv6 clients by
        their address, as Postfix's partial IPv6 forms cannot express a
        /64 (it cuts the compressed address at colons).
        """
        client = decision.writes.client
        if self.table is None or client is None or not whitelisted_client(client, self.cfg):
            return
        name = address if ":" in address else triple.client
        try:
            self.table.put(name.encode("utf-8"), b"%d" % now)
        except StoreError as exc:
            self._store_failed(exc)

    def keys(self, triple: Triple) -> list[bytes | None]:
        """The keys of the triple's records; no client entry for "unknown"."""
        triple_key, sender_key, client_key = keys(triple)
        found = [triple_key, sender_key, None if triple.client == UNKNOWN_CLIENT else client_key]
        if not self.cfg.privacy:
            return found
        if self._secret is None:
            try:
                self._secret = load_secret(secret_path(self.cfg.database,
                                                       self.cfg.secret_file))
            except SecretError as exc:
                raise StoreError(str(exc)) from None
        return [None if k is None else hashed(self._secret, k) for k in found]

    def _decide(self, triple: Triple, now: int, accepted: bool) -> Decision:
        try:
            keys = self.keys(triple)
            decision = decide(self.records(self.store.get_many(keys), keys), now,
                              self.cfg, accepted)
            if decision.writes == NO_RECORDS or not any(
                    r is not None and k is not None for r, k in zip(decision.writes, keys)):
                return decision
            # Decide again under the exclusive lock: another process may
            # have written these records since our shared-lock read.
            return self.store.update_many(keys, lambda olds: self._write(olds, keys, now,
                                                                         accepted))
        except StoreError as exc:
            self._store_failed(exc)
            return Decision(self.cfg.failure_action, "database-failure")

    def _write(self, olds: list[bytes | None], keys: list[bytes | None], now: int,
               accepted: bool) -> tuple[list[bytes | None], Decision]:
        decision = decide(self.records(olds, keys), now, self.cfg, accepted)
        return [None if r is None else records.encode(r) for r in decision.writes], decision

    def records(self, values: list[bytes | None], keys: list[bytes | None]) -> Records:
        parsed = []
        for value, k in zip(values, keys):
            record = None if value is None else records.decode(value)
            if value is not None and record is None:
                self.log.warning("ignoring malformed record for %s: %s"
                                 % (k.decode("utf-8", "replace"), repr(value)[:100]))
            parsed.append(record)
        return Records(*parsed)

    def _store_failed(self, exc: StoreError) -> None:
        """Warn about a store failure, at most once per interval."""
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= STORE_WARNING_INTERVAL_S:
            self._warned_at = now
            self.log.warning("%s; answering %s (greylist_failure_action) until the "
                             "database works again" % (exc, self.cfg.failure_action))


def serve(instream: BinaryIO, outstream: BinaryIO, policy: Policy) -> int:
    """Answer requests until end of input; return the process exit status.

    Returns 0 at end of input, 1 after a protocol violation (logged, no
    reply sent).
    """
    reader = Reader(instream)
    while True:
        try:
            attrs = reader.read()
            if attrs is None:
                policy.log.debug(1, "end of input, exiting")
                policy.close()
                return 0
            trace = policy.log.verbose >= 2
            if trace:
                policy.log.debug(2, "request: %s" % " ".join(
                    "%s=%s" % item for item in attrs.items()))
            reply = format_reply(policy.answer(attrs))
            if trace:
                policy.log.debug(2, "reply: %s" % reply.decode("utf-8", "replace").strip())
        except ProtocolError as exc:
            policy.log.warning("%s; disconnecting without a reply" % exc)
            return 1
        try:
            outstream.write(reply)
            outstream.flush()
        except BrokenPipeError:
            policy.log.debug(1, "client went away before the reply")
            return 0
        policy.after_reply()
