"""Drive K connections concurrently, one request in flight on each.

DESCRIPTION
    run_phase() forks one driver process per connection, as smtpd
    processes are separate: each writes a request, reads the whole reply
    (up to the empty line), and only then sends the next one. Drivers
    wait at a common start signal after connecting, so the phase starts
    at once on all connections. Each records, per request, the send and
    reply times (CLOCK_MONOTONIC, shared by all processes) and a reply
    code; the parent merges them.

    Reply codes: PASS (DUNNO, PREPEND, OK), DEFER (DEFER_IF_PERMIT,
    DEFER, 4NN), OTHER (any other well-formed action), MALFORMED (not
    exactly "action=VALUE\\n\\n", extra bytes, or end of input).

LIMITS
    A phase is bounded in time: at the deadline the parent calls the
    on_timeout hook (which kills the servers it started, so that blocked
    reads end) and terminates its own drivers.
"""

import multiprocessing
import os
import resource
import signal
import socket
import time
from array import array
from dataclasses import dataclass, field

PASS, DEFER, OTHER, MALFORMED = 0, 1, 2, 3
PASS_WORDS = (b"DUNNO", b"PREPEND", b"OK", b"PERMIT")
DEFER_WORDS = (b"DEFER_IF_PERMIT", b"DEFER", b"DEFER_IF_REJECT")


def classify(reply: bytes) -> tuple:
    """Return (code, first word) of one reply."""
    if (len(reply) < 10 or reply[:7] != b"action=" or reply[-2:] != b"\n\n"
            or reply.find(b"\n") != len(reply) - 2):
        return MALFORMED, b""
    word = reply[7:-2].split(None, 1)[0].upper() if reply[7:-2].strip() else b""
    if word in PASS_WORDS:
        return PASS, word
    if word in DEFER_WORDS or (len(word) == 3 and word[:1] == b"4" and word.isdigit()):
        return DEFER, word
    return OTHER, word


@dataclass
class ConnResult:
    send: array = field(default_factory=lambda: array("q"))
    recv: array = field(default_factory=lambda: array("q"))
    codes: bytearray = field(default_factory=bytearray)
    words: dict = field(default_factory=dict)
    malformed: list = field(default_factory=list)    # first few examples
    error: str = ""
    cpu_s: float = 0.0


def _drive(endpoint: tuple, requests: list, start, ready, results, stop=None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = ConnResult()
    sock = None
    try:
        if endpoint[0] == "pipe":
            wfd, rfd = endpoint[1], endpoint[2]
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(endpoint[1])
            wfd = rfd = sock.fileno()
    except OSError as exc:
        out.error = "connect: %s" % exc
        ready.send(False)
        results.send(out)
        return
    ready.send(True)
    start.wait()
    write, read, now = os.write, os.read, time.perf_counter_ns
    send_times, recv_times, codes = out.send, out.recv, out.codes
    words = out.words
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        for i, request in enumerate(requests):
            if stop is not None and not i & 63 and stop.is_set():
                break
            t0 = now()
            sent = write(wfd, request)
            while sent < len(request):
                sent += write(wfd, request[sent:])
            reply = read(rfd, 65536)
            while reply[-2:] != b"\n\n":
                chunk = read(rfd, 65536)
                if not chunk:
                    break
                reply += chunk
            t1 = now()
            if not reply:
                out.error = "end of input from the server after %d replies" % len(codes)
                break
            code, word = classify(reply)
            send_times.append(t0)
            recv_times.append(t1)
            codes.append(code)
            words[word] = words.get(word, 0) + 1
            if code == MALFORMED and len(out.malformed) < 5:
                out.malformed.append(reply[:200])
            if reply[-2:] != b"\n\n":
                out.error = "end of input in a reply after %d replies" % len(codes)
                break
    except OSError as exc:
        out.error = "%s after %d replies" % (exc, len(codes))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out.cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if sock is not None:
        sock.close()
    results.send(out)


def stop_event():
    """An event that ends a running phase early when set."""
    return multiprocessing.get_context("fork").Event()


def run_phase(endpoints: list, conns: list, limit_s: float,
              on_timeout=None, stop=None) -> list:
    """Drive conns[i] (a list of request bytes) over endpoints[i]; return ConnResults.

    stop, a multiprocessing Event from stop_event(), ends the phase early.
    """
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs, readies, readers = [], [], []
    for endpoint, requests in zip(endpoints, conns):
        ready_r, ready_w = ctx.Pipe(duplex=False)
        res_r, res_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_drive, args=(endpoint, requests, start, ready_w, res_w, stop),
                           daemon=True)
        proc.start()
        ready_w.close()
        res_w.close()
        procs.append(proc)
        readies.append(ready_r)
        readers.append(res_r)
    deadline = time.monotonic() + limit_s
    for ready in readies:
        if ready.poll(max(0.0, min(30.0, deadline - time.monotonic()))):
            ready.recv()
    start.set()
    results, timed_out = [], False
    for reader in readers:
        if not timed_out and not reader.poll(max(0.0, deadline - time.monotonic())):
            timed_out = True
            if on_timeout is not None:
                on_timeout()
        if reader.poll(10 if timed_out else 0):
            try:
                results.append(reader.recv())
                continue
            except EOFError:
                pass
        results.append(ConnResult(error="driver gave no result (phase limit %ds)"
                                  % limit_s))
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if timed_out:
        for res in results:
            res.error = res.error or "phase time limit (%ds) reached" % limit_s
    return results
