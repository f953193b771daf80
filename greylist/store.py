"""Postfix-compatible LMDB tables with the Postfix external locking protocol.

DESCRIPTION
    A Store is the table that Postfix calls lmdb:NAME: the single file
    NAME.lmdb (no subdirectory), LMDB's own locking off, data format v1
    as written by LMDB 0.9 (Postfix links liblmdb 0.9). Keys and values
    are stored with one trailing NUL, as postmap writes them.

    Every read transaction runs under a shared whole-file fcntl lock and
    every write transaction under an exclusive one, taken on a dedicated
    descriptor that stays open as long as the environment (closing any
    descriptor of the file would drop the locks). A mutex makes this safe
    between threads. No transaction or lock outlives one call.

    The map size starts at max(16 MiB, file size + 10240) as in Postfix's
    slmdb_open(). On MapFull the write transaction is aborted, the map
    doubled and the transaction retried; on MapResized (another process
    grew the file) the larger size is adopted and the call retried.

    A Store opens lazily and reopens after a failure, at most once per
    REOPEN_DELAY_S, so a repaired file is picked up without a restart.
    It checks that the open file is still the one at its path, and
    reopens the path if the file was deleted or replaced: just before
    every write takes its lock, and before a read when
    SAME_FILE_INTERVAL_S has passed since the last check. A read may
    thus see a replaced file's contents for up to that long (Postfix
    daemons use theirs until the client session ends). A file replaced
    while a write waits for its lock still gets that write.

DIAGNOSTICS
    StoreError, with a message for the administrator, when the file is
    missing its directory, sits in a world-writable directory, is not an
    LMDB 0.9 file (format v3 of LMDB 1.0, or corrupt), or when LMDB or
    the operating system reports an error.
"""

import os
import stat
import struct
import threading
import time
from typing import Callable, Iterator, TypeVar

import lmdb

from greylist.lock import EXCLUSIVE, SHARED, lock, locked, unlock

T = TypeVar("T")

SUFFIX = ".lmdb"
# Postfix's DEF_LMDB_MAP_SIZE and SLMDB_FUDGE (mail_params.h, slmdb.c).
MAP_SIZE = 16 * 1024 * 1024
MAP_FUDGE = 10240
# LMDB 0.9 meta page: 16-byte page header (64-bit), then mm_magic and
# mm_version; MDB_DATA_VERSION is 1 for 0.9 (mdb.c). LMDB 1.0 writes 3.
MDB_MAGIC = 0xBEEFC0DE
_META_V1 = struct.pack("=II", MDB_MAGIC, 1)
# Offsets in an LMDB 0.9 meta page on 64-bit hosts (mdb.c MDB_meta): the
# page size is kept in the free DB's md_pad, then mm_last_pg, mm_txnid.
_META_PAGE_SIZE = 40
_META_LAST_PAGE = 136
_META_END = 152
_MOVE_ASIDE = "move the file aside (do not truncate it) and a new one is created"
# Retries per call after MapFull/MapResized (Postfix allows one per call;
# a resize and a doubling may both be needed).
RETRY_LIMIT = 4
REOPEN_DELAY_S = 10.0
# Most often a read looks whether the file at the path was replaced.
SAME_FILE_INTERVAL_S = 1.0

# py-lmdb 3 bundles LMDB 0.9 and 1.0 and picks 1.0 for new files when
# LMDB_DEFAULT_LIB_VERSION=1 is set: name the 0.9 engine explicitly.
_ENGINE = {"lib_version": 0} if int(lmdb.__version__.split(".")[0]) >= 3 else {}


class StoreError(Exception):
    """The table cannot be opened or a transaction failed."""


def data_file(name: str) -> str:
    """Return the data file of the Postfix table lmdb:name."""
    return name + SUFFIX


def check_directory(path: str) -> None:
    """Raise StoreError unless path's directory exists and is not world-writable."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise StoreError("database directory %s: %s" % (directory, exc.strerror)) from None
    if st.st_mode & stat.S_IWOTH:
        raise StoreError("refusing database directory %s: it is world-writable; use "
                         "a directory writable only by the policy user" % directory)


def check_format(path: str) -> bool:
    """Check an existing data file's LMDB format; return False if it is absent.

    Raises StoreError for a world-writable file, a file in LMDB 1.0's
    format v3, and a file that is not an LMDB database at all. Opens and
    closes the file, so it must not run while this process holds a lock.
    """
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            mode, size = st.st_mode, st.st_size
            head = handle.read(32)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError("cannot read %s: %s" % (path, exc.strerror)) from None
    if mode & stat.S_IWOTH:
        raise StoreError("refusing world-writable database file %s" % path)
    if not head:
        return True  # Empty: LMDB initialises it.
    if head[16:24] == _META_V1:
        _check_length(path, size)
        return True
    if head[24:28] == struct.pack("=I", MDB_MAGIC):
        version = struct.unpack("=I", head[28:32])[0]
        raise StoreError("%s is in LMDB data format v%d, which Postfix's LMDB 0.9 "
                         "cannot read; %s" % (path, version, _MOVE_ASIDE))
    raise StoreError("%s is not an LMDB 0.9 database (corrupt or foreign file); %s"
                     % (path, _MOVE_ASIDE))


_DAMAGE = tuple(getattr(lmdb, name) for name in (
    "CorruptedError", "PageNotFoundError", "InvalidError", "PanicError",
    "BadTxnError", "VersionMismatchError") if hasattr(lmdb, name))


def describe(path: str, exc: Exception) -> str:
    """An error message; for a damaged file it names the recovery."""
    if isinstance(exc, _DAMAGE):
        return "%s is damaged (%s); %s" % (path, exc, _MOVE_ASIDE)
    text = str(exc)
    return text if path in text else "%s: %s" % (path, text)


def _check_length(path: str, size: int) -> None:
    """Raise StoreError if the file is shorter than its newest meta page says.

    LMDB would read the missing pages through its map and the process
    would die of SIGBUS, without a reply or a log line.
    """
    try:
        with open(path, "rb") as handle:
            first = handle.read(_META_END)
            page_size = struct.unpack_from("=I", first, _META_PAGE_SIZE)[0]
            if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
                raise StoreError("%s has an invalid page size; %s" % (path, _MOVE_ASIDE))
            handle.seek(page_size)
            second = handle.read(_META_END)
    except (OSError, struct.error) as exc:
        raise StoreError("cannot read %s: %s" % (path, exc)) from None
    metas = [struct.unpack_from("=QQ", meta, _META_LAST_PAGE) for meta in (first, second)
             if len(meta) == _META_END and meta[16:24] == _META_V1]
    if not metas:
        raise StoreError("%s has no valid meta page; %s" % (path, _MOVE_ASIDE))
    last_page = max(metas, key=lambda meta: meta[1])[0]
    if size < (last_page + 1) * page_size:
        raise StoreError("%s is truncated (%d bytes, its meta page needs %d); %s"
                         % (path, size, (last_page + 1) * page_size, _MOVE_ASIDE))


class Store:
    """One Postfix lmdb table, opened on first use, safe across processes."""

    def __init__(self, name: str, readonly: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.path = data_file(name)
        self.readonly = readonly
        self._warn = warn
        self._env: lmdb.Environment | None = None
        self._fd = -1
        self._mutex = threading.Lock()
        self._failed_at = 0.0
        self._file_id = (0, 0)
        self._checked_at = 0.0

    # Opening and closing.

    def open(self) -> None:
        """Open the table now; raise StoreError if that fails."""
        with self._mutex:
            self._open()

    def close(self) -> None:
        """Close the environment and the lock descriptor."""
        with self._mutex:
            self._close()

    def _open(self, mode: int = EXCLUSIVE) -> lmdb.Environment:
        if self._env is not None:
            if mode == SHARED and time.monotonic() < self._checked_at + SAME_FILE_INTERVAL_S:
                return self._env
            if self._same_file():
                self._checked_at = time.monotonic()
                return self._env
            # Deleted or replaced: Postfix daemons restart then (dict.c);
            # we reopen, so writes never go to a file nobody reads.
            self._close()
            if self._warn is not None:
                self._warn("%s was deleted or replaced; using the file now at that path"
                           % self.path)
        if self._failed_at and time.monotonic() - self._failed_at < REOPEN_DELAY_S:
            raise StoreError("%s: unavailable after an earlier error; retrying in "
                             "at most %d s" % (self.path, REOPEN_DELAY_S))
        try:
            env, fd = self._open_files()
        except StoreError:
            self._failed_at = time.monotonic()
            raise
        self._env, self._fd, self._failed_at = env, fd, 0.0
        st = os.fstat(fd)
        self._file_id = (st.st_ino, st.st_dev)
        self._checked_at = time.monotonic()
        return env

    def _open_files(self) -> tuple[lmdb.Environment, int]:
        check_directory(self.path)
        existed = check_format(self.path)
        if self.readonly and not existed:
            raise StoreError("%s: no such database" % self.path)
        size = os.stat(self.path).st_size if existed else 0
        try:
            env = lmdb.open(self.path, map_size=max(MAP_SIZE, size + MAP_FUDGE),
                            subdir=False, lock=False, readonly=self.readonly,
                            create=not self.readonly, mode=0o644, max_dbs=0,
                            **_ENGINE)
        except lmdb.Error as exc:
            raise StoreError(describe(self.path, exc)) from None
        # Open the lock descriptor after lmdb.open(), which opens and closes
        # the file itself, and keep it as long as the environment.
        try:
            fd = os.open(self.path, (os.O_RDONLY if self.readonly else os.O_RDWR)
                         | os.O_CLOEXEC)
        except OSError as exc:
            env.close()
            raise StoreError("cannot open %s: %s" % (self.path, exc.strerror)) from None
        if not existed:
            # Postfix creates tables 0644 whatever the umask (slmdb.c).
            os.fchmod(fd, 0o644)
        elif size:
            # Read the first and last leaf under a shared lock, so that a
            # damaged tree is reported at open, with its recovery.
            try:
                with locked(fd, SHARED), env.begin() as txn:
                    cursor = txn.cursor()
                    cursor.first()
                    cursor.last()
            except lmdb.Error as exc:
                env.close()
                os.close(fd)
                raise StoreError(describe(self.path, exc)) from None
        return env, fd

    @property
    def failing(self) -> bool:
        """Whether the last attempt to use the table failed."""
        return self._env is None and self._failed_at != 0.0

    def _same_file(self) -> bool:
        """Whether the open file is still the one at self.path."""
        # One stat(2) per call, compared with the identity taken at open: a
        # deleted file fails it, a replaced one has another inode.
        try:
            now = os.stat(self.path)
        except OSError:
            return False
        return (now.st_ino, now.st_dev) == self._file_id

    def _close(self) -> None:
        if self._env is not None:
            self._env.close()
            os.close(self._fd)
            self._env, self._fd = None, -1

    def _fail(self, exc: Exception) -> StoreError:
        """Close after an error (no lock is held then) and describe it."""
        self._close()
        self._failed_at = time.monotonic()
        return StoreError(describe(self.path, exc))

    # Transactions.

    def _run(self, mode: int, body: Callable[[lmdb.Environment], T]) -> T:
        """Run body(env) under the mutex and a whole-file lock, with retries."""
        with self._mutex:
            env = self._open(mode)
            try:
                lock(self._fd, mode)
                try:
                    for _ in range(RETRY_LIMIT):
                        try:
                            return body(env)
                        except lmdb.MapFullError:
                            env.set_mapsize(env.info()["map_size"] * 2)
                        except lmdb.MapResizedError:
                            env.set_mapsize(0)
                    raise lmdb.Error("map size retry limit reached")
                finally:
                    unlock(self._fd)
            except (lmdb.Error, OSError) as exc:
                raise self._fail(exc) from None

    def get(self, key: bytes) -> bytes | None:
        """Return the value of key (both without NUL), or None; shared lock."""
        return self.get_many([key])[0]

    def get_many(self, keys: list[bytes | None]) -> list[bytes | None]:
        """Return the values of keys (None for None) in one read; shared lock."""
        def body(env: lmdb.Environment) -> list[bytes | None]:
            with env.begin() as txn:
                return [None if k is None else _strip_or_none(txn.get(k + b"\0"))
                        for k in keys]
        return self._run(SHARED, body)

    def update(self, key: bytes,
               change: Callable[[bytes | None], tuple[bytes | None, T]]) -> T:
        """Read, change and write one key atomically; exclusive lock.

        change(old value or None) returns (new value or None for no
        write, result); update() commits the new value durably and then
        returns the result. change may run more than once (retries).
        """
        def change_one(olds: list[bytes | None]) -> tuple[list[bytes | None], T]:
            new, result = change(olds[0])
            return [new], result
        return self.update_many([key], change_one)

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
                olds = [None if k is None else _strip_or_none(txn.get(k + b"\0"))
                        for k in keys]
                news, result = change(olds)
                writes = [(k, v) for k, v in zip(keys, news) if k is not None and v is not None]
                if not writes:
                    txn.abort()
                    return result
                for k, v in writes:
                    if not v:
                        raise ValueError("empty value for %r" % k)
                    txn.put(k + b"\0", v + b"\0")
                txn.commit()
                return result
            except BaseException:
                txn.abort()
                raise
        return self._run(EXCLUSIVE, body)

    def put(self, key: bytes, value: bytes) -> None:
        """Store value under key; exclusive lock."""
        self.update(key, lambda old: (value, None))

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
        self._run(EXCLUSIVE, body)

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
                    if doomed(k, _strip_or_none(txn.get(k + b"\0"))) \
                            and txn.delete(k + b"\0"):
                        deleted += 1
            return deleted
        return self._run(EXCLUSIVE, body)

    def delete(self, key: bytes) -> bool:
        """Delete key; return whether it existed; exclusive lock."""
        def body(env: lmdb.Environment) -> bool:
            with env.begin(write=True) as txn:
                return txn.delete(key + b"\0")
        return self._run(EXCLUSIVE, body)

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
        return self._run(SHARED, body)

    def items(self, batch: int = 100) -> Iterator[tuple[bytes, bytes]]:
        """Yield all (key, value) pairs, one batch per shared lock."""
        after = None
        while True:
            chunk = self.scan(after, batch)
            yield from chunk
            if len(chunk) < batch:
                return
            after = chunk[-1][0]

    def info(self) -> dict[str, int]:
        """Return entries, map size and file size; shared lock."""
        def body(env: lmdb.Environment) -> dict[str, int]:
            with env.begin() as txn:
                entries = txn.stat()["entries"]
            return {"entries": entries, "map_size": env.info()["map_size"],
                    "file_size": os.fstat(self._fd).st_size}
        return self._run(SHARED, body)


def _strip(raw: bytes) -> bytes:
    return raw[:-1] if raw[-1:] == b"\0" else raw


def _strip_or_none(raw: bytes | None) -> bytes | None:
    return None if raw is None else _strip(raw)
