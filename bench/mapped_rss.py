"""How much of a mapped LMDB file a few lookups bring into a process's RSS.

Usage:
  python bench/mapped_rss.py [--size 1M] [--lookups 2000,8000] [--ours-path DIR]

DESCRIPTION
    Builds a database of SIZE triples with greylist's own API (scale.py:
    build(), in a temporary directory, deleted afterwards), then, for
    each LOOKUPS count and with LMDB's readahead on and off (off is
    MDB_NORDAHEAD: madvise(MADV_RANDOM) on the map), starts a fresh
    Python process that opens the file read-only as greylist does,
    gets LOOKUPS random passed triples (each key with its trailing NUL,
    one read transaction) and prints RssFile and RssAnon of
    /proc/self/status before and after. Last, one byte read through
    mmap(2) at a page of the file: the kernel's fault-around, the file
    pages mapped by one fault. The file is in the page cache throughout
    (it was just written), as a live greylistd's database is.

    greylistd's VmRSS in bench/daemon_rss.py is RssAnon plus this
    RssFile; only RssAnon is memory of greylistd's own.
"""

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile

import scale

CHILD = r"""
import lmdb, mmap, os, random, sys
def rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                out[name] = int(value.split()[0])
    return out
path, readahead, n, seed = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3]), int(sys.argv[4])
keys = [bytes.fromhex(line) for line in open(path + ".keys")]
random.Random(seed).shuffle(keys)
keys = keys[:n]
extra = {"lib_version": 0} if int(lmdb.__version__.split(".")[0]) >= 3 else {}
env = lmdb.open(path, subdir=False, lock=False, readonly=True, readahead=readahead,
                max_dbs=0, **extra)
before = rss()
with env.begin() as txn:
    hits = sum(txn.get(k + b"\0") is not None for k in keys)
after = rss()
fd = os.open(path, os.O_RDONLY)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
one = rss()["RssFile"]
m[len(m) // 2]
one = rss()["RssFile"] - one
print(hits, before["RssFile"], after["RssFile"], after["RssAnon"], one)
"""


def measure(python: str, path: str, readahead: str, n: int, seed: int) -> dict:
    proc = subprocess.run([python, "-c", CHILD, path, readahead, str(n), str(seed)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit("mapped_rss: the lookup process failed: %s" % proc.stderr.strip())
    hits, before, after, anon, one = (int(x) for x in proc.stdout.split())
    return {"readahead": readahead, "lookups": n, "hits": hits, "rss_file_before_kb": before,
            "rss_file_after_kb": after, "rss_anon_kb": anon, "one_fault_kb": one}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=scale.parse_sizes, default=[1000000])
    p.add_argument("--lookups", default="2000,8000")
    p.add_argument("--ours-path", default=os.path.join(os.path.dirname(__file__), ".."))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    size = max(args.size)
    workdir = tempfile.mkdtemp(prefix="mapped-rss-")
    try:
        api = scale._Api(os.path.abspath(args.ours_path))
        name = os.path.join(workdir, "greylist")
        facts = scale.build(api, name, size, args.seed, None)
        path = name + ".lmdb"
        with open(path + ".keys", "w") as f:
            for triple in facts["fresh"]:
                f.write(api.key(*triple).hex() + "\n")
        print("mapped RSS: %d triples, %.1f MB file, %d passed triples to look up"
              % (facts["entries"], facts["file_bytes"] / 1e6, len(facts["fresh"])))
        for n in (int(x) for x in args.lookups.split(",")):
            for readahead in ("on", "off"):
                r = measure(args.python, path, readahead, n, random.Random(n).getrandbits(32))
                print("  readahead %-3s %6d lookups (%d found): RssFile %.1f -> %.1f MB, "
                      "RssAnon %.1f MB; one page read through mmap: +%d kB"
                      % (readahead, n, r["hits"], r["rss_file_before_kb"] / 1024,
                         r["rss_file_after_kb"] / 1024, r["rss_anon_kb"] / 1024,
                         r["one_fault_kb"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
