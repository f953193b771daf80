"""greylistd's metrics in the Prometheus text format, on a loopback listener.

DESCRIPTION
    Metrics keeps prometheus_client collectors in a registry of its own:

      greylist_requests_total{action,reason}   answers, by action word
                                               and reason
      greylist_request_seconds                 request latency (decode
                                               to reply written)
      greylist_commit_batch_size               plans per group commit
      greylist_commit_seconds                  duration of a commit,
                                               lock wait included
      greylist_store_failures_total            answers that met a store
                                               failure
      greylist_connections                     open connections

    serve() answers "GET /metrics" (any path; HEAD too, without the
    body) on the listeners of greylist_metrics_listen, from the event
    loop: one short request per connection, read with a cap and a
    timeout, then closed. The text is rendered at most once every
    RENDER_EVERY_S; scrapes in between get the last one.

DIAGNOSTICS
    A well-formed request of another method gets 405 (Allow: GET, HEAD);
    anything else that is not a GET or HEAD within MAX_REQUEST bytes and
    TIMEOUT_S gets 400; the connection is closed after either. One warning when
    MAX_SCRAPERS scrapes are under way (a new one is closed at once),
    and an info line when there is room again.
"""

import asyncio
import re
import socket
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from greylist.log import Log

MAX_REQUEST = 8192
TIMEOUT_S = 5.0
# Scrapes served at once; more are closed at once (each lasts at most
# about 2 * TIMEOUT_S).
MAX_SCRAPERS = 16
# The longest that a scrape answers with the last render instead of a
# new one (see Metrics.text).
RENDER_EVERY_S = 0.5
# The text format that generate_latest() writes (Prometheus "Exposition
# formats", text format 0.0.4). Not CONTENT_TYPE_LATEST: in recent
# prometheus_client releases it names version 1.0.0, which the library's
# own server sends only to a scraper that asks for it.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# An HTTP request line (RFC 9112 3): a method token, a target, a version.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,20} [!-~]{1,2000} HTTP/[0-9]\.[0-9]\r?\n")


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """An HTTP request's head, to its empty line: lines end in CRLF, or
    in a bare LF, which RFC 9112 2.2 lets a server take as the end of a
    line (before, such a request waited TIMEOUT_S for a CRLF). ValueError
    beyond MAX_REQUEST bytes."""
    head = b""
    while True:
        line = await reader.readuntil(b"\n")
        head += line
        if len(head) > MAX_REQUEST:
            raise ValueError
        if line in (b"\r\n", b"\n"):
            return head


class Metrics:
    """The collectors of one daemon."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self._scrapers = 0
        self._full = False
        self._body: bytes | None = None
        self._rendered = 0.0
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("greylist_requests", "Policy answers by action and reason",
                                 ("action", "reason"), registry=self.registry)
        self._latency = Histogram("greylist_request_seconds", "Policy request latency",
                                  buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                                           0.1, 0.25, 1.0), registry=self.registry)
        self._batch = Histogram("greylist_commit_batch_size", "Plans per group commit",
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                registry=self.registry)
        self._commit = Histogram("greylist_commit_seconds", "Group commit duration",
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                                          0.1, 0.5), registry=self.registry)
        self._failures = Counter("greylist_store_failures", "Answers that met a store failure",
                                 registry=self.registry)
        self._connections = Gauge("greylist_connections", "Open policy connections",
                                  registry=self.registry)
        self._children: dict[tuple[str, str], object] = {}

    def answer(self, answer) -> None:
        """Count one answer (handlers/policy.py Answer)."""
        key = (answer.action.split(None, 1)[0], answer.decision.reason)
        child = self._children.get(key)
        if child is None:
            # Reasons such as protocol_state=X are few; cap them anyway.
            if len(self._children) >= 200:
                key = (key[0], "other")
            # A reason may hold what a client sent (protocol_state=X), with
            # bytes that were not UTF-8 kept as surrogates: the exposition
            # cannot encode those, and every later scrape would fail. They
            # are written as \udcXX, as in the log.
            child = self._children.setdefault(key, self._requests.labels(
                key[0], key[1].encode("utf-8", "backslashreplace").decode("utf-8")))
        child.inc()

    def latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def commit(self, size: int, seconds: float) -> None:
        self._batch.observe(size)
        self._commit.observe(seconds)

    def store_failure(self) -> None:
        self._failures.inc()

    def connections(self, count: int) -> None:
        self._connections.set(count)

    def text(self) -> bytes:
        """The metrics in the Prometheus text format, rendered at most once
        every RENDER_EVERY_S: a render costs milliseconds of the event
        loop (2.3 ms with 200 reasons), and a local user who scraped in a
        loop would otherwise take that time from every policy request."""
        now = time.monotonic()
        if self._body is None or now - self._rendered >= RENDER_EVERY_S:
            self._body, self._rendered = generate_latest(self.registry), now
        return self._body

    async def serve(self, sockets: list[socket.socket]) -> list[asyncio.AbstractServer]:
        """Answer scrapes on these listening sockets."""
        servers = []
        for sock in sockets:
            sock.setblocking(False)
            servers.append(await asyncio.start_server(self._scrape, sock=sock,
                                                      limit=MAX_REQUEST))
        return servers

    async def _scrape(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Scrapers are few: a flood of idle ones must not take the
        # descriptors the policy connections need (review).
        if self._scrapers >= MAX_SCRAPERS:
            if not self._full:
                self._full = True
                self.log.warning("metrics: %d scrapes under way; closing new scrape "
                                 "connections until one ends" % MAX_SCRAPERS)
            writer.transport.abort()
            return
        self._scrapers += 1
        try:
            await self._answer(reader, writer)
        finally:
            self._scrapers -= 1
            if self._full:
                self._full = False
                self.log.info("metrics: scrapes below the limit again")

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(_read_head(reader), TIMEOUT_S)
            if head.startswith((b"GET ", b"HEAD ")):
                body = self.text()
                # HEAD: the head of the answer to GET, without the body
                # (RFC 9110 9.3.2; a server must support both, 9.1).
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n" % (CONTENT_TYPE, len(body))
                             + (body if head.startswith(b"GET ") else b""))
            elif _REQUEST_LINE.match(head):
                # A well-formed request of another method (RFC 9110 15.5.6).
                writer.write(b"HTTP/1.0 405 Method Not Allowed\r\nAllow: GET, HEAD\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                raise ValueError
        except (ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            writer.write(b"HTTP/1.0 400 Bad Request\r\nConnection: close\r\n\r\n")
        except ConnectionError:
            pass
        try:
            await asyncio.wait_for(writer.drain(), TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        writer.close()
