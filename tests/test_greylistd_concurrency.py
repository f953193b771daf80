"""greylistd under concurrency: many connections, one store thread, group commit.

Every test runs real greylistd processes (tests/daemon.py) on real LMDB
files, on loopback sockets only; every loop is bounded in count and in
time. Triples come from tests.reliability.triple(): each has its own
sender and its own recipient token rcpt-TAGNNNNNN@, which is how a
database key (client group/sender/recipient) is tied back to its triple.

The strace tests (group commit, reply after commit) attach to the
running daemon with -f, so that the store thread is traced too; without
strace (or without ptrace) they skip, and fail under CI=true.
"""

import asyncio
import bisect
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from greylist.core.record import decode
from greylist.stores.lmdb import LmdbStore
from tests import daemon as daemons
from tests.conftest import require
from tests.reliability import (BAD_LOG, REPLY, SEED, Client, command, postmap_list,
                               record_figures, split_replies, triple, triple_request)

DELAY_S = 2  # tests/daemon.py writes greylist_delay = 2s


def defer_new(delay_s: int = DELAY_S) -> str:
    """The reply to a triple seen for the first time."""
    return "DEFER_IF_PERMIT Greylisted, please try again in %d seconds" % delay_s


class defer_retry:
    """Matches the reply to an early retry: 1 to delay_s seconds left."""

    def __init__(self, delay_s: int = DELAY_S) -> None:
        self.delay_s = delay_s
        self.pattern = re.compile(r"DEFER_IF_PERMIT Greylisted, please try again in "
                                  r"([1-9][0-9]*) seconds\Z")

    def match(self, action: str) -> bool:
        found = self.pattern.match(action)
        return found is not None and 1 <= int(found.group(1)) <= self.delay_s


DEFER_NEW = defer_new()
IO_S = 30.0
# A decision line of greylistd or of greylist (spawn).
DECISION = re.compile(r"greylistd?\[(\d+)\]: action=(\S+) reason=(\S+) age=(-?\d+) "
                      r"client=(\S*) sender=(\S*) rcpt=(\S*)$")


# Helpers.

def rcpt_of(key: bytes) -> str:
    """The recipient (triple token) of a triple's database key, or ""."""
    last = key.decode("utf-8", "surrogateescape").rsplit("/", 1)[-1]
    return last if last.startswith("rcpt-") else ""


def records(database) -> dict[str, tuple[int, int, int, str]]:
    """The triple records of a database (the daemon stopped or not), by
    recipient token: (first, last, count, state). Opens it with LmdbStore,
    as the programs do."""
    store = LmdbStore(str(database))
    try:
        store.open()
        found = {}
        for key, value in store.items():
            token = rcpt_of(key)
            if token:
                record = decode(value)
                assert record is not None, (key, value)
                assert token not in found, "two records for %s" % token
                found[token] = tuple(record)
        return found
    finally:
        store.close()


def postmap_records(postmap: str, database) -> dict[str, str]:
    """The triple records as postmap -s lists them (asserts a clean run)."""
    return {rcpt_of(k.encode()): v for k, v in postmap_list(postmap, str(database))
            if rcpt_of(k.encode())}


def rcpt(n: int, tag: str = "") -> str:
    return triple(n, tag)[2]


def clean_log(d: daemons.Daemon) -> str:
    text = d.log()
    bad = [line for line in text.splitlines()
           if any(word in line for word in BAD_LOG) or ": warning: " in line]
    assert not bad, bad
    return text


def decisions(log_text: str) -> list[tuple[int, str, str, str]]:
    """(pid, action, reason, recipient) of each decision line."""
    found = []
    for line in log_text.splitlines():
        match = DECISION.search(line)
        if match:
            found.append((int(match.group(1)), match.group(2), match.group(3),
                          match.group(7)))
    return found


def reasons_by_rcpt(log_text: str, pid: int | None = None) -> dict[str, list[str]]:
    """The decision reasons of the log, by recipient, in log order."""
    found: dict[str, list[str]] = {}
    for who, _action, reason, recipient in decisions(log_text):
        if pid is None or who == pid:
            found.setdefault(recipient, []).append(reason)
    return found


def connected(path: str) -> socket.socket:
    """A unix connection made with a blocking connect(2), which waits while
    the listen queue is full. (asyncio's own unix connect takes the EAGAIN
    of a full queue for a connection in progress and hands back a socket
    that is not connected; see test_listen_queue_holds_listener_backlog.)"""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Blocking (a socket timeout would make connect non-blocking), but
    # bounded: a unix connect waits at most SO_SNDTIMEO.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(IO_S), 0))
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def converse(path: str, requests: list[bytes], pipelined: bool = False,
                   start: asyncio.Event | None = None) -> tuple[list[str], bytes]:
    """One unix connection: the requests (one at a time, or all written at
    once), one reply read for each; then EOF, and what else came back
    before the daemon closed. Each reply must be exactly one well-formed
    reply: its action is returned. With start, the connection is made at
    once and the first request waits for start to be set."""
    reader, writer = await asyncio.open_unix_connection(sock=connected(path))
    try:
        if start is not None:
            await start.wait()
        if pipelined:
            writer.write(b"".join(requests))
            await writer.drain()
        actions = []
        for request in requests:
            if not pipelined:
                writer.write(request)
                await writer.drain()
            reply = await reader.readuntil(b"\n\n")
            parsed = split_replies(reply)
            assert parsed is not None and len(parsed) == 1, reply
            actions.append(parsed[0])
        writer.write_eof()
        rest = await reader.read()
        return actions, rest
    finally:
        writer.close()


async def together(coroutines_of_start, settle_s: float = 0.3) -> list:
    """Run the coroutines (made by coroutines_of_start(start)), let them
    all connect, then set start: their first requests leave together."""
    start = asyncio.Event()
    tasks = [asyncio.ensure_future(each) for each in coroutines_of_start(start)]
    await asyncio.sleep(settle_s)
    start.set()
    return await asyncio.gather(*tasks)


def run_all(coroutines, timeout: float = IO_S) -> list:
    """Run the coroutines at once, bounded by timeout; their results."""
    async def main():
        return await asyncio.wait_for(asyncio.gather(*coroutines), timeout)
    return asyncio.run(main())


def sleep_past_delay(since: float, delay_s: int = DELAY_S) -> None:
    """Sleep until the delay has passed for first-seen times taken before
    the monotonic time since (epoch seconds are truncated: a whole delay
    of real time is enough)."""
    left = since + delay_s + 0.1 - time.monotonic()
    if left > 0:
        time.sleep(left)


class LineClient:
    """A blocking socket client, one request at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def ask(self, data: bytes) -> str | None:
        """The action of one reply, or None if the connection ended (or
        broke) before a whole reply arrived."""
        try:
            self.sock.sendall(data)
            while b"\n\n" not in self.buffer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return None
                self.buffer += chunk
        except OSError:
            return None
        reply, _, self.buffer = self.buffer.partition(b"\n\n")
        match = REPLY.fullmatch(reply + b"\n\n")
        assert match is not None, reply
        return match.group(1).decode()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def launch(tmp_path):
    """launch(delay_s) starts greylistd in tmp_path/d; each is stopped
    (SIGTERM) at the end, and must exit 0."""
    started = []

    def launch(delay_s: int = DELAY_S) -> daemons.Daemon:
        extra = "" if delay_s == DELAY_S else "greylist_delay = %ds\n" % delay_s
        started.append(daemons.start(tmp_path / "d", extra))
        return started[-1]
    yield launch
    statuses = [(d.stop(), d.output()) for d in started]
    assert all(status == 0 for status, _ in statuses), statuses


@pytest.fixture
def greylistd(launch):
    return launch()


# 1. Many connections through the codec.

def test_200_connections_each_get_their_own_correct_replies(launch):
    delay_s = 3  # room for phase 1's early retries on a loaded machine
    d = launch(delay_s)
    conns = 200
    # Seeded triples (n in 0..199), first seen now, passed by phase 1.
    out = d.ask(b"".join(triple_request(n) for n in range(conns)))
    assert split_replies(out) == [defer_new(delay_s)] * conns
    seeded_at = time.monotonic()
    sleep_past_delay(seeded_at, delay_s)

    # Phase 1: each connection a new triple, its seeded one (passes), a
    # second new one, and its first new one again (an early retry): a
    # reply meant for another connection or request would not fit.
    def plan(i):
        a, b = 1000 + i, 2000 + i
        return [triple_request(a), triple_request(i), triple_request(b), triple_request(a)]
    results = run_all([together(lambda start: [converse(str(d.policy_path), plan(i),
                                                         start=start)
                                                for i in range(conns)])])[0]
    phase1_done = time.monotonic()
    for actions, rest in results:
        assert rest == b""
        assert actions[:3] == [defer_new(delay_s), "DUNNO", defer_new(delay_s)]
        assert defer_retry(delay_s).match(actions[3]), actions[3]

    # Phase 2, after the delay: both new triples pass, written at once.
    sleep_past_delay(phase1_done, delay_s)
    results = run_all([converse(str(d.policy_path),
                                [triple_request(1000 + i), triple_request(2000 + i)],
                                pipelined=True) for i in range(conns)])
    assert all(result == (["DUNNO", "DUNNO"], b"") for result in results)

    reasons = reasons_by_rcpt(clean_log(d))
    for i in range(conns):
        assert reasons[rcpt(i)] == ["new", "delay-passed"]
        assert reasons[rcpt(1000 + i)] == ["new", "early-retry", "delay-passed"]
        assert reasons[rcpt(2000 + i)] == ["new", "delay-passed"]
    assert d.stop() == 0
    found = records(d.database)
    assert len(found) == 3 * conns
    for i in range(conns):
        assert found[rcpt(i)][2:] == (2, "passed")
        assert found[rcpt(1000 + i)][2:] == (3, "passed")
        assert found[rcpt(2000 + i)][2:] == (2, "passed")


# Found by this test: PolicyServer.start passed no backlog= to asyncio, which
# listened again with 100.
def test_listen_queue_holds_listener_backlog(greylistd):
    """A burst of connections while the daemon is not accepting (stopped
    with SIGSTOP) is queued up to listener.BACKLOG, as bind() intends."""
    from greylist.transports.listener import BACKLOG
    d = greylistd
    burst = 300
    assert burst < BACKLOG
    queued, refused = [], 0
    os.kill(d.pid, signal.SIGSTOP)
    try:
        for _ in range(burst):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(d.policy_path))
            except BlockingIOError:
                refused += 1
                sock.close()
            else:
                queued.append(sock)
    finally:
        os.kill(d.pid, signal.SIGCONT)
        for sock in queued:
            sock.close()
    assert (len(queued), refused) == (burst, 0)


# 2. The same new triples on many connections at once.

def test_same_new_triples_on_50_connections_record_one_first_seen(launch, postmap):
    delay_s = 60  # nothing waits for it: every attempt must be deferred
    d = launch(delay_s)
    conns, triples = 50, 20
    rng = random.Random(SEED)
    orders = []
    for _ in range(conns):
        order = list(range(triples))
        rng.shuffle(order)
        orders.append(order)
    began = int(time.time())

    results = run_all([together(lambda start: [
        converse(str(d.policy_path), [triple_request(n) for n in order], pipelined=True,
                 start=start) for order in orders])])[0]
    ended = int(time.time()) + 1
    for actions, rest in results:
        assert rest == b"" and len(actions) == triples
        assert all(defer_retry(delay_s).match(action) for action in actions), actions

    reasons = reasons_by_rcpt(clean_log(d))
    for n in range(triples):
        # One connection saw it new; the 49 others saw that record.
        assert sorted(reasons[rcpt(n)]) == ["early-retry"] * (conns - 1) + ["new"]
    assert d.stop() == 0
    found = records(d.database)
    assert sorted(found) == sorted(rcpt(n) for n in range(triples))
    listed = postmap_records(postmap, d.database)
    for n in range(triples):
        first, last, count, state = found[rcpt(n)]
        assert (count, state) == (conns, "pending"), found[rcpt(n)]
        assert began <= first <= last <= ended
        assert listed[rcpt(n)] == "1:%d:%d:%d:pending" % (first, last, count)


# 3. spawn processes and greylistd on one database.

def test_spawn_processes_and_greylistd_share_one_database(launch, postmap):
    delay_s = 4  # the cross-checks before it must fit in it, also on a loaded machine
    d = launch(delay_s)
    writers, each = 4, 25
    spawn_n = {k: [100 * k + i for i in range(each)] for k in range(writers)}
    daemon_n = {k: [5000 + 100 * k + i for i in range(each)] for k in range(writers)}
    spawned = [Client(command(d.settings_path)) for _ in range(writers)]
    sockets = [LineClient(d.connect()) for _ in range(writers)]
    errors: list[str] = []
    answers: dict[str, list[str]] = {}
    lock = threading.Lock()
    done = threading.Event()
    listings = []

    def drive(ask, numbers):
        try:
            for n in numbers:
                action = ask(triple_request(n))
                with lock:
                    answers.setdefault(rcpt(n), []).append(action)
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    def read_while_written():
        deadline = time.monotonic() + IO_S
        while time.monotonic() < deadline and len(listings) < 200:
            try:
                listings.append(postmap_records(postmap, d.database))
            except AssertionError as exc:
                errors.append("postmap: %s" % exc)
            if done.is_set():
                return

    def phase(pairs):
        threads = [threading.Thread(target=drive, args=pair) for pair in pairs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(IO_S)
        assert not any(thread.is_alive() for thread in threads)

    reader = threading.Thread(target=read_while_written)
    reader.start()
    # At the same time: spawn processes and daemon connections, each on
    # its own new triples.
    phase([(c.ask, spawn_n[k]) for k, c in enumerate(spawned)]
          + [(c.ask, daemon_n[k]) for k, c in enumerate(sockets)])
    first_done = time.monotonic()
    # Each side at once sees the other's records: an early retry, not new.
    phase([(c.ask, daemon_n[k]) for k, c in enumerate(spawned)]
          + [(c.ask, spawn_n[k]) for k, c in enumerate(sockets)])
    done.set()
    reader.join(IO_S)
    assert not reader.is_alive() and not errors, errors
    assert len(listings) >= 1  # postmap read the file while it was written
    sleep_past_delay(first_done, delay_s)
    # After the delay, each side passes what the other saw first.
    phase([(c.ask, spawn_n[k]) for k, c in enumerate(sockets)]
          + [(c.ask, daemon_n[k]) for k, c in enumerate(spawned)])
    assert not errors, errors

    for client in spawned:
        status, stderr = client.close()
        assert (status, stderr) == (0, b"")
    for client in sockets:
        client.close()
    everyone = [n for k in range(writers) for n in spawn_n[k] + daemon_n[k]]
    for n in everyone:
        actions = answers[rcpt(n)]
        assert actions[0] == defer_new(delay_s), actions
        assert defer_retry(delay_s).match(actions[1]), actions
        assert actions[2] == "DUNNO", actions
    log_text = clean_log(d)
    reasons = reasons_by_rcpt(log_text)
    programs = {pid for pid, *_ in decisions(log_text)}
    assert d.pid in programs and len(programs) == writers + 1
    for n in everyone:
        assert reasons[rcpt(n)] == ["new", "early-retry", "delay-passed"], (n, reasons[rcpt(n)])
    assert d.stop() == 0
    found = records(d.database)
    listed = postmap_records(postmap, d.database)
    assert sorted(found) == sorted(listed) == sorted(rcpt(n) for n in everyone)
    for n in everyone:
        assert found[rcpt(n)][2:] == (3, "passed")
        assert listed[rcpt(n)] == "1:%d:%d:3:passed" % found[rcpt(n)][:2]


# strace: attach to a running daemon, all its threads.

class Strace:
    """strace -f -p PID into a file, for the time of a with block."""

    def __init__(self, pid: int, path, syscalls: str) -> None:
        self.pid = pid
        self.path = str(path)
        self.syscalls = syscalls
        self.proc = None

    def __enter__(self) -> "Strace":
        strace = shutil.which("strace")
        require(None if strace else "strace is not installed (Debian: strace)")
        self.proc = subprocess.Popen(
            [strace, "-f", "-ttt", "-T", "-s", "1024", "-e", "trace=" + self.syscalls,
             "-o", self.path, "-p", str(self.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        seen = b""
        while time.monotonic() < deadline and b"attached" not in seen:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.1)
            if ready:
                chunk = os.read(self.proc.stderr.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
        if b"attached" not in seen:
            self._end()
            require("strace cannot attach to greylistd: %r" % seen)
        return self

    def __exit__(self, *exc_info) -> None:
        time.sleep(0.05)  # the last replies' syscalls are written out
        self._end()

    def _end(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # detaches, the daemon goes on
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()

    def calls(self) -> list[tuple[int, float, float, str, str]]:
        """(tid, start, end, name, arguments) of each finished call."""
        return parse_strace(self.path)


TRACE_LINE = re.compile(r"(\d+)\s+(\d+\.\d+) (.*)\Z")
CALL = re.compile(r"(\w+)\((.*)\)\s+= (-?\d+)(?: [A-Z]\w+ \(.*\))? <(\d+\.\d+)>\Z", re.S)
RESUMED = re.compile(r"<\.\.\. (\w+) resumed>(.*)\Z", re.S)
QUOTED = re.compile(r'(\d+), "((?:[^"\\]|\\.)*)"(\.\.\.)?')


def parse_strace(path) -> list[tuple[int, float, float, str, str]]:
    calls, pending = [], {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            match = TRACE_LINE.match(line.rstrip("\n"))
            if match is None:
                continue
            tid, start, text = int(match.group(1)), float(match.group(2)), match.group(3)
            if text.endswith(" <unfinished ...>"):
                pending[tid] = (start, text[:-len(" <unfinished ...>")])
                continue
            resumed = RESUMED.match(text)
            if resumed:
                if tid not in pending:
                    continue  # began before strace attached
                start, head = pending.pop(tid)
                text = head + resumed.group(2)
            call = CALL.match(text)
            if call is None:
                continue  # signals, exits, calls without a duration
            name, args, _result, took = call.groups()
            calls.append((tid, start, start + float(took), name, args))
    return calls


def syncs(calls) -> list[tuple[int, float, float, str, str]]:
    return [call for call in calls if call[3] in ("fdatasync", "fsync")]


# 4. Group commit, counted.

def sequential(d: daemons.Daemon, numbers: list[int]) -> list[str]:
    client = LineClient(d.connect())
    try:
        return [client.ask(triple_request(n)) for n in numbers]
    finally:
        client.close()


def concurrent(d: daemons.Daemon, numbers: list[int], conns: int) -> list[str]:
    shares = [numbers[i::conns] for i in range(conns)]
    results = run_all([converse(str(d.policy_path), [triple_request(n) for n in share])
                       for share in shares])
    assert all(rest == b"" for _, rest in results)
    return [action for actions, _ in results for action in actions]


def test_group_commit_many_connections_share_durable_commits(greylistd, tmp_path):
    d = greylistd
    n = 400
    with Strace(d.pid, tmp_path / "one.trace", "fdatasync,fsync") as one:
        actions = sequential(d, list(range(n)))
    assert actions == [DEFER_NEW] * n
    with Strace(d.pid, tmp_path / "many.trace", "fdatasync,fsync") as many:
        actions = concurrent(d, list(range(10000, 10000 + n)), 32)
    assert actions == [DEFER_NEW] * n
    alone, shared = len(syncs(one.calls())), len(syncs(many.calls()))
    print("syncs for %d new triples: %d on 1 connection, %d on 32 connections"
          % (n, alone, shared))
    record_figures("greylistd_group_commit", triples=n, syncs_1_connection=alone,
                   syncs_32_connections=shared)
    # One request at a time: one durable commit (one fdatasync) per new
    # triple; this is what shows that the count can exceed the bound.
    assert 0.9 * n <= alone <= 1.1 * n + 5, alone
    # 32 at a time: commits are shared.
    assert shared < n / 2, shared
    clean_log(d)


# 5. No deferring reply before the commit of its triple.

def test_no_defer_reply_leaves_before_a_commit_after_its_request(launch, tmp_path):
    """For each DEFER reply (sendto on a client socket, in the event-loop
    thread) the first fdatasync of the store thread that began after its
    request was read (recvfrom returned) must have ended before the reply
    was written. Equivalently: between two fdatasync calls, only replies
    to requests read before the earlier one leave. This is the exact
    order property; it cannot tell which batch a request joined, so a
    reply that overtook its own commit while an unrelated commit ran in
    between would not be caught."""
    # Each connection's last request retries its first triple, which must
    # still be deferred: a delay that a loaded machine under strace cannot
    # outlast (with 2 s, one CI run saw a retry pass).
    d = launch(60)
    conns, each = 16, 10
    plans = [[triple_request(20000 + 100 * c + i) for i in range(each)]
             + [triple_request(20000 + 100 * c)] for c in range(conns)]
    with Strace(d.pid, tmp_path / "order.trace", "fdatasync,fsync,recvfrom,sendto") as trace:
        results = run_all([converse(str(d.policy_path), plan) for plan in plans])
    received = [action for actions, rest in results for action in actions]
    assert len(received) == conns * (each + 1)
    assert all(action.startswith("DEFER_IF_PERMIT") for action in received), \
        [action for action in received if not action.startswith("DEFER_IF_PERMIT")]
    calls = trace.calls()
    commits = syncs(calls)
    assert commits, "no fdatasync traced"
    assert len({tid for tid, *_ in commits}) == 1, "commits from more than one thread"
    store_tid = commits[0][0]
    assert store_tid != d.pid  # the store thread, not the event loop
    starts = [start for _, start, _, _, _ in commits]

    waiting: dict[int, list[float]] = {}  # fd -> read times of unanswered requests
    partial: dict[int, str] = {}
    replies = 0
    for tid, start, end, name, args in calls:
        if name not in ("recvfrom", "sendto"):
            continue
        quoted = QUOTED.match(args)
        if quoted is None:
            continue
        fd, text = int(quoted.group(1)), quoted.group(2)
        assert quoted.group(3) is None, "strace cut a string: raise -s"
        if name == "recvfrom":
            text = partial.get(fd, "") + text
            complete = text.count("\\n\\n")
            partial[fd] = text.rsplit("\\n\\n", 1)[-1]
            waiting.setdefault(fd, []).extend([end] * complete)
        elif text.startswith("action="):
            assert tid == d.pid
            assert waiting.get(fd), "a reply on fd %d without a request" % fd
            read_at = waiting[fd].pop(0)
            if text.startswith("action=DEFER_IF_PERMIT"):
                replies += 1
                index = bisect.bisect_left(starts, read_at)
                assert index < len(commits), "a defer reply with no commit after its request"
                assert commits[index][2] <= start, (
                    "a defer reply at %.6f before the end (%.6f) of the first commit "
                    "after its request (read at %.6f)" % (start, commits[index][2], read_at))
    assert replies == len(received)
    assert not any(waiting.values())
    clean_log(d)


# 6. SIGKILL at random moments.

def test_sigkill_at_random_moments_loses_no_acknowledged_triple(tmp_path, postmap):
    rng = random.Random(SEED)
    rounds, clients = 10, 8
    directory = tmp_path / "d"
    acked: dict[str, tuple[int, str]] = {}  # rcpt -> (n, tag)
    wrong: list[str] = []
    in_flight_rounds = 0
    for round_ in range(rounds):
        d = daemons.start(directory)
        stop = threading.Event()
        lock = threading.Lock()
        flying = []

        def drive(c):
            tag = "k" + chr(ord("a") + round_) + chr(ord("a") + c)
            try:
                client = LineClient(d.connect(inet=c % 2 == 1, timeout=5))
            except OSError:
                return
            deadline = time.monotonic() + 5
            n = 0
            try:
                while not stop.is_set() and time.monotonic() < deadline and n < 2000:
                    action = client.ask(triple_request(n, tag))
                    if action is None:
                        with lock:
                            flying.append(c)
                        return
                    with lock:
                        if action == DEFER_NEW:
                            acked[rcpt(n, tag)] = (n, tag)
                        else:
                            wrong.append(action)
                    n += 1
            finally:
                client.close()

        threads = [threading.Thread(target=drive, args=(c,)) for c in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.0, 0.4))
        assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        stop.set()
        for thread in threads:
            thread.join(10)
        assert not any(thread.is_alive() for thread in threads)
        assert not wrong, wrong
        in_flight_rounds += bool(flying)
        # The database opens, postmap reads it, nothing acknowledged is lost.
        found = records(directory / "db")
        listed = postmap_records(postmap, directory / "db")
        lost = [token for token in acked if token not in found or token not in listed]
        assert not lost, "round %d: acknowledged but not stored: %s" % (round_, lost[:10])
    record_figures("greylistd_sigkill", rounds=rounds, acknowledged=len(acked),
                   rounds_killed_in_flight=in_flight_rounds)
    assert len(acked) >= 100, len(acked)
    assert in_flight_rounds >= 1  # some kills hit requests in flight
    # Restarted once more: acknowledged triples (a seeded sample) are known.
    sample = rng.sample(sorted(acked.values()), min(len(acked), 400))
    with daemons.start(directory) as d:
        for at in range(0, len(sample), 100):
            chunk = sample[at:at + 100]
            actions = split_replies(d.ask(b"".join(triple_request(n, tag) for n, tag in chunk)))
            assert actions is not None and len(actions) == len(chunk)
        reasons = reasons_by_rcpt(clean_log(d), d.pid)
        assert all(reasons[rcpt(n, tag)] in (["early-retry"], ["delay-passed"])
                   for n, tag in sample)
        assert d.stop() == 0
