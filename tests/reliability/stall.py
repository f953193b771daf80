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

from tests.reliability.faults import _Env, _Txn

STALL_LIMIT_S = 60.0


class _StallingTxn(_Txn):
    """Its fault is the flag file's path."""

    def commit(self):
        began = time.monotonic()
        while os.path.exists(self._fault) and time.monotonic() - began < STALL_LIMIT_S:
            time.sleep(0.02)
        return self._txn.commit()


class _StallingEnv(_Env):
    txn_class = _StallingTxn


def main() -> int:
    flag = os.environ["GREYLIST_TEST_STALL"]
    real_open = lmdb.open
    lmdb.open = lambda *a, **k: _StallingEnv(real_open(*a, **k), flag)
    from greylist.cli.greylistd import main as greylistd_main
    sys.argv[0] = "greylistd"
    return greylistd_main()


if __name__ == "__main__":
    sys.exit(main())
