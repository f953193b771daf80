"""The Redis store (greylist_database = redis...) against real servers.

The contract suite (test_store_contract.py) runs on RedisStore too. Here:

- expiry: a property test that Redis's per-record expiry (expire_at(),
  stamp_expire_at(), the expiry functions wiring.redis_table() gives each
  table) holds exactly when LMDB's cleanup would drop the value; and TTL
  on a real server for records written through RedisStore;
- update_batch (one optimistic transaction) and get_many_batch (one
  round trip) against Store's one-at-a-time semantics on MemoryStore;
- two mail hosts, one over the unix socket and one over TCP, sharing a
  greylist: a triple deferred on one passes on the other;
- faults, each reply within greylist_redis_timeout + 0.5 s: Redis killed
  and restarted on the same socket, paused with SIGSTOP, a Sentinel
  failover, a wrong password (WRONGPASS), no password (NOAUTH), an ACL
  user, one without the commands greylist needs (NOPERM), a password
  file readable by others, a full memory (OOM);
- greylistctl stats, dump (SCAN, never KEYS), show, whitelist add and
  remove, and import from an LMDB database that greylist made.

Every server is started here (tests/redis_server.py) on 127.0.0.1 or a
unix socket in a temporary directory, and stopped by PID in the fixtures'
teardown. Without redis-server the tests skip; under CI they fail.
"""

import contextlib
import os
import pathlib
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from greylist.config import Config, load
from greylist.core import record as records
from greylist.core.decide import expire_at, expired
from greylist.core.tables import MANUAL_PERMIT, permit_expired, stamp_expire_at
from redis_server import (RedisServer, Sentinels, ServerError, make_certificates, missing,
                          start_server)

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent
TIMEOUT_MS = 300
# The bound on every reply while Redis fails: the Redis timeout, plus
# half a second for the process itself.
REPLY_BOUND_S = TIMEOUT_MS / 1000 + 0.5
DELAY_S = 2
# Longer than the Redis store's first back-off after a failure.
BACKOFF_WAIT_S = 0.6


# ----------------------------------------------------------------------
# Helpers: temporary directories short enough for a unix socket, settings
# files, a running greylist process, greylistctl.

@pytest.fixture
def short_dir():
    """A temporary directory under /tmp (a unix socket path is at most 107
    bytes; pytest's tmp_path can be longer)."""
    directory = tempfile.mkdtemp(prefix="gl-redis-", dir="/tmp")
    yield pathlib.Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_server():
    """One redis-server with a unix socket and a TCP port, for the tests
    that do not hurt it; flushed by the server fixture before each test."""
    directory = tempfile.mkdtemp(prefix="gl-redis-s-", dir="/tmp")
    server = start_server(directory, tcp=True)
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def server(shared_server):
    client = shared_server.client()
    try:
        client.flushall()
        client.config_set("maxmemory", 0)
    finally:
        client.close()
    return shared_server


@pytest.fixture
def own_server(short_dir):
    """A redis-server of this test alone (unix socket only); stopped by PID
    at teardown, paused or not."""
    server = start_server(short_dir / "redis")
    yield server
    server.stop()


def write_settings(directory: pathlib.Path, name: str, database: str, extra: str = "",
                   delay_s: int = DELAY_S) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name + ".cf")
    path.write_text("greylist_database = %s\ngreylist_log = %s/%s.log\n"
                    "greylist_allow_root = yes\ngreylist_delay = %ds\n"
                    "greylist_redis_timeout = %dms\n%s"
                    % (database, directory, name, delay_s, TIMEOUT_MS, extra))
    return str(path)


def log_of(settings_path: str) -> str:
    try:
        return pathlib.Path(settings_path[:-len(".cf")] + ".log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def program(name: str, module: str) -> list[str]:
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def request(client: str, sender: str, rcpt: str = "bob@example.net") -> bytes:
    return ("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=%s\n"
            "client_name=unknown\nsender=%s\nrecipient=%s\n\n"
            % (client, sender, rcpt)).encode()


class Greylist:
    """A running `greylist -c SETTINGS`, asked one request at a time."""

    def __init__(self, settings_path: str) -> None:
        self.settings_path = settings_path
        self.proc = subprocess.Popen(program("greylist", "greylist") + ["-c", settings_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=environment())
        self.buffer = b""

    def ask(self, client: str, sender: str, rcpt: str = "bob@example.net",
            timeout: float = 10.0) -> tuple[str, float]:
        """The action of one request, and how long the reply took."""
        began = time.monotonic()
        self.proc.stdin.write(request(client, sender, rcpt))
        self.proc.stdin.flush()
        deadline = began + timeout
        fd = self.proc.stdout.fileno()
        while b"\n\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError("no reply within %.1f s; log:\n%s"
                                     % (timeout, log_of(self.settings_path)))
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError("greylist exited (%s); log:\n%s"
                                     % (self.proc.poll(), log_of(self.settings_path)))
            self.buffer += chunk
        reply, _, self.buffer = self.buffer.partition(b"\n\n")
        elapsed = time.monotonic() - began
        assert reply.startswith(b"action="), reply
        return reply[len(b"action="):].decode(), elapsed

    def warm(self, client="192.0.2.1", sender="warm@example.org") -> str:
        """One request, so that later timings exclude the start-up."""
        return self.ask(client, sender, timeout=20)[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc.stdout.close()


@pytest.fixture
def greylist():
    """Start greylist processes with greylist(settings); closed at teardown."""
    started = []

    def start(settings_path: str) -> Greylist:
        process = Greylist(settings_path)
        started.append(process)
        return process
    yield start
    for process in started:
        process.close()


def ctl(settings_path: str, *args: str) -> tuple[int, str]:
    done = subprocess.run(program("greylistctl", "greylist.cli.greylistctl")
                          + ["-c", settings_path, *args], capture_output=True, text=True,
                          timeout=60, env=environment())
    return done.returncode, done.stdout + done.stderr


def warnings_of(settings_path: str) -> list[str]:
    return [line for line in log_of(settings_path).splitlines() if "warning:" in line]


def deferred(action: str) -> bool:
    return action.startswith("DEFER_IF_PERMIT")


def until_deferred(process: Greylist, prefix: str, within_s: float,
                   bound_s: float | None = REPLY_BOUND_S) -> tuple[str, int, float]:
    """Ask new triples (sender prefixN@example.org) until one is deferred,
    for at most within_s; each reply within bound_s. Returns the sender,
    the number of attempts, and the seconds it took."""
    began = time.monotonic()
    for attempt in range(1000):
        if time.monotonic() - began > within_s:
            break
        sender = "%s%d@example.org" % (prefix, attempt)
        action, took = process.ask("198.51.100.%d" % (attempt % 250 + 1), sender)
        if bound_s is not None:
            assert took < bound_s, (attempt, action, took)
        if deferred(action):
            return sender, attempt + 1, time.monotonic() - began
        assert action == "DUNNO", action
        time.sleep(0.1)
    raise AssertionError("no new triple was deferred within %.0f s; log:\n%s"
                         % (within_s, log_of(process.settings_path)))


# ----------------------------------------------------------------------
# Expiry: Redis's lifetimes are the cleanup's.

CFG_TIMES = st.integers(min_value=0, max_value=2 ** 36)
TIMES = st.integers(min_value=0, max_value=2 ** 40)


@st.composite
def record_and_now(draw):
    cfg = Config(retry_window_s=draw(CFG_TIMES), max_age_s=draw(CFG_TIMES),
                 correspondent_lifetime_s=draw(CFG_TIMES))
    record = records.Record(draw(TIMES), draw(TIMES), draw(st.integers(0, 2 ** 32)),
                            draw(st.sampled_from(records.STATES)))
    at = expire_at(record, cfg)
    if at is not None and draw(st.booleans()):
        now = at + draw(st.integers(-3, 3))  # around the boundary
    else:
        now = draw(st.integers(min_value=0, max_value=2 ** 41))
    return record, now, cfg


@hsettings(max_examples=500, deadline=None)
@given(record_and_now())
def test_a_record_expires_in_redis_exactly_when_cleanup_would_drop_it(case):
    record, now, cfg = case
    at = expire_at(record, cfg)
    assert expired(record, now, cfg) == (at is not None and now >= at)
    # A record's lifetime is readable from its value alone (decode/encode).
    assert records.decode(records.encode(record)) == record
    assert (at is None) == (record.state == records.MANUAL)


@hsettings(max_examples=500, deadline=None)
@given(stamp=st.integers(min_value=-10, max_value=2 ** 40),
       lifetime=CFG_TIMES, offset=st.one_of(st.integers(-3, 3),
                                           st.integers(-2 ** 40, 2 ** 40)))
def test_a_table_stamp_expires_in_redis_exactly_when_cleanup_would_drop_it(
        stamp, lifetime, offset):
    now = stamp + lifetime + offset
    value = b"%d" % stamp
    at = stamp_expire_at(value, lifetime)
    # The cleanup rule for the client and correspondent tables.
    dropped = value.isdigit() and now - int(value) > lifetime
    assert dropped == (at is not None and now >= at)
    # The postscreen table's "permit STAMP" (permit_expired, as cleanup).
    permit = b"permit " + value
    at = stamp_expire_at(permit, lifetime)
    assert permit_expired(permit, now, lifetime) == (at is not None and now >= at)
    assert stamp_expire_at(MANUAL_PERMIT, lifetime) is None


TABLE_VALUES = {
    "db": st.builds(lambda first, last, count, state: records.encode(
        records.Record(first, last, count, state)), TIMES, TIMES, st.integers(0, 99),
        st.sampled_from(records.STATES)),
    "clients": st.builds(lambda stamp: b"%d" % stamp, TIMES),
    "correspondents": st.builds(lambda stamp: b"%d" % stamp, TIMES),
    "postscreen": st.one_of(st.builds(lambda stamp: b"permit %d" % stamp, TIMES),
                            st.just(MANUAL_PERMIT)),
}


@hsettings(max_examples=300, deadline=None,
           suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), table=st.sampled_from(list(TABLE_VALUES)),
       lifetimes=st.tuples(CFG_TIMES, CFG_TIMES, CFG_TIMES))
def test_each_redis_table_expires_what_the_lmdb_cleanup_drops(data, table, lifetimes):
    # The expiry that wiring gives each Redis table, against the rule of
    # the LMDB cleanup (Cleaner._doomed) for the same table.
    from greylist.stores import cleanup
    from greylist.stores.memory import MemoryStore
    from greylist.wiring import redis_table
    cfg = Config(database="redis:unix:/nonexistent/redis.sock", retry_window_s=lifetimes[0],
                 max_age_s=lifetimes[1], correspondent_lifetime_s=lifetimes[2])
    store = redis_table(cfg, table)  # no connection is made until it is used
    value = data.draw(TABLE_VALUES[table])
    at = store.expire_at(value)
    number = {"db": cleanup.DATABASE, "clients": cleanup.CLIENT_TABLE,
              "correspondents": cleanup.CORRESPONDENT_TABLE,
              "postscreen": cleanup.POSTSCREEN_TABLE}[table]
    cleaner = cleanup.Cleaner(MemoryStore(), MemoryStore(), cfg, None,
                              correspondents=MemoryStore(), postscreen=MemoryStore())
    if at is None:
        nows = [data.draw(st.integers(0, 2 ** 42))]
    else:
        nows = [at - 1, at, at + 1, data.draw(st.integers(0, 2 ** 42))]
    for now in nows:
        if now >= 0:
            assert cleaner._doomed(number, value, now) == (at is not None and now >= at), now


@pytest.mark.parametrize("scripting", [True, False], ids=["script", "watch"])
def test_records_written_through_redisstore_expire_by_ttl_and_manual_ones_never(
        server, scripting):
    # Both ways of writing: the script, and WATCH/MULTI/EXEC where
    # scripts are refused.
    from greylist.wiring import redis_table
    cfg = Config(database=server.unix_url, retry_window_s=3600, max_age_s=7 * 86400,
                 correspondent_lifetime_s=30 * 86400)
    now = int(time.time())
    db = redis_table(cfg, "db")
    db.connection.scripting = scripting
    written = {
        b"192.0.2/a@example.org/b@example.net": records.Record(now - 60, now - 60, 1,
                                                                records.PENDING),
        b"192.0.2/a@example.org": records.Record(now - 100, now - 10, 2, records.SENDER),
        b"192.0.2": records.Record(now, now, 1, records.MANUAL),
    }
    for key, record in written.items():
        db.put(key, records.encode(record))
    clients = redis_table(cfg, "clients")
    clients.connection.scripting = scripting
    clients.put(b"192.0.2.7", b"%d" % (now - 5))
    screened = redis_table(cfg, "postscreen")
    screened.connection.scripting = scripting
    screened.put(b"192.0.2.8", MANUAL_PERMIT)
    screened.put(b"192.0.2.9", b"permit %d" % now)
    client = server.client()
    try:
        for key, record in written.items():
            ttl = client.ttl(db.stored(key))
            at = expire_at(record, cfg)
            if at is None:
                assert ttl == -1, key
            else:
                assert abs(ttl - (at - now)) <= 2, (key, ttl, at - now)
        assert abs(client.ttl(clients.stored(b"192.0.2.7")) - (cfg.max_age_s + 1 - 5)) <= 2
        assert client.ttl(screened.stored(b"192.0.2.8")) == -1
        assert abs(client.ttl(screened.stored(b"192.0.2.9")) - (cfg.max_age_s + 1)) <= 2
        # The key layout of the module description: greylist:TABLE:{TAG}KEY.
        name = db.stored(b"192.0.2")
        assert name.startswith(b"greylist:db:{") and name.endswith(b"}192.0.2")
        assert client.get(name) == records.encode(written[b"192.0.2"])
    finally:
        client.close()
        db.close()


def test_a_record_whose_lifetime_has_passed_is_not_kept(server):
    # A record written with a past expiry (a passed record refreshed late,
    # an import of an old record) is gone at once, as cleanup would drop it.
    from greylist.wiring import redis_table
    cfg = Config(database=server.unix_url, retry_window_s=10)
    db = redis_table(cfg, "db")
    now = int(time.time())
    db.put(b"old", records.encode(records.Record(now - 100, now - 100, 1, records.PENDING)))
    assert db.get(b"old") is None and db.info()["entries"] == 0
    db.close()


def increment_in_threads(store, each: int, tolerated=()) -> tuple[int, int]:
    """Eight threads increment the counter "n" each times at once through
    update_many; returns (increments that returned, those that raised one
    of tolerated). Fails on any other error and on a thread still running
    after 60 s."""
    import threading
    done, failed, errors = [], [], []
    start = threading.Barrier(8, timeout=30)

    def worker():
        try:
            start.wait()
            for _ in range(each):
                try:
                    store.update_many([b"n"], lambda olds: (
                        [b"%d" % (int(olds[0] or b"0") + 1)], None))
                    done.append(1)
                except tolerated:
                    failed.append(1)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads) and errors == []
    return len(done), len(failed)


@pytest.mark.parametrize("scripting", [True, False], ids=["script", "watch"])
def test_concurrent_updates_lose_nothing_even_when_they_give_up(server, scripting):
    # Atomicity of the compare-and-set (the script, and WATCH/MULTI/EXEC
    # where scripts are refused): every increment that returned counted,
    # and each failed one raised (see the contract's xfail: they give up).
    from greylist.stores.base import StoreError
    from greylist.stores.redisstore import Connection, RedisStore
    store = RedisStore(Connection(server.unix_url, timeout_s=5.0), "db")
    store.connection.scripting = scripting
    done, failed = increment_in_threads(store, 40, StoreError)
    assert done + failed == 8 * 40
    assert store.get(b"n") == b"%d" % done
    store.close()


def commands_run(server) -> dict[str, int]:
    """Calls of each command so far (INFO commandstats)."""
    admin = server.client()
    try:
        return {name[len("cmdstat_"):]: stats["calls"]
                for name, stats in admin.info("commandstats").items()}
    finally:
        admin.close()


@pytest.mark.parametrize("scripting", [True, False], ids=["script", "watch"])
def test_a_write_on_a_stale_snapshot_is_refused_and_decided_again(server, scripting):
    # The change first runs on the values of the store's last read; the
    # compare-and-set must refuse its write when another host (another
    # connection) changed a key since, and the change runs again on the
    # current values. Trusting the snapshot would overwrite "theirs".
    from greylist.stores.redisstore import Connection, RedisStore
    mine = RedisStore(Connection(server.unix_url, timeout_s=2.0), "db")
    mine.connection.scripting = scripting
    theirs = RedisStore(Connection(server.unix_url, timeout_s=2.0), "db")
    runs = []

    def change(olds):
        runs.append(list(olds))
        return ([b"mine", b"mine"] if olds[0] is None else [None, None]), olds[0]
    try:
        assert mine.get_many([b"t", b"t2"]) == [None, None]
        theirs.put(b"t", b"theirs")
        assert mine.update_many([b"t", b"t2"], change) == b"theirs"
        assert runs == [[None, None], [b"theirs", None]]
        assert theirs.get_many([b"t", b"t2"]) == [b"theirs", None]
        # A key that only was read counts too: t2 changed, t did not.
        runs.clear()
        mine.delete(b"t")
        assert mine.get_many([b"t", b"t2"]) == [None, None]
        theirs.put(b"t2", b"other")
        assert mine.update_many([b"t", b"t2"], lambda olds: (
            runs.append(list(olds)) or [b"mine", None], None)) is None
        assert runs == [[None, None], [None, b"other"]]
        assert theirs.get_many([b"t", b"t2"]) == [b"mine", b"other"]
        # An error raised on the snapshot must hold on the current values
        # too (greylistctl's restore reads, then updates): "t3" exists now.
        assert mine.get_many([b"t3"]) == [None]
        theirs.put(b"t3", b"theirs")

        def needs_an_entry(olds):
            if olds[0] is None:
                raise KeyError("no such entry")
            return [None], olds[0]
        assert mine.update_many([b"t3"], needs_an_entry) == b"theirs"
    finally:
        mine.close()
        theirs.close()


def test_refused_scripts_are_told_once_and_writes_go_on(server):
    # An ACL without EVALSHA and EVAL: eight threads on one connection
    # write through WATCH and MULTI/EXEC, lose nothing, and the
    # administrator is told once; the log line quotes no key or value.
    from greylist.stores.redisstore import Connection, RedisStore, describe
    import redis
    notices = []
    with acl_user(server, "noscript", "~greylist:*", "+@all", "-evalsha", "-eval") as secret:
        store = RedisStore(Connection(server.unix_url, timeout_s=5.0, password_file=secret,
                                      notice=notices.append), "db")
        try:
            assert increment_in_threads(store, 10) == (80, 0)
            assert store.get(b"n") == b"80"
        finally:
            store.close()
    assert len(notices) == 1 and "scripts refused" in notices[0], notices
    assert "NOPERM" in notices[0] and "greylist:" not in notices[0], notices
    # A renamed command's error quotes its first arguments: not logged.
    text = describe(redis.exceptions.ResponseError(
        "unknown command 'EVALSHA', with args beginning with: 'f00' '1' "
        "'greylist:db:{0a1b2c3d}198.51.100/a@example.org/b@example.net' "))
    assert "unknown command 'EVALSHA'" in text and "greylist:" not in text, text


def test_a_new_triple_is_two_round_trips_and_survives_a_script_flush(server):
    # run_plan of a change that writes: the snapshot's MGET, then one
    # EVALSHA, nothing else; after SCRIPT FLUSH (a restarted or new
    # server) the script is loaded again by EVAL, and the write happens.
    from greylist.stores.base import run_plan
    from greylist.stores.redisstore import Connection, RedisStore
    store = RedisStore(Connection(server.unix_url, timeout_s=2.0), "db")

    def change(olds):
        return [b"1:%d" % i if old is None else None for i, old in enumerate(olds)], "done"
    try:
        store.get(b"warm")          # connect: HELLO and the rest of the set-up
        store.update_many([b"warm"], lambda olds: ([b"x"], None))   # the script loaded
        before = commands_run(server)
        assert run_plan(store, [b"g/a", b"g/b", None, b"p"], change) == "done"
        after = commands_run(server)
        ran = {name: after[name] - before.get(name, 0) for name in after
               if after[name] != before.get(name, 0)
               and name not in ("info", "hello", "client")}  # the counting itself
        assert ran == {"mget": 1, "evalsha": 1, "get": 3, "set": 3}, ran  # GET, SET in Lua
        assert store.get_many([b"g/a", b"g/b", b"p"]) == [b"1:0", b"1:1", b"1:3"]
        admin = server.client()
        try:
            admin.script_flush()
        finally:
            admin.close()
        assert run_plan(store, [b"g/c"], change) == "done"
        assert store.get(b"g/c") == b"1:0"
        assert commands_run(server)["eval"] >= 1
    finally:
        store.close()


BATCH_KEYS = st.sampled_from([b"a", b"b", b"c/x", None])


def _change(kind: str, width: int):
    """A pure change of width values: kinds that write, read only, raise,
    or write an empty value (a ValueError for that op alone)."""
    def change(olds):
        if kind == "raise":
            raise KeyError("refused")
        if kind == "read":
            return [None] * width, tuple(olds)
        if kind == "empty":
            return [b""] * width, None
        return [(old or b"") + b"+" for old in olds], tuple(olds)
    return change


@hsettings(max_examples=60, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.lists(BATCH_KEYS, min_size=1, max_size=3),
                              st.sampled_from(["write", "write", "read", "raise", "empty"])),
                    max_size=6),
       reads=st.lists(st.lists(BATCH_KEYS, max_size=3), max_size=4))
@pytest.mark.parametrize("scripting", [True, False], ids=["script", "watch"])
def test_update_batch_and_get_many_batch_do_what_one_by_one_would(server, ops, reads,
                                                                   scripting):
    # RedisStore's one-transaction update_batch and one-round-trip
    # get_many_batch against Store's own (one update_many, one get_many
    # at a time) on the reference MemoryStore.
    from greylist.stores.memory import MemoryStore
    from greylist.stores.redisstore import Connection, RedisStore
    admin = server.client()
    try:
        admin.flushall()
    finally:
        admin.close()
    redis_store = RedisStore(Connection(server.unix_url, timeout_s=2.0), "db")
    redis_store.connection.scripting = scripting
    memory = MemoryStore()
    try:
        for store in (redis_store, memory):
            store.put(b"a", b"old")
        if reads:   # a snapshot first, as greylistd's turn reads before it writes
            redis_store.get_many_batch(reads)
        batch = [(keys, _change(kind, len(keys))) for keys, kind in ops]
        got = redis_store.update_batch(batch)
        want = memory.update_batch(batch)
        assert [type(r) if isinstance(r, Exception) else r for r in got] == \
            [type(r) if isinstance(r, Exception) else r for r in want]
        assert dict(redis_store.items()) == dict(memory.items())
        assert redis_store.get_many_batch(reads) == [memory.get_many(keys) for keys in reads]
    finally:
        redis_store.close()


def test_reading_nothing_does_not_even_connect(server):
    from greylist.stores.redisstore import Connection
    admin = server.client()
    try:
        before = admin.info("clients")["connected_clients"]
        connection = Connection(server.unix_url, timeout_s=2.0)
        try:
            assert connection.reads([]) == []
            assert admin.info("clients")["connected_clients"] == before
        finally:
            connection.close()
    finally:
        admin.close()


@contextlib.contextmanager
def acl_user(server, name: str, *rules: str):
    """An ACL user NAME (password NAME-pw) of server with rules, for the
    block; yields its password file. The user and the file are removed
    after."""
    admin = server.client()
    secret = pathlib.Path(tempfile.mkdtemp(prefix="gl-redis-pw-", dir="/tmp"))
    try:
        admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">%s-pw" % name, *rules)
        (secret / "pw").write_text("%s %s-pw\n" % (name, name))
        os.chmod(secret / "pw", 0o600)
        yield str(secret / "pw")
    finally:
        shutil.rmtree(secret, ignore_errors=True)
        admin.execute_command("ACL", "DELUSER", name)
        admin.close()


def test_a_read_that_fails_midway_leaves_no_reply_behind(server):
    # Connection.reads() keeps one connection and sends a turn's MGETs in
    # one write. When the first reply is an error (NOPERM: an ACL user
    # that may read only some keys), the second is still unread on that
    # connection: it must be dropped, or the next read would be answered
    # with the stale reply (the value of "a" where "b" was asked for).
    from greylist.stores.base import StoreError
    from greylist.stores.redisstore import Connection, RedisStore
    owner = RedisStore(Connection(server.unix_url, timeout_s=2.0), "db")
    owner.put(b"a", b"value-a")
    owner.put(b"b", b"value-b")
    owner.close()
    with acl_user(server, "partial", "~greylist:db:{*", "+mget", "+set", "+ping",
                  "+hello", "+client") as secret:
        store = RedisStore(Connection(server.unix_url, timeout_s=2.0, password_file=secret),
                           "db")
        other = RedisStore(store.connection, "other")   # not readable by "partial"
        try:
            assert store.get_many([b"a"]) == [b"value-a"]
            with pytest.raises(StoreError, match="NOPERM"):
                store.connection.reads([("MGET", other.stored(b"x")),
                                        ("MGET", store.stored(b"a"))])
            time.sleep(BACKOFF_WAIT_S)   # the store's back-off after a failure
            assert store.get_many([b"b"]) == [b"value-b"]
            assert store.get_many_batch([[b"a"], [b"b", None]]) == \
                [[b"value-a"], [b"value-b", None]]
        finally:
            store.close()


# ----------------------------------------------------------------------
# Two mail hosts on one Redis.

def test_two_mail_hosts_share_the_greylist(server, short_dir, greylist):
    host1 = write_settings(short_dir / "host1", "host1", server.unix_url)
    host2 = write_settings(short_dir / "host2", "host2", server.tcp_url)
    first, second = greylist(host1), greylist(host2)
    action, _ = first.ask("203.0.113.5", "carol@example.org")
    assert deferred(action), action
    # Host 2 knows the triple: still too early there too.
    action, _ = second.ask("203.0.113.5", "carol@example.org")
    assert deferred(action), action
    time.sleep(DELAY_S + 0.2)
    action, took = second.ask("203.0.113.5", "carol@example.org")
    assert action == "DUNNO" and took < REPLY_BOUND_S
    assert "reason=delay-passed" in log_of(host2)
    assert "reason=delay-passed" not in log_of(host1)
    # And host 1 sees the pass that host 2 wrote.
    action, _ = first.ask("203.0.113.5", "carol@example.org")
    assert action == "DUNNO"
    assert "reason=known" in log_of(host1) or "reason=awl-sender" in log_of(host1)
    assert warnings_of(host1) == warnings_of(host2) == []


def test_in_privacy_mode_a_host_without_the_secret_does_not_make_its_own(
        server, short_dir, greylist):
    # Found in review: a second host whose greylist_secret_file had not been
    # copied yet made a secret of its own, silently: it hashed every triple
    # differently, shared nothing with the first host and deferred again
    # every sender that the first had passed.
    from greylist.stores.privacy import load_secret
    secret = short_dir / "greylist.secret"
    load_secret(str(secret))   # as greylistctl makes it (as the greylist user)
    host1 = write_settings(short_dir / "host1", "host1", server.unix_url,
                           "greylist_privacy = yes\ngreylist_secret_file = %s\n" % secret)
    missing_secret = short_dir / "host2" / "greylist.secret"
    host2 = write_settings(short_dir / "host2", "host2", server.unix_url,
                           "greylist_privacy = yes\ngreylist_secret_file = %s\n"
                           % missing_secret)
    first, second = greylist(host1), greylist(host2)
    assert deferred(first.ask("203.0.113.5", "carol@example.org")[0])
    time.sleep(DELAY_S + 0.2)
    assert first.ask("203.0.113.5", "carol@example.org")[0] == "DUNNO"
    # greylist --check says so; host 2 fails open, says why, and makes no
    # secret.
    from greylist.check import problems_of
    found = problems_of(load(host2, {}))
    assert len(found) == 1 and "greylist_secret_file %s does not exist" % missing_secret \
        in found[0], found
    assert problems_of(load(host1, {})) == []
    action, _ = second.ask("203.0.113.5", "carol@example.org")
    assert action == "DUNNO", action
    assert not missing_secret.exists()
    found = warnings_of(host2)
    assert len(found) == 1 and "does not exist" in found[0], found
    # With the secret copied, a new process of host 2 shares host 1's records.
    shutil.copy(secret, missing_secret)
    os.chmod(missing_secret, 0o600)
    second.close()
    second = greylist(host2)
    action, _ = second.ask("203.0.113.5", "carol@example.org")
    assert action == "DUNNO" and "reason=database-failure" not in log_of(host2).splitlines()[-1]


# ----------------------------------------------------------------------
# Faults.

def test_redis_killed_fails_open_with_one_warning_and_recovers_on_restart(
        own_server, short_dir, greylist):
    settings = write_settings(short_dir, "gl", own_server.unix_url)
    process = greylist(settings)
    assert deferred(process.warm())
    pid = process.proc.pid
    own_server.kill()
    began = time.monotonic()
    answers = []
    for attempt in range(60):
        if time.monotonic() - began > 2.5:
            break
        answers.append(process.ask("198.51.100.77", "down%d@example.org" % attempt))
        time.sleep(0.05)
    assert len(answers) >= 10
    assert all(action == "DUNNO" for action, _ in answers), answers
    assert max(took for _, took in answers) < REPLY_BOUND_S, answers
    found = warnings_of(settings)
    assert len(found) == 1, found
    assert "redis" in found[0] and "answering DUNNO" in found[0], found
    own_server.restart()
    # Without a restart of greylist: a new triple is greylisted again once
    # the back-off lets it try (at most a few seconds after a short outage).
    sender, attempts, took = until_deferred(process, "back", within_s=15)
    assert took < 10, (attempts, took)
    assert process.proc.pid == pid and process.proc.poll() is None
    assert len(warnings_of(settings)) == 1


def test_redis_paused_answers_within_the_timeout(own_server, short_dir, greylist):
    settings = write_settings(short_dir, "gl", own_server.unix_url)
    process = greylist(settings)
    assert deferred(process.warm())
    own_server.pause()
    try:
        answers = []
        began = time.monotonic()
        for attempt in range(40):
            if time.monotonic() - began > 3:
                break
            answers.append(process.ask("198.51.100.88", "paused%d@example.org" % attempt,
                                       timeout=5))
        assert len(answers) >= 5
        assert all(action == "DUNNO" for action, _ in answers), answers
        assert max(took for _, took in answers) < REPLY_BOUND_S, answers
        found = warnings_of(settings)
        assert len(found) == 1 and "imeout" in found[0], found
    finally:
        own_server.resume()
    until_deferred(process, "resumed", within_s=15)


@pytest.fixture
def sentinels(short_dir):
    setup = started_sentinels(short_dir / "sentinel")
    yield setup
    setup.stop()


def started_sentinels(directory: pathlib.Path, **options) -> Sentinels:
    """A started Sentinels(directory, **options), or require()."""
    from conftest import require
    require(missing())
    setup = Sentinels(directory, **options)
    try:
        setup.start()
    except ServerError as exc:
        require("the Sentinel setup does not start: %s" % exc)
    return setup


def test_a_sentinel_failover_is_followed(sentinels, short_dir, greylist):
    # In database 2 of the master (MASTERNAME/DB), and of the new one.
    settings = write_settings(short_dir, "gl", sentinels.url + "/2")
    process = greylist(settings)
    assert deferred(process.warm())
    old = sentinels.master_port()
    assert old == sentinels.master.port
    killed = time.monotonic()
    sentinels.master.kill()
    # Replies stay bounded during the failover; then writes work again: a
    # new triple is deferred, and passes after the delay.
    sender, attempts, _ = until_deferred(process, "failover", within_s=30)
    assert time.monotonic() - killed < 30
    assert sentinels.master_port() == sentinels.replica.port
    time.sleep(DELAY_S + 0.2)
    client = "198.51.100.%d" % ((attempts - 1) % 250 + 1)
    action, took = process.ask(client, sender)
    assert action == "DUNNO" and took < REPLY_BOUND_S, action
    assert "reason=delay-passed" in log_of(settings)
    replica = sentinels.replica.client(tcp=True, db=2)
    try:
        assert replica.info("replication")["role"] == "master"
        assert replica.dbsize() >= 2
    finally:
        replica.close()
    zero = sentinels.replica.client(tcp=True)
    try:
        assert zero.dbsize() == 0
    finally:
        zero.close()


def test_one_sentinel_that_does_not_answer_costs_one_timeout_not_seconds(sentinels):
    # Found in review: the sentinels' connections had redis-py's default
    # retries (ten, with pauses up to 1 s): a master lookup with one
    # sentinel stopped took 3 to 15 s, in every new spawn(8) process and
    # at every reconnect, and greylistd's store thread with it.
    from greylist.stores.redisstore import Connection, RedisStore
    first = sentinels.sentinels[0]
    first.pause()
    try:
        store = RedisStore(Connection(sentinels.url, timeout_s=TIMEOUT_MS / 1000), "db")
        began = time.monotonic()
        assert store.get_many([b"k"]) == [None]   # the next sentinel answered
        took = time.monotonic() - began
        store.close()
    finally:
        first.resume()
    assert took < TIMEOUT_MS / 1000 + REPLY_BOUND_S, took


def test_sentinels_that_require_a_login_get_the_sentinel_password_file(short_dir, greylist):
    # Sentinels secured with requirepass (sentinel.conf), in front of a
    # master with a password of its own: each login from its own file.
    setup = started_sentinels(short_dir / "sentinel", password="master-password",
                              sentinel_password="sentinel-password")
    try:
        master = password_file(short_dir, "master-password")
        sentinel = password_file(short_dir, "sentinel-password")
        settings = write_settings(
            short_dir / "both", "gl", setup.url,
            "greylist_redis_password_file = %s\n"
            "greylist_redis_sentinel_password_file = %s\n" % (master, sentinel))
        process = greylist(settings)
        assert deferred(process.ask("198.51.100.9", "a@example.org", timeout=20)[0])
        assert warnings_of(settings) == []
        status, out = ctl(settings, "stats")
        assert status == 0 and "\n  pending: 1\n" in out, out
        # Without the sentinels' login: no master is found; the answer
        # fails open at once and the warning says why.
        settings = write_settings(short_dir / "master-only", "gl", setup.url,
                                  "greylist_redis_password_file = %s\n" % master)
        process = greylist(settings)
        action, took = process.ask("198.51.100.9", "b@example.org", timeout=20)
        assert action == "DUNNO"
        found = warnings_of(settings)
        assert len(found) == 1 and "answering DUNNO" in found[0], found
        # Each sentinel by its address, and the setting that is missing.
        for each in setup.sentinels:
            assert "sentinel 127.0.0.1:%d auth:AuthenticationError" % each.port in found[0], found
        assert "greylist_redis_sentinel_password_file" in found[0], found
        assert "ConnectionPool" not in found[0], found
        # A sentinel password file that others may read is refused, as the
        # master's is, and named.
        loose = password_file(short_dir, "sentinel-password", 0o644)
        settings = write_settings(
            short_dir / "loose", "gl", setup.url,
            "greylist_redis_password_file = %s\n"
            "greylist_redis_sentinel_password_file = %s\n" % (master, loose))
        status, out = ctl(settings, "stats")
        assert status == 1, out
        assert "greylist_redis_sentinel_password_file %s: readable by others" % loose in out, out
    finally:
        setup.stop()


@pytest.fixture
def tls_server(short_dir):
    from conftest import require
    require(missing())
    try:
        certs = make_certificates(short_dir / "certs")
    except (ServerError, OSError, subprocess.TimeoutExpired) as exc:
        require("openssl cannot make the test certificates: %s" % exc)
    server = RedisServer(short_dir / "redis", tls=certs)
    try:
        server.start()
    except ServerError as exc:
        require("redis-server does not start with TLS: %s" % exc)
    yield server
    server.stop()


def test_rediss_checks_the_server_certificate_and_its_name_and_sends_the_client_one(
        tls_server, short_dir, greylist):
    certs = tls_server.tls
    client = ("greylist_redis_tls_cert_file = %s\ngreylist_redis_tls_key_file = %s\n"
              % (certs["client.crt"], certs["client.key"]))
    ca = "greylist_redis_tls_ca_file = %s\n" % certs["ca.crt"]
    settings = write_settings(short_dir / "tls", "gl", tls_server.tls_url, ca + client)
    process = greylist(settings)
    assert deferred(process.ask("198.51.100.9", "a@example.org", timeout=20)[0])
    assert warnings_of(settings) == []
    status, out = ctl(settings, "stats")
    assert status == 0 and "\n  pending: 1\n" in out, out
    admin = tls_server.client()
    try:
        assert admin.dbsize() >= 1   # written over TLS, read on the plain socket
    finally:
        admin.close()

    def refused(name: str, url: str, extra: str, why: str) -> None:
        settings = write_settings(short_dir / name, "gl", url, extra)
        action, took = greylist(settings).ask("198.51.100.9", name + "@example.org",
                                              timeout=20)
        assert action == "DUNNO" and took < REPLY_BOUND_S, (name, action, took)
        found = warnings_of(settings)
        assert len(found) == 1 and why in found[0] and "answering DUNNO" in found[0], found

    # A server whose certificate no trusted CA signed (the system's CAs
    # do not know the test's), and one that does not carry the name
    # connected to: both refused.
    refused("unknown-ca", tls_server.tls_url, client, "certificate verify failed")
    refused("other-name", tls_server.tls_url.replace("127.0.0.1", "localhost"), ca + client,
            "Hostname mismatch")
    # No client certificate for a server that wants one (TLS 1.3: the
    # server's alert comes at the first read or write, whose errors
    # differ).
    refused("no-client", tls_server.tls_url, ca, "ConnectionError")
    # A client key that others may read is not used.
    loose = short_dir / "loose.key"
    loose.write_bytes(pathlib.Path(certs["client.key"]).read_bytes())
    os.chmod(loose, 0o644)
    refused("loose-key", tls_server.tls_url,
            ca + "greylist_redis_tls_cert_file = %s\ngreylist_redis_tls_key_file = %s\n"
            % (certs["client.crt"], loose),
            "greylist_redis_tls_key_file %s: readable by others" % loose)


def test_rediss_sentinel_runs_tls_to_the_sentinels_and_the_master_through_a_failover(
        short_dir, greylist):
    # Sentinels, a master and a replica that serve TLS only to clients
    # with a certificate (the two servers keep a plain port for the
    # test's own checks), and replicate and monitor over TLS.
    from conftest import require
    from greylist.check import redis_problems
    require(missing())
    try:
        certs = make_certificates(short_dir / "certs")
    except (ServerError, OSError, subprocess.TimeoutExpired) as exc:
        require("openssl cannot make the test certificates: %s" % exc)
    setup = started_sentinels(short_dir / "sentinel", tls=certs)
    try:
        assert setup.url.startswith("rediss-sentinel://")
        client = ("greylist_redis_tls_cert_file = %s\ngreylist_redis_tls_key_file = %s\n"
                  % (certs["client.crt"], certs["client.key"]))
        ca = "greylist_redis_tls_ca_file = %s\n" % certs["ca.crt"]
        settings = write_settings(short_dir / "tls", "gl", setup.url, ca + client)
        process = greylist(settings)
        assert deferred(process.ask("198.51.100.9", "a@example.org", timeout=20)[0])
        assert warnings_of(settings) == []
        status, out = ctl(settings, "stats")
        assert status == 0 and "\n  pending: 1\n" in out, out
        # The master goes; the replica that the sentinels promote is
        # reached over TLS too, and its certificate checked.
        old = setup.master_port()
        assert old == setup.master.tls_port
        setup.master.kill()
        sender, attempts, _ = until_deferred(process, "failover", within_s=30)
        assert setup.master_port() == setup.replica.tls_port
        # (Any warning is of answers that failed open during the failover.)
        assert all("answering DUNNO" in each for each in warnings_of(settings))
        replica = setup.replica.client(tcp=True)
        try:
            assert replica.info("replication")["role"] == "master"
            assert replica.dbsize() >= 2
        finally:
            replica.close()
        # Without the test's CA no sentinel is trusted: the answer fails
        # open at once, and --check says why for each sentinel (redis-py's
        # own error keeps only "network:ConnectionError").
        settings = write_settings(short_dir / "no-ca", "gl", setup.url, client)
        action, took = greylist(settings).ask("198.51.100.9", "b@example.org", timeout=20)
        assert action == "DUNNO" and took < REPLY_BOUND_S, (action, took)
        found = warnings_of(settings)
        assert len(found) == 1 and "No master found" in found[0], found
        problems, notes = redis_problems(load(settings, {}))
        assert len(problems) == 1 and "MasterNotFoundError" in problems[0], problems
        assert len(notes) == 3, notes
        for each, note in zip(setup.sentinels, notes):
            assert note.startswith("sentinel 127.0.0.1:%d: " % each.port), note
            assert "certificate verify failed" in note, note
    finally:
        setup.stop()


def test_the_tls_ca_file_adds_to_the_systems_cas(tls_server, monkeypatch):
    # Found in review: the documentation said that the server's
    # certificate must be signed by a CA of greylist_redis_tls_ca_file;
    # redis-py loads the file into a context that already trusts the
    # system's CAs (ssl.create_default_context()), so either one will do.
    # The test's CA stands for a system CA (SSL_CERT_FILE, which OpenSSL
    # reads at each handshake), and the CA file names another.
    from greylist.stores.redisstore import Connection, RedisStore, Tls
    certs = tls_server.tls
    monkeypatch.setenv("SSL_CERT_FILE", certs["ca.crt"])
    connection = Connection(tls_server.tls_url, 2.0, tls=Tls(
        certs["client.crt"], certs["client.crt"], certs["client.key"]))
    try:
        assert RedisStore(connection, "db").get_many([b"k"]) == [None]
    finally:
        connection.close()


def test_an_encrypted_client_key_is_refused_and_no_pass_phrase_is_asked(
        tls_server, short_dir, greylist):
    # Found in review: OpenSSL asked for an encrypted key's pass phrase on
    # the terminal, or without one on standard input (greylist's: under
    # spawn(8) the policy socket), and waited there.
    certs = tls_server.tls
    key = str(short_dir / "encrypted.key")
    done = subprocess.run(["openssl", "pkey", "-in", certs["client.key"], "-aes128",
                           "-passout", "pass:secret-phrase", "-out", key],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    os.chmod(key, 0o600)
    extra = ("greylist_redis_tls_ca_file = %s\ngreylist_redis_tls_cert_file = %s\n"
             "greylist_redis_tls_key_file = %s\n" % (certs["ca.crt"], certs["client.crt"], key))
    settings = write_settings(short_dir / "encrypted", "gl", tls_server.tls_url, extra)
    action, took = greylist(settings).ask("198.51.100.9", "a@example.org", timeout=20)
    assert action == "DUNNO" and took < REPLY_BOUND_S, (action, took)
    found = warnings_of(settings)
    why = "greylist_redis_tls_key_file %s: encrypted" % key
    assert len(found) == 1 and why in found[0], found
    # The pass phrase is never asked for, even where the file check does
    # not see the encryption.
    from greylist.stores.redisstore import Connection, Tls
    assert Connection(tls_server.tls_url, tls=Tls())._tls_options()["ssl_password"] == ""


def test_check_connects_to_rediss_with_the_tls_settings(tls_server, short_dir):
    # Found in review: no test ran redis_problems() (--check) over TLS, so
    # a check that connected without the TLS settings went unseen.
    from greylist.check import redis_problems
    certs = tls_server.tls
    client = ("greylist_redis_tls_cert_file = %s\ngreylist_redis_tls_key_file = %s\n"
              % (certs["client.crt"], certs["client.key"]))

    def checked(name: str, extra: str) -> tuple[list[str], list[str]]:
        return redis_problems(load(write_settings(short_dir / name, "gl", tls_server.tls_url,
                                                  extra), {}))
    assert checked("ok", "greylist_redis_tls_ca_file = %s\n" % certs["ca.crt"] + client) \
        == ([], [])
    problems, _ = checked("unknown-ca", client)
    assert len(problems) == 1 and "certificate verify failed" in problems[0], problems


def test_a_missing_or_wrong_tls_file_is_named_in_the_warning(tls_server, short_dir, greylist):
    # Found in review: a CA or client certificate file that is missing was
    # logged as redis-py's "Error 2 connecting to 127.0.0.1:PORT. No such
    # file or directory.", a network failure, naming neither file nor
    # setting.
    certs = tls_server.tls
    client = ("greylist_redis_tls_cert_file = %s\ngreylist_redis_tls_key_file = %s\n"
              % (certs["client.crt"], certs["client.key"]))
    ca = "greylist_redis_tls_ca_file = %s\n" % certs["ca.crt"]
    gone = str(short_dir / "gone.crt")
    notes = short_dir / "notes.txt"
    notes.write_text("not a certificate\n")
    private_notes = short_dir / "notes.key"
    private_notes.write_text("not a key\n")
    os.chmod(private_notes, 0o600)
    for name, extra, why in (
            ("no-ca", "greylist_redis_tls_ca_file = %s\n" % gone + client,
             "greylist_redis_tls_ca_file %s: No such file or directory" % gone),
            ("no-cert", ca + "greylist_redis_tls_cert_file = %s\n"
             "greylist_redis_tls_key_file = %s\n" % (gone, certs["client.key"]),
             "greylist_redis_tls_cert_file %s: No such file or directory" % gone),
            ("ca-directory", "greylist_redis_tls_ca_file = %s\n" % short_dir + client,
             "greylist_redis_tls_ca_file %s: not a regular file" % short_dir),
            # Files that are there but hold the wrong thing: before, redis-py's
            # "[X509: NO_CERTIFICATE_OR_CRL_FOUND]" or "[X509:
            # KEY_VALUES_MISMATCH]", naming no file.
            ("ca-not-pem", "greylist_redis_tls_ca_file = %s\n" % notes + client,
             "greylist_redis_tls_ca_file %s: no PEM certificate in it" % notes),
            ("cert-not-pem", ca + "greylist_redis_tls_cert_file = %s\n"
             "greylist_redis_tls_key_file = %s\n" % (notes, certs["client.key"]),
             "greylist_redis_tls_cert_file %s: no PEM certificate in it" % notes),
            ("key-not-pem", ca + "greylist_redis_tls_cert_file = %s\n"
             "greylist_redis_tls_key_file = %s\n" % (certs["client.crt"], private_notes),
             "greylist_redis_tls_key_file %s: no PEM private key in it" % private_notes),
            ("other-key", ca + "greylist_redis_tls_cert_file = %s\n"
             "greylist_redis_tls_key_file = %s\n" % (certs["client.crt"], certs["server.key"]),
             "greylist_redis_tls_key_file %s: not the key of greylist_redis_tls_cert_file %s"
             % (certs["server.key"], certs["client.crt"]))):
        settings = write_settings(short_dir / name, "gl", tls_server.tls_url, extra)
        action, took = greylist(settings).ask("198.51.100.9", name + "@example.org",
                                              timeout=20)
        assert action == "DUNNO" and took < REPLY_BOUND_S, (name, action, took)
        found = warnings_of(settings)
        assert len(found) == 1 and why in found[0] and "answering DUNNO" in found[0], found
        assert "Traceback" not in log_of(settings)
        status, out = ctl(settings, "stats")
        assert status == 1 and why in out and "Traceback" not in out, out


def test_rediss_asks_redis_py_for_the_certificate_and_name_checks_itself(
        monkeypatch, tls_server):
    # Found in review: the test of a wrong host name passed without
    # ssl_check_hostname, since redis-py 6 and later check the name by
    # default; redis-py 5, which setup.cfg allows, does not. So what
    # greylist asks of every redis-py, as it asks, and what it makes of it.
    import ssl
    import redis
    from greylist.stores.redisstore import Connection, Tls
    asked = []
    real = redis.Redis
    monkeypatch.setattr(redis, "Redis", lambda **options: asked.append(options) or real(**options))
    ca = tls_server.tls["ca.crt"]
    connection = Connection("rediss://127.0.0.1:1/0", tls=Tls(ca_file=ca))
    try:
        pool = connection.client().connection_pool
        [options] = asked
        assert options["ssl"] is True and options["ssl_check_hostname"] is True, options
        assert options["ssl_cert_reqs"] in ("required", ssl.CERT_REQUIRED), options
        made = pool.connection_class(**pool.connection_kwargs)
        assert made.check_hostname is True and made.cert_reqs == ssl.CERT_REQUIRED
        assert made.ca_certs == ca
    finally:
        connection.close()


def test_a_client_certificate_without_its_key_is_a_settings_error(tmp_path):
    settings = tmp_path / "gl.cf"
    settings.write_text("greylist_database = rediss://127.0.0.1:6379/0\n"
                        "greylist_redis_tls_cert_file = /etc/greylist/client.crt\n")
    with pytest.raises(Exception) as refused:
        load(str(settings), {})
    assert "set both" in str(refused.value), refused.value


def test_a_tls_setting_without_rediss_is_a_settings_error(tmp_path):
    # Found in review: with redis://, a unix socket or Sentinel (which
    # greylist does not run over TLS) the TLS settings were ignored, and
    # the password and records crossed the network in clear.
    for database in ("redis://127.0.0.1:6379/0", "redis:unix:/run/redis/redis.sock",
                     "redis-sentinel://127.0.0.1:26379/mymaster"):
        settings = tmp_path / "gl.cf"
        settings.write_text("greylist_database = %s\n"
                            "greylist_redis_tls_ca_file = /etc/greylist/ca.crt\n" % database)
        with pytest.raises(Exception) as refused:
            load(str(settings), {})
        assert ("greylist_redis_tls_ca_file: only with a rediss:// or rediss-sentinel:// "
                "database" in str(refused.value)), refused.value
    # LMDB ignores every Redis setting, as before.
    settings.write_text("greylist_database = lmdb:%s/greylist\n"
                        "greylist_redis_tls_ca_file = /etc/greylist/ca.crt\n" % tmp_path)
    assert load(str(settings), {}).redis_tls_ca_file == "/etc/greylist/ca.crt"


def test_items_walks_the_table_page_by_page(server):
    # Found in review: items() (greylistctl dump, stats, whitelist list)
    # read the whole table into one list before it yielded the first pair.
    from greylist.stores.privacy import HashedKeys
    from greylist.stores.redisstore import Connection, RedisStore
    store = RedisStore(Connection(server.unix_url, timeout_s=5.0), "db")
    admin = server.client()
    try:
        names = [store.stored(b"c%d/s@example.org/r@example.net" % i) for i in range(20000)]
        for start in range(0, len(names), 5000):
            admin.mset({name: b"1:1:1:1:passed" for name in names[start:start + 5000]})
        admin.config_resetstat()
        walk = iter(store.items(batch=1000))
        next(walk)
        assert admin.info("commandstats")["cmdstat_mget"]["calls"] <= 2
        assert 1 + sum(1 for _ in walk) >= 20000
        # In privacy mode too: one SCAN of the table, not one per page.
        admin.config_resetstat()
        keyed = HashedKeys(store, "/nonexistent/secret")   # items() needs no hashing
        assert sum(1 for _ in keyed.items(1000)) >= 20000
        assert admin.info("commandstats")["cmdstat_scan"]["calls"] <= 3 * 20000 // 1000
    finally:
        admin.close()
        store.close()


def test_a_database_url_with_a_password_is_refused_without_the_password(tmp_path):
    # Found in review: redis://user:password@host was taken for a host
    # named "user:password@host", and the password was in every warning.
    from greylist.config import ConfigError
    # And (found in review since) a password with a "/" in it, or in a
    # query option as redis-py's URLs take it: the settings error quoted it.
    for url in ("redis://default:s3cret-pw@127.0.0.1:6379/0",
                "redis-sentinel://:s3cret-pw@127.0.0.1:26379/mymaster",
                "redis://default:s3cret-pw/x@127.0.0.1:6379/0",
                "redis://127.0.0.1:6379/0?password=s3cret-pw"):
        settings = tmp_path / "greylist.cf"
        settings.write_text("greylist_database = %s\n" % url)
        with pytest.raises(ConfigError) as refused:
            load(str(settings), {})
        assert "s3cret-pw" not in str(refused.value), refused.value
        assert "greylist_redis_password_file" in str(refused.value), refused.value


def test_a_sentinel_url_without_a_sentinel_is_a_settings_error(tmp_path):
    # Found in review: redis-sentinel:///mymaster was accepted, and every
    # request then failed open ("No master found") with no sentinel asked.
    from greylist.config import ConfigError
    settings = tmp_path / "greylist.cf"
    for url in ("redis-sentinel:///mymaster", "redis-sentinel://,/mymaster",
                "rediss-sentinel:///mymaster"):
        settings.write_text("greylist_database = %s\n" % url)
        with pytest.raises(ConfigError, match="at least one sentinel"):
            load(str(settings), {})


def test_rediss_sentinel_urls_are_sentinels_over_tls():
    from greylist.stores.redisstore import RedisError, parse_url
    assert parse_url("rediss-sentinel://127.0.0.1:26379,[::1]:26380/mymaster") == {
        "sentinels": [("127.0.0.1", 26379), ("::1", 26380)], "master": "mymaster",
        "db": 0, "tls": True}
    assert parse_url("redis-sentinel://127.0.0.1:26379/mymaster")["tls"] is False
    assert parse_url("redis-sentinel://127.0.0.1:26379/mymaster/3")["db"] == 3
    for url in ("redis-sentinel://127.0.0.1:26379/mymaster/x",
                "redis-sentinel://127.0.0.1:26379/mymaster/3/4",
                "redis-sentinel://127.0.0.1:26379//3"):
        with pytest.raises(RedisError):
            parse_url(url)


def test_a_server_that_answers_nonsense_is_a_store_failure_not_a_crash(short_dir):
    # Found in review: a server (or proxy) that answered redis-py 8's HELLO
    # with an array made redis-py raise AttributeError, which Connection
    # let through: greylist died with a traceback at its first request.
    import socket
    import threading
    from greylist.stores.base import StoreError
    from greylist.stores.redisstore import Connection, RedisStore
    path = str(short_dir / "nonsense.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen(4)
    listening.settimeout(1)

    def serve() -> None:
        try:
            while True:
                conn, _ = listening.accept()
                with conn:
                    conn.settimeout(2)
                    while conn.recv(4096):
                        conn.sendall(b"*1\r\n$4\r\nPONG\r\n")
        except OSError:
            pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    store = RedisStore(Connection("redis:unix:" + path, timeout_s=0.5), "db")
    try:
        try:
            store.get_many([b"k"])   # redis-py 5 to 7 send no HELLO
        except StoreError as exc:
            assert "redis redis:unix:" in str(exc)
            assert store.failing   # and the back-off holds
    finally:
        store.close()
        listening.close()
        thread.join(5)


def test_a_host_name_that_does_not_resolve_in_time_costs_one_timeout(server, monkeypatch):
    # Found in review: redis-py looks the host up with getaddrinfo, which
    # no socket timeout bounds: with a DNS server that did not answer,
    # each (re)connect cost the resolver's 10 s, not greylist_redis_timeout.
    import socket
    from greylist.stores.base import StoreError
    from greylist.stores.redisstore import Connection, RedisStore
    original = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "redis.slow.test":
            time.sleep(3)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == "redis.fast.test":
            host = "127.0.0.1"
        return original(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    slow = RedisStore(Connection("redis://redis.slow.test:%d/0" % server.port,
                                 timeout_s=TIMEOUT_MS / 1000), "db")
    began = time.monotonic()
    with pytest.raises(StoreError, match="looking up redis.slow.test"):
        slow.get_many([b"k"])
    assert time.monotonic() - began < TIMEOUT_MS / 1000 + REPLY_BOUND_S
    assert slow.failing
    slow.close()
    # A name that resolves is connected to by name, as before.
    fast = RedisStore(Connection("redis://redis.fast.test:%d/0" % server.port,
                                 timeout_s=TIMEOUT_MS / 1000), "db")
    try:
        fast.put(b"k", b"v")
        assert fast.get_many([b"k"]) == [b"v"]
    finally:
        fast.close()


def test_check_reads_the_server_version():
    from greylist.check import MIN_REDIS, _redis_version
    assert MIN_REDIS == (6, 2)   # SET EXAT
    assert _redis_version(b"# Server\r\nredis_version:7.0.15\r\nos:Linux\r\n") == (7, 0, 15)
    assert _redis_version(b"redis_version:6.0.16\r\n") < MIN_REDIS
    assert _redis_version(b"") is None and _redis_version("redis_version:x.y") is None
    assert _redis_version({"redis_version": "7.2.4", "valkey_version": "8.0.1"}) == (7, 2, 4)


def test_check_finds_the_version_of_a_real_server(server):
    from greylist.check import MIN_REDIS, _info_server, _redis_version
    from greylist.stores.redisstore import Connection
    connection = Connection(server.unix_url, 1.0)
    try:
        assert _redis_version(_info_server(connection)) >= MIN_REDIS
    finally:
        connection.close()


def password_file(directory: pathlib.Path, text: str, mode: int = 0o600) -> str:
    path = directory / ("password-%d" % len(list(directory.glob("password-*"))))
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


@pytest.fixture
def secured_server(short_dir):
    server = start_server(short_dir / "redis", args=["--requirepass", "right-password"])
    yield server
    server.stop()


def test_a_wrong_password_fails_open_and_names_the_error_the_right_one_works(
        secured_server, short_dir, greylist):
    wrong = password_file(short_dir, "wrong-password")
    settings = write_settings(short_dir / "wrong", "gl", secured_server.unix_url,
                              "greylist_redis_password_file = %s\n" % wrong)
    process = greylist(settings)
    action, _ = process.ask("198.51.100.9", "a@example.org", timeout=20)
    action2, took = process.ask("198.51.100.9", "b@example.org")
    assert action == action2 == "DUNNO" and took < REPLY_BOUND_S
    found = warnings_of(settings)
    assert len(found) == 1 and "invalid username-password pair" in found[0], found
    assert "WRONGPASS" in found[0], found
    status, out = ctl(settings, "stats")
    assert status == 1 and "invalid username-password pair" in out, out
    # The right password.
    right = password_file(short_dir, "right-password")
    settings = write_settings(short_dir / "right", "gl", secured_server.unix_url,
                              "greylist_redis_password_file = %s\n" % right)
    assert deferred(greylist(settings).ask("198.51.100.9", "c@example.org", timeout=20)[0])
    # An ACL user with only what greylist needs (greylist(8)): its own
    # keys, reads, writes, transactions, SCAN, and EVALSHA and EVAL for
    # the compare-and-set script.
    admin = secured_server.client(password="right-password")
    try:
        admin.execute_command("ACL", "SETUSER", "mta", "on", ">mta-password",
                              "resetkeys", "~greylist:*", "resetchannels", "-@all",
                              "+@read", "+@write", "+@transaction", "+@connection",
                              "+scan", "+info", "+evalsha", "+eval")
    finally:
        admin.close()
    user = password_file(short_dir, "mta mta-password")
    settings = write_settings(short_dir / "user", "gl", secured_server.unix_url,
                              "greylist_redis_password_file = %s\n" % user)
    process = greylist(settings)
    assert deferred(process.ask("198.51.100.9", "d@example.org", timeout=20)[0])
    assert warnings_of(settings) == []
    status, out = ctl(settings, "stats")
    assert status == 0 and "\n  pending: 2\n" in out, out
    # The ACL of 0.4, without scripts: greylisting goes on (WATCH and
    # MULTI/EXEC), and the administrator is told once.
    admin = secured_server.client(password="right-password")
    try:
        admin.execute_command("ACL", "SETUSER", "mta", "-evalsha", "-eval")
    finally:
        admin.close()
    settings = write_settings(short_dir / "noscript", "gl", secured_server.unix_url,
                              "greylist_redis_password_file = %s\n" % user)
    process = greylist(settings)
    assert deferred(process.ask("198.51.100.9", "f@example.org", timeout=20)[0])
    assert deferred(process.ask("198.51.100.9", "g@example.org")[0])
    found = warnings_of(settings)
    assert len(found) == 1 and "scripts refused" in found[0] and "NOPERM" in found[0], found
    status, out = ctl(settings, "stats")
    assert status == 0 and "\n  pending: 4\n" in out, out
    # A user without the commands greylist needs (no WATCH, no SET).
    admin = secured_server.client(password="right-password")
    try:
        admin.execute_command("ACL", "SETUSER", "reader", "on", ">reader-password",
                              "resetkeys", "~greylist:*", "-@all", "+@connection",
                              "+mget", "+get")
    finally:
        admin.close()
    reader = password_file(short_dir, "reader reader-password")
    settings = write_settings(short_dir / "reader", "gl", secured_server.unix_url,
                              "greylist_redis_password_file = %s\n" % reader)
    action, took = greylist(settings).ask("198.51.100.9", "r@example.org", timeout=20)
    assert action == "DUNNO"
    found = warnings_of(settings)
    # Scripts refused (told once), then WATCH refused: the failure.
    assert len(found) == 2 and "scripts refused" in found[0], found
    assert "NOPERM" in found[1] and "watch" in found[1], found
    # The same user with a wrong password.
    bad_user = password_file(short_dir, "mta not-the-password")
    settings = write_settings(short_dir / "baduser", "gl", secured_server.unix_url,
                              "greylist_redis_password_file = %s\n" % bad_user)
    process = greylist(settings)
    assert process.ask("198.51.100.9", "e@example.org", timeout=20)[0] == "DUNNO"
    assert "invalid username-password pair" in "".join(warnings_of(settings))


def test_no_password_for_a_server_that_wants_one_is_not_called_a_wrong_one(
        secured_server, short_dir, greylist):
    """Found by this test: every redis-py AuthenticationError was called
    WRONGPASS, but redis-py raises it for Redis's NOAUTH too."""
    settings = write_settings(short_dir, "gl", secured_server.unix_url)
    process = greylist(settings)
    action, took = process.ask("198.51.100.9", "a@example.org", timeout=20)
    assert action == "DUNNO"
    found = warnings_of(settings)
    assert len(found) == 1 and "authenticated" in found[0], found
    assert "WRONGPASS" not in found[0] and "NOAUTH" in found[0], found


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660], ids=["0640", "0604", "0660"])
def test_a_password_file_readable_by_others_is_refused(secured_server, short_dir, greylist,
                                                       mode):
    path = password_file(short_dir, "right-password", mode)
    settings = write_settings(short_dir / "gl", "gl", secured_server.unix_url,
                              "greylist_redis_password_file = %s\n" % path)
    status, out = ctl(settings, "stats")
    assert status == 1, out
    assert "greylist_redis_password_file %s: readable by others" % path in out, out
    assert "chmod 0600" in out
    process = greylist(settings)
    action, _ = process.ask("198.51.100.10", "f@example.org", timeout=20)
    assert action == "DUNNO"
    found = warnings_of(settings)
    assert len(found) == 1 and "readable by others" in found[0], found
    # Fixed, it works without a restart.
    os.chmod(path, 0o600)
    until_deferred(process, "fixed", within_s=10)


def test_full_memory_fails_open_with_an_oom_warning(own_server, short_dir, greylist):
    settings = write_settings(short_dir, "gl", own_server.unix_url)
    process = greylist(settings)
    assert deferred(process.warm())
    admin = own_server.client()
    count = iter(range(10 ** 6))

    def ask_new():
        attempt = next(count)
        return process.ask("198.51.%d.%d" % (attempt // 250 % 250, attempt % 250 + 1),
                           "oom%d@example.org" % attempt)
    try:
        used = admin.info("memory")["used_memory"]
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", used + 64 * 1024)
        # New triples until the memory is full: greylisted until then.
        answers = []
        began = time.monotonic()
        while time.monotonic() - began < 20 and len(answers) < 4000:
            answers.append(ask_new())
            if answers[-1][0] == "DUNNO":
                break
        assert answers[-1][0] == "DUNNO", "memory never ran out (%d answers)" % len(answers)
        assert len(answers) > 1 and all(deferred(a) for a, _ in answers[:-1])
        # At the limit, Redis takes a write now and then (its own buffers
        # come and go): every answer is DUNNO or a defer, never an error,
        # a hang or a crash.
        near = [ask_new() for _ in range(40)]
        assert all(a == "DUNNO" or deferred(a) for a, _ in near), near
        # Well over the limit, every answer is DUNNO (fail open).
        admin.config_set("maxmemory", admin.info("memory")["used_memory"] // 2)
        full = []
        for _ in range(30):
            full.append(ask_new())
            time.sleep(0.05)
        assert all(a == "DUNNO" for a, _ in full), full
        assert max(t for _, t in answers + near + full) < REPLY_BOUND_S
        found = warnings_of(settings)
        # Redis's "OOM command not allowed when used memory > 'maxmemory'".
        assert len(found) == 1 and "OOM" in found[0], found
        assert "used memory > 'maxmemory'" in found[0], found
        assert process.proc.poll() is None
        # Memory again: greylisting again, without a restart.
        admin.config_set("maxmemory", 0)
        until_deferred(process, "room", within_s=15)
    finally:
        admin.close()


def test_an_oom_warning_names_oom(own_server):
    from greylist.stores.base import StoreError
    from greylist.stores.redisstore import Connection, RedisStore
    admin = own_server.client()
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
    finally:
        admin.close()
    store = RedisStore(Connection(own_server.unix_url, TIMEOUT_MS / 1000), "db")
    try:
        with pytest.raises(StoreError) as raised:
            store.put(b"192.0.2/a@example.org/b@example.net", b"1:2:3:1:pending")
        message = str(raised.value)
        assert "OOM" in message and "used memory > 'maxmemory'" in message, message
        # Without the pipeline's command, which holds the record.
        assert "example.org" not in message and "pending" not in message, message
    finally:
        store.close()


# ----------------------------------------------------------------------
# greylistctl.

def test_greylistctl_stats_dump_show_and_whitelist_on_redis(server, short_dir, greylist):
    from greylist.wiring import redis_table
    # An hour's delay: show still finds the triples early however slow
    # the commands before it are.
    settings = write_settings(short_dir, "gl", server.unix_url, delay_s=3600)
    process = greylist(settings)
    assert deferred(process.ask("192.0.2.10", "alice@example.org")[0])
    assert deferred(process.ask("192.0.2.11", "zed@example.org", "carl@example.net")[0])
    status, out = ctl(settings, "stats")
    assert status == 0, out
    assert "database: %s#db\n" % server.unix_url in out
    assert "\n  pending: 2\n" in out and "expired, awaiting cleanup: 0" in out
    assert "entries: %d\n" % redis_table(load(settings, {}), "db").info()["entries"] in out
    admin = server.client(decode_responses=True)
    try:
        admin.config_resetstat()
        status, out = ctl(settings, "dump")
        stats = admin.info("commandstats")
    finally:
        admin.close()
    assert status == 0
    lines = sorted(out.splitlines())
    pending = [line for line in lines if line.endswith(":1:pending")]
    assert [line.split("\t")[0] for line in pending] == [
        "192.0.2/alice@example.org/bob@example.net", "192.0.2/zed@example.org/carl@example.net"]
    # Every record once (the database as greylist wrote it).
    db = redis_table(load(settings, {}), "db")
    assert sorted(line.split("\t", 1)[0].encode() for line in lines) == sorted(
        k for k, _ in db.items())
    db.close()
    assert "cmdstat_scan" in stats and "cmdstat_keys" not in stats, stats
    status, out = ctl(settings, "show", "192.0.2.99", "alice@example.org", "bob@example.net")
    assert status == 0, out
    assert "triple: 192.0.2/alice@example.org/bob@example.net\n  pending, first seen" in out
    assert "decision now: DEFER_IF_PERMIT" in out and "reason: early-retry" in out
    # whitelist add: a manual client record (no TTL), the client table and
    # the postscreen table entries.
    status, out = ctl(settings, "whitelist", "add", "203.0.113.40")
    assert status == 0 and "added: 203.0.113" in out, out
    cfg = load(settings, {})
    db, clients, screened = (redis_table(cfg, name) for name in ("db", "clients", "postscreen"))
    manual = db.get(b"203.0.113")
    assert manual is not None and manual.endswith(b":manual")
    admin = server.client()
    try:
        assert admin.ttl(db.stored(b"203.0.113")) == -1
        assert screened.get(b"203.0.113.40") == MANUAL_PERMIT
        assert admin.ttl(screened.stored(b"203.0.113.40")) == -1
        assert clients.info()["entries"] == 1
        assert action_of(process, "203.0.113.40", "x@example.org") == "DUNNO"
        assert "reason=manual-client" in log_of(settings)
        status, out = ctl(settings, "dump", "--postscreen")
        assert status == 0 and out == "203.0.113.40\tpermit manual\n", out
        status, out = ctl(settings, "whitelist", "remove", "203.0.113.40")
        assert status == 0 and "removed: 203.0.113" in out, out
        assert db.get(b"203.0.113") is None
        assert screened.get(b"203.0.113.40") is None
        assert clients.info()["entries"] == 0
        status, out = ctl(settings, "whitelist", "remove", "203.0.113.40")
        assert status == 0 and "not listed: 203.0.113" in out
        # A (client, sender) entry.
        status, out = ctl(settings, "whitelist", "add", "203.0.113.41", "Bob+x@Example.ORG")
        assert status == 0 and "added: 203.0.113 bob@example.org" in out, out
        assert admin.ttl(db.stored(b"203.0.113/bob@example.org")) == -1
    finally:
        admin.close()
        db.close()
    status, out = ctl(settings, "cleanup")
    assert status == 0 and "not needed" in out


def action_of(process: Greylist, client: str, sender: str) -> str:
    return process.ask(client, sender)[0]


def test_greylistctl_import_copies_a_live_lmdb_database_into_redis(server, short_dir,
                                                                   greylist):
    lmdb_dir = short_dir / "lmdb"
    lmdb_dir.mkdir()
    os.chmod(lmdb_dir, 0o755)
    base = lmdb_dir / "gl"
    lmdb_settings = write_settings(lmdb_dir, "lmdb", str(base))
    process = greylist(lmdb_settings)
    # T1 will pass (a passed triple, a sender entry, a client entry); T2
    # stays pending, and has expired for the Redis settings at import.
    assert deferred(process.ask("192.0.2.20", "one@example.org")[0])
    assert deferred(process.ask("192.0.2.21", "two@example.org", "two@example.net")[0])
    assert ctl(lmdb_settings, "whitelist", "add", "203.0.113.50")[0] == 0
    time.sleep(DELAY_S + 0.2)
    assert process.ask("192.0.2.20", "one@example.org")[0] == "DUNNO"
    process.close()
    source = dict(_lmdb_items(str(base)))
    states = sorted(records.decode(v).state for v in source.values())
    for state in (records.PASSED, records.PENDING, records.MANUAL):
        assert state in states, source
    redis_settings = write_settings(short_dir / "redis", "gl", server.unix_url,
                                    "greylist_retry_window = 1s\ngreylist_delay = 0\n")
    cfg = load(redis_settings, {})
    # With a retry window of 1 s, the pending records (2 s old) have
    # expired for the Redis settings; the others have not.
    now = int(time.time())
    live = sum(not expired(records.decode(v), now, cfg) for v in source.values())
    assert 0 < live < len(source)
    status, out = ctl(redis_settings, "import", str(base) + ".lmdb")
    assert status == 0, out
    assert "import: database: %d copied, %d expired left behind" % (
        live, len(source) - live) in out, out
    assert "import: client table: 1 copied, 0 expired left behind" in out, out
    assert "import: postscreen table: 1 copied, 0 expired left behind" in out, out
    from greylist.wiring import redis_table
    db = redis_table(cfg, "db")
    now = int(time.time())
    admin = server.client()
    try:
        for key, value in source.items():
            record = records.decode(value)
            if expired(record, now, cfg):
                # Only what lives greylist_retry_window (1 s here) has.
                assert expire_at(record, cfg) == record.first_seen + 2
                assert db.get(key) is None, key
                continue
            assert db.get(key) == value, key
            ttl = admin.ttl(db.stored(key))
            at = expire_at(record, cfg)
            if at is None:
                assert ttl == -1 and record.state == records.MANUAL
            else:
                assert abs(ttl - (at - now)) <= 2, (key, ttl, at - now)
        clients = redis_table(cfg, "clients")
        (key, stamp), = clients.items()
        assert key == b"203.0.113"  # the client group, as check_client_access looks it up
        # A manual entry ("OK manual") lives as long as the manual record.
        assert stamp == b"OK manual" and admin.ttl(clients.stored(key)) == -1
        screened = redis_table(cfg, "postscreen")
        assert screened.get(b"203.0.113.50") == MANUAL_PERMIT
        assert admin.ttl(screened.stored(b"203.0.113.50")) == -1
    finally:
        admin.close()
        db.close()
    # The imported records decide on Redis as they did on LMDB.
    process = greylist(redis_settings)
    assert process.ask("192.0.2.20", "one@example.org")[0] == "DUNNO"
    assert "reason=awl-sender" in log_of(redis_settings)
    entries = db.info()["entries"]
    # A second import finds every entry there already and keeps it
    # (idempotent: no duplicates, nothing taken back).
    # (Named as Postfix names it, lmdb:PATH, as greylistctl(8) writes it.)
    status, out = ctl(redis_settings, "import", "lmdb:" + str(base))
    assert status == 0 and "import: database: 0 copied, %d expired left behind, " \
        "%d already in Redis kept" % (len(source) - live, live) in out, out
    status, out = ctl(redis_settings, "stats")
    assert "entries: %d\n" % entries in out, out


def test_greylistctl_import_keeps_what_redis_holds_already(server, short_dir, greylist):
    # Found in review: import wrote every LMDB entry over the Redis one,
    # so a manual entry added on Redis after the switch (or a record a
    # host wrote there since) went back to the older LMDB record.
    lmdb_dir = short_dir / "lmdb"
    lmdb_dir.mkdir()
    os.chmod(lmdb_dir, 0o755)
    base = lmdb_dir / "gl"
    lmdb_settings = write_settings(lmdb_dir, "lmdb", str(base))
    process = greylist(lmdb_settings)
    assert deferred(process.ask("203.0.113.5", "one@example.org")[0])
    time.sleep(DELAY_S + 0.2)
    assert process.ask("203.0.113.5", "one@example.org")[0] == "DUNNO"
    process.close()
    assert records.decode(dict(_lmdb_items(str(base)))[b"203.0.113"]).state == records.CLIENT
    redis_settings = write_settings(short_dir / "redis", "gl", server.unix_url)
    assert ctl(redis_settings, "whitelist", "add", "203.0.113.5")[0] == 0
    status, out = ctl(redis_settings, "import", str(base))
    assert status == 0 and "1 already in Redis kept" in out, out
    status, out = ctl(redis_settings, "whitelist", "list")
    assert status == 0 and "client 203.0.113 added" in out, out
    from greylist.wiring import redis_table
    db = redis_table(load(redis_settings, {}), "db")
    try:
        assert records.decode(db.get(b"203.0.113")).state == records.MANUAL
        # The entries Redis did not have are copied.
        assert db.get(b"203.0.113/one@example.org") is not None
    finally:
        db.close()


def _lmdb_items(base: str) -> list[tuple[bytes, bytes]]:
    from greylist.stores.lmdb import LmdbStore
    store = LmdbStore(base, readonly=True)
    try:
        return list(store.items())
    finally:
        store.close()


# ----------------------------------------------------------------------
# greylist --check on a Redis database.

def test_check_logs_in_reads_and_runs_the_script_and_notes_refused_scripts(
        secured_server, short_dir):
    # redis_problems() is what --check runs (not as root: see below): each
    # ACL and fault gives its problem or note, and nothing is written.
    from greylist.check import redis_problems
    from greylist.config import load
    admin = secured_server.client(password="right-password")
    try:
        admin.flushall()
        admin.execute_command("ACL", "SETUSER", "full", "on", ">full-pw", "resetkeys",
                              "~greylist:*", "-@all", "+@read", "+@write", "+@transaction",
                              "+@connection", "+scan", "+info", "+evalsha", "+eval")
        admin.execute_command("ACL", "SETUSER", "old", "on", ">old-pw", "resetkeys",
                              "~greylist:*", "-@all", "+@read", "+@write", "+@transaction",
                              "+@connection", "+scan", "+info")
        admin.execute_command("ACL", "SETUSER", "reader", "on", ">reader-pw", "resetkeys",
                              "~greylist:*", "-@all", "+@connection", "+mget", "+get")

        def checked(name: str, secret: str, database: str = secured_server.unix_url):
            (short_dir / name).mkdir()
            extra = "" if not secret else "greylist_redis_password_file = %s\n" % \
                password_file(short_dir / name, secret)
            return redis_problems(load(write_settings(short_dir / name, "gl", database, extra),
                                       {}))
        assert checked("full", "full full-pw") == ([], [])
        problems, notes = checked("old", "old old-pw")
        assert problems == [] and len(notes) == 1 and "scripts refused" in notes[0], notes
        problems, notes = checked("reader", "reader reader-pw")
        assert len(problems) == 1 and "NOPERM" in problems[0] and "watch" in problems[0], \
            problems
        # Found in review: a login that may read but not write passed the
        # check, and then failed open on every new triple.
        admin.execute_command("ACL", "SETUSER", "nowrite", "on", ">nowrite-pw", "resetkeys",
                              "~greylist:*", "-@all", "+@read", "+@transaction",
                              "+@connection", "+scan", "+info", "+evalsha", "+eval")
        admin.execute_command("ACL", "SETUSER", "readkeys", "on", ">readkeys-pw", "resetkeys",
                              "%R~greylist:*", "-@all", "+@read", "+@write", "+@transaction",
                              "+@connection", "+scan", "+info", "+evalsha", "+eval")
        for user in ("nowrite", "readkeys"):
            problems, _ = checked(user, "%s %s-pw" % (user, user))
            assert len(problems) == 1 and ("NOPERM" in problems[0]
                                           or "can't run" in problems[0]), (user, problems)
        problems, _ = checked("wrong", "wrong-password")
        assert len(problems) == 1 and "WRONGPASS" in problems[0], problems
        problems, _ = checked("gone", "", "redis:unix:%s/no-such.sock" % short_dir)
        assert len(problems) == 1 and problems[0].startswith("greylist_database: redis"), \
            problems
        assert admin.dbsize() == 0   # nothing written
        # The command line: as root a note (the password file belongs to the
        # run's user), else the same checks.
        (short_dir / "cli").mkdir()
        settings = write_settings(short_dir / "cli", "gl", secured_server.unix_url,
                                  "greylist_redis_password_file = %s\n"
                                  % password_file(short_dir / "cli", "old old-pw"))
        done = subprocess.run(program("greylist", "greylist") + ["--check", "-c", settings],
                              capture_output=True, text=True, timeout=60, env=environment())
        assert done.returncode == 0 and done.stdout.endswith("%s: ok\n" % settings), done
        if os.geteuid() == 0:
            assert "not checked as root" in done.stdout, done.stdout
        else:
            assert "note: redis" in done.stdout and "scripts refused" in done.stdout, done
    finally:
        for user in ("full", "old", "reader", "nowrite", "readkeys"):
            admin.execute_command("ACL", "DELUSER", user)
        admin.close()


def test_greylistctl_as_root_on_redis_becomes_greylist_user(short_dir):
    # Found in review: on Redis greylistctl stayed root, and the privacy
    # secret its first command created was root's: every greylist process
    # (as greylist_user) then failed to read it. (The switch itself is
    # greylistctl's, tested on LMDB; a process of this suite's Python,
    # under /root, cannot import once it is nobody.)
    import pwd
    from greylist.cli.greylistctl import _policy_user
    if os.geteuid() != 0:
        pytest.skip("greylistctl switches users only as root")
    nobody = pwd.getpwnam("nobody")
    settings = short_dir / "greylist.cf"
    base = "greylist_database = redis:unix:%s/redis.sock\n" % short_dir
    settings.write_text(base + "greylist_user = nobody\n")
    assert _policy_user(load(str(settings), {}), True) == (nobody.pw_uid, nobody.pw_gid)
    settings.write_text(base + "greylist_user = no-such-user-here\n")
    assert _policy_user(load(str(settings), {}), True) == \
        "greylist_user no-such-user-here: no such user"
    settings.write_text(base)
    assert _policy_user(load(str(settings), {}), True) is None
    # Privacy mode without greylist_user: root would create the secret
    # as root's, and every greylist process would then fail open (review).
    secret = short_dir / "greylist.secret"
    settings.write_text(base + "greylist_privacy = yes\ngreylist_secret_file = %s\n" % secret)
    refused = _policy_user(load(str(settings), {}), False)
    assert refused.startswith("refusing to create the privacy secret %s as root" % secret)
    secret.write_text("00" * 32)
    assert _policy_user(load(str(settings), {}), True) is None


def test_a_delete_that_keeps_losing_its_race_fails_instead_of_skipping(server, monkeypatch):
    # Found in review: after WATCH_RETRIES lost races delete_if() skipped
    # the key without a word, and greylistctl whitelist remove said done.
    from greylist.stores import redisstore
    from greylist.stores.base import StoreError
    from greylist.wiring import redis_table
    monkeypatch.setattr(redisstore, "WATCH_RETRIES", 3)
    table = redis_table(Config(database=server.unix_url), "clients")
    other = redis_table(Config(database=server.unix_url), "clients")
    table.put(b"192.0.2.7", b"OK manual")
    table.put(b"192.0.2.8", b"OK manual")
    rewrites = []

    def doomed(key, value):
        # Another writer changes the key between the read and the EXEC.
        if key == b"192.0.2.8":
            rewrites.append(key)
            other.put(key, b"OK manual")
        return True
    with pytest.raises(StoreError, match="3 concurrent changes of b'192.0.2.8'; giving up "
                       "after 1 deleted"):
        table.delete_if([b"192.0.2.7", b"192.0.2.8"], doomed)
    assert len(rewrites) == 3
    assert table.get(b"192.0.2.7") is None and table.get(b"192.0.2.8") == b"OK manual"
    table.close()
    other.close()


def test_scan_takes_a_key_that_redis_returns_twice_once(server, monkeypatch):
    # SCAN may return a key more than once while Redis rehashes the
    # keyspace; a page must still hold limit distinct keys, in order.
    from greylist.wiring import redis_table
    table = redis_table(Config(database=server.unix_url), "clients")
    keys = [b"192.0.2.%d" % i for i in range(10)]
    for key in keys:
        table.put(key, b"OK manual")

    class Twice:
        def __init__(self, client):
            self.client = client

        def scan_iter(self, **kwargs):
            for name in self.client.scan_iter(**kwargs):
                yield name
                yield name

        def __getattr__(self, name):
            return getattr(self.client, name)
    call = table.connection.call
    monkeypatch.setattr(table.connection, "call", lambda body: call(lambda c: body(Twice(c))))
    first = table.scan(None, 4)
    assert [k for k, _ in first] == sorted(keys)[:4]
    rest = table.scan(first[-1][0], 100)
    assert [k for k, _ in rest] == sorted(keys)[4:]
    table.close()


def test_greylistctl_import_leaves_the_group_entries_of_older_versions_behind(server,
                                                                             short_dir):
    # Pool mode (the default): an automatic "192.0.2" stamp, which versions
    # before 0.5 wrote, would let every host of the /24 through the
    # socketmap clients map; Redis has no cleanup pass to drop it.
    from greylist.stores.lmdb import LmdbStore
    from greylist.wiring import redis_table
    lmdb_dir = short_dir / "old"
    lmdb_dir.mkdir()
    os.chmod(lmdb_dir, 0o755)
    now = int(time.time())
    database = LmdbStore(str(lmdb_dir / "gl"))
    database.open()
    database.close()
    table = LmdbStore(str(lmdb_dir / "gl-clients"))
    table.put(b"192.0.2", b"%d" % now)
    table.put(b"192.0.2.10", b"%d" % now)
    table.put(b"198.51.100", b"OK manual")
    table.close()
    redis_settings = write_settings(short_dir / "redis", "gl", server.unix_url)
    status, out = ctl(redis_settings, "import", str(lmdb_dir / "gl"))
    assert status == 0, out
    assert "import: client table: 2 copied, 1 expired left behind" in out, out
    clients = redis_table(load(redis_settings, {}), "clients")
    assert dict(clients.items()) == {b"192.0.2.10": b"%d" % now, b"198.51.100": b"OK manual"}
    clients.close()


def test_greylistctl_import_into_privacy_mode_hashes_plaintext_keys(server, short_dir):
    # Found in review: keys were copied as stored, so a plaintext LMDB
    # database left addresses in a privacy-mode Redis, where no request
    # found them either.
    from greylist.stores.lmdb import LmdbStore
    from greylist.stores.privacy import hashed, load_secret
    from greylist.wiring import redis_table
    lmdb_dir = short_dir / "plain"
    lmdb_dir.mkdir()
    os.chmod(lmdb_dir, 0o755)
    now = int(time.time())
    manual = records.encode(records.Record(now, now, 1, records.MANUAL))
    source = LmdbStore(str(lmdb_dir / "gl"))
    source.put(b"192.0.2", manual)
    source.put(b"f" * 64, manual)     # a privacy-mode key already
    source.close()
    redis_dir = short_dir / "private"
    redis_dir.mkdir()
    os.chmod(redis_dir, 0o755)
    redis_settings = write_settings(redis_dir, "gl", server.unix_url,
                                    "greylist_privacy = yes\ngreylist_secret_file = %s\n"
                                    % (redis_dir / "secret"))
    # The greylist user's secret (greylistctl as root would not make it).
    load_secret(str(redis_dir / "secret"))
    status, out = ctl(redis_settings, "import", str(lmdb_dir / "gl"))
    assert status == 0 and "import: database: 2 copied, 0 expired left behind" in out, out
    cfg = load(redis_settings, {})
    from greylist.config import resolve
    secret = load_secret(resolve(cfg).secret_file)
    db = redis_table(cfg, "db")
    assert dict(db.items()) == {hashed(secret, b"192.0.2"): manual, b"f" * 64: manual}
    status, out = ctl(redis_settings, "show", "192.0.2.1", "a@example.org", "b@example.net")
    assert "reason: manual-client" in out, out
    # Without privacy mode the hash is left behind, and said so.
    plain_settings = write_settings(short_dir / "plainredis", "gl2", server.unix_url)
    status, out = ctl(plain_settings, "import", str(lmdb_dir / "gl"))
    assert status == 0 and "import: database: 1 copied" in out, out
    assert "1 keys left behind that are privacy mode's keyed hashes" in out, out
    db.close()


def test_a_sentinel_failure_is_logged_without_redis_pys_object_reprs():
    # Found in review: MasterNotFoundError's text quoted redis-py's client
    # objects, several kilobytes a line.
    from redis.sentinel import MasterNotFoundError
    from greylist.stores.redisstore import MAX_ERROR_TEXT, describe
    pool = "<redis.connection.ConnectionPool(<redis.connection.UnixDomainSocketConnection(%s)>)>"
    text = describe(MasterNotFoundError(
        "No master found for 'mymaster' : {%s}" % ", ".join(
            "<redis.client.Redis(%s)>: ConnectionError('Error 111 connecting')"
            % (pool % ("path=/tmp/s%d,db=0" % i * 20)) for i in range(3))))
    assert text.startswith("MasterNotFoundError: No master found for 'mymaster': sentinel "
                           "/tmp/s0 ConnectionError('Error 111 connecting'), sentinel /tmp/s1 "), text
    assert "ConnectionPool" not in text and len(text) <= MAX_ERROR_TEXT + 30, text
    # The form of redis-py 6 and later: each client's repr nests deeper,
    # and the failure follows it after " - " (in redis-py 8 as KIND:ERROR).
    client = ("<redis.client.Redis(<redis.connection.ConnectionPool(<redis.connection."
              "Connection(db=0,username=<REDACTED>,password=<REDACTED>,retry=<redis.retry."
              "Retry object at 0x7f>,host=127.0.0.1,port=%d,socket_connect_timeout=0.3)>)>)>")
    text = describe(MasterNotFoundError("No master found for 'mymaster' : %s - auth:"
                                        "AuthenticationError, %s - network:TimeoutError"
                                        % (client % 26379, client % 26380)))
    assert text == ("MasterNotFoundError: No master found for 'mymaster' (the sentinels' "
                    "own login: greylist_redis_sentinel_password_file): sentinel "
                    "127.0.0.1:26379 auth:AuthenticationError, sentinel 127.0.0.1:26380 "
                    "network:TimeoutError"), text
    # Found in review: redis-py 5's form, "Redis<ConnectionPool<...>>>",
    # was left as it was, without the setting that a refused login wants.
    text = describe(MasterNotFoundError(
        "No master found for 'mymaster' : Redis<ConnectionPool<Connection<host=127.0.0.1,"
        "port=26379,db=0>>> - AuthenticationError('Authentication required.'), Redis<"
        "ConnectionPool<UnixDomainSocketConnection<path=/tmp/s1,db=0>>> - ConnectionError("
        "'Error 111 connecting to unix socket: /tmp/s1. Connection refused.')"))
    assert text == ("MasterNotFoundError: No master found for 'mymaster' (the sentinels' "
                    "own login: greylist_redis_sentinel_password_file): sentinel "
                    "127.0.0.1:26379 AuthenticationError('Authentication required.'), "
                    "sentinel /tmp/s1 ConnectionError('Error 111 connecting to unix socket: "
                    "/tmp/s1. Connection refused.')"), text
    # An IPv6 sentinel as the URL names it, not "::1:26379".
    text = describe(MasterNotFoundError("No master found for 'm' : %s - network:ConnectionError"
                                        % (client % 26379).replace("127.0.0.1", "::1")))
    assert text.endswith(": sentinel [::1]:26379 network:ConnectionError"), text
    # Whatever the text, describe() returns one: it runs in every failure.
    for odd in ("", " : ", "No master : Redis<ConnectionPool<", "x : <redis.client.Redis(",
                "x : <redis.client.Redis(host=[::1],port=26379)> - e", "a : b : c"):
        assert describe(MasterNotFoundError(odd)).startswith("MasterNotFoundError")


def test_the_back_off_fails_fast_doubles_to_its_cap_and_starts_over_after_a_success(
        monkeypatch):
    # No server: the body stands for the exchange with Redis. Within a
    # back-off a call fails at once, without the round trip; the back-off
    # doubles from BACKOFF_MIN_S to BACKOFF_MAX_S, and a success ends it,
    # so that the next failure backs off BACKOFF_MIN_S again.
    from greylist.stores import redisstore
    from greylist.stores.base import StoreError
    now = [1000.0]
    monkeypatch.setattr(redisstore.time, "monotonic", lambda: now[0])
    connection = redisstore.Connection("redis:unix:/nonexistent/redis.sock", timeout_s=0.1)
    called = []

    def fails(client):
        called.append("fails")
        raise ConnectionError("refused")

    def answers(client):
        called.append("answers")
        return "ok"

    def call(body):
        try:
            return connection.call(body)
        except StoreError as exc:
            return str(exc)

    assert "refused" in call(fails) and connection.failing
    now[0] += 0.4
    assert "unavailable, next try in 0.1 s" in call(answers) and called == ["fails"]
    now[0] += 0.2                                  # past 0.5 s: tried again
    assert "refused" in call(fails)
    now[0] += 0.6                                  # within the doubled 1 s
    assert "unavailable" in call(answers) and called == ["fails", "fails"]
    for _ in range(10):
        now[0] += redisstore.BACKOFF_MAX_S
        assert "refused" in call(fails)
    assert "next try in %.1f s" % redisstore.BACKOFF_MAX_S in call(answers)
    now[0] += redisstore.BACKOFF_MAX_S
    assert call(answers) == "ok" and not connection.failing
    assert "refused" in call(fails)
    now[0] += redisstore.BACKOFF_MIN_S + 0.01       # the back-off started over
    assert call(answers) == "ok"


def test_a_failing_store_is_warned_of_again_after_the_interval(monkeypatch):
    import types
    from greylist import service
    from greylist.stores.base import StoreError
    now = [50.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: now[0])
    warned = []
    fake = types.SimpleNamespace(_warned_at=None, warning_interval_s=60.0,
                                 cfg=Config(), log=types.SimpleNamespace(warning=warned.append))
    for step in (0, 30, 29.9, 0.2, 59, 1):
        now[0] += step
        service.PolicyService.store_failed(fake, StoreError("redis down"))
    # At 50, 80, 109.9 (one), 110.1 (again), 169.1, 170.1 (again).
    assert len(warned) == 3 and "answering DUNNO" in warned[0]


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/x", "redis://127.0.0.1:6379/123456",
                                 "redis://127.0.0.1:6379/-1"])
def test_a_database_that_is_not_a_small_number_is_a_settings_error(url):
    from greylist.config import ConfigError, parse_setting
    with pytest.raises(ConfigError, match="the database must be a number"):
        parse_setting("greylist_database", url)
    assert parse_setting("greylist_database", "redis://127.0.0.1:6379/15")[1] \
        == "redis://127.0.0.1:6379/15"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_password_file_of_another_user_is_refused(tmp_path):
    import pwd
    from greylist.stores.redisstore import RedisError, read_password_file
    path = tmp_path / "password"
    path.write_text("secret\n")
    os.chmod(path, 0o600)
    assert read_password_file(str(path)) == (None, "secret")
    os.chown(path, pwd.getpwnam("nobody").pw_uid, 0)
    with pytest.raises(RedisError, match="owned by uid %d, not by this user"
                       % pwd.getpwnam("nobody").pw_uid):
        read_password_file(str(path))
