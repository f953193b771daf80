"""Run the real greylist program with an injected LMDB commit failure.

Usage: python -m tests.reliability.faults ERRNO SKIP FAIL REOPEN_S -- [greylist args]

The first SKIP write transactions commit normally, the next FAIL raise
lmdb.Error with os.strerror(ERRNO) as LMDB would ("mdb_txn_commit: No
space left on device"), and the rest commit normally again. The store's
reopen delay becomes REOPEN_S seconds so that recovery shows within a
test. Everything else is the real program (greylist.cli.main).
"""

import errno
import os
import sys

import lmdb


class _Txn:
    def __init__(self, txn, fault):
        self._txn, self._fault = txn, fault

    def commit(self):
        self._fault.commits += 1
        n = self._fault.commits
        if self._fault.skip < n <= self._fault.skip + self._fault.fail:
            self._txn.abort()
            raise lmdb.Error("mdb_txn_commit: %s" % os.strerror(self._fault.errno))
        return self._txn.commit()

    def __enter__(self):
        self._txn.__enter__()
        return self

    def __exit__(self, *exc):
        return self._txn.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._txn, name)


class _Env:
    """An environment whose write transactions are txn_class's (stall.py
    has one of its own)."""

    txn_class = _Txn

    def __init__(self, env, fault):
        self._env, self._fault = env, fault

    def begin(self, *args, **kwargs):
        txn = self._env.begin(*args, **kwargs)
        return self.txn_class(txn, self._fault) if kwargs.get("write") else txn

    def __getattr__(self, name):
        return getattr(self._env, name)


class Fault:
    def __init__(self, number: int, skip: int, fail: int) -> None:
        self.errno, self.skip, self.fail, self.commits = number, skip, fail, 0


def main() -> int:
    name, skip, fail, reopen_s, sep, *rest = sys.argv[1:]
    assert sep == "--"
    fault = Fault(getattr(errno, name), int(skip), int(fail))
    real_open = lmdb.open
    lmdb.open = lambda *a, **k: _Env(real_open(*a, **k), fault)
    from greylist.cli.greylist import main as greylist_main
    from greylist.wiring import Tuning
    sys.argv[0] = "greylist"
    return greylist_main(rest, tuning=Tuning(reopen_delay_s=float(reopen_s)))


if __name__ == "__main__":
    sys.exit(main())
