"""Running the correspondent learners' plans against the stores, synchronously.

DESCRIPTION
    LearnService is what the spawn transport (transports/spawn.py) calls
    for the learners of handlers/learn.py: SocketmapService for
    greylist-socketmap, OutboundService for greylist --outbound. Each
    reply() runs the handler, then the plans it returned (stores/base.py
    run_plan: an entry that is fresh costs no write), logs what they
    wrote, and returns the protocol's one answer: NOTFOUND, or DUNNO.

    A store failure is logged, at most once per interval, and the answer
    stays the same: a learner never makes Postfix wait or fail (fail
    open). A module of its own, so that the policy program under
    spawn(8) does not import it.

DIAGNOSTICS
    "learn: WHAT new" or "refreshed" for each entry written; the
    handler's lines; a warning for store failures.
"""

import time
from typing import Callable

from greylist.handlers.learn import (TABLE, TABLE_CLIENTS, OutboundHandler, OutboundSession,
                                     Plan, SocketmapHandler, SocketmapSession, table_lookup)
from greylist.log import Log
from greylist.protocols import policy, socketmap
from greylist.service import STORE_WARNING_INTERVAL_S
from greylist.stores.base import Store, StoreError, run_plan
from greylist.stores.cleanup import Cleaner


class LearnService:
    """A correspondent learner's handler, stores, log and clock (see the
    module description)."""

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

    def __init__(self, handler: SocketmapHandler, *args, clients: Store | None = None,
                 **kwargs) -> None:
        super().__init__(handler.cfg, *args, **kwargs)
        self.handler = handler
        self.clients = clients   # the client table, for the clients map

    # The callout service that answers the postscreen map (callout.py).
    postscreen = None

    def reply(self, request: tuple[str, str], session: SocketmapSession) -> bytes:
        """NOTFOUND, after the lookup's plans ran; for the postscreen map,
        "OK permit" when the callout would pass the client."""
        if self.postscreen is not None and request[0] == self.cfg.socketmap_postscreen_name:
            from greylist.handlers.postscreen import socketmap_address
            address = socketmap_address(request[1])
            if address is None:
                return socketmap.NOTFOUND
            return socketmap.PERMIT if self.postscreen.verdict(address).action == "pass" \
                else socketmap.NOTFOUND
        if request[0] in (self.cfg.socketmap_clients_name,
                          self.cfg.socketmap_correspondents_name):
            return self.table_reply(request[0], request[1])
        found, line = self.handler.lookup(request[0], request[1], session, int(self.clock()))
        self.note(line)
        if found:
            self.learn(found)
        return socketmap.NOTFOUND


    def table_store(self, which: str) -> Store | None:
        """The store of a table_lookup() result."""
        return self.clients if which == TABLE_CLIENTS else self.table

    def table_reply(self, name: str, key: str) -> bytes:
        """A clients or correspondents map lookup: "OK STAMP" for a live
        entry, else NOTFOUND (also when the table fails: fail open)."""
        found = table_lookup(name, key, self.cfg)
        store = None if found is None else self.table_store(found[0])
        if store is None:
            return socketmap.NOTFOUND
        try:
            values = store.get_many(found[1])
        except StoreError as exc:
            self.store_failed(exc)
            return socketmap.NOTFOUND
        return live_entry(values, found[2], int(self.clock()))


def live_entry(values: list[bytes | None], lifetimes: list[int | None], now: int) -> bytes:
    """The reply for the first of a lookup's table entries that lives:
    "OK STAMP" (or "OK manual"); NOTFOUND if none does. lifetimes: of
    each entry's time stamp; None: only a manual entry counts there."""
    from greylist.core.tables import MANUAL_OK
    for value, lifetime_s in zip(values, lifetimes):
        if lifetime_s is not None or value == MANUAL_OK:
            found = _live_entry(value, lifetime_s or 0, now)
            if found != socketmap.NOTFOUND:
                return found
    return socketmap.NOTFOUND


def _live_entry(value: bytes | None, lifetime_s: int, now: int) -> bytes:
    """The reply for a table entry: "OK STAMP" while it lives, else NOTFOUND."""
    from greylist.core.tables import MANUAL_OK, stamp_expire_at
    if value == MANUAL_OK:
        # The reply's data is the table's value: "OK manual", an OK.
        return socketmap.format_reply("OK", MANUAL_OK.decode("ascii"))
    if value is None or not value.isdigit():
        return socketmap.NOTFOUND
    when = stamp_expire_at(value, lifetime_s)
    if when is not None and now >= when:
        return socketmap.NOTFOUND
    return socketmap.format_reply("OK", value.decode("ascii"))


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

    def too_long(self, exc: policy.RequestTooLong) -> bytes:
        """DUNNO for a request with over-long attributes, learning nothing."""
        self.log.warning("%s; answering DUNNO" % exc)
        return policy.format_reply("DUNNO")
