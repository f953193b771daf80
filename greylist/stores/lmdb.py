"""A Postfix lmdb table as a store: the transactions.

DESCRIPTION
    LmdbStore is the table that Postfix calls lmdb:NAME (the file
    NAME.lmdb; lmdbfile.py checks it, lmdbenv.py opens it and runs each
    transaction under Postfix's locking protocol). Keys and values are
    stored with one trailing NUL, as postmap writes them. Each operation
    of the store interface (base.py) is one short transaction: reads
    under a shared lock, writes under an exclusive one, committed
    durably (LMDB's defaults: the data pages, then the meta page, are
    synced before the commit returns).

    scan() re-seeks with set_range after the last key it returned, so
    that a deleted position is not the end of a scan (Postfix's own
    iterator stops there).

DIAGNOSTICS
    StoreError (base.py) for every failure; see lmdbenv.py.
"""

import os
from typing import Callable, TypeVar

import lmdb

from greylist.stores.base import Store
from greylist.stores.lmdbenv import Environment
from greylist.stores.lock import EXCLUSIVE, SHARED

T = TypeVar("T")


class LmdbStore(Store):
    """One Postfix lmdb table, opened on first use, safe across processes.

    The keyword arguments tune the Environment (lmdbenv.py).
    """

    def __init__(self, name: str, readonly: bool = False,
                 warn: Callable[[str], None] | None = None, **tuning) -> None:
        self.env = Environment(name, readonly, warn, **tuning)
        self.name = name
        self.path = self.env.path
        self.readonly = readonly

    def open(self) -> None:
        """Open the table now; raise StoreError if that fails."""
        self.env.open()

    def close(self) -> None:
        """Close the environment and the lock descriptor."""
        self.env.close()

    @property
    def failing(self) -> bool:
        """Whether the last attempt to use the table failed."""
        return self.env.failing

    def get_many(self, keys: list[bytes | None]) -> list[bytes | None]:
        """Return the values of keys (None for None) in one read; shared lock."""
        def body(env: lmdb.Environment) -> list[bytes | None]:
            with env.begin() as txn:
                return _read(txn, keys)
        return self.env.run(SHARED, body)

    def get_many_batch(self, batches: list[list[bytes | None]]) -> list[list[bytes | None]]:
        """get_many() of each list of keys, all in one read transaction
        under one shared lock (a daemon's store thread reads a turn's
        plans so: a lock and a transaction each cost more than a get)."""
        def body(env: lmdb.Environment) -> list[list[bytes | None]]:
            with env.begin() as txn:
                return [_read(txn, keys) for keys in batches]
        return self.env.run(SHARED, body)

    def get_many_nowait(self, keys: list[bytes | None]) -> list[bytes | None] | None:
        """get_many() if it needs no wait, else None (lmdbenv try_read)."""
        def body(env: lmdb.Environment) -> list[bytes | None]:
            with env.begin() as txn:
                return _read(txn, keys)
        done, values = self.env.try_read(body)
        return values if done else None

    def update_many(self, keys: list[bytes | None],
                    change: Callable[[list[bytes | None]],
                                     tuple[list[bytes | None], T]]) -> T:
        """Read, change and write several keys in one transaction; exclusive lock.

        change(old values) returns (new values, result), a new value of
        None meaning no write (a None key is never read or written). The
        transaction is committed durably before update_many() returns.
        """
        def body(env: lmdb.Environment) -> T:
            txn = env.begin(write=True)
            try:
                writes, result = _apply(txn, keys, change)
                if not writes:
                    txn.abort()
                    return result
                for k, v in writes:
                    txn.put(k + b"\0", v + b"\0")
                txn.commit()
                return result
            except BaseException:
                txn.abort()
                raise
        return self.env.run(EXCLUSIVE, body)

    def update_batch(self, ops: list[tuple[list[bytes | None], Callable]]) -> list[object]:
        """Run each (keys, change) in order in ONE write transaction under
        one exclusive lock, with one durable commit; return each op's
        result or the exception its change raised.

        Each op reads its keys inside the transaction, so it sees the
        writes of the ops before it: two ops on the same new triple
        record one first-seen time. An op whose change raises writes
        nothing. A failure of the store (the commit, the lock) raises
        StoreError for the whole batch, and nothing is committed.
        """
        def body(env: lmdb.Environment) -> list[object]:
            results: list[object] = []
            txn = env.begin(write=True)
            try:
                dirty = False
                for keys, change in ops:
                    try:
                        writes, result = _apply(txn, keys, change)
                    except lmdb.Error:
                        raise
                    except Exception as exc:  # The op's own error.
                        results.append(exc)
                        continue
                    for k, v in writes:
                        txn.put(k + b"\0", v + b"\0")
                        dirty = True
                    results.append(result)
                if dirty:
                    txn.commit()
                else:
                    txn.abort()
                return results
            except BaseException:
                txn.abort()
                raise
        return self.env.run(EXCLUSIVE, body)

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        """Store many pairs in one write transaction; exclusive lock.

        For bulk loads (benchmarks, imports): the lock is held for the
        whole batch, so keep batches small (a few thousand pairs).
        """
        def body(env: lmdb.Environment) -> None:
            with env.begin(write=True) as txn:
                for key, value in items:
                    if not value:
                        raise ValueError("empty value for %r" % key)
                    txn.put(key + b"\0", value + b"\0")
        self.env.run(EXCLUSIVE, body)

    def delete_if(self, keys: list[bytes],
                  doomed: Callable[[bytes, bytes | None], bool]) -> int:
        """Delete the keys for which doomed(key, value) holds; exclusive lock.

        The values are read again inside the write transaction, so that
        a record changed since the caller looked at it is judged anew.
        Returns how many keys were deleted.
        """
        def body(env: lmdb.Environment) -> int:
            deleted = 0
            with env.begin(write=True) as txn:
                for k in keys:
                    stored = k + b"\0"
                    value = txn.get(stored)
                    if value is None:
                        # A key without the NUL (postmap -n writes them):
                        # scan() shows both forms alike.
                        stored, value = k, txn.get(k)
                    if doomed(k, _strip_or_none(value)) and txn.delete(stored):
                        deleted += 1
            return deleted
        return self.env.run(EXCLUSIVE, body)

    def scan(self, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Return up to limit (key, value) pairs after key after; shared lock.

        One short read transaction per call, re-seeking with set_range so
        that a deleted position is not the end of the scan. Keys must
        ascend: a damaged tree that loops is reported as damaged.
        """
        def body(env: lmdb.Environment) -> list[tuple[bytes, bytes]]:
            items = []
            with env.begin() as txn:
                cursor = txn.cursor()
                start = b"" if after is None else after + b"\0"
                found = cursor.set_range(start)
                previous = start
                while found and len(items) < limit:
                    k, v = cursor.item()
                    if k < previous or (k == previous and items):
                        # Keys must ascend: a damaged tree could loop forever.
                        raise lmdb.CorruptedError("keys out of order after %r" % previous)
                    if after is None or k != start:
                        items.append((_strip(k), _strip(v)))
                    previous = k
                    found = cursor.next()
            return items
        return self.env.run(SHARED, body)

    def info(self) -> dict[str, int]:
        """Return entries, map size and file size; shared lock."""
        def body(env: lmdb.Environment) -> dict[str, int]:
            with env.begin() as txn:
                entries = txn.stat()["entries"]
            return {"entries": entries, "map_size": env.info()["map_size"],
                    "file_size": os.fstat(self.env.fd).st_size}
        return self.env.run(SHARED, body)


def _apply(txn: lmdb.Transaction, keys: list[bytes | None], change: Callable
           ) -> tuple[list[tuple[bytes, bytes]], object]:
    """Read keys in txn, run change; return the writes it asks for (checked,
    not yet put) and its result."""
    news, result = change(_read(txn, keys))
    writes = [(k, v) for k, v in zip(keys, news) if k is not None and v is not None]
    for k, v in writes:
        if not v:
            raise ValueError("empty value for %r" % k)
    return writes, result


def _read(txn: lmdb.Transaction, keys: list[bytes | None]) -> list[bytes | None]:
    """The values of keys in txn (None for a None key or a missing one)."""
    return [None if k is None else _strip_or_none(txn.get(k + b"\0")) for k in keys]


def _strip(raw: bytes) -> bytes:
    return raw[:-1] if raw[-1:] == b"\0" else raw


def _strip_or_none(raw: bytes | None) -> bytes | None:
    return None if raw is None else _strip(raw)
