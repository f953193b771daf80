"""A Redis store, for several mail hosts sharing one greylist.

DESCRIPTION
    RedisStore keeps one table (the database, the client table, the
    correspondent table or the postscreen table) in a Redis or Valkey
    server, behind the store interface of base.py, so every program works
    on it unchanged. greylist_database names the server:

        redis:unix:PATH                       a unix socket
        redis://HOST:PORT/DB                  TCP (DB optional, default 0)
        rediss://HOST:PORT/DB                 the same over TLS: the server's
                                              certificate checked against
                                              the system's CAs and those of
                                              greylist_redis_tls_ca_file,
                                              and its name against HOST;
                                              a client certificate from
                                              greylist_redis_tls_cert_file
                                              and _key_file
        redis-sentinel://HOST:PORT,HOST:PORT/MASTERNAME[/DB]
                                              the master that the Sentinels
                                              name, followed through
                                              failovers (DB default 0)
        rediss-sentinel://HOST:PORT,HOST:PORT/MASTERNAME[/DB]
                                              the same over TLS, to the
                                              sentinels and to the master,
                                              with rediss://'s checks and
                                              files (the master's name
                                              checked against the address
                                              that the sentinels give)

    A password, or an ACL user and password, comes from
    greylist_redis_password_file (one line: PASSWORD, or USER PASSWORD), a
    file readable only by its owner (the greylist user): never from the
    command line or the settings file. Sentinels that require a login
    of their own (sentinel.conf requirepass, or an ACL user) get the one
    in greylist_redis_sentinel_password_file, of the same form.

    Keys: a table's key k is stored as "greylist:TABLE:{TAG}k", where TAG
    is 8 hex digits of a digest of k's first "/"-separated field: the
    client group of a triple's three records, so that they would live in
    one cluster slot (not in privacy mode, whose keys are whole digests,
    nor with a correspondent pair's key; Redis Cluster is not supported);
    TAG has a fixed length, so the stored key gives k back.

    get_many() is one MGET, sent on a connection that the store keeps
    (Connection.reads). update_many() runs the pure change on the values
    that the store's last read returned for the same keys (a plan's
    snapshot: run_plan reads, then updates only when the change writes),
    else on one MGET, and sends the writes as one compare-and-set script
    (CAS_SCRIPT, EVALSHA): Redis sets them only if every key read still
    holds the value the change saw, atomically, and otherwise returns
    the current values, on which the change runs again, up to
    WATCH_RETRIES times. A new triple is so two round trips, its MGET
    and the script, the decision core unchanged and never in Lua.
    update_batch() does the same for many changes in one script. Each
    value is stored with an
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
import re
import stat
import threading
import time
from typing import Callable, NamedTuple, TypeVar

from greylist.stores.base import Change, Store, StoreError, Values

T = TypeVar("T")

# Optimistic writes (the compare-and-set script; WATCH in delete_if)
# retried at most this often, with a random pause of up to WATCH_PAUSE_S
# between WATCH tries: concurrent writers of the same keys (two hosts
# racing on one new triple) are rare, but a retry must not come back in
# lock step.
WATCH_RETRIES = 50
WATCH_PAUSE_S = 0.002
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
TIMEOUT_S = 0.3
PREFIX = b"greylist:"
# "{" + 8 hex digits + "}".
_TAG_BYTES = 10

# Compare-and-set. KEYS: the names the changes read; ARGV[1..n]: the
# value each change saw ("" for absent: a stored value is never empty);
# then for each key its new value ("" for none) and its EXAT ("0" for
# none). Writes only if every key still holds what was seen, and returns
# 1; else writes nothing and returns {0, the current values}. Atomic, as
# every script is; the decision stays in Python.
CAS_SCRIPT = b"""\
local n = #KEYS
local now, same = {}, true
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  now[i] = v
  if (v or '') ~= ARGV[i] then same = false end
end
if not same then
  local reply = {0}
  for i = 1, n do reply[i + 1] = now[i] end
  return reply
end
for i = 1, n do
  local v = ARGV[n + 2 * i - 1]
  if v ~= '' then
    local at = ARGV[n + 2 * i]
    if at == '0' then
      redis.call('SET', KEYS[i], v)
    else
      redis.call('SET', KEYS[i], v, 'EXAT', at)
    end
  end
end
return 1
"""
CAS_SHA = hashlib.sha1(CAS_SCRIPT).hexdigest().encode("ascii")


class RedisError(Exception):
    """A Redis setting that cannot be used (URL, password file)."""


def is_redis(database: str) -> bool:
    """Whether a greylist_database names a Redis server."""
    return database.startswith(("redis:unix:", "redis://", "rediss://", "redis-sentinel://",
                                "rediss-sentinel://"))


def parse_url(url: str) -> dict:
    """The connection of a Redis database name: {"unix": PATH}, {"host",
    "port", "db", "tls"} or {"sentinels": [(host, port)], "master": NAME,
    "tls"}.
    Raises RedisError."""
    if url.startswith("redis:unix:"):
        path = url[len("redis:unix:"):]
        if not path.startswith("/"):
            raise RedisError("%s: the socket must be an absolute path" % url)
        return {"unix": path}
    scheme, _, rest = url.partition("://")
    if "@" in rest or "?" in rest:
        # redis://user:password@host or ...?password=...: the usual forms
        # elsewhere; here the password belongs in a file only the run's
        # user can read, and the URL is logged with every failure. Looked
        # for in the whole URL (a password may hold "/"), and never quoted.
        where = rest.rpartition("@")[2].partition("?")[0]
        raise RedisError("%s://%s%s%s: a user, password or option in the URL is not used; "
                         "put a user and password in greylist_redis_password_file"
                         % (scheme, "...@" if "@" in rest else "", where,
                            "?..." if "?" in rest else ""))
    if scheme in ("redis", "rediss"):
        where, _, db = rest.partition("/")
        host, port = _host_port(url, where)
        if db and not (db.isdigit() and len(db) <= 5):
            raise RedisError("%s: the database must be a number" % url)
        return {"host": host, "port": port, "db": int(db or 0), "tls": scheme == "rediss"}
    if scheme in ("redis-sentinel", "rediss-sentinel"):
        where, _, master = rest.partition("/")
        master, _, db = master.partition("/")
        if not master:
            raise RedisError("%s: name the master after the sentinels (/MASTERNAME)" % url)
        if db and not (db.isdigit() and len(db) <= 5):
            raise RedisError("%s: the database after the master must be a number" % url)
        sentinels = [_host_port(url, each) for each in where.split(",") if each]
        if not sentinels:
            # Else every lookup fails, "No master found", with no sentinel asked.
            raise RedisError("%s: name at least one sentinel (HOST:PORT)" % url)
        return {"sentinels": sentinels, "master": master, "db": int(db or 0),
                "tls": scheme == "rediss-sentinel"}
    raise RedisError("%s: %s" % (url, FORMS))


# The forms of a Redis database name, for errors.
FORMS = ("not redis:unix:PATH, redis://HOST:PORT/DB, rediss://HOST:PORT/DB, "
         "redis-sentinel://HOST:PORT,.../MASTERNAME[/DB] or rediss-sentinel://HOST:PORT,.../MASTERNAME[/DB]")


def _host_port(url: str, where: str) -> tuple[str, int]:
    host, sep, port = where.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isdigit() and 0 < int(port) < 65536):
        raise RedisError("%s: %r is not HOST:PORT" % (url, where))
    return host, int(port)


def read_password_file(path: str, setting: str = "greylist_redis_password_file"
                       ) -> tuple[str | None, str]:
    """(user or None, password) from a password file (of setting); RedisError
    if it is missing, empty, or readable by anyone but its owner."""
    fd = _open_private(path, setting)
    try:
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    words = text.split()
    if len(words) == 1:
        return None, words[0]
    if len(words) == 2:
        return words[0], words[1]
    raise RedisError("%s %s: expected PASSWORD or USER PASSWORD on one line"
                     % (setting, path))


def check_readable_file(path: str, setting: str) -> None:
    """RedisError unless path is a regular file that this user may read (a
    TLS CA or client certificate: public, so a symbolic link is fine)."""
    os.close(_open_regular(path, setting, 0)[0])


def check_private_key(path: str, setting: str) -> None:
    """RedisError unless path is a regular file of this user that nobody
    else may read, and not encrypted (a TLS client key)."""
    fd = _open_private(path, setting)
    try:
        head = os.read(fd, 65536)
    finally:
        os.close(fd)
    # "BEGIN ENCRYPTED PRIVATE KEY" (PKCS #8) or "Proc-Type: 4,ENCRYPTED".
    if b"ENCRYPTED" in head:
        raise RedisError("%s %s: encrypted, and greylist has no pass phrase for it: "
                         "store the key unencrypted (mode 0600)" % (setting, path))


def check_tls_contents(tls: "Tls") -> None:
    """RedisError, naming the file and its setting, unless the CA file holds
    PEM certificates and the client certificate and key are PEM and belong
    together; else redis-py reports them at each connection as an X509
    or PEM error that names neither."""
    import ssl   # here: the spawn program without TLS never loads it

    def certificates(path: str, setting: str) -> None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        except (ssl.SSLError, ValueError) as exc:
            raise RedisError("%s %s: no PEM certificate in it (%s)"
                             % (setting, path, _ssl_reason(exc))) from None

    if tls.ca_file:
        certificates(tls.ca_file, "greylist_redis_tls_ca_file")
    if tls.cert_file and tls.key_file:
        certificates(tls.cert_file, "greylist_redis_tls_cert_file")
        try:
            # password "": an encrypted key fails here instead of asking
            # for its pass phrase (check_private_key refuses it first).
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                tls.cert_file, tls.key_file, password="")
        except (ssl.SSLError, ValueError) as exc:
            reason = _ssl_reason(exc)
            if "mismatch" in reason.lower():
                raise RedisError("greylist_redis_tls_key_file %s: not the key of "
                                 "greylist_redis_tls_cert_file %s (%s)"
                                 % (tls.key_file, tls.cert_file, reason)) from None
            raise RedisError("greylist_redis_tls_key_file %s: no PEM private key in it"
                             % tls.key_file) from None


def _ssl_reason(exc: Exception) -> str:
    """ssl's words for a failure, without its errno prefix."""
    if getattr(exc, "reason", None):
        return "%s: %s" % (exc.library, exc.reason) if exc.library else str(exc.reason)
    return str(exc)


def _open_private(path: str, setting: str) -> int:
    """A descriptor of path, opened without following a symbolic link;
    RedisError if it is missing, not a regular file, readable by others
    or another user's."""
    fd, st = _open_regular(path, setting, os.O_NOFOLLOW)
    try:
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise RedisError("%s %s: readable by others (chmod 0600, owned by the "
                             "greylist user)" % (setting, path))
        if st.st_uid != os.geteuid():
            raise RedisError("%s %s: owned by uid %d, not by this user (uid %d)"
                             % (setting, path, st.st_uid, os.geteuid()))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_regular(path: str, setting: str, flags: int) -> tuple[int, os.stat_result]:
    """A descriptor of path opened for reading (with flags), and its
    status; RedisError if it is missing or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags)
    except OSError as exc:
        raise RedisError("%s %s: %s" % (setting, path, exc.strerror)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RedisError("%s %s: not a regular file" % (setting, path))
    return fd, st


class Tls(NamedTuple):
    """The TLS files of a rediss:// or rediss-sentinel:// database ("": none)."""
    ca_file: str = ""     # the CAs the server's certificate is checked against
    cert_file: str = ""   # the client certificate, for tls-auth-clients
    key_file: str = ""    # its key: private, as a password file


class Connection:
    """One client for a Redis database name, shared by its tables, with the
    fail-fast back-off of the module description."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S, password_file: str = "",
                 sentinel_password_file: str = "", tls: Tls = Tls(),
                 notice: Callable[[str], None] | None = None) -> None:
        self.url = url
        # Told once when the server refuses scripts (see compare_and_set).
        self.notice = notice
        self.scripting = True
        self.where = parse_url(url)
        self.timeout_s = timeout_s
        self.password_file = password_file
        self.sentinel_password_file = sentinel_password_file
        self.tls = tls
        self._client = None
        self._mutex = threading.Lock()
        # The connection that every read and write of the hot path uses
        # (_exchange), and who may use it.
        self._kept = None
        # Reentrant: a WATCH ... EXEC holds it across its exchanges.
        self._kept_mutex = threading.RLock()
        self._down_until = 0.0
        self._backoff = 0.0
        self.failing = False
        # A host name that has not been looked up within the timeout since
        # the last failure (see _looked_up); None: an address, or a socket.
        host = self.where.get("host")
        self._name = None if host is None or _is_address(host) else host
        self._name_found = False

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
            # TLS: the same checks and files for the sentinels and for the
            # master (and the replica that a failover makes master).
            tls = self._tls_options() if where["tls"] else {}
            options.update(tls)
            sentinel = Sentinel(where["sentinels"], sentinel_kwargs=self._sentinel_options(tls))
            return sentinel.master_for(where["master"], db=where["db"], **options)
        if "unix" in where:
            return redis.Redis(unix_socket_path=where["unix"], **options)
        if where["tls"]:
            options.update(self._tls_options())
        return redis.Redis(host=where["host"], port=where["port"], db=where["db"], **options)

    def _sentinel_options(self, tls: dict) -> dict:
        """redis-py's options for a connection to a sentinel."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        # The sentinels' own connections get no retries either (redis-py's
        # default retries each one ten times, with pauses: seconds for one
        # sentinel that is down). A master lookup still asks them in turn:
        # at most one timeout per sentinel.
        login = {}
        if self.sentinel_password_file:
            try:
                login["username"], login["password"] = read_password_file(
                    self.sentinel_password_file, "greylist_redis_sentinel_password_file")
            except RedisError as exc:
                raise StoreError(str(exc)) from None
        return {"socket_timeout": self.timeout_s, "socket_connect_timeout": self.timeout_s,
                "retry": Retry(NoBackoff(), 0), "health_check_interval": 0, **login, **tls}

    def sentinel_answers(self) -> list[str]:
        """Each sentinel's answer to a lookup of the master, in full, for
        greylist --check: from redis-py 8 on, a failed lookup's error
        keeps only each sentinel's error class ("network:ConnectionError"),
        not why (a refused certificate, a refused connection)."""
        import redis
        where = self.where
        try:
            options = self._sentinel_options(self._tls_options() if where["tls"] else {})
        except StoreError as exc:
            return [str(exc)]
        answers = []
        for host, port in where["sentinels"]:
            name = ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)
            client = redis.Redis(host=host, port=port, **options)
            try:
                found = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                               where["master"])
                answer = ("master %s unknown" % where["master"] if not found else
                          "master %s at %s:%s" % (where["master"], *(
                              each.decode("utf-8", "replace") if isinstance(each, bytes)
                              else each for each in found)))
            except Exception as exc:  # noqa: BLE001 (each failure is an answer)
                answer = describe(exc)
            finally:
                client.close()
            answers.append("sentinel %s: %s" % (name, answer))
        return answers

    def _tls_options(self) -> dict:
        """redis-py's options for TLS: the server's certificate is always
        checked, its name too (redis-py 5 does not check the name by
        default)."""
        tls = self.tls
        try:
            # Else ssl's error names neither the file nor the setting, and
            # redis-py words it as a failure to connect ("Error 2
            # connecting to HOST:PORT. No such file or directory.").
            for path, setting in ((tls.ca_file, "greylist_redis_tls_ca_file"),
                                  (tls.cert_file, "greylist_redis_tls_cert_file")):
                if path:
                    check_readable_file(path, setting)
            if tls.key_file:
                check_private_key(tls.key_file, "greylist_redis_tls_key_file")
            check_tls_contents(tls)
        except RedisError as exc:
            raise StoreError(str(exc)) from None
        # ssl_password "": without one, OpenSSL asks for an encrypted key's
        # pass phrase on the terminal, or else on standard input (under
        # spawn(8) the policy socket), and waits.
        return {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True,
                "ssl_ca_certs": tls.ca_file or None, "ssl_certfile": tls.cert_file or None,
                "ssl_keyfile": tls.key_file or None, "ssl_password": ""}

    def call(self, body: Callable):
        """body(client), with Redis's errors as StoreError and the back-off."""
        client = self.client()
        if self._name is not None and not self._name_found:
            self._looked_up()
        try:
            result = body(client)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            # RedisError and OSError, and redis-py's own failures on a reply
            # it did not expect (a server or proxy that answers HELLO with
            # no map: AttributeError in its handshake): a failure of the
            # store like any other, not a crash of the process (under
            # spawn(8), smtpd's 451 for every connection).
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
        return self.call(lambda client: self._exchange(client, commands))

    def compare_and_set(self, names: list[bytes], seen: dict, writes: dict):
        """Set writes (name: (value, EXAT or None)) if each of names still
        holds its value in seen (None: absent), atomically, on the kept
        connection: 1, or [0, the current values of names]. By CAS_SCRIPT,
        loaded by EVAL when Redis does not have it (a new server, SCRIPT
        FLUSH, a failover). A server that refuses scripts (an ACL without
        EVALSHA and EVAL, or the commands renamed away) gets the same
        compare-and-set as WATCH, MGET, MULTI/SET/EXEC from then on, one
        round trip more, and the administrator is told once."""
        import redis

        def body(client):
            if not self.scripting:
                return self._watched_cas(client, names, seen, writes)
            args = [b"" if seen[name] is None else seen[name] for name in names]
            for name in names:
                value, when = writes.get(name, (b"", None))
                args += (value, b"0" if when is None else b"%d" % max(when, 1))
            try:
                try:
                    return self._exchange(
                        client, [("EVALSHA", CAS_SHA, len(names), *names, *args)])[0]
                except redis.exceptions.NoScriptError:
                    return self._exchange(
                        client, [("EVAL", CAS_SCRIPT, len(names), *names, *args)])[0]
            except redis.exceptions.ResponseError as exc:
                text = str(exc).lower()
                if not ("'evalsha'" in text or "'eval'" in text):
                    raise
                with self._mutex:   # told once, whichever thread saw it first
                    told, self.scripting = not self.scripting, False
                if not told and self.notice is not None:
                    self.notice("redis %s: scripts refused (%s); writing with WATCH and "
                                "MULTI/EXEC instead, one round trip more (allow EVALSHA "
                                "and EVAL: greylist(8))" % (self.url, describe(exc)))
                return self._watched_cas(client, names, seen, writes)
        return self.call(body)

    def _watched_cas(self, client, names: list[bytes], seen: dict, writes: dict):
        """compare_and_set() without a script: WATCH and MGET (one round
        trip), then MULTI/SET/EXEC (one more), retried when a watched key
        changed before EXEC."""
        if not names:
            return 1   # nothing to compare or set
        expected = [seen[name] for name in names]
        sets = [("SET", name, value) if when is None
                else ("SET", name, value, "EXAT", max(when, 1))
                for name, (value, when) in writes.items()]
        for _ in range(WATCH_RETRIES):
            # The connection is this thread's from WATCH to EXEC: another
            # thread's EXEC would end the watch.
            with self._kept_mutex:
                values = self._exchange(client, [("WATCH", *names), ("MGET", *names)])[1]
                if values != expected:
                    self._exchange(client, [("UNWATCH",)])
                    return [0, *values]
                done = self._exchange(client, [("MULTI",), *sets, ("EXEC",)])[-1]
            if done is not None:
                for each in done:
                    if isinstance(each, Exception):
                        raise each
                return 1
            _pause()
        raise StoreError("redis %s: %d concurrent changes of the same keys; giving up"
                         % (self.url, WATCH_RETRIES))

    def _exchange(self, client, commands: list[tuple]) -> list:
        """Send commands in one write on the kept connection and read their
        replies; on any error drop the connection (replies may be left
        unread on it) and raise."""
        with self._kept_mutex:
            try:
                conn = self._kept
                if conn is None:
                    conn = self._kept = _checkout(client.connection_pool)
                conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                return [conn.read_response() for _ in commands]
            except BaseException:
                self._drop_kept(client)
                raise

    def _drop_kept(self, client) -> None:
        conn, self._kept = self._kept, None
        if conn is not None:
            try:
                conn.disconnect()
                client.connection_pool.release(conn)
            except Exception:  # noqa: BLE001 (a broken connection)
                pass

    def _looked_up(self) -> None:
        """Look the host name up once within the timeout before redis-py
        connects by it: getaddrinfo has no timeout, and a DNS server that
        does not answer costs the resolver's 10 s or more at every
        (re)connect, far past greylist_redis_timeout. The lookup runs in a
        thread that is left to finish; a failure or a timeout is a store
        failure (back-off). Looked up again after each failure, when
        redis-py may connect anew."""
        import socket
        found: list = []

        def lookup() -> None:
            try:
                socket.getaddrinfo(self._name, self.where["port"], type=socket.SOCK_STREAM)
                found.append(None)
            except OSError as exc:
                found.append(exc)
        thread = threading.Thread(target=lookup, name="greylist-redis-lookup", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if not found or found[0] is not None:
            self.failed()
            raise StoreError("redis %s: looking up %s: %s" % (
                self.url, self._name, "no answer within %d ms" % (self.timeout_s * 1000)
                if not found else found[0]))
        self._name_found = True

    def failed(self) -> None:
        """Note a failure: back off before the next try."""
        self._name_found = False
        self.failing = True
        self._backoff = min(max(self._backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
        self._down_until = time.monotonic() + self._backoff

    def close(self) -> None:
        with self._mutex:
            if self._client is not None:
                with self._kept_mutex:
                    self._drop_kept(self._client)
                try:
                    self._client.close()
                except Exception:  # noqa: BLE001 (closing a broken client)
                    pass
                self._client = None


def _is_address(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


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
    if type(exc).__name__ == "MasterNotFoundError":
        text = _sentinel_errors(text)
    if "caused error:" in text:
        text = text.split("caused error:", 1)[1].strip()
    # Redis quotes the first arguments of an unknown command: keys, values.
    text = text.split(", with args beginning with:", 1)[0]
    # redis-py's Sentinel errors quote its client objects (kilobytes of
    # repr): the reprs go, and the line stays short.
    text = re.sub(r"<redis\.[^<>]*(?:<[^<>]*>[^<>]*)*>", "...", text)
    if len(text) > MAX_ERROR_TEXT:
        text = text[:MAX_ERROR_TEXT] + "..."
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


def _sentinel_errors(text: str) -> str:
    """MasterNotFoundError's text with each sentinel's client object (a
    repr of kilobytes) replaced by the sentinel's address; a login that
    the sentinels refused or want names the setting for it."""
    head, sep, rest = text.partition(" : ")
    parts = _SENTINEL_CLIENT.split(rest)[1:]
    if not sep or not parts:
        return text
    named = []
    for part in parts:
        at = _SENTINEL_AT.search(part)
        where = "?" if at is None else (at.group(3) or (
            # An IPv6 address in brackets, as the URL has it: "[::1]:26379".
            "[%s]:%s" if ":" in at.group(1) else "%s:%s") % (at.group(1), at.group(2)))
        # What follows the object: " - auth:AuthenticationError, " (or,
        # in older redis-py releases, " - ConnectionError(...), " or
        # ": ConnectionError(...), ").
        error = re.split(r"\)>|>>>", part)[-1].strip(" ,{}:-")
        named.append("sentinel %s %s" % (where, error) if error else "sentinel " + where)
    if any("AuthenticationError" in each for each in named):
        # First: a long list is cut at MAX_ERROR_TEXT.
        head += " (the sentinels' own login: greylist_redis_sentinel_password_file)"
    return "%s: %s" % (head, ", ".join(named))


# The start of a sentinel's client object: "<redis.client.Redis(<redis.
# connection.ConnectionPool(...)>)>" from redis-py 6 on, and in redis-py 5
# "Redis<ConnectionPool<Connection<host=H,port=P,db=0>>>".
_SENTINEL_CLIENT = re.compile(r"<redis\.client\.Redis\(|\bRedis<ConnectionPool<")
_SENTINEL_AT = re.compile(r"host=([^,()<>]+),port=(\d+)|path=([^,()<>]+)")

# The longest Redis error text that a log line quotes.
MAX_ERROR_TEXT = 300

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
        self.table = table
        self.name = "%s#%s" % (connection.url, table)
        self.path = self.name
        self.prefix = PREFIX + table.encode("ascii") + b":"
        self.expire_at = expire_at
        # The values that the last read returned, by Redis key: what a
        # plan's change saw, and the expected values of its
        # compare-and-set (which checks them, so a stale one costs only a
        # retry).
        self._seen: dict[bytes, bytes | None] = {}

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
        wanted = [self.stored(k) for k in keys if k is not None]
        if not wanted:
            return [None] * len(keys)
        values = self.connection.reads([("MGET", *wanted)])[0]
        self._seen = dict(zip(wanted, values))
        found = iter(values)
        return [None if k is None else next(found) for k in keys]

    def update_many(self, keys: list[bytes | None], change: Change) -> T:
        return self._apply([(keys, change)], strict=True)[0]

    def get_many_batch(self, batches: list[list[bytes | None]]) -> list[Values]:
        """get_many() of each list of keys, in one round trip (a pipeline of
        MGETs): greylistd's store thread reads a turn's plans so."""
        stored = self.stored
        commands = [[stored(k) for k in keys if k is not None] for keys in batches]
        replies = self.connection.reads([("MGET", *(names or [self.prefix]))
                                         for names in commands])
        seen: dict[bytes, bytes | None] = {}
        found = []
        for keys, names, values in zip(batches, commands, replies):
            seen.update(zip(names, values))
            values = iter(values)
            found.append([None if k is None else next(values) for k in keys])
        self._seen = seen
        return found

    def update_batch(self, ops: list[tuple[list[bytes | None], Change]]) -> list[object]:
        """Each (keys, change) in order, as update_many would (each seeing
        the writes of those before it), with one compare-and-set of all
        their keys: one round trip after the turn's reads."""
        return self._apply(ops, strict=False)

    def _apply(self, ops: list[tuple[list[bytes | None], Change]], strict: bool) -> list:
        """Run the changes in order on the values seen (the last read's,
        else one MGET), then compare-and-set their writes; on a mismatch
        run them again on the values the script returned. strict: an
        op's own error is raised (update_many), else it is that op's
        result (update_batch)."""
        stored = self.stored
        names = list(dict.fromkeys(stored(k) for keys, _ in ops for k in keys
                                   if k is not None))
        seen = self._seen
        current = {name: seen[name] for name in names} if all(
            name in seen for name in names) else None
        # Whether current was read now, not taken from an earlier read.
        fresh = False
        for attempt in range(WATCH_RETRIES):
            if current is None:
                current = dict(zip(names, self.connection.reads([("MGET", *names)])[0]
                                   if names else []))
                fresh = True
            state = dict(current)
            results: list[object] = []
            writes: dict[bytes, bytes] = {}
            for keys, change in ops:
                olds = [None if k is None else state[stored(k)] for k in keys]
                try:
                    news, result = change(olds)
                    mine = [(stored(k), v) for k, v in zip(keys, news)
                            if k is not None and v is not None]
                    for name, v in mine:
                        if not v:
                            raise ValueError("empty value for %r" % self.key(name))
                except Exception as exc:  # The op's own error.
                    if not strict:
                        results.append(exc)
                        continue
                    if fresh:
                        raise
                    # Raised on values read earlier: it must hold on the
                    # values read now.
                    break
                for name, v in mine:
                    state[name] = writes[name] = v
                results.append(result)
            else:
                if writes:
                    reply = self.connection.compare_and_set(names, current, {
                        name: (v, self.expire_at(v)) for name, v in writes.items()})
                    if reply == 1:
                        self._seen = state
                        return results
                    current, fresh = dict(zip(names, reply[1:])), True
                    if attempt:
                        # Lost again: others keep writing these keys (threads
                        # of one process take turns on its one connection,
                        # the fastest first). A random pause, then a fresh
                        # read, so that no writer loses every time.
                        _pause()
                        current = None
                    continue
                if fresh:
                    return results
            # Nothing to write, or an error, on values read earlier:
            # decide on values read now.
            current = None
        raise StoreError("redis %s: %d concurrent changes of the same keys; giving up"
                         % (self.connection.url, WATCH_RETRIES))

    def scan(self, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to limit pairs in key order after after: one SCAN of the table
        per call (for greylistctl and the contract; items() walks it once).
        A key that SCAN returns twice (Redis rehashed meanwhile) is taken
        once: the limit smallest distinct keys, kept in a sorted list."""
        import bisect

        def body(client):
            chosen: list[bytes] = []
            for name in client.scan_iter(match=self.prefix + b"*", count=1000):
                k = self.key(name)
                if after is not None and k <= after:
                    continue
                if len(chosen) == limit and (not chosen or k >= chosen[-1]):
                    continue
                at = bisect.bisect_left(chosen, k)
                if at < len(chosen) and chosen[at] == k:
                    continue
                chosen.insert(at, k)
                if len(chosen) > limit:
                    chosen.pop()
            if not chosen:
                return []
            values = client.mget([self.stored(k) for k in chosen])
            return [(k, v) for k, v in zip(chosen, values) if v is not None]
        return self.connection.call(body)

    def items(self, batch: int = 1000):
        """All pairs, in no particular order: one SCAN of the table, page
        by page (a SCAN and an MGET each), so that memory does not grow
        with the table. A key that SCAN returns twice (the table was
        rehashed meanwhile) is yielded twice."""
        match, cursor = self.prefix + b"*", 0
        while True:
            cursor, names = self.connection.call(
                lambda client: client.scan(cursor, match=match, count=batch))
            if names:
                values = self.connection.call(lambda client: client.mget(names))
                for name, value in zip(names, values):
                    if value is not None:
                        yield self.key(name), value
            if not cursor:
                return

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
                    else:
                        # Never a silent skip: the caller (greylistctl
                        # whitelist remove) would report a delete undone.
                        raise StoreError("redis %s: %d concurrent changes of %r; giving up "
                                         "after %d deleted" % (self.connection.url,
                                                               WATCH_RETRIES, k[:100], deleted))
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
