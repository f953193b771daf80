"""Whole-file fcntl locks, the Postfix external locking protocol.

DESCRIPTION
    lock() takes a POSIX record lock over the whole file (fcntl F_SETLK or
    F_SETLKW with l_whence=SEEK_SET, l_start=0, l_len=0), as Postfix's
    myflock() does for lmdb tables (lmdb_table(5) SYNCHRONIZATION).
    fcntl.lockf is Python's interface to exactly these calls; flock(2)
    locks would not exclude Postfix on Linux.

BUGS
    POSIX locks belong to the process: they do not exclude threads of the
    same process, and closing ANY descriptor of the file drops them all.
    The store keeps one lock descriptor open and adds a mutex.
"""

import _thread
import errno
import fcntl
import signal
import time
from contextlib import contextmanager
from typing import Iterator

SHARED = fcntl.LOCK_SH
EXCLUSIVE = fcntl.LOCK_EX


class LockBusy(Exception):
    """A non-blocking lock request found the file locked by another process."""


# Imported by the main thread: only it can wait with an alarm.
_MAIN_THREAD = _thread.get_ident()
# How often a bounded wait tries again: from 0.5 ms, doubling to 10 ms.
_FIRST_TRY_S = 0.0005
_LAST_TRY_S = 0.010


def lock(fd: int, mode: int, wait: bool = True, timeout_s: float | None = None) -> None:
    """Lock the whole file for SHARED or EXCLUSIVE access.

    With wait=False, raises LockBusy instead of waiting. With timeout_s,
    waits at most that long, then raises LockBusy: in the main thread in
    F_SETLKW, interrupted by SIGALRM (no fcntl call has a timeout; the
    process must not use SIGALRM or ITIMER_REAL otherwise), in other
    threads by non-blocking tries, 0.5 to 10 ms apart. EINTR from other
    signals is retried by Python (PEP 475).
    """
    if timeout_s is not None:
        _lock_within(fd, mode, timeout_s)
        return
    if wait:
        fcntl.lockf(fd, mode)
    elif not _try(fd, mode):
        raise LockBusy()


def _try(fd: int, mode: int) -> bool:
    """Take the lock if nobody is in the way; whether it was taken."""
    try:
        fcntl.lockf(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False


def _lock_within(fd: int, mode: int, timeout_s: float) -> None:
    if _try(fd, mode):
        return
    if timeout_s <= 0:
        raise LockBusy()  # (An ITIMER_REAL of 0 would never ring.)
    if _thread.get_ident() == _MAIN_THREAD:
        _wait_with_alarm(fd, mode, timeout_s)
    else:
        _poll(fd, mode, timeout_s)


class _Expired(Exception):
    pass


def _expired(signum, frame) -> None:
    raise _Expired()


def _wait_with_alarm(fd: int, mode: int, timeout_s: float) -> None:
    """Wait in the kernel's queue (F_SETLKW), interrupted by SIGALRM after
    timeout_s: a poller would starve behind writers that lock again at
    once, which the kernel's queue does not."""
    previous = signal.signal(signal.SIGALRM, _expired)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            fcntl.lockf(fd, mode)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Expired:
        # The alarm may have come just after the lock was granted: release
        # it (this process holds no other lock on the file then).
        fcntl.lockf(fd, fcntl.LOCK_UN)
        raise LockBusy() from None
    finally:
        signal.signal(signal.SIGALRM, previous)


def _poll(fd: int, mode: int, timeout_s: float) -> None:
    """Threads other than the main one cannot take signals: non-blocking
    tries, 0.5 to 10 ms apart."""
    deadline = None
    pause = _FIRST_TRY_S
    while not _try(fd, mode):
        now = time.monotonic()
        if deadline is None:
            deadline = now + timeout_s  # Only once the first try failed.
        if now >= deadline:
            raise LockBusy()
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, _LAST_TRY_S)


def unlock(fd: int) -> None:
    """Release this process's lock on the whole file."""
    fcntl.lockf(fd, fcntl.LOCK_UN)


@contextmanager
def locked(fd: int, mode: int, wait: bool = True) -> Iterator[None]:
    """Hold a whole-file lock for the duration of a with block."""
    lock(fd, mode, wait)
    try:
        yield
    finally:
        unlock(fd)
