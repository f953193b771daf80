"""Whether LMDB can still write a table: one trial commit in a child process.

DESCRIPTION
    A writer that takes no lock (postmap -i while greylist writes: in
    Postfix 3.7 it takes none) can leave a file that LMDB reads without
    complaint but can never write again: every commit fails an assertion
    in mdb_freelist_save() and the process ends with SIGABRT, before any
    log line. Postfix's own postmap, with Debian's liblmdb 0.9.24, dies
    the same way on such a file ("internal error: mdb.c:3155: Assertion
    'pglast <= env->me_pglast' failed in mdb_freelist_save()"), so
    building py-lmdb against the system library changes nothing.

    check() runs one write transaction in a child process (python -m
    greylist.stores.writecheck NAME: a key put and deleted again, under
    the exclusive lock, so the file's contents stay the same), where the
    abort ends only the child, and describes a child that died with the
    recovery. greylistd runs it whenever it opens the database, and
    greylistctl check on demand; each policy process under spawn(8) does
    not (it would cost a process start each), and dies at its first
    write instead, which default_action=DUNNO answers (greylist(8),
    RECOVERY).

DIAGNOSTICS
    The child exits 0 when the commit succeeded, 1 with a message on
    stderr when the table cannot be used for another reason.
"""

import os
import signal
import subprocess
import sys

from greylist.stores.lmdbfile import MOVE_ASIDE

# Longest a check may take: a lock wait (greylist_lock_timeout) and a
# durable commit, with a process start.
CHECK_TIMEOUT_S = 30.0
# Bytes of the child's stderr kept for the message.
MAX_STDERR = 500
_KEY = b"greylist-write-check\0"


def check(name: str, lock_timeout_s: float = 2.0,
          timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """None if a write transaction on lmdb:name commits, else why not."""
    path = name + ".lmdb"
    try:
        done = subprocess.run([sys.executable, "-m", "greylist.stores.writecheck", name,
                               repr(lock_timeout_s)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout_s, env=_environment())
    except subprocess.TimeoutExpired:
        return "%s: a trial write did not finish within %d s" % (path, timeout_s)
    except OSError as exc:
        return "%s: cannot run a trial write: %s" % (path, exc.strerror)
    if done.returncode == 0:
        return None
    if done.returncode == -signal.SIGABRT:
        return ("%s is damaged: LMDB aborts every write to it (a writer without a lock, "
                "such as postmap -i while greylist ran, changed it); %s"
                % (path, MOVE_ASIDE))
    reason = done.stderr[-MAX_STDERR:].decode("utf-8", "replace").strip()
    return reason or "%s: a trial write ended with status %d" % (path, done.returncode)


def _environment() -> dict[str, str]:
    """The child imports this very greylist, wherever it was found."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def main(argv: list[str]) -> int:
    """The child: one write transaction on lmdb:argv[0]."""
    from greylist.stores.base import StoreError
    from greylist.stores.lmdbenv import Environment
    from greylist.stores.lock import EXCLUSIVE
    if not os.path.exists(argv[0] + ".lmdb"):
        sys.stderr.write("%s.lmdb: no such database\n" % argv[0])
        return 1
    env = Environment(argv[0], lock_timeout_s=float(argv[1]))

    def body(lmdb_env) -> None:
        with lmdb_env.begin(write=True) as txn:
            txn.put(_KEY, b"\0")
            txn.delete(_KEY)
    try:
        env.run(EXCLUSIVE, body)
    except StoreError as exc:
        sys.stderr.write("%s\n" % exc)
        return 1
    finally:
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
