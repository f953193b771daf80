"""A Redis store, for several mail hosts sharing one greylist.

DESCRIPTION
    RedisStore keeps one table (the database, the client table, the
    correspondent table or the postscreen table) in a Redis or Valkey
    server, behind the store interface of base.py, so every program works
    on it unchanged. greylist_database names the server:

        redis:unix:PATH                       a unix socket
        redis://HOST:PORT/DB                  TCP (DB optional, default 0)
        redis-sentinel://HOST:PORT,HOST:PORT/MASTERNAME
                                              the master that the Sentinels
                                              name, followed through
                                              failovers

    A password, or an ACL user and password, comes from
    greylist_redis_password_file (one line: PASSWORD, or USER PASSWORD), a
    file readable only by its owner (the greylist user): never from the
    command line or the settings file.

    Keys: a table's key k is stored as "greylist:TABLE:{TAG}k", where TAG
    is 8 hex digits of a digest of k's first "/"-separated field: the
    client group of a triple's three records, so that they live in one
    cluster slot; TAG has a fixed length, so the stored key gives k back.

    get_many() is one MGET, sent on a connection that the store keeps
    (Connection.reads). update_many() is WATCH, MGET, the pure
    change, then MULTI/SET/EXEC, retried up to WATCH_RETRIES times when
    another writer changed a watched key: an atomic read-decide-write
    with the decision core unchanged. Each value is stored with an
    absolute expiry (SET ... EXAT) from expire_at(value), the same
    lifetimes that LMDB's cleanup applies (core/decide.py expired(); a
    property test ties the two), so no cleanup pass is needed; a value
    without a lifetime (a manual entry) never expires. scan() walks the
    table with SCAN, never KEYS.

    Every call is bounded: connect and socket timeouts of
    greylist_redis_timeout, and no retries inside redis-py. After a
    failure the store fails fast, without a network round trip, for a
    back-off that doubles from BACKOFF_MIN_S to BACKOFF_MAX_S, and then
    tries again: callers answer greylist_failure_action at once (fail
    open), and recover without a restart when Redis returns.

    Durability is Redis's: configure appendonly (appendfsync everysec or
    always) on the server.

DIAGNOSTICS
    StoreError for every failure (connection refused, timeout, wrong
    password, out of memory, a master that cannot be found), with
    Redis's message.
"""

import hashlib
import os
import stat
import threading
import time
from typing import Callable, TypeVar

from greylist.stores.base import Change, Store, StoreError, Values

T = TypeVar("T")

# Optimistic transactions (WATCH) retried at most this often, with a
# random pause of up to WATCH_PAUSE_S between tries: concurrent writers of
# the same keys (two hosts racing on one new triple) are rare, but a
# retry must not come back in lock step.
WATCH_RETRIES = 50
WATCH_PAUSE_S = 0.002
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
TIMEOUT_S = 0.3
PREFIX = b"greylist:"
# "{" + 8 hex digits + "}".
_TAG_BYTES = 10


class RedisError(Exception):
    """A Redis setting that cannot be used (URL, password file)."""


def is_redis(database: str) -> bool:
    """Whether a greylist_database names a Redis server."""
    return database.startswith(("redis:unix:", "redis://", "redis-sentinel://"))


def parse_url(url: str) -> dict:
    """The connection of a Redis database name: {"unix": PATH}, {"host",
    "port", "db"} or {"sentinels": [(host, port)], "master": NAME}.
    Raises RedisError."""
    if url.startswith("redis:unix:"):
        path = url[len("redis:unix:"):]
        if not path.startswith("/"):
            raise RedisError("%s: the socket must be an absolute path" % url)
        return {"unix": path}
    if url.startswith("redis://"):
        rest = url[len("redis://"):]
        where, _, db = rest.partition("/")
        host, port = _host_port(url, where)
        if db and not (db.isdigit() and len(db) <= 5):
            raise RedisError("%s: the database must be a number" % url)
        return {"host": host, "port": port, "db": int(db or 0)}
    if url.startswith("redis-sentinel://"):
        rest = url[len("redis-sentinel://"):]
        where, _, master = rest.partition("/")
        if not master or "/" in master:
            raise RedisError("%s: name the master after the sentinels (/MASTERNAME)" % url)
        return {"sentinels": [_host_port(url, each) for each in where.split(",") if each],
                "master": master}
    raise RedisError("%s: not redis:unix:PATH, redis://HOST:PORT/DB or "
                     "redis-sentinel://HOST:PORT,.../MASTERNAME" % url)


def _host_port(url: str, where: str) -> tuple[str, int]:
    host, sep, port = where.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isdigit() and 0 < int(port) < 65536):
        raise RedisError("%s: %r is not HOST:PORT" % (url, where))
    return host, int(port)


def read_password_file(path: str) -> tuple[str | None, str]:
    """(user or None, password) from a password file; RedisError if it is
    missing, empty, or readable by anyone but its owner."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise RedisError("greylist_redis_password_file %s: %s" % (path, exc.strerror)) from None
    try:
        st = os.fstat(fd)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise RedisError("greylist_redis_password_file %s: readable by others "
                             "(chmod 0600, owned by the greylist user)" % path)
        if st.st_uid != os.geteuid():
            raise RedisError("greylist_redis_password_file %s: owned by uid %d, not by "
                             "this user (uid %d)" % (path, st.st_uid, os.geteuid()))
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    words = text.split()
    if len(words) == 1:
        return None, words[0]
    if len(words) == 2:
        return words[0], words[1]
    raise RedisError("greylist_redis_password_file %s: expected PASSWORD or USER PASSWORD "
                     "on one line" % path)


class Connection:
    """One client for a Redis database name, shared by its tables, with the
    fail-fast back-off of the module description."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S,
                 password_file: str = "") -> None:
        self.url = url
        self.where = parse_url(url)
        self.timeout_s = timeout_s
        self.password_file = password_file
        self._client = None
        self._mutex = threading.Lock()
        # The connection that reads() keeps, and who may use it.
        self._reader = None
        self._reader_mutex = threading.Lock()
        self._down_until = 0.0
        self._backoff = 0.0
        self.failing = False

    def client(self):
        """The redis-py client; StoreError while backing off."""
        if self.failing and time.monotonic() < self._down_until:
            raise StoreError("redis %s: unavailable, next try in %.1f s"
                             % (self.url, self._down_until - time.monotonic()))
        with self._mutex:
            if self._client is None:
                self._client = self._connect()
        return self._client

    def _connect(self):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        user = password = None
        if self.password_file:
            try:
                user, password = read_password_file(self.password_file)
            except RedisError as exc:
                raise StoreError(str(exc)) from None
        options = {"socket_timeout": self.timeout_s,
                   "socket_connect_timeout": self.timeout_s,
                   "retry": Retry(NoBackoff(), 0), "username": user, "password": password,
                   "health_check_interval": 0}
        where = self.where
        if "sentinels" in where:
            from redis.sentinel import Sentinel
            sentinel = Sentinel(where["sentinels"], socket_timeout=self.timeout_s,
                                socket_connect_timeout=self.timeout_s)
            return sentinel.master_for(where["master"], **options)
        if "unix" in where:
            return redis.Redis(unix_socket_path=where["unix"], **options)
        return redis.Redis(host=where["host"], port=where["port"], db=where["db"], **options)

    def call(self, body: Callable):
        """body(client), with Redis's errors as StoreError and the back-off."""
        import redis
        client = self.client()
        try:
            result = body(client)
        except redis.exceptions.WatchError:
            raise
        except (redis.exceptions.RedisError, OSError) as exc:
            self.failed()
            raise StoreError("redis %s: %s" % (self.url, describe(exc))) from None
        if self.failing:
            self.failing, self._backoff = False, 0.0
        return result

    def reads(self, commands: list[tuple]) -> list:
        """The replies of read commands (tuples of arguments), sent in one
        round trip on one connection of the client's pool that this
        object keeps: the hot path of every request (an MGET, or a turn's
        MGETs in greylistd) without redis-py's per-call layers (command
        object, pipeline, pool checkout), about 100 us of CPU a call on
        this machine. Errors and back-off as call(); after any error the
        connection is dropped, since replies may be left unread on it."""
        if not commands:
            return []

        def body(client):
            with self._reader_mutex:
                try:
                    conn = self._reader
                    if conn is None:
                        conn = self._reader = _checkout(client.connection_pool)
                    conn.send_packed_command(conn.pack_commands(commands),
                                             check_health=False)
                    return [conn.read_response() for _ in commands]
                except BaseException:
                    self._drop_reader(client)
                    raise
        return self.call(body)

    def _drop_reader(self, client) -> None:
        conn, self._reader = self._reader, None
        if conn is not None:
            try:
                conn.disconnect()
                client.connection_pool.release(conn)
            except Exception:  # noqa: BLE001 (a broken connection)
                pass

    def failed(self) -> None:
        """Note a failure: back off before the next try."""
        self.failing = True
        self._backoff = min(max(self._backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
        self._down_until = time.monotonic() + self._backoff

    def close(self) -> None:
        with self._mutex:
            if self._client is not None:
                with self._reader_mutex:
                    self._drop_reader(self._client)
                try:
                    self._client.close()
                except Exception:  # noqa: BLE001 (closing a broken client)
                    pass
                self._client = None


def _checkout(pool):
    """A connection of pool, kept by the caller until it gives it back."""
    try:
        return pool.get_connection()
    except TypeError:
        return pool.get_connection("MGET")  # redis-py 5 wants a command name.


def describe(exc: Exception) -> str:
    """A Redis failure for the log: redis-py's class, which carries
    Redis's error code (OutOfMemoryError for OOM, AuthenticationError for
    WRONGPASS), and Redis's text, without the pipeline command that
    redis-py quotes (it holds a record's key and value)."""
    text = str(exc)
    if "caused error:" in text:
        text = text.split("caused error:", 1)[1].strip()
    name = type(exc).__name__
    code = _CODES.get(name)
    if name == "AuthenticationError":
        # redis-py raises it for NOAUTH (no password sent) and WRONGPASS.
        lowered = text.lower()
        code = ("NOAUTH" if "authentication required" in lowered or "hello must be" in lowered
                or "noauth" in lowered else "WRONGPASS")
    if code is not None:
        name = "%s (%s)" % (code, name)
    return "%s: %s" % (name, text) if text else name


# Redis's error codes, which redis-py turns into exception classes.
_CODES = {"OutOfMemoryError": "OOM",
          "AuthenticationWrongNumberOfArgsError": "WRONGPASS",
          "NoPermissionError": "NOPERM", "ReadOnlyError": "READONLY",
          "BusyLoadingError": "LOADING", "ExecAbortError": "EXECABORT"}


def _pause() -> None:
    import random
    time.sleep(random.random() * WATCH_PAUSE_S)


def _tag(key: bytes) -> bytes:
    first = key.split(b"/", 1)[0]
    return b"{" + hashlib.blake2s(first, digest_size=4).hexdigest().encode("ascii") + b"}"


class RedisStore(Store):
    """One table in Redis (see the module description).

    expire_at(value) gives the absolute epoch second after which a value
    has expired (None: it never does).
    """

    def __init__(self, connection: Connection, table: str,
                 expire_at: Callable[[bytes], int | None] = lambda value: None) -> None:
        self.connection = connection
        self.name = "%s#%s" % (connection.url, table)
        self.path = self.name
        self.prefix = PREFIX + table.encode("ascii") + b":"
        self.expire_at = expire_at

    @property
    def failing(self) -> bool:
        return self.connection.failing

    def stored(self, key: bytes) -> bytes:
        """The Redis key of a table key."""
        return self.prefix + _tag(key) + key

    def key(self, stored: bytes) -> bytes:
        """The table key of a Redis key."""
        return stored[len(self.prefix) + _TAG_BYTES:]

    def open(self) -> None:
        self.connection.call(lambda client: client.ping())

    def close(self) -> None:
        self.connection.close()

    def get_many(self, keys: list[bytes | None]) -> Values:
        wanted = [k for k in keys if k is not None]
        if not wanted:
            return [None] * len(keys)
        found = iter(self.connection.reads(
            [("MGET", *[self.stored(k) for k in wanted])])[0])
        return [None if k is None else next(found) for k in keys]

    def update_many(self, keys: list[bytes | None], change: Change) -> T:
        import redis
        wanted = [(i, self.stored(k)) for i, k in enumerate(keys) if k is not None]
        names = [name for _, name in wanted]

        def body(client):
            with client.pipeline(transaction=True) as pipe:
                for _ in range(WATCH_RETRIES):
                    try:
                        if names:
                            pipe.watch(*names)
                        olds: Values = [None] * len(keys)
                        if names:
                            for (i, _), value in zip(wanted, pipe.mget(names)):
                                olds[i] = value
                        news, result = change(olds)
                        writes = [(self.stored(k), v) for k, v in zip(keys, news)
                                  if k is not None and v is not None]
                        for k, v in writes:
                            if not v:
                                raise ValueError("empty value for %r" % k)
                        if not writes:
                            pipe.reset()
                            return result
                        pipe.multi()
                        for k, v in writes:
                            when = self.expire_at(v)
                            if when is None:
                                pipe.set(k, v)
                            else:
                                pipe.set(k, v, exat=max(when, 1))
                        pipe.execute()
                        return result
                    except redis.exceptions.WatchError:
                        _pause()
                        continue
            raise StoreError("redis %s: %d concurrent changes of the same keys; giving up"
                             % (self.connection.url, WATCH_RETRIES))
        return self.connection.call(body)

    def get_many_batch(self, batches: list[list[bytes | None]]) -> list[Values]:
        """get_many() of each list of keys, in one round trip (a pipeline of
        MGETs): greylistd's store thread reads a turn's plans so."""
        stored = self.stored
        replies = self.connection.reads(
            [("MGET", *([stored(k) for k in keys if k is not None] or [self.prefix]))
             for keys in batches])
        found = []
        for keys, values in zip(batches, replies):
            values = iter(values)
            found.append([None if k is None else next(values) for k in keys])
        return found

    def update_batch(self, ops: list[tuple[list[bytes | None], Change]]) -> list[object]:
        """Each (keys, change) in order, as update_many would, in one
        optimistic transaction: WATCH every key, one MGET, the changes in
        order (each seeing the writes of those before it), then one
        MULTI/SET/EXEC; retried when another writer raced it."""
        import redis
        names = list(dict.fromkeys(self.stored(k) for keys, _ in ops for k in keys
                                   if k is not None))

        def body(client):
            with client.pipeline(transaction=True) as pipe:
                for _ in range(WATCH_RETRIES):
                    try:
                        if names:
                            pipe.watch(*names)
                        current = dict(zip(names, pipe.mget(names))) if names else {}
                        results: list[object] = []
                        writes: dict[bytes, bytes] = {}
                        for keys, change in ops:
                            olds = [None if k is None else current[self.stored(k)]
                                    for k in keys]
                            try:
                                news, result = change(olds)
                                mine = [(self.stored(k), v) for k, v in zip(keys, news)
                                        if k is not None and v is not None]
                                for _, v in mine:
                                    if not v:
                                        raise ValueError("empty value")
                            except Exception as exc:  # The op's own error.
                                results.append(exc)
                                continue
                            for name, v in mine:
                                current[name] = writes[name] = v
                            results.append(result)
                        if not writes:
                            pipe.reset()
                            return results
                        pipe.multi()
                        for name, v in writes.items():
                            when = self.expire_at(v)
                            if when is None:
                                pipe.set(name, v)
                            else:
                                pipe.set(name, v, exat=max(when, 1))
                        pipe.execute()
                        return results
                    except redis.exceptions.WatchError:
                        _pause()
                        continue
            raise StoreError("redis %s: %d concurrent changes of the same keys; giving up"
                             % (self.connection.url, WATCH_RETRIES))
        return self.connection.call(body)

    def scan(self, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to limit pairs in key order after after: one SCAN of the table
        per call (for greylistctl and the contract; items() walks it once)."""
        import heapq

        def body(client):
            keys = (self.key(name) for name in client.scan_iter(
                match=self.prefix + b"*", count=1000))
            chosen = heapq.nsmallest(limit, (k for k in keys if after is None or k > after))
            if not chosen:
                return []
            values = client.mget([self.stored(k) for k in chosen])
            return [(k, v) for k, v in zip(chosen, values) if v is not None]
        return self.connection.call(body)

    def items(self, batch: int = 1000):
        """All pairs, in no particular order: one SCAN of the table."""
        def body(client):
            found = []
            names = []
            for name in client.scan_iter(match=self.prefix + b"*", count=batch):
                names.append(name)
                if len(names) >= batch:
                    found.extend(zip(names, client.mget(names)))
                    names = []
            if names:
                found.extend(zip(names, client.mget(names)))
            return [(self.key(name), value) for name, value in found if value is not None]
        yield from self.connection.call(body)

    def delete_if(self, keys: list[bytes],
                  doomed: Callable[[bytes, bytes | None], bool]) -> int:
        """Each key judged and deleted atomically (WATCH, GET, MULTI/DEL/EXEC)."""
        import redis

        def body(client):
            deleted = 0
            with client.pipeline(transaction=True) as pipe:
                for k in keys:
                    name = self.stored(k)
                    for _ in range(WATCH_RETRIES):
                        try:
                            pipe.watch(name)
                            old = pipe.get(name)
                            # Judged even when absent, as the contract says.
                            if not doomed(k, old) or old is None:
                                pipe.reset()
                                break
                            pipe.multi()
                            pipe.delete(name)
                            deleted += pipe.execute()[0]
                            break
                        except redis.exceptions.WatchError:
                            _pause()
                            continue
            return deleted
        return self.connection.call(body)

    def get_many_nowait(self, keys: list[bytes | None]) -> Values | None:
        """None: a Redis read is a network round trip, which greylistd's
        event loop must never wait for; its store thread does it."""
        return None

    def info(self) -> dict[str, int]:
        def body(client):
            return sum(1 for _ in client.scan_iter(match=self.prefix + b"*", count=1000))
        return {"entries": self.connection.call(body)}
