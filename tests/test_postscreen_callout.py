"""The postscreen policy callout end to end, held to Wietse Venema's design.

The callout runs as the design's server both ways it is deployed: greylistd
with greylist_postscreen_listen (unix and inet on 127.0.0.1), and
greylist-postscreen under a miniature spawn(8) here (Spawner: one process
per connection, the connection as its stdin and stdout). The requests come
from the design's client (tests/postscreen_client.py) and from direct
socket I/O. Databases are real LMDB files in short directories under /tmp
(unix socket names are capped at about 100 bytes); locks are taken by a
child process with fcntl.lockf, as Postfix takes them. Every loop is
bounded in count and time; only processes started here are stopped, by PID.
"""

import contextlib
import itertools
import os
import pathlib
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from greylist.config import Config
from greylist.stores.lmdb import LmdbStore
from tests import daemon
from tests.postscreen_client import PolicyClient, Result

BIN = pathlib.Path(sys.executable).parent
MAX_AGE = Config().max_age_s
PS_TTL = Config().postscreen_ttl_s
# How late a reply may be when the database is locked or broken: the
# callout's budget is 0.1 s; "well under 1 s".
LATE_S = 0.5
IO_S = 5.0
FAILURE_WARNING = "answering ignore until the database works again"
REFUSED = "disconnecting without a reply"
SERVER = "192.0.2.25"

WHITELIST = "172.16.5.5\n172.17.0.0/16\nmail.example.com\n/\\.example\\.net$/\n"
SETTINGS = """\
greylist_postscreen_drop_networks = 192.0.2.0/25 2001:db8:dead::/48 10.66.0.0/16
greylist_postscreen_enforce_networks = 192.0.2.128/25
greylist_trusted_networks = 10.0.0.0/8 2001:db8:ffff::/48
greylist_whitelist_clients = {directory}/whitelist_clients
"""

# client, action, ttl, reason, the client as logged. Database contents:
# see site(); the ttl of the awl entries near the end of their lifetime is
# tested in test_an_awl_ttl_never_exceeds_the_entrys_remaining_lifetime.
CASES = [
    ("198.51.100.8", "pass", PS_TTL, "manual-client", "198.51.100.8"),
    ("198.51.100.200", "pass", PS_TTL, "manual-client", "198.51.100.200"),
    ("::ffff:198.51.100.8", "pass", PS_TTL, "manual-client", "198.51.100.8"),
    ("2001:db8:1:2::99", "pass", PS_TTL, "manual-client", "2001:db8:1:2::99"),
    ("2001:DB8:1:2:0:0:0:99", "pass", PS_TTL, "manual-client", "2001:db8:1:2::99"),
    ("2001:db8:1:3::1", "ignore", None, "unproven", "2001:db8:1:3::1"),
    ("203.0.113.7", "pass", PS_TTL, "awl-client", "203.0.113.7"),
    ("2001:db8:2:3::1", "pass", PS_TTL, "awl-client", "2001:db8:2:3::1"),
    ("198.18.2.1", "ignore", None, "unproven", "198.18.2.1"),      # awl entry expired
    ("198.18.3.1", "ignore", None, "unproven", "198.18.3.1"),      # 4 passes of 5
    ("198.18.9.9", "ignore", None, "unproven", "198.18.9.9"),      # nothing known
    # Grouped by its address (a dynamic-looking name in pool mode): found.
    ("198.18.4.7", "pass", PS_TTL, "awl-client", "198.18.4.7"),
    ("198.18.4.8", "ignore", None, "unproven", "198.18.4.8"),
    # Its /24's automatic entry is proof only for the hosts that the policy
    # service saw (the postscreen table): pool mode keeps an access-network
    # neighbour (dsl-203-0-113-8...) apart from the /24's mail servers.
    ("203.0.113.8", "ignore", None, "unproven-host", "203.0.113.8"),
    # IPv6: pool mode keys no host of a /64 apart, the /64's entry passes.
    ("2001:db8:2:3::2", "pass", PS_TTL, "awl-client", "2001:db8:2:3::2"),
    ("198.18.5.1", "ignore", None, "unproven-host", "198.18.5.1"),  # table entry expired
    ("10.1.2.3", "pass", PS_TTL, "trusted", "10.1.2.3"),
    ("::ffff:10.1.2.3", "pass", PS_TTL, "trusted", "10.1.2.3"),
    ("2001:db8:ffff::1", "pass", PS_TTL, "trusted", "2001:db8:ffff::1"),
    ("172.16.5.5", "pass", PS_TTL, "whitelist-client", "172.16.5.5"),
    ("172.17.3.4", "pass", PS_TTL, "whitelist-client", "172.17.3.4"),
    ("172.16.5.6", "ignore", None, "unproven", "172.16.5.6"),
    ("192.0.2.1", "drop", None, "drop-network", "192.0.2.1"),     # despite manual 192.0.2
    ("::ffff:192.0.2.1", "drop", None, "drop-network", "192.0.2.1"),
    ("2001:db8:dead::1", "drop", None, "drop-network", "2001:db8:dead::1"),
    ("10.66.0.1", "drop", None, "drop-network", "10.66.0.1"),     # despite trusted
    ("192.0.2.200", "enforce", None, "enforce-network", "192.0.2.200"),
]
BY_CLIENT = {case[0]: case for case in CASES}


def program(name: str) -> list[str]:
    """A console script of this checkout's virtual environment."""
    path = BIN / name
    if path.exists():
        return [str(path)]
    module = {"greylist-postscreen": "postscreen"}.get(name, name)
    return [sys.executable, "-m", "greylist.cli." + module]


def request(client: str, server: str = SERVER, client_port="49152", server_port="25",
            order=("client_address", "server_address", "client_port", "server_port"),
            extra=()) -> bytes:
    values = {"client_address": client, "server_address": server,
              "client_port": client_port, "server_port": server_port}
    lines = ["%s=%s\n" % (name, values[name]) for name in order]
    for position, line in extra:
        lines.insert(position, line)
    return ("".join(lines) + "\n").encode()


def reply(action: str, ttl: int | None = None, service: str = "") -> bytes:
    text = "action=%s\n" % action
    if ttl is not None:
        text += "ttl=%d\n" % ttl
    if service:
        text += "smtpd_service_name=%s\n" % service
    return (text + "\n").encode()


def read_replies(sock: socket.socket, count: int = 1, timeout: float = IO_S) -> list[bytes]:
    """count replies (each up to its empty line), within timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n\n") < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("%d of %d replies in %s s: %r"
                               % (data.count(b"\n\n"), count, timeout, data[-200:]))
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed after %r" % data[-200:])
        data += chunk
    parts = data.split(b"\n\n")
    assert parts[-1] == b"", "bytes after the last reply: %r" % parts[-1]
    return [part + b"\n\n" for part in parts[:-1]]


def ask(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return read_replies(sock)[0]


def closed_without_reply(sock: socket.socket) -> bool:
    """Whether the peer closes the connection without sending a byte (a
    close with our bytes unread resets a unix connection: no reply either)."""
    sock.settimeout(IO_S)
    try:
        return daemon.receive_all(sock, IO_S) == b""
    except ConnectionResetError:
        return True


def unix_connect(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_S)
    try:
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def short_directory():
    """A directory short enough for unix socket names, removed afterwards."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="gps", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path, seconds: float):
    """Another process holding fcntl.lockf LOCK_EX on the whole file for
    seconds, then exiting on its own; the block waits for it at the end."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'r+b'); "
            "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); "
            "time.sleep(float(sys.argv[2]))")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)],
                              stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 10)
        assert ready and holder.stdout.readline() == b"held\n"
        yield holder
    finally:
        try:
            holder.wait(timeout=seconds + 10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(timeout=10)
        holder.stdout.close()


def record(last: int, count: int = 5, state: str = "client") -> bytes:
    return b"1:%d:%d:%d:%s" % (last, last, count, state.encode())


def put(database, items: dict[bytes, bytes]) -> None:
    store = LmdbStore(str(database))
    try:
        for key, value in items.items():
            store.put(key, value)
    finally:
        store.close()


def greylistctl(settings, *args: str) -> str:
    result = subprocess.run(program("greylistctl") + ["-c", str(settings), *args],
                            capture_output=True, text=True, timeout=30,
                            env=daemon.environment())
    assert result.returncode == 0, result
    return result.stdout


class Spawner:
    """spawn(8) in miniature: a unix listener whose every connection gets
    its own greylist-postscreen -c SETTINGS, with the connection as stdin
    and stdout, and stderr in DIRECTORY/spawn.err."""

    MAX_PROCESSES = 400

    def __init__(self, directory: pathlib.Path, settings) -> None:
        self.path = directory / "spawn"
        self.settings = settings
        self.stderr_path = directory / "spawn.err"
        self.procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(128)
        self._listener.settimeout(0.05)
        self._stderr = open(self.stderr_path, "ab")
        self._thread = threading.Thread(target=self._run, name="spawner", daemon=True)
        self._thread.start()

    @property
    def service(self) -> str:
        return "unix:%s" % self.path

    def connect(self) -> socket.socket:
        return unix_connect(self.path)

    def _run(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                if len(self.procs) >= self.MAX_PROCESSES:
                    continue
                conn.setblocking(True)
                proc = subprocess.Popen(program("greylist-postscreen") + ["-c", str(self.settings)],
                                        stdin=conn, stdout=conn, stderr=self._stderr,
                                        env=daemon.environment())
            with self._lock:
                self.procs.append(proc)

    def exits(self, timeout: float = 10) -> list[int]:
        """Wait for every process so far (bounded) and return their exit
        statuses; one that does not end within timeout is killed."""
        with self._lock:
            procs = list(self.procs)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return [proc.returncode for proc in procs]

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()
        try:
            return self.exits()
        finally:
            self._stderr.close()


class Transport:
    """One way to reach the callout: its service name for PolicyClient, a
    connect() for direct I/O, and the log ident of its lines."""

    def __init__(self, name: str, service: str, connect, ident: str, log_path) -> None:
        self.name = name
        self.service = service
        self.connect = connect
        self.ident = ident
        self.log_path = pathlib.Path(log_path)

    def client(self, **options) -> PolicyClient:
        options.setdefault("timeout", IO_S)
        options.setdefault("default_action", "pass")  # a client-side failure shows
        options.setdefault("default_ttl", 1)
        return PolicyClient(self.service, **options)

    def mark(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def lines(self, mark: int) -> list[str]:
        """This transport's log lines written after mark."""
        with open(self.log_path, "rb") as log:
            log.seek(mark)
            text = log.read().decode("utf-8", "replace")
        tag = " %s[" % self.ident
        return [line for line in text.splitlines() if tag in line]

    def logged(self, mark: int, text: str) -> bool:
        return any(line.endswith("]: " + text) for line in self.lines(mark))


class Site:
    """A database, greylistd serving the callout on it, and a Spawner."""

    def __init__(self, directory, greylistd, spawner, port: int) -> None:
        self.directory = directory
        self.greylistd = greylistd
        self.spawner = spawner
        self.port = port
        self.now = 0  # when site() wrote its entries
        self.settings = greylistd.settings_path
        self.database = greylistd.database
        self.transports = {
            "greylistd": Transport("greylistd", "unix:%s" % (directory / "postscreen"),
                                   lambda: unix_connect(directory / "postscreen"),
                                   "greylistd", greylistd.log_path),
            "spawn": Transport("spawn", spawner.service, spawner.connect,
                               "greylist-postscreen", greylistd.log_path),
        }


@contextlib.contextmanager
def running(directory, extra: str = "", port: int | None = None):
    """greylistd with the callout on DIRECTORY/postscreen (and on
    127.0.0.1:port), and a Spawner on the same settings."""
    listen = "unix:%s" % (directory / "postscreen")
    if port is not None:
        listen += " inet:127.0.0.1:%d" % port
    extra = "greylist_postscreen_listen = %s\n%s" % (listen, extra)
    with daemon.start(directory, extra) as greylistd:
        spawner = Spawner(directory, greylistd.settings_path)
        try:
            yield Site(directory, greylistd, spawner, port)
        finally:
            spawner.stop()


@pytest.fixture(scope="module")
def site():
    """The callout of CASES, both ways. The database: manual entries made
    with greylistctl (198.51.100, 2001:db8:1:2, 192.0.2), awl entries
    written directly (203.0.113 and 2001:db8:2:3 seen now; 198.18.1 with
    an hour of its lifetime left; 198.18.2 expired; 198.18.3 one pass
    short; 198.18.4.7 by its address; 198.18.5 seen now), and the
    postscreen table's hosts (203.0.113.7, 2001:db8:2:3::1, 198.18.1.77
    seen now, 198.18.5.1 a lifetime ago)."""
    with short_directory() as directory:
        (directory / "whitelist_clients").write_text(WHITELIST)
        now = int(time.time())
        put(directory / "db", {  # site.now: when they were written
            b"203.0.113": record(now), b"2001:db8:2:3": record(now, 6),
            b"198.18.1": record(now - (MAX_AGE - 3600)),
            b"198.18.2": record(now - MAX_AGE - 600),
            b"198.18.3": record(now, 4), b"198.18.4.7": record(now),
            b"198.18.5": record(now)})
        # The hosts the policy service saw proven (handlers/policy.py).
        put(directory / "db-postscreen", {
            b"203.0.113.7": b"permit %d" % now, b"2001:db8:2:3::1": b"permit %d" % now,
            b"198.18.1.77": b"permit %d" % now, b"198.18.5.1": b"permit %d" % (now - MAX_AGE)})
        with running(directory, SETTINGS.format(directory=directory),
                     daemon.free_port()) as found:
            found.now = now
            for client in ("198.51.100.8", "2001:db8:1:2::5", "192.0.2.130"):
                greylistctl(found.settings, "whitelist", "add", client)
            yield found


@pytest.fixture(params=["greylistd", "spawn"])
def callout(request, site) -> Transport:
    return site.transports[request.param]


# Every action and reason, through the design's client.

@pytest.mark.parametrize("client, action, ttl, reason, logged", CASES,
                         ids=[case[0] for case in CASES])
def test_the_callout_answers_each_action_and_reason(callout, client, action, ttl, reason,
                                                   logged):
    mark = callout.mark()
    with callout.client() as policy:
        assert policy.query(client, SERVER, 49152, 25) == Result(action, ttl)
    line = "action=%s%s reason=%s client=%s" % (
        action, "" if ttl is None else " ttl=%d" % ttl, reason, logged)
    assert callout.logged(mark, line), callout.lines(mark)


def test_a_pass_reply_is_exactly_the_designs_and_other_actions_carry_no_ttl(callout):
    with callout.connect() as sock:
        assert ask(sock, request("198.51.100.8")) == reply("pass", PS_TTL)
        assert ask(sock, request("198.18.9.9")) == reply("ignore")
        assert ask(sock, request("192.0.2.1")) == reply("drop")
        assert ask(sock, request("192.0.2.200")) == reply("enforce")


def test_an_awl_ttl_never_exceeds_the_entrys_remaining_lifetime(site, callout):
    # The entry was written with an hour of its lifetime left.
    last = site.now - (MAX_AGE - 3600)
    with callout.client() as policy:
        for _ in range(3):
            began = int(time.time())
            result = policy.query("198.18.1.77", SERVER, 49152, 25)
            ended = int(time.time())
            assert result.action == "pass" and result.error is None
            assert MAX_AGE - (ended - last) <= result.ttl <= MAX_AGE - (began - last) <= 3600


def test_ttls_follow_the_settings_and_the_lifetimes():
    # greylist_postscreen_ttl 2h, greylist_max_age 10d: each awl entry's
    # ttl is min(2h, what is left of it), an expired one is ignored, and
    # the manual and trusted ttl is the setting.
    ttl, max_age = 7200, 10 * 86400
    ages = [-3600, 0, 1, 3600, max_age - ttl - 60, max_age - ttl + 60, max_age - 3600,
            max_age - 60, max_age + 60, max_age + 86400, 400 * 86400]
    with short_directory() as directory:
        now = int(time.time())
        put(directory / "db", {b"198.18.%d" % i: record(now - age) for i, age in enumerate(ages)})
        # Each host seen by the policy service when its group was.
        put(directory / "db-postscreen", {b"198.18.%d.1" % i: b"permit %d" % (now - age)
                                          for i, age in enumerate(ages)})
        settings = daemon.write_settings(directory, daemon.free_port(),
                                         "greylist_postscreen_ttl = 2h\ngreylist_max_age = 10d\n"
                                         "greylist_trusted_networks = 10.0.0.0/8\n")
        greylistctl(settings, "whitelist", "add", "198.51.100.8")
        spawner = Spawner(directory, settings)
        try:
            with PolicyClient(spawner.service, timeout=IO_S, default_action="pass",
                              default_ttl=1) as policy:
                assert policy.query("198.51.100.8", SERVER, 1, 25) == Result("pass", ttl)
                assert policy.query("10.9.9.9", SERVER, 1, 25) == Result("pass", ttl)
                for i, age in enumerate(ages):
                    began = int(time.time())
                    result = policy.query("198.18.%d.1" % i, "::1", 1, 25)
                    ended = int(time.time())
                    last = now - age
                    if ended - last < max_age:
                        assert result.action == "pass", (age, result)
                        assert (min(ttl, max_age - (ended - last)) <= result.ttl
                                <= min(ttl, max_age - (began - last))), (age, result)
                    else:
                        assert result == Result("ignore", None), (age, result)
        finally:
            assert spawner.stop() == [0]


# The ttl rules in the handler itself, at fixed times.

def handler_verdict(address: str, records: list[bytes | None], table: bytes | None,
                    now: int):
    """The handler's verdict for address with its group's (and its own)
    records, and table the postscreen table's value for it."""
    from greylist.core.lists import Exemptions
    from greylist.handlers.postscreen import Lookup, PostscreenHandler
    handler = PostscreenHandler(Config(postscreen_table="/nonexistent/db-postscreen"))
    step = handler.prepare(address, now, Exemptions())
    assert isinstance(step, Lookup) and not step.table
    _, step = step.change(records)
    if isinstance(step, Lookup):
        assert step.table
        _, step = step.change([table])
    return step


def test_an_awl_ttl_counts_the_lifetime_from_the_last_sight():
    # A client proven long ago (first seen past greylist_max_age) and
    # seen a minute ago: its entry lives almost all of max_age yet.
    now = 2_000_000_000
    value = b"1:%d:%d:5:client" % (now - MAX_AGE - 86400, now - 60)
    verdict = handler_verdict("2001:db8:7::1", [value], None, now)
    assert (verdict.action, verdict.ttl, verdict.reason) == ("pass", PS_TTL, "awl-client")


def test_a_host_ttl_never_exceeds_its_postscreen_table_entrys_remaining_lifetime():
    # Pool mode: the /24's entry was seen now, the host's table entry has
    # ten minutes left.
    now = 2_000_000_000
    value = b"1:%d:%d:5:client" % (now, now)
    verdict = handler_verdict("198.18.1.77", [value, None],
                              b"permit %d" % (now - (MAX_AGE - 600)), now)
    assert (verdict.action, verdict.ttl, verdict.reason) == ("pass", 600, "awl-client")


# The request: addresses, attributes in any order, unknown attributes.

@pytest.mark.parametrize("server", ["192.0.2.25", "127.0.0.1", "::1", "2001:db8::25",
                                    "::ffff:127.0.0.1", "2001:DB8:0:0:0:0:0:25"])
def test_ipv4_and_ipv6_server_addresses(callout, server):
    with callout.connect() as sock:
        assert ask(sock, request("198.51.100.8", server)) == reply("pass", PS_TTL)
        assert ask(sock, request("2001:db8:1:2::1", server)) == reply("pass", PS_TTL)
        assert ask(sock, request("198.18.9.9", server)) == reply("ignore")


def test_attributes_in_any_order_on_one_connection(callout):
    names = ("client_address", "server_address", "client_port", "server_port")
    with callout.connect() as sock:
        for order in itertools.permutations(names):
            assert ask(sock, request("198.51.100.8", order=order)) == reply("pass", PS_TTL)
            assert ask(sock, request("192.0.2.1", order=order)) == reply("drop")


def test_unknown_attributes_are_ignored(callout):
    # Even names that mean something in a reply, or to the SMTPD policy protocol.
    extra = [(0, "request=smtpd_access_policy\n"), (2, "action=drop\n"), (3, "ttl=5\n"),
             (4, "smtpd_service_name=evil\n"), (5, "protocol_state=RCPT\n"),
             (6, "x-anything=%s\n" % ("z" * 4000)), (1, "client_name=mail.example.com\n"),
             (7, "empty=\n"), (8, "x==y\n")]
    mark = callout.mark()
    with callout.connect() as sock:
        assert ask(sock, request("198.51.100.8", extra=extra)) == reply("pass", PS_TTL)
        assert ask(sock, request("198.18.9.9", extra=extra)) == reply("ignore")
        # A client_name does not make a whitelist name entry match: postscreen knows none.
        assert ask(sock, request("172.18.0.1", extra=extra)) == reply("ignore")
    with callout.client() as policy:
        assert policy.query("203.0.113.7", SERVER, 1, 25,
                            extra={"helo_name": "x", "sender": "a@b.test"}) \
            == Result("pass", PS_TTL)
    assert not [line for line in callout.lines(mark) if "warning" in line]


# Malformed input: logged, closed, no reply.

MALFORMED = [
    ("no-equals", b"client_address=198.51.100.8\nserver_address=::1\nnonsense\n"
                  b"client_port=1\nserver_port=25\n\n", "malformed line"),
    ("only-garbage", b"garbage\n\n", "malformed line"),
    ("empty-name", b"=198.51.100.8\nclient_address=198.51.100.8\n\n", "malformed line"),
    ("long-unended-no-equals", b"1" * 70000, "malformed line"),
    ("bad-ipv4", request("198.51.100.300"), "client_address is not an IP address"),
    ("hostname", request("mail.example.com"), "client_address is not an IP address"),
    ("scoped", request("fe80::1%eth0"), "client_address is not an IP address"),
    ("bad-server", request("198.51.100.8", "localhost"), "server_address is not an IP address"),
    ("bad-server6", request("198.51.100.8", "2001:db8::25::1"),
     "server_address is not an IP address"),
    ("port-too-big", request("198.51.100.8", client_port="65536"), "client_port is not a port"),
    ("port-negative", request("198.51.100.8", client_port="-1"), "client_port is not a port"),
    ("port-letters", request("198.51.100.8", server_port="smtp"), "server_port is not a port"),
    ("port-spaces", request("198.51.100.8", server_port=" 25"), "server_port is not a port"),
    ("port-unicode", request("198.51.100.8", server_port="２５"), "server_port is not a port"),
] + [
    ("no-" + name, request("198.51.100.8", order=tuple(
        n for n in ("client_address", "server_address", "client_port", "server_port")
        if n != name)), "postscreen request without %s" % name)
    for name in ("client_address", "server_address", "client_port", "server_port")
] + [
    ("empty-client", request(""), "postscreen request without client_address"),
]


@pytest.mark.parametrize("data, message", [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_input_closes_the_connection_with_a_log_line_and_no_reply(callout, data,
                                                                           message):
    mark = callout.mark()
    with callout.connect() as sock:
        assert ask(sock, request("198.51.100.8")) == reply("pass", PS_TTL)
        sock.sendall(data)
        began = time.monotonic()
        assert closed_without_reply(sock)
        assert time.monotonic() - began < 2
    warnings = [line for line in callout.lines(mark) if "warning:" in line]
    assert len(warnings) == 1 and message in warnings[0] and REFUSED in warnings[0], warnings
    # The other connections go on.
    with callout.client() as policy:
        assert policy.query("192.0.2.1", SERVER, 1, 25) == Result("drop", None)


def test_an_over_long_line_closes_the_connection_without_a_reply(callout):
    # The design and greylist-postscreen(8): an over-long line is malformed
    # input (found in review: it was discarded and answered ignore, and the
    # connection went on). A line split across reads is cut off as soon as
    # it passes the cap; the next connection is served.
    for shape in ("whole", "trickled"):
        mark = callout.mark()
        with callout.connect() as sock:
            long = request("198.51.100.8", extra=[(2, "x=%s\n" % ("y" * 70000))])
            if shape == "whole":
                sock.sendall(long)
            else:
                sock.sendall(long[:40000])
                time.sleep(0.05)
                try:
                    sock.sendall(long[40000:])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # closed already: the cap was passed in the first part
            assert closed_without_reply(sock), shape
        with callout.connect() as sock:
            assert ask(sock, request("198.51.100.8")) == reply("pass", PS_TTL)
        warnings = [line for line in callout.lines(mark) if "warning:" in line]
        assert len(warnings) == 1 and "postscreen request with a line over" in warnings[0] \
            and "disconnecting without a reply" in warnings[0], (shape, warnings)


def test_a_malformed_request_ends_a_spawned_program_with_status_1(site):
    before = len(site.spawner.procs)
    with site.spawner.connect() as sock:
        sock.sendall(b"garbage\n\n")
        assert closed_without_reply(sock)
    with site.spawner.connect() as sock:
        assert ask(sock, request("10.1.1.1")) == reply("pass", PS_TTL)
    deadline = time.monotonic() + IO_S
    while len(site.spawner.procs) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    bad, good = site.spawner.procs[before:before + 2]
    assert bad.wait(timeout=IO_S) == 1 and good.wait(timeout=IO_S) == 0


# Connections: reused, never closed by the server, parallel.

def test_many_requests_on_one_connection(callout):
    clients = [case[0] for case in CASES]
    with callout.client() as policy:
        for n in range(300):
            client, action, ttl = BY_CLIENT[clients[n % len(clients)]][:3]
            assert policy.query(client, SERVER, 1024 + n, 25) == Result(action, ttl)
        assert (policy.opened, policy.broken, policy.idle) == (1, 0, 1)
    # Pipelined: one write of 100 requests, 100 replies in order.
    wanted = [BY_CLIENT[clients[n % len(clients)]] for n in range(100)]
    with callout.connect() as sock:
        sock.sendall(b"".join(request(case[0]) for case in wanted))
        assert read_replies(sock, 100) == [reply(case[1], case[2]) for case in wanted]
        # Still open: the server never closes after a reply.
        assert ask(sock, request("10.1.1.1")) == reply("pass", PS_TTL)


def test_100_parallel_connections_to_greylistd(site):
    wanted = [CASES[n % len(CASES)] for n in range(100)]
    socks = []
    try:
        for _ in range(100):
            socks.append(unix_connect(site.directory / "postscreen"))
        for sock, case in zip(socks, wanted):
            sock.sendall(request(case[0]))
        for sock, case in zip(socks, wanted):
            assert read_replies(sock) == [reply(case[1], case[2])]
        # All 100 still open, each answering again (last first).
        for sock, case in reversed(list(zip(socks, wanted))):
            assert ask(sock, request(case[0])) == reply(case[1], case[2])
    finally:
        for sock in socks:
            sock.close()
    # And the design's client with 100 queries in progress at a time, on inet.
    requests = [(case[0], SERVER, 40000 + n, 25) for n, case in enumerate(wanted * 3)]
    with PolicyClient("inet:127.0.0.1:%d" % site.port, timeout=IO_S, default_action="pass",
                      default_ttl=1) as policy:
        results = policy.query_all(requests, workers=100)
        assert results == [Result(case[1], case[2]) for case in wanted * 3]
        assert 1 <= policy.opened <= 100 and policy.broken == 0


def test_parallel_queries_to_spawned_programs(site):
    wanted = [CASES[n % len(CASES)] for n in range(60)]
    with PolicyClient(site.spawner.service, timeout=IO_S, default_action="pass",
                      default_ttl=1, max_connections=8) as policy:
        results = policy.query_all([(case[0], "::1", 1, 25) for case in wanted], workers=8)
        assert results == [Result(case[1], case[2]) for case in wanted]
        assert 1 <= policy.opened <= 8 and policy.broken == 0


# The spawn program.

def test_the_spawn_program_answers_in_order_and_exits_0_at_eof(site):
    wanted = [BY_CLIENT[c] for c in ("198.51.100.8", "192.0.2.200", "198.18.9.9",
                                     "2001:db8:2:3::1", "10.66.0.1", "::ffff:10.1.2.3")]
    mark = site.transports["spawn"].mark()
    result = subprocess.run(program("greylist-postscreen") + ["-c", str(site.settings)],
                            input=b"".join(request(case[0]) for case in wanted),
                            capture_output=True, timeout=30, env=daemon.environment())
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == b"".join(reply(case[1], case[2]) for case in wanted)
    lines = site.transports["spawn"].lines(mark)
    assert [line.split("]: ", 1)[1] for line in lines] == [
        "action=%s%s reason=%s client=%s" % (case[1], "" if case[2] is None
                                             else " ttl=%d" % case[2], case[3], case[4])
        for case in wanted]


def test_the_spawn_program_with_no_request_exits_0_silently(site):
    result = subprocess.run(program("greylist-postscreen") + ["-c", str(site.settings)],
                            input=b"", capture_output=True, timeout=30,
                            env=daemon.environment())
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


# A locked or broken database: "ignore" within the budget, one warning.

def query_timed(policy: PolicyClient, client: str) -> tuple[Result, float]:
    began = time.monotonic()
    result = policy.query(client, SERVER, 1, 25)
    return result, time.monotonic() - began


def assert_ignored_while_locked(transport: Transport, database) -> None:
    with transport.client(timeout=2.0) as policy:
        assert policy.query("203.0.113.7", SERVER, 1, 25) == Result("pass", PS_TTL)
        mark = transport.mark()
        with exclusive_lock(str(database) + ".lmdb", 2.5) as holder:
            held = time.monotonic()
            answers = []
            for _ in range(30):
                if time.monotonic() - held > 1.5:
                    break
                answers.append(query_timed(policy, "203.0.113.7"))
                time.sleep(0.05)
            # No database needed: answered as ever.
            assert policy.query("10.1.2.3", SERVER, 1, 25) == Result("pass", PS_TTL)
            assert policy.query("192.0.2.1", SERVER, 1, 25) == Result("drop", None)
            assert holder.poll() is None  # every answer above came while it was locked
        assert len(answers) >= 5
        for result, elapsed in answers:
            assert result == Result("ignore", None) and elapsed < LATE_S, answers
        # The lock is gone: the entry is found again.
        for _ in range(100):
            result = policy.query("203.0.113.7", SERVER, 1, 25)
            if result.action == "pass":
                break
            time.sleep(0.03)
        assert result == Result("pass", PS_TTL)
        assert policy.opened == 1
    lines = transport.lines(mark)
    assert len([line for line in lines if FAILURE_WARNING in line]) == 1, lines
    assert len([line for line in lines if "reason=database-failure" in line]) == len(answers)


@pytest.mark.parametrize("name", ["greylistd", "spawn"])
def test_a_locked_database_is_answered_ignore_within_the_budget(name):
    with short_directory() as directory:
        put(directory / "db", {b"203.0.113": record(int(time.time()))})
        put(directory / "db-postscreen", {b"203.0.113.7": b"permit %d" % time.time()})
        with running(directory, "greylist_trusted_networks = 10.0.0.0/8\n"
                     "greylist_postscreen_drop_networks = 192.0.2.0/25\n") as found:
            assert_ignored_while_locked(found.transports[name], found.database)
            if name == "greylistd":
                # Many at once while locked: each within the budget.
                with found.transports[name].client(timeout=2.0) as policy:
                    with exclusive_lock(str(found.database) + ".lmdb", 1.5):
                        began = time.monotonic()
                        results = policy.query_all([("203.0.113.7", SERVER, n, 25)
                                                    for n in range(40)], workers=20)
                        assert time.monotonic() - began < 2 * LATE_S
                    assert results == [Result("ignore", None)] * 40


def test_a_spawned_program_started_while_the_database_is_locked_answers_within_the_budget():
    """Found by this test: the first open read the tree under a shared lock
    without the budget (stores/lmdbenv.py _open_files); under spawn(8) every
    connection starts a new process, so every new postscreen connection
    waited for the lock."""
    with short_directory() as directory:
        put(directory / "db", {b"203.0.113": record(int(time.time()))})
        put(directory / "db-postscreen", {b"203.0.113.7": b"permit %d" % time.time()})
        settings = daemon.write_settings(directory, daemon.free_port())
        spawner = Spawner(directory, settings)
        try:
            with exclusive_lock(directory / "db.lmdb", 2.0):
                with PolicyClient(spawner.service, timeout=1.0, default_action="pass",
                                  default_ttl=1) as policy:
                    result, elapsed = query_timed(policy, "203.0.113.7")
            assert result == Result("ignore", None) and elapsed < LATE_S, (result, elapsed)
        finally:
            spawner.stop()


@pytest.mark.parametrize("name", ["greylistd", "spawn"])
def test_a_broken_database_is_answered_ignore_within_the_budget(name):
    with short_directory() as directory:
        (directory / "db.lmdb").write_bytes(b"not an lmdb file\n" * 512)
        with running(directory, "greylist_trusted_networks = 10.0.0.0/8\n") as found:
            transport = found.transports[name]
            mark = 0  # greylistd warns at start too, with its policy service's action
            with transport.client(timeout=2.0) as policy:
                answers = [query_timed(policy, client)
                           for client in ["203.0.113.7", "198.51.100.8", "2001:db8::1"] * 5]
                assert policy.query("10.1.2.3", SERVER, 1, 25) == Result("pass", PS_TTL)
                assert policy.opened == 1
            for result, elapsed in answers:
                assert result == Result("ignore", None) and elapsed < LATE_S, answers
            lines = transport.lines(mark)
            assert len([line for line in lines if FAILURE_WARNING in line]) == 1, lines
            assert len([line for line in lines if "reason=database-failure" in line]) == 15
            assert "Traceback" not in found.greylistd.log()


# The opt-in extension: smtpd_service_name.

def test_the_service_name_extension_is_sent_with_pass_when_configured():
    with short_directory() as directory:
        with running(directory, "greylist_postscreen_service_name = smtpd-trusted\n"
                     "greylist_trusted_networks = 10.0.0.0/8\n"
                     "greylist_postscreen_drop_networks = 192.0.2.0/25\n") as found:
            greylistctl(found.settings, "whitelist", "add", "198.51.100.8")
            for transport in found.transports.values():
                with transport.connect() as sock:
                    assert ask(sock, request("198.51.100.8")) \
                        == reply("pass", PS_TTL, "smtpd-trusted")
                    assert ask(sock, request("10.1.1.1")) == reply("pass", PS_TTL, "smtpd-trusted")
                    assert ask(sock, request("198.18.9.9")) == reply("ignore")
                    assert ask(sock, request("192.0.2.1")) == reply("drop")
                with transport.client() as policy:
                    assert policy.query("198.51.100.8", SERVER, 1, 25) \
                        == Result("pass", PS_TTL, "smtpd-trusted")
                    assert policy.query("198.18.9.9", SERVER, 1, 25) == Result("ignore", None)


def test_without_the_setting_no_service_name_is_sent(callout):
    with callout.connect() as sock:
        for client in ("198.51.100.8", "10.1.2.3", "203.0.113.7"):
            answer = ask(sock, request(client))
            assert answer == reply("pass", PS_TTL) and b"smtpd_service_name" not in answer
    with callout.client() as policy:
        assert policy.query("198.51.100.8", SERVER, 1, 25).service_name is None


# greylistctl postscreen agrees with the callout.

@pytest.mark.parametrize("client", ["198.51.100.8", "203.0.113.7", "198.18.9.9", "10.1.2.3",
                                    "192.0.2.200", "2001:db8:1:2::99", "198.18.2.1"])
def test_greylistctl_postscreen_says_what_the_callout_answers(site, client):
    shown = greylistctl(site.settings, "postscreen", client)
    answer = re.search(r"^callout answer: action=(\w+)(?: ttl=(\d+))?$", shown, re.M)
    reason = re.search(r"^reason: (\S+)$", shown, re.M)
    assert answer and reason, shown
    for transport in site.transports.values():
        mark = transport.mark()
        with transport.client() as policy:
            result = policy.query(client, SERVER, 1, 25)
        assert result.error is None
        assert (answer.group(1), None if answer.group(2) is None else int(answer.group(2))) \
            == (result.action, result.ttl)
        assert [line for line in transport.lines(mark)
                if " reason=%s " % reason.group(1) in line], transport.lines(mark)
    case = BY_CLIENT[client]
    assert (answer.group(1), reason.group(1)) == (case[1], case[3])


# The design's client itself, against scripted servers.

class ScriptedServer:
    """A unix-socket callout server whose answer(n, request) gives the
    reply bytes for the n-th request of the server (None: say nothing),
    and whose close_after closes each connection after its first reply."""

    def __init__(self, path, answer, close_after: bool = False) -> None:
        self.path = path
        self.answer = answer
        self.close_after = close_after
        self.requests = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def __enter__(self) -> "ScriptedServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(10)
        self._listener.close()

    def _accept(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.05)
            data = b""
            deadline = time.monotonic() + 30
            while not self._stop.is_set() and time.monotonic() < deadline:
                if b"\n\n" not in data:
                    try:
                        chunk = conn.recv(4096)
                    except socket.timeout:
                        continue
                    except OSError:
                        return
                    if not chunk:
                        return
                    data += chunk
                    continue
                block, data = data.split(b"\n\n", 1)
                with self._lock:
                    n = self.requests
                    self.requests += 1
                answer = self.answer(n, block)
                if answer is None:
                    continue
                try:
                    conn.sendall(answer)
                except OSError:
                    return
                if self.close_after:
                    return


@pytest.fixture
def scripted():
    with short_directory() as directory:
        yield lambda answer, **kw: ScriptedServer(directory / "s", answer, **kw)


def test_the_client_parses_ttl_action_extension_and_ignores_unknown_attributes(scripted):
    replies = [b"action=pass\nttl=60\nfoo=bar\nsmtpd_service_name=smtpd-x\n\n",
               b"action=pass\n\n", b"ttl=5\naction=drop\n\n", b"action=enforce\nttl=junk\n\n",
               b"action=ignore\nsmtpd_service_name=smtpd-y\n\n", b"action=pass\nttl=0\n\n"]
    seen = []

    def answer(n, block):
        seen.append(block)
        return replies[n]
    with scripted(answer) as server, PolicyClient("unix:%s" % server.path, timeout=2,
                                                  default_ttl=300) as policy:
        results = [policy.query("192.0.2.%d" % n, "::1", 1000 + n, 25) for n in range(6)]
        assert results == [Result("pass", 60, "smtpd-x"), Result("pass", 300),
                           Result("drop", None), Result("enforce", None),
                           Result("ignore", None, "smtpd-y"), Result("pass", 0)]
        assert (policy.opened, policy.broken) == (1, 0)
    assert seen[3] == (b"client_address=192.0.2.3\nserver_address=::1\nclient_port=1003\n"
                       b"server_port=25")


@pytest.mark.parametrize("bad", [b"action=maybe\n\n", b"ttl=5\n\n", b"action\n\n", b"\n",
                                 b"action=pass\nttl=soon\n\n", b"action=pass\nttl=-5\n\n",
                                 b"action=PASS\n\n", b"action=pass\nsmtpd_service_name=a b\n\n",
                                 b"action=pass\nx=" + b"y" * 5000 + b"\n\n",
                                 b"action=pass\n\naction=pass\n\n"])
@pytest.mark.parametrize("default", ["ignore", "pass"])
def test_a_malformed_reply_gives_the_default_and_a_new_connection(scripted, bad, default):
    with scripted(lambda n, block: bad if n == 0 else b"action=drop\n\n") as server, \
            PolicyClient("unix:%s" % server.path, timeout=2, default_action=default,
                         default_ttl=77) as policy:
        result = policy.query("192.0.2.1", "::1", 1, 25)
        assert (result.action, result.ttl) == (default, 77 if default == "pass" else None)
        assert result.error and result.service_name is None
        assert policy.query("192.0.2.1", "::1", 1, 25) == Result("drop", None)
        assert (policy.opened, policy.broken) == (2, 1)


def test_a_server_that_closes_after_a_response_is_an_error(scripted):
    with scripted(lambda n, block: b"action=drop\n\n", close_after=True) as server, \
            PolicyClient("unix:%s" % server.path, timeout=2, default_action="enforce") as policy:
        assert policy.query("192.0.2.1", "::1", 1, 25) == Result("drop", None)
        # Until the server's close has arrived (bounded).
        select.select([policy._idle[0]], [], [], IO_S)
        result = policy.query("192.0.2.1", "::1", 1, 25)
        assert result.action == "enforce" and "closed the connection after a response" \
            in result.error
        assert policy.query("192.0.2.1", "::1", 1, 25) == Result("drop", None)
        assert (policy.opened, policy.broken) == (2, 1)


def test_a_silent_server_or_none_at_all_gives_the_default_within_the_timeout(scripted):
    with scripted(lambda n, block: None) as server, \
            PolicyClient("unix:%s" % server.path, timeout=0.3, default_action="pass",
                         default_ttl=9) as policy:
        result, elapsed = query_timed(policy, "192.0.2.1")
        assert (result.action, result.ttl) == ("pass", 9) and "no reply" in result.error
        assert 0.25 < elapsed < 1.0 and policy.broken == 1
    with short_directory() as directory:
        with PolicyClient("unix:%s" % (directory / "nothing"), timeout=0.3) as policy:
            result = policy.query("192.0.2.1", "::1", 1, 25)
            assert (result.action, result.ttl) == ("ignore", None) and "connect" in result.error
    with PolicyClient("inet:127.0.0.1:%d" % daemon.free_port(), timeout=0.3,
                      default_action="drop") as policy:
        result = policy.query("192.0.2.1", "::1", 1, 25)
        assert (result.action, result.ttl) == ("drop", None) and "connect" in result.error


def test_queries_in_progress_at_once_use_parallel_connections(scripted):
    # The server answers none of the first five before all five are in:
    # a client that serialized its queries would time out.
    barrier = threading.Barrier(5, timeout=5)

    def answer(n, block):
        if n < 5:
            barrier.wait()
        return b"action=pass\nttl=%d\n\n" % n
    with scripted(answer) as server, PolicyClient("unix:%s" % server.path, timeout=3) as policy:
        results = policy.query_all([("192.0.2.%d" % n, "::1", n, 25) for n in range(5)],
                                   workers=5)
        assert sorted(result.ttl for result in results) == [0, 1, 2, 3, 4]
        assert all(result.error is None for result in results)
        assert (policy.opened, policy.idle) == (5, 5)
        # Later queries reuse them.
        results = policy.query_all([("192.0.2.9", "::1", 1, 25)] * 20, workers=5)
        assert sorted(result.ttl for result in results) == list(range(5, 25))
        assert all(result.error is None for result in results)
        assert (policy.opened, policy.broken) == (5, 0)
