"""Run the real greylistd with LMDB commits that stall on demand.

Usage: python -m tests.reliability.stall -c SETTINGS

While the file named by GREYLIST_TEST_STALL exists, every LMDB write
transaction's commit waits (at most 60 s), as one does on a disk that
stalls in fsync (fsfreeze, a dying disk, a hung NFS server): every one of
the store's own waits is bounded, the commit itself is not. Everything
else is the real program (greylist.cli.greylistd.main).
"""

import os
import sys
import time

import lmdb

STALL_LIMIT_S = 60.0


class _Txn:
    def __init__(self, txn, flag: str) -> None:
        self._txn, self._flag = txn, flag

    def commit(self):
        began = time.monotonic()
        while os.path.exists(self._flag) and time.monotonic() - began < STALL_LIMIT_S:
            time.sleep(0.02)
        return self._txn.commit()

    def __enter__(self):
        self._txn.__enter__()
        return self

    def __exit__(self, *exc):
        return self._txn.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._txn, name)


class _Env:
    def __init__(self, env, flag: str) -> None:
        self._env, self._flag = env, flag

    def begin(self, *args, **kwargs):
        txn = self._env.begin(*args, **kwargs)
        return _Txn(txn, self._flag) if kwargs.get("write") else txn

    def __getattr__(self, name):
        return getattr(self._env, name)


def main() -> int:
    flag = os.environ["GREYLIST_TEST_STALL"]
    real_open = lmdb.open
    lmdb.open = lambda *a, **k: _Env(real_open(*a, **k), flag)
    from greylist.cli.greylistd import main as greylistd_main
    sys.argv[0] = "greylistd"
    return greylistd_main()


if __name__ == "__main__":
    sys.exit(main())
