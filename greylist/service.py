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
    one per warning_interval_s.
"""

import time
from typing import Callable

from greylist.core.message import Session
from greylist.handlers.learn import (TABLE, OutboundHandler, OutboundSession, Plan,
                                     SocketmapHandler, SocketmapSession)
from greylist.handlers.policy import Answer, PolicyHandler
from greylist.protocols import policy, socketmap
from greylist.log import Log
from greylist.stores.base import Store, StoreError, run_plan
from greylist.stores.cleanup import Cleaner
from greylist.whitelist import Whitelists

STORE_WARNING_INTERVAL_S = 60.0


class PolicyService:
    """One program's policy handler, stores, whitelists, log and clock."""

    # What a transport needs (transports/spawn.py serve()).
    Decoder = policy.Decoder
    new_session = Session

    def __init__(self, handler: PolicyHandler, store: Store, table: Store | None,
                 whitelists: Whitelists, log: Log, clock: Callable[[], float] = time.time,
                 cleaner: Cleaner | None = None,
                 warning_interval_s: float = STORE_WARNING_INTERVAL_S) -> None:
        self.handler = handler
        self.cfg = handler.cfg
        self.store = store
        self.table = table
        self.whitelists = whitelists
        self.log = log
        self.clock = clock
        self.cleaner = cleaner
        self.warning_interval_s = warning_interval_s
        self._warned_at: float | None = None

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

    def finish(self, answer: Answer) -> str:
        """Write an answer's client-table entry, log it; return its action."""
        if answer.table_write is not None and self.table is not None:
            try:
                self.table.put(*answer.table_write)
            except StoreError as exc:
                self.store_failed(exc)
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

    def store_failed(self, exc: StoreError) -> None:
        """Warn about a store failure, at most once per interval."""
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= self.warning_interval_s:
            self._warned_at = now
            self.log.warning("%s; answering %s (greylist_failure_action) until the "
                             "database works again" % (exc, self.cfg.failure_action))


class LearnService:
    """A correspondent learner's handler, stores, log and clock, run
    synchronously: the plans of each request are run (stores/base.py
    run_plan, so an entry that is fresh costs no write), what they write
    is logged, and a store failure is logged (at most once per interval)
    while the answer stays the same: a learner never makes Postfix wait
    or fail (fail open)."""

    def __init__(self, cfg, database: Store | None, table: Store | None, log: Log,
                 clock: Callable[[], float] = time.time, cleaner: Cleaner | None = None,
                 warning_interval_s: float = STORE_WARNING_INTERVAL_S) -> None:
        self.cfg = cfg
        self.store = database
        self.table = table
        self.log = log
        self.clock = clock
        self.cleaner = cleaner
        self.warning_interval_s = warning_interval_s
        self._warned_at: float | None = None

    def open_store(self) -> None:
        """Open the stores now, so that a broken one is reported at start."""
        for store in (self.store, self.table):
            if store is not None:
                try:
                    store.open()
                except StoreError as exc:
                    self.store_failed(exc)

    def target(self, plan: Plan) -> Store | None:
        """The store a plan writes to (None: not kept here)."""
        return self.table if plan.store == TABLE else self.store

    def learn(self, found: list[Plan]) -> None:
        """Run plans; log what they wrote."""
        for plan in found:
            store = self.target(plan)
            if store is None:
                continue
            try:
                result = run_plan(store, [plan.key], plan.change)
            except StoreError as exc:
                self.store_failed(exc)
                continue
            self.learned(plan, result)

    def learned(self, plan: Plan, result: str | None) -> None:
        """Log what a plan did ("new", "refreshed" or None: nothing)."""
        if result is not None:
            self.log.info("learn: %s %s" % (plan.what, result))
        else:
            self.log.debug(1, "learn: %s known" % plan.what)

    def note(self, line: str | None) -> None:
        """Log a handler's line: a warning, or a debug line."""
        if line is None:
            return
        if line.startswith("warning: "):
            self.log.warning(line[len("warning: "):])
        else:
            self.log.debug(1, line)

    def after_reply(self) -> None:
        """Work that waits until a reply is sent: a cleanup step."""
        if self.cleaner is not None:
            self.cleaner.step()

    def close(self) -> None:
        """Release files at the end of the connection."""
        if self.cleaner is not None:
            self.cleaner.close()

    def store_failed(self, exc: StoreError) -> None:
        """Warn about a store failure, at most once per interval."""
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= self.warning_interval_s:
            self._warned_at = now
            self.log.warning("%s; learning nothing until the database works again "
                             "(mail is not affected)" % exc)


class SocketmapService(LearnService):
    """greylist-socketmap: lookups answered NOTFOUND, correspondents learned."""

    Decoder = socketmap.Decoder
    new_session = SocketmapSession

    def __init__(self, handler: SocketmapHandler, *args, **kwargs) -> None:
        super().__init__(handler.cfg, *args, **kwargs)
        self.handler = handler

    def reply(self, request: tuple[str, str], session: SocketmapSession) -> bytes:
        """NOTFOUND, after the lookup's plans ran."""
        found, line = self.handler.lookup(request[0], request[1], session, int(self.clock()))
        self.note(line)
        if found:
            self.learn(found)
        return socketmap.NOTFOUND


class OutboundService(LearnService):
    """greylist --outbound: DUNNO to everything, correspondents learned."""

    Decoder = policy.Decoder
    new_session = OutboundSession

    def __init__(self, handler: OutboundHandler, *args, **kwargs) -> None:
        super().__init__(handler.cfg, *args, **kwargs)
        self.handler = handler

    def reply(self, attrs: dict[str, str], session: OutboundSession) -> bytes:
        """DUNNO, after the request's plans ran."""
        found, line = self.handler.request(attrs, session, int(self.clock()))
        self.note(line)
        if found:
            self.learn(found)
        return policy.format_reply("DUNNO")
