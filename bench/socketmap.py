"""Socketmap lookups per second and latency of the correspondent learner.

Usage:
  python bench/socketmap.py [--quick] [--json FILE] [--check]
                            [--known-addresses N] [--known N] [--new N]
                            [--connections K,...] [--python PATH]
                            [--ours-path DIR] [--tmpdir DIR] [--limit S]

DESCRIPTION
    A cleanup service with greylist's bcc map looks up the sender of each
    message (map "sender") and then each recipient (map "rcpt") over one
    socketmap connection, one lookup in flight, and waits for each reply
    (socketmap_table(5), netstrings "LEN:DATA,"). Every reply is
    "9:NOTFOUND ,". A recipient lookup learns the address: it reads its
    time stamp in DATABASE-correspondents.lmdb and its (sender,
    recipient) pair in DATABASE.lmdb, and writes each only when absent or
    past half its lifetime, a durable LMDB commit each.

    Two kinds of lookups, each timed connection sending one
    "sender alice@example.com" lookup and then its "rcpt" lookups:

      known  addresses learned before the timed phase (each sent once,
             untimed, on the same connections), then looked up again:
             reads only. The last transaction id of both LMDB
             environments (py-lmdb env.info()["last_txnid"], read by
             --python with lock=False, readonly) is taken before and
             after the timed phase; any change is a write, and reported.
      new    every recipient never seen before: two durable writes each
             (the table entry and the pair), fewer commits in greylistd
             when connections share them. The transaction ids give the
             commits, the entry counts that every address was learned.

    Programs, each on a fresh database in a temporary directory:

      greylist-socketmap  the spawn(8) form: one process
                      (greylist-socketmap -c SETTINGS, its console script
                      from the tested tree's setup.cfg run by --python with
                      the tree on PYTHONPATH) on stdin/stdout pipes, one
                      connection;
      greylistd       the daemon form: ONE greylistd with
                      greylist_socketmap_listen = unix:WORKDIR/socketmap.sock
                      and K connections (--connections, default 1,16);
      notfound        bench/notfound.py on pipes: the ceiling of the spawn
                      form;
      notfound-asyncio  bench/notfound.py --listen on a unix socket, K
                      connections: the ceiling of the daemon form.

    Each program runs next to its ceiling (same transport, same K, same
    lookups), all in one invocation. Reported per case: lookups per
    second over the timed phase (all its lookups, the one sender lookup
    per connection included), latency from the write of a lookup to the
    end of its reply (p50, p99, p99.9, max), the server's CPU per lookup
    (/proc/PID/stat), malformed replies, the writes of the known phase
    and the commits per new lookup. The storage floor (storage.py) gives
    what one durable commit costs on this disk.

LIMITS
    Every phase has a time limit (--limit): at the deadline the servers
    started here are killed by PID and the drivers stopped. Servers listen
    only on unix sockets in the work directory (a short directory under
    /tmp when that path is too long). Exit status 0 unless the harness
    failed; --check makes a malformed reply, an error, a non-zero exit of
    a greylist program, a write in the known phase or an address not
    learned in the new phase exit 1.
"""

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402
import storage  # noqa: E402

NOTFOUND = b"9:NOTFOUND ,"
SENDER = b"alice@example.com"
NS = 1_000_000_000
MAX_REPLY = 100_000


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


# Local parts are never a token of digits only: greylist keys pairs by the
# normalised sender, where such a token (a VERP counter) becomes "#".
def known_address(i: int) -> bytes:
    return b"known%06d@d%02d.example.net" % (i, i % 40)


def new_address(conn: int, i: int) -> bytes:
    return b"new%02dx%06d@d%02d.example.org" % (conn, i, i % 40)


def lookups(addresses: list) -> list:
    """One connection's sequence: the sender, then each address as rcpt."""
    return [netstring(b"sender " + SENDER)] + [netstring(b"rcpt " + a) for a in addresses]


def plan(k: int, known: int, timed_known: int, timed_new: int) -> dict:
    """Per connection: the pre-learning, the known and the new lookups."""
    share = [timed_known // k + (c < timed_known % k) for c in range(k)]
    new_share = [timed_new // k + (c < timed_new % k) for c in range(k)]
    return {
        "prelearn": [lookups([known_address(i) for i in range(c, known, k)])
                     for c in range(k)],
        "known": [lookups([known_address((c * known // k + j) % known)
                           for j in range(share[c])]) for c in range(k)],
        "new": [lookups([new_address(c, j) for j in range(new_share[c])])
                for c in range(k)],
    }


# The drivers: one process per connection, one lookup in flight each.

def _complete(reply: bytes) -> bool:
    """Whether reply holds one whole netstring (or can never be one)."""
    colon = reply.find(b":", 0, 8)
    if colon < 0:
        return len(reply) > 7
    digits = reply[:colon]
    if not digits.isdigit():
        return True
    return len(reply) >= colon + 2 + int(digits) or len(reply) > MAX_REPLY


def _drive(endpoint: tuple, requests: list, start, ready, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = {"send": array("q"), "recv": array("q"), "malformed": 0, "examples": [],
           "error": "", "cpu_s": 0.0}
    sock = None
    try:
        if endpoint[0] == "pipe":
            wfd, rfd = endpoint[1], endpoint[2]
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(endpoint[1])
            wfd = rfd = sock.fileno()
    except OSError as exc:
        out["error"] = "connect: %s" % exc
        ready.send(False)
        results.send(out)
        return
    ready.send(True)
    start.wait()
    write, read, now = os.write, os.read, time.perf_counter_ns
    send_times, recv_times = out["send"], out["recv"]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        for request in requests:
            t0 = now()
            sent = write(wfd, request)
            while sent < len(request):
                sent += write(wfd, request[sent:])
            reply = read(rfd, 4096)
            while reply and not _complete(reply):
                chunk = read(rfd, 4096)
                if not chunk:
                    break
                reply += chunk
            t1 = now()
            if not reply:
                out["error"] = "end of input from the server after %d replies" % len(recv_times)
                break
            send_times.append(t0)
            recv_times.append(t1)
            if reply != NOTFOUND:
                out["malformed"] += 1
                if len(out["examples"]) < 3:
                    out["examples"].append(reply[:100].decode("ascii", "replace"))
                if not _complete(reply):
                    out["error"] = "end of input in a reply after %d replies" % len(recv_times)
                    break
    except OSError as exc:
        out["error"] = "%s after %d replies" % (exc, len(recv_times))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if sock is not None:
        sock.close()
    results.send(out)


def run_phase(endpoints: list, conns: list, limit_s: float, on_timeout) -> list:
    """Drive conns[i] (netstrings) over endpoints[i]; return one result each.
    At the deadline on_timeout() kills the servers, so that reads end."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs, readies, readers = [], [], []
    for endpoint, requests in zip(endpoints, conns):
        ready_r, ready_w = ctx.Pipe(duplex=False)
        res_r, res_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_drive, args=(endpoint, requests, start, ready_w, res_w),
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
            on_timeout()
        if reader.poll(10 if timed_out else 0):
            try:
                results.append(reader.recv())
                continue
            except EOFError:
                pass
        results.append({"send": array("q"), "recv": array("q"), "malformed": 0,
                        "examples": [], "cpu_s": 0.0,
                        "error": "driver gave no result (phase limit %ds)" % limit_s})
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if timed_out:
        for res in results:
            res["error"] = res["error"] or "phase time limit (%ds) reached" % limit_s
    return results


# The programs.

def _settings(path: str, database: str, log: str, listen: str = "") -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("greylist_database = %s\n" % database)
        handle.write("greylist_log = %s\n" % log)
        if os.geteuid() == 0:
            handle.write("greylist_allow_root = yes\n")
        if listen:
            handle.write("greylist_socketmap_listen = %s\n" % listen)


class SpawnLearner(peers.Program):
    """greylist-socketmap on stdin/stdout."""

    name = "greylist-socketmap"
    form = "spawn"
    ours = True

    def __init__(self, python: str, source: str) -> None:
        super().__init__()
        self.python, self.source = python, source
        self.database = ""

    def available(self) -> tuple:
        if find(self.python, self.source, "greylist-socketmap") is None:
            return False, "no greylist-socketmap console script in %s/setup.cfg" % self.source
        return True, ""

    def prepare(self, workdir: str, delay_s: int) -> None:
        os.mkdir(os.path.join(workdir, "db"), 0o755)
        self.database = os.path.join(workdir, "db", "greylist")
        self.settings = os.path.join(workdir, "greylist.cf")
        _settings(self.settings, self.database, os.path.join(workdir, "greylist.log"))

    def argv(self) -> list:
        return find(self.python, self.source, "greylist-socketmap") + ["-c", self.settings]

    def env(self) -> dict:
        path = os.environ.get("PYTHONPATH")
        return dict(os.environ, PYTHONPATH=self.source + (":" + path if path else ""))


class SpawnNotfound(peers.Program):
    """bench/notfound.py on stdin/stdout."""

    name = "notfound"
    form = "spawn"
    ours = False
    database = ""

    def __init__(self, python: str) -> None:
        super().__init__()
        self.python = python

    def argv(self) -> list:
        return [self.python, os.path.join(HERE, "notfound.py")]


class Server(peers.Program):
    """One server process on a unix socket in the work directory, K connections."""

    form = "daemon"
    pipes = False
    database = ""

    def __init__(self, python: str) -> None:
        super().__init__()
        self.python = python
        self.socket_dir = ""

    def socket_in(self, workdir: str) -> str:
        path = os.path.join(workdir, "socketmap.sock")
        if len(path) >= 100:   # a unix socket's path limit
            self.socket_dir = tempfile.mkdtemp(prefix="smb-", dir="/tmp")
            path = os.path.join(self.socket_dir, "socketmap.sock")
        return path

    def start(self, workdir: str, k: int, delay_s: int = 0) -> list:
        self.workdir = workdir
        self.socket_path = self.socket_in(workdir)
        self.prepare(workdir, delay_s)
        log = open(os.path.join(workdir, "stderr"), "ab")
        proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, env=self.env(), cwd=workdir)
        log.close()
        self.procs = [proc]
        _wait_until_answering(self.socket_path, proc, 20, self.name)
        self.endpoints = [("unix", self.socket_path)] * k
        return self.endpoints

    def stop(self, timeout: float = 10) -> list:
        codes = peers._terminate(self.procs, timeout)
        self.procs = []
        self._remove_socket_dir()
        return codes

    def kill(self) -> None:
        super().kill()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                return  # Still there: leave its socket alone.
        self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = ""


class DaemonLearner(Server):
    """greylistd with greylist_socketmap_listen only."""

    name = "greylistd"
    ours = True

    def __init__(self, python: str, source: str) -> None:
        super().__init__(python)
        self.source = source

    def available(self) -> tuple:
        if find(self.python, self.source, "greylistd") is None:
            return False, "no greylistd console script in %s/setup.cfg" % self.source
        return True, ""

    def prepare(self, workdir: str, delay_s: int) -> None:
        os.mkdir(os.path.join(workdir, "db"), 0o755)
        self.database = os.path.join(workdir, "db", "greylist")
        self.settings = os.path.join(workdir, "greylist.cf")
        _settings(self.settings, self.database, os.path.join(workdir, "greylist.log"),
                  "unix:" + self.socket_path)

    def argv(self) -> list:
        return find(self.python, self.source, "greylistd") + ["-c", self.settings]

    env = SpawnLearner.env


class ServerNotfound(Server):
    """bench/notfound.py --listen: asyncio streams on a unix socket."""

    name = "notfound-asyncio"
    ours = False

    def argv(self) -> list:
        return [self.python, os.path.join(HERE, "notfound.py"), "--listen", self.socket_path]


def find(python: str, source: str, script: str) -> list | None:
    return peers.find_console_script(python, source, script)


def _wait_until_answering(path: str, proc: subprocess.Popen, limit_s: float,
                          name: str) -> None:
    """Wait until a "sender" lookup on path gets its reply (greylistd
    serves its listeners only once the database is open). It writes
    nothing."""
    deadline = time.monotonic() + limit_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with status %s" % (name, proc.returncode))
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                probe.connect(path)
                probe.sendall(netstring(b"sender " + SENDER))
                reply = b""
                while not _complete(reply):
                    chunk = probe.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                if reply == NOTFOUND:
                    return
                last = "reply %r" % reply[:40]
            except OSError as exc:
                last = str(exc)
            finally:
                probe.close()
        time.sleep(0.05)
    raise RuntimeError("%s did not answer on %s within %ds (%s)" % (name, path, limit_s, last))


# LMDB state, read outside the servers.

_STATE = r"""
import json, lmdb, sys
out = {}
for path in sys.argv[1:]:
    env = lmdb.open(path, subdir=False, lock=False, readonly=True)
    try:
        out[path] = [env.info()["last_txnid"], env.stat()["entries"]]
    finally:
        env.close()
print(json.dumps(out))
"""


def lmdb_state(python: str, database: str) -> dict:
    """{"database": [last_txnid, entries], "table": [...]} of a learner's stores."""
    paths = {"database": database + ".lmdb", "table": database + "-correspondents.lmdb"}
    done = subprocess.run([python, "-c", _STATE] + list(paths.values()),
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError("reading LMDB state: %s" % done.stderr.strip()[-300:])
    raw = json.loads(done.stdout)
    return {what: raw[path] for what, path in paths.items()}


# One case: one program, K connections, known then new.

def _cpu(pids: list) -> float:
    return sum(peers.read_proc(pid).get("cpu_s", 0.0) for pid in pids)


def _pct(values: list, p: float) -> float:
    """The nearest-rank percentile (run.py's _pct) of sorted values."""
    if not values:
        return 0.0
    i = min(len(values) - 1, max(0, int(round(p / 100 * len(values))) - 1))
    return values[i]


def summarise(results: list) -> dict:
    lat = sorted(r["recv"][j] - r["send"][j] for r in results for j in range(len(r["recv"])))
    out: dict = {"replies": len(lat),
                 "malformed": sum(r["malformed"] for r in results)}
    if lat:
        first = min(r["send"][0] for r in results if len(r["send"]))
        last = max(r["recv"][-1] for r in results if len(r["recv"]))
        out["rate"] = round(len(lat) / max(1e-9, (last - first) / NS), 1)
        for name, p in (("p50_ms", 50), ("p99_ms", 99), ("p999_ms", 99.9)):
            out[name] = round(_pct(lat, p) / 1e6, 3)
        out["max_ms"] = round(lat[-1] / 1e6, 3)
    out["harness_cpu_us_per_lookup"] = round(
        sum(r["cpu_s"] for r in results) / max(1, len(lat)) * 1e6, 1)
    examples = [e for r in results for e in r["examples"]][:3]
    if examples:
        out["malformed_examples"] = examples
    errors = sorted({r["error"] for r in results if r["error"]})
    if errors:
        out["errors"] = errors[:5]
    return out


def run_case(prog, k: int, sizes: dict, args, top: str) -> list:
    """Start prog with k connections on a fresh database; pre-learn, time
    the known lookups, then the new ones. One row per kind."""
    base = {"program": prog.name, "form": prog.form, "connections": k}
    ok, why = prog.available()
    if not ok:
        return [dict(base, kind=kind, available=False, reason=why) for kind in ("known", "new")]
    lookups_of = plan(k, sizes["known_addresses"], sizes["known"], sizes["new"])
    workdir = tempfile.mkdtemp(prefix="sm-%s-%d-" % (prog.name, k), dir=top)
    os.chmod(workdir, 0o755)
    rows = []
    try:
        endpoints = prog.start(workdir, k, 0)
        pre = summarise(run_phase(endpoints, lookups_of["prelearn"], args.limit, prog.kill))
        state0 = lmdb_state(args.python, prog.database) if prog.ours else None
        for kind in ("known", "new"):
            row = dict(base, kind=kind, available=True,
                       lookups=sum(len(c) for c in lookups_of[kind]),
                       rcpt_lookups=sum(len(c) - 1 for c in lookups_of[kind]))
            cpu0 = _cpu(prog.pids())
            row.update(summarise(run_phase(endpoints, lookups_of[kind], args.limit, prog.kill)))
            cpu1 = _cpu(prog.pids())
            row["server_cpu_us_per_lookup"] = round(
                (cpu1 - cpu0) / max(1, row["replies"]) * 1e6, 1)
            if prog.ours:
                state1 = lmdb_state(args.python, prog.database)
                row["lmdb_before"], row["lmdb_after"] = state0, state1
                row["commits"] = {s: state1[s][0] - state0[s][0] for s in state1}
                row["entries_added"] = {s: state1[s][1] - state0[s][1] for s in state1}
                if kind == "known":
                    row["prelearn"] = {"lookups": pre["replies"],
                                       "malformed": pre["malformed"],
                                       "errors": pre.get("errors", []),
                                       "entries": {s: state0[s][1] for s in state0}}
                    row["no_write"] = all(v == 0 for v in row["commits"].values())
                    row["prelearned_all"] = all(
                        state0[s][1] == sizes["known_addresses"] for s in state0)
                else:
                    row["commits_per_lookup"] = round(
                        sum(row["commits"].values()) / max(1, row["rcpt_lookups"]), 3)
                    row["learned_all"] = all(
                        v == row["rcpt_lookups"] for v in row["entries_added"].values())
                state0 = state1
            rows.append(row)
        codes = prog.stop()
        problems = _log_problems(workdir) if prog.ours else []
        for row in rows:
            row["exit_codes"] = codes
            if prog.ours:
                row["log_problems"] = problems
    except Exception as exc:  # A program that fails to start is reported, not fatal.
        prog.kill()
        done = {row["kind"] for row in rows}
        rows += [dict(base, kind=kind, available=True, replies=0)
                 for kind in ("known", "new") if kind not in done]
        for row in rows:
            row.setdefault("errors", []).append("%s: %s" % (type(exc).__name__, exc))
    finally:
        prog.kill()
        prog.procs = []
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _log_problems(workdir: str) -> list:
    """The first warnings, errors and fatal lines of greylist's log, and
    anything written to stderr."""
    found = []
    for name in ("greylist.log", "stderr"):
        try:
            with open(os.path.join(workdir, name), encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if name == "stderr" or any(w in line for w in (
                            "warning:", "error:", "fatal:", "Traceback", "bug:")):
                        found.append("%s: %s" % (name, line.strip()[:200]))
                        if len(found) >= 5:
                            return found
        except OSError:
            pass
    return found


# Reporting.

def failures(rows: list) -> list:
    """What --check rejects."""
    out = []
    for r in rows:
        where = "round %d %s %s K=%d" % (r.get("round", 1), r["kind"], r["program"],
                                          r["connections"])
        if not r.get("available", True):
            if r.get("program") in ("greylist-socketmap", "greylistd"):
                out.append("%s: not available: %s" % (where, r.get("reason")))
            continue
        if r.get("errors"):
            out.append("%s: %s" % (where, "; ".join(r["errors"])))
        if r.get("malformed"):
            out.append("%s: %d malformed replies" % (where, r["malformed"]))
        if r.get("replies", 0) != r.get("lookups", -1):
            out.append("%s: %s replies to %s lookups" % (where, r.get("replies"),
                                                         r.get("lookups")))
        if any(c != 0 for c in r.get("exit_codes", [0])):
            out.append("%s: exit status %s" % (where, r.get("exit_codes")))
        if r.get("log_problems"):
            out.append("%s: %s" % (where, "; ".join(r["log_problems"])))
        if r.get("no_write") is False:
            out.append("%s: the known phase wrote (commits %s)" % (where, r["commits"]))
        pre = r.get("prelearn") or {}
        if pre.get("errors") or pre.get("malformed"):
            out.append("%s: pre-learning: %d malformed, %s" % (
                where, pre.get("malformed", 0), "; ".join(pre.get("errors", []))))
        if r.get("prelearned_all") is False:
            out.append("%s: pre-learning left %s entries" % (where, r["prelearn"]["entries"]))
        if r.get("learned_all") is False:
            out.append("%s: %s entries added for %d new addresses"
                       % (where, r["entries_added"], r["rcpt_lookups"]))
    return out


CEILING = {"greylist-socketmap": "notfound", "greylistd": "notfound-asyncio"}


def ceiling_ratios(rows: list) -> None:
    """Set x_ceiling on each learner row of one round: its rate over the
    rate of its ceiling (same kind, form and K) in the same round."""
    keyed = {(r["kind"], r["form"], r["connections"], r["program"]): r for r in rows}
    for r in rows:
        ceiling = keyed.get((r["kind"], r["form"], r["connections"],
                             CEILING.get(r["program"], "")))
        if ceiling and ceiling.get("rate") and r.get("rate"):
            r["x_ceiling"] = round(r["rate"] / ceiling["rate"], 3)


def median_rows(rounds: list) -> list:
    """Per case and kind, the row of the round with the median (low) rate,
    with every round's rate beside it (run.py's --rounds). Its x_ceiling
    is the median (low) of the rounds' own ratios, each taken within one
    round, side by side."""
    for rows in rounds:
        ceiling_ratios(rows)
    out = []
    for i, first in enumerate(rounds[0]):
        trials = [rows[i] for rows in rounds if i < len(rows)]
        rated = [t for t in trials if t.get("rate")]
        if not rated:
            out.append(dict(first))
            continue
        median = statistics.median_low([t["rate"] for t in rated])
        row = dict(next(t for t in rated if t["rate"] == median))
        if len(trials) > 1:
            row["rates_all_rounds"] = [t.get("rate") for t in trials]
            row["p99_ms_all_rounds"] = [t.get("p99_ms") for t in trials]
            ratios = [t["x_ceiling"] for t in trials if "x_ceiling" in t]
            if ratios:
                row["x_ceiling_all_rounds"] = ratios
                row["x_ceiling"] = statistics.median_low(ratios)
        out.append(row)
    return out


def print_report(report: dict, stream) -> None:
    w = stream.write
    m = report["machine"]
    w("machine: %s CPUs, %s, %s RAM, Linux %s; load average %s before, %s after\n"
      % (m["nproc"], m["cpu"], m["memory"], m["kernel"],
         report["load_before"], report["load_after"]))
    w("python: %s (lmdb %s); greylist: %s\n" % (report["versions"]["python"],
                                                 report["versions"]["lmdb"],
                                                 report["versions"]["greylist"]))
    s = report["sizes"]
    w("sizes: %d known addresses (pre-learned), %d known and %d new rcpt lookups "
      "per case, one sender lookup per connection before them; %d round(s), the "
      "median (low) by rate reported\n\n"
      % (s["known_addresses"], s["known"], s["new"], report["rounds"]))
    head = ("kind  form    program             K  lookups/s   p50 ms   p99 ms  p99.9ms"
            "   max ms  cpu us  x ceiling  malf  commits/lookup")
    w(head + "\n" + "-" * len(head) + "\n")
    for r in report["rows"]:
        if not r.get("available", True):
            w("%-5s %-7s %-18s %2d  not available: %s\n" % (
                r["kind"], r["form"], r["program"], r["connections"], r.get("reason")))
            continue
        ratio = "%.3f" % r["x_ceiling"] if "x_ceiling" in r else "-"
        commits = ("%.2f" % r["commits_per_lookup"] if "commits_per_lookup" in r
                   else ("%d" % sum(r["commits"].values()) if "commits" in r else "-"))
        if r.get("rate"):
            w("%-5s %-7s %-18s %2d %10.0f %8.3f %8.3f %8.3f %8.2f %7.0f %10s %5d  %s\n" % (
                r["kind"], r["form"], r["program"], r["connections"], r["rate"],
                r["p50_ms"], r["p99_ms"], r["p999_ms"], r["max_ms"],
                r["server_cpu_us_per_lookup"], ratio, r["malformed"], commits))
        else:
            w("%-5s %-7s %-18s %2d  no replies\n" % (r["kind"], r["form"], r["program"],
                                                     r["connections"]))
        if r.get("rates_all_rounds"):
            w("      rounds: %s lookups/s, p99 %s ms%s\n" % (
                " ".join("%.0f" % x if x else "-" for x in r["rates_all_rounds"]),
                " ".join("%.3f" % x if x else "-" for x in r["p99_ms_all_rounds"]),
                ", x ceiling " + " ".join("%.3f" % x for x in r["x_ceiling_all_rounds"])
                if r.get("x_ceiling_all_rounds") else ""))
        for error in r.get("errors", []):
            w("      errors: %s\n" % error)
    w("\n(x ceiling: the rate over the NOTFOUND responder's of the same form and K in "
      "the same round, the median (low) of the rounds; commits/lookup: the known rows "
      "give the transactions committed during the timed phase, the new rows commits "
      "per rcpt lookup, both environments.)\n\n")
    w("no-write check (known phase, last_txnid of DATABASE.lmdb and "
      "DATABASE-correspondents.lmdb before -> after):\n")
    for r in report["all_rounds"]:
        if r["kind"] != "known" or "lmdb_before" not in r:
            continue
        b, a = r["lmdb_before"], r["lmdb_after"]
        w("  %-5s round %d %-18s K=%-2d %s  database %d -> %d, table %d -> %d "
          "(pre-learned entries: database %d, table %d)\n" % (
              "OK" if r["no_write"] else "WROTE", r["round"], r["program"], r["connections"],
              "no write" if r["no_write"] else "WRITES", b["database"][0], a["database"][0],
              b["table"][0], a["table"][0], b["database"][1], b["table"][1]))
    w("new addresses (timed phase): transactions committed and entries added\n")
    for r in report["all_rounds"]:
        if r["kind"] != "new" or "commits" not in r:
            continue
        w("  round %d %-18s K=%-2d %d rcpt lookups: database %d commits (+%d entries), table %d "
          "commits (+%d entries), %.2f commits per lookup%s\n" % (
              r["round"], r["program"], r["connections"], r["rcpt_lookups"],
              r["commits"]["database"],
              r["entries_added"]["database"], r["commits"]["table"],
              r["entries_added"]["table"], r["commits_per_lookup"],
              "" if r["learned_all"] else "  NOT ALL LEARNED"))
    if report.get("storage_floor"):
        w(storage.describe(report["storage_floor"]))
    bad = report.get("failures") or []
    w("check: %s\n" % ("all replies NOTFOUND, no write in the known phase, every new "
                       "address learned" if not bad else "; ".join(bad)))


def versions(python: str, source: str) -> dict:
    return {"python": peers.run_text([python, "-c", "import sys; print(sys.version.split()[0])"]),
            "lmdb": peers.run_text([python, "-c", "import lmdb; print(lmdb.__version__, "
                                    "'(liblmdb %d.%d.%d)' % lmdb.version())"]),
            "greylist": peers.describe_source(source),
            "harness_python": sys.version.split()[0]}


def parse_args(argv: list | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few seconds (small sizes)")
    p.add_argument("--known-addresses", type=int, help="addresses pre-learned (2000)")
    p.add_argument("--known", type=int, help="timed known rcpt lookups per case (20000)")
    p.add_argument("--new", type=int, help="timed new rcpt lookups per case (4000)")
    p.add_argument("--connections", default="1,16",
                   help="greylistd's connection counts (default 1,16)")
    p.add_argument("--python", default=peers.python_default())
    p.add_argument("--ours-path", default=peers.ROOT)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--rounds", type=int, help="rounds of every case; the median (low) "
                   "is reported (2; quick 1)")
    p.add_argument("--limit", type=float, help="time limit per phase, s (60; quick 20)")
    p.add_argument("--floor-commits", type=int,
                   help="storage floor commits (500; quick 20; 0 to skip)")
    p.add_argument("--json", default=None, help="write the report to FILE (- for stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 on a failure (see LIMITS)")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("known_addresses", 2000, 40), ("known", 20000, 400),
                              ("new", 4000, 100), ("limit", 60.0, 20.0), ("rounds", 2, 1),
                              ("floor_commits", 500, 20)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.ours_path = os.path.abspath(args.ours_path)
    args.connections = [int(k) for k in args.connections.split(",") if k]
    if args.known_addresses < 1 or args.known < 1 or args.new < 1 or not 1 <= args.rounds <= 9 \
            or any(k < 1 or k > 256 for k in args.connections):
        p.error("sizes must be at least 1, rounds 1 to 9, connections 1 to 256")
    return args


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    sizes = {"known_addresses": args.known_addresses, "known": args.known, "new": args.new}
    top = tempfile.mkdtemp(prefix="bench-socketmap-", dir=args.tmpdir)
    os.chmod(top, 0o755)
    import run as bench_run   # machine(); run.py imports the other bench modules
    report: dict = {"sizes": sizes, "machine": bench_run.machine(),
                    "versions": versions(args.python, args.ours_path),
                    "load_before": "%.2f %.2f %.2f" % os.getloadavg()}
    started = time.monotonic()
    rounds: list = []
    try:
        for r in range(args.rounds):
            cases = [(SpawnLearner(args.python, args.ours_path), 1),
                     (SpawnNotfound(args.python), 1)]
            for k in args.connections:
                cases += [(DaemonLearner(args.python, args.ours_path), k),
                          (ServerNotfound(args.python), k)]
            rows = []
            for prog, k in cases:
                got = run_case(prog, k, sizes, args, top)
                for row in got:
                    row["round"] = r + 1
                sys.stdout.write("round %d: %s K=%d: %s\n" % (
                    r + 1, prog.name, k, ", ".join(
                        "%s %s/s" % (row["kind"], row.get("rate", "-")) for row in got)))
                sys.stdout.flush()
                rows += got
            rounds.append(rows)
        if args.floor_commits:
            report["storage_floor"] = storage.measure(
                args.python, args.ours_path, top, commits=args.floor_commits,
                prefill=200 if args.quick else 20000)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report["rounds"] = args.rounds
    report["rows"] = median_rows(rounds)
    report["all_rounds"] = [row for rows in rounds for row in rows]
    report["load_after"] = "%.2f %.2f %.2f" % os.getloadavg()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["failures"] = failures(report["all_rounds"])
    print_report(report, sys.stdout)
    sys.stdout.write("elapsed: %.1f s\n" % report["elapsed_s"])
    if args.json:
        text = json.dumps(report, indent=1, sort_keys=True) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w", encoding="utf-8") as handle:
                handle.write(text)
    return 1 if args.check and report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
