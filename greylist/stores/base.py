"""The store interface that every store implements, and running a plan.

DESCRIPTION
    A store maps keys to values (bytes, without Postfix's trailing NUL).
    Every store implements five operations, and passes the one contract
    test suite (tests/test_store_contract.py):

    get_many(keys)          the values of keys (None for an absent key
                            and for a None key) in one consistent read.
    update_many(keys, change)
                            atomic read-change-write: change(old values)
                            returns (new values, result); a new value of
                            None means no write. The change is committed
                            durably before the result is returned.
                            change must be pure and fast: a store may run
                            it more than once (LMDB never does; a store
                            with optimistic transactions retries).
    scan(after, limit)      up to limit (key, value) pairs after the
                            cursor after (None: from the start); the last
                            key returned is the next cursor. A full scan
                            sees every key that exists throughout it.
    delete_if(keys, doomed) delete the keys for which doomed(key, value)
                            holds, judged inside the write, so a record
                            changed since the caller looked is judged
                            anew; returns how many were deleted.
    info()                  a dict with at least "entries".

    A store may also apply many updates at once: update_batch(ops) runs
    each (keys, change) in order, as if each were one update_many, and
    returns one result or exception per op; the LMDB store runs them in
    one write transaction under one exclusive lock with one durable
    commit (group commit, stores/commit.py). Store's own update_batch
    runs them one by one.

    Store is the interface: a store subclasses it, implements the five
    operations, and inherits get, put, delete and items, which Store
    builds on them. run_plan() runs a handler's plan the way every transport does: read
    and change on a snapshot, and only when that would write, the
    atomic update, so the common path never takes a write lock.

DIAGNOSTICS
    StoreError, with a message for the administrator, for anything that
    keeps a store from answering; callers answer greylist_failure_action.
"""

from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
Values = list[bytes | None]
Change = Callable[[Values], tuple[Values, T]]


# What a change returns when it writes nothing, so that run_plan() need
# not look at each value (the common, read-only path).
NO_WRITES: Values = [None, None, None, None]


class StoreError(Exception):
    """The store cannot be opened or an operation failed."""


class Store:
    """The five operations of the module description, and conveniences
    built on them. (A plain base class rather than a typing.Protocol:
    creating a Protocol costs start-up time under spawn(8).)"""

    name = "store"

    # Whether the last attempt to use the store failed (a store that
    # retries later says so, and cleanup waits for it).
    failing = False

    def get_many(self, keys: list[bytes | None]) -> Values:
        """The values of keys, in one consistent read."""
        raise NotImplementedError

    def update_many(self, keys: list[bytes | None], change: Change) -> T:
        """Atomic read-change-write, durable before it returns."""
        raise NotImplementedError

    def scan(self, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to limit (key, value) pairs after the cursor after."""
        raise NotImplementedError

    def delete_if(self, keys: list[bytes],
                  doomed: Callable[[bytes, bytes | None], bool]) -> int:
        """Delete the keys for which doomed(key, value) holds in the write."""
        raise NotImplementedError

    def info(self) -> dict[str, int]:
        """Facts about the store: at least "entries"."""
        raise NotImplementedError

    def update_batch(self, ops: list[tuple[list[bytes | None], Change]]
                     ) -> list[object]:
        """Run each (keys, change) as update_many would, in order; return
        each op's result, or the exception it raised (a StoreError for
        all of them when the store fails)."""
        results: list[object] = []
        for keys, change in ops:
            try:
                results.append(self.update_many(keys, change))
            except StoreError:
                raise
            except Exception as exc:  # The op's own error, not the store's.
                results.append(exc)
        return results

    def get_many_batch(self, batches: list[list[bytes | None]]) -> list[Values]:
        """get_many() of each list of keys (a store may do them in one
        round trip or one transaction)."""
        return [self.get_many(keys) for keys in batches]

    def get_many_nowait(self, keys: list[bytes | None]) -> Values | None:
        """get_many() if it can answer without waiting for a lock or
        another thread, else None. A store without locks always can."""
        return self.get_many(keys)

    def open(self) -> None:
        """Make the store usable now; raise StoreError if it is not."""

    def close(self) -> None:
        """Release the store's resources."""

    def get(self, key: bytes) -> bytes | None:
        """Return the value of key, or None."""
        return self.get_many([key])[0]

    def update(self, key: bytes, change: Callable[[bytes | None], tuple[bytes | None, T]]) -> T:
        """Read, change and write one key atomically (see update_many)."""
        def change_one(olds: Values) -> tuple[Values, T]:
            new, result = change(olds[0])
            return [new], result
        return self.update_many([key], change_one)

    def put(self, key: bytes, value: bytes) -> None:
        """Store value under key."""
        self.update(key, lambda old: (value, None))

    def delete(self, key: bytes) -> bool:
        """Delete key; return whether it existed."""
        return self.delete_if([key], lambda k, v: v is not None) > 0

    def items(self, batch: int = 100) -> Iterator[tuple[bytes, bytes]]:
        """Yield all (key, value) pairs, one scan call per batch."""
        after = None
        while True:
            chunk = self.scan(after, batch)
            yield from chunk
            if len(chunk) < batch:
                return
            after = chunk[-1][0]


def writes(keys: list[bytes | None], news: Values) -> bool:
    """Whether new values would write anything."""
    for k, v in zip(keys, news):
        if k is not None and v is not None:
            return True
    return False


def run_plan(store: Store, keys: list[bytes | None], change: Change) -> T:
    """Run change on a snapshot; if it would write, run it again atomically.

    Returns the result of the change that counted: the snapshot's when
    nothing is written, else the atomic update's (its warnings are the
    ones to log). Raises StoreError.
    """
    news, result = change(store.get_many(keys))
    if news is NO_WRITES or not writes(keys, news):
        return result
    # Decide again under the write lock: another process may have written
    # these records since the snapshot.
    return store.update_many(keys, change)
