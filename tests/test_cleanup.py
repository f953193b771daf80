"""Incremental cleanup: lifetimes, shared passes, coordination, concurrency."""

import os
import subprocess
import sys
import time

import pytest

from greylist.stores import cleanup as cleanup_module
from greylist.stores.cleanup import BATCH, Cleaner, State, format_state, parse_state
from greylist.config import Config, resolve
from greylist.core.record import Record, encode
from greylist.stores.base import StoreError
from greylist.stores.lmdb import LmdbStore
from tests.conftest import Recorder

T = 1_700_000_000
CFG = Config(delay_s=300)
WINDOW, MAX_AGE = CFG.retry_window_s, CFG.max_age_s


@pytest.fixture
def stores(tmp_path):
    os.chmod(tmp_path, 0o755)
    store, table = LmdbStore(str(tmp_path / "g")), LmdbStore(str(tmp_path / "g-clients"))
    yield store, table
    store.close()
    table.close()


def at(store, cfg=CFG):
    """cfg for the database store (its cleanup state beside it)."""
    return resolve(cfg._replace(database=store.name))


def cleaner(store, table, now, cfg=CFG, **tuning):
    return Cleaner(store, table, at(store, cfg), Recorder(), clock=lambda: now, **tuning)


def run_pass(c, budget_s=1.0):
    """Steps until the pass completes (bounded)."""
    for _ in range(10000):
        state = c.step(budget_s=budget_s, start=True)
        if state is not None and state.position is None:
            return state
    raise AssertionError("cleanup pass did not complete")


NOW = T + 10**7
BOUNDARIES = {
    b"pending-at-window": (Record(NOW - WINDOW, NOW - WINDOW, 1, "pending"), True),
    b"pending-after-window": (Record(NOW - WINDOW - 1, NOW - 5, 3, "pending"), False),
    b"passed-at-max-age": (Record(T, NOW - MAX_AGE, 2, "passed"), True),
    b"passed-after-max-age": (Record(T, NOW - MAX_AGE - 1, 2, "passed"), False),
    b"sender-at-max-age": (Record(T, NOW - MAX_AGE, 1, "sender"), True),
    b"sender-after-max-age": (Record(T, NOW - MAX_AGE - 1, 1, "sender"), False),
    b"client-after-max-age": (Record(T, NOW - MAX_AGE - 1, 7, "client"), False),
    b"manual-very-old": (Record(0, 0, 1, "manual"), True),
}


def test_keep_and_drop_at_each_lifetime_boundary(stores):
    store, table = stores
    store.put_many([(k, encode(r)) for k, (r, _) in BOUNDARIES.items()]
                   + [(b"malformed", b"garbage")])
    # Host entries, as the default greylist_client_match = pool writes them.
    table.put_many([(b"192.0.2.1", b"%d" % (NOW - MAX_AGE)),
                    (b"198.51.100.1", b"%d" % (NOW - MAX_AGE - 1)),
                    (b"203.0.113", b"OK")])  # not ours to judge: kept
    c = cleaner(store, table, NOW)
    state = run_pass(c)
    kept = {k for k, (_, keep) in BOUNDARIES.items() if keep}
    assert {k for k, _ in store.items()} == kept
    assert {k for k, _ in table.items()} == {b"192.0.2.1", b"203.0.113"}
    assert (state.retained, state.dropped) == (len(kept) + 2, len(BOUNDARIES) - len(kept) + 2)
    assert c.log.lines == ["cleanup: full retained=6 dropped=6"]


def test_a_pass_resumes_in_another_process_where_the_last_step_stopped(stores):
    store, table = stores
    store.put_many([(b"k%04d" % i, encode(Record(T, T, 1, "pending"))) for i in range(300)])
    first = cleaner(store, table, NOW)
    state = first.step(budget_s=0, start=True)  # one batch only
    assert state.position == (0, b"k%04d" % (BATCH - 1)) and state.dropped == BATCH
    first.close()
    second = cleaner(store, table, NOW)  # another process, same state file
    state = run_pass(second, budget_s=0)
    assert state.dropped == 300 and list(store.items()) == []
    assert second.log.lines == ["cleanup: full retained=0 dropped=300"]


def test_a_write_transaction_deletes_at_most_delete_batch_records(stores, monkeypatch):
    store, table = stores
    store.put_many([(b"k%04d" % i, encode(Record(T, T, 1, "pending"))) for i in range(50)])
    sizes = []
    delete_if = store.delete_if
    monkeypatch.setattr(store, "delete_if",
                        lambda keys, doomed: sizes.append(len(keys)) or delete_if(keys, doomed))
    c = cleaner(store, table, NOW, batch=20, delete_batch=8)
    state = run_pass(c)
    assert state.dropped == 50 and list(store.items()) == []
    assert sizes == [8, 8, 4, 8, 8, 4, 8, 2]  # walks of 20, 20 and 10 records
    assert c.longest_write_s > 0


def test_deletes_committed_before_a_failure_are_counted(stores, monkeypatch):
    store, table = stores
    store.put_many([(b"k%04d" % i, encode(Record(T, T, 1, "pending"))) for i in range(30)])
    delete_if, calls = store.delete_if, []

    def failing_second(keys, doomed):
        calls.append(len(keys))
        if len(calls) == 2:
            raise StoreError("disk trouble")
        return delete_if(keys, doomed)
    monkeypatch.setattr(store, "delete_if", failing_second)
    c = cleaner(store, table, NOW, batch=1024, delete_batch=8)
    state = c.step(budget_s=1.0, start=True)
    assert (state.retained, state.dropped) == (0, 8)
    monkeypatch.setattr(store, "delete_if", delete_if)
    c._next_check = 0  # Retry now rather than after FAILURE_RETRY_S.
    state = run_pass(c)
    assert (state.retained, state.dropped) == (0, 30) and list(store.items()) == []


def test_a_deleted_position_does_not_end_the_walk(stores):
    store, table = stores
    store.put_many([(b"k%04d" % i, encode(Record(T, NOW, 1, "passed"))) for i in range(200)])
    c = cleaner(store, table, NOW)
    state = c.step(budget_s=0, start=True)
    store.delete(state.position[1])  # another process deletes our position
    state = run_pass(c, budget_s=0)
    assert state.retained == 199 + 1  # every remaining key was visited


def test_a_record_refreshed_after_the_walk_is_not_deleted(stores, monkeypatch):
    store, table = stores
    stale = encode(Record(T, T, 2, "passed"))
    store.put(b"k", encode(Record(T, NOW, 2, "passed")))  # fresh in the database
    monkeypatch.setattr(store, "scan", lambda after, limit: [] if after else [(b"k", stale)])
    run_pass(cleaner(store, table, NOW))
    assert store.get(b"k") == encode(Record(T, NOW, 2, "passed"))


def test_only_one_process_cleans_at_a_time(stores):
    store, table = stores
    store.put(b"k", encode(Record(T, T, 1, "pending")))
    hold = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.readline()")
    with subprocess.Popen([sys.executable, "-c", hold, store.name + ".cleanup"], text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout.readline() == "locked\n"
            started = time.monotonic()
            assert cleaner(store, table, NOW).step(start=True) is None
            assert time.monotonic() - started < 1.0  # did not wait for the lock
        finally:
            holder.kill()
    assert run_pass(cleaner(store, table, NOW)).dropped == 1


def test_interval_starts_with_the_state_file_and_zero_disables(stores):
    store, table = stores
    store.put(b"k", encode(Record(T, T, 1, "pending")))
    c = cleaner(store, table, NOW)
    state = c.step()
    assert state == State(last_completed=NOW)  # new state file: not due yet
    later = cleaner(store, table, NOW + CFG.cleanup_interval_s)
    assert later.step(budget_s=1.0).position is None and store.get(b"k") is None
    assert later.log.lines == ["cleanup: full retained=0 dropped=1"]
    off = cleaner(store, table, NOW + 10**6, CFG._replace(cleanup_interval_s=0))
    assert off.step() is None


def test_unparsable_state_file_starts_a_new_pass_with_a_warning(stores):
    store, table = stores
    with open(store.name + ".cleanup", "w") as handle:
        handle.write("junk\n")
    c = cleaner(store, table, NOW)
    assert c.step(start=True).position is None
    assert c.log.lines[0].startswith("warning: cleanup state")


@pytest.mark.parametrize("state", [
    State(), State(T, (0, b"192.0.2/a@b/c"), 5, 6, T - 9), State(T, (1, b""), 0, 0, T),
])
def test_state_round_trip(state):
    assert parse_state(format_state(state)) == state


WRITER = """
import sys, time
from greylist.core.record import Record, encode
from greylist.stores.base import StoreError
from greylist.stores.lmdb import LmdbStore
s = LmdbStore(sys.argv[1])
now = int(time.time())
deadline = time.monotonic() + float(sys.argv[2])
i = 0
while time.monotonic() < deadline and i < 100000:
    s.put(b"fresh%06d" % i, encode(Record(now, now, 1, "pending")))
    i += 1
print(i)
"""


def test_cleanup_with_concurrent_writers_and_postmap_loses_nothing_that_should_stay(
        stores, postmap):
    store, table = stores
    now = int(time.time())
    old = encode(Record(now - WINDOW - 10, now - WINDOW - 10, 1, "pending"))
    store.put_many([(b"old%06d" % i, old) for i in range(3000)])
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, store.name, "3"], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    c = Cleaner(store, table, at(store), Recorder())
    passes = listings = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and passes < 50:
            run_pass(c, budget_s=0.002)
            passes += 1
            listed = subprocess.run([postmap, "-s", "lmdb:" + store.name],
                                    capture_output=True, text=True, timeout=30)
            assert listed.returncode == 0 and listed.stderr == ""
            listings += 1
        written = [int(w.communicate(timeout=30)[0]) for w in writers]
    finally:
        for w in writers:
            w.kill()
            w.wait()
            w.stdout.close()
    keys = {k for k, _ in store.items()}
    assert not any(k.startswith(b"old") for k in keys)
    # Both writers wrote the same keys: the larger count is what must stay.
    assert {b"fresh%06d" % i for i in range(max(written))} <= keys
    assert passes >= 1 and listings >= 1 and max(written) > 10


def test_a_broken_database_stops_cleanup_once_not_at_every_request(stores, monkeypatch):
    store, table = stores
    store.put(b"k", encode(Record(T, T, 1, "pending")))

    def broken(after, limit):
        raise cleanup_module.StoreError("disk on fire")

    monkeypatch.setattr(store, "scan", broken)
    c = cleaner(store, table, NOW)
    c.step(start=True)
    for _ in range(5):
        assert c.step() is None  # backing off: no new attempt, no new lines
    assert c.log.lines == ["warning: cleanup stopped: disk on fire",
                           "cleanup: partial retained=0 dropped=0"]


# Regressions of issue 15.

def test_cleanup_state_write_failure_is_a_warning_not_a_traceback(stores, monkeypatch):
    """ENOSPC or EROFS from the state write killed the process after its
    reply."""
    import errno
    store, table = stores
    store.put(b"192.0.2/a@x/b@y", encode(Record(T, T, 1, "pending")))
    c = cleaner(store, table, T + WINDOW + 10)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(cleanup_module.os, "pwrite", full)
    assert c.step() is None
    assert any("cannot write: No space left on device" in line for line in c.log.lines)
    # greylistctl (start=True) gets the error itself, once, not "busy".
    with pytest.raises(StoreError, match="cannot write: No space left on device"):
        c.step(start=True)
    c.close()


def test_a_broken_client_table_does_not_stop_cleanup_of_the_database(stores, monkeypatch):
    store, table = stores
    store.put(b"192.0.2/a@x/b@y", encode(Record(T, T, 1, "pending")))
    table.put(b"192.0.2", b"%d" % T)

    def broken(after, limit):
        raise StoreError("g-clients.lmdb: damaged")
    monkeypatch.setattr(table, "scan", broken)
    c = cleaner(store, table, T + WINDOW + 10)
    state = c.step(start=True)
    for _ in range(10):
        if state is None or state.position is None:
            break
        state = c.step(start=True)
    assert state is not None and state.position is None
    assert "cleanup: partial retained=0 dropped=1" in c.log.lines
    assert any("skipping a table in this pass" in line for line in c.log.lines)
    assert list(store.items()) == []
    c.close()


def test_a_pass_run_with_the_clock_ahead_does_not_stop_cleanup(stores):
    """One pass with the clock 40 days ahead stopped automatic cleanup for
    40 days."""
    store, table = stores
    ahead = cleaner(store, table, T + 40 * 86400)
    run_pass(ahead)
    ahead.close()
    store.put(b"192.0.2/a@x/b@y", encode(Record(T, T, 1, "pending")))
    # The clock is right again, one interval later: a pass is due.
    now = T + CFG.cleanup_interval_s + WINDOW + 10
    right = cleaner(store, table, now)
    state = right.step()
    assert state is not None and state.position is None
    assert list(store.items()) == []
    right.close()


def test_cleanup_removes_entries_that_postmap_n_wrote_without_the_nul(tmp_path, postmap):
    # Review: postmap -n writes keys without the trailing NUL; scan()
    # showed them like the others, but delete_if() deleted KEY plus NUL,
    # which did not exist: two passes said dropped=0 and both stayed.
    os.chmod(tmp_path, 0o755)
    source = tmp_path / "src"
    source.write_text("a/b@c/d@e 1:1000000000:1000000000:1:pending\nforeign OK\n"
                      "k/x@y/z@w 1:%d:%d:1:passed\n" % (NOW, NOW))
    done = subprocess.run([postmap, "-n", "-o", "lmdb:%s" % source], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    os.rename(str(source) + ".lmdb", str(tmp_path / "g.lmdb"))
    os.chmod(tmp_path / "g.lmdb", 0o600)
    store = LmdbStore(str(tmp_path / "g"))
    try:
        state = run_pass(cleaner(store, None, NOW))
        assert (state.retained, state.dropped) == (1, 2)
        assert [k for k, _ in store.scan(None, 10)] == [b"k/x@y/z@w"]
    finally:
        store.close()


def test_the_state_file_is_private_whatever_the_umask(stores):
    # Its position names a database key (addresses, unless privacy mode).
    store, table = stores
    c = cleaner(store, table, NOW)
    old = os.umask(0)
    try:
        run_pass(c)
    finally:
        os.umask(old)
        c.close()
    assert os.stat(at(store).cleanup_state).st_mode & 0o777 == 0o600
