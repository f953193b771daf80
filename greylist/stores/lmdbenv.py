"""The lifecycle of one LMDB environment under Postfix's locking protocol.

DESCRIPTION
    An Environment is the open file of one Postfix lmdb table: LMDB's
    own locking off, data format v1 as written by LMDB 0.9 (Postfix
    links liblmdb 0.9), and a dedicated lock descriptor that stays open
    as long as the environment (closing any descriptor of the file would
    drop the process's fcntl locks). run() runs one transaction body
    under a mutex (POSIX locks do not exclude threads) and a whole-file
    fcntl lock, shared or exclusive (lock.py); no transaction or lock
    outlives one call.

    The map size starts at max(map_size, file size + 10240) as in
    Postfix's slmdb_open(). On MapFull the body is run again with the map
    doubled; on MapResized (another process grew the file) the larger
    size is adopted and the body run again.

    It opens lazily and reopens after a failure, at most once per
    reopen_delay_s, so a repaired file is picked up without a restart.
    It checks that the open file is still the one at its path, and
    reopens the path if the file was deleted or replaced: just before
    every write takes its lock, and before a read when
    same_file_interval_s has passed since the last check. A read may
    thus see a replaced file's contents for up to that long (Postfix
    daemons use theirs until the client session ends). A file replaced
    while a write waits for its lock still gets that write.

DIAGNOSTICS
    StoreError from the file checks (lmdbfile.py), from the trial commit
    of write_check (writecheck.py), and for any error
    that LMDB or the operating system reports, described with the
    recovery where the file is damaged.
"""

import _thread
import os
import time
from typing import Callable, TypeVar

import lmdb

from greylist.stores.base import StoreError
from greylist.stores.lmdbfile import (META_V1, MOVE_ASIDE, check_directory, check_format,
                                      check_length, data_file, describe, open_data_file)
from greylist.stores.lock import EXCLUSIVE, SHARED, LockBusy, lock, locked, unlock

T = TypeVar("T")

# LMDB's page (the system's): a file shorter than two holds no entry.
PAGE_SIZE = max(4096, os.sysconf("SC_PAGE_SIZE"))
# Postfix's DEF_LMDB_MAP_SIZE and SLMDB_FUDGE (mail_params.h, slmdb.c).
MAP_SIZE = 16 * 1024 * 1024
MAP_FUDGE = 10240
# Retries per call after MapFull/MapResized (Postfix allows one per call;
# a resize and a doubling may both be needed, and a young file that
# another process grows by doubling can be resized again between our
# adopting its size and our next transaction: 4 ran out once in CI, in
# one open of 3000 beside a fast writer).
RETRY_LIMIT = 12
REOPEN_DELAY_S = 10.0
# Most often a read looks whether the file at the path was replaced.
SAME_FILE_INTERVAL_S = 1.0

# py-lmdb 3 bundles LMDB 0.9 and 1.0 and picks 1.0 for new files when
# LMDB_DEFAULT_LIB_VERSION=1 is set: name the 0.9 engine explicitly.
_ENGINE = {"lib_version": 0} if int(lmdb.__version__.split(".")[0]) >= 3 else {}


class Environment:
    """One Postfix lmdb table's open file, opened on first use."""

    def __init__(self, name: str, readonly: bool = False,
                 warn: Callable[[str], None] | None = None,
                 reopen_delay_s: float = REOPEN_DELAY_S, map_size: int = MAP_SIZE,
                 same_file_interval_s: float = SAME_FILE_INTERVAL_S,
                 lock_timeout_s: float | None = None, private: bool = False,
                 write_check: bool = False) -> None:
        self.name = name
        # Before using a file it opens, a trial commit in a child process
        # (writecheck.py): greylistd, which one abort would end.
        self.write_check = write_check and not readonly
        # The database itself (0600), not a table Postfix reads (lmdbfile.py).
        self.private = private
        self.path = data_file(name)
        self.readonly = readonly
        self.reopen_delay_s = reopen_delay_s
        self.map_size = map_size
        self.same_file_interval_s = same_file_interval_s
        # None: wait for the lock as long as it takes (the spawn program,
        # which smtpd's own timeout bounds); greylistd bounds it, as one
        # stuck lock would hold every connection.
        self.lock_timeout_s = lock_timeout_s
        self._busy_until = 0.0
        self._warn = warn
        self._env: lmdb.Environment | None = None
        self.fd = -1
        # _thread, the documented low-level API: threading costs start-up time.
        self._mutex = _thread.allocate_lock()
        self._failed_at = 0.0
        # What that failure was: repeated while no reopen is tried, so that
        # every warning names the cause, not only the first one.
        self._failure = ""
        self._file_id = (0, 0)
        self._checked_at = 0.0
        # The file's length when last looked at under a lock: an LMDB file
        # never shrinks, so a shorter one was truncated or copied over in
        # place (cp keeps the inode), and LMDB would read pages that are
        # gone through its map: SIGBUS, without a reply or a log line.
        self._size = 0
        self._shrank = False

    def open(self) -> None:
        """Open the table now; raise StoreError if that fails."""
        with self._mutex:
            self._open()

    def close(self) -> None:
        """Close the environment and the lock descriptor."""
        with self._mutex:
            self._close()

    @property
    def failing(self) -> bool:
        """Whether the last attempt to use the table failed."""
        return self._env is None and self._failed_at != 0.0

    def run(self, mode: int, body: Callable[[lmdb.Environment], T]) -> T:
        """Run body(env) under the mutex and a whole-file lock, with retries.

        mode is SHARED for a read transaction and EXCLUSIVE for a write.
        """
        with self._mutex:
            for _ in range(2):
                env = self._open(mode)
                try:
                    self._lock(mode)
                    try:
                        if not self._shrunk():
                            return _retrying(env, body)
                    finally:
                        unlock(self.fd)
                except (lmdb.Error, OSError) as exc:
                    raise self._fail(exc) from None
                # Shorter than it was: opened again, and checked, first.
            # Shrank again at once: something rewrites it as we look.
            self._close()
            self._failed_at = time.monotonic()
            self._failure = ("%s shrank while open (truncated or copied over in place?); %s"
                             % (self.path, MOVE_ASIDE))
            raise StoreError(self._failure)

    def try_read(self, body: Callable[[lmdb.Environment], T]) -> tuple[bool, T | None]:
        """Run a read body now if nobody is in the way: (True, result), or
        (False, None) when another thread of this process is in a
        transaction, another process holds an exclusive lock, or the file
        is not open or was replaced (opening is the store thread's, with
        its lock waits and trial commit). Never waits (greylistd's event
        loop reads known records so)."""
        if not self._mutex.acquire(blocking=False):
            return False, None
        try:
            env = self._still_open(SHARED)
            if env is None:
                # Opening waits (directory checks, a lock, the trial commit
                # in a child): for the store thread, never the event loop.
                return False, None
            try:
                try:
                    lock(self.fd, SHARED, wait=False)
                except LockBusy:
                    return False, None
                try:
                    if self._shrunk():
                        return False, None  # The store thread opens it again.
                    return True, _retrying(env, body)
                finally:
                    unlock(self.fd)
            except (lmdb.Error, OSError) as exc:
                raise self._fail(exc) from None
        finally:
            self._mutex.release()

    def _lock(self, mode: int) -> None:
        """Take the lock; with lock_timeout_s, within it. After a wait that
        ran out, each try is a single one until lock_timeout_s has passed,
        so that a lock held for long costs each request one fcntl call,
        not a whole wait (greylistd's queue would add them up)."""
        timeout = self.lock_timeout_s
        if timeout is not None and time.monotonic() < self._busy_until:
            timeout = 0.0
        try:
            lock(self.fd, mode, timeout_s=timeout)
        except LockBusy:
            self._busy_until = time.monotonic() + self.lock_timeout_s
            raise StoreError("%s: locked by another process for more than %.1f s; "
                             "answering without the database"
                             % (self.path, self.lock_timeout_s)) from None

    def _still_open(self, mode: int) -> lmdb.Environment | None:
        """The open environment while it is the file at the path (for a
        read looked at once per same_file_interval_s), else None."""
        if self._env is None or self._shrank:
            return None
        now = time.monotonic()
        if mode == SHARED and now < self._checked_at + self.same_file_interval_s:
            return self._env
        if self._same_file():
            self._checked_at = now
            return self._env
        return None

    def _open(self, mode: int = EXCLUSIVE) -> lmdb.Environment:
        env = self._still_open(mode)
        if env is not None:
            return env
        if self._env is not None:
            # Deleted or replaced: Postfix daemons restart then (dict.c);
            # we reopen, so writes never go to a file nobody reads.
            shrank = self._shrank
            self._close()
            if self._warn is not None:
                self._warn("%s was truncated or rewritten in place; opening it again"
                           % self.path if shrank else
                           "%s was deleted or replaced; using the file now at that path"
                           % self.path)
        if self._failed_at and time.monotonic() - self._failed_at < self.reopen_delay_s:
            raise StoreError("%s: unavailable after an earlier error (%s); retrying in "
                             "at most %d s" % (self.path, self._failure, self.reopen_delay_s))
        try:
            env, fd = self._open_files()
            if self.write_check:
                from greylist.stores.writecheck import trial
                try:
                    problem = trial(self.path, env, fd, self.lock_timeout_s or 2.0)[0]
                except OSError as exc:   # No pipe or fork: as good as failed.
                    problem = "%s: no trial write: %s" % (self.path, exc.strerror)
                except BaseException:
                    env.close()
                    os.close(fd)
                    raise
                if problem is not None:
                    env.close()
                    os.close(fd)
                    raise StoreError(problem)
        except StoreError as exc:
            self._failed_at, self._failure = time.monotonic(), str(exc)
            raise
        self._env, self.fd, self._failed_at = env, fd, 0.0
        st = os.fstat(fd)
        self._file_id = (st.st_ino, st.st_dev)
        self._size, self._shrank = st.st_size, False
        self._checked_at = time.monotonic()
        return env

    def _open_files(self) -> tuple[lmdb.Environment, int]:
        check_directory(self.path)
        # Our descriptor first, with O_NOFOLLOW (or O_EXCL when it creates
        # the file): it is the lock descriptor and what every check looks
        # at. LMDB opens the path itself afterwards, and py-lmdb opens and
        # closes it once more (which would drop a lock: none is held yet).
        fd, existed = open_data_file(self.path, self.readonly, self.private)
        try:
            if existed and not self.readonly:
                self._restart_unfinished(fd)
            check_format(self.path, fd)
            st = os.fstat(fd)
            env = lmdb.open(self.path, map_size=max(self.map_size, st.st_size + MAP_FUDGE),
                            subdir=False, lock=False, readonly=self.readonly,
                            create=not self.readonly, mode=0o600, max_dbs=0,
                            **_ENGINE)
        except lmdb.Error as exc:
            os.close(fd)
            raise StoreError(describe(self.path, exc)) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            self._check_opened(env, fd, st, existed)
        except BaseException:
            env.close()
            os.close(fd)
            raise
        return env, fd

    def _restart_unfinished(self, fd: int) -> None:
        """Empty a file whose creation was cut short (a full disk during
        LMDB's first write of its two meta pages): shorter than two pages,
        it holds no entry (data pages come after them), but LMDB refuses
        it as "not an LMDB file" for ever. Only a file that begins as
        LMDB's does (or with zeros), under the exclusive lock."""
        if not 0 < os.fstat(fd).st_size < 2 * PAGE_SIZE:
            return
        try:
            lock(fd, EXCLUSIVE, timeout_s=self.lock_timeout_s)
        except LockBusy:
            return
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 32, 0)
            if 0 < size < 2 * PAGE_SIZE and (head[16:24] == META_V1 or not head.strip(b"\0")):
                os.ftruncate(fd, 0)
                if self._warn is not None:
                    self._warn("%s was %d bytes, shorter than LMDB's two meta pages (its "
                               "creation was cut short: a full disk?) and held no entry; "
                               "starting it afresh" % (self.path, size))
        finally:
            unlock(fd)

    def _check_opened(self, env: lmdb.Environment, fd: int, st: os.stat_result,
                      existed: bool) -> None:
        """Raise StoreError unless LMDB opened our file and it is sound.

        The directory checks make a swap of the name impossible for
        anyone but its owner; this catches the owner's own (a file moved
        aside at that moment). Then, for an existing file, the length and
        the first and last leaf are read under a shared lock, so that a
        file another process grows is never taken for damage (MapResized
        is retried), and a damaged tree is reported at open, with its
        recovery. Within lock_timeout_s: a lock held longer skips these
        checks (the reads themselves wait within it too), so that a
        process started meanwhile still answers in time.
        """
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except OSError as exc:
            raise StoreError("cannot open %s: %s" % (self.path, exc.strerror)) from None
        if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
            raise StoreError("%s was replaced while it was opened; trying again later"
                             % self.path)
        if not existed or not st.st_size:
            return
        try:
            lock(fd, SHARED, timeout_s=self.lock_timeout_s)
        except LockBusy:
            return
        try:
            check_length(self.path, fd)

            def ends(env: lmdb.Environment) -> None:
                with env.begin() as txn:
                    cursor = txn.cursor()
                    cursor.first()
                    cursor.last()
            _retrying(env, ends)
        except lmdb.Error as exc:
            raise StoreError(describe(self.path, exc)) from None
        finally:
            unlock(fd)

    def verify(self) -> tuple[str | None, int]:
        """greylistctl check: open, then every entry read and a trial
        commit in a child process (writecheck.py); (None, entries) or
        (the problem, 0)."""
        with self._mutex:
            try:
                env = self._open()
            except StoreError as exc:
                return str(exc), 0
            from greylist.stores.writecheck import trial
            return trial(self.path, env, self.fd, self.lock_timeout_s or 2.0,
                         read_all=True)

    def _same_file(self) -> bool:
        """Whether the open file is still the one at self.path."""
        # One stat(2) per call, compared with the identity taken at open: a
        # deleted file fails it, a replaced one has another inode.
        try:
            now = os.stat(self.path)
        except OSError:
            return False
        return (now.st_ino, now.st_dev) == self._file_id

    def _shrunk(self) -> bool:
        """Under a lock: whether the file is shorter than it was (then it
        is to be opened again, which checks it: check_length())."""
        size = os.fstat(self.fd).st_size
        if size < self._size:
            self._shrank = True
            return True
        self._size = size
        return False

    def _close(self) -> None:
        if self._env is not None:
            self._env.close()
            os.close(self.fd)
            self._env, self.fd = None, -1

    def _fail(self, exc: Exception) -> StoreError:
        """Close after an error (no lock is held then) and describe it:
        as damage, with its recovery, when the file no longer begins as an
        LMDB file (garbage written over it makes LMDB fail in odd ways,
        "mdb_env_set_mapsize: Cannot allocate memory" among them)."""
        message = describe(self.path, exc)
        if self._env is not None and isinstance(exc, lmdb.Error):
            try:
                check_format(self.path, self.fd)
            except StoreError as damage:
                message = str(damage)
        self._close()
        self._failed_at, self._failure = time.monotonic(), message
        return StoreError(message)


def _retrying(env: lmdb.Environment, body: Callable[[lmdb.Environment], T]) -> T:
    """body(env), again with the map doubled after MapFull or adopted
    after MapResized (another process grew the file)."""
    for _ in range(RETRY_LIMIT):
        try:
            return body(env)
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)
        except lmdb.MapResizedError:
            env.set_mapsize(0)
    raise lmdb.Error("map size retry limit reached")
