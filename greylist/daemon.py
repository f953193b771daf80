"""The policy request loop, independent of its transport.

DESCRIPTION
    serve() reads SMTPD access policy requests from a binary stream,
    answers each on another, flushed, and returns at end of input. It
    serves any number of requests. For an RCPT request it looks up the
    triple's record, decides, and writes a changed record before it
    replies, so a deferred triple is durably stored when Postfix sees
    the defer.

    The lookup runs under a shared lock. Only when the decision changes
    the record does it take the exclusive lock, read the record again
    and decide again inside the write transaction, so concurrent
    processes never both "see" a new triple (no check-then-act race),
    while the common path for known triples never blocks readers.

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

import time
from typing import BinaryIO, Callable

from greylist import record as records
from greylist.config import Config
from greylist.decide import Decision, decide, screen
from greylist.log import Log
from greylist.policy import ProtocolError, format_reply, read_request
from greylist.store import Store, StoreError
from greylist.triple import key, triple_from_request

STORE_WARNING_INTERVAL_S = 60.0


class Policy:
    """Answers policy requests for one process: settings, store, log, clock."""

    def __init__(self, store: Store, cfg: Config, log: Log,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.cfg = cfg
        self.log = log
        self.clock = clock
        self._warned_at: float | None = None

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
        triple = triple_from_request(attrs)
        decision = self._decide(key(triple), int(self.clock()))
        self.log.info("action=%s reason=%s age=%d client=%s sender=%s rcpt=%s"
                      % (decision.action.split(None, 1)[0], decision.reason,
                         decision.age, triple.client, triple.sender, triple.recipient))
        return decision.action

    def _decide(self, k: bytes, now: int) -> Decision:
        try:
            decision = decide(self._record(self.store.get(k), k), now, self.cfg)
            if decision.record is None:
                return decision
            # Decide again under the exclusive lock: another process may
            # have written this triple since our shared-lock read.
            return self.store.update(k, lambda old: self._write(old, k, now))
        except StoreError as exc:
            self._store_failed(exc)
            return Decision(self.cfg.failure_action, "database-failure")

    def _store_failed(self, exc: StoreError) -> None:
        """Warn about a store failure, at most once per interval."""
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= STORE_WARNING_INTERVAL_S:
            self._warned_at = now
            self.log.warning("%s; answering %s (greylist_failure_action) until the "
                             "database works again" % (exc, self.cfg.failure_action))

    def _write(self, old: bytes | None, k: bytes, now: int) -> tuple[bytes | None, Decision]:
        decision = decide(self._record(old, k), now, self.cfg)
        return (None if decision.record is None else records.encode(decision.record),
                decision)

    def _record(self, value: bytes | None, k: bytes) -> records.Record | None:
        if value is None:
            return None
        record = records.decode(value)
        if record is None:
            self.log.warning("ignoring malformed record for %s: %s"
                             % (k.decode("utf-8", "replace"), repr(value)[:100]))
        return record


def serve(instream: BinaryIO, outstream: BinaryIO, policy: Policy) -> int:
    """Answer requests until end of input; return the process exit status.

    Returns 0 at end of input, 1 after a protocol violation (logged, no
    reply sent).
    """
    while True:
        try:
            attrs = read_request(instream)
            if attrs is None:
                policy.log.debug(1, "end of input, exiting")
                return 0
            policy.log.debug(2, "request: %s" % " ".join(
                "%s=%s" % item for item in attrs.items()))
            reply = format_reply(policy.answer(attrs))
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
