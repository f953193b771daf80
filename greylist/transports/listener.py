"""The socket transport of greylistd: listeners and one session per connection.

DESCRIPTION
    bind() creates the listening sockets of the settings, in Postfix's
    notation (config.parse_listener): unix:PATH, with the configured
    mode and group, and inet:HOST:PORT. Before it binds a unix socket
    it takes a lock on PATH.lock and keeps it for the life of the
    process: asyncio's create_unix_server, like bind(2) after unlink,
    would silently take the socket of a live instance away from it.
    inherited() takes the sockets that systemd passes (LISTEN_PID,
    LISTEN_FDS, LISTEN_FDNAMES); each must be a listening stream socket.

    Server serves one service (service.py) on every connection of its
    listeners, each connection with its own decoder and session: message
    state never leaks between connections. PolicyServer serves the SMTPD
    policy protocol; LearnServer the correspondent learners (the
    socketmap of a cleanup service, the outbound policy of the
    submission smtpd), whose plans also run in the store thread. A request is decided with
    the handler (handlers/policy.py); its plan runs in the store thread
    (stores/commit.py), so that new triples of many connections share
    one durable commit, and its reply is written only after that
    commit.

    A connection is an asyncio BufferedProtocol (Connection), not a
    stream and a coroutine, reading into one buffer that all connections
    share: data_received() feeds the decoder and answers each
    complete request at once when its reply is known without the store
    thread (a known record read in the event loop by Committer.plan, an
    exemption, a request that is not RCPT): no coroutine, no task, no
    timer per request. A request that needs the store thread (a write
    and its commit, or a read that could not be done in the loop) is
    finished by a callback when its future is done (a task only for the
    rare request that waits twice: a client-table write, a callout
    within its budget), and until its reply is written its connection
    answers nothing else: requests of one connection are answered in
    order. Input that arrives meanwhile is held up to MAX_HELD_BYTES
    (with what the decoder has not answered yet), then the connection is
    read no more until answering goes on; one whose client takes no
    replies (pause_writing) is read no more at once; a slow,
    stalled or hostile client only holds up its own connection.

    One periodic sweep (every SWEEP_S, at most a quarter of the
    timeout) closes connections idle for greylist_idle_timeout (no
    input and no reply; one that waits for the store thread is not
    idle), and those whose client has taken no reply for as long: they
    are closed up to one sweep late. At greylist_max_connections a new
    connection is closed at once.

DIAGNOSTICS
    A warning and the connection closed, without a reply, for a
    protocol violation (SMTPD_POLICY_README), except a request with
    over-long attributes: the service's too_long() reply; one warning when the
    connection cap is reached, and an info line when there is room
    again. A warning when a connection is closed because its client
    takes no replies, and for an internal error (a bug: that connection
    only is closed, without a reply). The handler's log line per
    decision.
"""

import asyncio
import errno
import fcntl
import os
import socket
import stat
import time
from functools import partial
from typing import Callable, Coroutine

from greylist.callout import BUDGET_S
from greylist.config import Config, parse_listener
from greylist.core.message import Session
from greylist.handlers.learn import table_lookup
from greylist.handlers.policy import Answer, PolicyHandler
from greylist.handlers.postscreen import Lookup, Verdict, socketmap_address
from greylist.learning import live_entry
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
# Input a connection may send ahead of its replies before it is read no
# more: smtpd, postscreen and cleanup wait for each reply
# (SMTPD_POLICY_README, socketmap_table(5)), so only a client that
# pipelines, or reads no replies, gets this far; four policy reads.
MAX_HELD_BYTES = 4 * READ_SIZE
# How much longer than its lock or Redis timeout a request waits for the
# store thread before it is answered as a store failure (Server._bounded).
PLAN_WAIT_MARGIN_S = 5.0
# How often the connections' last activity is looked at (at most a
# quarter of greylist_idle_timeout): an idle connection, or one whose
# client takes no reply, is closed at most this much after the timeout.
SWEEP_S = 1.0
SWEEP_MIN_S = 0.05


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
    directory = os.path.dirname(path) or "."
    _check_socket_directory(spec, directory, uid)
    lock_path = path + ".lock"
    lock_fd = _open_lock(spec, lock_path, uid)
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
            if _answers(path):
                # The lock file was removed under a live instance: its
                # socket is still served, and is not ours to take.
                raise ListenerError("%s: another process serves this socket (it accepts "
                                    "connections, though %s was not locked)"
                                    % (spec, lock_path))
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
                os.fchown(lock_fd, uid, gid)
            _set_owner_and_mode(spec, path, mode, uid, gid)
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


def _check_socket_directory(spec: str, directory: str, uid: int) -> None:
    """Refuse a socket directory that another user can write: one could
    put links where the lock file and the socket go, and have root (who
    binds before the privilege drop) chown their targets. Its owner must
    be root, this process's user or the user it drops to (uid)."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ListenerError("%s: directory %s: %s" % (spec, directory, exc.strerror)) from None
    if st.st_mode & (stat.S_IWOTH | stat.S_IWGRP):
        raise ListenerError("%s: refusing socket directory %s: %s can write it (mode %04o); "
                            "use a directory that only its owner can write"
                            % (spec, directory, "anyone" if st.st_mode & stat.S_IWOTH
                               else "its group", stat.S_IMODE(st.st_mode)))
    if st.st_uid not in (0, os.geteuid(), uid):
        raise ListenerError("%s: refusing socket directory %s: it belongs to uid %d, "
                            "neither root nor greylistd's user" % (spec, directory, st.st_uid))


def _answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket at path
    (a connect that succeeds; refused or timed out: a socket left over)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _open_lock(spec: str, lock_path: str, uid: int) -> int:
    """Open (or create, mode 0600) the lock file of a unix listener: never
    through a symbolic link, never a FIFO or device, never a file with
    other names (a hard link to someone's file) or another owner."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        reason = ("it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror)
        raise ListenerError("%s: cannot open %s: %s" % (spec, lock_path, reason)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 \
                or st.st_uid not in (os.geteuid(), uid):
            raise ListenerError("%s: refusing lock file %s: not a regular file of greylistd's "
                                "own with one name (owner uid %d, %d links); remove it"
                                % (spec, lock_path, st.st_uid, st.st_nlink))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _set_owner_and_mode(spec: str, path: str, mode: int, uid: int, gid: int) -> None:
    """chown and chmod the socket just bound at path, through a descriptor
    of the file checked to be that socket (O_PATH, then /proc/self/fd):
    the directory's owner cannot swap in another file between the check
    and the change."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise ListenerError("%s: %s changed after bind(2); not changing its owner or "
                                "mode" % (spec, path))
        link = "/proc/self/fd/%d" % fd
        if uid != -1 or gid != -1:
            os.chown(link, uid, gid)
        os.chmod(link, mode)
    finally:
        os.close(fd)


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
    removed, so that no child takes them for its own. Raises
    ListenerError for a descriptor that is not a listening stream socket."""
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
        name = names[index] if index < len(names) and names[index] else "policy"
        found.append((name, _listening(fd, name)))
    return found


def _listening(fd: int, name: str) -> socket.socket:
    """The passed descriptor fd as a listening stream socket; raises
    ListenerError for anything else (a unit with ListenDatagram=, or with
    Accept=yes, which passes a connection; a LISTEN_FDS too high)."""
    where = "systemd's descriptor %d (%s)" % (fd, name)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ListenerError("%s is not a socket" % where)
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenerError("%s: %s" % (where, exc.strerror)) from None
    os.set_inheritable(fd, False)
    if sock.type != socket.SOCK_STREAM:
        raise ListenerError("%s is not a stream socket (ListenStream=)" % where)
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ListenerError("%s is not a listening socket (the socket unit needs "
                            "Accept=no)" % where)
    return sock


class Connections(dict):
    """The open connections of a daemon (Connection: its transport), shared
    by its servers: one greylist_max_connections caps them all, and full
    says whether the cap's warning was given, for all of them at once."""

    full = False


class Server:
    """One service on a daemon's connections: each connection (Connection)
    gets the service's decoder and session, and respond() answers each
    request (subclasses)."""

    def __init__(self, service, committer: Committer, cfg: Config,
                 log: Log, metrics=None, clock: Callable[[], float] = time.time,
                 connections: "Connections | None" = None) -> None:
        self.service = service       # the handler, stores, log, store failures
        self.committer = committer
        self.cfg = cfg
        self.log = log
        self.metrics = metrics
        self.clock = clock
        # Each open connection and its transport; stopping: no new request.
        # (Shared between the servers of a daemon: one cap for all.)
        self.connections: Connections = Connections() if connections is None else connections
        self.stopping = False
        self._servers: list[asyncio.AbstractServer] = []
        self._own: set[Connection] = set()   # this server's connections, for the sweep
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def respond(self, request, session) -> "bytes | Pending":
        """The framed reply to one request, when it is known at once;
        otherwise Pending: (future, finish), where finish(future), once
        the future is done, returns the reply or another Pending. Raises
        ProtocolError (finish too)."""
        raise NotImplementedError

    def _bounded(self, future: asyncio.Future) -> asyncio.Future:
        """future, or a future that fails with StoreError once the store
        thread has not answered it for PLAN_WAIT_MARGIN_S past the lock
        or Redis timeout (a disk that stalls in fsync, frozen: each of
        the store's own waits is bounded, the commit itself is not). The
        plan still runs when the store comes back; the reply does not
        wait for it."""
        if future.done():
            return future
        waiter = self.loop.create_future()
        wait_s = max(self.cfg.lock_timeout_ms, self.cfg.redis_timeout_ms) / 1000
        wait_s += PLAN_WAIT_MARGIN_S

        def expire() -> None:
            if not waiter.done():
                waiter.set_exception(StoreError("the database did not answer within %d s"
                                                % wait_s))

        def copy(done: asyncio.Future) -> None:
            timer.cancel()
            if done.cancelled():
                if not waiter.done():
                    waiter.cancel()
                return
            exc = done.exception()  # Retrieved even when answered already.
            if waiter.done():
                return
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(done.result())
        timer = self.loop.call_later(wait_s, expire)
        future.add_done_callback(copy)
        return waiter

    def _task(self, coroutine: Coroutine) -> "Pending":
        """Pending for a coroutine that returns the reply: the rare requests
        that wait more than once (a table write, a callout's budget)."""
        return self.loop.create_task(coroutine), _result

    def reconfigure(self, service, cfg: Config) -> None:
        """Use new settings (SIGHUP); connections keep their sessions."""
        self.service, self.cfg = service, cfg

    async def start(self, sockets: list[socket.socket]) -> None:
        """Serve the protocol on these listening sockets."""
        self.loop = loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
            # backlog again: asyncio listens anew, with 100 by default.
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(self._connection, sock=sock,
                                                       backlog=BACKLOG)
            else:
                server = await loop.create_server(self._connection, sock=sock,
                                                  backlog=BACKLOG)
            self._servers.append(server)

    def _connection(self) -> "Connection":
        return Connection(self)

    def stop_accepting(self) -> None:
        """Close the listening sockets; connections go on."""
        for server in self._servers:
            server.close()

    async def drain(self, timeout_s: float) -> None:
        """Let each connection finish the request it is on, and take no
        new one: idle connections are closed now, busy ones after their
        reply; after timeout_s the rest are cut. No request waiting for
        the store thread is cancelled, so none is abandoned half-way."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        for connection in list(self.connections):
            if not connection.busy():
                connection.close()
        while self.connections and time.monotonic() < deadline:
            await asyncio.wait([each.ended() for each in self.connections],
                               timeout=deadline - time.monotonic())
        for transport in list(self.connections.values()):
            transport.abort()
        if self.connections:
            await asyncio.wait([each.ended() for each in self.connections], timeout=1.0)

    def _admit(self, connection: "Connection") -> bool:
        """Count a new connection in, unless the cap is reached or the
        daemon is stopping."""
        connections = self.connections
        if len(connections) >= self.cfg.max_connections:
            if not connections.full:
                connections.full = True
                self.log.warning("connection limit reached (greylist_max_connections = %d); "
                                 "closing new connections until one ends"
                                 % self.cfg.max_connections)
            return False
        if self.stopping:
            return False
        connections[connection] = connection.transport
        self._own.add(connection)
        if self.metrics is not None:
            self.metrics.connections(len(connections))
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_s(), self._sweep)
        return True

    def _forget(self, connection: "Connection") -> None:
        """A connection has ended: count it out."""
        connections = self.connections
        if connections.pop(connection, None) is None:
            return
        self._own.discard(connection)
        if self.metrics is not None:
            self.metrics.connections(len(connections))
        if connections.full and len(connections) < self.cfg.max_connections:
            connections.full = False
            self.log.info("connections below the limit again (%d open)" % len(connections))

    def _sweep_s(self) -> float:
        return max(SWEEP_MIN_S, min(SWEEP_S, self.cfg.idle_timeout_s / 4))

    def _sweep(self) -> None:
        """Close the connections idle for greylist_idle_timeout, and those
        whose client has not taken a reply for as long."""
        idle_s = self.cfg.idle_timeout_s
        now = time.monotonic()
        for connection in list(self._own):
            if connection.task is not None:
                continue  # Waiting for the store thread: not idle.
            if connection.stalled_at is not None:
                if now - connection.stalled_at >= idle_s:
                    self.log.warning("closing a connection whose client reads no replies")
                    connection.transport.abort()
            elif now - connection.input_began >= idle_s and not connection.closing \
                    and connection.decoder.in_request():
                # A request begun greylist_idle_timeout ago and not ended:
                # a byte now and then must not hold a connection for ever.
                self.log.warning("closing a connection whose request has not ended in %d s"
                                 % idle_s)
                connection.close()
            elif now - connection.last >= idle_s:
                if not connection.closing:
                    self.log.debug(1, "closing a connection idle for %d s" % idle_s)
                connection.close_idle()
        self._sweeper = (self.loop.call_later(self._sweep_s(), self._sweep)
                         if self._own else None)


# What respond() returns for a request that waits: a future, and what
# turns it into the reply (or into the next Pending).
Pending = tuple[asyncio.Future, Callable[[asyncio.Future], "bytes | Pending"]]


def _result(task: asyncio.Future):
    return task.result()


# What every connection reads into (asyncio.BufferedProtocol): the event
# loop reads one connection at a time, and buffer_updated() copies what
# came before the next read. asyncio's own data_received() path would
# allocate 256 KiB a read, a mapping of its own, which costs a policy
# request about 30 us (bench/RESULTS.md, run X).
_READ_BUFFER = memoryview(bytearray(READ_SIZE))


class Connection(asyncio.BufferedProtocol):
    """One connection of a Server: its decoder, session and flow control.

    data_received() (called by buffer_updated() with what was read into
    the shared buffer) feeds the decoder and answers each complete request
    in order: at once when respond() has the reply (no coroutine, no
    task, no timer), else when the future it waits for is done (a
    callback), and meanwhile this connection answers nothing else;
    input that comes meanwhile is held, up to MAX_HELD_BYTES, and then
    reading pauses. A transport that stops taking replies
    (pause_writing) stops the answering and the reading too.
    """

    __slots__ = ("server", "transport", "decoder", "session", "last", "input_began",
                 "began", "task",
                 "finish", "held", "held_size", "reading", "stalled_at", "eof", "closing",
                 "lost", "_ended")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.decoder = None          # None: refused (over the cap, or stopping)
        self.session = None
        self.last = 0.0              # monotonic time of the last input or reply
        self.input_began = 0.0       # when the input not yet answered began
        self.began = 0.0             # when the request of task arrived
        # The future the request under way waits for, and what makes its reply.
        self.task: asyncio.Future | None = None
        self.finish = None
        self.held: list[bytes] = []  # input that came while answering was held up
        self.held_size = 0
        self.reading = True
        self.stalled_at: float | None = None    # since when the transport takes no replies
        self.eof = False
        self.closing = False
        self.lost = False
        self._ended: asyncio.Future | None = None

    # asyncio's calls.

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        server = self.server
        if not server._admit(self):
            self.closing = True
            transport.close()
            return
        self.decoder = server.service.Decoder()
        self.session = server.service.new_session()
        self.last = time.monotonic()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_READ_BUFFER[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last = now = time.monotonic()
        if self.task is not None or self.stalled_at is not None:
            self._hold(data)
            return
        self._feed(data, now)
        self._answer(now)

    def eof_received(self) -> bool:
        self.eof = True
        if not self.closing and self.task is None and self.stalled_at is None:
            self._end()
        return True  # Keep the transport: replies may still be due.

    def pause_writing(self) -> None:
        self.stalled_at = time.monotonic()
        # A client that takes no replies is read no more: nothing it sends
        # could be answered meanwhile.
        if self.reading:
            self.reading = False
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.stalled_at = None
        self.last = now = time.monotonic()
        if self.task is None and not self.closing:
            self._resume(now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.closing = True
        if self.decoder is None:
            return
        if exc is not None:
            self.server.log.debug(1, "client went away")
        if self.task is None:
            self._forget()

    # Answering.

    def _answer(self, began: float) -> None:
        """Answer the complete requests in the decoder, in order, until one
        must wait (for the store thread, or for the client to read)."""
        server = self.server
        decoder = self.decoder
        transport = self.transport
        while True:
            try:
                request = decoder.next()
                if request is None:
                    break
                reply = server.respond(request, self.session)
            except RequestTooLong as exc:
                # Discarded whole: the fail-open reply; the connection
                # goes on.
                transport.write(server.service.too_long(exc))
                if self.stalled_at is not None or transport.is_closing():
                    return
                continue
            except ProtocolError as exc:
                server.log.warning("%s; disconnecting without a reply" % exc)
                self.close()
                return
            except Exception as exc:
                self._failed(exc)
                return
            if type(reply) is not bytes:
                # The next request waits for this one.
                self.began = began
                self._wait(reply)
                return
            transport.write(reply)
            if server.metrics is not None:
                server.metrics.latency(time.monotonic() - began)
            if server.stopping:
                self.close()
                return
            if self.stalled_at is not None or transport.is_closing():
                return
        if self.eof:
            self._end()

    def _wait(self, pending: Pending) -> None:
        self.task, self.finish = pending
        self.task.add_done_callback(self._answered)

    def _answered(self, future: asyncio.Future) -> None:
        """The future of the request under way is done: its reply, or the
        next wait. Even a connection that was lost meanwhile finishes
        the request (its log line, its table writes)."""
        finish, self.task, self.finish = self.finish, None, None
        server = self.server
        reply = None
        if future.cancelled():
            self.close()  # The loop is shutting down.
        else:
            try:
                reply = finish(future)
            except ProtocolError as exc:
                server.log.warning("%s; disconnecting without a reply" % exc)
                self.close()
            except Exception as exc:
                self._failed(exc)
        if reply is not None:
            if type(reply) is not bytes:
                self._wait(reply)
                return
            if not self.closing:
                self.transport.write(reply)
                self.last = now = time.monotonic()
                if server.metrics is not None:
                    server.metrics.latency(now - self.began)
                if server.stopping:
                    self.close()
                elif self.stalled_at is None:
                    self._resume(now)
        if self.lost:
            self._forget()

    def _resume(self, now: float) -> None:
        """Answering may go on: take the input held meanwhile."""
        if self.server.stopping:
            self.close()
            return
        if self.held:
            data = b"".join(self.held) if len(self.held) > 1 else self.held[0]
            self.held, self.held_size = [], 0
            self._feed(data, now)
        self._answer(now)
        # Read again unless the requests not answered yet fill the budget
        # (a client that pipelines requests which wait for the store
        # thread: the decoder would grow by a held buffer per commit),
        # and never while the client takes no replies: the answers just
        # written may have filled the transport again (pause_writing).
        if not self.reading and not self.closing and self.stalled_at is None and (
                self.task is None or self.decoder.buffered() < MAX_HELD_BYTES):
            self.reading = True
            self.transport.resume_reading()

    def _feed(self, data: bytes, now: float) -> None:
        """Give data to the decoder; input that begins a request starts
        the clock of the cut-off of requests that never end."""
        if not self.decoder.in_request():
            self.input_began = now
        self.decoder.feed(data)

    def _hold(self, data: bytes) -> None:
        """Keep input until answering goes on; past MAX_HELD_BYTES, read no
        more (the client waits, as for a full socket buffer)."""
        self.held.append(data)
        self.held_size += len(data)
        if self.reading and self.held_size + self.decoder.buffered() >= MAX_HELD_BYTES:
            self.reading = False
            self.transport.pause_reading()

    def _end(self) -> None:
        """End of input, with every request answered."""
        if not self.server.stopping:
            try:
                self.decoder.eof()
            except ProtocolError as exc:
                self.server.log.warning("%s; disconnecting without a reply" % exc)
        self.close()

    def _failed(self, exc: BaseException) -> None:
        # A bug: this connection ends without a reply (smtpd then uses its
        # default_action), the others go on.
        self.server.log.warning("internal error on a connection: %s: %s; disconnecting"
                                % (type(exc).__name__, exc))
        self.close()

    # Ending.

    def busy(self) -> bool:
        """Whether a request is under way: waiting for the store thread, or
        its reply for the client to read."""
        return self.task is not None or self.stalled_at is not None

    def close(self) -> None:
        """Close after the replies written so far have gone."""
        self.closing = True
        self.transport.close()

    def close_idle(self) -> None:
        """Close an idle connection; replies it never read are dropped."""
        self.closing = True
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def ended(self) -> asyncio.Future:
        """A future done when the connection has ended."""
        if self._ended is None:
            self._ended = self.server.loop.create_future()
            if self.lost and self.task is None:
                self._ended.set_result(None)
        return self._ended

    def _forget(self) -> None:
        self.server._forget(self)
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)


def _read_only(values: list) -> tuple[list, object]:
    """A plan's change that only reads its keys."""
    return [None] * len(values), values


class PolicyServer(Server):
    """The SMTPD policy service on a daemon's connections."""

    def respond(self, attrs: dict[str, str], session: Session):
        """The reply to one request; its plan is read in the event loop
        when it can, else run in the store thread (Pending)."""
        service = self.service
        handler: PolicyHandler = service.handler
        now = int(self.clock())
        step = handler.prepare(attrs, session, now, service.whitelists.exemptions(now))
        if isinstance(step, Answer):
            return self._rest(service, step)
        future = self.committer.plan(step.keys, step.change)
        if not future.done():
            return self._bounded(future), partial(self._completed, service, session, step)
        return self._completed(service, session, step, future)

    def _completed(self, service, session: Session, step, future: asyncio.Future):
        """The answer of a request whose plan is done."""
        outcome = _plan_result(service, future, self.metrics)
        return self._rest(service, service.handler.complete(step, outcome, session))

    def _rest(self, service, answer: Answer):
        """An answer's client-table write and postscreen table plan, then
        its log line and reply."""
        if answer.table_write is not None and service.table is not None:
            return self._task(self._tables(service, answer))
        if answer.postscreen is not None and service.postscreen is not None:
            key, change = answer.postscreen
            future = self.committer.plan([key], change, service.postscreen)
            if not future.done():
                return self._bounded(future), partial(self._screened, service, answer)
            return self._screened(service, answer, future)
        return self._finish(service, answer)

    async def _tables(self, service, answer: Answer) -> bytes:
        """_rest() for an answer with a client-table write (through the
        store thread)."""
        key, change = answer.table_write
        try:
            await self._bounded(self.committer.plan([key], change, service.table))
        except StoreError as exc:
            service.table_failed(exc)
        if answer.postscreen is not None and service.postscreen is not None:
            key, change = answer.postscreen
            future = self._bounded(self.committer.plan([key], change, service.postscreen))
            try:
                await future
            except StoreError:
                pass  # _screened() reports it.
            return self._screened(service, answer, future)
        return self._finish(service, answer)

    def _screened(self, service, answer: Answer, future: asyncio.Future) -> bytes:
        try:
            future.result()
        except StoreError as exc:
            service.table_failed(exc)
        return self._finish(service, answer)

    def _finish(self, service, answer: Answer) -> bytes:
        service.record(answer)
        if self.metrics is not None:
            self.metrics.answer(answer)
        return format_reply(answer.action)


class PostscreenServer(Server):
    """The postscreen policy callout (callout.py) on a daemon's
    connections. A verdict that needs the database waits for it at most
    callout.BUDGET_S; a later one is "ignore" (postscreen's own tests
    decide), and the read is left to finish on its own."""

    def respond(self, attrs: dict[str, str], session):
        service = self.service
        found = verdict(service, self.committer, check_postscreen(attrs), self.clock,
                        self.metrics)
        if isinstance(found, Verdict):
            return service.format(found)
        return self._task(_formatted(service, found))


async def _formatted(service, later) -> bytes:
    return service.format(await later)


def verdict(service, committer: Committer, address: str, clock, metrics=None):
    """The callout verdict for a client address, logged, when it is known
    at once (its reads done in the event loop, the common case); else a
    coroutine that waits for the store thread within the budget and
    returns it."""
    now = int(clock())
    step = service.handler.prepare(address, now, service.whitelists.exemptions(now))
    # At most two reads: the client records, then (pool mode's IPv4
    # prefixes, domain mode) the postscreen table's entry of the address.
    while isinstance(step, Lookup):
        future = _lookup(service, committer, step)
        if not future.done():
            return _verdict_later(service, committer, address, future, metrics)
        step = _verdict_of(service, address, future, metrics)
    service.log.info(step.line())
    return step


def _lookup(service, committer: Committer, step: Lookup) -> asyncio.Future:
    """The plan of a callout Lookup, on the store it names (the daemon has
    the postscreen table whenever the handler asks for it: the setting
    needs a restart)."""
    return committer.plan(step.keys, step.change, service.table if step.table else None)


async def _verdict_later(service, committer: Committer, address: str,
                         future: asyncio.Future, metrics) -> Verdict:
    try:
        async with asyncio.timeout(BUDGET_S):
            await future
            step = _verdict_of(service, address, future, metrics)
            while isinstance(step, Lookup):
                future = _lookup(service, committer, step)
                await future
                step = _verdict_of(service, address, future, metrics)
    except TimeoutError:
        service.store_failed(StoreError("the database did not answer within %d ms"
                                        % (1000 * BUDGET_S)))
        step = service.handler.failed(address)
    except StoreError:
        step = _verdict_of(service, address, future, metrics)
    service.log.info(step.line())
    return step


def _verdict_of(service, address: str, future: asyncio.Future, metrics):
    """The verdict (or next Lookup) of a done read; the failure verdict for
    a store failure."""
    verdict = _plan_result(service, future, metrics)
    return service.handler.failed(address) if verdict is None else verdict


def _plan_result(service, future: asyncio.Future, metrics, failed=None):
    """The result of a done plan, or failed for a store failure, which is
    noted (the service's warning, the failure counter)."""
    try:
        return future.result()
    except StoreError as exc:
        service.store_failed(exc)
        if metrics is not None:
            metrics.store_failure()
        return failed


# A learner's result may be None (nothing written): its failure is this.
_FAILED = object()


class LearnServer(Server):
    """A correspondent learner (service.SocketmapService or
    OutboundService) on a daemon's connections: its plans run in the
    store thread, so that the writes of many connections share commits,
    and the reply (always the same one) follows them."""

    # The callout service that answers the socketmap's postscreen map.
    postscreen = None

    def respond(self, request, session):
        service = self.service
        now = int(self.clock())
        if isinstance(request, tuple):
            if self.postscreen is not None and request[0] == self.cfg.socketmap_postscreen_name:
                return self._screen(request[1])
            if request[0] in (self.cfg.socketmap_clients_name,
                              self.cfg.socketmap_correspondents_name):
                return self._table(request[0], request[1])
            found, line = service.handler.lookup(request[0], request[1], session, now)
            reply = NOTFOUND
        else:
            found, line = service.handler.request(request, session, now)
            reply = DUNNO_REPLY
        service.note(line)
        # All plans of a request at once: they share one trip to the store
        # thread (and one commit per store).
        waiting = [(plan, self._bounded(self.committer.plan([plan.key], plan.change, store)))
                   for plan in found if (store := service.target(plan)) is not None]
        return self._learning(service, waiting, reply)

    def _learning(self, service, waiting: list, reply: bytes):
        """Take the plans' results in order, until one is not done."""
        for index, (plan, future) in enumerate(waiting):
            if not future.done():
                return future, partial(self._learnt, service, waiting[index:], reply)
            self._learned(service, plan, future)
        return reply

    def _learnt(self, service, waiting: list, reply: bytes, future: asyncio.Future):
        self._learned(service, waiting[0][0], future)
        return self._learning(service, waiting[1:], reply)

    def _learned(self, service, plan, future: asyncio.Future) -> None:
        result = _plan_result(service, future, self.metrics, _FAILED)
        if result is not _FAILED:
            service.learned(plan, result)

    def _table(self, name: str, key: str):
        """A clients or correspondents map lookup, read in the event loop
        or the store thread."""
        service = self.service
        found = table_lookup(name, key, self.cfg)
        store = None if found is None else service.table_store(found[0])
        if store is None:
            return NOTFOUND
        future = self.committer.plan(found[1], _read_only, store)
        if not future.done():
            return self._bounded(future), partial(self._entry, service, found[2])
        return self._entry(service, found[2], future)

    def _entry(self, service, kind, future: asyncio.Future) -> bytes:
        try:
            values = future.result()
        except StoreError as exc:
            service.store_failed(exc)
            return NOTFOUND
        return live_entry(values, kind, int(self.clock()))

    def _screen(self, key: str):
        """A postscreen_access_list lookup: "OK permit" for a client the
        callout would pass, else NOTFOUND."""
        address = socketmap_address(key)
        if address is None:
            return NOTFOUND
        found = verdict(self.postscreen, self.committer, address, self.clock, self.metrics)
        if isinstance(found, Verdict):
            return PERMIT if found.action == "pass" else NOTFOUND
        return self._task(_permitted(found))


async def _permitted(later) -> bytes:
    return PERMIT if (await later).action == "pass" else NOTFOUND
