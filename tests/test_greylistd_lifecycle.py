"""greylistd as a process: reload, drain, privileges, socket activation, limits, metrics.

Every test runs real greylistd processes (tests/daemon.py, or a small
launcher here for socket activation and sd_notify) on loopback and unix
sockets in a short directory under /tmp (unix socket names are capped
at 100 bytes, and an unprivileged daemon must reach its directory).
Every wait is bounded; only processes started here are stopped, by PID.
"""

import asyncio
import grp
import inspect
import itertools
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from greylist.metrics import RENDER_EVERY_S
from tests import daemon as daemons
from tests.conftest import require
from tests.reliability import (REPLY, postmap_list, request, triple, triple_request,
                               warnings)

ROOT = pathlib.Path(__file__).resolve().parent.parent
# greylistd's DRAIN_S, and what a stop may take beyond it.
DRAIN_S = 10.0
STOP_MARGIN_S = 3.0
IO_S = 10.0
BAD_LOG = ("Traceback", "internal error", "fatal:")
DEFER_NEW = "DEFER_IF_PERMIT"


@pytest.fixture
def site():
    """A directory for one test's daemons, reachable by every user."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix="gld-", dir="/tmp"))
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# Helpers: bounded waits and one policy exchange on an open connection.

def wait_for(predicate, timeout: float = IO_S, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def read_reply(sock: socket.socket, timeout: float = IO_S) -> bytes:
    """Bytes until the end of one reply (an empty line) or until the peer
    closes; b"" when it closed (or reset) before sending anything."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply within %s s (got %r)" % (timeout, data))
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        data += chunk
    return data


def exchange(sock: socket.socket, data: bytes, timeout: float = IO_S) -> str:
    """Send one request, return the reply's action; asserts a well-formed reply."""
    sock.sendall(data)
    reply = read_reply(sock, timeout)
    match = REPLY.fullmatch(reply)
    assert match, "malformed reply %r" % reply
    return match.group(1).decode()


def closed_without_reply(sock: socket.socket, timeout: float = IO_S) -> float:
    """Wait until the peer closes; assert nothing came; return the wait."""
    began = time.monotonic()
    reply = read_reply(sock, timeout)
    assert reply == b"", "expected no reply, got %r" % reply
    return time.monotonic() - began


def log_lines(daemon, text: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if text in line]


def assert_clean(daemon) -> None:
    """Nothing on stdout/stderr, no traceback or fatal line in the log."""
    assert daemon.output() == ""
    bad = [line for line in daemon.log().splitlines() if any(b in line for b in BAD_LOG)]
    assert bad == []


def http(port: int, data: bytes, timeout: float = IO_S) -> tuple[str, bytes]:
    """One HTTP exchange on 127.0.0.1:port: (status line, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = daemons.receive_all(sock, timeout)
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


def metric(body: bytes, name: str) -> float | None:
    match = re.search(r"^%s (\S+)$" % re.escape(name), body.decode(), re.M)
    return None if match is None else float(match.group(1))


def scrape(port: int) -> bytes:
    status, body = http(port, b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert status == "HTTP/1.0 200 OK", status
    return body


def run_once(settings_path: pathlib.Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """greylistd in the foreground, for starts that must fail."""
    return subprocess.run(daemons.command(settings_path), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout,
                          env=daemons.environment())


# 1. SIGHUP.

def test_sighup_reloads_settings_and_whitelists_without_dropping_connections(site):
    whitelist = site / "clients"
    whitelist.write_text("# none yet\n")
    base = "greylist_delay = 1h\ngreylist_whitelist_clients = %s\n" % whitelist
    with daemons.start(site, base + "greylist_defer_text = first text\n") as daemon:
        settings = daemon.settings_path.read_text()
        before = daemon.connect()
        assert exchange(before, triple_request(1)) == "DEFER_IF_PERMIT first text"
        assert exchange(before, triple_request(2, "w")).startswith(DEFER_NEW)

        # A valid change: the text, and an edited whitelist file.
        whitelist.write_text("198.51.100.0/24\n")
        daemon.settings_path.write_text(settings.replace("first text", "second text"))
        os.kill(daemon.pid, signal.SIGHUP)
        assert wait_for(lambda: log_lines(daemon, "reload: settings and whitelists read again"))
        assert exchange(before, triple_request(3)) == "DEFER_IF_PERMIT second text"
        white = request("198.51.100.9", "a@example.org", "b@example.net")
        assert exchange(before, white) == "DUNNO"
        assert "reason=whitelist-client" in log_lines(daemon, "client=198.51.100.9")[0]

        # An invalid file: the old settings stay, the daemon goes on.
        daemon.settings_path.write_text(settings.replace("first text", "bad text")
                                        + "greylist_bogus = 1\n")
        os.kill(daemon.pid, signal.SIGHUP)
        assert wait_for(lambda: log_lines(daemon, "greylist_bogus"))
        warned = log_lines(daemon, "greylist_bogus")
        assert len(warned) == 1 and ": warning: reload: " in warned[0]
        assert "unknown setting 'greylist_bogus'" in warned[0]
        assert "keeping the settings in force" in warned[0]
        assert exchange(before, triple_request(5)) == "DEFER_IF_PERMIT second text"
        with daemon.connect() as fresh:
            assert exchange(fresh, triple_request(6)) == "DEFER_IF_PERMIT second text"

        # A restart-only change is named; the rest of the file applies.
        other = site / "other"
        daemon.settings_path.write_text(
            settings.replace("first text", "third text")
            + "greylist_policy_listen = unix:%s\n" % other)
        os.kill(daemon.pid, signal.SIGHUP)
        assert wait_for(lambda: len(log_lines(daemon, "reload: settings and whitelists "
                                                      "read again")) == 2)
        restart = log_lines(daemon, "needs a restart")
        assert len(restart) == 1 and ": warning: reload: greylist_policy_listen changed" in restart[0]
        assert exchange(before, triple_request(7)) == "DEFER_IF_PERMIT third text"
        assert not other.exists()
        with daemon.connect() as fresh:  # still on the old socket
            assert exchange(fresh, triple_request(8)) == "DEFER_IF_PERMIT third text"
        before.close()
        assert daemon.alive()
        assert daemon.stop() == 0
        assert_clean(daemon)


def postscreen_table(site: pathlib.Path, postmap: str) -> list[str]:
    """The addresses in the postscreen table (db-postscreen), as Postfix's
    postmap reads them."""
    if not (site / "db-postscreen.lmdb").exists():
        return []
    return [key for key, _ in postmap_list(postmap, str(site / "db-postscreen"))]


def test_after_sighup_the_policy_service_still_writes_the_postscreen_table(site, postmap):
    # The reload built the new policy service without the postscreen
    # table: clients that earned the auto-whitelist afterwards were never
    # exported to postscreen_access_list, silently.
    def earn(sock, client):
        asked = request(client, "a@example.org", "b@example.net")
        assert exchange(sock, asked).startswith(DEFER_NEW)
        time.sleep(1.2)
        assert exchange(sock, asked) == "DUNNO"

    extra = "greylist_delay = 1s\ngreylist_client_awl_passes = 1\n"
    with daemons.start(site, extra) as daemon:
        with daemon.connect() as sock:
            earn(sock, "192.0.2.10")
            assert wait_for(lambda: "192.0.2.10" in postscreen_table(site, postmap))
            # Start-only settings that a reload cannot apply are named, and
            # their old values stay (the table too: not turned off).
            daemon.settings_path.write_text(
                daemon.settings_path.read_text()
                + "greylist_log = %s/other.log\ngreylist_commit_batch = 7\n" % site
                + "greylist_postscreen_table = none\n")
            os.kill(daemon.pid, signal.SIGHUP)
            assert wait_for(lambda: log_lines(daemon, "reload: settings and whitelists"))
            restart = log_lines(daemon, "needs a restart")
            assert len(restart) == 1, restart
            assert ("greylist_postscreen_table, greylist_log, greylist_commit_batch changed"
                    in restart[0]), restart
            earn(sock, "203.0.113.20")
            assert wait_for(lambda: "203.0.113.20" in postscreen_table(site, postmap))
        assert not (site / "other.log").exists()
        assert daemon.stop() == 0
        assert_clean(daemon)


# 2. SIGTERM with requests in flight.

class Sender(threading.Thread):
    """One connection sending new triples, one at a time (as smtpd does),
    until the daemon closes it; replies are kept with the time they came.
    Once hold is set it sends nothing more and waits for the close."""

    def __init__(self, daemon, numbers, lock, stop_at: float) -> None:
        super().__init__(daemon=True)
        self.sock = daemon.connect()
        self.numbers, self.lock, self.stop_at = numbers, lock, stop_at
        self.replies: list[tuple[float, int, bytes]] = []
        self.hold = threading.Event()
        self.ended = None

    def run(self) -> None:
        try:
            for _ in range(50000):
                if time.monotonic() > self.stop_at:
                    self.ended = "deadline"
                    return
                if self.hold.is_set():
                    left = read_reply(self.sock, timeout=max(0.1, self.stop_at
                                                              - time.monotonic()))
                    self.ended = "closed" if left == b"" else "unasked reply %r" % left
                    return
                with self.lock:
                    n = next(self.numbers)
                try:
                    self.sock.sendall(triple_request(n, "d"))
                    reply = read_reply(self.sock, timeout=DRAIN_S + STOP_MARGIN_S)
                except (BrokenPipeError, ConnectionResetError):
                    self.ended = "closed"
                    return
                if not reply:
                    self.ended = "closed"
                    return
                self.replies.append((time.monotonic(), n, reply))
            self.ended = "count"
        except Exception as exc:  # reported by the test
            self.ended = "error: %r" % exc
        finally:
            self.sock.close()


def senders_under_load(daemon, count: int, replies: int) -> list[Sender]:
    """count Senders, started, once they have had replies between them."""
    numbers, lock = itertools.count(1), threading.Lock()
    senders = [Sender(daemon, numbers, lock, time.monotonic() + 30) for _ in range(count)]
    for sender in senders:
        sender.start()
    assert wait_for(lambda: sum(len(s.replies) for s in senders) >= replies)
    return senders


def dump_keys(settings_path: pathlib.Path) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl", "-c",
                           str(settings_path), "dump"], capture_output=True, text=True,
                          timeout=30, env=daemons.environment())
    assert (done.returncode, done.stderr) == (0, ""), (done.returncode, done.stderr)
    return [line.partition("\t")[0] for line in done.stdout.splitlines()]


def test_sigterm_drains_requests_in_flight_and_keeps_every_answered_triple(site):
    with daemons.start(site, "greylist_delay = 1h\n") as daemon:
        senders = senders_under_load(daemon, 8, 300)
        began = time.monotonic()
        os.kill(daemon.pid, signal.SIGTERM)
        # Requests go on crossing the signal for a while, then the clients
        # only wait: clients that never pause are the next test.
        time.sleep(0.3)
        for sender in senders:
            sender.hold.set()
        try:
            status = daemon.proc.wait(timeout=DRAIN_S + STOP_MARGIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail("greylistd did not exit within %s s of SIGTERM"
                        % (DRAIN_S + STOP_MARGIN_S))
        took = time.monotonic() - began
        for sender in senders:
            sender.join(timeout=IO_S)
        assert status == 0
        assert took < DRAIN_S + STOP_MARGIN_S
        assert [s.ended for s in senders] == ["closed"] * len(senders)
        replies = [item for s in senders for item in s.replies]
        assert any(at > began for at, _, _ in replies)  # requests were in flight
        bad = [reply for _, _, reply in replies if not REPLY.fullmatch(reply)]
        assert bad == []
        deferred = [n for _, n, reply in replies
                    if reply.startswith(b"action=" + DEFER_NEW.encode())]
        assert len(deferred) == len(replies)
        log = daemon.log()
        stopping = log.find("]: stopping: no new connections")
        assert 0 <= stopping < log.find("]: stopped\n")
        assert_clean(daemon)
    # The database opens, and every triple that got its DEFER is in it.
    stored = {key.rpartition("/")[2] for key in dump_keys(daemon.settings_path)}
    missing = [n for n in deferred if triple(n, "d")[2] not in stored]
    assert missing == []


# A ^C that lands while greylistd loads its modules (before main() and
# the event loop): the code below runs right after the import.
_INTERRUPTED_AFTER_IMPORT = (
    "import os, signal, sys, time\n"
    "import greylist.cli.greylistd\n"
    "print(getattr(signal.getsignal(signal.SIGINT), \"name\", \"a handler\"), flush=True)\n"
    "os.kill(os.getpid(), signal.SIGINT)\n"
    "time.sleep(5)\n"
    "sys.exit(3)\n")


def test_sigint_while_greylistd_starts_ends_it_without_a_traceback():
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_AFTER_IMPORT],
                          capture_output=True, text=True, timeout=30,
                          env=daemons.environment(),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    assert (done.returncode, done.stderr) == (-signal.SIGINT, "")
    assert done.stdout == "SIG_DFL\n"


def test_an_ignored_sigint_stays_ignored_while_greylistd_starts():
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_AFTER_IMPORT],
                          capture_output=True, text=True, timeout=30,
                          env=daemons.environment(),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert (done.returncode, done.stderr) == (3, "")
    assert done.stdout == "SIG_IGN\n"


def test_after_sigterm_a_connection_gets_only_its_request_in_flight(site):
    with daemons.start(site, "greylist_delay = 1h\n") as daemon:
        senders = senders_under_load(daemon, 16, 300)
        try:
            began = time.monotonic()
            os.kill(daemon.pid, signal.SIGTERM)
            wait_for(lambda: not any(s.is_alive() for s in senders), timeout=3)
            alive = sum(s.is_alive() for s in senders)
            after = [sum(1 for at, _, _ in s.replies if at > began) for s in senders]
            try:
                exited = daemon.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                exited = None
        finally:
            daemon.stop(signal.SIGKILL)  # ours; its stop is measured above
            for sender in senders:
                sender.join(timeout=IO_S)
        assert alive == 0, "%d connections still served 3 s after SIGTERM" % alive
        # The request in flight, and one that crossed the signal.
        assert max(after) <= 3, "replies after SIGTERM per connection: %r" % after
        assert exited == 0


# Python 3.11 and 3.12 asyncio report a cancelled client_connected_cb task
# as an exception (StreamReaderProtocol's done-callback calls
# task.exception()); 3.13 checks task.cancelled() first.
ASYNCIO_REPORTS_CANCELLED = "task.cancelled()" not in inspect.getsource(
    asyncio.streams.StreamReaderProtocol.connection_made)


def test_a_stop_with_idle_connections_open_logs_no_warning(site):
    with daemons.start(site) as daemon:
        idle = [daemon.connect() for _ in range(3)]
        for n, sock in enumerate(idle):
            assert exchange(sock, triple_request(n)).startswith(DEFER_NEW)
        began = time.monotonic()
        assert daemon.stop() == 0
        # Idle connections are closed at once, not cut at the end of the
        # drain bound (7 s of DRAIN_S): nothing of theirs is in
        # flight, and a stop must not wait for them.
        took = time.monotonic() - began
        assert took < 3.0, took
        for sock in idle:
            closed_without_reply(sock, timeout=5)
            sock.close()
        assert log_lines(daemon, "]: stopped")
        assert warnings(daemon.log()) == []
        assert_clean(daemon)


# 3. Privileges.

def nobody_and_nogroup() -> tuple[pwd.struct_passwd, grp.struct_group]:
    try:
        return pwd.getpwnam("nobody"), grp.getgrnam("nogroup")
    except KeyError:
        require("needs the user nobody and the group nogroup")


def readable_by_others(path: str) -> bool:
    """Whether a user that is neither owner nor in the group can read
    path (every directory above it searchable)."""
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & stat.S_IROTH:
        return False
    parent = os.path.dirname(path)
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def proc_ids(pid: int) -> dict[str, list[int]]:
    ids = {}
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("Uid", "Gid", "Groups"):
                ids[name] = [int(word) for word in value.split()]
    return ids


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_started_as_root_it_serves_as_greylist_user_only(site):
    nobody, nogroup = nobody_and_nogroup()
    os.chown(site, nobody.pw_uid, nobody.pw_gid)
    extra = "greylist_socket_group = nogroup\ngreylist_socket_mode = 0660\n"
    with daemons.start(site, extra, user="nobody") as daemon:
        ids = proc_ids(daemon.pid)
        assert len(ids["Uid"]) == 4 and all(uid == nobody.pw_uid for uid in ids["Uid"])
        assert len(ids["Gid"]) == 4 and all(gid == nobody.pw_gid for gid in ids["Gid"])
        assert ids["Groups"] == []
        st = os.lstat(daemon.policy_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == nogroup.gr_gid
        assert daemon.ask(triple_request(1)).startswith(b"action=" + DEFER_NEW.encode())
        assert "as uid %d" % nobody.pw_uid in log_lines(daemon, " serving ")[0]
        files = {p.name: p.stat().st_uid for p in site.iterdir() if p.name.startswith("db")}
        assert "db.lmdb" in files
        assert set(files.values()) == {nobody.pw_uid}, files
        assert daemon.output() == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_started_as_root_it_keeps_postdrop_to_log_to_postlog(site):
    # Found in review: with greylist_log = postlog, greylistd cleared every
    # group at the drop and logged nothing at all, not even "serving": the
    # socket is under Postfix's public/ (group postdrop, mode 0710).
    nobody, _ = nobody_and_nogroup()
    try:
        postdrop = grp.getgrnam("postdrop").gr_gid
    except KeyError:
        require("needs Postfix's group postdrop")
    os.chown(site, nobody.pw_uid, nobody.pw_gid)
    public = site / "public"
    public.mkdir()
    os.chown(public, 0, postdrop)
    os.chmod(public, 0o710)
    path = str(public / "postlog")
    settings = site / "postlog.cf"
    settings.write_text("greylist_database = %s\ngreylist_log = postlog:%s\n"
                        "greylist_policy_listen = unix:%s\ngreylist_user = nobody\n"
                        % (site / "db", path, site / "policy"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        os.chmod(path, 0o666)
        server.settimeout(IO_S)
        proc = subprocess.Popen(daemons.command(settings), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=daemons.environment(), cwd=str(site))
        try:
            lines = []
            deadline = time.monotonic() + IO_S
            while not any(" serving " in line for line in lines) and \
                    time.monotonic() < deadline and len(lines) < 20:
                try:
                    lines.append(server.recv(4096).decode("utf-8", "replace"))
                except socket.timeout:
                    break
            assert any(" serving " in line and "as uid %d" % nobody.pw_uid in line
                       for line in lines), lines
            assert proc_ids(proc.pid)["Groups"] == [postdrop]
        finally:
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=IO_S)[0]
        assert proc.returncode == 0, output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_an_unprivileged_daemon_stops_cleanly(site):
    nobody, _ = nobody_and_nogroup()
    os.chown(site, nobody.pw_uid, nobody.pw_gid)
    with daemons.start(site, user="nobody") as daemon:
        assert daemon.ask(triple_request(1)).startswith(b"action=" + DEFER_NEW.encode())
        assert daemon.stop() == 0
        assert log_lines(daemon, "]: stopped")
        assert_clean(daemon)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_started_as_root_without_greylist_user_is_fatal(site):
    settings = site / "root.cf"
    settings.write_text("greylist_database = %s/db\ngreylist_log = %s/log\n"
                        "greylist_policy_listen = unix:%s/policy\n" % (site, site, site))
    done = run_once(settings)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("greylistd: fatal: started as root without greylist_user")
    log = (site / "log").read_text()
    assert "]: fatal: started as root without greylist_user" in log
    assert not (site / "policy").exists() and not (site / "db.lmdb").exists()


# 4. Socket activation and sd_notify.

# Puts the argv[1] sockets given as argv[2:2 + argv[1]] on fds 3, 4 and
# so on, sets LISTEN_PID to its own pid (kept by exec), and execs the rest.
ACTIVATE = """\
import fcntl, os, sys
count = int(sys.argv[1])
fds = [int(fd) for fd in sys.argv[2:2 + count]]
targets = list(range(3, 3 + count))
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]
for target, fd in zip(targets, high):
    os.dup2(fd, target)
for fd in set(fds + high) - set(targets):
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2 + count], sys.argv[2 + count:])
"""


class Launched:
    """greylistd started here, not by tests/daemon.py."""

    def __init__(self, site: pathlib.Path, settings: str, env: dict[str, str],
                 fds: tuple[int, ...] = ()) -> None:
        self.site = site
        self.log_path = site / "log"
        self.settings_path = site / "activated.cf"
        self.settings_path.write_text(settings)
        os.chmod(self.settings_path, 0o644)
        argv = daemons.command(self.settings_path)
        if fds:
            argv = [sys.executable, "-c", ACTIVATE, str(len(fds)), *map(str, fds), *argv]
        self.output_path = site / "activated.out"
        with open(self.output_path, "wb") as output:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                         stderr=subprocess.STDOUT, pass_fds=fds,
                                         env=dict(daemons.environment(), **env))
        self.pid = self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_serving(self) -> str:
        ok = wait_for(lambda: " serving " in self.log() or self.proc.poll() is not None)
        line = [line for line in self.log().splitlines() if " serving " in line]
        assert ok and line, "not serving: %s %s" % (self.log(), self.output())
        return line[0]

    def stop(self, timeout: float = DRAIN_S + STOP_MARGIN_S) -> int:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        return self.proc.returncode


def base_settings(site: pathlib.Path) -> str:
    text = "greylist_database = %s/db\ngreylist_log = %s/log\ngreylist_delay = 1h\n" % (
        site, site)
    return text + ("greylist_allow_root = yes\n" if os.geteuid() == 0 else "")


def test_socket_activation_serves_the_inherited_sockets(site):
    path = str(site / "activated")
    policy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    policy.bind(path)
    policy.listen(16)
    metrics = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    metrics.bind(("127.0.0.1", 0))
    metrics.listen(16)
    port = metrics.getsockname()[1]
    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "policy:metrics"}
    try:
        launched = Launched(site, base_settings(site), env,
                            fds=(policy.fileno(), metrics.fileno()))
    finally:
        policy.close()
        metrics.close()
    try:
        assert "serving systemd:policy, systemd:metrics as uid" in launched.wait_serving()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(IO_S)
            sock.connect(path)
            assert exchange(sock, triple_request(1)) == \
                "DEFER_IF_PERMIT Greylisted, please try again in 3600 seconds"
        body = scrape(port)
        assert metric(body, 'greylist_requests_total{action="DEFER_IF_PERMIT",'
                            'reason="new"}') == 1.0
        # The daemon did not bind a socket of its own.
        assert sorted(p.name for p in site.iterdir() if p.name.endswith(".lock")) == []
        assert launched.stop() == 0
        assert launched.output() == ""
        assert "]: stopped" in launched.log()
    finally:
        launched.stop()


def test_socket_activation_serves_the_learners_on_their_named_sockets(site):
    # As docs/systemd/greylist-learn.socket and greylist-outbound.socket
    # pass them: FileDescriptorName=socketmap and outbound.
    sockets = {}
    for name in ("policy", "socketmap", "outbound"):
        sockets[name] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockets[name].bind(str(site / name))
        sockets[name].listen(16)
    env = {"LISTEN_FDS": "3", "LISTEN_FDNAMES": "policy:socketmap:outbound"}
    settings = base_settings(site) + ("greylist_local_domains = example.com\n"
                                      "greylist_outbound_require_sasl = no\n")
    try:
        launched = Launched(site, settings, env,
                            fds=tuple(each.fileno() for each in sockets.values()))
    finally:
        for each in sockets.values():
            each.close()
    try:
        assert ("serving systemd:policy, systemd:socketmap, systemd:outbound as uid"
                in launched.wait_serving())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(IO_S)
            sock.connect(str(site / "socketmap"))
            sock.sendall(b"24:sender alice@example.com,")
            reply = b""
            for _ in range(12):   # "9:NOTFOUND ," is 12 bytes
                chunk = sock.recv(12 - len(reply))
                reply += chunk
                if not chunk or len(reply) == 12:
                    break
            assert reply == b"9:NOTFOUND ,"
        # The outbound learner answers DUNNO where the policy service
        # greylists the same new triple.
        for name, answer in (("outbound", "DUNNO"),
                             ("policy", "DEFER_IF_PERMIT Greylisted, please try again "
                                        "in 3600 seconds")):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(IO_S)
                sock.connect(str(site / name))
                assert exchange(sock, triple_request(1)) == answer, name
        assert launched.stop() == 0
        assert launched.output() == ""
    finally:
        launched.stop()


def test_socket_activation_binds_the_listeners_systemd_does_not_pass(site):
    # A socket unit with the policy socket only: greylist_metrics_listen is
    # still served (greylistd(8) suggests it), and a greylist_policy_listen
    # beside the passed socket is ignored with one warning, not bound.
    path = str(site / "activated")
    policy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    policy.bind(path)
    policy.listen(16)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    settings = base_settings(site) + (
        "greylist_metrics_listen = inet:127.0.0.1:%d\n"
        "greylist_policy_listen = unix:%s/own-policy\n" % (port, site))
    try:
        launched = Launched(site, settings, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "policy"},
                            fds=(policy.fileno(),))
    finally:
        policy.close()
    try:
        line = launched.wait_serving()
        assert "serving systemd:policy, inet:127.0.0.1:%d as uid" % port in line
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(IO_S)
            sock.connect(path)
            assert exchange(sock, triple_request(1)).startswith(DEFER_NEW)
        assert metric(scrape(port), 'greylist_requests_total{action="DEFER_IF_PERMIT",'
                                    'reason="new"}') == 1.0
        assert not (site / "own-policy").exists()
        warned = [line for line in launched.log().splitlines()
                  if "greylist_policy_listen ignored: systemd passes the policy socket" in line]
        assert len(warned) == 1
        assert launched.stop() == 0
    finally:
        launched.stop()


def _datagram(site):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return [sock], "is not a stream socket (ListenStream=)"


def _connection(site):
    # What a socket unit with Accept=yes passes: one accepted connection.
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    client.close()
    return [accepted], "is not a listening socket (the socket unit needs Accept=no)"


def _file(site):
    return [open(site / "not-a-socket", "w")], "is not a socket"


@pytest.mark.parametrize("make", [_datagram, _connection, _file])
def test_socket_activation_with_a_descriptor_that_is_no_listener_is_a_clear_fatal_error(
        site, make):
    """Review: a passed descriptor that was no listening stream socket (a
    unit with ListenDatagram= or Accept=yes, a file) ended greylistd
    with an "internal error" traceback in the log and on stderr, instead
    of the clear fatal error of a listener that cannot be created."""
    passed, reason = make(site)
    try:
        launched = Launched(site, base_settings(site), {"LISTEN_FDS": "1",
                                                        "LISTEN_FDNAMES": "policy"},
                            fds=tuple(each.fileno() for each in passed))
    finally:
        for each in passed:
            each.close()
    try:
        status = launched.proc.wait(timeout=30)
    finally:
        launched.stop()
    log = launched.log()
    assert status == 1
    assert "]: fatal: cannot listen: systemd's descriptor 3 (policy) %s" % reason in log, log
    assert "internal error" not in log and "Traceback" not in launched.output()
    assert launched.output().startswith("greylistd: fatal: cannot listen: "), launched.output()


def test_sd_notify_ready_after_start_and_stopping_at_sigterm(site):
    path = str(site / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.settimeout(IO_S)
    settings = base_settings(site) + "greylist_policy_listen = unix:%s/policy\n" % site
    launched = Launched(site, settings, {"NOTIFY_SOCKET": path})
    try:
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready.split("\n")
        # READY comes once everything is in place: the log says serving.
        assert " serving " in launched.log()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(IO_S)
            sock.connect(str(site / "policy"))
            assert exchange(sock, triple_request(1)).startswith(DEFER_NEW)
        os.kill(launched.pid, signal.SIGTERM)
        stopping = notify.recv(4096).decode()
        assert "STOPPING=1" in stopping.split("\n")
        assert launched.stop() == 0
        assert launched.output() == ""
    finally:
        launched.stop()
        notify.close()


# 5. Double start and listeners that cannot be created.

def test_a_second_instance_on_the_same_socket_is_refused_and_the_first_serves_on(site):
    with daemons.start(site) as first:
        with first.connect() as held:
            assert exchange(held, triple_request(1)).startswith(DEFER_NEW)
            done = run_once(first.settings_path)
            assert done.returncode == 1
            assert done.stdout == ""
            assert "another greylistd serves this socket" in done.stderr
            assert done.stderr.startswith("greylistd: fatal: cannot listen: unix:%s"
                                          % first.policy_path)
            fatal = log_lines(first, "fatal:")
            assert len(fatal) == 1 and "another greylistd serves this socket" in fatal[0]
            assert "%s.lock" % first.policy_path in fatal[0]
            # The first still has its socket and its connections.
            assert exchange(held, triple_request(2)).startswith(DEFER_NEW)
        assert first.ask(triple_request(3)).startswith(b"action=" + DEFER_NEW.encode())
        assert first.alive()
        assert first.stop() == 0


def test_a_second_instance_is_refused_even_when_the_lock_file_was_removed(site):
    # Review: after "rm policy.lock" a second greylistd took the live
    # instance's socket (unlink, bind), and the first served no one.
    with daemons.start(site) as first:
        os.unlink("%s.lock" % first.policy_path)
        settings = first.settings_path.read_text()
        # The second instance on the unix socket only (the first holds the
        # inet port, which would refuse it for another reason).
        alone = site / "alone.cf"
        alone.write_text("\n".join(line for line in settings.splitlines()
                                    if not line.startswith("greylist_policy_listen"))
                         + "\ngreylist_policy_listen = unix:%s\n" % first.policy_path)
        os.chmod(alone, 0o644)
        done = run_once(alone)
        assert done.returncode == 1, done
        assert "another process serves this socket" in done.stderr, done.stderr
        assert first.ask(triple_request(3)).startswith(b"action=" + DEFER_NEW.encode())
        assert first.stop() == 0


@pytest.mark.parametrize("kind", ["missing-directory", "port-in-use"])
def test_a_listener_that_cannot_be_created_is_fatal(site, kind):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if kind == "missing-directory":
            spec = "unix:/nonexistent-dir/x"
            expected = "directory /nonexistent-dir: No such file or directory"
        else:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            spec = "inet:127.0.0.1:%d" % busy.getsockname()[1]
            expected = "Address already in use"
        settings = daemons.write_settings(site, daemons.free_port(),
                                          "greylist_policy_listen = %s\n" % spec)
        done = run_once(settings)
    finally:
        busy.close()
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == "greylistd: fatal: cannot listen: %s: %s\n" % (spec, expected)
    log = (site / "log").read_text()
    assert "]: fatal: cannot listen: %s: %s\n" % (spec, expected) in log
    assert not (site / "db.lmdb").exists()


# 6. Idle timeout and the connection cap.

def test_an_idle_connection_is_closed_after_the_idle_timeout(site):
    # 2 s: swept every 0.5 s, closed 2 to 2.5 s after its last request;
    # the bound leaves a second for a loaded machine, less than a second
    # idle timeout more.
    with daemons.start(site, "greylist_idle_timeout = 2s\n") as daemon:
        silent = daemon.connect()
        used = daemon.connect()
        began = time.monotonic()
        assert exchange(used, triple_request(1)).startswith(DEFER_NEW)
        closed_without_reply(silent, timeout=5)
        closed_without_reply(used, timeout=5)
        took = time.monotonic() - began
        assert 1.8 <= took <= 3.6, took
        silent.close()
        used.close()
        with daemon.connect() as fresh:  # new connections are served
            assert exchange(fresh, triple_request(2)).startswith(DEFER_NEW)
        assert daemon.stop() == 0
        assert_clean(daemon)


def test_connections_beyond_the_cap_are_closed_with_one_warning(site):
    port = daemons.free_port()
    extra = ("greylist_max_connections = 3\n"
             "greylist_metrics_listen = inet:127.0.0.1:%d\n" % port)
    with daemons.start(site, extra) as daemon:
        # The start's readiness probe has gone: no connection is open.
        assert wait_for(lambda: metric(scrape(port), "greylist_connections") == 0.0)
        served = [daemon.connect() for _ in range(3)]
        for n, sock in enumerate(served):
            assert exchange(sock, triple_request(n)).startswith(DEFER_NEW)
        for _ in range(5):
            with daemon.connect() as extra_sock:
                assert closed_without_reply(extra_sock, timeout=5) < 1.0
        limit = log_lines(daemon, "connection limit reached")
        assert len(limit) == 1 and ": warning: " in limit[0]
        assert "greylist_max_connections = 3" in limit[0]
        # The ones within the cap were not disturbed.
        for n, sock in enumerate(served):
            assert exchange(sock, triple_request(10 + n)).startswith(DEFER_NEW)
        served.pop().close()
        assert wait_for(lambda: log_lines(daemon, "connections below the limit again"))
        with daemon.connect() as again:
            assert exchange(again, triple_request(20)).startswith(DEFER_NEW)
        assert len(log_lines(daemon, "connection limit reached")) == 1
        for sock in served:
            sock.close()
        assert daemon.stop() == 0
        assert_clean(daemon)


# 7. Bad input on one connection.

BAD_INPUTS = {
    "no-equals": b"request=smtpd_access_policy\nthis line has no equals sign\n\n",
    "nul": b"request=smtpd_access_policy\nsender=a\0b@example.org\n\n",
    "long-line": b"request=smtpd_access_policy\n" + b"x" * 70000 + b"\n\n",
    "endless-line": b"y" * 70000,
    "http": b"GET / HTTP/1.0\nHost: example.org\n\n",
    # CRLF lines never make the empty line that ends a request: the first
    # line, without "=", is refused once it ends, not at the end of input.
    "http-crlf-eof": b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n",
    "tls": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\n\n",
    "premature-eof": b"request=smtpd_access_policy\nsender=a@example.org\n",
}


def test_an_over_long_attribute_is_answered_dunno_on_the_same_connection(site):
    # issue 15: an attribute over the line cap is discarded as it arrives
    # and the request answered DUNNO; the connection goes on.
    long = triple_request(1).replace(b"\nsender=", b"\nsender=" + b"s" * 100000, 1)
    with daemons.start(site) as daemon:
        with daemon.connect() as sock:
            sock.sendall(long)
            assert read_reply(sock) == b"action=DUNNO\n\n"
            assert exchange(sock, triple_request(2)).startswith(DEFER_NEW)
        assert wait_for(lambda: len(log_lines(daemon, "request attribute too long")) == 1)
        line = log_lines(daemon, "request attribute too long")[0]
        assert ": warning: " in line and "sender of 1000" in line and line.endswith(
            "; answering DUNNO")
        assert not log_lines(daemon, "disconnecting without a reply")
        assert daemon.stop() == 0


def test_bad_input_closes_only_its_own_connection(site):
    with daemons.start(site) as daemon:
        others = [daemon.connect() for _ in range(2)]
        for n, sock in enumerate(others):
            assert exchange(sock, triple_request(n)).startswith(DEFER_NEW)
        for count, (name, data) in enumerate(BAD_INPUTS.items(), 1):
            with daemon.connect() as bad:
                try:
                    bad.sendall(data)
                    if name.endswith("eof"):
                        bad.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # closed while we still sent: fine
                closed_without_reply(bad, timeout=5)
            assert wait_for(lambda: len(log_lines(daemon, "disconnecting without a reply"))
                            == count), (name, daemon.log())
            assert ": warning: " in log_lines(daemon, "disconnecting without a reply")[-1]
            for n, sock in enumerate(others):
                assert exchange(sock, triple_request(100 * count + n)).startswith(DEFER_NEW)
        # A valid request dripped byte by byte is served, and holds up nobody.
        drip = triple_request(999)
        with daemon.connect() as slow:
            began = time.monotonic()
            for index in range(len(drip)):
                slow.sendall(drip[index:index + 1])
                if index == len(drip) // 2:
                    assert exchange(others[0], triple_request(1000)).startswith(DEFER_NEW)
                time.sleep(0.002)
                assert time.monotonic() - began < 10
            assert REPLY.fullmatch(read_reply(slow)).group(1).startswith(DEFER_NEW.encode())
        for n, sock in enumerate(others):
            assert exchange(sock, triple_request(2000 + n)).startswith(DEFER_NEW)
            sock.close()
        assert len(log_lines(daemon, "disconnecting without a reply")) == len(BAD_INPUTS)
        text = daemon.log()
        for expected in ("malformed line", "NUL byte", "premature end of input"):
            assert expected in text
        assert daemon.stop() == 0
        assert_clean(daemon)


# 8. Metrics.

def test_metrics_count_requests_commits_and_connections(site):
    port = daemons.free_port()
    with daemons.start(site, "greylist_metrics_listen = inet:127.0.0.1:%d\n" % port) as daemon:
        assert wait_for(lambda: metric(scrape(port), "greylist_connections") == 0.0)
        with daemon.connect() as held:
            for n in range(5):
                assert exchange(held, triple_request(n)).startswith(DEFER_NEW)
            # Past the render of the last scrape (RENDER_EVERY_S).
            time.sleep(RENDER_EVERY_S + 0.05)
            status, body = http(port, b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            assert status == "HTTP/1.0 200 OK"
            assert b"# TYPE greylist_requests_total counter" in body
            assert metric(body, 'greylist_requests_total{action="DEFER_IF_PERMIT",'
                                'reason="new"}') == 5.0
            assert metric(body, "greylist_commit_batch_size_count") >= 1
            assert metric(body, "greylist_commit_batch_size_sum") == 5.0
            assert metric(body, "greylist_request_seconds_count") == 5.0
            assert metric(body, "greylist_connections") == 1.0
            assert metric(body, "greylist_store_failures_total") == 0.0
        assert wait_for(lambda: metric(scrape(port), "greylist_connections") == 0.0)
        for data, answer in ((b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
                              "HTTP/1.0 405 Method Not Allowed"),
                             (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
                              "HTTP/1.0 405 Method Not Allowed"),
                             (b"HELLO\r\n\r\n", "HTTP/1.0 400 Bad Request"),
                             (b"GET\r\n\r\n", "HTTP/1.0 400 Bad Request"),
                             (b"POST /\xff HTTP/1.0\r\n\r\n", "HTTP/1.0 400 Bad Request")):
            status, _ = http(port, data)
            assert status == answer, data
        assert daemon.stop() == 0
        assert_clean(daemon)


def test_scrapes_in_a_loop_get_one_render_every_half_second(monkeypatch):
    # A local user scraping in a loop: each render costs the event loop
    # milliseconds (2.3 ms with 200 reasons), taken from every policy
    # request. Within RENDER_EVERY_S a scrape gets the last render.
    from greylist import metrics as module
    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    renders = []
    real = module.generate_latest
    monkeypatch.setattr(module, "generate_latest",
                        lambda registry: renders.append(1) or real(registry))
    collected = module.Metrics(None)   # (the log is for the scrape cap only)
    first = collected.text()
    collected.connections(7)
    for _ in range(100):
        assert collected.text() == first
        now[0] += RENDER_EVERY_S / 200
    now[0] += RENDER_EVERY_S / 2
    assert metric(collected.text(), "greylist_connections") == 7.0
    assert len(renders) == 2


def test_a_reason_with_bytes_that_are_not_utf8_does_not_break_the_scrapes(site):
    # Review: a protocol_state of bytes that were not UTF-8 became a label
    # the exposition could not encode; every later scrape got 400.
    port = daemons.free_port()
    with daemons.start(site, "greylist_metrics_listen = inet:127.0.0.1:%d\n" % port) as daemon:
        data = request(*triple(1), state="RCPT").replace(b"=RCPT\n", b"=x\xff\n")
        assert daemon.ask(data) == b"action=DUNNO\n\n"
        assert metric(scrape(port), 'greylist_requests_total{action="DUNNO",'
                                    'reason="protocol_state=x\\\\udcff"}') == 1.0
        assert daemon.stop() == 0
        assert_clean(daemon)


def test_a_scrape_is_answered_as_text_format_0_0_4(site):
    # Review: the Content-Type was prometheus_client's CONTENT_TYPE_LATEST,
    # version=1.0.0 in its recent releases, sent to every scraper.
    port = daemons.free_port()
    with daemons.start(site, "greylist_metrics_listen = inet:127.0.0.1:%d\n" % port) as daemon:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_S) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\nAccept: text/plain\r\n\r\n")
            head = daemons.receive_all(sock, IO_S).partition(b"\r\n\r\n")[0]
        assert b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in head
        assert daemon.stop() == 0
        assert_clean(daemon)


def test_a_head_request_gets_the_head_of_a_scrape(site):
    # Review: HEAD, which a server must support with GET (RFC 9110 9.1),
    # was answered 400 Bad Request.
    port = daemons.free_port()
    with daemons.start(site, "greylist_metrics_listen = inet:127.0.0.1:%d\n" % port) as daemon:
        status, body = http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert (status, body) == ("HTTP/1.0 200 OK", b"")
        assert daemon.stop() == 0
        assert_clean(daemon)


def test_a_request_with_bare_line_feeds_is_answered_at_once(site):
    # A scraper that ends its lines with LF alone (RFC 9112 2.2 lets a
    # server accept it) waited the 5 s timeout for a CRLF, then got 400.
    # A head beyond the cap still gets 400 at once.
    port = daemons.free_port()
    with daemons.start(site, "greylist_metrics_listen = inet:127.0.0.1:%d\n" % port) as daemon:
        for data, answer in ((b"GET /metrics HTTP/1.0\nHost: x\n\n", "HTTP/1.0 200 OK"),
                             (b"GET /metrics HTTP/1.0\r\nHost: x\n\r\n", "HTTP/1.0 200 OK"),
                             (b"DELETE / HTTP/1.1\n\n", "HTTP/1.0 405 Method Not Allowed"),
                             (b"GET / HTTP/1.0\n" + b"X: %s\n" % (b"y" * 9000) + b"\n",
                              "HTTP/1.0 400 Bad Request"),
                             (b"GET / HTTP/1.0\n" + b"X: y\n" * 2000 + b"\n",
                              "HTTP/1.0 400 Bad Request")):
            began = time.monotonic()
            status, body = http(port, data)
            assert status == answer and time.monotonic() - began < 2.0, (data[:40], status)
            if answer.endswith("200 OK"):
                assert b"greylist_connections" in body
        assert daemon.stop() == 0
        assert_clean(daemon)


# 9. A store that fails: fail open.

def test_a_refused_database_directory_fails_open_with_one_warning(site):
    shared = site / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    port = daemons.free_port()
    extra = ("greylist_database = %s/db\ngreylist_metrics_listen = inet:127.0.0.1:%d\n"
             % (shared, port))
    with daemons.start(site, extra) as daemon:
        with daemon.connect() as held:
            for n in range(5):
                assert exchange(held, triple_request(n)) == "DUNNO"
        for n in range(5, 8):
            assert daemon.ask(triple_request(n)) == b"action=DUNNO\n\n"
        found = warnings(daemon.log())
        assert len(found) == 1, found
        assert "world-writable" in found[0] and "greylist_failure_action" in found[0]
        assert metric(scrape(port), "greylist_store_failures_total") == 8.0
        assert daemon.alive()
        assert daemon.stop() == 0
        assert_clean(daemon)
    assert list(shared.iterdir()) == []


def test_a_fatal_error_is_not_written_to_a_client_socket_on_stderr(site):
    # As spawn(8) would connect it: one socket on descriptors 0, 1 and 2.
    cf = pathlib.Path(site) / "bad.cf"
    cf.write_text("greylist_database = %s/db\ngreylist_log = %s/bad.log\n"
                  "greylist_allow_root = yes\n"
                  "greylist_policy_listen = unix:/nonexistent-dir/policy\n" % (site, site))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistd", "-c", str(cf)],
                              stdin=theirs, stdout=theirs, stderr=theirs, timeout=30,
                              env=daemons.environment())
        theirs.close()
        ours.settimeout(5)
        assert (done.returncode, ours.recv(4096)) == (1, b"")
    assert "fatal: cannot listen" in (pathlib.Path(site) / "bad.log").read_text()


# 10. A database locked by another process at start, or replaced while locked.

HOLD_EXCLUSIVE = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                  "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); "
                  "time.sleep(float(sys.argv[2]))")


def hold_exclusive(path: pathlib.Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_EXCLUSIVE, str(path), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def release(holder: subprocess.Popen) -> None:
    holder.kill()
    holder.wait(timeout=10)
    holder.stdout.close()


def test_greylistd_started_while_another_process_holds_the_lock_serves_fail_open(site):
    # The trial commit at open found the lock busy and failed on its own
    # message (NameError): greylistd exited 1 with a traceback.
    from greylist.stores.lmdbenv import Environment
    made = Environment(str(site / "db"))
    made.open()
    made.close()
    holder = hold_exclusive(site / "db.lmdb", 60)
    try:
        with daemons.start(site, "greylist_lock_timeout = 300ms\n") as daemon:
            with daemon.connect() as held:
                assert exchange(held, triple_request(1)) == "DUNNO"
            assert daemon.alive()
            found = warnings(daemon.log())
            assert found and all("locked by another process" in line for line in found), found
            release(holder)
            # The file is used again once the lock is free (after the
            # reopen delay): greylisting resumes without a restart.
            assert wait_for(lambda: daemon.ask(triple_request(2)).startswith(
                b"action=DEFER_IF_PERMIT"), timeout=30, interval=0.5)
            assert daemon.stop() == 0
            assert_clean(daemon)
    finally:
        if holder.poll() is None:
            release(holder)


def test_reopening_a_replaced_database_never_holds_up_the_other_connections(site):
    # The event loop's reads reopened a replaced file themselves, with the
    # lock wait and the trial commit of an open: every connection waited.
    with daemons.start(site, "greylist_delay = 1h\n") as daemon:
        first, other = daemon.connect(), daemon.connect()
        with first, other:
            assert exchange(first, triple_request(1)).startswith(DEFER_NEW)
            db = daemon.database.with_suffix(".lmdb")
            shutil.copy(db, str(db) + ".new")
            holder = hold_exclusive(pathlib.Path(str(db) + ".new"), 60)
            try:
                os.rename(str(db) + ".new", db)   # restored from a copy, a new inode
                time.sleep(1.5)                   # past the same-file check interval
                first.sendall(triple_request(2))  # this one reopens, and waits
                time.sleep(0.3)
                began = time.monotonic()
                data = request("192.0.2.1", "x@example.org", "y@example.net", state="DATA")
                assert exchange(other, data) == "DUNNO"
                assert time.monotonic() - began < 0.5
                assert REPLY.fullmatch(read_reply(first, timeout=30))
            finally:
                release(holder)
        assert daemon.stop() == 0
        assert_clean(daemon)


def test_a_reload_names_the_restart_only_settings_as_the_administrator_writes_them():
    # The warning said "lock_timeout_ms, cleanup_state changed": names
    # of no setting. Every restart-only field is named by its setting.
    from greylist.cli.greylistd import RESTART_ONLY, _setting_names
    from greylist.config import SETTINGS
    for field in RESTART_ONLY:
        (name,) = _setting_names([field])
        assert name in SETTINGS, field
    assert _setting_names(["database", "client_table", "cleanup_state", "lock_timeout_ms"]) \
        == ["greylist_database", "greylist_client_table", "greylist_lock_timeout"]


def test_the_shared_cap_warns_once_for_all_services_and_again_after_room(site):
    # Review: the cap is shared, but each service kept its own "warned"
    # flag: a cap reached through two services warned twice, and a later
    # reach warned not at all until the service that warned lost one.
    sm_path = site / "sm"
    port = daemons.free_port()
    extra = ("greylist_max_connections = 2\n"
             "greylist_metrics_listen = inet:127.0.0.1:%d\n"
             "greylist_socketmap_listen = unix:%s\n" % (port, sm_path))

    def socketmap() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(IO_S)
        sock.connect(str(sm_path))
        return sock
    with daemons.start(site, extra) as daemon:
        # The start's readiness probe has gone: no connection is open.
        assert wait_for(lambda: metric(scrape(port), "greylist_connections") == 0.0)
        served = [daemon.connect(), socketmap()]
        assert exchange(served[0], triple_request(1)).startswith(DEFER_NEW)
        for refused in (daemon.connect(), socketmap(), socketmap()):
            with refused:
                assert closed_without_reply(refused, timeout=5) < 1.0
        assert len(log_lines(daemon, "connection limit reached")) == 1
        served.pop().close()  # the socketmap one: room again
        assert wait_for(lambda: log_lines(daemon, "connections below the limit again"))
        served.append(daemon.connect())
        assert exchange(served[1], triple_request(2)).startswith(DEFER_NEW)
        with socketmap() as refused:
            assert closed_without_reply(refused, timeout=5) < 1.0
        assert len(log_lines(daemon, "connection limit reached")) == 2
        for sock in served:
            sock.close()
        assert daemon.stop() == 0
        assert_clean(daemon)


def test_idle_scrapers_beyond_the_cap_are_closed_and_a_scrape_is_still_served(site):
    # Review: metrics connections were neither capped nor counted: idle
    # ones alone took the descriptors the policy connections need.
    from greylist.metrics import MAX_SCRAPERS, TIMEOUT_S
    port = daemons.free_port()
    with daemons.start(site, "greylist_metrics_listen = inet:127.0.0.1:%d\n" % port) as daemon:
        idle = []
        try:
            for _ in range(MAX_SCRAPERS):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=IO_S))
            time.sleep(0.3)
            extra = socket.create_connection(("127.0.0.1", port), timeout=IO_S)
            with extra:
                began = time.monotonic()
                try:
                    assert extra.recv(100) == b""
                except ConnectionResetError:
                    pass
                assert time.monotonic() - began < 1.0
            # Review: the cap closed scrapes without a word in the log.
            assert len(log_lines(daemon, "metrics: %d scrapes under way" % MAX_SCRAPERS)) == 1
            with daemon.connect() as sock:  # the policy service goes on
                assert exchange(sock, triple_request(1)).startswith(DEFER_NEW)
        finally:
            for sock in idle:
                sock.close()
        # Room again once the idle ones are gone (each ends within its timeout).
        def scraped() -> bool:
            try:
                return b"greylist_connections" in scrape(port)
            except OSError:
                return False
        assert wait_for(scraped, TIMEOUT_S * 2 + 5)
        assert len(log_lines(daemon, "metrics: scrapes below the limit again")) == 1
        assert daemon.stop() == 0
        assert_clean(daemon)


def test_metrics_count_store_failures_and_cap_the_reason_labels():
    # A client's protocol_state=X becomes a reason: past 200 label pairs
    # the new ones are counted as "other", so a scraper's series stay few.
    import types
    from greylist.metrics import Metrics
    metrics = Metrics(log=None)

    def answer(action, reason):
        return types.SimpleNamespace(action=action,
                                     decision=types.SimpleNamespace(reason=reason))
    for n in range(250):
        metrics.answer(answer("DUNNO", "protocol_state=X%d" % n))
    metrics.answer(answer("DEFER_IF_PERMIT Greylisted", "new"))
    metrics.store_failure()
    metrics.store_failure()
    text = metrics.text().decode()
    assert 'greylist_requests_total{action="DUNNO",reason="other"} 50.0' in text
    assert 'reason="protocol_state=X199"' in text and 'reason="protocol_state=X200"' not in text
    assert 'greylist_requests_total{action="DEFER_IF_PERMIT",reason="other"} 1.0' in text
    assert "greylist_store_failures_total 2.0" in text
