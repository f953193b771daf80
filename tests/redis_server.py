"""Real redis-server and redis-sentinel processes owned by a test.

DESCRIPTION
    RedisServer(directory, tcp=False, args=()) describes one redis-server:
    a unix socket DIRECTORY/redis.sock, and with tcp=True also a free
    high port on 127.0.0.1 (else --port 0: no TCP at all). It never saves
    (--save '' --appendonly no) and never daemonizes, so its PID is the
    one the test started. Its methods:

        start()            run it and wait (bounded, START_S) until it
                           answers PING; ServerError with its log if not
        stop()             SIGCONT (in case it is paused), SIGTERM, then
                           SIGKILL after STOP_S; by PID only
        kill()             SIGKILL now, and reap it
        restart()          start() again on the same socket and port
        pause(), resume()  SIGSTOP and SIGCONT
        client(**kw)       a redis-py client on the unix socket (or TCP)
        unix_url, tcp_url  greylist_database values for this server
        pid, port, socket_path, log_path, alive()

    RedisServer is a context manager (stop() on exit). start_server()
    also starts one, or calls conftest.require() when redis-server is
    missing or does not come up: a skip locally, a failure under CI.

    RedisServer(directory, tls=CERTS) serves TLS on a free high port of
    127.0.0.1 (tls_url, rediss://127.0.0.1:PORT/0) with the server
    certificate of CERTS, which make_certificates(directory) writes with
    openssl: a CA (ca.crt), a server certificate for 127.0.0.1 only
    (server.crt, server.key) and a client certificate (client.crt,
    client.key, mode 0600), all signed by the CA; the server wants a
    client certificate (tls-auth-clients yes, Redis's default). Its unix
    socket stays plain, for the test's own client.

    Sentinels(directory) is a Sentinel setup on 127.0.0.1: a master, a
    replica (--replicaof) and three redis-sentinel processes on free
    ports, each with its own config file

        sentinel monitor mymaster 127.0.0.1 MASTER_PORT 2
        sentinel down-after-milliseconds mymaster 1000
        sentinel failover-timeout mymaster 5000

    start() waits (bounded) until the replica is in sync and every
    sentinel knows the replica and the two other sentinels, so that a
    failover can be authorized. url is the greylist_database
    redis-sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster;
    master_port() asks a sentinel which port is the master now;
    wait_failover(old_port, timeout) waits until the sentinels name
    another master and it answers as a master. stop() stops all five,
    by PID, even after a failure half-way. Sentinels(directory,
    password=P, sentinel_password=S): the master and the replica require
    P (requirepass, masterauth), the sentinels require S (requirepass,
    sentinel-pass) and log in to the master with P (auth-pass).
    Sentinels(directory, tls=CERTS): the master, the replica and the
    sentinels serve TLS (the sentinels on TLS only, the two servers on a
    plain TCP port too, for the test's own clients), want client
    certificates, and replicate and monitor over TLS (tls-replication,
    with client.crt); url is then rediss-sentinel://..., and the
    sentinels name the TLS ports.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

START_S = 10.0
STOP_S = 5.0
MASTER = "mymaster"


class ServerError(Exception):
    """A server did not start or did not answer."""


# Ports handed out in this process: Sentinels picks five before any
# server binds one, and the kernel may give a just-closed port again (CI:
# a sentinel got the master's port, "Address already in use").
_GIVEN: set[int] = set()


def free_port() -> int:
    """A free high TCP port on 127.0.0.1 (above 20000, below 60000), never
    one this process handed out before."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if 20000 <= port < 60000 and port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise ServerError("no free port on 127.0.0.1 in 200 tries")


def missing() -> str | None:
    """Why redis-server and redis-sentinel cannot be used, or None."""
    for program in ("redis-server", "redis-sentinel"):
        if shutil.which(program) is None and not os.path.exists("/usr/bin/" + program):
            return "%s is not installed (Debian: redis-server, redis-sentinel)" % program
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install redis)"
    return None


def program(name: str) -> str:
    return shutil.which(name) or "/usr/bin/" + name


class Process:
    """One server process, started and ended by PID."""

    def __init__(self, directory: pathlib.Path, name: str) -> None:
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = self.directory / (name + ".log")
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, argv: list[str]) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=str(self.directory))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, number: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, number)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL now (a crash), and reap the process."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_S)

    def stop(self) -> None:
        """SIGCONT, SIGTERM, and SIGKILL after STOP_S; by PID only."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_S)


class RedisServer(Process):
    """A redis-server on a unix socket in directory, and optionally TCP."""

    def __init__(self, directory, tcp: bool = False, args=(), name: str = "redis",
                 port: int | None = None, password: str | None = None,
                 tls: dict | None = None) -> None:
        super().__init__(directory, name)
        self.password = password  # what client() logs in with
        self.tls = tls
        self.tls_port = free_port() if tls else 0
        self.socket_path = str(self.directory / (name + ".sock"))
        self.port = port if port is not None else (free_port() if tcp else 0)
        self.args = list(args)

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def unix_url(self) -> str:
        return "redis:unix:" + self.socket_path

    @property
    def tcp_url(self) -> str:
        assert self.port, "started without TCP"
        return "redis://127.0.0.1:%d/0" % self.port

    @property
    def tls_url(self) -> str:
        assert self.tls_port, "started without TLS"
        return "rediss://127.0.0.1:%d/0" % self.tls_port

    def argv(self) -> list[str]:
        tls = []
        if self.tls:
            tls = ["--tls-port", str(self.tls_port)]
            for name, value in tls_options(self.tls):
                tls += ["--" + name, value]
        return [program("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                "--unixsocket", self.socket_path, "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.directory), *tls, *self.args]

    def client(self, tcp: bool = False, **options):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        # No retries: redis-py's default retries with back-off (seconds
        # for a server that wants a password).
        options.setdefault("retry", Retry(NoBackoff(), 0))
        options.setdefault("password", self.password)
        options.setdefault("socket_timeout", 2)
        options.setdefault("socket_connect_timeout", 2)
        if tcp:
            return redis.Redis(host="127.0.0.1", port=self.port, **options)
        return redis.Redis(unix_socket_path=self.socket_path, **options)

    def start(self, timeout: float = START_S) -> "RedisServer":
        self.spawn(self.argv())
        try:
            wait_ping(self, timeout)
        except ServerError:
            self.stop()
            raise
        return self

    def restart(self, timeout: float = START_S) -> "RedisServer":
        """Start again on the same socket and port (after kill() or stop())."""
        self.stop()
        return self.start(timeout)


def wait_ping(server: RedisServer, timeout: float, tcp: bool = False, **options) -> None:
    """Wait, bounded, until server answers PING (with options' password)."""
    import redis
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerError("%s exited with status %s:\n%s"
                              % (server.name, server.proc.returncode, server.log()))
        try:
            client = server.client(tcp=tcp, socket_timeout=0.5, socket_connect_timeout=0.5,
                                   **options)
            try:
                if client.ping():
                    return
            finally:
                client.close()
        except redis.exceptions.AuthenticationError:
            return  # It answers: it wants a password.
        except (redis.exceptions.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise ServerError("%s did not answer PING within %.0f s (%s):\n%s"
                      % (server.name, timeout, last, server.log()))


def make_certificates(directory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate,
    written by openssl into directory; {file name: path}. ServerError if
    openssl fails."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: str(directory / name) for name in
             ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")}

    def openssl(*argv, config: str | None = None) -> None:
        if config is not None:
            (directory / "ext.cnf").write_text(config)
        done = subprocess.run([program("openssl"), *argv], cwd=str(directory), timeout=60,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServerError("openssl %s: %s" % (argv[0], done.stderr[-2000:]))

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=greylist test CA", "-keyout", paths["ca.key"], "-out", paths["ca.crt"])
    for name, ext in (("server", "subjectAltName = IP:127.0.0.1\n"
                                 "extendedKeyUsage = serverAuth\n"),
                      ("client", "extendedKeyUsage = clientAuth\n")):
        csr = str(directory / (name + ".csr"))
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=greylist test " + name,
                "-keyout", paths[name + ".key"], "-out", csr)
        openssl("x509", "-req", "-in", csr, "-CA", paths["ca.crt"], "-CAkey", paths["ca.key"],
                "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf",
                "-out", paths[name + ".crt"], config=ext)
    for name in ("ca.key", "server.key", "client.key"):
        os.chmod(paths[name], 0o600)
    return paths


def tls_options(certs: dict) -> list[tuple[str, str]]:
    """A TLS server's settings (redis.conf names) for the files of
    make_certificates(); as a replica or a sentinel it connects over TLS
    too, with client.crt (server.crt is for serverAuth only)."""
    return [("tls-cert-file", certs["server.crt"]), ("tls-key-file", certs["server.key"]),
            ("tls-ca-cert-file", certs["ca.crt"]), ("tls-auth-clients", "yes"),
            ("tls-replication", "yes"), ("tls-client-cert-file", certs["client.crt"]),
            ("tls-client-key-file", certs["client.key"])]


def start_server(directory, tcp: bool = False, args=(), name: str = "redis") -> RedisServer:
    """A started RedisServer, or require() (skip; fail under CI)."""
    from conftest import require
    require(missing())
    server = RedisServer(directory, tcp=tcp, args=args, name=name)
    try:
        return server.start()
    except ServerError as exc:
        require("redis-server does not start: %s" % exc)
        raise


class Sentinel(Process):
    """One redis-sentinel with its own config file."""

    def __init__(self, directory, name: str, master_port: int, password: str | None = None,
                 master_password: str | None = None, tls: dict | None = None) -> None:
        super().__init__(directory, name)
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.config = self.directory / (name + ".conf")
        text = ("port %d\nbind 127.0.0.1\ndaemonize no\ndir %s\n"
                "sentinel monitor %s 127.0.0.1 %d 2\n"
                "sentinel down-after-milliseconds %s 1000\n"
                "sentinel failover-timeout %s 5000\n"
                % (0 if tls else self.port, self.directory, MASTER, master_port, MASTER,
                   MASTER))
        if tls:
            text += "tls-port %d\n%s" % (self.port, "".join(
                "%s %s\n" % pair for pair in tls_options(tls)))
        if master_password:
            text += "sentinel auth-pass %s %s\n" % (MASTER, master_password)
        if password:
            text += "requirepass %s\nsentinel sentinel-pass %s\n" % (password, password)
        self.config.write_text(text)

    def start(self) -> None:
        self.spawn([program("redis-sentinel"), str(self.config)])

    def client(self):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        tls = {}
        if self.tls:
            tls = {"ssl": True, "ssl_ca_certs": self.tls["ca.crt"],
                   "ssl_certfile": self.tls["client.crt"], "ssl_keyfile": self.tls["client.key"]}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1,
                           socket_connect_timeout=1, decode_responses=True,
                           retry=Retry(NoBackoff(), 0), password=self.password, **tls)

    def ask(self, *command):
        client = self.client()
        try:
            return client.execute_command(*command)
        finally:
            client.close()


class Sentinels:
    """A master, a replica and three sentinels on 127.0.0.1."""

    def __init__(self, directory, password: str | None = None,
                 sentinel_password: str | None = None, tls: dict | None = None) -> None:
        self.directory = pathlib.Path(directory)
        self.tls = tls
        login = ["--requirepass", password, "--masterauth", password] if password else []
        self.master = RedisServer(self.directory / "master", tcp=True, name="master",
                                  args=login, password=password, tls=tls)
        self.replica = RedisServer(self.directory / "replica", tcp=True, name="replica",
                                   password=password, tls=tls)
        self.replica.args = ["--replicaof", "127.0.0.1", str(self.announced(self.master)),
                             *login]
        self.sentinels = [Sentinel(self.directory / ("sentinel%d" % i), "sentinel%d" % i,
                                   self.announced(self.master), sentinel_password, password,
                                   tls=tls)
                          for i in range(3)]

    def announced(self, server: RedisServer) -> int:
        """The port of server that replicas and sentinels use (TLS's with tls)."""
        return server.tls_port if self.tls else server.port

    def __enter__(self) -> "Sentinels":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return "%s://%s/%s" % (
            "rediss-sentinel" if self.tls else "redis-sentinel", ",".join("127.0.0.1:%d" % s.port for s in self.sentinels), MASTER)

    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica]

    def start(self, timeout: float = 30.0) -> "Sentinels":
        try:
            self.master.start()
            self.replica.start()
            for each in self.sentinels:
                each.start()
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        import redis
        deadline = time.monotonic() + timeout
        why = "not yet asked"
        while time.monotonic() < deadline:
            try:
                why = self._not_ready()
            except (redis.exceptions.RedisError, OSError) as exc:
                why = str(exc)
            if why is None:
                return
            time.sleep(0.1)
        raise ServerError("the sentinel setup was not ready within %.0f s: %s\n%s"
                          % (timeout, why, "\n".join(s.log()[-2000:] for s in self.sentinels)))

    def _not_ready(self) -> str | None:
        client = self.replica.client(tcp=True, decode_responses=True)
        try:
            info = client.info("replication")
        finally:
            client.close()
        if info.get("master_link_status") != "up":
            return "the replica is not in sync"
        for each in self.sentinels:
            if not each.alive():
                return "%s exited:\n%s" % (each.name, each.log())
            replicas = each.ask("SENTINEL", "REPLICAS", MASTER)
            if not any(_field(r, "port") == str(self.announced(self.replica))
                       and "s_down" not in _field(r, "flags") for r in replicas):
                return "%s does not know the replica yet" % each.name
            if len(each.ask("SENTINEL", "SENTINELS", MASTER)) < 2:
                return "%s does not know the other sentinels yet" % each.name
        return None

    def master_port(self) -> int | None:
        """The master's port that a sentinel names now (None: none answers)."""
        for each in self.sentinels:
            try:
                host, port = each.ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                return int(port)
            except Exception:  # noqa: BLE001 (try the next sentinel)
                continue
        return None

    def server_on(self, port: int) -> RedisServer:
        return self.master if port == self.announced(self.master) else self.replica

    def wait_failover(self, old_port: int, timeout: float) -> RedisServer:
        """Wait (bounded) until the sentinels name a master other than
        old_port and it says it is a master; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.master_port()
            if port is not None and port != old_port:
                server = self.server_on(port)
                try:
                    client = server.client(tcp=True, decode_responses=True)
                    try:
                        if client.info("replication").get("role") == "master":
                            return server
                    finally:
                        client.close()
                except Exception:  # noqa: BLE001 (not yet)
                    pass
            time.sleep(0.1)
        raise ServerError("no failover within %.0f s:\n%s" % (
            timeout, "\n".join(s.log()[-3000:] for s in self.sentinels)))

    def stop(self) -> None:
        errors = []
        for each in [*self.sentinels, self.replica, self.master]:
            try:
                each.stop()
            except Exception as exc:  # noqa: BLE001 (stop the others too)
                errors.append(exc)
        if errors:
            raise errors[0]


def _field(entry, name: str) -> str:
    """A field of a SENTINEL REPLICAS entry (a dict, or a flat list)."""
    if isinstance(entry, dict):
        return str(entry.get(name, ""))
    pairs = dict(zip(entry[::2], entry[1::2]))
    return str(pairs.get(name, ""))
