"""The socket transport of greylistd: listeners and one session per connection.

DESCRIPTION
    bind() creates the listening sockets of the settings, in Postfix's
    notation (config.parse_listener): unix:PATH, with the configured
    mode and group, and inet:HOST:PORT. Before it binds a unix socket
    it takes a lock on PATH.lock and keeps it for the life of the
    process: asyncio's create_unix_server, like bind(2) after unlink,
    would silently take the socket of a live instance away from it.
    inherited() takes the sockets that systemd passes (LISTEN_PID,
    LISTEN_FDS, LISTEN_FDNAMES).

    Server serves one service (service.py) on every connection of its
    listeners, each connection with its own decoder and session: message
    state never leaks between connections. PolicyServer serves the SMTPD
    policy protocol; LearnServer the correspondent learners (the
    socketmap of a cleanup service, the outbound policy of the
    submission smtpd), whose plans also run in the store thread. A request is decided with
    the handler (handlers/policy.py); its plan runs in the store thread
    (stores/commit.py), so that new triples of many connections share
    one durable commit, and its reply is written only after that
    commit. Requests of one connection are answered in order; a slow,
    stalled or hostile client only holds its own coroutine. Idle
    connections are closed after greylist_idle_timeout, a reply that
    cannot be written within it closes the connection, and at
    greylist_max_connections a new connection is closed at once.

DIAGNOSTICS
    A warning and the connection closed, without a reply, for a
    protocol violation (SMTPD_POLICY_README), except a request with
    over-long attributes: the service's too_long() reply; one warning when the
    connection cap is reached, and an info line when there is room
    again. The handler's log line per decision.
"""

import asyncio
import errno
import fcntl
import os
import socket
import stat
import time
from typing import Callable

from greylist.config import Config, parse_listener
from greylist.core.message import Session
from greylist.handlers.policy import Answer, PolicyHandler
from greylist.log import Log
from greylist.protocols.policy import READ_SIZE, ProtocolError, RequestTooLong, format_reply
from greylist.protocols.postscreen import check as check_postscreen
from greylist.protocols.socketmap import NOTFOUND, PERMIT
from greylist.stores.base import StoreError
from greylist.stores.commit import Committer

DUNNO_REPLY = format_reply("DUNNO")
# The listen(2) backlog: Postfix's smtpd processes connect at most once
# each (default_process_limit 100); asyncio's default is 100 too.
BACKLOG = 512


class ListenerError(Exception):
    """A listener cannot be created; fatal at start."""


class Listener:
    """One bound listening socket and where it came from."""

    def __init__(self, spec: str, sock: socket.socket, lock_fd: int = -1) -> None:
        self.spec = spec
        self.sock = sock
        self.lock_fd = lock_fd


def bind(specs: tuple[str, ...], mode: int, uid: int, gid: int) -> list[Listener]:
    """Bind the listeners of specs; unix sockets get mode, and uid:gid
    (-1 keeps one). Raises ListenerError naming the listener."""
    listeners = []
    try:
        for spec in specs:
            kind, where = parse_listener("listener", spec)
            if kind == "unix":
                listeners.append(_bind_unix(spec, where, mode, uid, gid))
            else:
                listeners.append(_bind_inet(spec, *where))
    except BaseException:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


def _bind_unix(spec: str, path: str, mode: int, uid: int, gid: int) -> Listener:
    directory = os.path.dirname(path)
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ListenerError("%s: directory %s: %s" % (spec, directory, exc.strerror)) from None
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ListenerError("%s: refusing world-writable directory %s" % (spec, directory))
    lock_path = path + ".lock"
    try:
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
    except OSError as exc:
        raise ListenerError("%s: cannot open %s: %s" % (spec, lock_path, exc.strerror)) from None
    try:
        fcntl.lockf(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ListenerError("%s: another greylistd serves this socket (%s is locked)"
                                % (spec, lock_path)) from None
        raise ListenerError("%s: cannot lock %s: %s" % (spec, lock_path, exc.strerror)) from None
    try:
        # A socket left by an instance that is gone: ours to replace. Any
        # other kind of file is not.
        try:
            old = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(old.st_mode):
                raise ListenerError("%s: %s exists and is not a socket" % (spec, path))
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bind with no access, then open it up: never wider than mode.
            old_umask = os.umask(0o777)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            if uid != -1 or gid != -1:
                os.chown(path, uid, gid, follow_symlinks=False)
                os.fchown(lock_fd, uid, gid)
            os.chmod(path, mode, follow_symlinks=False)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        os.close(lock_fd)
        raise ListenerError("%s: %s" % (spec, exc.strerror or exc)) from None
    except BaseException:
        os.close(lock_fd)
        raise
    return Listener(spec, sock, lock_fd)


def _bind_inet(spec: str, host: str, port: int) -> Listener:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise ListenerError("%s: %s" % (spec, exc.strerror or exc)) from None
    return Listener(spec, sock)


def inherited(environ: dict[str, str]) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process, as (name, socket);
    empty unless LISTEN_PID is this process. The LISTEN_ variables are
    removed, so that no child takes them for its own."""
    try:
        if int(environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    found = []
    # SD_LISTEN_FDS_START is 3 (sd_listen_fds(3)).
    for index, fd in enumerate(range(3, 3 + min(count, 64))):
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        found.append((names[index] if index < len(names) and names[index] else "policy",
                      sock))
    return found


class Server:
    """One service on a daemon's connections: each connection gets the
    service's decoder and session, and answer() answers each request
    (subclasses)."""

    def __init__(self, service, committer: Committer, cfg: Config,
                 log: Log, metrics=None, clock: Callable[[], float] = time.time,
                 connections: dict | None = None) -> None:
        self.service = service       # the handler, stores, log, store failures
        self.committer = committer
        self.cfg = cfg
        self.log = log
        self.metrics = metrics
        self.clock = clock
        # Each open connection's task and writer; stopping: no new request.
        # (Shared between the servers of a daemon: one cap for all.)
        self.connections: dict[asyncio.Task, asyncio.StreamWriter] = (
            {} if connections is None else connections)
        self.stopping = False
        self._full = False
        self._servers: list[asyncio.AbstractServer] = []

    read_size = READ_SIZE

    async def answer(self, request, session) -> bytes:
        """The framed reply to one request; raises ProtocolError."""
        raise NotImplementedError

    def reconfigure(self, service, cfg: Config) -> None:
        """Use new settings (SIGHUP); connections keep their sessions."""
        self.service, self.cfg = service, cfg

    async def start(self, sockets: list[socket.socket]) -> None:
        """Serve the protocol on these listening sockets."""
        for sock in sockets:
            sock.setblocking(False)
            if sock.family == socket.AF_UNIX:
                # backlog again: asyncio listens anew, with 100 by default.
                server = await asyncio.start_unix_server(self._accept, sock=sock,
                                                         limit=READ_SIZE, backlog=BACKLOG)
            else:
                server = await asyncio.start_server(self._accept, sock=sock, limit=READ_SIZE,
                                                    backlog=BACKLOG)
            self._servers.append(server)

    def stop_accepting(self) -> None:
        """Close the listening sockets; connections go on."""
        for server in self._servers:
            server.close()

    async def drain(self, timeout_s: float) -> None:
        """Let each connection finish the request it is on, and take no
        new one: idle connections are closed now, busy ones after their
        reply; after timeout_s the rest are cut. No task is cancelled, so
        no request is abandoned half-way."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        for task, writer in list(self.connections.items()):
            if not getattr(task, "busy", False):
                writer.close()
        while self.connections and time.monotonic() < deadline:
            await asyncio.wait(list(self.connections), timeout=deadline - time.monotonic())
        for writer in list(self.connections.values()):
            writer.transport.abort()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=1.0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self.connections) >= self.cfg.max_connections:
            if not self._full:
                self._full = True
                self.log.warning("connection limit reached (greylist_max_connections = %d); "
                                 "closing new connections until one ends"
                                 % self.cfg.max_connections)
            writer.close()
            return
        if self.stopping:
            writer.close()
            return
        self.connections[task] = writer
        if self.metrics is not None:
            self.metrics.connections(len(self.connections))
        try:
            await self._serve(reader, writer, task)
        finally:
            self.connections.pop(task, None)
            if self.metrics is not None:
                self.metrics.connections(len(self.connections))
            if self._full and len(self.connections) < self.cfg.max_connections:
                self._full = False
                self.log.info("connections below the limit again (%d open)"
                              % len(self.connections))
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     task: asyncio.Task) -> None:
        decoder = self.service.Decoder()
        session = self.service.new_session()
        log = self.log
        task.busy = False
        try:
            while True:
                try:
                    attrs = decoder.next()
                except RequestTooLong as exc:
                    # Discarded whole: the fail-open reply; the connection
                    # goes on.
                    writer.write(self.service.too_long(exc))
                    continue
                if attrs is None:
                    try:
                        # asyncio.timeout, not wait_for: no task per read.
                        async with asyncio.timeout(self.cfg.idle_timeout_s):
                            data = await reader.read(self.read_size)
                    except TimeoutError:
                        log.debug(1, "closing a connection idle for %d s"
                                  % self.cfg.idle_timeout_s)
                        return
                    if not data:
                        if not self.stopping:
                            decoder.eof()
                        return
                    decoder.feed(data)
                    continue
                task.busy = True
                began = time.monotonic()
                writer.write(await self.answer(attrs, session))
                # A reply the socket took at once needs no drain.
                if writer.transport.get_write_buffer_size():
                    try:
                        async with asyncio.timeout(self.cfg.idle_timeout_s):
                            await writer.drain()
                    except TimeoutError:
                        log.warning("closing a connection whose client reads no replies")
                        return
                task.busy = False
                if self.metrics is not None:
                    self.metrics.latency(time.monotonic() - began)
                if self.stopping:
                    return
        except ProtocolError as exc:
            log.warning("%s; disconnecting without a reply" % exc)
        except (ConnectionError, OSError):
            log.debug(1, "client went away")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug: this connection ends without a reply (smtpd then uses
            # its default_action), the others go on.
            log.warning("internal error on a connection: %s: %s; disconnecting"
                        % (type(exc).__name__, exc))

class PolicyServer(Server):
    """The SMTPD policy service on a daemon's connections."""

    async def answer(self, attrs: dict[str, str], session: Session) -> bytes:
        """The reply to one request, its plan run in the store thread."""
        service = self.service
        handler: PolicyHandler = service.handler
        now = int(self.clock())
        step = handler.prepare(attrs, session, now, service.whitelists.exemptions(now))
        if not isinstance(step, Answer):
            try:
                outcome = await self.committer.plan(step.keys, step.change)
            except StoreError as exc:
                service.store_failed(exc)
                if self.metrics is not None:
                    self.metrics.store_failure()
                outcome = None
            step = handler.complete(step, outcome, session)
        answer = step
        if answer.table_write is not None and service.table is not None:
            try:
                await self.committer.write(service.table, *answer.table_write)
            except StoreError as exc:
                service.table_failed(exc)
        if answer.postscreen is not None and service.postscreen is not None:
            key, change = answer.postscreen
            try:
                await self.committer.plan([key], change, service.postscreen)
            except StoreError as exc:
                service.table_failed(exc)
        service.record(answer)
        if self.metrics is not None:
            self.metrics.answer(answer)
        return format_reply(answer.action)


class PostscreenServer(Server):
    """The postscreen policy callout (callout.py) on a daemon's
    connections. A verdict that needs the database waits for it at most
    callout.BUDGET_S; a later one is "ignore" (postscreen's own tests
    decide), and the read is left to finish on its own."""

    async def answer(self, attrs: dict[str, str], session) -> bytes:
        return self.service.format(await verdict(self.service, self.committer,
                                                 check_postscreen(attrs), self.clock,
                                                 self.metrics))


async def verdict(service, committer: Committer, address: str, clock, metrics=None):
    """The callout verdict for a client address, its read in the store thread
    within the budget; logged."""
    from greylist.callout import BUDGET_S
    from greylist.handlers.postscreen import Lookup
    now = int(clock())
    step = service.handler.prepare(address, now, service.whitelists.exemptions(now))
    if isinstance(step, Lookup):
        try:
            future = committer.plan(step.keys, step.change)
            if future.done():
                # Read in the event loop already (the common case): no
                # timer to arm.
                step = future.result()
            else:
                async with asyncio.timeout(BUDGET_S):
                    step = await future
        except TimeoutError:
            service.store_failed(StoreError("the database did not answer within %d ms"
                                            % (1000 * BUDGET_S)))
            step = service.handler.failed(address)
        except StoreError as exc:
            service.store_failed(exc)
            if metrics is not None:
                metrics.store_failure()
            step = service.handler.failed(address)
    service.log.info(step.line())
    return step


class LearnServer(Server):
    """A correspondent learner (service.SocketmapService or
    OutboundService) on a daemon's connections: its plans run in the
    store thread, so that the writes of many connections share commits,
    and the reply (always the same one) follows them."""

    read_size = 16384

    # The callout service that answers the socketmap's postscreen map.
    postscreen = None

    async def answer(self, request, session) -> bytes:
        service = self.service
        now = int(self.clock())
        if isinstance(request, tuple):
            if self.postscreen is not None and request[0] == self.cfg.socketmap_postscreen_name:
                return await self._screen(request[1])
            if request[0] in (self.cfg.socketmap_clients_name,
                              self.cfg.socketmap_correspondents_name):
                return await self._table(request[0], request[1])
            found, line = service.handler.lookup(request[0], request[1], session, now)
            reply = NOTFOUND
        else:
            found, line = service.handler.request(request, session, now)
            reply = DUNNO_REPLY
        service.note(line)
        # All plans of a request at once: they share one trip to the store
        # thread (and one commit per store).
        waiting = [(plan, self.committer.plan([plan.key], plan.change, store))
                   for plan in found if (store := service.target(plan)) is not None]
        for plan, future in waiting:
            try:
                result = await future
            except StoreError as exc:
                service.store_failed(exc)
                if self.metrics is not None:
                    self.metrics.store_failure()
                continue
            service.learned(plan, result)
        return reply

    async def _table(self, name: str, key: str) -> bytes:
        """A clients or correspondents map lookup, read in the store thread."""
        from greylist.handlers.learn import table_lookup
        from greylist.learning import live_entry
        service = self.service
        found = table_lookup(name, key, self.cfg)
        store = None if found is None else service.table_store(found[0])
        if store is None:
            return NOTFOUND
        try:
            values = await self.committer.plan([found[1]], lambda values: ([None], values[0]),
                                               store)
        except StoreError as exc:
            service.store_failed(exc)
            return NOTFOUND
        return live_entry(values, found[2], int(self.clock()))

    async def _screen(self, key: str) -> bytes:
        """A postscreen_access_list lookup: "OK permit" for a client the
        callout would pass, else NOTFOUND."""
        from greylist.handlers.postscreen import socketmap_address
        address = socketmap_address(key)
        if address is None:
            return NOTFOUND
        found = await verdict(self.postscreen, self.committer, address, self.clock,
                              self.metrics)
        return PERMIT if found.action == "pass" else NOTFOUND

