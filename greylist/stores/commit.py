"""Group commit: one store thread for a daemon's many connections.

DESCRIPTION
    A Committer owns the stores of a daemon (the database, the client
    table): every read and every write of the process goes through its
    one thread, because POSIX locks do not exclude the threads of one
    process and a py-lmdb write transaction belongs to the thread that
    began it. Connections (asyncio coroutines) hand it work and await
    the result:

    plan(keys, change, store)  a handler's plan (stores/base.py
                        run_plan) on the database or another store of the
                        daemon (the client table, a learner's
                        correspondent table): the thread reads the keys
                        in a snapshot and runs the pure change; if that
                        writes nothing, the result is returned at once,
                        without joining a commit. Otherwise the plan
                        joins the batch of its store.
    call(function)      any other store work (a cleanup step), run in
                        the thread between batches.

    Each turn the thread takes everything queued: it answers the reads,
    then applies the batch of plans that write, in arrival order, inside
    one write transaction per store under one exclusive fcntl lock
    (update_batch), commits durably once per store, and only then
    releases their results. Each plan is decided again inside the transaction, on what
    the plans before it wrote, so two connections racing on the same new
    triple record one first-seen time. A batch is capped at batch_max
    plans, and a turn stops taking plans after batch_s, because Postfix
    readers of the same file wait while the exclusive lock is held.

    A plan that writes nothing is answered at once in the event loop's
    thread, under the store's mutex taken without waiting, when nothing
    is in the way; otherwise the store thread answers it from a snapshot,
    after the commit in progress (about 0.4 ms on this disk), never after
    a batch fills.

DIAGNOSTICS
    A store failure is the StoreError of every plan in its batch; the
    caller answers greylist_failure_action. stats() counts batches,
    their sizes and durations, for the metrics.
"""

import asyncio
import queue
import threading
import time
from typing import Callable

from greylist.stores.base import Store, StoreError, writes

# How many plans one commit takes at most, and how long a turn goes on
# taking them: the exclusive lock makes Postfix's readers wait.
BATCH_MAX = 256
BATCH_S = 0.010

_PLAN, _WRITING, _CALL, _STOP = range(4)


class Committer:
    """The store thread of a daemon; see the module description."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop,
                 batch_max: int = BATCH_MAX, batch_s: float = BATCH_S,
                 observe: Callable[[int, float], None] | None = None) -> None:
        self.store = store
        self.loop = loop
        self.batch_max = batch_max
        self.batch_s = batch_s
        self.observe = observe  # observe(batch size, seconds) after each commit
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="greylist-store", daemon=True)
        self._started = False
        self._stopped = False

    def start(self) -> None:
        """Start the store thread."""
        self._started = True
        self._thread.start()

    def plan(self, keys: list[bytes | None], change: Callable,
             store: Store | None = None) -> asyncio.Future:
        """Run a handler's plan on store (default: the database); the
        future's result is the change's result.

        A plan that writes nothing is answered in the caller's thread when
        the store can read without waiting (no transaction of the store
        thread in progress, no exclusive lock of another process): the
        common path of known triples costs no trip to the store thread.
        """
        store = store or self.store
        if not self._stopped:
            try:
                values = store.get_many_nowait(keys)
            except StoreError as exc:
                values = None
                failure = exc
            else:
                failure = None
            if failure is not None:
                future = self.loop.create_future()
                future.set_exception(failure)
                return future
            if values is not None:
                news, result = change(values)
                if not writes(keys, news):
                    future = self.loop.create_future()
                    future.set_result(result)
                    return future
                # It writes: straight into the next batch, no second snapshot.
                return self._submit(_WRITING, (keys, change, store))
        return self._submit(_PLAN, (keys, change, store))

    def call(self, function: Callable[[], object]) -> asyncio.Future:
        """Run function() in the store thread; the future has its result."""
        return self._submit(_CALL, function)

    def stop(self, timeout_s: float) -> bool:
        """Finish the work queued so far, then end the thread; return
        whether it ended within timeout_s. Call from outside the loop's
        callbacks (the thread resolves futures through the loop)."""
        self._stopped = True
        if not self._started:
            return True
        self._queue.put((_STOP, None, None))
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _submit(self, kind: int, work) -> asyncio.Future:
        future = self.loop.create_future()
        if self._stopped:
            # Nobody would answer: fail at once (the caller fails open).
            future.set_exception(StoreError("the store thread has stopped"))
            return future
        self._queue.put((kind, work, future))
        return future

    # The store thread.

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            deadline = time.monotonic() + self.batch_s
            # Take what else is queued, up to the caps.
            while len(items) < self.batch_max and time.monotonic() < deadline:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = False
            # Store -> its batch, the database's first.
            batches: dict[int, tuple[Store, list]] = {id(self.store): (self.store, [])}
            # The turn's reads first, per store in one get_many_batch (one
            # round trip to Redis), in arrival order within a store.
            reads: dict[int, list] = {}
            for kind, work, future in items:
                if kind == _PLAN:
                    reads.setdefault(id(work[2]), []).append((work, future))
            for pending in reads.values():
                self._read_all(pending, batches)
            for kind, work, future in items:
                if kind == _STOP:
                    stop = True
                elif kind == _PLAN:
                    pass  # read above
                elif kind == _WRITING:
                    batches.setdefault(id(work[2]), (work[2], []))[1].append(
                        (work[0], work[1], future))
                else:
                    self._settle(future, work)
            for store, batch in batches.values():
                if batch:
                    self._commit(store, batch)
            if stop:
                return

    def _read_all(self, pending: list, batches: dict) -> None:
        """Answer plans of one store from snapshots, or add each to the
        store's batch."""
        store = pending[0][0][2]
        try:
            found = store.get_many_batch([work[0] for work, _ in pending])
        except BaseException as exc:
            for _, future in pending:
                self._resolve(future, exc, failed=True)
            return
        answered = []
        for (work, future), values in zip(pending, found):
            keys, change, _ = work
            try:
                news, result = change(values)
            except BaseException as exc:
                answered.append((future, exc, True))
                continue
            if writes(keys, news):
                batches.setdefault(id(store), (store, []))[1].append((keys, change, future))
            else:
                answered.append((future, result, False))
        if answered:
            self._release(answered)

    def _commit(self, store: Store, batch: list) -> None:
        began = time.monotonic()
        try:
            results = store.update_batch([(keys, change) for keys, change, _ in batch])
        except Exception as exc:
            # A store failure, or a bug: the batch fails open, and the
            # thread goes on (a dead store thread would hang every request).
            failure = exc if isinstance(exc, StoreError) else StoreError(
                "store thread: %s: %s" % (type(exc).__name__, exc))
            for _, _, future in batch:
                self._resolve(future, failure, failed=True)
            return
        if self.observe is not None:
            self.observe(len(batch), time.monotonic() - began)
        # Released only now: no reply leaves before the commit of its plan;
        # all of them in one wake-up of the event loop.
        self._release([(future, result, isinstance(result, BaseException))
                       for (_, _, future), result in zip(batch, results)])

    def _settle(self, future, function, args=()) -> None:
        try:
            result = function(*args)
        except BaseException as exc:
            self._resolve(future, exc, failed=True)
        else:
            self._resolve(future, result)

    def _resolve(self, future: asyncio.Future, value, failed: bool = False) -> None:
        self._release([(future, value, failed)])

    def _release(self, outcomes: list[tuple[asyncio.Future, object, bool]]) -> None:
        """Set (future, value, failed) outcomes from the event loop's thread,
        in one callback."""
        def settle() -> None:
            for future, value, failed in outcomes:
                if future.done():
                    continue  # The waiter was cancelled (its connection closed).
                if failed:
                    future.set_exception(value)
                else:
                    future.set_result(value)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # The loop is closed: nobody waits any more.
