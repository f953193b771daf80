"""Where a full cleanup's write transactions spend their time.

Usage: python bench/cleanup_locks.py [--size N] [--batch N] [--no-reader]
                                     [--tmpdir DIR]

Builds a database of N triples (default 10M) as the scale runs do
(scale.py: 40% of them expired), then runs one full cleanup pass in this
process, as greylistctl does (walks of MANUAL_BATCH records), while a
second process reads random keys with LmdbStore.get_many in a loop under the
shared lock, as a policy process would. Every store call of the cleanup
is timed: for write transactions the wait for the exclusive lock, the
whole call, and the CPU it used. A long write transaction with little
CPU is waiting for the disk (fdatasync inside the commit); a long lock
wait would mean readers starve the writer. The reader reports its own
longest call. --batch sets the deletes per write transaction
(cleanup.DELETE_BATCH).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import scale  # noqa: E402

READER = r"""
import os, random, sys, time
sys.path.insert(0, sys.argv[1])
from greylist.stores.lmdb import LmdbStore
store, stop = LmdbStore(sys.argv[2]), sys.argv[3]
keys = [k for k, _ in store.scan(None, 20000)]
rng, calls = random.Random(3), []
while not os.path.exists(stop) and len(calls) < 5000000:
    key = rng.choice(keys)
    t0 = time.perf_counter_ns()
    store.get_many([key, key, None])
    calls.append(time.perf_counter_ns() - t0)
    time.sleep(0.00005)
calls.sort()
print("reader: %d calls, p99 %.2f ms, max %.2f ms, %d over 10 ms" % (
    len(calls), calls[int(len(calls) * 0.99)] / 1e6, calls[-1] / 1e6,
    sum(1 for c in calls if c > 10e6)), flush=True)
"""


def _summary(label: str, values: list) -> str:
    ordered = sorted(values)
    n = len(ordered)
    return ("%s: %d, p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms, max %.2f ms, %d over 10 ms"
            % (label, n, ordered[n // 2] / 1e6, ordered[int(n * 0.99)] / 1e6,
               ordered[int(n * 0.999)] / 1e6, ordered[-1] / 1e6,
               sum(1 for v in values if v > 10e6)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=scale.parse_sizes, default=[10000000])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--no-reader", action="store_true")
    p.add_argument("--tmpdir", default=None)
    args = p.parse_args()
    from greylist import config, log
    from greylist.stores import cleanup, lmdbenv
    from greylist.stores.lmdb import LmdbStore
    from greylist.stores.lock import EXCLUSIVE
    size = max(args.size)
    delete_batch = args.batch or cleanup.DELETE_BATCH
    top = tempfile.mkdtemp(prefix="cleanup-locks-", dir=args.tmpdir)
    os.chmod(top, 0o755)
    name = os.path.join(top, "greylist")
    try:
        t0 = time.monotonic()
        facts = scale.build(scale._Api(ROOT), name, size, 1, None)
        os.sync()
        print("built %d triples, %.0f MB, in %.0f s" % (
            facts["entries"], facts["file_bytes"] / 2 ** 20, time.monotonic() - t0), flush=True)
        stop = os.path.join(top, "stop")
        reader = None if args.no_reader else subprocess.Popen(
            [sys.executable, "-c", READER, ROOT, name, stop])
        time.sleep(2)
        waits, writes, cpu, reads = [], [], [], []
        take, run = lmdbenv.lock, lmdbenv.Environment.run

        def timed_lock(fd, mode, wait=True):
            began = time.perf_counter_ns()
            take(fd, mode, wait)
            if mode == EXCLUSIVE:
                waits.append(time.perf_counter_ns() - began)

        def timed_run(self, mode, body):
            began, used = time.perf_counter_ns(), time.process_time_ns()
            try:
                return run(self, mode, body)
            finally:
                if mode == EXCLUSIVE:
                    writes.append(time.perf_counter_ns() - began)
                    cpu.append(time.process_time_ns() - used)
                else:
                    reads.append(time.perf_counter_ns() - began)

        # Time every lock and transaction of the environment (the bench's
        # own instrumentation, not a tunable).
        lmdbenv.lock, lmdbenv.Environment.run = timed_lock, timed_run
        cfg = config.resolve(config.Config(database=name, log=os.path.join(top, "log")))
        store = LmdbStore(name)
        cleaner = cleanup.Cleaner(store, None, cfg, log.Log("greylist", cfg.log),
                                  batch=cleanup.MANUAL_BATCH, delete_batch=delete_batch)
        t0 = time.monotonic()
        state = cleaner.step(budget_s=1e9, start=True)
        print("cleanup: %.1f s, retained %d, dropped %d, %d deletes per write transaction"
              % (time.monotonic() - t0, state.retained, state.dropped, delete_batch))
        store.close()
        print(_summary("write transactions", writes))
        long = [(round(w / 1e6, 1), round(c / 1e6, 1)) for w, c in zip(writes, cpu) if w > 10e6]
        print("  over 10 ms (duration ms, CPU ms): %s" % (long[:20] or "none"))
        print(_summary("exclusive lock waits", waits))
        print(_summary("read transactions (walks)", reads))
        if reader is not None:
            open(stop, "w").close()
            reader.wait(60)
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
