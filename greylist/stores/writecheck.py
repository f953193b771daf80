"""Whether LMDB can still write a table: one trial commit in a child process.

DESCRIPTION
    A writer that takes no lock (postmap -i while greylist writes: in
    Postfix 3.7 it takes none) can leave a file that LMDB reads without
    complaint but can never write again: a commit fails an internal
    assertion (in mdb_freelist_save() or mdb_page_dirty()) and the
    process ends with SIGABRT, before any log line. Postfix's own
    postmap, with Debian's liblmdb 0.9.24, fails on such a file too
    ("internal error: mdb.c:3155: Assertion 'pglast <= env->me_pglast'
    failed in mdb_freelist_save()"), so building py-lmdb against the
    system library changes nothing.

    trial() forks; the child takes the exclusive lock on the lock
    descriptor it inherits (fcntl locks are not inherited: it waits for
    the parent's like any other process), reads every entry if asked
    (greylistctl check: damage can make a read abort too), runs one write
    transaction on
    the environment it inherits (a key put and deleted again, so the
    file's contents stay the same) and exits, so that an abort ends only
    the child; a child that died of a signal is described with the
    recovery. Nothing is executed: the child needs no interpreter that
    the (unprivileged) user may run. The caller holds no lock and runs
    no transaction on the environment meanwhile (lmdbenv.py calls it
    under its mutex, at open). greylistd makes the trial whenever it
    opens a file, and greylistctl check on demand; each policy process
    under spawn(8) does not (a fork and a durable commit at every start),
    and dies at its first write instead, which default_action=DUNNO
    answers (greylist(8), RECOVERY).
"""

import os
import signal
import time

import lmdb

from greylist.stores.lmdbfile import MOVE_ASIDE, describe

# Longest a trial may take: a lock wait (the caller's) and a durable
# commit; with every entry read first (greylistctl check), longer.
TRIAL_S = 10.0
CHECK_S = 600.0
_KEY = b"greylist-write-check\0"
# Bytes of the child's message (less than a pipe's buffer: no wait).
MAX_MESSAGE = 1000


def trial(path: str, env: lmdb.Environment, fd: int, lock_timeout_s: float,
          read_all: bool = False) -> tuple[str | None, int]:
    """(None, entries) if a write transaction on env commits, else (why
    not, 0). With read_all, the child first reads every entry (counted):
    damage can make a read abort too (greylistctl check)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(path, env, fd, lock_timeout_s, read_all, write_end)
    os.close(write_end)
    try:
        return _outcome(path, pid, lock_timeout_s,
                        lock_timeout_s + (CHECK_S if read_all else TRIAL_S), read_end)
    finally:
        os.close(read_end)


def _outcome(path: str, pid: int, lock_timeout_s: float, limit_s: float,
             read_end: int) -> tuple[str | None, int]:
    deadline = time.monotonic() + limit_s
    pause = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "%s: a trial write did not finish within %d s" % (path, limit_s), 0
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    # What the child told: the entry count, or LMDB's error described.
    told = os.read(read_end, MAX_MESSAGE).decode("utf-8", "replace").strip()
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return None, int(told) if told.isdigit() else 0
    if os.WIFSIGNALED(status):
        return ("%s is damaged: LMDB aborts on it (%s; a writer without a lock, such as "
                "postmap -i while greylist ran, changed it); %s"
                % (path, signal.Signals(os.WTERMSIG(status)).name, MOVE_ASIDE)), 0
    if os.WEXITSTATUS(status) == 2:
        return "%s: locked by another process for more than %.1f s; no trial write" % (
            path, lock_timeout_s), 0
    return told or "%s: a trial write failed" % path, 0


def _child(path: str, env: lmdb.Environment, fd: int, lock_timeout_s: float,
           read_all: bool, tell: int) -> None:
    """The child: exit 0 after a commit (the entry count told on the pipe
    tell), 2 if the lock did not come, 1 for an error, described on tell.
    Never returns; nothing of the parent's runs here."""
    code = 1
    try:
        # LMDB's assertion text must not reach a client's socket.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        from greylist.stores.lock import EXCLUSIVE, LockBusy, lock
        try:
            lock(fd, EXCLUSIVE, timeout_s=lock_timeout_s)
        except LockBusy:
            os._exit(2)
        entries = 0
        if read_all:
            with env.begin() as txn:
                for _ in txn.cursor().iternext(keys=True, values=True):
                    entries += 1
        with env.begin(write=True) as txn:
            txn.put(_KEY, b"\0")
            txn.delete(_KEY)
        _tell(tell, str(entries))
        code = 0
    except lmdb.Error as exc:
        _tell(tell, describe(path, exc))
    except BaseException:
        pass
    os._exit(code)


def _tell(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode("utf-8", "replace")[:MAX_MESSAGE])
    except OSError:
        pass
