"""greylistd: one event-driven server for greylist's services.

DESCRIPTION
    main() is the composition root of the daemon:

    1. Load the settings (the same file as greylist's), set up the log.
    2. Take the listening sockets: those systemd passes (socket
       activation; a socket named "metrics" serves metrics, "socketmap"
       the socketmap learner, "outbound" the outbound policy learner,
       "postscreen" the postscreen callout, any other the policy
       protocol), else bind greylist_policy_listen,
       greylist_socketmap_listen, greylist_outbound_listen,
       greylist_postscreen_listen and greylist_metrics_listen (transports/listener.py). A listener that
       cannot be created is fatal.
    3. Started as root: drop to greylist_user for good (supplementary
       groups cleared, then the group, then the user) before any
       database is opened; no request is ever served as root.
    4. Build the policy service (wiring.py) and its store thread
       (stores/commit.py), open the database, serve every connection
       with its own session (transports/listener.py), run a cleanup
       step every CLEANUP_TICK_S in the store thread, and tell systemd
       READY=1 when NOTIFY_SOCKET is set.

    It stays in the foreground and never forks. SIGHUP re-reads the
    settings and the whitelist files without dropping connections; if
    the new settings are invalid the old ones stay, and settings that
    only a restart can change (listeners, database, user, privacy) are
    named in a warning. SIGTERM and SIGINT stop accepting, let the
    requests in flight finish and the pending commit complete (at most
    DRAIN_S), and exit 0.

DIAGNOSTICS
    Fatal errors (settings, listeners, privileges) go to the log target
    and to stderr (log.py), and exit 1; usage errors exit 2. A bug is logged by
    an exception hook.
"""

import signal

# A ^C before the event loop takes SIGINT (while the modules below load,
# the settings are read, the listeners bound) ends greylistd as the
# default action does, without a traceback: nothing is served yet. An
# ignored SIGINT (nohup, a shell's background job) stays ignored.
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import asyncio
import errno
import os
import socket
import sys
import time

from docopt import DocoptExit, docopt

from greylist import __version__
from greylist.config import SETTINGS, Config, ConfigError, load, log_target
from greylist.log import Log, drop_to
from greylist.service import PolicyService
from greylist.stores.commit import BATCH_S, Committer
from greylist.transports import listener
from greylist.whitelist import Whitelists
from greylist import wiring
from greylist.wiring import Tuning, policy_service

USAGE = """\
greylist's services on sockets, for many connections at once.

Usage:
  greylistd [-v...] -c FILE
  greylistd --check -c FILE
  greylistd -h | --help
  greylistd --version

Options:
  -c FILE, --config FILE  Read settings from FILE (main.cf syntax), as
                          greylist and greylistctl do.
  -v, --verbose           Log more; repeat for more detail.
  --check                 Check the settings, as greylist --check does;
                          bind, open and create nothing.
  -h, --help              Show this help.
  --version               Show the version.
"""

# How long a stop waits for requests in flight and the pending commit.
DRAIN_S = 10.0
# Of DRAIN_S, what the store thread is left at least (a commit waits for
# a lock greylist_lock_timeout at most, 2 s by default).
STORE_STOP_S = 3.0
# The SIGHUPs that arrived before the event loop handled the signal.
_EARLY_HUP: list[int] = []
# How often a cleanup step is looked at (the step itself checks whether
# a pass is due, as in the policy processes).
CLEANUP_TICK_S = 1.0
# Settings that a reload does not change: they need a restart.
RESTART_ONLY = ("database", "policy_listen", "metrics_listen", "socketmap_listen",
                "outbound_listen", "postscreen_listen", "socket_mode", "socket_group",
                "user", "allow_root", "privacy", "secret_file", "client_table",
                "correspondent_table", "postscreen_table", "cleanup_state", "log",
                "log_hostname", "commit_batch", "lock_timeout_ms", "redis_timeout_ms",
                "redis_password_file", "redis_sentinel_password_file", "redis_tls_ca_file",
                "redis_tls_cert_file", "redis_tls_key_file")
# Service names of listeners (LISTEN_FDNAMES), and their settings.
SERVICES = (("policy", "policy_listen"), ("socketmap", "socketmap_listen"),
            ("outbound", "outbound_listen"), ("postscreen", "postscreen_listen"),
            ("metrics", "metrics_listen"))


def _setting_names(fields: list[str]) -> list[str]:
    """The settings (greylist_...) behind Config fields, each once; a
    derived field (the cleanup state) is named by its setting's."""
    names = {field: name for name, (field, _) in SETTINGS.items()}
    names["cleanup_state"] = "greylist_database"
    return list(dict.fromkeys(names.get(field, field) for field in fields))


# Errors of accept(2) that mean "out of descriptors or memory".
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
RESOURCE_LOG_S = 60.0
# Descriptors greylistd needs besides its connections: listeners, lock
# files, the database and tables, the log, the store thread's pipes.
FD_RESERVE = 64


def open_files_limit(max_connections: int, log: Log) -> None:
    """Raise the soft open-file limit to what max_connections needs (as
    far as the hard limit allows: systemd's soft default is 1024), and
    warn if it is still short."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("the open-file limit (%d) is below greylist_max_connections + %d (%d): "
                    "connections past it wait unserved; raise it (LimitNOFILE=)"
                    % (soft, FD_RESERVE, needed))


class Fatal(Exception):
    """A fatal error: logged, written to stderr, exit 1."""


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; return the exit status."""
    # A SIGHUP before the event loop takes it (a logrotate while greylistd
    # binds, opens its files and starts its services) must not kill it:
    # it is noted, and the reload done once greylistd serves.
    signal.signal(signal.SIGHUP, lambda signum, frame: _EARLY_HUP.append(signum))
    try:
        args = docopt(USAGE, argv=argv, version=__version__)
    except DocoptExit as exc:
        from greylist.cli.greylist import usage_error
        usage_error(exc, sys.argv[1:] if argv is None else argv, "greylistd")
        return 2
    if args["--check"]:
        from greylist.check import check
        return check(args["--config"], lambda: load(args["--config"], {}), daemon=True)
    try:
        cfg = load(args["--config"], {"verbose": args["--verbose"]})
    except ConfigError as exc:
        Log("greylistd", log_target(args["--config"])).fatal(str(exc))
        return 1
    log = Log("greylistd", cfg.log, cfg.verbose, host=cfg.log_hostname)
    sys.excepthook = lambda kind, value, tb: _log_bug(log, kind, value, tb)
    try:
        return asyncio.run(Daemon(cfg, args["--config"], log).run())
    except Fatal as exc:
        log.fatal(str(exc))
        return 1
    except KeyboardInterrupt:
        return 1
    finally:
        log.close()


class Daemon:
    """One greylistd process."""

    def __init__(self, cfg: Config, settings: str, log: Log) -> None:
        self.cfg = cfg
        self.settings = settings
        self.log = log
        self.stopping: asyncio.Event | None = None
        self.notify_socket = None
        self.servers: list = []
        self._resource_errors = 0
        self._resource_logged = 0.0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # asyncio's own reports (an exception nobody retrieved, say) go to
        # the log, not to stderr through the logging module.
        loop.set_exception_handler(self._asyncio_report)
        self.stopping = asyncio.Event()
        uid, gid = self._identity()
        open_files_limit(self.cfg.max_connections, self.log)
        socks, listeners = self._sockets(uid, gid)
        self.notify_socket = _notify_socket()
        _preload(self.cfg)
        self._drop(uid, gid)
        metrics = None
        if socks["metrics"]:
            from greylist.metrics import Metrics
            metrics = Metrics(self.log)
        # Lock waits within greylist_lock_timeout: one store thread serves
        # every connection, and smtpd gives up after 100 s with 451. A
        # trial commit before each file is used: an LMDB abort on a damaged
        # file (writecheck.py) would end every connection at once.
        tuning = Tuning(write_check=True)
        self.stores = found = wiring.stores(self.cfg, self.log, tuning)
        service = policy_service(self.cfg, self.log, tuning=tuning, found=found)
        committer = Committer(service.store, loop, batch_max=self.cfg.commit_batch,
                              batch_s=BATCH_S,
                              observe=None if metrics is None else metrics.commit)
        committer.start()
        await committer.call(service.open_store)
        for table in (found.correspondents, found.postscreen):
            if table is not None:
                await committer.call(lambda table=table: _open_quietly(table))
        # One connection table for all services: greylist_max_connections
        # caps them together.
        connections = listener.Connections()
        server = listener.PolicyServer(service, committer, self.cfg, self.log, metrics,
                                       connections=connections)
        await server.start(socks["policy"])
        self.servers = [server]
        for name, build in (("socketmap", wiring.socketmap_service),
                            ("outbound", wiring.outbound_service)):
            if socks[name]:
                learner = listener.LearnServer(
                    build(self.cfg, self.log, tuning=tuning, cleanup=False, found=found),
                    committer, self.cfg, self.log, metrics, connections=connections)
                learner.postscreen = getattr(learner.service, "postscreen", None)
                await learner.start(socks[name])
                self.servers.append(learner)
        if socks["postscreen"]:
            callout = listener.PostscreenServer(
                wiring.postscreen_service(self.cfg, self.log, tuning=tuning, found=found),
                committer, self.cfg, self.log, metrics, connections=connections)
            await callout.start(socks["postscreen"])
            self.servers.append(callout)
        metric_servers = await metrics.serve(socks["metrics"]) if metrics is not None else []
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._reload(server, service))
        if _EARLY_HUP:
            _EARLY_HUP.clear()
            self._reload(server, service)
        tick = loop.create_task(self._cleanup(committer, server))
        self.log.info("greylistd %s serving %s as uid %d"
                      % (__version__, ", ".join(listeners), os.getuid()))
        self._notify("READY=1\nSTATUS=serving")
        await self.stopping.wait()
        self._notify("STOPPING=1")
        self.log.info("stopping: no new connections; finishing %d"
                      % len(server.connections))
        for each in self.servers:
            each.stop_accepting()
            each.stopping = True
        for metric_server in metric_servers:
            metric_server.close()
        tick.cancel()
        # One bound for the whole stop: the connections' requests, then
        # what is queued in the store thread (the pending commit), with
        # at least STORE_STOP_S for the latter.
        deadline = time.monotonic() + DRAIN_S
        await server.drain(DRAIN_S - STORE_STOP_S)
        done = await loop.run_in_executor(None, committer.stop,
                                          max(deadline - time.monotonic(), STORE_STOP_S))
        if done:
            await loop.run_in_executor(None, self._close, server.service, found)
        else:
            # Its commit (a disk that stalls) holds the stores: closing them
            # would wait for it without bound. None of its work was answered
            # as done, and LMDB keeps the last commit, as after a crash.
            self.log.warning("the store thread did not finish within %d s; exiting without "
                             "closing the database" % DRAIN_S)
        self.log.info("stopped")
        return 0

    def _asyncio_report(self, loop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, asyncio.CancelledError):
            return
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRORS:
            # asyncio reports each failed accept(2) of the backlog at
            # EMFILE: hundreds a second. One warning a minute, counted.
            self._resource_errors += 1
            now = time.monotonic()
            if self._resource_logged and now - self._resource_logged < RESOURCE_LOG_S:
                return
            self._resource_logged = now
            self.log.warning("cannot accept connections: %s (%d times since the last "
                             "warning); clients wait unserved; raise the open-file limit "
                             "(LimitNOFILE=) or lower greylist_max_connections"
                             % (exc.strerror, self._resource_errors))
            self._resource_errors = 0
            return
        self.log.warning("asyncio: %s%s" % (context.get("message", ""),
                                             "" if exc is None else ": %r" % exc))

    def _identity(self) -> tuple[int, int]:
        """The uid and gid to serve as (-1: keep), checked before binding."""
        cfg = self.cfg
        gid = -1
        if cfg.socket_group:
            import grp
            try:
                gid = grp.getgrnam(cfg.socket_group).gr_gid
            except KeyError:
                raise Fatal("greylist_socket_group: no group %r" % cfg.socket_group) from None
        if os.geteuid() != 0:
            return -1, gid
        if not cfg.user:
            if cfg.allow_root:
                return -1, gid
            raise Fatal("started as root without greylist_user: set the unprivileged "
                        "user to serve as (greylist_allow_root = yes for tests)")
        import pwd
        try:
            entry = pwd.getpwnam(cfg.user)
        except KeyError:
            raise Fatal("greylist_user: no user %r" % cfg.user) from None
        if entry.pw_uid == 0:
            raise Fatal("greylist_user %r is root" % cfg.user)
        if entry.pw_gid == 0:
            raise Fatal("greylist_user %r has group root (gid 0): give it a group of its own"
                        % cfg.user)
        self._primary_gid = entry.pw_gid
        return entry.pw_uid, gid

    def _sockets(self, uid: int, gid: int) -> tuple[dict[str, list], list[str]]:
        """The listening sockets of each service (SERVICES), and their names."""
        socks: dict[str, list] = {name: [] for name, _ in SERVICES}
        names: list[str] = []
        try:
            passed = listener.inherited(os.environ)
        except listener.ListenerError as exc:
            raise Fatal("cannot listen: %s" % exc) from None
        for name, sock in passed:
            socks[name if name in socks else "policy"].append(sock)
            names.append("systemd:%s" % name)
        # A service that systemd passes no socket for keeps its setting's
        # listeners (metrics beside a socket unit's policy socket, say);
        # one it passes sockets for ignores the setting, with a warning.
        wanted = []
        for name, setting in SERVICES:
            if not getattr(self.cfg, setting):
                continue
            if socks[name]:
                self.log.warning("greylist_%s ignored: systemd passes the %s socket"
                                 % (setting, name))
            else:
                wanted.append((name, setting))
        if not any(socks[name] for name, _ in SERVICES if name != "metrics") and \
                not any(name != "metrics" for name, _ in wanted):
            raise Fatal("no listeners: set greylist_policy_listen (for example "
                        "unix:/run/greylist/policy), greylist_socketmap_listen, "
                        "greylist_outbound_listen or greylist_postscreen_listen, or start "
                        "greylistd from a systemd socket unit")
        self._listeners = []  # keeps their lock files open
        try:
            for name, setting in wanted:
                bound = listener.bind(getattr(self.cfg, setting), self.cfg.socket_mode,
                                      uid, gid)
                self._listeners.extend(bound)
                socks[name] = [each.sock for each in bound]
        except listener.ListenerError as exc:
            for each in self._listeners:
                each.sock.close()
            raise Fatal("cannot listen: %s" % exc) from None
        return socks, names + [each.spec for each in self._listeners]

    def _drop(self, uid: int, gid: int) -> None:
        """Drop root for good: groups, then gid, then uid (in that order:
        a process that is no longer root cannot change its groups). With
        greylist_log = postlog the group postdrop stays, or the log's
        socket could not be reached (log.drop_to())."""
        if uid == -1:
            return
        try:
            kept = drop_to(uid, getattr(self, "_primary_gid", gid), self.cfg.log)
        except OSError as exc:
            raise Fatal("cannot drop privileges to %s: %s" % (self.cfg.user, exc.strerror)) from None
        if os.getuid() == 0 or os.geteuid() == 0 or os.getgid() == 0 or \
                os.getegid() == 0 or sorted(set(os.getgroups()) - {os.getgid()}) != kept:
            raise Fatal("privileges were not dropped")
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise Fatal("could regain root after dropping privileges")

    async def _cleanup(self, committer: Committer, server: listener.PolicyServer) -> None:
        while True:
            await asyncio.sleep(CLEANUP_TICK_S)
            cleaner = server.service.cleaner
            if cleaner is not None:
                try:
                    await committer.call(cleaner.step)
                except Exception as exc:  # A step logs its own store errors.
                    self.log.warning("cleanup step: %s" % exc)

    def _reload(self, server: listener.PolicyServer, old: PolicyService) -> None:
        try:
            cfg = load(self.settings, {"verbose": self.cfg.verbose})
        except ConfigError as exc:
            self.log.warning("reload: %s; keeping the settings in force" % exc)
            return
        changed = [name for name in RESTART_ONLY if getattr(cfg, name) != getattr(self.cfg, name)]
        if changed:
            self.log.warning("reload: %s changed; that needs a restart, the old values stay"
                             % ", ".join(_setting_names(changed)))
            cfg = cfg._replace(**{name: getattr(self.cfg, name) for name in changed})
        current = server.service
        if current.cleaner is not None:
            current.cleaner.reconfigure(cfg)
        # Redis tables expire their values themselves, with the lifetimes
        # of the settings.
        if wiring.is_redis(cfg):
            found = self.stores
            for store in (found.raw, found.clients, found.correspondents, found.postscreen):
                if store is not None:
                    store.expire_at = wiring.redis_expiry(cfg, store.table)
        service = current.renewed(type(current.handler)(cfg, current.handler.host),
                                  Whitelists(cfg, self.log.warning))
        server.reconfigure(service, cfg)
        for other in self.servers[1:]:
            other.reconfigure(self._renewed(other.service, cfg), cfg)
            if getattr(other, "postscreen", None) is not None:
                other.postscreen = self._renewed(other.postscreen, cfg)
                other.service.postscreen = other.postscreen
        if cfg.max_connections != self.cfg.max_connections:
            open_files_limit(cfg.max_connections, self.log)
        self.cfg = cfg
        self.log.info("reload: settings and whitelists read again")

    def _renewed(self, service, cfg: Config):
        """A learner or callout service with new settings (SIGHUP): a new
        handler and whitelists, the same stores."""
        service.handler = type(service.handler)(cfg)
        service.cfg = cfg
        if hasattr(service, "whitelists"):
            service.whitelists = Whitelists(cfg, self.log.warning)
        return service

    def _close(self, service: PolicyService, found) -> None:
        service.close()
        service.store.close()
        for table in (found.clients, found.correspondents, found.postscreen):
            if table is not None:
                table.close()

    def _notify(self, state: str) -> None:
        if self.notify_socket is None:
            return
        try:
            self.notify_socket.send(state.encode("ascii"))
        except OSError as exc:
            self.log.warning("sd_notify: %s" % exc.strerror)


def _open_quietly(store) -> None:
    """Open a table now (created if missing, for Postfix's lookups); a
    failure is logged when the table is used."""
    from greylist.stores.base import StoreError
    try:
        store.open()
    except StoreError:
        pass


def _preload(cfg: Config) -> None:
    """Import now what the spawn path imports on first use: after the
    privilege drop the installation may not be readable (a Python under
    /root, say)."""
    import concurrent.futures.thread  # noqa: F401  (run_in_executor at stop)
    import hashlib, hmac, ipaddress, secrets, string, traceback  # noqa: F401,E401
    # Whatever greylist_client_match is: a SIGHUP may turn domain mode on
    # (the suffix list, and the codecs of internationalised names).
    import encodings.idna, encodings.punycode  # noqa: F401,E401
    from greylist.core.triple import registered_domain
    registered_domain("example.com")
    if cfg.metrics_listen:
        import greylist.metrics  # noqa: F401


def _notify_socket() -> socket.socket | None:
    """systemd's notification socket (sd_notify(3)), connected now, before
    privileges are dropped; None when NOTIFY_SOCKET is not set."""
    address = os.environ.pop("NOTIFY_SOCKET", "")
    if not address:
        return None
    if address[0] == "@":
        address = "\0" + address[1:]  # the abstract namespace
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        return None
    return sock


def _log_bug(log: Log, kind, value, tb) -> None:
    import traceback
    log.fatal("internal error: %s: %s" % (kind.__name__, value))
    for line in "".join(traceback.format_tb(tb)).splitlines():
        log.fatal("  " + line)


if __name__ == "__main__":
    sys.exit(main())
