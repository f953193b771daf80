"""The storage floor: what one durable commit costs on this disk.

Usage: python bench/storage.py [--commits N] [--prefill N] [--dir DIR]
                               [--ours-path DIR]

A new triple must be committed durably before its reply (issue 5), so
the time of one durable commit bounds the rate of new triples that one
process can answer, whatever the code around it does. This measures, in
DIR (default: a temporary directory, which should sit on the disk the
benchmark uses):

  commit     greylist's Store.put() of a new random key into a table
             of PREFILL keys (default 20000, the size the comparison
             runs reach; a B-tree of depth 3): a write transaction under
             the exclusive lock, committed by LMDB 0.9, which writes the
             changed pages, fdatasync()s, writes the meta page and syncs
             again (two flushes: the meta page must not reach the disk
             before the pages it points to);
  fdatasync  one 4 KiB pwrite() and fdatasync() in a preallocated file:
             a single flush, the least any durable write costs here.

Prints p50 and p99 in microseconds and the rate that one commit per
request allows; run.py includes it in its report.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from greylist.stores.lmdb import LmdbStore
directory, n = sys.argv[2], int(sys.argv[3])
import random
rng = random.Random(5)
def key():
    return ("198.18.%d/%08x@example.org/%08x@example.net" % (
        rng.randrange(256), rng.getrandbits(32), rng.getrandbits(32))).encode()
value = b"1:1700000000:1700000000:1:pending"
store = LmdbStore(os.path.join(directory, "floor"))
prefill = sorted((key(), value) for _ in range(int(sys.argv[4])))
for start in range(0, len(prefill), 1000):
    store.put_many(prefill[start:start + 1000])
commits = []
for i in range(n):
    k = key()
    t0 = time.perf_counter_ns()
    store.put(k, value)
    commits.append(time.perf_counter_ns() - t0)
store.close()
path = os.path.join(directory, "flush")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.posix_fallocate(fd, 0, 4096 * 64)
os.fsync(fd)
block = b"x" * 4096
flushes = []
for i in range(n):
    t0 = time.perf_counter_ns()
    os.pwrite(fd, block, 4096 * (i % 64))
    os.fdatasync(fd)
    flushes.append(time.perf_counter_ns() - t0)
os.close(fd)
print(json.dumps({"commit": commits, "fdatasync": flushes}))
"""


def _pct(values: list, p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] / 1000


def measure(python: str, ours_path: str, directory: str, commits: int = 500,
            prefill: int = 20000) -> dict:
    """Return p50/p99 (us) of durable commits and of single flushes in directory."""
    work = tempfile.mkdtemp(prefix="storage-", dir=directory)
    try:
        done = subprocess.run([python, "-c", _CHILD, ours_path, work, str(commits), str(prefill)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return {"available": False, "reason": done.stderr.strip()[-300:]}
        raw = json.loads(done.stdout)
    except (subprocess.TimeoutExpired, ValueError) as exc:
        return {"available": False, "reason": str(exc)}
    finally:
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)
    out = {"commits": commits, "prefill": prefill}
    for what in ("commit", "fdatasync"):
        out[what + "_p50_us"] = round(_pct(raw[what], 50), 1)
        out[what + "_p99_us"] = round(_pct(raw[what], 99), 1)
    out["commit_ceiling_per_s"] = round(1e6 / out["commit_p50_us"])
    return out


def describe(floor: dict) -> str:
    if not floor.get("available", True):
        return "storage floor: not available: %s\n" % floor.get("reason")
    return ("storage floor (%d each): durable commit into %d keys p50 %.0f us, p99 %.0f us;"
            " one fdatasync p50 %.0f us, p99 %.0f us.\n  One durable commit per request "
            "allows at most %d requests/s per process.\n"
            % (floor["commits"], floor["prefill"], floor["commit_p50_us"], floor["commit_p99_us"],
               floor["fdatasync_p50_us"], floor["fdatasync_p99_us"],
               floor["commit_ceiling_per_s"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commits", type=int, default=500)
    p.add_argument("--prefill", type=int, default=20000)
    p.add_argument("--dir", default=None)
    p.add_argument("--ours-path", default=os.path.dirname(HERE))
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args()
    directory = args.dir or tempfile.gettempdir()
    sys.stdout.write(describe(measure(args.python, os.path.abspath(args.ours_path),
                                      directory, args.commits, args.prefill)))


if __name__ == "__main__":
    main()
