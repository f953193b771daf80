"""Building the parts a program uses from its settings, in one place.

DESCRIPTION
    Every program (greylist, greylistctl; greylistd later) builds its
    stores, whitelists and handler here, so that which store, which
    keys (plain or privacy-hashed), which client table and which
    cleanup state a setting selects is decided once:

    database()      the database as stored (for cleanup and dump), and
                    as handlers use it (privacy.HashedKeys when
                    greylist_privacy = yes).
    client_table()  the client table, or None (none, or privacy mode).
    correspondent_table()  the correspondent table, or None.
    policy_service()  the SMTPD policy handler with its stores,
                    whitelists, log, clock and cleaner (service.py).
    socketmap_service(), outbound_service()  the correspondent learners
                    (handlers/learn.py) with their stores.

    Tuning holds the tunables of the stores and of cleanup that tests
    and benchmarks change; programs use the defaults.
"""

import os
import time
from typing import Callable, NamedTuple

from greylist.config import Config, is_redis, resolve
from greylist.handlers.policy import PolicyHandler
from greylist.log import Log
from greylist.service import STORE_WARNING_INTERVAL_S, PolicyService
from greylist.stores.base import Store
from greylist.stores.cleanup import BATCH, BUDGET_S, DELETE_BATCH, Cleaner
from greylist.stores.lmdb import LmdbStore
from greylist.stores.lmdbenv import MAP_SIZE, REOPEN_DELAY_S, SAME_FILE_INTERVAL_S
from greylist.whitelist import CHECK_INTERVAL_S, Whitelists


class Tuning(NamedTuple):
    """Tunables; the defaults are the programs' (see each module)."""

    reopen_delay_s: float = REOPEN_DELAY_S
    map_size: int = MAP_SIZE
    same_file_interval_s: float = SAME_FILE_INTERVAL_S
    cleanup_batch: int = BATCH
    delete_batch: int = DELETE_BATCH
    cleanup_budget_s: float = BUDGET_S
    whitelist_check_s: float = CHECK_INTERVAL_S
    warning_interval_s: float = STORE_WARNING_INTERVAL_S
    # None: greylist_lock_timeout.
    lock_timeout_s: float | None = None
    # A trial commit in a child process at each open (writecheck.py).
    write_check: bool = False

    def store_options(self, cfg: Config) -> dict:
        return {"reopen_delay_s": self.reopen_delay_s, "map_size": self.map_size,
                "same_file_interval_s": self.same_file_interval_s,
                "write_check": self.write_check,
                "lock_timeout_s": cfg.lock_timeout_ms / 1000 if self.lock_timeout_s is None
                else self.lock_timeout_s}


DEFAULT = Tuning()


def host_name() -> str:
    """The host name for the X-Greylist header."""
    return os.uname().nodename


_connections: dict = {}


def redis_table(cfg: Config, table: str, log: Log | None = None):
    """A table of the Redis database of cfg, on the process's one
    connection to it, with the expiry of the table's entries (log: where
    the connection's one-time notices go)."""
    from greylist.stores.redisstore import Connection, RedisStore
    where = _redis_where(cfg)
    if where not in _connections:
        _connections[where] = Connection(*where)
    if log is not None and _connections[where].notice is None:
        _connections[where].notice = log.warning
    return RedisStore(_connections[where], table, redis_expiry(cfg, table))


def redis_connection(cfg: Config, notice: Callable[[str], None] | None = None):
    """A new connection to the Redis database of cfg."""
    from greylist.stores.redisstore import Connection
    return Connection(*_redis_where(cfg), notice=notice)


def _redis_where(cfg: Config) -> tuple:
    """Connection's arguments for the Redis database of cfg: also the key
    of the process's one connection to it."""
    from greylist.stores.redisstore import Tls
    return (cfg.database, cfg.redis_timeout_ms / 1000, cfg.redis_password_file,
            cfg.redis_sentinel_password_file,
            Tls(cfg.redis_tls_ca_file, cfg.redis_tls_cert_file, cfg.redis_tls_key_file))


def redis_expiry(cfg: Config, table: str) -> Callable[[bytes], int | None]:
    """The expiry of a Redis table's values under cfg's lifetimes: the
    first second at which LMDB's cleanup would drop a value (None: never).
    greylistd sets it again at SIGHUP (its lifetimes may change)."""
    from greylist.core import tables
    from greylist.core.decide import expire_at
    from greylist.core.record import decode
    if table == "db":
        def expiry(value: bytes) -> int | None:
            record = decode(value)
            return None if record is None else expire_at(record, cfg)
        return expiry
    lifetime = (cfg.correspondent_lifetime_s if table == "correspondents"
                else cfg.max_age_s)

    def stamped(value: bytes) -> int | None:
        return tables.stamp_expire_at(value, lifetime)
    return stamped


def database(cfg: Config, log: Log | None = None, readonly: bool = False,
             tuning: Tuning = DEFAULT, create_secret: bool = True) -> tuple[Store, Store]:
    """Return the database as stored, and as keyed by handlers.
    create_secret: whether a missing privacy secret is made (the policy
    programs do not make one for a Redis database: a host with a secret
    of its own would share nothing with the others, silently)."""
    cfg = resolve(cfg)
    if is_redis(cfg):
        raw = redis_table(cfg, "db", log)
    else:
        raw = LmdbStore(cfg.database, readonly=readonly,
                        warn=None if log is None else log.warning, private=True,
                        **tuning.store_options(cfg))
    if not cfg.privacy:
        return raw, raw
    from greylist.stores.privacy import HashedKeys
    return raw, HashedKeys(raw, cfg.secret_file, create=create_secret)


def client_table(cfg: Config, log: Log | None = None, readonly: bool = False,
                 tuning: Tuning = DEFAULT) -> Store | None:
    """Return the client table, or None when there is none."""
    cfg = resolve(cfg)
    if not cfg.client_table:
        return None
    if is_redis(cfg):
        return redis_table(cfg, cfg.client_table)
    return LmdbStore(cfg.client_table, readonly=readonly,
                     warn=None if log is None else log.warning, **tuning.store_options(cfg))


def postscreen_table(cfg: Config, log: Log | None = None, readonly: bool = False,
                     tuning: Tuning = DEFAULT) -> Store | None:
    """Return the postscreen table, or None when there is none."""
    cfg = resolve(cfg)
    if not cfg.postscreen_table:
        return None
    if is_redis(cfg):
        return redis_table(cfg, cfg.postscreen_table)
    return LmdbStore(cfg.postscreen_table, readonly=readonly,
                     warn=None if log is None else log.warning, **tuning.store_options(cfg))


def correspondent_table(cfg: Config, log: Log | None = None, readonly: bool = False,
                        tuning: Tuning = DEFAULT) -> Store | None:
    """Return the correspondent table, or None when there is none."""
    cfg = resolve(cfg)
    if not cfg.correspondent_table:
        return None
    if is_redis(cfg):
        return redis_table(cfg, cfg.correspondent_table)
    return LmdbStore(cfg.correspondent_table, readonly=readonly,
                     warn=None if log is None else log.warning, **tuning.store_options(cfg))


class Stores(NamedTuple):
    """The stores of a program: the database as stored and as keyed by
    handlers, the client table and the correspondent table (None: none)."""

    raw: Store
    keyed: Store
    clients: Store | None
    correspondents: Store | None
    postscreen: Store | None = None


def stores(cfg: Config, log: Log | None = None, tuning: Tuning = DEFAULT,
           store: Store | None = None) -> Stores:
    """Return the stores of the settings; store replaces the database as
    stored (tests and benchmarks give their own; privacy keys still apply)."""
    cfg = resolve(cfg)
    if store is None:
        raw, keyed = database(cfg, log, tuning=tuning, create_secret=not is_redis(cfg))
    else:
        raw = keyed = store
        if cfg.privacy:
            from greylist.stores.privacy import HashedKeys
            keyed = HashedKeys(store, cfg.secret_file)
    return Stores(raw, keyed, client_table(cfg, log, tuning=tuning),
                  correspondent_table(cfg, log, tuning=tuning),
                  postscreen_table(cfg, log, tuning=tuning))


def _cleaner(cfg: Config, log: Log, clock, tuning: Tuning, found: Stores) -> Cleaner | None:
    if is_redis(cfg):
        return None  # Redis expires entries itself.
    return Cleaner(found.raw, found.clients, cfg, log, clock, batch=tuning.cleanup_batch,
                   delete_batch=tuning.delete_batch, budget_s=tuning.cleanup_budget_s,
                   correspondents=found.correspondents, postscreen=found.postscreen)


def _learner(kind, cfg: Config, log: Log, clock, tuning: Tuning, cleanup: bool,
             store: Store | None, found: Stores | None):
    cfg = resolve(cfg)
    found = found or stores(cfg, log, tuning, store)
    cleaner = _cleaner(cfg, log, clock, tuning, found) if cleanup else None
    from greylist.handlers import learn
    from greylist import learning
    if kind == "socketmap":
        service = learning.SocketmapService(learn.SocketmapHandler(cfg), found.keyed,
                                            found.correspondents, log, clock, cleaner,
                                            tuning.warning_interval_s, clients=found.clients)
        service.postscreen = postscreen_service(cfg, log, clock, tuning, found=found)
        return service
    return learning.OutboundService(learn.OutboundHandler(cfg), found.keyed,
                                   found.correspondents, log, clock, cleaner,
                                   tuning.warning_interval_s)


def socketmap_service(cfg: Config, log: Log, clock: Callable[[], float] = time.time,
                      tuning: Tuning = DEFAULT, cleanup: bool = True,
                      store: Store | None = None, found: Stores | None = None):
    """Return the socketmap learner of greylist-socketmap (service.py);
    found: the stores to use (greylistd shares its own)."""
    return _learner("socketmap", cfg, log, clock, tuning, cleanup, store, found)


def outbound_service(cfg: Config, log: Log, clock: Callable[[], float] = time.time,
                     tuning: Tuning = DEFAULT, cleanup: bool = True,
                     store: Store | None = None, found: Stores | None = None):
    """Return the outbound policy learner of greylist --outbound."""
    return _learner("outbound", cfg, log, clock, tuning, cleanup, store, found)


def policy_service(cfg: Config, log: Log, clock: Callable[[], float] = time.time,
                   tuning: Tuning = DEFAULT, cleanup: bool = True,
                   store: Store | None = None, found: Stores | None = None) -> PolicyService:
    """Return the SMTPD policy service of a program.

    store replaces the database as stored (tests and benchmarks give
    their own); privacy keys still apply over it. found: the stores to
    use (greylistd shares its own between services).
    """
    cfg = resolve(cfg)
    found = found or stores(cfg, log, tuning, store)
    keyed, table = found.keyed, found.clients
    cleaner = _cleaner(cfg, log, clock, tuning, found) if cleanup else None
    return PolicyService(PolicyHandler(cfg, host_name()), keyed, table,
                         Whitelists(cfg, log.warning, tuning.whitelist_check_s), log, clock,
                         cleaner, tuning.warning_interval_s, found.postscreen)


def postscreen_service(cfg: Config, log: Log, clock: Callable[[], float] = time.time,
                       tuning: Tuning = DEFAULT, store: Store | None = None,
                       found: Stores | None = None):
    """Return the postscreen callout of greylist-postscreen (callout.py)."""
    cfg = resolve(cfg)
    found = found or stores(cfg, log, tuning, store)
    from greylist.callout import PostscreenService
    from greylist.handlers.postscreen import PostscreenHandler
    return PostscreenService(PostscreenHandler(cfg), found.keyed,
                             Whitelists(cfg, log.warning, tuning.whitelist_check_s), log,
                             clock, tuning.warning_interval_s, found.postscreen)
