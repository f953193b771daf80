"""An in-memory store: the reference for the store contract, and for tests.

DESCRIPTION
    MemoryStore keeps its keys in a dict and implements the store
    interface (base.py) with the same semantics as the LMDB store,
    within one process: an update is atomic under a mutex, scan() walks
    the keys in byte order. Nothing is durable; no program uses it for
    real data.
"""

import _thread
import bisect
from typing import Callable, TypeVar

from greylist.stores.base import Change, Store, Values

T = TypeVar("T")


class MemoryStore(Store):
    """A store in a dict."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.data: dict[bytes, bytes] = {}
        self._mutex = _thread.allocate_lock()

    def get_many(self, keys: list[bytes | None]) -> Values:
        with self._mutex:
            return [None if k is None else self.data.get(k) for k in keys]

    def update_many(self, keys: list[bytes | None], change: Change) -> T:
        with self._mutex:
            news, result = change([None if k is None else self.data.get(k) for k in keys])
            writes = [(k, v) for k, v in zip(keys, news) if k is not None and v is not None]
            # All or nothing, as a transaction: check every value first.
            for k, v in writes:
                if not v:
                    raise ValueError("empty value for %r" % k)
            self.data.update(writes)
            return result

    def scan(self, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        with self._mutex:
            ordered = sorted(self.data)
            start = 0 if after is None else bisect.bisect_right(ordered, after)
            return [(k, self.data[k]) for k in ordered[start:start + limit]]

    def delete_if(self, keys: list[bytes],
                  doomed: Callable[[bytes, bytes | None], bool]) -> int:
        with self._mutex:
            deleted = 0
            for k in keys:
                if doomed(k, self.data.get(k)) and k in self.data:
                    del self.data[k]
                    deleted += 1
            return deleted

    def info(self) -> dict[str, int]:
        with self._mutex:
            return {"entries": len(self.data)}
