"""Helpers for the reliability and hostile-input suite (tests/test_reliability_*.py).

DESCRIPTION
    The suite has two sizes. By default (CI) every test is small, seeded
    and fast; with GREYLIST_FULL=1 (tests/run-reliability) the sizes below
    grow to the full figures that docs/reliability.md reports, and a test
    there checks that the document states these full sizes.

    With GREYLIST_FIGURES=FILE, each test appends one JSON line of figures
    (rounds, inputs, durations, outcomes) to FILE; tests/run-reliability
    prints them at the end.

    The helpers run the real program as a process with a settings file
    that logs to a file, as tests/test_cli.py does, and treat it as a
    black box where they can: which records exist is asked of the program
    itself (a stored triple is never "reason=new" again), so the checks
    hold whatever the key format is.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
FULL = os.environ.get("GREYLIST_FULL") == "1"
SEED = int(os.environ.get("GREYLIST_SEED", "20261122"))


def size(ci, full):
    """The CI size, or the full size under GREYLIST_FULL=1."""
    return full if FULL else ci


# Full sizes: docs/reliability.md must state these (test_reliability_docs).
FULL_SIZES = {
    "crash_rounds": 60,
    "crash_writers": 8,
    "soak_seconds": 60,
    "soak_processes": 16,
    "hypothesis_parser_inputs": 30000,
    "hypothesis_loop_inputs": 5000,
    "process_fuzz_inputs": 1000,
    "atheris_inputs": 150000,
    "corrupt_variants": 200,
    "memory_requests": 50000,
}
CI_SIZES = {
    "crash_rounds": 6,
    "crash_writers": 4,
    "soak_seconds": 6,
    "soak_processes": 16,
    "hypothesis_parser_inputs": 400,
    "hypothesis_loop_inputs": 100,
    "process_fuzz_inputs": 24,
    "atheris_inputs": 3000,
    "corrupt_variants": 12,
    "memory_requests": 3000,
}
SIZES = FULL_SIZES if FULL else CI_SIZES

ALLOW_ROOT = os.geteuid() == 0
# A well-formed reply: exactly one action line and the empty line.
REPLY = re.compile(rb"action=([^\n\0]+)\n\n")
DECISION = re.compile(r"greylist\[(\d+)\]: action=(\S+) reason=(\S+) age=(-?\d+) "
                      r"client=(\S*) sender=(\S*) rcpt=(\S*)$")
BAD_LOG = ("Traceback", "internal error", "fatal:")


def record_figures(test: str, **figures) -> None:
    """Append one JSON line of figures to $GREYLIST_FIGURES, if set."""
    path = os.environ.get("GREYLIST_FIGURES")
    if not path:
        return
    figures = {"test": test, "full": FULL, "seed": SEED, **figures}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(figures, sort_keys=True) + "\n")


def home(directory: pathlib.Path, mode: int = 0o755) -> pathlib.Path:
    """Make directory private enough for a database (not world-writable)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, mode)
    return directory


def settings(directory: pathlib.Path, name: str = "greylist.cf", log: str = "log",
             database: str | None = None, **extra: str) -> pathlib.Path:
    """Write a settings file that logs to directory/log; return its path.

    extra maps setting names without the greylist_ prefix to values.
    """
    lines = ["greylist_log = %s" % (directory / log),
             "greylist_database = %s" % (database or directory / "db")]
    if ALLOW_ROOT:
        lines.append("greylist_allow_root = yes")
    lines += ["greylist_%s = %s" % item for item in extra.items()]
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o644)
    return path


def environment(**extra: str) -> dict[str, str]:
    """The environment for a greylist process that imports this checkout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LMDB_DEFAULT_LIB_VERSION", None)
    env.update(extra)
    return env


def command(cf: pathlib.Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "greylist", "-c", str(cf), *args]


# A wrapper that shortens the store's reopen delay (10 s), so that recovery
# is seen within a test; everything else is the real program.
FAST_REOPEN = ("import sys; from greylist.wiring import Tuning; "
               "from greylist.cli.greylist import main; sys.argv[0] = 'greylist'; "
               "sys.exit(main(sys.argv[1:], tuning=Tuning(reopen_delay_s=%s)))")


def fast_reopen_command(cf: pathlib.Path, delay_s: float = 0.3) -> list[str]:
    return [sys.executable, "-c", FAST_REOPEN % delay_s, "-c", str(cf)]


def request(client: str, sender: str, recipient: str, state: str = "RCPT",
            **extra: str) -> bytes:
    """One policy request as Postfix 3.7 sends it (without instance)."""
    attrs = [("request", "smtpd_access_policy"), ("protocol_state", state),
             ("protocol_name", "ESMTP"), ("client_address", client),
             ("client_name", "unknown"), ("reverse_client_name", "unknown"),
             ("helo_name", "mail.example.org"), ("sender", sender),
             ("recipient", recipient), ("recipient_count", "0"), ("size", "1024"),
             ("policy_context", "")]
    attrs += list(extra.items())
    return "".join("%s=%s\n" % item for item in attrs).encode() + b"\n"


def triple(n: int, tag: str = "") -> tuple[str, str, str]:
    """The n-th test triple (n < 2**24).

    Each triple has its own client /24 and its own sender, so client
    grouping and the auto-whitelists never join two triples; the sender's
    number follows a letter, so VERP normalisation keeps it; the recipient
    token rcpt-NNNNNN@ identifies the triple in a database key.
    """
    client = "%d.%d.%d.1" % (10 + n // 65536, n // 256 % 256, n % 256)
    return (client, "from-%st%06d@example.org" % (tag, n),
            "rcpt-%s%06d@example.net" % (tag, n))


def triple_request(n: int, tag: str = "") -> bytes:
    return request(*triple(n, tag))


def split_replies(out: bytes) -> list[str] | None:
    """The actions of a stream of replies, or None if it is not well-formed."""
    actions, pos = [], 0
    while pos < len(out):
        match = REPLY.match(out, pos)
        if match is None:
            return None
        actions.append(match.group(1).decode("utf-8", "surrogateescape"))
        pos = match.end()
    return actions


def decisions(log_text: str) -> list[tuple[int, str, str, int, str, str, str]]:
    """(pid, action, reason, age, client, sender, rcpt) of each decision line."""
    found = []
    for line in log_text.splitlines():
        match = DECISION.search(line)
        if match:
            pid, action, reason, age, client, sender, rcpt = match.groups()
            found.append((int(pid), action, reason, int(age), client, sender, rcpt))
    return found


def warnings(log_text: str) -> list[str]:
    return [line for line in log_text.splitlines() if ": warning: " in line]


def read_log(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def run(argv: list[str], data: bytes, timeout: float = 60,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run argv with stdin data; capture stdout and stderr."""
    return subprocess.run(argv, input=data, capture_output=True, timeout=timeout,
                          env=env or environment())


class Client:
    """A greylist process driven like smtpd: one request at a time."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env or environment())
        self.pid = self.proc.pid
        self._stderr = b""
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        self._stderr = self.proc.stderr.read()

    def ask(self, data: bytes) -> str | None:
        """Send one request; return the reply's action, or None if the
        process went away before a whole reply arrived."""
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return None
        first = self.proc.stdout.readline()
        second = self.proc.stdout.readline() if first.endswith(b"\n") else b""
        match = REPLY.fullmatch(first + second)
        if match is None:
            if first or second:
                raise AssertionError("malformed reply %r" % (first + second))
            return None
        return match.group(1).decode("utf-8", "surrogateescape")

    def close(self, timeout: float = 30) -> tuple[int, bytes]:
        """End input, wait; return (exit status, everything on stderr)."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            status = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._drain.join(timeout=10)
            self.proc.stdout.close()
            self.proc.stderr.close()
        return status, self._stderr

    def kill(self) -> None:
        """SIGKILL this process (the test's own child, by PID)."""
        if self.proc.poll() is None:
            self.proc.kill()


def postmap_list(postmap: str, name: str, timeout: float = 30) -> list[tuple[str, str]]:
    """postmap -s lmdb:name as (key, value) pairs; asserts a clean run."""
    done = subprocess.run([postmap, "-s", "lmdb:" + name], capture_output=True,
                          timeout=timeout)
    assert done.returncode == 0 and done.stderr == b"", (done.returncode, done.stderr)
    pairs = []
    for line in done.stdout.decode("utf-8", "surrogateescape").splitlines():
        key, tab, value = line.partition("\t")
        assert tab, "postmap -s line without a tab: %r" % line
        pairs.append((key, value))
    return pairs


def monotonic_deadline(seconds: float) -> float:
    return time.monotonic() + seconds
