"""End to end on Redis: a real Postfix, two greylist hosts and greylistd sharing one server.

One redis-server (started here, on a unix socket only: --port 0,
--unixsocketperm 777, --save '', in a directory nobody can traverse)
holds the state of every program of this module:

    port        smtpd of host A: check_policy_service unix:private/policy
                spawning greylist as nobody on a.cf (greylist_delay = 2s)
    port_b      smtpd of host B: check_policy_service unix:private/policy-b
                spawning greylist as nobody on b.cf (greylist_delay = 1h:
                anything B passes at once, it passes from A's records)
    port_map    smtpd with check_client_access socketmap:unix:private/
                greylist-learn:clients before the policy check of host A;
                greylist-learn spawns greylist-socketmap on learn.cf
    greylistd   started by the greylistd test (tests/daemon.py) on the
                same Redis, unix policy socket and loopback metrics

All of them use greylist_database = redis:unix:DIR/redis.sock, each
with its own settings file and log. XCLIENT from 127.0.0.1 lets swaks
present other client addresses. The Postfix instance and the Redis
server are shared by the module; every test uses its own addresses.
Only processes started here are stopped, by their PID.
"""

import os
import pathlib
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from greylist.metrics import RENDER_EVERY_S
from tests import daemon as daemons
from tests.conftest import require
from tests.postfix_instance import PostfixInstance, free_port, install_runtime, \
    postfix_available
from tests.test_postfix import rcpt_reply

pytestmark = pytest.mark.postfix

ROOT = pathlib.Path(__file__).resolve().parent.parent
USER = "nobody"
DELAY_S = 2
DELAY_B = "1h"
# greylistd's: long enough that the store thread is visibly blocked on a
# stopped Redis while its event loop answers a metrics scrape.
DAEMON_TIMEOUT_MS = 1000
CONNECTIONS = 50
IO_S = 30.0
DEFER_NEW = "DEFER_IF_PERMIT Greylisted, please try again in %d seconds" % DELAY_S


class RedisServer:
    """One redis-server on a unix socket in directory; stop() ends only it."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen | None = None
        self.stopped = False

    def start(self, timeout: float = 15) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            require("redis-server is not installed (Debian: redis-server)")
        try:
            import redis  # noqa: F401
        except ImportError:
            require("redis-py is not installed (pip install redis)")
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket),
             "--unixsocketperm", "777", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client().ping():
                    return
            except Exception:  # noqa: BLE001 (not up yet)
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("redis-server did not answer on %s: %s"
                                     % (self.socket, self.log()[-2000:]))
            time.sleep(0.05)

    def client(self):
        import redis
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5,
                           socket_connect_timeout=5)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        if self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.stopped = False

    def log(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def runtime_with_redis(root: pathlib.Path) -> list[str]:
    """install_runtime() plus redis-py, which it does not copy; the argv
    prefix that runs greylist as USER.

    USER's interpreter may be an older patch release than the test's
    (Debian 12: 3.11.2), where `import redis` imports async_timeout
    (redis-py's dependency below 3.11.3, for redis.asyncio, which
    greylist never uses). Unless the test's environment has it to copy,
    lib gets a module of that name that is asyncio.timeout."""
    argv = install_runtime(root, USER)
    if isinstance(argv, str):
        require(argv)
    import redis
    source = pathlib.Path(redis.__file__).parent
    shutil.copytree(source, root / "lib" / source.name,
                    ignore=shutil.ignore_patterns("__pycache__"))
    try:
        import async_timeout
        shutil.copytree(pathlib.Path(async_timeout.__file__).parent,
                        root / "lib" / "async_timeout",
                        ignore=shutil.ignore_patterns("__pycache__"))
    except ImportError:
        (root / "lib" / "async_timeout.py").write_text(
            '"""Stand-in for redis.asyncio, unused by greylist."""\n'
            "from asyncio import timeout  # noqa: F401\n")
    probe = subprocess.run(["runuser", "-u", USER, "--", *argv, "-c", "import redis"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        require("user %s cannot import redis-py: %s" % (USER, probe.stderr[-300:]))
    return argv


class Site:
    """The module's Postfix, Redis and settings files."""

    def __init__(self, postfix, redis_server, root, ports, logs, settings):
        self.postfix = postfix
        self.redis = redis_server
        self.root = root
        self.database = "redis:unix:%s" % redis_server.socket
        self.__dict__.update(ports)
        self.logs = logs
        self.settings = settings

    def swaks(self, sender, recipient, port=None, extra=()):
        return self.postfix.swaks(sender, recipient, list(extra), port=port, timeout=20)

    def log(self, name: str) -> str:
        try:
            return self.logs[name].read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def keys(self, pattern: str) -> list[bytes]:
        return sorted(self.redis.client().scan_iter(match=pattern, count=1000))


@pytest.fixture(scope="module")
def site():
    require(postfix_available())
    root = pathlib.Path(tempfile.mkdtemp(prefix="greylist-redis-e2e-"))
    os.chmod(root, 0o755)
    # Not under root: redis-server works in its --dir, and the instance's
    # stop() waits for every process whose cwd is under root.
    redis_server = RedisServer(pathlib.Path(tempfile.mkdtemp(prefix="greylist-redis-")))
    try:
        os.chmod(redis_server.directory, 0o755)  # nobody reaches the socket
        redis_server.start()
        argv = runtime_with_redis(root)
        logs = {}
        for host in ("a", "b", "learn"):
            (root / host).mkdir(mode=0o755)
            shutil.chown(root / host, USER)
            logs[host] = root / host / "greylist.log"
        database = "greylist_database = redis:unix:%s\n" % redis_server.socket
        settings = {name: root / ("%s.cf" % name) for name in ("a", "b", "learn")}
        settings["a"].write_text(database + "greylist_delay = %ds\ngreylist_header = yes\n"
                                 "greylist_log = %s\n" % (DELAY_S, logs["a"]))
        settings["b"].write_text(database + "greylist_delay = %s\ngreylist_header = yes\n"
                                 "greylist_log = %s\n" % (DELAY_B, logs["b"]))
        settings["learn"].write_text(database + "greylist_delay = %ds\n"
                                     "greylist_log = %s\n" % (DELAY_S, logs["learn"]))
        python = " ".join(argv)
        ports = {"port_b": free_port(), "port_map": free_port()}
        master_cf = f"""\
127.0.0.1:{ports['port_b']} inet n - n - - smtpd
  -o smtpd_recipient_restrictions=$host_b_restrictions
policy-b unix - n n - 0 spawn
  user={USER} argv={python} -m greylist -c {settings['b']}
127.0.0.1:{ports['port_map']} inet n - n - - smtpd
  -o smtpd_recipient_restrictions=$clients_map_restrictions
greylist-learn unix - n n - 0 spawn
  user={USER} argv={python} -m greylist.cli.socketmap -c {settings['learn']}
"""
        main_cf = {
            "smtpd_authorized_xclient_hosts": "127.0.0.1",
            "host_b_restrictions":
                "reject_unauth_destination, check_policy_service unix:private/policy-b",
            "clients_map_restrictions":
                "reject_unauth_destination, "
                "check_client_access socketmap:unix:private/greylist-learn:clients, "
                "check_policy_service unix:private/policy",
        }
        with PostfixInstance(root, argv + ["-m", "greylist", "-c", str(settings["a"])],
                             policy_user=USER, extra_main_cf=main_cf,
                             extra_master_cf=master_cf) as postfix:
            yield Site(postfix, redis_server, root, ports, logs, settings)
    finally:
        redis_server.stop()
        shutil.rmtree(redis_server.directory, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def decision(log: str, sender: str, rcpt: str) -> list[str]:
    """The (action, reason) words of each decision line for a triple."""
    found = []
    for line in log.splitlines():
        if "sender=%s rcpt=%s" % (sender, rcpt) in line:
            match = re.search(r"action=(\S+) reason=(\S+)", line)
            if match:
                found.append("%s %s" % match.groups())
    return found


def test_spawn_greylists_on_redis_and_a_second_host_passes_the_triple_at_once(site):
    sender, rcpt = "alice@example.org", "bob@example.test"
    first = rcpt_reply(site.swaks(sender, rcpt))
    started = time.monotonic()
    assert first.startswith("450 4.7.1 <bob@example.test>: Recipient address rejected: "
                            "Greylisted, please try again in %d seconds" % DELAY_S), first
    # Host B (its own settings, delay 1h) sees host A's record: an early retry.
    early = rcpt_reply(site.swaks(sender, rcpt, port=site.port_b))
    assert early.startswith("450 4.7.1 ") and "Greylisted" in early, early
    assert decision(site.log("b"), sender, rcpt) == ["DEFER_IF_PERMIT early-retry"]
    stored = site.keys("greylist:db:*127.0.0/%s/%s" % (sender, rcpt))
    assert len(stored) == 1, site.keys("greylist:db:*")

    time.sleep(max(0.0, DELAY_S + 0.5 - (time.monotonic() - started)))
    accepted = site.swaks(sender, rcpt, extra=["--header", "Subject: redis e2e"])
    assert rcpt_reply(accepted).startswith("250 "), accepted.stdout
    assert accepted.returncode == 0
    message = site.postfix.wait_for_delivery("bob")
    assert "Subject: redis e2e" in message and message.count("X-Greylist: delayed ") == 1
    assert decision(site.log("a"), sender, rcpt) == ["DEFER_IF_PERMIT new",
                                                     "PREPEND delay-passed"]
    client = site.redis.client()
    value = client.get(stored[0])
    assert value is not None and value.endswith(b":passed"), value
    # Every record expires by itself (no cleanup pass): SET ... EXAT.
    assert client.ttl(stored[0]) > 0

    # Host B: the same triple passes at once, and its mail is delivered.
    again = site.swaks(sender, rcpt, port=site.port_b, extra=["--header", "Subject: host b"])
    assert rcpt_reply(again).startswith("250 "), again.stdout
    message = site.postfix.wait_for_delivery("bob")
    assert "Subject: host b" in message
    b_lines = decision(site.log("b"), sender, rcpt)
    assert len(b_lines) == 2 and not b_lines[1].startswith("DEFER"), b_lines
    # ... while a triple new to both is greylisted with B's own delay.
    fresh = rcpt_reply(site.swaks("carl@example.org", "bob@example.test", port=site.port_b))
    assert fresh.startswith("450 4.7.1 ") and "please try again in 3600 seconds" in fresh, fresh

    log = site.postfix.log_text()
    assert "451 4.3.5" not in log and "warning: premature end-of-input" not in log
    for host in ("a", "b"):
        assert "warning" not in site.log(host) and "fatal" not in site.log(host), site.log(host)


def policy_request(client: str, sender: str, rcpt: str) -> bytes:
    return ("request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
            "client_address=%s\nclient_name=unknown\nreverse_client_name=unknown\n"
            "helo_name=client.example.org\nsender=%s\nrecipient=%s\nrecipient_count=0\n"
            "instance=%x.1\nsize=0\n\n" % (client, sender, rcpt, abs(hash(rcpt)))
            ).encode("ascii")


def ask_all(path: pathlib.Path, requests: list[bytes], timeout: float = IO_S,
            during=None) -> list[tuple[str, float]]:
    """Open one unix connection per request, all at once, send every
    request, and return (action, seconds from send to reply) per request.
    during() is called once after the requests are sent, while replies
    may still be outstanding; it gets the replies received so far."""
    socks = []
    try:
        for _ in requests:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.settimeout(timeout)
            sock.connect(str(path))
        selector = selectors.DefaultSelector()
        sent, buffers, done = {}, {}, {}
        for index, (sock, request) in enumerate(zip(socks, requests)):
            sock.sendall(request)
            sent[index] = time.monotonic()
            sock.setblocking(False)
            buffers[index] = b""
            selector.register(sock, selectors.EVENT_READ, index)
        if during is not None:
            during(done)
        deadline = time.monotonic() + timeout
        while len(done) < len(requests):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("%d of %d replies after %s s"
                                   % (len(done), len(requests), timeout))
            for key, _ in selector.select(min(left, 1.0)):
                index = key.data
                chunk = key.fileobj.recv(65536)
                buffers[index] += chunk
                if buffers[index].endswith(b"\n\n") or not chunk:
                    selector.unregister(key.fileobj)
                    reply = buffers[index].decode("utf-8", "replace").strip()
                    action = reply[len("action="):] if reply.startswith("action=") else reply
                    done[index] = (action, time.monotonic() - sent[index])
        selector.close()
        return [done[i] for i in range(len(requests))]
    finally:
        for sock in socks:
            sock.close()


def scrape(port: int, timeout: float) -> tuple[str, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = daemons.receive_all(sock, timeout)
    return body.decode("utf-8", "replace"), time.monotonic() - started


def counter(text: str, name: str) -> float:
    return sum(float(line.rsplit(None, 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_greylistd_on_the_same_redis_serves_50_connections_and_fails_open_while_redis_is_stopped(
        site):
    metrics_port = free_port()
    extra = ("greylist_database = %s\ngreylist_header = yes\n"
             "greylist_redis_timeout = %dms\ngreylist_metrics_listen = inet:127.0.0.1:%d\n"
             % (site.database, DAEMON_TIMEOUT_MS, metrics_port))
    with daemons.start(site.root / "greylistd", extra) as daemon:
        triples = [("203.0.113.%d" % (1 + i % 200), "d%02d@example.org" % i,
                    "r%02d@example.test" % i) for i in range(CONNECTIONS - 1)]
        # One triple from 127.0.0.1, for the spawn hosts to see below.
        triples.append(("127.0.0.1", "erin@example.org", "frank@example.test"))
        requests = [policy_request(*t) for t in triples]
        first = ask_all(daemon.policy_path, requests)
        started = time.monotonic()
        assert [a for a, _ in first] == [DEFER_NEW] * CONNECTIONS, first
        for _, sender, rcpt in triples:
            assert len(site.keys("greylist:db:*/%s/%s" % (sender, rcpt))) == 1, (sender, rcpt)
        time.sleep(max(0.0, DELAY_S + 0.5 - (time.monotonic() - started)))
        passed = ask_all(daemon.policy_path, requests)
        assert all(a.startswith("PREPEND X-Greylist: delayed ") for a, _ in passed), passed

        # The spawn hosts pass what greylistd recorded: host B (delay 1h) at once.
        shared = site.swaks("erin@example.org", "frank@example.test", port=site.port_b)
        assert rcpt_reply(shared).startswith("250 "), shared.stdout

        # Redis stopped: every answer fails open, within the timeout + 1 s,
        # and the event loop serves a metrics scrape while the store thread
        # waits on Redis.
        fresh = [policy_request("198.18.0.%d" % (1 + i), "s%02d@example.org" % i,
                                "t%02d@example.test" % i) for i in range(CONNECTIONS - 1)]
        fresh.append(requests[0])  # a known triple fails open too
        before, _ = scrape(metrics_port, 5)
        seen = {}

        def scrape_while_blocked(done):
            time.sleep(0.2)
            _, seen["scrape_s"] = scrape(metrics_port, 0.9)
            seen["replies_then"] = len(done)

        site.redis.pause()
        try:
            stopped = ask_all(daemon.policy_path, fresh, timeout=10, during=scrape_while_blocked)
        finally:
            site.redis.resume()
        limit = DAEMON_TIMEOUT_MS / 1000 + 1
        assert [a for a, _ in stopped] == ["DUNNO"] * CONNECTIONS, stopped
        assert max(s for _, s in stopped) < limit, sorted(s for _, s in stopped)[-5:]
        assert seen["scrape_s"] < 0.5 and seen["replies_then"] < CONNECTIONS, seen
        time.sleep(RENDER_EVERY_S)   # past the render of the scrape above
        after, _ = scrape(metrics_port, 5)
        failures = (counter(after, "greylist_store_failures_total")
                    - counter(before, "greylist_store_failures_total"))
        assert failures == CONNECTIONS, failures
        assert daemon.alive()

        # Redis back: normal answers again once the back-off ends (bounded).
        deadline, probe, answer = time.monotonic() + 40, 0, None
        while time.monotonic() < deadline:
            probe += 1
            answer = ask_all(daemon.policy_path, [policy_request(
                "198.19.0.1", "probe%d@example.org" % probe, "x@example.test")])[0][0]
            if answer != "DUNNO":
                break
            time.sleep(0.2)
        assert answer == DEFER_NEW, answer
        again = ask_all(daemon.policy_path, fresh)
        assert [a for a, _ in again[:-1]] == [DEFER_NEW] * (CONNECTIONS - 1), again
        assert daemon.stop() == 0
    log = daemon.log()
    # The known triple: passed, failed open while Redis was stopped, and
    # passed again from its record (DUNNO, as its sender is now proven).
    _, sender, rcpt = triples[0]
    assert decision(log, sender, rcpt) == [
        "DEFER_IF_PERMIT new", "PREPEND delay-passed", "DUNNO database-failure",
        "DUNNO awl-sender"], log[-3000:]
    assert "redis" in log and "warning" in log, log[-3000:]
    assert "Traceback" not in daemon.output() and "fatal" not in log


def test_smtpd_accepts_a_whitelisted_client_from_the_clients_socketmap_on_redis(site):
    listed, unlisted = "198.51.100.77", "192.0.2.99"
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl",
                           "-c", str(site.settings["a"]), "whitelist", "add", listed],
                          capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0 and "added: 198.51.100" in done.stdout, done
    entry = site.keys("greylist:clients:*198.51.100")
    assert len(entry) == 1, site.keys("greylist:clients:*")
    stamp = site.redis.client().get(entry[0])
    # A manual entry: "OK manual", which access(5) reads as OK (trailing
    # text ignored) and which never expires with the time stamps.
    assert stamp == b"OK manual", stamp
    assert site.redis.client().ttl(entry[0]) == -1

    # postmap asks the spawned greylist-socketmap as smtpd will: the data
    # after the reply's "OK " is the value, "OK manual", an access(5) OK.
    socketmap = "socketmap:unix:%s/private/greylist-learn:clients" % site.postfix.queue_dir
    queried = subprocess.run(["postmap", "-q", listed, socketmap],
                             capture_output=True, text=True, timeout=20)
    assert queried.returncode == 0, queried
    assert queried.stdout == "OK manual\n", queried.stdout
    missing = subprocess.run(["postmap", "-q", unlisted, socketmap],
                             capture_output=True, text=True, timeout=20)
    assert missing.returncode == 1 and missing.stdout == "", missing

    accepted = site.swaks("grace@example.net", "heidi@example.test", port=site.port_map,
                          extra=["--xclient-addr", listed, "--header", "Subject: clients map"])
    assert rcpt_reply(accepted).startswith("250 "), accepted.stdout
    assert "Subject: clients map" in site.postfix.wait_for_delivery("heidi")
    # check_client_access answered: the policy service was never asked.
    assert decision(site.log("a"), "grace@example.net", "heidi@example.test") == []

    # An unlisted client goes on to the policy check and is greylisted.
    rejected = site.swaks("ivan@example.net", "judy@example.test", port=site.port_map,
                          extra=["--xclient-addr", unlisted])
    assert rcpt_reply(rejected).startswith("450 4.7.1 "), rejected.stdout
    assert decision(site.log("a"), "ivan@example.net", "judy@example.test") == [
        "DEFER_IF_PERMIT new"]
    assert "warning" not in site.log("learn") and "fatal" not in site.log("learn")
    assert "451 4.3.5" not in site.postfix.log_text()
