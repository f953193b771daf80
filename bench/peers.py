"""The programs under test: greylist, its peers, and the DUNNO responder.

DESCRIPTION
    Each Program starts K server processes (or one daemon with K
    connections) on a fresh database in a work directory of its own,
    returns the endpoints the drivers talk to, and stops exactly the
    processes it started, by PID.

      ours       python -m greylist, K processes on stdin/stdout pipes
                 (as spawn(8) runs it), one settings file per run with
                 greylist_delay, greylist_log = a file (no syslog) and,
                 as root, greylist_allow_root = yes.
      greylistd  the daemon (issue 11): ONE greylistd process, run as its
                 console script from setup.cfg with the tested source on
                 PYTHONPATH, on a unix socket in the work directory, K
                 connections; the settings file of ours plus
                 greylist_policy_listen and greylist_metrics_listen (a
                 free loopback port), scraped by scrape() for the group
                 commit histogram. Stopped with SIGTERM to its PID.
      dunno      bench/dunno.py, K processes on pipes: reads a request,
                 answers DUNNO; the harness's own ceiling.
      greylist.pl  Postfix's examples/smtpd-policy/greylist.pl from
                 Debian's postfix-doc, run from a temporary copy with
                 only $database_name and $greylist_delay changed, K
                 processes on pipes sharing one DB_File database.
      postgrey   /usr/sbin/postgrey (Debian 1.37) as one daemon on a unix
                 socket with a temporary --dbdir and explicit --delay,
                 K connections; as root it runs as the user postgrey.

    With store "redis" (or "redis-tcp"), ours and greylistd keep their
    database in a RedisServer of their own, started with the program on
    a fresh, empty server and stopped with it: greylist_database =
    redis:unix:SOCKET (or redis://127.0.0.1:PORT/0). store_stats() reads
    the server's INFO (commandstats, total_writes_processed) and CPU for
    the round trips and commands per request (bench/redis_bench.py).

    The benchmark's delay D applies to all. greylist.pl passes a triple
    when age > $greylist_delay, the others when age >= delay, so
    greylist.pl gets D - 1 (the same behaviour in whole seconds).

DIAGNOSTICS
    available() returns (False, reason) when a peer is not installed;
    the harness then reports it as not available.
"""

import gzip
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

GREYLIST_PL = ("/usr/share/doc/postfix/examples/smtpd-policy/greylist.pl",
               "/usr/share/doc/postfix/examples/smtpd-policy/greylist.pl.gz",
               "/usr/libexec/postfix/greylist.pl")
POSTGREY = "/usr/sbin/postgrey"


def run_text(argv: list, timeout: float = 10) -> str:
    """Return a command's stripped stdout+stderr, or "" if it fails to run."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout + out.stderr).strip()


def dpkg_version(package: str) -> str:
    return run_text(["dpkg-query", "-W", "-f", "${Version}", package]) or "unknown"


class Program:
    """A server under test; subclasses define how it starts."""

    name = "?"
    pipes = True

    def __init__(self) -> None:
        self.procs: list = []
        self.workdir = ""
        self.endpoints: list = []

    def available(self) -> tuple:
        return True, ""

    def version(self) -> str:
        return ""

    def argv(self) -> list:
        raise NotImplementedError

    def env(self) -> dict | None:
        return None

    def prepare(self, workdir: str, delay_s: int) -> None:
        """Create the program's files in workdir (fresh database)."""

    def start(self, workdir: str, k: int, delay_s: int) -> list:
        """Start the servers; return k endpoints ("pipe", wfd, rfd) or ("unix", path)."""
        self.workdir = workdir
        self.prepare(workdir, delay_s)
        self.endpoints = []
        for _ in range(k):
            proc = subprocess.Popen(self.argv(), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE,
                                    stderr=open(os.path.join(workdir, "stderr"), "ab"),
                                    env=self.env(), cwd=workdir, bufsize=0)
            self.procs.append(proc)
            self.endpoints.append(("pipe", proc.stdin.fileno(), proc.stdout.fileno()))
        return self.endpoints

    def pids(self) -> list:
        return [p.pid for p in self.procs]

    def stop(self, timeout: float = 10) -> list:
        """Close stdin (end of input), wait, kill stragglers; return exit codes."""
        for proc in self.procs:
            for stream in (proc.stdin, proc.stdout):
                try:
                    if stream:
                        stream.close()
                except OSError:
                    pass
        codes = [_wait(proc, timeout) for proc in self.procs]
        self.procs = []
        return codes

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)

    def scrape(self) -> dict | None:
        """The program's own counters (greylistd's metrics), or None."""
        return None

    def store_stats(self) -> dict | None:
        """The counters of the program's Redis server, or None."""
        return None


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=timeout)


STORES = ("lmdb", "redis", "redis-tcp")
# A wait before each scrape of greylistd, past its render interval.
SCRAPE_AFTER_S = 0.6


class Ours(Program):
    name = "greylist"

    def __init__(self, python: str, source: str, verbose: int = 0,
                 store: str = "lmdb", redis_fsync: str = "everysec") -> None:
        super().__init__()
        if store not in STORES:
            raise ValueError("store %r: not one of %s" % (store, ", ".join(STORES)))
        self.python = python
        self.source = source
        self.verbose = verbose
        self.store = store
        self.redis_fsync = redis_fsync
        self.redis: RedisServer | None = None

    def available(self) -> tuple:
        if not os.path.isdir(os.path.join(self.source, "greylist")):
            return False, "no greylist package in %s" % self.source
        if self.store != "lmdb":
            if redis_server_path() is None:
                return False, "redis-server not installed (Debian: apt-get install redis-server)"
            if run_text([self.python, "-c", "import redis"]) != "":
                return False, "redis-py not importable by %s" % self.python
        return True, ""

    def version(self) -> str:
        text = describe_source(self.source)
        if self.store != "lmdb":
            text += " on %s (%s, appendfsync %s), redis-py %s" % (
                redis_version(), "TCP 127.0.0.1" if self.store == "redis-tcp"
                else "unix socket", self.redis_fsync,
                run_text([self.python, "-c", "import redis; print(redis.__version__)"]))
        return text

    def prepare(self, workdir: str, delay_s: int) -> None:
        self.database = os.path.join(workdir, "greylist")
        if self.store != "lmdb":
            self.redis = RedisServer(workdir, tcp=self.store == "redis-tcp",
                                     fsync=self.redis_fsync)
            self.redis.start()
            self.database = self.redis.url
        self.settings = os.path.join(workdir, "greylist.cf")
        with open(self.settings, "w", encoding="utf-8") as handle:
            handle.write("greylist_database = %s\n" % self.database)
            handle.write("greylist_delay = %ds\n" % delay_s)
            handle.write("greylist_log = %s\n" % os.path.join(workdir, "greylist.log"))
            if os.geteuid() == 0:
                handle.write("greylist_allow_root = yes\n")

    def argv(self) -> list:
        return [self.python, "-m", "greylist", "-c", self.settings] + \
            ["-v"] * self.verbose

    def env(self) -> dict:
        path = os.environ.get("PYTHONPATH")
        return dict(os.environ, PYTHONPATH=self.source + (":" + path if path else ""))

    def stop(self, timeout: float = 10) -> list:
        codes = super().stop(timeout)
        self._stop_redis()
        return codes

    def kill(self) -> None:
        super().kill()
        self._stop_redis()

    def _stop_redis(self) -> None:
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def store_stats(self) -> dict | None:
        return None if self.redis is None else self.redis.stats()


class Daemon(Ours):
    """greylistd: one process, K connections to its unix socket."""

    name = "greylistd"
    pipes = False

    def __init__(self, python: str, source: str, verbose: int = 0,
                 commit_batch: int | None = None, database: str | None = None,
                 store: str = "lmdb", redis_fsync: str = "everysec") -> None:
        super().__init__(python, source, verbose, store, redis_fsync)
        self.commit_batch = commit_batch
        self.existing_database = database   # serve this database (scale runs)
        self.socket_dir = ""

    def available(self) -> tuple:
        ok, why = super().available()
        if not ok:
            return ok, why
        if find_console_script(self.python, self.source, "greylistd") is None:
            return False, "no greylistd console script in %s/setup.cfg" % self.source
        if run_text([self.python, "-c", "import prometheus_client"]) != "":
            return False, "prometheus_client not importable by %s" % self.python
        return True, ""

    def prepare(self, workdir: str, delay_s: int) -> None:
        super().prepare(workdir, delay_s)
        if self.existing_database:
            self.database = self.existing_database
        self.socket_path = os.path.join(workdir, "policy.sock")
        if len(self.socket_path) >= 100:   # greylist_policy_listen's limit
            self.socket_dir = tempfile.mkdtemp(prefix="gld-", dir="/tmp")
            os.chmod(self.socket_dir, 0o755)
            self.socket_path = os.path.join(self.socket_dir, "policy.sock")
        self.metrics_port = free_port()
        with open(self.settings, "w", encoding="utf-8") as handle:
            handle.write("greylist_database = %s\n" % self.database)
            handle.write("greylist_delay = %ds\n" % delay_s)
            handle.write("greylist_log = %s\n" % os.path.join(workdir, "greylist.log"))
            if os.geteuid() == 0:
                handle.write("greylist_allow_root = yes\n")
            handle.write("greylist_policy_listen = unix:%s\n" % self.socket_path)
            handle.write("greylist_metrics_listen = inet:127.0.0.1:%d\n" % self.metrics_port)
            if self.commit_batch:
                handle.write("greylist_commit_batch = %d\n" % self.commit_batch)

    def argv(self) -> list:
        return find_console_script(self.python, self.source, "greylistd") + \
            ["-c", self.settings] + ["-v"] * self.verbose

    def start(self, workdir: str, k: int, delay_s: int) -> list:
        self.workdir = workdir
        self.prepare(workdir, delay_s)
        log = open(os.path.join(workdir, "stderr"), "ab")
        proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, env=self.env(), cwd=workdir)
        self.procs = [proc]
        _wait_for_socket(self.socket_path, proc, 20, self.name)
        # The policy socket accepts (in the kernel) as soon as it is bound,
        # before the database is open; the metrics listener is served only
        # after the database is open and the policy server started.
        deadline = time.monotonic() + 20
        while True:
            try:
                http_get("127.0.0.1", self.metrics_port, "/metrics", timeout=20)
                break
            except OSError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("greylistd did not serve its metrics: %s" % exc)
                time.sleep(0.05)
        self.endpoints = [("unix", self.socket_path)] * k
        return self.endpoints

    def stop(self, timeout: float = 10) -> list:
        codes = _terminate(self.procs, timeout)
        self.procs = []
        self._remove_socket_dir()
        self._stop_redis()
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

    def scrape(self) -> dict | None:
        """greylistd's group-commit metrics: {"batch": hist, "seconds": hist}."""
        if not self.procs or self.procs[0].poll() is not None:
            return None
        # greylistd renders its metrics at most every 0.5 s (metrics.py
        # RENDER_EVERY_S): a scrape sooner after the last one would get
        # that render, from before the phase.
        time.sleep(SCRAPE_AFTER_S)
        try:
            text = http_get("127.0.0.1", self.metrics_port, "/metrics")
        except OSError:
            return None
        return {"batch": parse_histogram(text, "greylist_commit_batch_size"),
                "seconds": parse_histogram(text, "greylist_commit_seconds"),
                "requests": parse_counter(text, "greylist_requests_total")}


def redis_server_path() -> str | None:
    return shutil.which("redis-server", path="/usr/bin:/usr/sbin:/usr/local/bin:"
                        + os.environ.get("PATH", ""))


def redis_version() -> str:
    text = run_text([redis_server_path() or "redis-server", "--version"])
    for word in text.split():
        if word.startswith("v="):
            return "redis-server " + word[2:]
    return text or "redis-server (unknown version)"


class RedisServer:
    """One redis-server for one program run, on a fresh empty dataset.

    A unix socket in a directory of its own (under workdir, or under
    /tmp when that path is too long for a socket), which the harness
    uses for INFO; with tcp, also 127.0.0.1:PORT, which greylist then
    uses. No RDB snapshots; the append-only file with appendfsync
    fsync ("always", "everysec" or "no"; "off": no append-only file).
    Started without daemonizing, so its PID is the one we started;
    stop() ends only that PID."""

    def __init__(self, workdir: str, tcp: bool = False, fsync: str = "everysec") -> None:
        self.directory = os.path.join(workdir, "redis")
        self.socket_dir = ""
        self.socket_path = os.path.join(self.directory, "redis.sock")
        if len(self.socket_path) >= 100:
            self.socket_dir = tempfile.mkdtemp(prefix="gl-redis-", dir="/tmp")
            self.socket_path = os.path.join(self.socket_dir, "redis.sock")
        self.tcp = tcp
        self.port = free_port() if tcp else 0
        self.fsync = fsync
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.tcp:
            return "redis://127.0.0.1:%d/0" % self.port
        return "redis:unix:%s" % self.socket_path

    def start(self, limit_s: float = 20) -> None:
        os.makedirs(self.directory, exist_ok=True)
        argv = [redis_server_path() or "redis-server", "--port", str(self.port),
                "--bind", "127.0.0.1", "--unixsocket", self.socket_path,
                "--unixsocketperm", "700", "--save", "", "--dir", self.directory,
                "--logfile", os.path.join(self.directory, "redis.log"),
                "--daemonize", "no"]
        if self.fsync == "off":
            argv += ["--appendonly", "no"]
        else:
            argv += ["--appendonly", "yes", "--appendfsync", self.fsync]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=self.directory)
        deadline = time.monotonic() + limit_s
        while True:
            try:
                if self.command(b"PING", timeout=1) == b"+PONG":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer on %s" % self.socket_path)
            time.sleep(0.05)

    def command(self, *words: bytes, timeout: float = 10) -> bytes:
        """One command over the unix socket; its reply: a status or error
        line as is, a bulk string's contents."""
        request = b"*%d\r\n" % len(words) + b"".join(
            b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            sock.sendall(request)
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("redis closed the connection")
                data += chunk
            head, _, rest = data.partition(b"\r\n")
            if not head.startswith(b"$"):
                return head
            size = int(head[1:])
            while len(rest) < size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("redis closed the connection")
                rest += chunk
            return rest[:size]

    def stats(self) -> dict | None:
        """{"calls": {command: calls}, "writes": total_writes_processed,
        "reads": total_reads_processed, "commands": total_commands_processed,
        "cpu_s": the server's CPU seconds, "keys": keys in db0}, from one
        INFO (which itself counts as one command and one write)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            text = self.command(b"INFO", b"stats", b"commandstats", b"keyspace")
        except OSError:
            return None
        out: dict = {"calls": {}, "keys": 0}
        for line in text.decode("ascii", "replace").splitlines():
            if line.startswith("cmdstat_"):
                name, _, fields = line[len("cmdstat_"):].partition(":")
                for field in fields.split(","):
                    if field.startswith("calls="):
                        out["calls"][name] = int(field[len("calls="):])
            elif line.startswith("total_writes_processed:"):
                out["writes"] = int(line.split(":", 1)[1])
            elif line.startswith("total_reads_processed:"):
                out["reads"] = int(line.split(":", 1)[1])
            elif line.startswith("total_commands_processed:"):
                out["commands"] = int(line.split(":", 1)[1])
            elif line.startswith("db0:keys="):
                out["keys"] = int(line.split("=", 1)[1].split(",", 1)[0])
        out["cpu_s"] = read_proc(self.proc.pid).get("cpu_s", 0.0)
        return out

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None:
            _terminate([self.proc], timeout)
            self.proc = None
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = ""


# Start-up notes of redis-server that say nothing about the run.
_REDIS_START_NOTES = ("overcommit", "TCP backlog", "transparent", "oO0OoO0OoO0Oo",
                      "Configuration loaded", "no config file", "Redis version",
                      "User requested shutdown", "ready to exit", "Saving the final",
                      "Server initialized")


def redis_warnings(path: str) -> dict:
    """{"count", "examples"}: the warnings (level "#") in a redis-server
    log, such as "Asynchronous AOF fsync is taking too long (disk is
    busy?)", without its start-up notes."""
    found = []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if " # " in line and not any(n in line for n in _REDIS_START_NOTES):
                    found.append(line.split(" # ", 1)[1].strip())
    except OSError:
        pass
    return {"count": len(found), "examples": sorted(set(found))[:3]}


# Commands that are not a round trip of their own: those sent queued after
# MULTI, in the write of EXEC, and the GETs and SETs that greylist's
# compare-and-set script runs inside Redis (its EVALSHA is the round trip).
IN_TRANSACTION = ("multi", "set", "del", "get")


def redis_delta(before: dict | None, after: dict | None, requests: int) -> dict | None:
    """What the program asked of Redis between two stats(): per command,
    in all and per request; round trips (the server's reply writes,
    total_writes_processed, less the write of the INFO that took before);
    server CPU per request. The harness's INFO is left out."""
    if not before or not after or not requests:
        return None
    calls = {name: n - before["calls"].get(name, 0) for name, n in after["calls"].items()
             if name != "info" and n - before["calls"].get(name, 0)}
    writes = after.get("writes", 0) - before.get("writes", 0) - 1
    total = sum(calls.values())
    return {"calls": calls, "requests": requests,
            "commands_per_request": round(total / requests, 3),
            "calls_per_request": {name: round(n / requests, 3) for name, n in calls.items()},
            "round_trips": writes,
            "round_trips_per_request": round(writes / requests, 3),
            # The same, counted from the commands: each one a round trip,
            # but those queued in a transaction, sent with its EXEC.
            "round_trips_from_commands_per_request": round(
                (total - sum(calls.get(name, 0) for name in IN_TRANSACTION)) / requests, 3),
            "redis_cpu_us_per_request": round(
                (after["cpu_s"] - before["cpu_s"]) / requests * 1e6, 1),
            "keys_after": after.get("keys", 0)}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free when asked; the daemon binds it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(host: str, port: int, path: str, timeout: float = 5) -> str:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode()))
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200") and not head.startswith(b"HTTP/1.1 200"):
        raise OSError("metrics: %r" % head[:80])
    return body.decode("utf-8", "replace")


def parse_histogram(text: str, name: str) -> dict:
    """{"count", "sum", "buckets": {le: cumulative count}} of a Prometheus histogram."""
    out: dict = {"count": 0.0, "sum": 0.0, "buckets": {}}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out["buckets"][le] = float(line.rsplit(None, 1)[1])
        elif line.startswith(name + "_count "):
            out["count"] = float(line.split()[1])
        elif line.startswith(name + "_sum "):
            out["sum"] = float(line.split()[1])
    return out


def parse_counter(text: str, name: str) -> float:
    """The sum of a counter over all its labels."""
    return sum(float(line.rsplit(None, 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def histogram_delta(before: dict | None, after: dict | None) -> dict | None:
    """after - before of parse_histogram() results (a phase's own observations)."""
    if not after:
        return None
    before = before or {"count": 0.0, "sum": 0.0, "buckets": {}}
    return {"count": after["count"] - before["count"],
            "sum": after["sum"] - before["sum"],
            "buckets": {le: v - before["buckets"].get(le, 0.0)
                        for le, v in after["buckets"].items()}}


class Dunno(Program):
    name = "dunno"

    def __init__(self, python: str) -> None:
        super().__init__()
        self.python = python

    def version(self) -> str:
        return "bench/dunno.py on " + run_text([self.python, "-V"])

    def argv(self) -> list:
        return [self.python, os.path.join(HERE, "dunno.py")]


class GreylistPl(Program):
    name = "greylist.pl"

    def __init__(self) -> None:
        super().__init__()
        self.source = next((p for p in GREYLIST_PL if os.path.exists(p)), None)
        if self.source is None:
            listing = run_text(["dpkg", "-L", "postfix-doc"]).split("\n")
            self.source = next((p for p in listing if p.endswith("/greylist.pl")
                                or p.endswith("/greylist.pl.gz")), None)

    def available(self) -> tuple:
        if self.source is None:
            return False, "greylist.pl not found (Debian: apt-get install postfix-doc)"
        if shutil.which("perl") is None:
            return False, "perl not found"
        if run_text(["perl", "-MDB_File", "-e", "print 1"]) != "1":
            return False, "perl DB_File not available"
        return True, ""

    def version(self) -> str:
        return "postfix-doc %s, perl %s, DB_File %s" % (
            dpkg_version("postfix-doc"),
            run_text(["perl", "-e", "print $^V"]).lstrip("v"),
            run_text(["perl", "-MDB_File", "-e", "print \"$DB_File::VERSION (db $DB_File::db_ver)\""]))

    def prepare(self, workdir: str, delay_s: int) -> None:
        opener = gzip.open if self.source.endswith(".gz") else open
        with opener(self.source, "rt", encoding="utf-8") as handle:
            text = handle.read()
        self.script = os.path.join(workdir, "greylist.pl")
        self.script_text = patch_greylist_pl(text, os.path.join(workdir, "greylist.db"),
                                             max(0, delay_s - 1))
        with open(self.script, "w", encoding="utf-8") as handle:
            handle.write(self.script_text)

    def argv(self) -> list:
        return ["perl", self.script]


def patch_greylist_pl(text: str, database: str, delay_s: int) -> str:
    """Change only the database path and the delay of greylist.pl."""
    lines = text.split("\n")
    changed = 0
    for i, line in enumerate(lines):
        if line.startswith("$database_name="):
            lines[i] = '$database_name="%s";' % database
            changed += 1
        elif line.startswith("$greylist_delay="):
            lines[i] = "$greylist_delay=%d;" % delay_s
            changed += 1
    if changed != 2:
        raise ValueError("greylist.pl: expected one $database_name= and one "
                         "$greylist_delay= line, changed %d" % changed)
    return "\n".join(lines)


class Postgrey(Program):
    name = "postgrey"
    pipes = False

    def __init__(self, whitelists: bool = True) -> None:
        super().__init__()
        self.whitelists = whitelists
        self.path = POSTGREY if os.path.exists(POSTGREY) else shutil.which("postgrey")

    def available(self) -> tuple:
        if self.path is None:
            return False, "postgrey not installed (Debian: apt-get install postgrey)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgrey")
            except KeyError:
                return False, "no user postgrey to run it as"
        return True, ""

    def version(self) -> str:
        text = run_text(["perl", "-T", self.path, "--version"]) or \
            run_text([self.path, "--version"])
        return "%s (Debian %s), BerkeleyDB %s" % (
            text.split("\n")[0], dpkg_version("postgrey"),
            run_text(["perl", "-MBerkeleyDB", "-e",
                      "print \"$BerkeleyDB::VERSION (db $BerkeleyDB::db_version)\""]))

    def start(self, workdir: str, k: int, delay_s: int) -> list:
        self.workdir = workdir
        dbdir = os.path.join(workdir, "db")
        os.mkdir(dbdir, 0o755)
        self.socket_path = os.path.join(workdir, "postgrey.sock")
        argv = [self.path, "--unix=%s" % self.socket_path, "--dbdir=%s" % dbdir,
                "--delay=%d" % delay_s]
        if not self.whitelists:
            empty = os.path.join(workdir, "empty")
            open(empty, "w").close()
            argv += ["--whitelist-clients=%s" % empty,
                     "--whitelist-recipients=%s" % empty]
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgrey")
            os.chown(dbdir, user.pw_uid, user.pw_gid)
            argv += ["--user=postgrey", "--group=%s" % _group_name(user.pw_gid)]
        log = open(os.path.join(workdir, "postgrey.log"), "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=workdir)
        self.procs = [proc]
        _wait_for_socket(self.socket_path, proc, 20)
        self.endpoints = [("unix", self.socket_path)] * k
        return self.endpoints

    def stop(self, timeout: float = 10) -> list:
        codes = _terminate(self.procs, timeout)
        self.procs = []
        return codes


def _terminate(procs: list, timeout: float) -> list:
    """SIGTERM each daemon we started (by its PID) and wait; the exit codes."""
    codes = []
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        codes.append(_wait(proc, timeout))
    return codes


def _group_name(gid: int) -> str:
    import grp
    return grp.getgrgid(gid).gr_name


def _wait_for_socket(path: str, proc: subprocess.Popen, limit_s: float,
                     name: str = "postgrey") -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with status %s" % (name, proc.returncode))
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    raise RuntimeError("%s did not open %s within %ds" % (name, path, limit_s))


def describe_source(path: str) -> str:
    """Return "commit[-dirty]" for a git checkout, else the path."""
    head = run_text(["git", "-C", path, "rev-parse", "--short", "HEAD"])
    if not head or " " in head:
        marker = os.path.join(path, ".bench-commit")
        if os.path.exists(marker):
            with open(marker, encoding="utf-8") as handle:
                return handle.read().strip() + " (exported tree)"
        return path
    dirty = run_text(["git", "-C", path, "status", "--porcelain", "--", "greylist"])
    return head + ("-dirty" if dirty else "")


def read_proc(pid: int) -> dict:
    """Return peak RSS (kB) and CPU seconds of a live process, or {}."""
    out = {}
    try:
        with open("/proc/%d/status" % pid, encoding="ascii") as handle:
            for line in handle:
                if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:")):
                    out[line.split(":")[0]] = int(line.split()[1])
        with open("/proc/%d/stat" % pid, encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        pass
    return out


def find_greylistctl(python: str, source: str) -> list | None:
    """Return the argv prefix of greylistctl (issue 4), or None if there is none.

    Prefers the console script declared in source's setup.cfg, run with
    the benchmark's python and source, over one on PATH.
    """
    found = find_console_script(python, source, "greylistctl")
    if found is None:
        found = shutil.which("greylistctl")
        return [found] if found else None
    return found


def find_console_script(python: str, source: str, script: str) -> list | None:
    """The argv prefix that runs source's console script as its wrapper
    would (setup.cfg: script = module:function), with python; or None."""
    try:
        with open(os.path.join(source, "setup.cfg"), encoding="utf-8") as handle:
            for line in handle:
                name, _, target = line.partition("=")
                if name.strip() == script and ":" in target:
                    module, func = target.strip().split(":", 1)
                    return [python, "-c", "import sys; from %s import %s as m; "
                            "sys.argv[0] = %r; sys.exit(m())" % (module, func, script)]
    except OSError:
        pass
    return None


def python_default() -> str:
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable
