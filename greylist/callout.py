"""Running the postscreen callout handler against the database, synchronously.

DESCRIPTION
    PostscreenService is what the spawn transport (transports/spawn.py)
    calls for greylist-postscreen, and what greylist's socketmap server
    asks for its postscreen map: each request's client address is
    checked (protocols/postscreen.py), the handler (handlers/postscreen.py)
    answers, reading the client's group record in one short read
    transaction when it must (then, for pool mode's IPv4 prefixes and in
    domain mode, the address's entry in the postscreen table), and the
    verdict is logged and sent. The
    database is opened with a lock budget of BUDGET_S: postscreen gives
    up after postscreen_policy_timeout and uses its default action, so a
    late answer is worse than "ignore", which is what a database that is
    locked, broken or missing gets. A store failure is logged at most
    once per interval.

DIAGNOSTICS
    One info line per verdict; ProtocolError for a malformed request; a
    warning for store failures.
"""

import time
from typing import Callable

from greylist.handlers.postscreen import Lookup, PostscreenHandler, Verdict
from greylist.log import Log
from greylist.protocols import policy, postscreen
from greylist.service import STORE_WARNING_INTERVAL_S
from greylist.stores.base import Store, StoreError
from greylist.whitelist import Whitelists

# The longest a callout waits for a database lock before it answers
# "ignore": well below any sensible postscreen_policy_timeout.
BUDGET_S = 0.1


def within_budget(cfg, tuning):
    """cfg and tuning with every wait (a lock, a Redis call) bounded by
    BUDGET_S: for the programs whose answers postscreen waits for."""
    return (cfg._replace(redis_timeout_ms=min(cfg.redis_timeout_ms, int(BUDGET_S * 1000))),
            tuning._replace(lock_timeout_s=BUDGET_S))


class PostscreenService:
    """greylist-postscreen's handler, database, whitelists, log and clock."""

    Decoder = postscreen.Decoder

    def __init__(self, handler: PostscreenHandler, store: Store, whitelists: Whitelists,
                 log: Log, clock: Callable[[], float] = time.time,
                 warning_interval_s: float = STORE_WARNING_INTERVAL_S,
                 table: Store | None = None) -> None:
        self.handler = handler
        self.cfg = handler.cfg
        self.store = store
        self.table = table   # the postscreen table (handlers/postscreen.py)
        self.whitelists = whitelists
        self.log = log
        self.clock = clock
        self.warning_interval_s = warning_interval_s
        self._warned_at: float | None = None

    @staticmethod
    def new_session() -> None:
        """Callout requests share no state."""
        return None

    def open_store(self) -> None:
        """Open the database now, so that a broken one is reported at start."""
        try:
            self.store.open()
        except StoreError as exc:
            self.store_failed(exc)

    def verdict(self, address: str) -> Verdict:
        """The verdict for a canonical client address, logged."""
        now = int(self.clock())
        step = self.handler.prepare(address, now, self.whitelists.exemptions(now))
        # At most two reads: the client records, then (pool mode's IPv4
        # prefixes, domain mode) the postscreen table's entry of the address.
        while isinstance(step, Lookup):
            store = self.table if step.table else self.store
            try:
                # No table (greylistctl before it exists): nothing listed.
                _, step = step.change([None] * len(step.keys) if store is None
                                      else store.get_many(step.keys))
            except StoreError as exc:
                self.store_failed(exc)
                step = self.handler.failed(address)
        self.log.info(step.line())
        return step

    def reply(self, attrs: dict[str, str], session=None) -> bytes:
        """The reply to one callout request; raises ProtocolError."""
        return self.format(self.verdict(postscreen.check(attrs)))

    def format(self, verdict: Verdict) -> bytes:
        """A verdict as a callout reply."""
        return postscreen.format_reply(verdict.action, verdict.ttl,
                                       self.cfg.postscreen_service_name)

    def too_long(self, exc: policy.RequestTooLong) -> bytes:
        """"ignore" (postscreen's own tests decide) for a request with
        over-long attributes; the callout's Decoder never raises
        RequestTooLong (it closes the connection instead)."""
        self.log.warning("%s; answering ignore" % exc)
        return postscreen.format_reply("ignore")

    def after_reply(self) -> None:
        """Nothing waits for the reply."""

    def close(self) -> None:
        """Nothing to release."""

    def store_failed(self, exc: StoreError) -> None:
        """Warn about a store failure, at most once per interval."""
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= self.warning_interval_s:
            self._warned_at = now
            self.log.warning("%s; answering ignore until the database works again" % exc)
