"""A real greylistd process for tests: start it on a settings file, talk to it, stop it.

DESCRIPTION
    start(directory, extra_settings="", user=None) writes
    directory/greylistd.cf and runs `python -m greylist.cli.greylistd -c`
    on it, with stdout and stderr in directory/greylistd.out, and waits
    (bounded, START_S) until its unix socket accepts a connection and
    its log has a new "serving" line (the listeners are bound before the
    database is opened, so a bare connect is not yet readiness). The
    settings are:

        greylist_database = DIRECTORY/db
        greylist_log = DIRECTORY/log
        greylist_delay = 2s
        greylist_allow_root = yes          (when run as root, without user)
        greylist_user = USER               (when user is given)
        greylist_policy_listen = unix:DIRECTORY/policy inet:127.0.0.1:PORT
        EXTRA_SETTINGS                     (verbatim, last: they win)

    PORT is a free loopback port, picked just before the start; a start
    that loses that port to another process is retried with a new one.
    With user, the caller arranges that the user can write the database
    directory (nothing is chowned here).

    The Daemon it returns is a context manager (stop() on exit) with:

        pid, policy_path (unix socket), port (inet on 127.0.0.1),
        log_path, settings_path, database, output_path
        ask(data) -> bytes   data on a fresh unix connection, then EOF;
                             everything the daemon wrote until it closed
        connect(inet=False)  a connected socket (unix, or the inet port)
        stop(signal=SIGTERM, timeout=10) -> exit status; SIGKILL after
                             timeout. Only this process, by its PID.
        log(), output()      the log file and stdout/stderr so far
        alive()

    A start that does not come up raises DaemonError with the log and
    output, and leaves no process behind.
"""

import os
import pathlib
import signal as signals
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# How long a start may take until the unix socket accepts.
START_S = 20.0
IO_TIMEOUT_S = 30.0


class DaemonError(Exception):
    """greylistd did not start (or did not stop)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NOTIFY_SOCKET", None)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    return env


def command(settings_path: pathlib.Path, module: str = "greylist.cli.greylistd") -> list[str]:
    return [sys.executable, "-m", module, "-c", str(settings_path)]


class Daemon:
    """One greylistd process started by start()."""

    def __init__(self, directory: pathlib.Path, proc: subprocess.Popen, port: int,
                 settings_path: pathlib.Path, output_path: pathlib.Path) -> None:
        self.directory = directory
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.policy_path = directory / "policy"
        self.log_path = directory / "log"
        self.database = directory / "db"
        self.settings_path = settings_path
        self.output_path = output_path

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connect(self, inet: bool = False, timeout: float = IO_TIMEOUT_S) -> socket.socket:
        """A socket connected to the unix listener (or to the inet one)."""
        if inet:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = ("127.0.0.1", self.port)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = str(self.policy_path)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def ask(self, data: bytes, timeout: float = IO_TIMEOUT_S) -> bytes:
        """Send data on a fresh unix connection, end it, and return all
        that comes back until the daemon closes the connection."""
        with self.connect(timeout=timeout) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return receive_all(sock, timeout)

    def stop(self, signal: int = signals.SIGTERM, timeout: float = 10) -> int:
        """Send signal to this process; SIGKILL it if it has not exited
        after timeout seconds; return its exit status (negative: the
        signal that ended it, as subprocess reports)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signals.SIGKILL)
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        try:
            return self.output_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


def write_settings(directory: pathlib.Path, port: int, extra_settings: str = "",
                   user: str | None = None) -> pathlib.Path:
    lines = ["greylist_database = %s" % (directory / "db"),
             "greylist_log = %s" % (directory / "log"),
             "greylist_delay = 2s"]
    if user is not None:
        lines.append("greylist_user = %s" % user)
    elif os.geteuid() == 0:
        lines.append("greylist_allow_root = yes")
    lines.append("greylist_policy_listen = unix:%s inet:127.0.0.1:%d"
                 % (directory / "policy", port))
    text = "\n".join(lines) + "\n"
    if extra_settings:
        text += extra_settings if extra_settings.endswith("\n") else extra_settings + "\n"
    path = directory / "greylistd.cf"
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


def start(directory, extra_settings: str = "", user: str | None = None,
          start_s: float = START_S, module: str = "greylist.cli.greylistd",
          prefix: tuple[str, ...] = ()) -> Daemon:
    """Start greylistd in directory (see the module description); module:
    what runs it (a fault injector of tests/reliability, say); prefix: a
    command that execs it (prlimit, say)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)  # a database directory must not be world-writable
    last_error = None
    for _attempt in range(3):
        port = free_port()
        settings_path = write_settings(directory, port, extra_settings, user)
        output_path = directory / "greylistd.out"
        served = _serving_lines(directory / "log")
        with open(output_path, "ab") as output:
            proc = subprocess.Popen([*prefix, *command(settings_path, module)],
                                    stdin=subprocess.DEVNULL,
                                    stdout=output, stderr=subprocess.STDOUT,
                                    env=environment(), cwd=str(directory))
        daemon = Daemon(directory, proc, port, settings_path, output_path)
        try:
            _wait_ready(daemon, start_s, served)
            return daemon
        except DaemonError as exc:
            daemon.stop(signals.SIGKILL)
            last_error = exc
            if "Address already in use" not in daemon.output():
                raise
    raise last_error


def _serving_lines(log_path: pathlib.Path) -> int:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if "]: greylistd " in line and " serving " in line)


def _wait_ready(daemon: Daemon, start_s: float, served: int) -> None:
    deadline = time.monotonic() + start_s
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise DaemonError("greylistd exited with %s at start\noutput: %s\nlog: %s"
                              % (daemon.proc.returncode, daemon.output(), daemon.log()))
        if _serving_lines(daemon.log_path) <= served:
            time.sleep(0.02)
            continue
        try:
            sock = daemon.connect(timeout=1)
        except OSError:
            time.sleep(0.02)
            continue
        sock.close()
        return
    raise DaemonError("greylistd did not accept on %s within %s s\noutput: %s\nlog: %s"
                      % (daemon.policy_path, start_s, daemon.output(), daemon.log()))


def receive_all(sock: socket.socket, timeout: float = IO_TIMEOUT_S) -> bytes:
    """All that comes on sock until the peer closes it (at most timeout s)."""
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    raise TimeoutError("the connection was not closed in %s s" % timeout)
