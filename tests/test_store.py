"""The LMDB store against real LMDB, real postmap and concurrent processes."""

import contextlib
import fcntl
import os
import subprocess
import sys
import time

import lmdb
import pytest

from greylist.stores import lmdbenv as store_module
from greylist.stores.lock import EXCLUSIVE, locked
from greylist.stores.base import StoreError
from greylist.stores.lmdb import LmdbStore
from tests.conftest import run_python


@pytest.fixture
def db(tmp_path):
    """A new store in a private directory; closed after the test."""
    os.chmod(tmp_path, 0o755)
    store = LmdbStore(str(tmp_path / "greylist"))
    store.open()
    yield store
    store.close()


def raw_items(path):
    """All raw (key, value) pairs of an LMDB file, read without our store."""
    env = lmdb.open(path, subdir=False, lock=False, readonly=True)
    try:
        with env.begin() as txn:
            return list(txn.cursor())
    finally:
        env.close()


def test_keys_and_values_are_stored_with_one_trailing_nul(db):
    db.put(b"192.0.2.1/a@example.org/b@example.net", b"1:1:1:1:pending")
    db.close()
    assert raw_items(db.path) == [(b"192.0.2.1/a@example.org/b@example.net\0",
                                   b"1:1:1:1:pending\0")]


def test_get_update_delete_round_trip(db):
    assert db.get(b"k") is None
    assert db.update(b"k", lambda old: (b"v1", old)) is None
    assert db.update(b"k", lambda old: (None, old)) == b"v1"
    assert db.get(b"k") == b"v1"
    assert db.delete(b"k") is True
    assert db.delete(b"k") is False
    assert db.get(b"k") is None


def test_update_refuses_empty_values(db):
    # An empty value makes Postfix answer 451 (maps_find, DICT_ERR_CONFIG).
    with pytest.raises(ValueError):
        db.update(b"k", lambda old: (b"", None))
    assert db.get(b"k") is None


def test_new_file_is_lmdb_09_format_with_mode_0644(tmp_path):
    os.chmod(tmp_path, 0o755)
    old = os.umask(0o077)
    try:
        store = LmdbStore(str(tmp_path / "t"))
        store.put(b"k", b"v")
        store.close()
    finally:
        os.umask(old)
    head = (tmp_path / "t.lmdb").read_bytes()[:24]
    assert head[16:24] == bytes.fromhex("dec0efbe01000000")
    assert (tmp_path / "t.lmdb").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.lmdb"]  # no lock file


def test_lmdb_default_lib_version_1_still_writes_format_1(tmp_path):
    # py-lmdb 3 reads LMDB_DEFAULT_LIB_VERSION at import time.
    os.chmod(tmp_path, 0o755)
    done = run_python("import sys; from greylist.stores.lmdb import LmdbStore; "
                      "s = LmdbStore(sys.argv[1]); s.put(b'k', b'v'); s.close()",
                      str(tmp_path / "t"), env={"LMDB_DEFAULT_LIB_VERSION": "1"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.lmdb").read_bytes()[16:24] == bytes.fromhex("dec0efbe01000000")


@pytest.mark.skipif(int(lmdb.__version__.split(".")[0]) < 3,
                    reason="py-lmdb < 3 has no LMDB 1.0 engine to write format v3")
def test_format_v3_file_is_refused_with_a_clear_message(tmp_path):
    os.chmod(tmp_path, 0o755)
    env = lmdb.open(str(tmp_path / "v3.lmdb"), subdir=False, lock=False, lib_version=1)
    with env.begin(write=True) as txn:
        txn.put(b"k\0", b"v\0")
    env.close()
    with pytest.raises(StoreError, match="format v3.*move the file aside"):
        LmdbStore(str(tmp_path / "v3")).open()


def test_corrupt_file_is_refused_and_left_untouched(tmp_path):
    os.chmod(tmp_path, 0o755)
    garbage = bytes(range(256)) * 64
    (tmp_path / "bad.lmdb").write_bytes(garbage)
    with pytest.raises(StoreError, match="not an LMDB 0.9 database"):
        LmdbStore(str(tmp_path / "bad")).open()
    assert (tmp_path / "bad.lmdb").read_bytes() == garbage


def test_world_writable_directory_is_refused(tmp_path):
    os.chmod(tmp_path, 0o777)
    with pytest.raises(StoreError, match="world-writable"):
        LmdbStore(str(tmp_path / "greylist")).open()
    assert not (tmp_path / "greylist.lmdb").exists()


def test_world_writable_file_is_refused(db):
    db.put(b"k", b"v")
    db.close()
    os.chmod(db.path, 0o666)
    with pytest.raises(StoreError, match="world-writable"):
        db.open()


def test_missing_directory_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="No such file"):
        LmdbStore(str(tmp_path / "missing" / "greylist")).open()


def test_reopen_is_delayed_after_a_failure(tmp_path, monkeypatch):
    os.chmod(tmp_path, 0o777)
    store = LmdbStore(str(tmp_path / "g"))
    with pytest.raises(StoreError, match="world-writable"):
        store.get(b"k")
    os.chmod(tmp_path, 0o755)
    with pytest.raises(StoreError, match="retrying"):
        store.get(b"k")
    store.env.reopen_delay_s = 0.0
    assert store.get(b"k") is None  # repaired: reopened without a restart
    store.close()


def test_lock_calls_are_exactly_the_postfix_protocol(db, monkeypatch):
    calls = []
    real = fcntl.lockf
    monkeypatch.setattr(fcntl, "lockf",
                        lambda fd, op, *a: (calls.append((fd, op)), real(fd, op, *a))[1])
    db.get(b"k")
    db.update(b"k", lambda old: (b"v", None))
    db.scan(None, 10)
    fd = db.env.fd
    assert calls == [(fd, fcntl.LOCK_SH), (fd, fcntl.LOCK_UN),
                     (fd, fcntl.LOCK_EX), (fd, fcntl.LOCK_UN),
                     (fd, fcntl.LOCK_SH), (fd, fcntl.LOCK_UN)]


@pytest.mark.parametrize("operation, kind", [
    pytest.param(lambda db: db.get_many([b"k", None]), fcntl.LOCK_SH, id="get_many"),
    pytest.param(lambda db: db.get_many_batch([[b"k"], [b"j"]]), fcntl.LOCK_SH,
                 id="get_many_batch"),
    pytest.param(lambda db: db.get_many_nowait([b"k"]), fcntl.LOCK_SH, id="get_many_nowait"),
    pytest.param(lambda db: db.scan(None, 10), fcntl.LOCK_SH, id="scan"),
    pytest.param(lambda db: db.info(), fcntl.LOCK_SH, id="info"),
    pytest.param(lambda db: db.update_many([b"k"], lambda old: ([b"w"], None)), fcntl.LOCK_EX,
                 id="update_many"),
    pytest.param(lambda db: db.update_batch([([b"k"], lambda old: ([b"w"], None))]),
                 fcntl.LOCK_EX, id="update_batch"),
    pytest.param(lambda db: db.put_many([(b"j", b"v")]), fcntl.LOCK_EX, id="put_many"),
    pytest.param(lambda db: db.delete_if([b"k"], lambda k, v: True), fcntl.LOCK_EX,
                 id="delete_if"),
])
def test_each_operation_takes_the_lock_kind_postfix_expects(db, monkeypatch, operation, kind):
    # lmdb_table(5): readers (postmap -q, smtpd) take a shared lock,
    # writers an exclusive one; a write under a shared lock would let a
    # reader see a transaction half done, a read under an exclusive one
    # would block the readers.
    db.put(b"k", b"v")
    calls = []
    real = fcntl.lockf
    monkeypatch.setattr(fcntl, "lockf",
                        lambda fd, op, *a: (calls.append(op), real(fd, op, *a))[1])
    operation(db)
    assert [op & ~fcntl.LOCK_NB for op in calls] == [kind, fcntl.LOCK_UN]


def test_map_full_doubles_the_map_and_keeps_every_value(tmp_path, monkeypatch):
    os.chmod(tmp_path, 0o755)
    store = LmdbStore(str(tmp_path / "g"), map_size=64 * 1024)
    for i in range(40):
        store.put(b"key%03d" % i, b"x" * 4000)
    size = store.info()["map_size"]
    assert size > 64 * 1024
    assert all(store.get(b"key%03d" % i) == b"x" * 4000 for i in range(40))
    store.close()


def test_map_grown_by_another_process_is_adopted(db):
    db.put(b"first", b"1")
    assert db.info()["map_size"] == store_module.MAP_SIZE
    # Another process fills the table beyond 16 MiB, growing the map.
    grow = ("import sys; from greylist.stores.lmdb import LmdbStore; s = LmdbStore(sys.argv[1]); "
            "[s.update(b'big%04d' % i, lambda old: (b'y' * 20000, None)) "
            "for i in range(1000)]; s.close()")
    done = run_python(grow, db.name, timeout=120)
    assert done.returncode == 0, done.stderr
    assert db.get(b"big0999") == b"y" * 20000
    assert db.info()["map_size"] > store_module.MAP_SIZE


HOLD = """
import sys
from greylist.stores.lock import EXCLUSIVE, locked
from greylist.stores.lmdb import LmdbStore
s = LmdbStore(sys.argv[1]); s.open()
with locked(s.env.fd, EXCLUSIVE):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_exclusive_lock_in_one_process_blocks_a_reader_in_another(db):
    db.put(b"k", b"v")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    reader_code = ("import sys; from greylist.stores.lmdb import LmdbStore; "
                   "print(LmdbStore(sys.argv[1]).get(b'k'))")
    with subprocess.Popen([sys.executable, "-c", HOLD, db.name], env=env, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout.readline() == "locked\n"
            with subprocess.Popen([sys.executable, "-c", reader_code, db.name], env=env,
                                  stdout=subprocess.PIPE, text=True) as reader:
                with pytest.raises(subprocess.TimeoutExpired):
                    reader.wait(timeout=1.0)  # blocked behind the exclusive lock
                holder.stdin.write("release\n")
                holder.stdin.flush()
                assert reader.communicate(timeout=10)[0] == "b'v'\n"
        finally:
            holder.kill()


def test_our_exclusive_lock_blocks_postmap_and_release_lets_it_read(db, postmap):
    db.put(b"sender@example.com", b"OK")
    with locked(db.env.fd, EXCLUSIVE):
        blocked = subprocess.run(["timeout", "1", postmap, "-q", "sender@example.com",
                                  "lmdb:" + db.name], capture_output=True, text=True)
        assert blocked.returncode == 124  # killed by timeout while waiting
    done = subprocess.run([postmap, "-q", "sender@example.com", "lmdb:" + db.name],
                          capture_output=True, text=True, timeout=10)
    assert (done.returncode, done.stdout) == (0, "OK\n")


def test_postmap_reads_what_we_wrote(db, postmap):
    db.put(b"192.0.2.1/alice@example.org/bob@example.net", b"1:100:160:2:passed")
    db.put("strasse@example.de".encode(), b"OK")
    queried = subprocess.run([postmap, "-q", "192.0.2.1/ALICE@example.org/bob@example.net",
                              "lmdb:" + db.name], capture_output=True, text=True, timeout=10)
    assert (queried.returncode, queried.stdout) == (0, "1:100:160:2:passed\n")
    folded = subprocess.run([postmap, "-q", "Straße@Example.DE", "lmdb:" + db.name],
                            capture_output=True, text=True, timeout=10)
    assert folded.stdout == "OK\n"
    listed = subprocess.run([postmap, "-s", "lmdb:" + db.name], capture_output=True,
                            text=True, timeout=10)
    assert listed.returncode == 0 and listed.stderr == ""
    assert listed.stdout.splitlines() == [
        "192.0.2.1/alice@example.org/bob@example.net\t1:100:160:2:passed",
        "strasse@example.de\tOK"]


def test_we_read_what_postmap_wrote(tmp_path, postmap):
    os.chmod(tmp_path, 0o755)
    source = tmp_path / "access"
    source.write_text("Alpha@Example.ORG OK\n10.1.2.3 REJECT go away\n")
    subprocess.run([postmap, "lmdb:" + str(source)], check=True, timeout=10)
    subprocess.run([postmap, "-i", "lmdb:" + str(source)], input="added@example.net DUNNO\n",
                   text=True, check=True, timeout=10)
    store = LmdbStore(str(source), readonly=True)
    assert store.get(b"alpha@example.org") == b"OK"
    assert store.get(b"10.1.2.3") == b"REJECT go away"
    assert store.get(b"added@example.net") == b"DUNNO"
    assert [k for k, _ in store.items()] == [b"10.1.2.3", b"added@example.net",
                                              b"alpha@example.org"]
    store.close()


WRITER = """
import sys, time
from greylist.stores.lmdb import LmdbStore
s = LmdbStore(sys.argv[1])
deadline = time.monotonic() + float(sys.argv[2])
i = 0
while time.monotonic() < deadline and i < 100000:
    s.put(b"w%06d" % i, b"1:%d:%d:1:pending" % (i, i))
    i += 1
print(i)
"""


def test_postmap_reads_consistently_while_our_writer_runs(db, postmap):
    db.put(b"w000000", b"1:0:0:1:pending")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    listings = 0
    with subprocess.Popen([sys.executable, "-c", WRITER, db.name, "3"], env=env,
                          stdout=subprocess.PIPE, text=True) as writer:
        try:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and writer.poll() is None and listings < 200:
                listed = subprocess.run([postmap, "-s", "lmdb:" + db.name],
                                        capture_output=True, text=True, timeout=10)
                assert listed.returncode == 0 and listed.stderr == ""
                for line in listed.stdout.splitlines():
                    key, value = line.split("\t")
                    assert key.startswith("w") and value.startswith("1:") \
                        and value.endswith(":1:pending"), line
                queried = subprocess.run([postmap, "-q", "w000000", "lmdb:" + db.name],
                                         capture_output=True, text=True, timeout=10)
                assert queried.stdout == "1:0:0:1:pending\n"
                listings += 1
            written = int(writer.communicate(timeout=30)[0])
        finally:
            writer.kill()
    assert writer.returncode == 0 and written > 10 and listings > 3
    final = subprocess.run([postmap, "-s", "lmdb:" + db.name], capture_output=True,
                           text=True, timeout=10)
    assert len(final.stdout.splitlines()) == written


def _delete_or_replace(db, how: str) -> None:
    if how == "deleted":
        os.unlink(db.path)
    else:
        other = LmdbStore(db.name + "-new")
        other.put(b"new", b"2")
        other.close()
        os.rename(db.name + "-new.lmdb", db.path)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_write_after_the_database_was_deleted_or_replaced_goes_to_the_path(db, how):
    db.put(b"old", b"1")
    assert db.get(b"old") == b"1"  # A read just now: the next read does not look.
    _delete_or_replace(db, how)
    db.put(b"after", b"3")  # A write always looks.
    db.close()
    assert sorted(k for k, _ in raw_items(db.path)) == (
        [b"after\0"] if how == "deleted" else [b"after\0", b"new\0"])


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_read_sees_the_file_at_the_path_after_the_check_interval(db, how, monkeypatch):
    db.put(b"old", b"1")
    _delete_or_replace(db, how)
    db.env.same_file_interval_s = 0.0
    assert db.get(b"old") is None
    assert db.get(b"new") == (None if how == "deleted" else b"2")


@contextlib.contextmanager
def lock_held_by_another_process(path, mode):
    """A process holding fcntl.MODE on path until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'r+b'); "
         "fcntl.lockf(f, fcntl.%s); print('held', flush=True); sys.stdin.read()" % mode,
         str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()


def test_a_lock_held_by_another_process_bounds_greylistds_wait(tmp_path):
    # A local user holding a lock on the file must not stall greylistd's
    # one store thread: the wait is bounded, then each try is a single one.
    os.chmod(tmp_path, 0o755)
    store = LmdbStore(str(tmp_path / "g"), lock_timeout_s=0.3)
    store.put(b"k", b"v")
    with lock_held_by_another_process(tmp_path / "g.lmdb", "LOCK_SH"):
        waits = []
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(StoreError, match="locked by another process"):
                store.put(b"k", b"w")
            waits.append(time.monotonic() - began)
        assert 0.25 < waits[0] < 2 and max(waits[1:]) < 0.1
        assert store.get(b"k") == b"v"  # readers share the lock
    time.sleep(0.35)
    store.put(b"k", b"x")
    assert store.get(b"k") == b"x"
    store.close()


def test_a_read_that_must_not_wait_gives_way_to_a_lock_or_a_transaction(tmp_path):
    # greylistd's event loop reads known records itself only when nothing
    # is in the way; else the store thread does (stores/commit.py).
    os.chmod(tmp_path, 0o755)
    store = LmdbStore(str(tmp_path / "g"))
    store.put(b"k", b"v")
    assert store.get_many_nowait([b"k", None]) == [b"v", None]
    with store.env._mutex:  # another thread of this process in a transaction
        assert store.get_many_nowait([b"k"]) is None
    with lock_held_by_another_process(tmp_path / "g.lmdb", "LOCK_EX"):
        began = time.monotonic()
        assert store.get_many_nowait([b"k"]) is None
        assert time.monotonic() - began < 0.5
    assert store.get_many_nowait([b"k"]) == [b"v"]
    store.close()


def test_the_store_thread_caps_batches_keeps_arrival_order_and_drains_at_stop():
    # Seven writing plans queued before the thread starts, batches of at
    # most three: three commits (3, 3, 1), the plans applied in the order
    # they came, every one of them before stop() returns; a plan after
    # stop() fails at once (the caller fails open).
    import asyncio
    from greylist.stores.base import StoreError
    from greylist.stores.commit import Committer
    from greylist.stores.memory import MemoryStore

    class Recording(MemoryStore):
        def __init__(self):
            super().__init__()
            self.batches = []

        def update_batch(self, ops):
            self.batches.append([keys[0] for keys, _ in ops])
            return super().update_batch(ops)

    applied = []

    def change(n):
        def apply(values):
            applied.append(n)
            return [b"%d" % n], n
        return apply

    loop = asyncio.new_event_loop()
    try:
        store = Recording()
        committer = Committer(store, loop, batch_max=3, batch_s=5.0)
        futures = [committer.plan([b"k%d" % n], change(n)) for n in range(7)]
        applied.clear()  # the snapshot runs of plan(), in the caller's thread
        committer.start()
        assert committer.stop(timeout_s=10)
        loop.run_until_complete(asyncio.sleep(0))
        assert store.batches == [[b"k0", b"k1", b"k2"], [b"k3", b"k4", b"k5"], [b"k6"]]
        assert applied == list(range(7))
        assert [f.result() for f in futures] == list(range(7))
        assert store.get(b"k6") == b"6"
        late = committer.plan([b"k9"], change(9))
        with pytest.raises(StoreError, match="stopped"):
            late.result()
    finally:
        loop.close()


def test_a_failed_trial_commit_refuses_the_file_and_nothing_is_served_from_it(
        tmp_path, monkeypatch):
    """greylistd (write_check) must not use a file on which a trial commit
    failed: one LMDB abort there would end every connection at once. The
    open fails with the trial's reason, the table is failing, and no
    descriptor of it stays open."""
    from greylist.stores import writecheck
    os.chmod(tmp_path, 0o755)
    name = str(tmp_path / "db")
    seeded = LmdbStore(name)
    seeded.put(b"k", b"v")
    seeded.close()
    calls = []

    def failing_trial(path, env, fd, lock_timeout_s, read_all=False):
        calls.append(path)
        return "%s is damaged (the trial commit aborted); move it aside" % path, 0
    monkeypatch.setattr(writecheck, "trial", failing_trial)
    env = store_module.Environment(name, lock_timeout_s=1.0, write_check=True)
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(StoreError, match="the trial commit aborted"):
        env.open()
    assert calls == [name + ".lmdb"]
    assert env.failing and env.fd == -1
    assert set(os.listdir("/proc/self/fd")) <= fds_before
    # Within the reopen delay the store answers as failed, without a new trial.
    with pytest.raises(StoreError, match="unavailable after an earlier error"):
        env.run(EXCLUSIVE, lambda e: None)
    assert len(calls) == 1
    env.close()
