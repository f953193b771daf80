"""A reference client of the postscreen policy callout, as Wietse Venema designed it.

DESCRIPTION
    No Postfix release has the client side of the postscreen policy
    callout (the "rough design for the postscreen policy callout",
    postfix-users, September 2016; postfix-interop.md sections 5 and
    8.2). PolicyClient is that client side, written down exactly to the
    design so that tests can hold the server (greylist-postscreen under
    spawn(8), greylistd's greylist_postscreen_listen) to it:

    service     postscreen_policy_service: "unix:PATHNAME" or
                "inet:HOST:PORT" (numeric or symbolic; "[::1]:PORT" for
                an IPv6 host).
    timeout     postscreen_policy_timeout, in seconds: one deadline per
                request for everything it needs (waiting for a free
                connection, connecting, writing, reading the reply).
    default_action, default_ttl
                postscreen_policy_default_action (pass | ignore |
                enforce | drop) and postscreen_policy_default_ttl.

    query(client_address, server_address, client_port, server_port)
    sends one request: the four attributes as name=value lines and an
    empty line (extra=... adds attributes, for tests of the server's
    rule that unknown names are ignored), and reads one reply: name=value
    lines up to an empty line, with

    action      pass | ignore | enforce | drop (required);
    ttl         seconds, a decimal number; used with pass only, where a
                missing ttl means default_ttl ("With actions other than
                pass, postscreen ignores the ttl attribute");
    smtpd_service_name
                the opt-in extension (the seed's request to choose an
                smtpd profile per client): returned to the caller when
                present; it must be a master.cf service name.

    Other attributes in a reply are ignored. The Result has action, ttl
    (None unless the action is pass), service_name (None when absent)
    and error (None, or why the default was used).

    Connections are reused: once a reply is in, its connection serves
    later requests. When several queries are in progress at once (from
    several threads: the client is thread-safe), each takes its own
    connection, so that parallel queries use parallel connections, up to
    max_connections; the pool keeps the idle ones (last used first).

ERRORS
    As the design lists them, and each one gives the Result of
    default_action with default_ttl (the ttl only for pass) and the
    error text, and marks the connection broken (it is closed and never
    used again; the next request opens a new one):

    - connect failure, or no connection free within the timeout;
    - the connection is not ready to write (a write would block);
    - no complete reply within the timeout;
    - a malformed reply: a line without "=", no action or an unknown
      one, a pass ttl that is not a number, an invalid service name, a
      reply longer than MAX_REPLY_BYTES, or bytes after the reply;
    - the server closed the connection, in the middle of a reply or
      after a response ("It is an error for a policy server to close a
      connection after sending a response"): found when the connection
      is taken for the next request.

    The counters opened (connections opened) and broken (connections
    given up because of an error) let tests see the pool at work.
"""

import re
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

ACTIONS = ("pass", "ignore", "enforce", "drop")
MAX_REPLY_BYTES = 4096
SERVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Result(NamedTuple):
    """One callout answer, or the default with the error that caused it."""

    action: str
    ttl: int | None
    service_name: str | None = None
    error: str | None = None


class CalloutError(Exception):
    """Why a request could not be completed (the default is used)."""


class PolicyClient:
    """The postscreen side of the callout; see the module description."""

    def __init__(self, service: str, timeout: float = 1.0, default_action: str = "ignore",
                 default_ttl: int = 86400, max_connections: int = 100) -> None:
        if default_action not in ACTIONS:
            raise ValueError("not a postscreen action: %r" % default_action)
        self.service = service
        self.timeout = timeout
        self.default_action = default_action
        self.default_ttl = default_ttl
        self.max_connections = max_connections
        self.opened = 0
        self.broken = 0
        self._idle: list[socket.socket] = []
        self._count = 0   # Connections open: idle or carrying a request.
        self._closed = False
        self._changed = threading.Condition(threading.Lock())

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections; busy ones close when their request ends."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._changed.notify_all()
        for sock in idle:
            sock.close()

    @property
    def idle(self) -> int:
        """Connections kept for later requests."""
        with self._changed:
            return len(self._idle)

    def query(self, client_address: str, server_address: str, client_port: int | str,
              server_port: int | str, extra: dict[str, str] | None = None) -> Result:
        """The answer to one callout request (the default after an error)."""
        attrs = {"client_address": client_address, "server_address": server_address,
                 "client_port": str(client_port), "server_port": str(server_port)}
        attrs.update(extra or {})
        request = "".join("%s=%s\n" % item for item in attrs.items()) + "\n"
        deadline = time.monotonic() + self.timeout
        try:
            sock = self._take(deadline)
        except CalloutError as exc:
            return self._default(str(exc))
        try:
            result = self._exchange(sock, request.encode("utf-8", "surrogateescape"),
                                    deadline)
        except CalloutError as exc:
            self._drop(sock)
            return self._default(str(exc))
        except OSError as exc:
            self._drop(sock)
            return self._default("policy service %s: %s" % (self.service, exc))
        self._give_back(sock)
        return result

    def query_all(self, requests: list[tuple], workers: int = 10) -> list[Result]:
        """Answers to requests ((client_address, server_address,
        client_port, server_port) each), workers of them in progress at
        once: as postscreen does with several clients at a time."""
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda request: self.query(*request), requests))

    # The pool.

    def _take(self, deadline: float) -> socket.socket:
        """An idle connection (checked that the server kept it), or a new one."""
        with self._changed:
            while True:
                if self._closed:
                    raise CalloutError("client closed")
                if self._idle:
                    sock = self._idle.pop()
                    break
                if self._count < self.max_connections:
                    self._count += 1
                    sock = None
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CalloutError("no policy service connection free within %s s"
                                       % self.timeout)
                self._changed.wait(left)
        if sock is None:
            try:
                return self._connect(deadline)
            except BaseException:
                self._forget()
                raise
        problem = _left_by_server(sock)
        if problem is not None:
            self._drop(sock)
            raise CalloutError("policy service %s: %s" % (self.service, problem))
        return sock

    def _give_back(self, sock: socket.socket) -> None:
        with self._changed:
            if not self._closed:
                self._idle.append(sock)
                self._changed.notify()
                return
            self._count -= 1
        sock.close()

    def _drop(self, sock: socket.socket) -> None:
        """Mark a connection broken: close it, never use it again."""
        sock.close()
        with self._changed:
            self.broken += 1
        self._forget()

    def _forget(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify()

    def _connect(self, deadline: float) -> socket.socket:
        kind, _, where = self.service.partition(":")
        left = max(deadline - time.monotonic(), 0.001)
        try:
            if kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(left)
                    sock.connect(where)
                except BaseException:
                    sock.close()
                    raise
            elif kind == "inet":
                host, _, port = where.rpartition(":")
                sock = socket.create_connection((host.strip("[]"), int(port)), timeout=left)
            else:
                raise CalloutError("policy service %s: not unix:PATH or inet:HOST:PORT"
                                   % self.service)
        except socket.timeout:
            raise CalloutError("policy service %s: no connection within %s s"
                               % (self.service, self.timeout)) from None
        except OSError as exc:
            raise CalloutError("policy service %s: cannot connect: %s"
                               % (self.service, exc.strerror or exc)) from None
        with self._changed:
            self.opened += 1
        return sock

    # One request.

    def _exchange(self, sock: socket.socket, request: bytes, deadline: float) -> Result:
        # "The policy server connection is not ready to write (write
        # would block)": one non-blocking write, which must take it all.
        sock.setblocking(False)
        try:
            sent = sock.send(request)
        except BlockingIOError:
            sent = 0
        if sent != len(request):
            raise CalloutError("policy service %s: not ready to write" % self.service)
        reply = b""
        while not (reply.startswith(b"\n") or b"\n\n" in reply):
            left = deadline - time.monotonic()
            if left <= 0:
                raise CalloutError("policy service %s: no reply within %s s"
                                   % (self.service, self.timeout))
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                continue
            try:
                chunk = sock.recv(MAX_REPLY_BYTES + 1)
            except BlockingIOError:
                continue
            if not chunk:
                raise CalloutError("policy service %s: connection closed %s"
                                   % (self.service, "in the middle of a reply" if reply
                                      else "before a reply"))
            reply += chunk
            if len(reply) > MAX_REPLY_BYTES:
                raise CalloutError("policy service %s: reply longer than %d bytes"
                                   % (self.service, MAX_REPLY_BYTES))
        end = reply.find(b"\n\n") + 2 if not reply.startswith(b"\n") else 1
        if end < len(reply):
            raise CalloutError("policy service %s: data after the reply" % self.service)
        return self._parse(reply[:end - 1])

    def _parse(self, block: bytes) -> Result:
        attrs: dict[str, str] = {}
        for line in block.decode("utf-8", "replace").split("\n")[:-1]:
            name, sep, value = line.partition("=")
            if not sep or not name:
                raise CalloutError("malformed reply line %r" % line[:100])
            attrs[name] = value
        action = attrs.get("action")
        if action not in ACTIONS:
            raise CalloutError("malformed reply: action %r" % action if action is not None
                               else "malformed reply: no action")
        ttl = None
        if action == "pass":
            text = attrs.get("ttl")
            if text is None or text == "":
                ttl = self.default_ttl
            elif text.isascii() and text.isdigit():
                ttl = int(text)
            else:
                raise CalloutError("malformed reply: ttl %r" % text[:100])
        service_name = attrs.get("smtpd_service_name") or None
        if service_name is not None and not SERVICE_NAME.fullmatch(service_name):
            raise CalloutError("malformed reply: smtpd_service_name %r" % service_name[:100])
        return Result(action, ttl, service_name)

    def _default(self, error: str) -> Result:
        return Result(self.default_action,
                      self.default_ttl if self.default_action == "pass" else None,
                      None, error)


def _left_by_server(sock: socket.socket) -> str | None:
    """Why an idle connection cannot carry a request, or None: the server
    closed it after its response, or sent something nobody asked for."""
    try:
        ready, _, _ = select.select([sock], [], [], 0)
        if not ready:
            return None
        sock.setblocking(False)
        data = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError as exc:
        return "connection lost after a response: %s" % (exc.strerror or exc)
    if not data:
        return "the server closed the connection after a response"
    return "data from the server without a request"
