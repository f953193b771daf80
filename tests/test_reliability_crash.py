"""Crash safety: concurrent writers killed with SIGKILL at random points.

Each round starts several greylist processes on one database, drives
them like smtpd (one request at a time, mostly new triples, some shared
by all writers of the round, some from earlier rounds) and SIGKILLs each
at its own random moment, often in the middle of a write transaction.
After each round the database opens, postmap -s lists it, every value
parses as a record, and every triple whose defer reply reached the
client is still stored: a fresh process never calls it "new" again,
because records are committed before the reply is sent.
"""

import collections
import random
import signal
import threading
import time

import lmdb

from greylist.core import record as records
from greylist.stores.lmdb import LmdbStore
from tests.reliability import (BAD_LOG, SEED, SIZES, Client, command, decisions, home,
                               postmap_list, read_log, record_figures, run, settings,
                               split_replies, triple, triple_request, warnings)

REQUESTS_PER_WRITER = 400
SHARED_PER_ROUND = 12
KILL_WINDOW_S = (0.02, 0.6)


def drive(client: Client, ids: list[int], answered: list[tuple[int, str]]) -> None:
    for n in ids:
        action = client.ask(triple_request(n))
        if action is None:
            return
        answered.append((n, action))


def verify(cf, acked: set[int], controls: list[int]) -> dict[int, str]:
    """Ask a fresh process about triples; return {id: reason}."""
    ids = sorted(acked) + controls
    done = run(command(cf), b"".join(triple_request(n) for n in ids), timeout=120)
    assert (done.returncode, done.stderr) == (0, b""), done
    assert len(split_replies(done.stdout)) == len(ids)
    log = read_log(cf.parent / "verify.log")
    by_triple = {}
    for _, _, reason, _, client, sender, rcpt in decisions(log):
        by_triple[(client, sender, rcpt)] = reason
    return {n: by_triple.get(triple(n)) for n in ids}


def check_database(directory, postmap) -> int:
    """Open the database three ways; every value must parse. Return entries."""
    path = str(directory / "db.lmdb")
    env = lmdb.open(path, subdir=False, lock=False, readonly=True)
    try:
        with env.begin() as txn:
            raw = list(txn.cursor())
    finally:
        env.close()
    pairs = postmap_list(postmap, str(directory / "db"))
    assert len(pairs) == len(raw)
    bad = [(k, v) for k, v in pairs if records.decode(v.encode()) is None]
    assert not bad, "values that do not parse: %r" % bad[:5]
    store = LmdbStore(str(directory / "db"))
    try:
        assert store.info()["entries"] == len(raw)
    finally:
        store.close()
    return len(raw)


def test_sigkilled_concurrent_writers_lose_no_acknowledged_triple(tmp_path, postmap):
    directory = home(tmp_path / "crash")
    cf = settings(directory)
    verify_cf = settings(directory, "verify.cf", log="verify.log")
    rng = random.Random(SEED)
    rounds, writers = SIZES["crash_rounds"], SIZES["crash_writers"]
    next_id, control_id = 0, 10 ** 6
    all_acked: set[int] = set()
    answered_total = killed_running = 0
    started = time.monotonic()
    for round_number in range(rounds):
        shared = list(range(next_id, next_id + SHARED_PER_ROUND))
        next_id += SHARED_PER_ROUND
        old = rng.sample(sorted(all_acked), min(20, len(all_acked)))
        clients, threads, answers = [], [], []
        for _ in range(writers):
            own = list(range(next_id, next_id + REQUESTS_PER_WRITER))
            next_id += REQUESTS_PER_WRITER
            ids = own + shared + old
            rng.shuffle(ids)
            client = Client(command(cf))
            answered: list[tuple[int, str]] = []
            thread = threading.Thread(target=drive, args=(client, ids, answered))
            thread.start()
            clients.append(client)
            threads.append(thread)
            answers.append(answered)
        # SIGKILL each writer at its own random moment.
        start = time.monotonic()
        for at, client in sorted((rng.uniform(*KILL_WINDOW_S), c) for c in clients):
            time.sleep(max(0.0, start + at - time.monotonic()))
            killed_running += client.proc.poll() is None
            client.kill()
        for thread in threads:
            thread.join(timeout=30)
        for client in clients:
            status, err = client.close()
            assert status == -signal.SIGKILL and err == b"", (status, err)
        acked = set()
        for answered in answers:
            answered_total += len(answered)
            for n, action in answered:
                assert action.startswith("DEFER_IF_PERMIT"), (n, action)
                acked.add(n)
        check_database(directory, postmap)
        controls = [control_id, control_id + 1]
        control_id += 2
        reasons = verify(verify_cf, acked, controls)
        lost = sorted(n for n in acked if reasons[n] in (None, "new"))
        assert not lost, "round %d: acknowledged triples lost: %r" % (round_number, lost[:10])
        assert [reasons[n] for n in controls] == ["new", "new"]
        all_acked |= acked
    # Every acknowledged triple of every round is still there at the end.
    reasons = verify(verify_cf, all_acked, [])
    assert not [n for n in all_acked if reasons[n] in (None, "new")]
    entries = check_database(directory, postmap)
    # A triple is "new" at most once in all logs: no record was ever lost.
    logs = read_log(directory / "log") + read_log(directory / "verify.log")
    new = collections.Counter(d[4:] for d in decisions(logs) if d[2] == "new")
    assert not [t for t, count in new.items() if count > 1]
    assert not [b for b in BAD_LOG if b in logs] and not warnings(logs)
    record_figures("crash", rounds=rounds, writers_per_round=writers,
                   processes_killed=rounds * writers, killed_while_running=killed_running,
                   replies_read=answered_total, acknowledged_triples=len(all_acked),
                   lost=0, database_entries=entries,
                   seconds=round(time.monotonic() - started, 1))
