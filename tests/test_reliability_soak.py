"""Concurrency soak: 16 policy processes, postmap readers and cleanup together.

Sixteen greylist processes answer requests for a shared pool of triples
(a hot set makes them race for the same keys) with a 2 s delay, so that
triples are new, retried early, passed and known during the run, while
postmap -s and postmap -q read the database and, where greylistctl
exists, its cleanup runs. The run is bounded in time. Then:

- zero errors: every reply is well-formed, no process logs a warning,
  every process exits 0 with nothing on stderr, every postmap run is clean;
- zero corrupt values: every value postmap ever printed parses;
- zero lost updates: each triple is "new" exactly once in all logs, its
  first-seen time never changes in any listing, and its stored count is
  the number of decisions that wrote it;
- no lock is held across requests: while the processes sit idle between
  requests, /proc/locks shows none of theirs and we can lock the file.
"""

import collections
import fcntl
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import threading
import time

from greylist.core import record as records
from tests.reliability import (BAD_LOG, ROOT, SEED, SIZES, Client, command, decisions,
                               environment, home, postmap_list, read_log, record_figures,
                               run, settings, triple, triple_request, warnings)

DELAY_S = 2
WRITE_REASONS = ("new", "early-retry", "delay-passed")
TOKEN = re.compile(r"rcpt-(\d{6})@")


def greylistctl() -> str | None:
    """The cleanup command of issue 4, if it exists yet."""
    for local in (pathlib.Path(sys.executable).parent / "greylistctl",
                  ROOT / ".venv" / "bin" / "greylistctl"):
        if local.exists():
            return str(local)
    return shutil.which("greylistctl")


def locks_of(pids: set[int], inode: int) -> list[str]:
    """Lines of /proc/locks that are locks of pids on the file inode."""
    held = []
    with open("/proc/locks", encoding="ascii") as handle:
        for line in handle:
            fields = line.split()
            # "1: POSIX  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (a "->" marks waiters)
            if "->" in fields:
                fields.remove("->")
            if len(fields) >= 6 and fields[5].rsplit(":", 1)[-1] == str(inode) \
                    and int(fields[4]) in pids:
                held.append(line.strip())
    return held


def test_soak_sixteen_processes_readers_and_cleanup(tmp_path, postmap):
    directory = home(tmp_path / "soak")
    cf = settings(directory, delay="%ds" % DELAY_S)
    name = str(directory / "db")
    duration, processes = SIZES["soak_seconds"], SIZES["soak_processes"]
    pool = list(range(150 * duration))
    hot = pool[:20]
    cleanup = greylistctl()
    deadline = time.monotonic() + duration
    failures: list[str] = []
    first_seen: dict[str, set[int]] = collections.defaultdict(set)
    counters = collections.Counter()
    seen_lock = threading.Lock()

    def policy_process(client: Client, rng: random.Random) -> None:
        while time.monotonic() < deadline:
            n = rng.choice(hot) if rng.random() < 0.3 else rng.choice(pool)
            action = client.ask(triple_request(n))
            if action is None or action.split()[0] not in ("DUNNO", "DEFER_IF_PERMIT"):
                failures.append("process %d: reply %r" % (client.pid, action))
                return
            counters["replies"] += 1

    def note(key: str, value: str) -> None:
        if records.decode(value.encode()) is None:
            failures.append("corrupt value %r for %r" % (value, key))
        elif TOKEN.search(key):
            with seen_lock:
                first_seen[key].add(int(value.split(":")[1]))

    def lister() -> None:
        keys: list[str] = []
        rng = random.Random(SEED + 1)
        while time.monotonic() < deadline:
            try:
                pairs = postmap_list(postmap, name)
            except AssertionError as exc:
                failures.append("postmap -s: %s" % exc)
                return
            counters["postmap -s"] += 1
            for key, value in pairs:
                note(key, value)
            keys = [k for k, _ in pairs] or keys
            for key in rng.sample(keys, min(10, len(keys))):
                done = subprocess.run([postmap, "-q", key, "lmdb:" + name],
                                      capture_output=True, text=True, timeout=30)
                counters["postmap -q"] += 1
                # Without cleanup nothing is deleted: every listed key is found.
                if done.stderr or done.returncode not in ((0, 1) if cleanup else (0,)):
                    failures.append("postmap -q %s: %d %r" % (key, done.returncode,
                                                                done.stderr))
                elif done.returncode == 0:
                    note(key, done.stdout.rstrip("\n"))

    def cleaner() -> None:
        while time.monotonic() < deadline:
            done = subprocess.run([cleanup, "-c", str(cf), "cleanup"], capture_output=True,
                                  timeout=60, env=environment())
            counters["cleanup runs"] += 1
            # 75 (EX_TEMPFAIL): a policy process holds the shared pass.
            counters["cleanup busy"] += done.returncode == 75
            if done.returncode not in (0, 75) or done.stderr:
                failures.append("greylistctl cleanup: %d %r" % (done.returncode,
                                                                 done.stderr[-300:]))
                return
            time.sleep(0.5)

    # A process with no requests creates the database, so postmap finds it.
    assert run(command(cf), b"").returncode == 0
    clients = [Client(command(cf)) for _ in range(processes)]
    try:
        threads = [threading.Thread(target=policy_process,
                                    args=(c, random.Random(SEED + i)))
                   for i, c in enumerate(clients)]
        threads.append(threading.Thread(target=lister))
        if cleanup:
            threads.append(threading.Thread(target=cleaner))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=duration + 120)
        elapsed = time.monotonic() - started
        assert not failures, failures[:10]
        # All processes are alive and idle between requests: no locks held.
        pids = {c.pid for c in clients}
        inode = os.stat(name + ".lmdb").st_ino
        assert all(c.proc.poll() is None for c in clients)
        assert locks_of(pids, inode) == []
        fd = os.open(name + ".lmdb", os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anyone holds one
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        results = [c.close() for c in clients]
    assert results == [(0, b"")] * processes
    for key, value in postmap_list(postmap, name):
        note(key, value)
    final = {TOKEN.search(k).group(1): (k, v) for k, v in postmap_list(postmap, name)
             if TOKEN.search(k)}
    assert not failures, failures[:10]

    log = read_log(directory / "log")
    assert not [b for b in BAD_LOG if b in log] and warnings(log) == []
    by_triple = collections.defaultdict(list)
    for _, _, reason, _, client, sender, rcpt in decisions(log):
        by_triple[(client, sender, rcpt)].append(reason)
    assert sum(map(len, by_triple.values())) == counters["replies"]
    problems = []
    for n in pool:
        reasons = by_triple.get(triple(n))
        if not reasons:
            continue
        token = "%06d" % n
        if reasons.count("new") != 1:
            problems.append("triple %d is new %d times" % (n, reasons.count("new")))
        if token not in final:
            problems.append("triple %d has no record" % n)
            continue
        key, value = final[token]
        fields = value.split(":")
        writes = sum(reasons.count(r) for r in WRITE_REASONS)
        if len(first_seen[key]) != 1:
            problems.append("triple %d: first-seen changed: %r" % (n, first_seen[key]))
        if int(fields[3]) != writes:
            problems.append("triple %d: count %s but %d writes (lost update)"
                            % (n, fields[3], writes))
        if (fields[4] == "passed") != ("delay-passed" in reasons):
            problems.append("triple %d: state %s, reasons %r" % (n, fields[4], reasons))
    assert not problems, problems[:10]
    reasons_total = collections.Counter(r for rs in by_triple.values() for r in rs)
    record_figures("soak", seconds=round(elapsed, 1), policy_processes=processes,
                   replies=counters["replies"], triples=len(by_triple),
                   reasons=dict(reasons_total), postmap_listings=counters["postmap -s"],
                   postmap_queries=counters["postmap -q"],
                   cleanup=("greylistctl cleanup, %d runs, %d busy" % (counters["cleanup runs"],
                                                                  counters["cleanup busy"]))
                   if cleanup else "absent (greylistctl does not exist yet)",
                   errors=0, corrupt_values=0, lost_updates=0, locks_held_idle=0)
