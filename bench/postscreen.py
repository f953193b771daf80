"""Postscreen policy callout requests per second and latency, known and unknown clients.

Usage:
  python bench/postscreen.py [--quick] [--json FILE] [--check]
                             [--requests N] [--groups G] [--warm W]
                             [--connections K,...] [--rounds R]
                             [--python PATH] [--ours-path DIR]
                             [--tmpdir DIR] [--limit S] [--pace R]

DESCRIPTION
    postscreen calls out to its policy service before its own tests, with
    one request in flight per connection, and waits for each reply
    (Wietse Venema's design, 2016): name=value lines client_address,
    server_address, client_port and server_port, then an empty line; the
    reply "action=pass\\nttl=N\\n\\n" or "action=ignore\\n\\n". greylist
    answers pass for a client group that greylisting has proven (a
    manual entry, reason manual-client, or an auto-whitelisted client
    record, awl-client) and ignore for any other client (unproven), after
    one read of the group's record (and with greylist_client_match = pool,
    the default, one of the client's entry in the postscreen table), and
    without writing.

    Each database is made before its program starts, with greylist's own
    tools: `greylistctl -c SETTINGS whitelist add 198.51.100.1` (the
    manual group 198.51.100/24) and G auto-whitelisted client records
    (greylist.stores.lmdb.LmdbStore.put_many, the key from
    greylist.core.triple.client_key(client_group(...)), the value
    "1:NOW:NOW:PASSES:client") for the /24 groups 10.X.Y, and "permit
    NOW" in the postscreen table for their hosts 10.X.Y.1-254 (as the
    policy service writes it for the hosts it saw proven). Two kinds of
    requests:

      known    one in ten from 198.51.100/24, the others from the G
               groups, each a different host and client port; the
               expected reply is "action=pass\\nttl=TTL\\n\\n" with TTL
               greylist_postscreen_ttl (a day; every record is fresh and
               greylist_max_age is longer).
      unknown  clients of 172.16/12, in no group: "action=ignore\\n\\n".

    Every reply is compared with the expected one (wrong replies are
    counted and reported), and the reasons in greylist's log are counted
    against the requests sent (manual-client, awl-client, unproven). The
    last transaction id and entry count of every LMDB environment in the
    database directory (py-lmdb env.info()["last_txnid"], read by
    --python with lock=False, readonly) are taken after the warm-up
    (greylistd opens each file with a trial commit, stores/writecheck.py)
    and again after the program stopped: any change, or a new
    environment with a transaction in it, is a database write by the
    program, and reported. Files the program creates that are no LMDB
    environment (greylistd's cleanup state) are listed apart.

    Programs, each on a fresh database in a temporary directory:

      greylist-postscreen  the spawn(8) form: one process
                      (greylist-postscreen -c SETTINGS, its console script
                      from the tested tree's setup.cfg run by --python
                      with the tree on PYTHONPATH) on stdin/stdout pipes,
                      one request at a time, as one postscreen
                      connection would send them;
      greylistd       the daemon form: ONE greylistd with only
                      greylist_postscreen_listen = unix:WORKDIR/ps.sock,
                      K connections (--connections, default 1,16);
      ignore          bench/ignore.py on pipes: the ceiling of the spawn
                      form;
      ignore-asyncio  bench/ignore.py --listen on a unix socket, K
                      connections: the ceiling of the daemon form.

    Each phase: W untimed warm-up requests (known and unknown in turn,
    spread over the connections), then N timed known requests, then N
    timed unknown ones, on the same connections and the same process.
    Each program runs next to its ceiling (same transport, same K, same
    requests), all in one invocation, R rounds. Reported per case:
    requests per second over the timed phase, latency from the write of
    a request to the end of its reply (p50, p99, p99.9, max), the
    server's CPU per request (/proc/PID/stat), the rate over the
    ceiling's, wrong replies; the target of the issue, p99 under 1 ms for
    a known client in the daemon, at each K; the no-write check and the
    reasons.

    By default each connection sends its next request as soon as the last
    reply is in: the most a server can do, and the latency it has when
    saturated. postscreen calls out once per new SMTP connection, so a
    mail host sees far fewer: --pace R sends R requests a second on each
    connection on a fixed schedule (the driver sleeps until a request is
    due), for the latency at a given load. A request that is due while a
    late reply still holds the connection is sent when that reply is in
    and its latency is counted from its due time, so a server that falls
    behind is charged for the wait it caused.

LIMITS
    Every phase has a time limit (--limit): at the deadline the servers
    started here are killed by PID and the drivers stopped. Servers listen
    only on unix sockets in the work directory (a short directory under
    /tmp when that path is too long), which is removed afterwards. Exit
    status 0 unless the harness failed; --check makes a wrong reply, an
    error, a non-zero exit or a logged problem of a greylist program, a
    database write or reasons that do not match the requests exit 1.
"""

import argparse
import collections
import json
import multiprocessing
import os
import re
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

IGNORE = b"action=ignore\n\n"
END = b"\n\n"
NS = 1_000_000_000
MAX_REPLY = 4096
MANUAL_ADDRESS = "198.51.100.1"   # greylistctl whitelist add: the group 198.51.100
PROBE_ADDRESS = "192.0.2.1"       # the readiness probe: in no group
TARGET_P99_MS = 1.0


def request(client: str, port: int) -> bytes:
    return ("client_address=%s\nserver_address=192.0.2.25\nclient_port=%d\n"
            "server_port=25\n\n" % (client, port)).encode("ascii")


def auto_group(g: int) -> str:
    """The g-th auto-whitelisted /24 group, as client_group() names it."""
    return "10.%d.%d" % (g >> 8 & 255, g & 255)


def known_client(i: int, groups: int) -> tuple:
    """(address, reason) of the i-th known request."""
    host = 1 + i % 254
    if i % 10 == 0:
        return "198.51.100.%d" % host, "manual-client"
    g = (i * 7919) % groups
    return "%s.%d" % (auto_group(g), host), "awl-client"


def unknown_client(i: int) -> str:
    return "172.%d.%d.%d" % (16 + (i >> 16) % 16, i >> 8 & 255, 1 + i % 254)


def plan(k: int, sizes: dict, pass_reply: bytes | None) -> dict:
    """Per phase, per connection: (requests, expected replies); and the
    reasons greylist should log for all of them. pass_reply None: the
    ceiling, which answers ignore to everything."""
    reasons: collections.Counter = collections.Counter()

    def known(i: int) -> tuple:
        address, reason = known_client(i, sizes["groups"])
        reasons[reason] += 1
        return request(address, 1024 + i % 60000), pass_reply or IGNORE

    def unknown(i: int) -> tuple:
        reasons["unproven"] += 1
        return request(unknown_client(i), 1024 + i % 60000), IGNORE

    def spread(items: list) -> list:
        return [([r for r, _ in items[c::k]], [e for _, e in items[c::k]]) for c in range(k)]

    warm = max(sizes["warm"], k)
    out = {"warm": spread([known(1_000_000 + i) if i % 2 == 0 else unknown(1_000_000 + i)
                           for i in range(warm)]),
           "known": spread([known(i) for i in range(sizes["requests"])]),
           "unknown": spread([unknown(i) for i in range(sizes["requests"])])}
    out["reasons"] = dict(reasons)
    return out


# The drivers: one process per connection, one request in flight each.

def _drive(endpoint: tuple, requests: list, expected: list, start, ready, results,
           interval_ns: int = 0) -> None:
    """One connection's requests, one in flight. interval_ns 0: each request
    as soon as the last reply is in (closed loop). Else request i is due
    interval_ns * i after the start: the driver sleeps until it is due,
    and its latency is counted from the write; a request that a late
    reply kept back past its due time is sent at once and counted from
    its due time (the wait is the server's, not the schedule's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = {"send": array("q"), "recv": array("q"), "wrong": 0, "examples": [],
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
    write, read, now, sleep = os.write, os.read, time.perf_counter_ns, time.sleep
    send_times, recv_times = out["send"], out["recv"]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    due = now()
    try:
        for request_bytes, want in zip(requests, expected):
            t0 = now()
            if interval_ns:
                due += interval_ns
                if due > t0:
                    sleep((due - t0) / NS)
                    t0 = now()
                else:
                    t0 = due
            sent = write(wfd, request_bytes)
            while sent < len(request_bytes):
                sent += write(wfd, request_bytes[sent:])
            reply = read(rfd, 4096)
            while reply and not reply.endswith(END) and len(reply) < MAX_REPLY:
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
            if reply != want:
                out["wrong"] += 1
                if len(out["examples"]) < 3:
                    out["examples"].append("%r for %r" % (reply[:100], request_bytes[:40]))
                if not reply.endswith(END):
                    out["error"] = "end of input in a reply after %d replies" % len(recv_times)
                    break
    except OSError as exc:
        out["error"] = "%s after %d replies" % (exc, len(recv_times))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if sock is not None:
        sock.close()
    results.send(out)


def run_phase(endpoints: list, conns: list, limit_s: float, on_timeout,
              pace: float = 0.0) -> list:
    """Drive conns[i] = (requests, expected) over endpoints[i]; one result
    each; pace: requests a second on each connection (0: closed loop, see
    _drive). At the deadline on_timeout() kills the servers, so that reads end."""
    interval_ns = int(NS / pace) if pace else 0
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs, readies, readers = [], [], []
    for endpoint, (requests, expected) in zip(endpoints, conns):
        ready_r, ready_w = ctx.Pipe(duplex=False)
        res_r, res_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_drive,
                           args=(endpoint, requests, expected, start, ready_w, res_w,
                                 interval_ns),
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
        results.append({"send": array("q"), "recv": array("q"), "wrong": 0,
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


def _pct(values: list, p: float) -> float:
    """The nearest-rank percentile (run.py's _pct) of sorted values."""
    if not values:
        return 0.0
    i = min(len(values) - 1, max(0, int(round(p / 100 * len(values))) - 1))
    return values[i]


def summarise(results: list) -> dict:
    lat = sorted(r["recv"][j] - r["send"][j] for r in results for j in range(len(r["recv"])))
    out: dict = {"replies": len(lat), "wrong": sum(r["wrong"] for r in results)}
    if lat:
        first = min(r["send"][0] for r in results if len(r["send"]))
        last = max(r["recv"][-1] for r in results if len(r["recv"]))
        out["rate"] = round(len(lat) / max(1e-9, (last - first) / NS), 1)
        for name, p in (("p50_ms", 50), ("p99_ms", 99), ("p999_ms", 99.9)):
            out[name] = round(_pct(lat, p) / 1e6, 3)
        out["max_ms"] = round(lat[-1] / 1e6, 3)
        out["mean_ms"] = round(sum(lat) / len(lat) / 1e6, 3)
    out["harness_cpu_us_per_request"] = round(
        sum(r["cpu_s"] for r in results) / max(1, len(lat)) * 1e6, 1)
    examples = [e for r in results for e in r["examples"]][:3]
    if examples:
        out["wrong_examples"] = examples
    errors = sorted({r["error"] for r in results if r["error"]})
    if errors:
        out["errors"] = errors[:5]
    return out


# The programs.

SETUP = r"""
import json, sys, time
from greylist.config import load, resolve
from greylist.core.record import CLIENT, Record, encode
from greylist.core.triple import client_group, client_key
from greylist.stores.lmdb import LmdbStore
settings, groups = sys.argv[1], int(sys.argv[2])
cfg = resolve(load(settings, {}))
now = int(time.time())
value = encode(Record(now, now, max(5, cfg.client_awl_passes), CLIENT))
keys = [client_key(client_group("10.%d.%d.1" % (g >> 8 & 255, g & 255), None, cfg))
        for g in range(groups)]
store = LmdbStore(cfg.database)
try:
    for i in range(0, len(keys), 5000):
        store.put_many([(key, value) for key in keys[i:i + 5000]])
finally:
    store.close()
# Pool and domain modes: a prefix's entry passes only the hosts that the
# policy service saw proven, which the postscreen table lists.
hosts = 0
if cfg.postscreen_table and cfg.client_match in ("pool", "domain"):
    table = LmdbStore(cfg.postscreen_table)
    permit = b"permit %d" % now
    try:
        for g in range(groups):
            table.put_many([(b"10.%d.%d.%d" % (g >> 8 & 255, g & 255, host), permit)
                            for host in range(1, 255)])
            hosts += 254
    finally:
        table.close()
print(json.dumps({"ttl": cfg.postscreen_ttl_s, "max_age_s": cfg.max_age_s,
                  "awl_passes": cfg.client_awl_passes, "value": value.decode(),
                  "first_key": keys[0].decode(), "distinct_keys": len(set(keys)),
                  "table_hosts": hosts}))
"""

_STATE = r"""
import json, lmdb, os, sys
out = {}
for name in sorted(os.listdir(sys.argv[1])):
    path = os.path.join(sys.argv[1], name)
    if not name.endswith(".lmdb"):
        out[name] = None
        continue
    env = lmdb.open(path, subdir=False, lock=False, readonly=True)
    try:
        out[name] = [env.info()["last_txnid"], env.stat()["entries"]]
    finally:
        env.close()
print(json.dumps(out))
"""


def lmdb_state(python: str, directory: str) -> dict:
    """{file: [last_txnid, entries]} of every LMDB environment in directory,
    {file: None} for its other files; read by another process, lock=False."""
    done = subprocess.run([python, "-c", _STATE, directory], capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0:
        raise RuntimeError("reading LMDB state: %s" % done.stderr.strip()[-300:])
    return json.loads(done.stdout)


def compare_state(before: dict, after: dict) -> dict:
    """What changed between two lmdb_state()s."""
    changed = {name: [before[name], after.get(name)] for name in before
               if before[name] is not None and before[name] != after.get(name)}
    created = {name: after[name] for name in after if name not in before}
    new_envs_written = {name: v for name, v in created.items()
                        if v is not None and v != [0, 0]}
    return {"changed": changed, "created": created,
            "no_write": not changed and not new_envs_written}


def _find(python: str, source: str, script: str) -> list | None:
    return peers.find_console_script(python, source, script)


class Prog:
    """A server under test: prepare() its files, start() it, stop() it."""

    name = "?"
    form = "?"
    ours = False

    def __init__(self, python: str, source: str) -> None:
        self.python, self.source = python, source
        self.procs: list = []
        self.workdir = ""
        self.database = ""
        self.setup: dict = {}
        self.probes = [0, 0]   # readiness probe requests sent, answered
        self.socket_dir = ""

    def available(self) -> tuple:
        return True, ""

    def env(self) -> dict:
        path = os.environ.get("PYTHONPATH")
        return dict(os.environ, PYTHONPATH=self.source + (":" + path if path else ""))

    def prepare(self, workdir: str, groups: int) -> None:
        self.workdir = workdir

    def pids(self) -> list:
        return [p.pid for p in self.procs]

    def kill(self) -> None:
        """SIGKILL the processes started here, by PID."""
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def _stderr(self):
        return open(os.path.join(self.workdir, "stderr"), "ab")


class Ours(Prog):
    """greylist's programs: a settings file and a database made with
    greylistctl and greylist's store."""

    ours = True
    script = ""

    def available(self) -> tuple:
        for script in (self.script, "greylistctl"):
            if _find(self.python, self.source, script) is None:
                return False, "no %s console script in %s/setup.cfg" % (script, self.source)
        return True, ""

    def listen(self) -> str:
        return ""

    def prepare(self, workdir: str, groups: int) -> None:
        self.workdir = workdir
        self.dbdir = os.path.join(workdir, "db")
        os.mkdir(self.dbdir, 0o755)
        self.database = os.path.join(self.dbdir, "greylist")
        self.settings = os.path.join(workdir, "greylist.cf")
        self.log = os.path.join(workdir, "greylist.log")
        with open(self.settings, "w", encoding="utf-8") as handle:
            handle.write("greylist_database = %s\n" % self.database)
            handle.write("greylist_log = %s\n" % self.log)
            if os.geteuid() == 0:
                handle.write("greylist_allow_root = yes\n")
            if self.listen():
                handle.write("greylist_postscreen_listen = %s\n" % self.listen())
        ctl = _find(self.python, self.source, "greylistctl")
        done = subprocess.run(ctl + ["-c", self.settings, "whitelist", "add", MANUAL_ADDRESS],
                              capture_output=True, text=True, env=self.env(), timeout=60)
        if done.returncode != 0:
            raise RuntimeError("greylistctl whitelist add: status %d: %s" % (
                done.returncode, (done.stdout + done.stderr).strip()[-300:]))
        done = subprocess.run([self.python, "-c", SETUP, self.settings, str(groups)],
                              capture_output=True, text=True, env=self.env(), timeout=120)
        if done.returncode != 0:
            raise RuntimeError("making the client records: %s" % done.stderr.strip()[-300:])
        self.setup = json.loads(done.stdout)
        if self.setup["distinct_keys"] != groups:
            raise RuntimeError("%d distinct client keys for %d groups"
                               % (self.setup["distinct_keys"], groups))

    def pass_reply(self) -> bytes:
        return b"action=pass\nttl=%d\n\n" % self.setup["ttl"]


class Spawn:
    """One process on stdin/stdout pipes, one connection."""

    form = "spawn"

    def start(self, k: int) -> list:
        proc = subprocess.Popen(self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self._stderr(), env=self.env(), cwd=self.workdir,
                                bufsize=0)
        self.procs = [proc]
        return [("pipe", proc.stdin.fileno(), proc.stdout.fileno())]

    def stop(self, timeout: float = 10) -> list:
        """End of input; wait; SIGKILL a straggler. The exit codes."""
        codes = []
        for proc in self.procs:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                codes.append(proc.wait(timeout))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                codes.append(proc.wait(5))
        self.procs = []
        return codes


class Listening:
    """One server process on a unix socket, K connections to it."""

    form = "daemon"

    def socket_path(self) -> str:
        if not getattr(self, "_socket", ""):
            path = os.path.join(self.workdir, "ps.sock")
            if len(path) >= 100:   # a unix socket's path limit
                self.socket_dir = tempfile.mkdtemp(prefix="psb-", dir="/tmp")
                path = os.path.join(self.socket_dir, "ps.sock")
            self._socket = path
        return self._socket

    def start(self, k: int) -> list:
        path = self.socket_path()
        with self._stderr() as log:
            proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, env=self.env(), cwd=self.workdir)
        self.procs = [proc]
        self._wait_until_answering(path, proc, 20)
        return [("unix", path)] * k

    def _wait_until_answering(self, path: str, proc: subprocess.Popen, limit_s: float) -> None:
        """Wait until a callout request for an unknown client gets its reply
        (greylistd serves its listeners only once the database is open).
        The request reads the database and writes nothing."""
        deadline = time.monotonic() + limit_s
        last = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("%s exited with status %s" % (self.name, proc.returncode))
            if os.path.exists(path):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    probe.connect(path)
                    probe.sendall(request(PROBE_ADDRESS, 1023))
                    self.probes[0] += 1
                    reply = b""
                    while not reply.endswith(END) and len(reply) < MAX_REPLY:
                        chunk = probe.recv(4096)
                        if not chunk:
                            break
                        reply += chunk
                    if reply:
                        self.probes[1] += 1
                    if reply == IGNORE:
                        return
                    last = "reply %r" % reply[:40]
                except OSError as exc:
                    last = str(exc)
                finally:
                    probe.close()
            time.sleep(0.05)
        raise RuntimeError("%s did not answer on %s within %ds (%s)"
                           % (self.name, path, limit_s, last))

    def stop(self, timeout: float = 10) -> list:
        codes = peers._terminate(self.procs, timeout)
        self.procs = []
        self.remove_socket_dir()
        return codes

    def remove_socket_dir(self) -> None:
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = ""


class SpawnCallout(Spawn, Ours):
    """greylist-postscreen on stdin/stdout."""

    name = "greylist-postscreen"
    script = "greylist-postscreen"

    def argv(self) -> list:
        return _find(self.python, self.source, self.script) + ["-c", self.settings]


class DaemonCallout(Listening, Ours):
    """greylistd with greylist_postscreen_listen only."""

    name = "greylistd"
    script = "greylistd"

    def listen(self) -> str:
        return "unix:" + self.socket_path()

    def argv(self) -> list:
        return _find(self.python, self.source, self.script) + ["-c", self.settings]


class SpawnIgnore(Spawn, Prog):
    """bench/ignore.py on stdin/stdout."""

    name = "ignore"

    def argv(self) -> list:
        return [self.python, os.path.join(HERE, "ignore.py")]


class ServerIgnore(Listening, Prog):
    """bench/ignore.py --listen: asyncio streams on a unix socket."""

    name = "ignore-asyncio"

    def argv(self) -> list:
        return [self.python, os.path.join(HERE, "ignore.py"), "--listen", self.socket_path()]


CEILING = {"greylist-postscreen": "ignore", "greylistd": "ignore-asyncio"}
REASON = re.compile(r" reason=([a-z-]+) client=")


def _cpu(pids: list) -> float:
    return sum(peers.read_proc(pid).get("cpu_s", 0.0) for pid in pids)


def log_reasons(path: str) -> dict:
    counts: collections.Counter = collections.Counter()
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                found = REASON.search(line)
                if found:
                    counts[found.group(1)] += 1
    except OSError:
        pass
    return dict(counts)


def log_problems(workdir: str) -> list:
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


def run_case(prog: Prog, k: int, sizes: dict, args, top: str) -> list:
    """Start prog with k connections on a fresh database: warm up, time the
    known requests, then the unknown ones; one row per kind."""
    base = {"program": prog.name, "form": prog.form, "connections": k, "pace": args.pace}
    ok, why = prog.available()
    if not ok:
        return [dict(base, kind=kind, available=False, reason=why)
                for kind in ("known", "unknown")]
    workdir = tempfile.mkdtemp(prefix="ps-%s-%d-" % (prog.name, k), dir=top)
    os.chmod(workdir, 0o755)
    rows: list = []
    try:
        prog.prepare(workdir, sizes["groups"])
        the_plan = plan(k, sizes, prog.pass_reply() if prog.ours else None)
        endpoints = prog.start(k)
        warm = summarise(run_phase(endpoints, the_plan["warm"], args.limit, prog.kill))
        # After the warm-up: greylistd opens each file with a trial commit
        # (stores/writecheck.py), which is no request's write.
        state0 = lmdb_state(args.python, prog.dbdir) if prog.ours else None
        for kind in ("known", "unknown"):
            row = dict(base, kind=kind, available=True,
                       requests=sum(len(r) for r, _ in the_plan[kind]))
            cpu0 = _cpu(prog.pids())
            row.update(summarise(run_phase(endpoints, the_plan[kind], args.limit, prog.kill,
                                           args.pace)))
            cpu1 = _cpu(prog.pids())
            row["server_cpu_us_per_request"] = round(
                (cpu1 - cpu0) / max(1, row["replies"]) * 1e6, 1)
            row["mean_bound_ms"] = round(k / row["rate"] * 1e3, 3) if row.get("rate") else None
            rows.append(row)
        codes = prog.stop()
        extra: dict = {"exit_codes": codes,
                       "warm": {"requests": sum(len(r) for r, _ in the_plan["warm"]),
                                "replies": warm["replies"], "wrong": warm["wrong"],
                                "errors": warm.get("errors", [])}}
        if prog.ours:
            state1 = lmdb_state(args.python, prog.dbdir)
            expected = dict(the_plan["reasons"])
            expected["unproven"] = expected.get("unproven", 0) + prog.probes[1]
            logged = log_reasons(prog.log)
            extra.update(lmdb_before=state0, lmdb_after=state1, setup=prog.setup,
                         log_problems=log_problems(workdir), reasons_logged=logged,
                         reasons_expected=expected, probes=list(prog.probes),
                         **compare_state(state0, state1))
            extra["reasons_match"] = logged == expected or (
                prog.probes[0] > prog.probes[1] and
                {r: n for r, n in logged.items() if r != "unproven"} ==
                {r: n for r, n in expected.items() if r != "unproven"} and
                0 <= logged.get("unproven", 0) - expected.get("unproven", 0)
                <= prog.probes[0] - prog.probes[1])
        for row in rows:
            row.update(extra)
    except Exception as exc:  # A program that fails to start is reported, not fatal.
        prog.kill()
        done = {row["kind"] for row in rows}
        rows += [dict(base, kind=kind, available=True, replies=0)
                 for kind in ("known", "unknown") if kind not in done]
        for row in rows:
            row.setdefault("errors", []).append("%s: %s" % (type(exc).__name__, exc))
    finally:
        prog.kill()
        prog.procs = []
        if isinstance(prog, Listening):
            prog.remove_socket_dir()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# Reporting.

def failures(rows: list) -> list:
    """What --check rejects."""
    out = []
    for r in rows:
        where = "round %d %s %s K=%d" % (r.get("round", 1), r["kind"], r["program"],
                                          r["connections"])
        if not r.get("available", True):
            if r.get("program") in CEILING:
                out.append("%s: not available: %s" % (where, r.get("reason")))
            continue
        if r.get("errors"):
            out.append("%s: %s" % (where, "; ".join(r["errors"])))
        if r.get("wrong"):
            out.append("%s: %d wrong replies (%s)" % (where, r["wrong"],
                                                     "; ".join(r.get("wrong_examples", []))))
        if r.get("replies", 0) != r.get("requests", -1):
            out.append("%s: %s replies to %s requests" % (where, r.get("replies"),
                                                          r.get("requests")))
        warm = r.get("warm") or {}
        if warm and (warm["wrong"] or warm["errors"] or warm["replies"] != warm["requests"]):
            out.append("%s: warm-up: %d of %d replies, %d wrong, %s" % (
                where, warm["replies"], warm["requests"], warm["wrong"],
                "; ".join(warm["errors"])))
        if any(c != 0 for c in r.get("exit_codes", [0])):
            out.append("%s: exit status %s" % (where, r.get("exit_codes")))
        if r.get("log_problems"):
            out.append("%s: %s" % (where, "; ".join(r["log_problems"])))
        if r.get("no_write") is False:
            out.append("%s: the database was written: changed %s, created %s"
                       % (where, r["changed"], r["created"]))
        if r.get("reasons_match") is False:
            out.append("%s: reasons logged %s, expected %s"
                       % (where, r["reasons_logged"], r["reasons_expected"]))
    return out


def ceiling_ratios(rows: list) -> None:
    """Set x_ceiling on each of greylist's rows of one round: its rate over
    the rate of its ceiling (same kind, form and K) in the same round."""
    keyed = {(r["kind"], r["form"], r["connections"], r["program"]): r for r in rows}
    for r in rows:
        ceiling = keyed.get((r["kind"], r["form"], r["connections"],
                             CEILING.get(r["program"], "")))
        if ceiling and ceiling.get("rate") and r.get("rate"):
            r["x_ceiling"] = round(r["rate"] / ceiling["rate"], 3)
            r["ceiling_rate"], r["ceiling_p99_ms"] = ceiling["rate"], ceiling["p99_ms"]


def median_rows(rounds: list) -> list:
    """Per case and kind, the row of the round with the median (low) rate,
    with every round's rate and p99 beside it; its x_ceiling is the median
    (low) of the rounds' own ratios."""
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
        row["rates_all_rounds"] = [t.get("rate") for t in trials]
        row["p99_ms_all_rounds"] = [t.get("p99_ms") for t in trials]
        ratios = [t["x_ceiling"] for t in trials if "x_ceiling" in t]
        if ratios:
            row["x_ceiling_all_rounds"] = ratios
            row["x_ceiling"] = statistics.median_low(ratios)
        out.append(row)
    return out


def targets(rows: list) -> list:
    """p99 under 1 ms for a known client in the daemon, at each K: judged
    on the reported (median-rate) round, with every round's p99."""
    out = []
    for r in rows:
        if r["program"] != "greylistd" or r["kind"] != "known" or not r.get("rate"):
            continue
        p99s = [p for p in r.get("p99_ms_all_rounds", [r["p99_ms"]]) if p is not None]
        out.append({"target": "p99 < %g ms, known client, greylistd, %d connection%s%s"
                              % (TARGET_P99_MS, r["connections"],
                                 "" if r["connections"] == 1 else "s",
                                 ", %g requests a second on each" % r["pace"]
                                 if r.get("pace") else ", saturated"),
                    "connections": r["connections"], "p99_ms": r["p99_ms"],
                    "p99_ms_all_rounds": p99s,
                    "rounds_met": sum(p < TARGET_P99_MS for p in p99s),
                    "ceiling_p99_ms": r.get("ceiling_p99_ms"),
                    "met": r["p99_ms"] < TARGET_P99_MS})
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
    w("sizes: %d auto-whitelisted /24 groups and the manual group 198.51.100/24; per "
      "case %d untimed warm-up requests, then %d known and %d unknown timed requests; "
      "%d round(s), the median (low) by rate reported\n\n"
      % (s["groups"], s["warm"], s["requests"], s["requests"], report["rounds"]))
    if report.get("pace"):
        w("pace: %g requests a second on each connection, on a fixed schedule; latency "
          "from the write, or from the due time when a late reply kept a request back\n\n"
          % report["pace"])
    head = ("kind    form    program              K  requests/s   p50 ms   p99 ms  p99.9ms"
            "   max ms  K/rate ms  cpu us  x ceiling  wrong")
    w(head + "\n" + "-" * len(head) + "\n")
    for r in report["rows"]:
        if not r.get("available", True):
            w("%-7s %-7s %-19s %2d  not available: %s\n" % (
                r["kind"], r["form"], r["program"], r["connections"], r.get("reason")))
            continue
        ratio = "%.3f" % r["x_ceiling"] if "x_ceiling" in r else "-"
        if r.get("rate"):
            w("%-7s %-7s %-19s %2d %11.0f %8.3f %8.3f %8.3f %8.2f %10.3f %7.0f %10s %6d\n" % (
                r["kind"], r["form"], r["program"], r["connections"], r["rate"],
                r["p50_ms"], r["p99_ms"], r["p999_ms"], r["max_ms"], r["mean_bound_ms"],
                r["server_cpu_us_per_request"], ratio, r["wrong"]))
        else:
            w("%-7s %-7s %-19s %2d  no replies\n" % (r["kind"], r["form"], r["program"],
                                                     r["connections"]))
        if len(r.get("rates_all_rounds") or []) > 1:
            w("        rounds: %s requests/s, p99 %s ms%s\n" % (
                " ".join("%.0f" % x if x else "-" for x in r["rates_all_rounds"]),
                " ".join("%.3f" % x if x else "-" for x in r["p99_ms_all_rounds"]),
                ", x ceiling " + " ".join("%.3f" % x for x in r["x_ceiling_all_rounds"])
                if r.get("x_ceiling_all_rounds") else ""))
        for error in r.get("errors", []):
            w("        errors: %s\n" % error)
    w("\n(K/rate: the mean latency that K connections with one request in flight each "
      "must see at that rate; cpu us: the server's CPU per request; x ceiling: the rate "
      "over the ignore responder's of the same form and K in the same round, the median "
      "(low) of the rounds; wrong: replies other than the expected one.)\n\n")
    w("target (the issue): p99 under %g ms for a known client in the daemon\n" % TARGET_P99_MS)
    for t in report["targets"]:
        w("  %-7s %s: p99 %.3f ms (rounds: %s; met in %d of %d); the ignore responder's "
          "p99 at the same K %s\n" % (
              "MET" if t["met"] else "MISSED", t["target"], t["p99_ms"],
              " ".join("%.3f" % p for p in t["p99_ms_all_rounds"]), t["rounds_met"],
              len(t["p99_ms_all_rounds"]),
              "%.3f ms" % t["ceiling_p99_ms"] if t.get("ceiling_p99_ms") is not None else "-"))
    w("\nno-write check (every LMDB environment of the database directory, "
      "[last_txnid, entries] after the warm-up -> after the program stopped):\n")
    for r in report["all_rounds"]:
        if r["kind"] != "known" or "lmdb_before" not in r:
            continue
        envs = ", ".join("%s %s -> %s" % (name, r["lmdb_before"][name],
                                           r["lmdb_after"].get(name))
                         for name in sorted(r["lmdb_before"])
                         if r["lmdb_before"][name] is not None)
        created = ", ".join("%s%s" % (name, "" if v is None else " %s" % v)
                            for name, v in sorted(r["created"].items()))
        w("  %-5s round %d %-19s K=%-2d %s%s\n" % (
            "OK" if r["no_write"] else "WROTE", r["round"], r["program"], r["connections"],
            envs, "; created: " + created if created else ""))
    w("reasons logged (warm-up, probes and timed requests):\n")
    for r in report["all_rounds"]:
        if r["kind"] != "known" or "reasons_logged" not in r:
            continue
        w("  %-5s round %d %-19s K=%-2d %s%s\n" % (
            "OK" if r["reasons_match"] else "WRONG", r["round"], r["program"],
            r["connections"], " ".join("%s=%d" % kv for kv in sorted(r["reasons_logged"].items())),
            "" if r["reasons_match"] else " (expected %s)" % " ".join(
                "%s=%d" % kv for kv in sorted(r["reasons_expected"].items()))))
    bad = report.get("failures") or []
    w("check: %s\n" % ("every reply as expected (pass with the ttl for known clients, ignore "
                       "for unknown ones), the reasons as expected, no database write"
                       if not bad else "; ".join(bad)))


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
    p.add_argument("--requests", type=int,
                   help="timed requests per kind and case (10000; quick 200)")
    p.add_argument("--groups", type=int, help="auto-whitelisted /24 groups (2000; quick 30)")
    p.add_argument("--warm", type=int, help="untimed warm-up requests per case (400; quick 40)")
    p.add_argument("--connections", default="1,16",
                   help="greylistd's connection counts (default 1,16)")
    p.add_argument("--python", default=peers.python_default())
    p.add_argument("--ours-path", default=peers.ROOT)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--rounds", type=int, help="rounds of every case; the median (low) "
                   "is reported (3; quick 1)")
    p.add_argument("--limit", type=float, help="time limit per phase, s (60; quick 20)")
    p.add_argument("--pace", type=float, default=0.0,
                   help="requests a second on each connection, on a fixed schedule "
                        "(default 0: each request as soon as the last reply is in)")
    p.add_argument("--json", default=None, help="write the report to FILE (- for stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 on a failure (see LIMITS)")
    args = p.parse_args(argv)
    for name, full, small in (("requests", 10000, 200), ("groups", 2000, 30),
                              ("warm", 400, 40), ("limit", 60.0, 20.0), ("rounds", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    args.ours_path = os.path.abspath(args.ours_path)
    args.connections = [int(k) for k in args.connections.split(",") if k]
    if args.requests < 1 or not 1 <= args.groups <= 65536 or args.warm < 0 \
            or not 1 <= args.rounds <= 9 or any(k < 1 or k > 256 for k in args.connections) \
            or not 0 <= args.pace <= 100000:
        p.error("requests at least 1, groups 1 to 65536, warm at least 0, rounds 1 to 9, "
                "connections 1 to 256, pace 0 to 100000")
    return args


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    sizes = {"requests": args.requests, "groups": args.groups, "warm": args.warm}
    top = tempfile.mkdtemp(prefix="bench-postscreen-", dir=args.tmpdir)
    os.chmod(top, 0o755)
    import run as bench_run   # machine(); run.py imports the other bench modules
    report: dict = {"sizes": sizes, "pace": args.pace, "machine": bench_run.machine(),
                    "versions": versions(args.python, args.ours_path),
                    "load_before": "%.2f %.2f %.2f" % os.getloadavg()}
    started = time.monotonic()
    rounds: list = []
    try:
        for r in range(args.rounds):
            cases = [(SpawnCallout(args.python, args.ours_path), 1),
                     (SpawnIgnore(args.python, args.ours_path), 1)]
            for k in args.connections:
                cases += [(DaemonCallout(args.python, args.ours_path), k),
                          (ServerIgnore(args.python, args.ours_path), k)]
            rows = []
            for prog, k in cases:
                got = run_case(prog, k, sizes, args, top)
                for row in got:
                    row["round"] = r + 1
                sys.stdout.write("round %d: %s K=%d: %s\n" % (
                    r + 1, prog.name, k, ", ".join(
                        "%s %s/s p99 %s ms" % (row["kind"], row.get("rate", "-"),
                                               row.get("p99_ms", "-")) for row in got)))
                sys.stdout.flush()
                rows += got
            rounds.append(rows)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report["rounds"] = args.rounds
    report["rows"] = median_rows(rounds)
    report["all_rounds"] = [row for rows in rounds for row in rows]
    report["targets"] = targets(report["rows"])
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
