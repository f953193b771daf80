"""Running the policy handler's steps against the stores, synchronously.

DESCRIPTION
    PolicyService is what a synchronous transport (spawn.py) and
    greylistctl call: answer() takes one request and the connection's
    Session through the handler (handlers/policy.py), runs the plan on
    the store (stores/base.py run_plan), logs the answer once, writes a
    client-table entry when the handler asks for one, and returns the
    action. after_reply() runs a cleanup step (stores/cleanup.py) once
    the reply is sent, so cleanup never delays an answer.

    A store failure is answered with greylist_failure_action (DUNNO by
    default: fail open), so a broken database never turns into a wall of
    4xx replies; the store is retried every few seconds (lmdbenv.py).

DIAGNOSTICS
    The handler's log line per decision; its warnings (a record that
    does not parse), once each; a warning for store failures, at most
    one per warning_interval_s; a warning for each request answered
    DUNNO because an attribute was over the decoder's caps.
"""

import copy
import time
from typing import Callable

from greylist.core.message import Session
from greylist.handlers.policy import Answer, PolicyHandler
from greylist.protocols import policy
from greylist.log import Log
from greylist.stores.base import Store, StoreError, run_plan
from greylist.stores.cleanup import Cleaner
from greylist.whitelist import Whitelists

STORE_WARNING_INTERVAL_S = 60.0
DUNNO_REPLY = policy.format_reply("DUNNO")


class PolicyService:
    """One program's policy handler, stores, whitelists, log and clock."""

    # What a transport needs (transports/spawn.py serve()).
    Decoder = policy.Decoder
    new_session = Session

    def __init__(self, handler: PolicyHandler, store: Store, table: Store | None,
                 whitelists: Whitelists, log: Log, clock: Callable[[], float] = time.time,
                 cleaner: Cleaner | None = None,
                 warning_interval_s: float = STORE_WARNING_INTERVAL_S,
                 postscreen: Store | None = None) -> None:
        self.handler = handler
        self.cfg = handler.cfg
        self.store = store
        self.table = table
        self.whitelists = whitelists
        self.log = log
        self.clock = clock
        self.cleaner = cleaner
        self.warning_interval_s = warning_interval_s
        self.postscreen = postscreen   # the postscreen table, or None
        self._warned_at: float | None = None
        self._table_warned_at: float | None = None

    def renewed(self, handler: PolicyHandler, whitelists: Whitelists) -> "PolicyService":
        """This service with a new handler and whitelists (greylistd's
        SIGHUP): the same stores, tables, cleaner, clock and warnings."""
        new = copy.copy(self)
        new.handler, new.cfg, new.whitelists = handler, handler.cfg, whitelists
        return new

    def open_store(self) -> None:
        """Open the store now, so that a broken database is reported at start."""
        try:
            self.store.open()
        except StoreError as exc:
            self.store_failed(exc)

    def answer(self, attrs: dict[str, str], session: Session) -> str:
        """Return the action for one request; raise ProtocolError if malformed."""
        now = int(self.clock())
        step = self.handler.prepare(attrs, session, now, self.whitelists.exemptions(now))
        if not isinstance(step, Answer):
            try:
                outcome = run_plan(self.store, step.keys, step.change)
            except StoreError as exc:
                self.store_failed(exc)
                outcome = None
            step = self.handler.complete(step, outcome, session)
        return self.finish(step)

    def reply(self, attrs: dict[str, str], session: Session) -> bytes:
        """The reply to one request, framed."""
        return policy.format_reply(self.answer(attrs, session))

    def too_long(self, exc: policy.RequestTooLong) -> bytes:
        """The reply to a request with over-long attributes, discarded by
        the decoder: DUNNO (fail open: nothing is known to decide on),
        with a warning."""
        self.log.warning("%s; answering DUNNO" % exc)
        return DUNNO_REPLY

    def finish(self, answer: Answer) -> str:
        """Write an answer's client-table entry, log it; return its action."""
        if answer.table_write is not None and self.table is not None:
            try:
                run_plan(self.table, [answer.table_write[0]], answer.table_write[1])
            except StoreError as exc:
                self.table_failed(exc)
        if answer.postscreen is not None and self.postscreen is not None:
            try:
                run_plan(self.postscreen, [answer.postscreen[0]], answer.postscreen[1])
            except StoreError as exc:
                self.table_failed(exc)
        self.record(answer)
        return answer.action

    def record(self, answer: Answer) -> None:
        """Log an answer: its warnings, then its line."""
        for warning in answer.warnings:
            self.log.warning(warning)
        if answer.debug:
            self.log.debug(1, answer.line)
        else:
            self.log.info(answer.line)

    def after_reply(self) -> None:
        """Work that waits until a reply is sent: a cleanup step."""
        if self.cleaner is not None:
            self.cleaner.step()

    def close(self) -> None:
        """Release files at the end of the connection."""
        if self.cleaner is not None:
            self.cleaner.close()

    def table_failed(self, exc: StoreError) -> None:
        """Warn about a failing client or postscreen table, at most once per
        interval: greylisting goes on, only the table is not updated."""
        now = time.monotonic()
        if self._table_warned_at is None or \
                now - self._table_warned_at >= self.warning_interval_s:
            self._table_warned_at = now
            self.log.warning("%s; greylisting goes on without updating this table" % exc)

    def store_failed(self, exc: StoreError) -> None:
        """Warn about a store failure, at most once per interval."""
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= self.warning_interval_s:
            self._warned_at = now
            self.log.warning("%s; answering %s (greylist_failure_action) until the "
                             "database works again" % (exc, self.cfg.failure_action))
